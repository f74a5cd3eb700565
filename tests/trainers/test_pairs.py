"""The one pair builder: (2B,) per-row values, chosen rows first -> `PreferenceBatch`, checked against hand-built
values and a DPO loss worked out by hand; no other module builds a `PreferenceBatch`."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from alignkit.losses import PreferenceParams, preference_loss
from alignkit.trainers import pair_batch

SRC = Path(__file__).resolve().parents[2] / "src" / "alignkit"


def test_pair_batch_splits_chosen_then_rejected():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0])  # pairs (row 0 vs row 2), (row 1 vs row 3)
    lengths = torch.tensor([3, 4, 5, 6])
    ref = torch.tensor([-1.5, -2.5, -2.0, -5.0])
    b = pair_batch(logps, lengths, ref)
    assert b.policy_chosen_logps.tolist() == [-1.0, -2.0] and b.policy_rejected_logps.tolist() == [-3.0, -4.0]
    assert b.reference_chosen_logps.tolist() == [-1.5, -2.5] and b.reference_rejected_logps.tolist() == [-2.0, -5.0]
    assert b.chosen_lengths.tolist() == [3, 4] and b.rejected_lengths.tolist() == [5, 6]
    # DPO, beta 0.1: margins (-1+1.5)-(-3+2) = 1.5 and (-2+2.5)-(-4+5) = -0.5; loss = log(1 + exp(-beta m))
    losses = preference_loss(b, PreferenceParams(beta=0.1), ["sigmoid"]).losses
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.05))], rel=1e-6)

    free = pair_batch(logps, lengths)  # reference-free losses
    assert free.reference_chosen_logps is None and free.reference_rejected_logps is None


def test_pair_batch_refuses_rows_that_are_not_pairs():
    with pytest.raises(ValueError, match=r"\(2B,\)"):
        pair_batch(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="one value per row"):
        pair_batch(torch.zeros(4), torch.ones(4), torch.zeros(2))


def test_only_the_pair_builder_makes_preference_batches():
    makers = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("losses/") or rel == "trainers/pairs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "PreferenceBatch":
                makers.append(f"{rel}:{node.lineno}")
    assert not makers, f"build preference pairs with alignkit.trainers.pairs.pair_batch, not PreferenceBatch(...): {makers}"
