"""`alignkit generate` with a ReFT adapter and prompts shorter than its positions: generated as training edits them
(fewer positions), with one warning over every prompt before generating and the count in generation_metrics.json.
It was the generation's own once-per-process warning, counting the first batch that held one alone."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_generate_counts_prompts_shorter_than_the_reft_positions(serve_dirs, tmp_path, caplog):
    data = tmp_path / "prompts.jsonl"
    long = "The quick brown fox jumps over the lazy dog again and again"
    # polite: f1+l2, share_weights -> 3 tokens at least; "a" is one or two tokens (with a BOS)
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (long, long, long, long, "a")))
    out = tmp_path / "gen"
    with caplog.at_level("WARNING"):
        rc = main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"output_dir={out}",
                   f"model.path={serve_dirs['base']}", f"model.adapter_path={serve_dirs['adapters']['polite']}",
                   f"data.path={data}", "generation.max_new_tokens=2", "batch_size=4"])
    assert rc == 0
    metrics = json.loads((out / "generation_metrics.json").read_text())
    assert metrics["reft/short_prompts"] == 1 and metrics["prompts"] == 5
    said = [r.getMessage() for r in caplog.records if "ReFT positions 'f1+l2' need prompts of at least 3" in
            r.getMessage()]
    assert len(said) == 1 and "1 of 5 prompts are shorter" in said[0], said  # all five, not the last batch's one
