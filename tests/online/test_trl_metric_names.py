"""Each metric an online run logs under one of TRL's names means what TRL means by it (docs/metrics.md), checked
against values computed here by hand on a tiny GRPO run: log-probs and entropies from plain full-logit forwards of
each sampled sequence alone (policy, and the policy with its adapter off as reference), rewards from the reward
functions themselves. Also: `num_tokens` continues from an online checkpoint's value after a resume."""

from __future__ import annotations

import json
import math
import statistics
import textwrap

import pytest
import torch

from alignkit.adapters import reference_off
from alignkit.online import FunctionAnnotator
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer

from .toy import PROMPTS, toy_policy

REWARDS = textwrap.dedent('''
    def digits(completions, **kwargs):          # TRL's signature
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    def short(completions, **kwargs):
        return [1.0 if len(c) < 6 else 0.0 for c in completions]
''')


def _policy(folder):
    model = toy_policy(folder, "lora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B != 0: the policy differs from its reference (adapter off) from step 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@torch.no_grad()
def _by_hand(model, samples):
    """Per sample: token log-probs under the policy and the reference, and the policy's token entropies."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        target = torch.tensor(s.response_ids)[:, None]
        start = len(s.prompt_ids) - 1  # the logits at position t predict token t + 1
        lp = model(input_ids=ids).logits[0, start:-1].log_softmax(-1)  # (R, V)
        with reference_off(model):
            ref = model(input_ids=ids).logits[0, start:-1].log_softmax(-1)
        out.append((lp.gather(-1, target)[:, 0], ref.gather(-1, target)[:, 0], -(lp.exp() * lp).sum(-1)))
    return out


def _trainer(folder, tokenizer, out, module):
    cfg = GRPOConfig(steps=2, prompts_per_step=2, sampling=SamplingConfig(num_samples=4, max_new_tokens=3),
                     learning_rate=1e-2, kl_coef=0.1, kl_estimator="k3", save_steps=1, progress_bar=False,
                     report_to="none")
    ann = FunctionAnnotator([f"{module}:digits", f"{module}:short"], weights=[1.0, 0.5])
    return GRPOTrainer(_policy(folder), tokenizer, PROMPTS, ann, cfg, output_dir=out)


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "ak_metric_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ak_metric_rewards"


def test_online_metrics_mean_what_trl_means(tiny_dir, tokenizer, tmp_path, module):
    import ak_metric_rewards as fns

    trainer = _trainer(tiny_dir("llama"), tokenizer, tmp_path / "a", module)
    seen = []
    score = trainer.score

    def spy(samples):
        seen.append((samples, _by_hand(trainer.policy, samples)))  # the policy that sampled them
        return score(samples)

    trainer.score = spy
    history = trainer.train()
    tokens = 0
    eos = tokenizer.eos_token_id
    for row, (samples, hand) in zip(history, seen):
        texts = [s.response for s in samples]
        d, sh = fns.digits(texts), fns.short(texts)
        reward = [a + 0.5 * b for a, b in zip(d, sh)]
        groups = {}
        for s, r in zip(samples, reward):
            groups.setdefault(s.group, []).append(r)
        k3 = [math.exp(b - a) - (b - a) - 1 for lp, ref, _ in hand for a, b in zip(lp.tolist(), ref.tolist())]
        per_seq = [sum(math.exp(b - a) - (b - a) - 1 for a, b in zip(lp.tolist(), ref.tolist())) for lp, ref, _ in hand]
        ent = [e for _, _, h in hand for e in h.tolist()]
        lengths = [len(s.response_ids) for s in samples]
        tokens += sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        want = {
            "reward": statistics.mean(reward),  # TRL GRPO/RLOO: mean of the weighted sum of the reward functions
            "reward_std": statistics.stdev(reward),  # TRL: nanstd, Bessel-corrected
            "frac_reward_zero_std": statistics.mean(float(len(set(g)) == 1) for g in groups.values()),
            "rewards/digits/mean": statistics.mean(d), "rewards/digits/std": statistics.stdev(d),
            "rewards/short/mean": statistics.mean(sh), "rewards/short/std": statistics.stdev(sh),
            "kl": statistics.mean(k3),  # TRL GRPO: mean over completion tokens of k3
            "kl/sequence_sum": statistics.mean(per_seq),  # alignkit's own: mean over samples of the summed KL
            "entropy": statistics.mean(ent),  # TRL: mean over completion tokens
            "completions/mean_length": statistics.mean(lengths), "completions/min_length": min(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": statistics.mean(float(eos not in s.response_ids) for s in samples),
            "num_tokens": tokens,  # TRL: cumulative prompt + completion tokens
        }
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert history[0]["kl"] > 1e-3 and history[1]["num_tokens"] > history[0]["num_tokens"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_tokens"] for r in rows] == [h["num_tokens"] for h in history]

    # resumed from checkpoint-1: the count continues from the checkpoint's value (not from 0)
    resumed = _trainer(tiny_dir("llama"), tokenizer, tmp_path / "b", module)
    again = resumed.train(resume_from_checkpoint=tmp_path / "a" / "checkpoints" / "checkpoint-1")
    assert [h["step"] for h in again] == [1.0]
    assert again[0]["num_tokens"] == history[1]["num_tokens"] and again[0]["reward"] == history[1]["reward"]


def hello_only(prompt, response: str) -> float | None:
    """Scores the first prompt's responses alike (1.0); the second prompt's none (None: unscored)."""
    return 1.0 if prompt == PROMPTS[0] else None


def test_a_group_with_fewer_than_two_scores_counts_as_zero_std(tiny_dir, tokenizer, tmp_path):
    """frac_reward_zero_std left out a group with < 2 scored samples (a reading of TRL, where a None sums to 0 in
    `nansum` and the std is NaN only with one generation): a step whose groups were 4 equal scores and 4 unscored
    samples, half the rewards None and nothing to learn from either group, logged 0.5 while the stall check counted
    it flat. Now 1.0: group 1 flat (std 0), group 2 no score (no spread, advantages 0)."""
    cfg = GRPOConfig(steps=1, prompts_per_step=2, sampling=SamplingConfig(num_samples=4, max_new_tokens=2),
                     learning_rate=1e-2, progress_bar=False, report_to="none")
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS[:2],
                          FunctionAnnotator(hello_only, on_failure="skip"), cfg, output_dir=tmp_path)
    row = trainer.train()[0]
    assert row["reward/failed"] == 4.0 and row["reward"] == 1.0  # the hand-built rollout: 4 scored 1.0, 4 None
    assert row["frac_reward_zero_std"] == 1.0
