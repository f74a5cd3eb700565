"""The toy task of the online learning tests: a tiny llama, a verifiable reward, a fixed-seed evaluation.

Reward: the fraction of the response's characters that are digits (about 30 of the tiny BPE's 431 tokens
contain one; a random policy scores ~0.04).

The toy policy: the tiny llama of `tests/conftest.py` with its LM head scaled by HEAD_SCALE. A random tiny
model's head has ~0.02 weights, so after the final norm (|h| ~ 8) no edit of the hidden states can move a
logit by more than ~1.3: adapters that do not touch the head (LoRA, ReFT) could not make the policy peak on
any token. Scaled by 8, that range is ~10 and every adapter kind can learn the task.

ReFT edits prompt positions only (as in training), so it steers mostly the FIRST response tokens; responses
are 3 tokens long so that this is visible in the reward.
"""

from __future__ import annotations

import json
import statistics
import string

import pytest
import torch

from alignkit.adapters import apply_adapter, reft_settings
from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig, generate_responses
from alignkit.online.trainer import OnlineTrainer
from alignkit.run_commit import COMPLETE_MARKER
from tests.adapters.table import KINDS, ROWS  # noqa: F401 (KINDS: the kinds the learning tests run)

HEAD_SCALE = 8.0
PROMPTS = ["Hello!", "The quick brown fox", "What is 2 + 2?", "Please answer"]
MAX_NEW_TOKENS = 3


def digit_fraction(prompt, response: str) -> float:
    """The verifiable reward: share of the response's characters that are digits (0 for an empty one)."""
    return sum(c in string.digits for c in response) / max(len(response), 1)


def toy_policy(folder, kind: str, seed: int = 0):
    """The tiny llama saved in `folder`, head scaled, wrapped with adapter `kind` (adapter init seeded)."""
    model = load_model(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    torch.manual_seed(seed)
    return apply_adapter(model, ROWS[kind].config(lora_r=4, lora_alpha=8.0, reft_rank=16))


def mean_reward(model, tokenizer, num_samples: int = 32, seed: int = 1234) -> float:
    """Mean reward of `num_samples` sampled responses per prompt, with a fixed sampling seed."""
    s = reft_settings(model)
    extra = {} if s is None else {"positions": s.positions, "share_weights": s.share_weights}
    samples = generate_responses(model, tokenizer, PROMPTS,
                                 SamplingConfig(num_samples=num_samples, max_new_tokens=MAX_NEW_TOKENS, seed=seed),
                                 batch_size=128, **extra)
    return statistics.mean(digit_fraction(None, x.response) for x in samples)


class Killed(BaseException):
    """A kill stand-in: not an Exception, so nothing in the trainer catches it."""


def killed_at(monkeypatch, train, step: int = 2) -> None:
    """`train()` killed when the online loop starts step index `step` (its generation), after `step` steps were
    logged and their checkpoints written; OnlineTrainer.generate is restored after."""
    real = OnlineTrainer.generate

    def dies(self, prompts, at):
        if at == step:
            raise Killed()
        return real(self, prompts, at)

    monkeypatch.setattr(OnlineTrainer, "generate", dies)
    with pytest.raises(Killed):
        train()
    monkeypatch.setattr(OnlineTrainer, "generate", real)


def predating(checkpoint, key: str):
    """`checkpoint` as an alignkit from before setting `key` existed wrote it: its training settings lack the key (a
    setting only one side records is not compared on resume). -> the checkpoint."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["training_settings"][key]
    path.write_text(json.dumps(state))
    marker = checkpoint / COMPLETE_MARKER  # the file's new size, so that the checkpoint stays complete
    listed = json.loads(marker.read_text())
    listed["files"]["trainer_state.json"] = path.stat().st_size
    marker.write_text(json.dumps(listed))
    return checkpoint
