"""`alignkit generate` with `generation.seed`: the same data, seed and model give the same samples again, whatever
`batch_size` (each sample draws from its own generator, seeded from (seed, prompt index, sample index); each batch
was seeded on its own before, so another batch_size drew other samples), and another seed other ones."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def responses(tmp_path: Path, name: str, model: str, *extra: str, batch_size: int = 4) -> list[tuple]:
    out = tmp_path / name
    assert main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"model.path={model}",
                 "model.adapter_path=null", f"output_dir={out}", "generation.do_sample=true",
                 "generation.max_new_tokens=8", "data.max_records=5", "generation.num_samples=2", f"batch_size={batch_size}",
                 *extra]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return [(r["id"], r["index"], r["response"]) for r in rows]


def test_the_same_seed_and_batch_size_give_the_same_samples(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    first = responses(tmp_path, "a", model, "generation.seed=0")
    assert len(first) == 10 and [i for _, i, _ in first] == [0, 1] * 5  # each prompt's two samples, in order
    assert responses(tmp_path, "b", model, "generation.seed=0") == first
    assert responses(tmp_path, "c", model, "generation.seed=1") != first


def test_samples_do_not_depend_on_batch_size(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    one = responses(tmp_path, "a", model, "generation.seed=3", batch_size=1)
    assert len(set(r for _, _, r in one)) > 5  # sampled, not one answer
    assert responses(tmp_path, "b", model, "generation.seed=3", batch_size=3) == one
    assert responses(tmp_path, "c", model, "generation.seed=3", batch_size=10) == one
