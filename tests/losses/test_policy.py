"""Online RL pieces against hand-computed small cases and plain-Python loops."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from alignkit.losses import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, AdaptiveKLController, FixedKLController,
                             clip_rewards, clipped_policy_loss, gae, group_advantages, masked_whiten,
                             per_token_rewards, reduce_loss, rloo_advantages, value_loss)


def test_group_advantages_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # two groups of 3
    adv = group_advantages(r, 3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3)
    m, s = 1 / 3, math.sqrt(1 / 3)
    assert adv[:3].tolist() == pytest.approx([(1 - m) / s, -m / s, -m / s])
    # group 2: mean 5/3, std sqrt(1/3)
    assert adv[3:].tolist() == pytest.approx([(1 - 5 / 3) / s, (1 / 3) / s, (1 / 3) / s])
    assert group_advantages(r, 3, scale_by_std=False).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3,
                                                                                 -2 / 3, 1 / 3, 1 / 3])
    # a group with identical rewards gives 0 (std 0 + eps)
    assert group_advantages(torch.ones(4), 4).abs().max().item() == 0.0


def test_advantages_leave_unscored_rewards_out_by_hand():
    """A failed annotation (NaN reward) used to be filled with its group's mean before the advantages: GRPO's std
    then shrank (valid [0, 1, 2] + fill 1: std sqrt(2/3), advantages +-1.22 instead of +-1) and RLOO's
    leave-one-out baseline held the mean, i.e. each sample's own reward (for 0: (1 + 1 + 2) / 3 = 4/3 instead of
    (1 + 2) / 2 = 1.5). Now the statistics are over the scored rewards; the unscored one gets 0."""
    nan = float("nan")
    r = torch.tensor([0.0, nan, 1.0, 2.0, 5.0, nan, nan, nan])  # the second group has one scored reward
    # group 1: scored [0, 1, 2], mean 1, unbiased std 1 (+ eps 1e-4); group 2: no spread and no other reward -> 0
    a = 1 / (1 + 1e-4)
    assert group_advantages(r, 4).tolist() == pytest.approx([-a, 0.0, 0.0, a, 0.0, 0.0, 0.0, 0.0])
    assert group_advantages(r, 4, scale_by_std=False).tolist() == pytest.approx([-1.0, 0, 0, 1.0, 0, 0, 0, 0])
    # RLOO: 0 - (1 + 2)/2, 1 - (0 + 2)/2, 2 - (0 + 1)/2
    assert rloo_advantages(r, 4).tolist() == pytest.approx([-1.5, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0])


def test_rloo_vs_loop():
    rng = random.Random(0)
    K = 4
    r = [rng.gauss(0, 1) for _ in range(3 * K)]
    adv = rloo_advantages(torch.tensor(r, dtype=torch.float64), K)
    for i in range(len(r)):
        g = i // K
        others = [r[j] for j in range(g * K, g * K + K) if j != i]
        assert adv[i].item() == pytest.approx(r[i] - sum(others) / (K - 1))
    grpo = group_advantages(torch.tensor(r, dtype=torch.float64), K, eps=0.0)
    for g in range(3):
        vals = r[g * K:(g + 1) * K]
        for k in range(K):
            want = (vals[k] - statistics.mean(vals)) / statistics.stdev(vals)
            assert grpo[g * K + k].item() == pytest.approx(want)
    with pytest.raises(ValueError, match="multiple of group_size"):
        rloo_advantages(torch.zeros(5), 2)
    assert ADVANTAGES["grpo"] is group_advantages and ADVANTAGES["rloo"] is rloo_advantages


def test_gae_hand():
    # one sequence of 3 tokens, gamma = 0.5, lam = 0.5, reward only at the end
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.25, 0.5, 9.0]])  # last position is padding (value ignored)
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5)
    d2 = 1.0 - 0.5  # terminal: no bootstrap
    d1 = 0.0 + 0.5 * 0.5 - 0.25
    d0 = 0.0 + 0.5 * 0.25 - 0.5
    a2 = d2
    a1 = d1 + 0.25 * a2
    a0 = d0 + 0.25 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.25, a2 + 0.5, 0.0])


def test_gae_vs_loop_random():
    rng = random.Random(1)
    B, T = 3, 7
    lens = [7, 4, 1]
    r = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    v = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    m = torch.tensor([[int(t < L) for t in range(T)] for L in lens])
    adv, _ = gae(torch.tensor(r), torch.tensor(v), m, gamma=0.9, lam=0.8)
    for b, L in enumerate(lens):
        for t in range(L):  # A_t = sum_l (gamma lam)^l delta_{t+l}
            want = 0.0
            for k in range(t, L):
                nv = v[b][k + 1] if k + 1 < L else 0.0
                want += (0.9 * 0.8) ** (k - t) * (r[b][k] + 0.9 * nv - v[b][k])
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
        assert adv[b, L:].abs().sum().item() == 0.0


def test_kl_estimators_direction():
    # pi_theta = 0.5, pi_ref = 0.25 -> r = pi_ref / pi_theta = 0.5
    lp, lr = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = 0.5
    assert KL_ESTIMATORS["k1"](lp, lr).item() == pytest.approx(-math.log(r))  # = log 2 > 0
    assert KL_ESTIMATORS["k2"](lp, lr).item() == pytest.approx(0.5 * math.log(r) ** 2)
    assert KL_ESTIMATORS["k3"](lp, lr).item() == pytest.approx((r - 1) - math.log(r))
    # all three estimate KL(pi_theta || pi_ref) under samples from pi_theta: check k1 and k3 exactly
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for name in ("k1", "k3"):
        est = (p * KL_ESTIMATORS[name](p.log(), q.log())).sum().item()  # exact expectation under pi_theta
        assert est == pytest.approx(true_kl)


def naive_ppo(lp, old, a, eps, eps_high, dual):
    ratio = math.exp(lp - old)
    obj = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps_high) * a)
    if dual is not None and a < 0:
        obj = max(obj, dual * a)
    return -obj


@pytest.mark.parametrize("eps_high,dual", [(None, None), (0.28, None), (None, 3.0)])
def test_clipped_pg_vs_loop(eps_high, dual):
    rng = random.Random(2)
    B, T = 4, 5
    lens = [5, 3, 1, 4]
    lp = [[rng.gauss(-2, 1) for _ in range(T)] for _ in range(B)]
    old = [[x + rng.gauss(0, 0.6) for x in row] for row in lp]
    adv = [rng.gauss(0, 1) for _ in range(B)]
    m = torch.tensor([[int(t < L) for t in range(T)] for L in lens])
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = clipped_policy_loss(t(lp), t(old), t(adv), m, clip_eps=0.2, clip_eps_high=eps_high, dual_clip=dual)
    eh = 0.2 if eps_high is None else eps_high
    clipped = n = 0
    for b, L in enumerate(lens):
        toks = [naive_ppo(lp[b][k], old[b][k], adv[b], 0.2, eh, dual) for k in range(L)]
        assert out.losses[b].item() == pytest.approx(sum(toks) / L)
        for k in range(L):
            ratio = math.exp(lp[b][k] - old[b][k])
            clipped += (ratio < 0.8 and adv[b] < 0) or (ratio > 1 + eh and adv[b] > 0)
            n += 1
    assert out.metrics["clip_ratio/region_mean"].item() == pytest.approx(clipped / n)
    assert {"clip_ratio/region_mean", "approx_kl", "ratio/mean"} <= set(out.metrics)
    ts = clipped_policy_loss(t(lp), t(old), t(adv), m, clip_eps=0.2, clip_eps_high=eps_high, dual_clip=dual,
                             aggregation="token_sum")
    assert torch.allclose(ts.losses, out.losses * m.sum(-1))
    assert ts.num_tokens.tolist() == lens
    assert POLICY_LOSSES["clipped_pg"] is clipped_policy_loss


def test_clipped_pg_hand_and_gradient():
    # on-policy (ratio 1), A = 2: loss = -2 per token, d loss / d logp = -A = -2
    lp = torch.zeros(1, 2, requires_grad=True)
    out = clipped_policy_loss(lp, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2))
    assert out.losses.item() == pytest.approx(-2.0)
    out.losses.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.0, -1.0])  # mean over 2 tokens
    # ratio 2 > 1 + eps with A > 0: clipped at 1.2 -> loss -1.2 * A, no gradient
    lp = torch.full((1, 1), math.log(2.0), requires_grad=True)
    out = clipped_policy_loss(lp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    assert out.losses.item() == pytest.approx(-1.2)
    out.losses.sum().backward()
    assert lp.grad.item() == 0.0
    # dual clip: ratio 10, A = -1: PPO obj = -10, dual clip bounds it at 3 * A = -3
    lp = torch.full((1, 1), math.log(10.0))
    out = clipped_policy_loss(lp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0)
    assert out.losses.item() == pytest.approx(3.0)
    # KL penalty (k3) and entropy bonus are added per token
    f64 = dict(dtype=torch.float64)
    lp = torch.tensor([[math.log(0.5)]], **f64)
    out = clipped_policy_loss(lp, lp, torch.tensor([0.0], **f64), torch.ones(1, 1),
                              ref_logps=torch.tensor([[math.log(0.25)]], **f64), kl_coef=0.1,
                              entropy=torch.tensor([[2.0]], **f64), entropy_coef=0.01)
    assert out.losses.item() == pytest.approx(0.1 * ((0.5 - 1) - math.log(0.5)) - 0.02)
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.1)


def test_value_loss_hand():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    R = torch.tensor([[2.0, 1.0]])
    m = torch.ones(1, 2)
    # token 0: unclipped (1-2)^2 = 1, clipped v = 0.2 -> (0.2-2)^2 = 3.24 -> 0.5 * 3.24; token 1: 0.5 * 1
    out = value_loss(v, old, R, m, clip_range=0.2)
    assert out.losses.item() == pytest.approx((0.5 * 3.24 + 0.5 * 1.0) / 2)
    assert out.metrics["vf_clip_fraction"].item() == pytest.approx(0.5)
    assert value_loss(v, old, R, m, clip_range=None).losses.item() == pytest.approx((0.5 + 0.5) / 2)


def test_whiten_clip_and_token_rewards():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    w = masked_whiten(x, m)
    assert w[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # mean 2, unbiased var 1
    assert masked_whiten(x, m, shift_mean=False)[:3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)
    assert clip_rewards(torch.tensor([-5.0, 0.5, 5.0]), 1.0).tolist() == [-1.0, 0.5, 1.0]
    lp = torch.tensor([[-1.0, -1.0, -1.0]])
    rl = torch.tensor([[-1.5, -1.0, -3.0]])
    rew, kl = per_token_rewards(torch.tensor([2.0]), lp, rl, torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert rew[0].tolist() == pytest.approx([-0.05, 2.0, 0.0])  # score on the last valid token


def test_kl_controllers():
    assert FixedKLController(0.05).update(10.0, 100) == 0.05
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL = 9 -> error clipped to 0.2; beta *= 1 + 0.2 * 256 / 10000
    assert c.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_policy_loss_reduces_with_weights():
    lp = torch.zeros(3, 2)
    out = clipped_policy_loss(lp, lp, torch.tensor([1.0, -1.0, 3.0]), torch.ones(3, 2))
    assert reduce_loss(out.losses, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(0.0)
