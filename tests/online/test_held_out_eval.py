"""Held-out evaluation in online runs (`alignkit.online.evaluation`): which steps evaluate, the `eval/*` values
against hand computations, the same samples at every evaluation of the same policy, training unchanged by it,
what is refused, and the CLI (`data.eval_fraction`, `train.eval_steps`) writing `eval/reward` rows."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.evaluation import EVAL_STREAM
from alignkit.online.generation import SamplingConfig, generate_responses
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.online.trainer import METRICS_FILE

from .toy import PROMPTS, digit_fraction, toy_policy

HELD_OUT = ["ab", "abcd", "abcdef"]
SAMPLING = SamplingConfig(num_samples=4, max_new_tokens=3)
DIGITS = {"type": "function", "fn": digit_fraction}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def prompt_length(prompt, response: str) -> float:
    """A reward that depends on the prompt only: the held-out values are known by hand."""
    return float(len(prompt))


def _cfg(**kw):
    return GRPOConfig(**{"steps": 3, "prompts_per_step": 2, "sampling": SAMPLING, "learning_rate": 1e-2, **kw})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_rows_and_values_by_hand(tiny_dir, tokenizer, tmp_path):
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                          {"type": "function", "fn": prompt_length}, _cfg(eval_steps=2), output_dir=tmp_path,
                          eval_prompts=HELD_OUT)
    trainer.train()
    rows = _rows(tmp_path / METRICS_FILE)
    # every 2 steps (after step index 1) and after the last step (index 2); not after step 0
    assert [("eval/reward" in r) for r in rows] == [False, True, True]
    for r in rows[1:]:
        # 4 samples of each held-out prompt, rewards 2, 4, 6: mean 4, Bessel std sqrt(4 * (4 + 0 + 4) / 11)
        assert r["eval/reward"] == pytest.approx(4.0)
        assert r["eval/reward_std"] == pytest.approx(math.sqrt(32 / 11))
        assert r["eval/prompts"] == 3 and r["eval/failed"] == 0
        assert 0 <= r["eval/mean_length"] <= 3 and 0 <= r["eval/clipped_ratio"] <= 1
        # the training prompts (lengths 6..19) are not what was evaluated: their rewards are the training ones
        assert r["reward"] >= 6


def test_eval_samples_are_fixed_and_scored_like_an_independent_generation(tiny_dir, tokenizer):
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, _cfg(seed=3),
                          eval_prompts=PROMPTS[:2])
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first == again  # one fixed seed: the same policy gives the same responses
    samples = generate_responses(trainer.policy, tokenizer, PROMPTS[:2],
                                 SamplingConfig(num_samples=4, max_new_tokens=3, seed=3 * 100_003 + EVAL_STREAM))
    rewards = [digit_fraction(None, s.response) for s in samples]
    assert first["eval/reward"] == pytest.approx(statistics.mean(rewards))
    assert first["eval/reward_std"] == pytest.approx(statistics.stdev(rewards))
    assert first["eval/mean_length"] == pytest.approx(statistics.mean(len(s.response_ids) for s in samples))


def test_training_is_the_same_with_and_without_evaluation(tiny_dir, tokenizer):
    runs = []
    for held_out in (None, HELD_OUT):
        trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, _cfg(eval_steps=1),
                              eval_prompts=held_out) if held_out else \
            GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, _cfg())
        history = trainer.train()
        runs.append((history, [p.detach().clone() for p in trainer.policy.parameters() if p.requires_grad]))
    (plain, w_plain), (evaluated, w_eval) = runs
    assert all("eval/reward" in r for r in evaluated) and not any("eval/reward" in r for r in plain)
    for a, b in zip(plain, evaluated):
        for key in ("reward", "loss", "kl", "completions/mean_length"):
            assert a[key] == b[key], key
    assert all(torch.equal(x, y) for x, y in zip(w_plain, w_eval))


def test_what_cannot_be_evaluated_is_refused(tiny_dir, tokenizer):
    policy = toy_policy(tiny_dir("llama"), "lora")
    with pytest.raises(ValueError, match=r"eval_steps \(2, train\.eval_steps\) evaluates on held-out prompts, and "
                                         r"none were given"):
        GRPOTrainer(policy, tokenizer, PROMPTS, DIGITS, _cfg(eval_steps=2))
    with pytest.raises(ValueError, match="eval_steps must be >= 1"):
        _cfg(eval_steps=0)
    judge = {"type": "function", "fn": digit_fraction}
    cfg = OnlineDPOConfig(steps=1, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=3),
                          feedback="judge_pairs")
    with pytest.raises(ValueError, match="judge_pairs' gives no pointwise score"):
        OnlineDPOTrainer(policy, tokenizer, PROMPTS, judge, cfg, eval_prompts=HELD_OUT)


def test_cli_eval_fraction_writes_eval_rows(tmp_path, capsys):
    out = tmp_path / "grpo"
    args = ["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={out}", "train.max_steps=2",
            "method.prompts_per_step=2", "sampling.num_samples=2", "sampling.max_new_tokens=3",
            "data.eval_fraction=0.25", "train.eval_steps=1"]
    assert main(args) == 0
    rows = _rows(out / "metrics.jsonl")
    bundled = CONFIGS.parent / "src/alignkit/resources/data/hh_rlhf_sample.jsonl"
    n = sum(1 for line in bundled.read_text().splitlines() if line.strip())
    assert [r["step"] for r in rows] == [0.0, 1.0]
    for r in rows:
        assert 0.0 <= r["eval/reward"] <= 1.0 and r["eval/failed"] == 0
        assert math.floor(0.25 * n) <= r["eval/prompts"] <= math.ceil(0.25 * n)  # a quarter of the bundled records
    card = (out / "model" / "README.md").read_text()
    assert "held-out prompts" in card
    assert "eval/reward" in capsys.readouterr().out
