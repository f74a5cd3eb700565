"""The ZeRO-3 scoring path of `alignkit.trainers.logps` (the model's own LM head on the scored columns,
used when the parameters are DeepSpeed ZeRO-3 partitions) gives the log-probs, statistics and gradients of
naive full logits. Run in one process by making the path believe the model is partitioned; the real
ZeRO-3 runs are tests/distributed/test_deepspeed.py."""

from __future__ import annotations

import pytest
import torch

import alignkit.trainers.logps as logps_mod
from alignkit.trainers.logps import batch_locations, completion_token_logps

from .test_reference import _naive_logps


@pytest.mark.parametrize("kind", ["full", "reft+lora"])
def test_zero3_path_equals_naive_full_logits(kind, make_model, features, collators, monkeypatch):
    model = make_model(kind).train()
    batch = collators["preference"](features["preference"][:4])
    monkeypatch.setattr(logps_mod, "is_zero3_partitioned", lambda m: True)
    calls = []
    real = logps_mod._zero3_logps
    monkeypatch.setattr(logps_mod, "_zero3_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    stats: dict = {}
    token, mask = completion_token_logps(model, batch, stats=stats)
    assert calls, "the ZeRO-3 path did not run"
    got = token.sum(-1)
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    naive = _naive_logps(model, batch, batch_locations(model, batch))
    naive.sum().backward()
    torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # statistics: argmax hits and the vocabulary mean of the scored positions' logits, from full logits
    with torch.no_grad():
        loc = batch_locations(model, batch)
        kw = {"intervention_locations": loc} if loc is not None else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits[:, :-1]
    rows, cols = mask.nonzero(as_tuple=True)
    targets = batch["input_ids"][:, 1:][rows, cols]
    assert torch.equal(stats["correct"], logits[rows, cols].argmax(-1) == targets)
    torch.testing.assert_close(stats["mean_logit"], logits[rows, cols].mean(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(stats["row"], rows)
