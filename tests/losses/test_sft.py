"""SFT loss and the one reduction: hand-computed values, sample weights, accumulation invariant."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import REGISTRIES, SFT_LOSSES, reduce_loss, sft_loss
from alignkit.losses.logprobs import selective_log_softmax


def test_sft_hand_computed():
    # p = 1/2 and 1/4 on the two scored tokens of row 0, 1/8 on row 1; prompt/pad tokens masked
    tl = torch.tensor([[math.log(0.5), math.log(0.25), -9.0], [-7.0, math.log(0.125), -9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    out = sft_loss(tl, mask)
    assert torch.allclose(out.losses, torch.tensor([math.log(8.0), math.log(8.0)]))
    assert out.num_tokens.tolist() == [2.0, 1.0]
    assert torch.allclose(out.metrics["nll/token"], torch.tensor([math.log(8.0) / 2, math.log(8.0)]))
    # normalised by the 3 tokens: (log 8 + log 8) / 3
    loss = reduce_loss(out.losses, normalizer=out.num_tokens.sum())
    assert loss.item() == pytest.approx(2 * math.log(8.0) / 3)
    assert SFT_LOSSES["nll"] is sft_loss and REGISTRIES["sft"] is SFT_LOSSES


def test_reduce_loss_weights_and_defaults():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert reduce_loss(losses).item() == pytest.approx(7 / 3)
    w = torch.tensor([1.0, 0.0, 3.0])
    assert reduce_loss(losses, w).item() == pytest.approx((1 + 12) / 4)
    assert reduce_loss(losses, w, normalizer=10).item() == pytest.approx(13 / 10)
    assert reduce_loss(losses, torch.zeros(3)).item() == 0.0  # empty batch: 0, not NaN
    with pytest.raises(ValueError, match="per-example"):
        reduce_loss(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="one weight per example"):
        reduce_loss(losses, torch.ones(2))


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="valid names"):
        SFT_LOSSES["nope"]


def _step_grads(model, batches, weights, n_step):
    """Accumulate over micro-batches the way the trainer base must: normalizer = step total."""
    model.zero_grad()
    for (x, y, m), w in zip(batches, weights):
        tl = selective_log_softmax(model(x), y)  # (b, T)
        out = sft_loss(tl, m)
        reduce_loss(out.losses, w, normalizer=n_step).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_invariant():
    """batch 8 x accumulation 1 == batch 1 x accumulation 8 (and 2 x 4), to 1e-6."""
    torch.manual_seed(0)
    B, T, d, V = 8, 6, 5, 7
    model = torch.nn.Linear(d, V).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    y = torch.randint(0, V, (B, T))
    # very different completion lengths per example (1..6 tokens)
    m = (torch.arange(T)[None] >= torch.randint(0, T, (B,))[:, None]).long()
    w = torch.rand(B, dtype=torch.float64)
    n_step = m.sum()

    full = _step_grads(model, [(x, y, m)], [w], n_step)
    for mb in (1, 2, 4):
        parts = [(x[i:i + mb], y[i:i + mb], m[i:i + mb]) for i in range(0, B, mb)]
        ws = [w[i:i + mb] for i in range(0, B, mb)]
        acc = _step_grads(model, parts, ws, n_step)
        for a, f in zip(acc, full):
            assert torch.allclose(a, f, atol=1e-6, rtol=0)

    # per-micro-batch token means divided by accumulation steps do NOT match (the bug avoided)
    model.zero_grad()
    for i in range(B):
        out = sft_loss(selective_log_softmax(model(x[i:i + 1]), y[i:i + 1]), m[i:i + 1])
        (reduce_loss(out.losses, w[i:i + 1], normalizer=out.num_tokens.sum()) / B).backward()
    assert not torch.allclose(model.weight.grad, full[0], atol=1e-6)
