"""Issue 12 findings 1 and 3 through the CLI: a diverging run exits 2 with one line and saves no model; a user's
model folder is never removed, whatever its name."""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignkit.cli import main
from alignkit.models.tiny import save_tiny

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICK = ["train.max_steps=2", "train.eval_strategy=no", "data.eval_fraction=0.0", "train.logging_steps=1"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("alignkit ")]


def test_nan_run_exits_2_with_one_line_and_no_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["-q", "dpo", "--config", str(CONFIGS / "dpo-lora-tiny.yaml"), f"output_dir={out}", "method.beta=1e38",
               *QUICK])
    err = capsys.readouterr().err
    assert rc == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "optimizer step 1" in lines[0] and "hh_rlhf_sample.jsonl:" in lines[0]
    assert "method.beta" in lines[0]  # the likely cause is named
    assert not (out / "model").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(isinstance(r.get("grad_norm"), float) and math.isnan(r["grad_norm"]) for r in rows)


def test_user_model_folder_with_tiny_prefix_is_kept(tmp_path):
    user = tmp_path / "alignkit-tiny-mine"
    save_tiny(user, "llama")
    before = sorted(p.name for p in user.iterdir())
    rc = main(["-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'run'}",
               f"model.path={user}", "train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0"])
    assert rc == 0
    assert user.is_dir() and sorted(p.name for p in user.iterdir()) == before
