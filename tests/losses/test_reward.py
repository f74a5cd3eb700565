"""Reward losses against hand-computed values and plain-Python loops."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from alignkit.losses import REWARD_LOSSES, bradley_terry_loss, kendall_tau, ranking_loss


def nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


def test_bradley_terry_hand():
    rc = torch.tensor([1.0, 0.0, 2.0])
    rr = torch.tensor([1.0, 1.0, 0.0])
    out = bradley_terry_loss(rc, rr)
    assert out.losses[0].item() == pytest.approx(math.log(2))  # equal rewards -> log 2
    assert out.losses[1].item() == pytest.approx(math.log(1 + math.e))  # diff -1
    assert out.losses[2].item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert out.metrics["accuracy"].tolist() == [0.0, 0.0, 1.0]  # a tie is not correct
    assert out.metrics["margin"].tolist() == [0.0, -1.0, 2.0]
    assert out.metrics["rewards/chosen"].tolist() == [1.0, 0.0, 2.0]
    assert out.metrics["rewards/rejected"].tolist() == [1.0, 1.0, 0.0]
    # margin m=1 on a diff of 1 -> log 2; centering adds c (rc+rr)^2 = 0.1 * 9
    out = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]),
                             center_rewards_coefficient=0.1)
    assert out.losses.item() == pytest.approx(math.log(2) + 0.9)
    assert REWARD_LOSSES["bradley_terry"] is bradley_terry_loss


def test_bradley_terry_random_vs_loop():
    rng = random.Random(0)
    rc = [rng.gauss(0, 2) for _ in range(20)]
    rr = [rng.gauss(0, 2) for _ in range(20)]
    mg = [rng.random() for _ in range(20)]
    out = bradley_terry_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64),
                             margin=torch.tensor(mg, dtype=torch.float64), center_rewards_coefficient=0.01)
    want = [nls(c - r - m) + 0.01 * (c + r) ** 2 for c, r, m in zip(rc, rr, mg)]
    assert torch.allclose(out.losses, torch.tensor(want, dtype=torch.float64))


def test_ranking_hand_three_replies():
    # K=3, rewards 2 > 1 > 0: pairs (2,1),(2,0),(1,0) -> diffs 1, 2, 1
    out = ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]))
    want = (2 * math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 3
    assert out.losses.item() == pytest.approx(want)
    assert out.metrics["accuracy"].item() == 1.0 and out.metrics["kendall_tau"].item() == 1.0
    assert out.metrics["num_pairs"].item() == 3
    # K=2 reduces to Bradley-Terry
    two = ranking_loss(torch.tensor([[0.3, 1.2]]))
    assert two.losses.item() == pytest.approx(bradley_terry_loss(torch.tensor([0.3]), torch.tensor([1.2])).losses.item())


def test_ranking_skips_tied_replies():
    """ranks [0, 0, 1]: replies 0 and 1 are equally good, so only (0, 2) and (1, 2) are comparisons. Before, the loss
    took every i < j as 'i better' and trained reply 0 above its tie (accuracy and tau counted that pair too)."""
    r = [0.5, 2.0, 1.0]
    out = ranking_loss(torch.tensor([r], dtype=torch.float64), ranks=torch.tensor([[0, 0, 1]]))
    want = (math.log(1 + math.exp(-(0.5 - 1.0))) + math.log(1 + math.exp(-(2.0 - 1.0)))) / 2  # 0.64367
    assert out.losses.item() == pytest.approx(want, rel=1e-12)
    assert out.metrics["num_pairs"].item() == 2 and out.metrics["accuracy"].item() == 0.5
    assert out.metrics["kendall_tau"].item() == 0.0  # (1 concordant - 1 discordant) / 2
    # every reply tied: no comparison, loss 0; no ranks: the strict order (three pairs)
    assert ranking_loss(torch.tensor([r]), ranks=torch.tensor([[1, 1, 1]])).losses.item() == 0.0
    assert ranking_loss(torch.tensor([r])).metrics["num_pairs"].item() == 3


def test_ranking_variable_k_vs_loop():
    rng = random.Random(1)
    ks = [4, 2, 3, 1]
    K = max(ks)
    rows = [[rng.gauss(0, 1) for _ in range(k)] + [99.0] * (K - k) for k in ks]  # padding is garbage
    mask = torch.tensor([[j < k for j in range(K)] for k in ks])
    out = ranking_loss(torch.tensor(rows, dtype=torch.float64), mask, l2_coefficient=0.001)
    for p, k in enumerate(ks):
        pairs = list(itertools.combinations(range(k), 2))
        if not pairs:
            assert out.losses[p].item() == 0.0
            continue
        want = sum(nls(rows[p][i] - rows[p][j]) + 0.001 * 0.5 * (rows[p][i] ** 2 + rows[p][j] ** 2)
                   for i, j in pairs) / len(pairs)
        assert out.losses[p].item() == pytest.approx(want, rel=1e-12)
        acc = sum(rows[p][i] > rows[p][j] for i, j in pairs) / len(pairs)
        assert out.metrics["accuracy"][p].item() == pytest.approx(acc)
    with pytest.raises(ValueError, match="prefix"):
        ranking_loss(torch.zeros(1, 3), torch.tensor([[True, False, True]]))


def test_kendall_tau_vs_loop():
    assert kendall_tau(torch.tensor([3.0, 2.0, 1.0])).item() == 1.0
    assert kendall_tau(torch.tensor([1.0, 2.0, 3.0])).item() == -1.0
    # one swap out of 3 pairs: (2 - 1) / 3
    assert kendall_tau(torch.tensor([3.0, 1.0, 2.0])).item() == pytest.approx(1 / 3)
    rng = random.Random(2)
    for _ in range(5):
        s = [rng.randint(0, 4) for _ in range(6)]  # ties in scores
        r = [rng.randint(0, 3) for _ in range(6)]  # ties in true ranks
        conc = disc = n = 0
        for i, j in itertools.combinations(range(6), 2):
            if r[i] == r[j]:
                continue
            n += 1
            sign = (1 if r[i] < r[j] else -1) * (1 if s[i] > s[j] else -1 if s[i] < s[j] else 0)
            conc += sign > 0
            disc += sign < 0
        got = kendall_tau(torch.tensor(s, dtype=torch.float64), ranks=torch.tensor(r)).item()
        assert got == pytest.approx((conc - disc) / max(n, 1))
