"""The learning test: on the toy task (`toy.py`), online DPO and GRPO raise the policy's mean reward with every
adapter kind, while the same run with learning rate 0 leaves the policy (and so its reward) exactly as it was.
PPO raises it too (full finetuning).

Settings were checked on seeds 0, 1 and 2 (gains of +0.15 to +0.95 over a start of ~0.04; see the report in
the commit). The evaluation samples 32 responses per prompt with a fixed seed, so the lr-0 run reproduces the
starting value exactly.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer

from .toy import KINDS, MAX_NEW_TOKENS, PROMPTS, digit_fraction, mean_reward, toy_policy

LR = {("grpo", "full"): 1e-2, ("grpo", "lora"): 3e-2, ("grpo", "reft"): 5e-2, ("grpo", "reft+lora"): 5e-2,
      ("dpo", "full"): 1e-2, ("dpo", "lora"): 3e-2, ("dpo", "reft"): 1e-1, ("dpo", "reft+lora"): 5e-2}
MIN_GAIN = 0.08


def make_trainer(algo: str, model, tokenizer, lr: float, seed: int = 0, steps: int = 8):
    common = dict(steps=steps, prompts_per_step=4, learning_rate=lr, seed=seed, kl_coef=0.0, epochs_per_step=2,
                  sampling=SamplingConfig(num_samples=8, max_new_tokens=MAX_NEW_TOKENS))
    annotator = {"type": "function", "fn": digit_fraction}
    if algo == "dpo":
        cfg = OnlineDPOConfig(beta=0.1, feedback="random_pairs", feedback_kwargs={"pairs_per_prompt": 4}, **common)
        return OnlineDPOTrainer(model, tokenizer, PROMPTS, annotator, cfg)
    if algo == "grpo":
        return GRPOTrainer(model, tokenizer, PROMPTS, annotator, GRPOConfig(**common))
    return PPOTrainer(model, tokenizer, PROMPTS, annotator, PPOConfig(**{**common, "steps": 10}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_online_training_raises_the_reward(tiny_dir, tokenizer, algo, kind):
    model = toy_policy(tiny_dir("llama"), kind)
    before = mean_reward(model, tokenizer)
    trainer = make_trainer(algo, model, tokenizer, LR[(algo, kind)])
    history = trainer.train()
    after = mean_reward(trainer.policy, tokenizer)
    assert before < 0.1
    assert after - before > MIN_GAIN, f"{algo}/{kind}: mean reward {before:.3f} -> {after:.3f}"
    assert len(history) == 8
    if algo == "dpo":  # the policy moved away from its reference (GRPO with kl_coef 0 builds none: no "kl")
        assert history[-1]["kl/sequence_sum"] > 0
    else:
        assert "kl/sequence_sum" not in history[-1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_learning_rate_zero_changes_nothing(tiny_dir, tokenizer, algo, kind):
    model = toy_policy(tiny_dir("llama"), kind)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = mean_reward(model, tokenizer)
    trainer = make_trainer(algo, model, tokenizer, 0.0)
    history = trainer.train()
    assert any(h.get("loss", 0.0) != 0.0 or h.get("grad_norm", 0.0) > 0 for h in history)  # it did optimise
    for n, p in trainer.policy.named_parameters():
        assert torch.equal(p, start[n]), n
    assert mean_reward(trainer.policy, tokenizer) == before


def test_ppo_raises_the_reward(tiny_dir, tokenizer):
    model = toy_policy(tiny_dir("llama"), "full")
    before = mean_reward(model, tokenizer)
    trainer = make_trainer("ppo", model, tokenizer, 1e-2)
    history = trainer.train()
    after = mean_reward(trainer.policy, tokenizer)
    assert after - before > 0.3, f"ppo: mean reward {before:.3f} -> {after:.3f}"
    assert history[-1]["reward"] > history[0]["reward"]
    assert all("value_loss" in h and "explained_variance" in h for h in history)
