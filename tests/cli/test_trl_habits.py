"""A TRL user's habits on the command line: per-objective defaults (shown in --help), short runs that still
write metrics, TRL-style --flags, and a local dataset folder as data.path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.settings import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("command, lr", [("sft", 2e-5), ("dpo", 1e-6), ("kto", 1e-6), ("rm", 1e-4)])
def test_train_defaults_per_objective(command, lr):
    # TRL 1.9's SFTConfig / DPOConfig / KTOConfig / RewardConfig learning rates, logging_steps 10
    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    cfg = load_config(None, base, command=command)
    assert cfg.train == {"learning_rate": lr, "logging_steps": 10}
    cfg = load_config(None, base + ["train.learning_rate=0.5"], command=command)
    assert cfg.train["learning_rate"] == 0.5 and cfg.train["logging_steps"] == 10


@pytest.mark.parametrize("command, lr", [("online-dpo", 5e-7), ("grpo", 1e-6), ("rloo", 1e-6), ("ppo", 3e-6)])
def test_online_defaults(command, lr):
    from alignkit.settings import CONFIG_CLASSES

    method = CONFIG_CLASSES[command].__dataclass_fields__["method"].default_factory()
    assert method.learning_rate == lr  # TRL 1.9's OnlineDPOConfig / GRPOConfig / RLOOConfig / PPOConfig


def test_dpo_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "train.learning_rate=1e-06" in out and "train.logging_steps=10" in out and "method.beta=0.1" in out
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "train.learning_rate=2e-05" in out and "data.loss_on=all_assistant" in out


SHORT = """command: sft
model: {path: "tiny:llama"}
data: {path: "bundled:data/hh_rlhf_sample.jsonl", max_length: 64, max_prompt_length: 32}
train: {max_steps: 3, per_device_train_batch_size: 2, save_strategy: "no"}
"""


def test_short_run_writes_metrics(tmp_path):
    # 3 steps with the default logging_steps=10: the last step is logged anyway, and a plot is written
    out = tmp_path / "run"
    (tmp_path / "short.yaml").write_text(SHORT)
    assert main(["-q", "sft", "--config", str(tmp_path / "short.yaml"), f"output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 3 and "loss" in r for r in rows), rows
    assert list((out / "plots").glob("*.png"))
