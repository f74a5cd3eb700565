"""`alignkit generate` with `generation.seed`: the same data, batch_size and model give the same samples again
(the documented promise: each batch is seeded with seed + its first prompt's index), and another seed other ones.
No test pinned this before; the docs now say that another batch_size draws other samples."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def responses(tmp_path: Path, name: str, model: str, *extra: str) -> list[tuple]:
    out = tmp_path / name
    assert main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"model.path={model}",
                 "model.adapter_path=null", f"output_dir={out}", "generation.do_sample=true",
                 "generation.max_new_tokens=8", "data.max_records=5", "generation.num_samples=2", "batch_size=4",
                 *extra]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return [(r["id"], r["index"], r["response"]) for r in rows]


def test_the_same_seed_and_batch_size_give_the_same_samples(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    first = responses(tmp_path, "a", model, "generation.seed=0")
    assert len(first) == 10 and [i for _, i, _ in first] == [0, 1] * 5  # each prompt's two samples, in order
    assert responses(tmp_path, "b", model, "generation.seed=0") == first
    assert responses(tmp_path, "c", model, "generation.seed=1") != first
