"""DPO family, SimPO, ORPO, SLiC, KTO: hand-derived numbers and a plain-float reference per loss."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from alignkit.losses import (PREFERENCE_LOSSES, UNPAIRED_LOSSES, PreferenceBatch, PreferenceParams,
                             kto_kl_estimate, kto_loss, preference_loss, reduce_loss)

TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def ls(x: float) -> float:  # log sigmoid
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def naive(name, pc, pr, rc, rl, lc, lr, p: PreferenceParams, B, sum_lc):
    """One pair, plain floats, written from the papers / TRL's formulas."""
    b, eps = p.beta, p.label_smoothing
    rw, rj = pc - rc, pr - rl
    d = rw - rj
    if name == "sigmoid":
        return -(1 - eps) * ls(b * d) - eps * ls(-b * d)
    if name == "hinge":
        return max(0.0, 1 - b * d)
    if name == "ipo":
        return (rw / lc - rj / lr - 1 / (2 * b)) ** 2
    if name == "sigmoid_norm":
        return -ls(b * (rw / lc - rj / lr))
    if name == "robust":
        return (-(1 - eps) * ls(b * d) + eps * ls(-b * d)) / (1 - 2 * eps)
    if name == "exo_pair":
        e = eps or 1e-3
        return sig(b * d) * (ls(b * d) - math.log(1 - e)) + sig(-b * d) * (ls(-b * d) - math.log(e))
    if name == "nca_pair":
        return -ls(b * rw) - 0.5 * ls(-b * rw) - 0.5 * ls(-b * rj)
    if name == "bco_pair":
        return -ls(b * rw - p.bco_delta) - ls(-(b * rj - p.bco_delta))
    if name == "sppo_hard":
        return (rw - 1 / (2 * b)) ** 2 + (rj + 1 / (2 * b)) ** 2
    if name == "apo_zero":
        return 1 - sig(b * rw) + sig(b * rj)
    if name == "apo_down":
        return sig(b * rw) + 1 - sig(b * d)
    if name == "sft":
        return -pc * B / sum_lc
    if name == "simpo":
        z = b * (pc / lc - pr / lr) - p.simpo_gamma_beta_ratio * b
        return -(1 - eps) * ls(z) - eps * ls(-z)
    if name == "orpo":
        aw, al = pc / lc, pr / lr
        log_odds = (aw - al) - (math.log(1 - math.exp(aw)) - math.log(1 - math.exp(al)))
        return -pc * B / sum_lc - p.orpo_lambda * ls(log_odds)
    if name == "slic":
        return max(0.0, p.slic_delta - pc + pr) - p.slic_lambda * pc
    if name == "discopop":  # Lu et al. 2024, LRML: logistic and exponential mixed by sigma(z / tau)
        z = b * d
        m = sig(z / p.discopop_tau)
        return (1 - m) * -ls(z) + m * math.exp(-z)
    if name == "cpo":  # Xu et al. 2024: reference-free DPO on sums + alpha * chosen NLL (batch token mean)
        z = b * (pc - pr)
        return -(1 - eps) * ls(z) - eps * ls(-z) + p.cpo_alpha * (-pc * B / sum_lc)
    if name.startswith("fdpo_"):  # Wang et al. 2023: logit = f'(u_w) - f'(u_l), u = pi / pi_ref = e^rho
        fprime = {"fdpo_js": lambda r: math.log(2 * math.exp(r) / (1 + math.exp(r))),
                  "fdpo_forward_kl": lambda r: -1 / math.exp(r),
                  "fdpo_alpha": lambda r: (1 - math.exp(r) ** -p.f_alpha) / p.f_alpha}[name]
        z = b * (fprime(rw) - fprime(rj))
        return -(1 - eps) * ls(z) - eps * ls(-z)
    raise KeyError(name)


def random_batch(B=16, seed=0, ref=True):
    rng = random.Random(seed)
    lc = [float(rng.randint(1, 30)) for _ in range(B)]
    lr = [float(rng.randint(1, 30)) for _ in range(B)]
    pc = [-l * rng.uniform(0.2, 3) for l in lc]
    pr = [-l * rng.uniform(0.2, 3) for l in lr]
    rc = [x + rng.gauss(0, 2) for x in pc]
    rl = [x + rng.gauss(0, 2) for x in pr]
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    batch = PreferenceBatch(t(pc), t(pr), t(rc) if ref else None, t(rl) if ref else None, t(lc), t(lr))
    return batch, (pc, pr, rc if ref else [0.0] * B, rl if ref else [0.0] * B, lc, lr)


def test_every_registered_loss_has_a_reference_here():
    names = {"sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
             "apo_zero", "apo_down", "sft", "simpo", "orpo", "slic", "discopop", "cpo", "fdpo_js", "fdpo_forward_kl",
             "fdpo_alpha"}
    assert set(PREFERENCE_LOSSES) == names


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
@pytest.mark.parametrize("params", [PreferenceParams(), PreferenceParams(beta=0.5, label_smoothing=0.2, bco_delta=0.3,
                                                                         simpo_gamma_beta_ratio=1.5, orpo_lambda=0.3,
                                                                         slic_delta=2.0, slic_lambda=0.05,
                                                                         discopop_tau=0.3, cpo_alpha=0.4, f_alpha=0.7)])
def test_random_against_plain_floats(name, params):
    batch, (pc, pr, rc, rl, lc, lr) = random_batch()
    out = PREFERENCE_LOSSES[name](batch, params)
    B = len(pc)
    want = [naive(name, pc[i], pr[i], rc[i], rl[i], lc[i], lr[i], params, B, sum(lc)) for i in range(B)]
    assert out.losses.shape == (B,)
    assert torch.allclose(out.losses, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert TRL_METRICS <= set(out.metrics)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_dpo_metrics_are_trls_definitions():
    batch, (pc, pr, rc, rl, _, _) = random_batch(B=6, seed=3)
    out = PREFERENCE_LOSSES["sigmoid"](batch, PreferenceParams(beta=0.2))
    for i in range(6):
        ch, rj = 0.2 * (pc[i] - rc[i]), 0.2 * (pr[i] - rl[i])
        assert out.metrics["rewards/chosen"][i].item() == pytest.approx(ch)
        assert out.metrics["rewards/rejected"][i].item() == pytest.approx(rj)
        assert out.metrics["rewards/margins"][i].item() == pytest.approx(ch - rj)
        assert out.metrics["rewards/accuracies"][i].item() == float(ch > rj)
        assert out.metrics["logps/chosen"][i].item() == pc[i]


def one(pc, pr, rc=None, rl=None, lc=None, lr=None):
    t = lambda x: None if x is None else torch.tensor([float(x)], dtype=torch.float64)  # noqa: E731
    return PreferenceBatch(t(pc), t(pr), t(rc), t(rl), t(lc), t(lr))


def test_hand_values():
    p = PreferenceParams(beta=0.1)
    # equal log-ratios: DPO = log 2, hinge = 1, IPO = (1/(2 beta))^2 = 25, APO-zero = 1 - 1/2 + 1/2 = 1
    b = one(-5, -7, -5, -7, 2, 2)
    assert PREFERENCE_LOSSES["sigmoid"](b, p).losses.item() == pytest.approx(math.log(2))
    assert PREFERENCE_LOSSES["hinge"](b, p).losses.item() == pytest.approx(1.0)
    assert PREFERENCE_LOSSES["ipo"](b, p).losses.item() == pytest.approx(25.0)
    assert PREFERENCE_LOSSES["apo_zero"](b, p).losses.item() == pytest.approx(1.0)
    assert PREFERENCE_LOSSES["apo_down"](b, p).losses.item() == pytest.approx(1.0)
    assert PREFERENCE_LOSSES["sppo_hard"](b, p).losses.item() == pytest.approx(2 * 25.0)
    assert PREFERENCE_LOSSES["nca_pair"](b, p).losses.item() == pytest.approx(2 * math.log(2))
    assert PREFERENCE_LOSSES["bco_pair"](b, p).losses.item() == pytest.approx(2 * math.log(2))
    # DPO with d = 10 / beta=0.1 -> -log sigma(1) = log(1 + e^-1); cDPO eps = 0.25 (0.5, symmetric, is refused)
    b = one(0, -10, 0, 0)
    assert PREFERENCE_LOSSES["sigmoid"](b, p).losses.item() == pytest.approx(math.log(1 + math.exp(-1)))
    quarter = PreferenceParams(beta=0.1, label_smoothing=0.25)
    assert PREFERENCE_LOSSES["sigmoid"](b, quarter).losses.item() == pytest.approx(
        0.75 * math.log(1 + math.exp(-1)) + 0.25 * math.log(1 + math.e))
    # IPO length normalisation: rho_w = 4 over 2 tokens, rho_l = 0 -> (2 - 5)^2 = 9
    assert PREFERENCE_LOSSES["ipo"](one(4, 0, 0, 0, 2, 3), p).losses.item() == pytest.approx(9.0)
    # SimPO: avg logps -1 and -3, beta 2, ratio 0.5 -> -log sigma(2 * (2 - 0.5)) = log(1 + e^-3)
    b = one(-2, -9, lc=2, lr=3)
    s = PREFERENCE_LOSSES["simpo"](b, PreferenceParams(beta=2.0, simpo_gamma_beta_ratio=0.5))
    assert s.losses.item() == pytest.approx(math.log(1 + math.exp(-3)))
    assert s.metrics["rewards/chosen"].item() == pytest.approx(-2.0)  # beta * mean logp
    # ORPO with P(y_w) = P(y_l) = 1/2 per token: log OR = 0 -> NLL + lambda log 2
    b = one(2 * math.log(0.5), 3 * math.log(0.5), lc=2, lr=3)
    o = PREFERENCE_LOSSES["orpo"](b, PreferenceParams(orpo_lambda=0.1))
    assert o.losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(2))
    assert o.metrics["log_odds_chosen"].item() == pytest.approx(0.0, abs=1e-12)
    # SLiC: logp_w - logp_l = 0.25 < delta 1 -> 0.75 - lambda * logp_w
    b = one(-1.0, -1.25)
    assert PREFERENCE_LOSSES["slic"](b, PreferenceParams(slic_lambda=0.1)).losses.item() == pytest.approx(0.85)


# loss_type -> rewards/chosen of one pair (log pi(y_w) = -6 over 3 tokens, log pi_ref(y_w) = -5) with beta 0.1 and
# orpo_lambda 0.2, by hand: TRL's implicit reward beta * rho (also where beta is not read: sft, as TRL's DPOTrainer,
# and slic, at beta's default, a non-default one being refused by PreferenceObjective), SimPO / CPO beta * the
# (length-averaged / summed) policy log-prob, ORPO its lambda (the beta it applies) * the length-averaged log-prob
REWARDS_CHOSEN = [("sigmoid", 0.1 * (-6 + 5)), ("sft", 0.1 * (-6 + 5)), ("slic", 0.1 * (-6 + 5)),
                  ("simpo", 0.1 * -6 / 3), ("cpo", 0.1 * -6), ("orpo", 0.2 * -6 / 3)]


@pytest.mark.parametrize("name, want", REWARDS_CHOSEN)
def test_the_logged_rewards_are_what_docs_metrics_says(name, want):
    out = PREFERENCE_LOSSES[name](one(-6, -9, -5, -7, 3, 3), PreferenceParams(beta=0.1, orpo_lambda=0.2))
    assert out.metrics["rewards/chosen"].item() == pytest.approx(want)


def test_reference_free_uses_policy_logps():
    b = one(-1.0, -3.0)
    out = PREFERENCE_LOSSES["sigmoid"](b, PreferenceParams(beta=0.5))
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-0.5)


def test_combined_losses_and_gradients():
    batch, _ = random_batch(B=5, seed=7)
    batch.policy_chosen_logps.requires_grad_()
    p = PreferenceParams()
    out = preference_loss(batch, p, ["sigmoid", "sft"], [1.0, 0.5])
    want = PREFERENCE_LOSSES["sigmoid"](batch, p).losses + 0.5 * PREFERENCE_LOSSES["sft"](batch, p).losses
    assert torch.allclose(out.losses, want)
    assert {"loss/sigmoid", "loss/sft"} | TRL_METRICS <= set(out.metrics)
    # TRL's sft term: the mean over pairs is the batch token-mean NLL of the chosen completions
    sft_mean = PREFERENCE_LOSSES["sft"](batch, p).losses.mean()
    assert sft_mean.item() == pytest.approx(-(batch.policy_chosen_logps.sum() / batch.chosen_lengths.sum()).item())
    reduce_loss(out.losses).backward()
    assert batch.policy_chosen_logps.grad is not None and torch.isfinite(batch.policy_chosen_logps.grad).all()
    with pytest.raises(ValueError, match="one weight per loss type"):
        preference_loss(batch, p, ["sigmoid", "sft"], [1.0])
    with pytest.raises(KeyError, match="valid names"):
        preference_loss(batch, p, "dpo")


def test_missing_lengths_and_shapes_are_explained():
    with pytest.raises(ValueError, match="chosen_lengths"):
        PREFERENCE_LOSSES["ipo"](one(-1, -2, -1, -2), PreferenceParams())
    with pytest.raises(ValueError, match="reference"):
        PreferenceBatch(torch.zeros(2), torch.zeros(2), torch.zeros(2), None)
    with pytest.raises(ValueError, match="shape"):
        PreferenceBatch(torch.zeros(2), torch.zeros(3))


# -- KTO -------------------------------------------------------------------------------------------

def test_kto_hand_and_loop():
    # rho = 0 and z_ref = 0: 1 - sigma(0) = 1/2, weighted
    out = kto_loss(torch.tensor([-3.0, -4.0]), torch.tensor([-3.0, -4.0]), torch.tensor([True, False]), kl=0.0,
                   beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert out.losses.tolist() == pytest.approx([1.0, 0.25])

    rng = random.Random(5)
    B = 12
    pl = [rng.uniform(-40, -5) for _ in range(B)]
    rl = [x + rng.gauss(0, 1) for x in pl]
    des = [rng.random() < 0.5 for _ in range(B)]
    pk = torch.tensor([rng.uniform(-40, -5) for _ in range(B)], dtype=torch.float64)
    rk = pk - torch.tensor([rng.gauss(0.3, 1) for _ in range(B)], dtype=torch.float64)
    z = max(0.0, sum((pk - rk).tolist()) / B)
    kl = kto_kl_estimate(pk, rk)
    assert kl.item() == pytest.approx(z)
    out = UNPAIRED_LOSSES["kto"](torch.tensor(pl, dtype=torch.float64), torch.tensor(rl, dtype=torch.float64),
                                 torch.tensor(des), kl, beta=0.2, desirable_weight=1.0, undesirable_weight=1.33)
    for i in range(B):
        rho = pl[i] - rl[i]
        want = (1 - sig(0.2 * (rho - z))) if des[i] else 1.33 * (1 - sig(0.2 * (z - rho)))
        assert out.losses[i].item() == pytest.approx(want)
    nc = sum(des)
    assert out.metrics["count/chosen"].item() == nc and out.metrics["count/rejected"].item() == B - nc
    want_sum = sum(0.2 * (pl[i] - rl[i]) for i in range(B) if des[i])
    assert out.metrics["rewards/chosen_sum"].item() == pytest.approx(want_sum)
    assert out.metrics["kl"].item() == pytest.approx(z)
    # the KL estimate is clamped at 0
    assert kto_kl_estimate(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0


def test_apo_zero_unpaired_hand():
    out = UNPAIRED_LOSSES["apo_zero_unpaired"](torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]),
                                               torch.tensor([True, False]))
    assert out.losses.tolist() == pytest.approx([0.5, 0.5])


def test_new_objectives_hand_values_and_limits():
    """One pair by hand (beta 1, rho_w = 1, rho_l = 0 -> d = 1), and the limits the papers state: f-DPO's alpha-divergence
    tends to DPO as alpha -> 0 and is the forward KL at alpha = 1; DiscoPOP is the logistic loss for z << 0 and the
    exponential one for z >> 0 (tau small); huge log-ratios stay finite."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    one = PreferenceBatch(t(-1.0), t(-2.0), t(-2.0), t(-2.0), t(4.0), t(4.0))  # rho_w = 1, rho_l = 0
    p = PreferenceParams(beta=1.0)
    e = math.e
    assert PREFERENCE_LOSSES["fdpo_forward_kl"](one, p).losses.item() == pytest.approx(-ls(1 - 1 / e))
    assert PREFERENCE_LOSSES["fdpo_js"](one, p).losses.item() == pytest.approx(-ls(math.log(2 * e / (1 + e)) - 0.0))
    assert PREFERENCE_LOSSES["fdpo_alpha"](one, PreferenceParams(beta=1.0, f_alpha=1.0)).losses.item() == \
        pytest.approx(-ls(1 - 1 / e))
    assert PREFERENCE_LOSSES["fdpo_alpha"](one, PreferenceParams(beta=1.0, f_alpha=1e-7)).losses.item() == \
        pytest.approx(-ls(1.0), rel=1e-6)
    # CPO on this pair: -log sigma(1 * (-1 - -2)) + 1 * (-(-1) * 1 / 4)
    assert PREFERENCE_LOSSES["cpo"](one, p).losses.item() == pytest.approx(-ls(1.0) + 0.25)
    far = PreferenceBatch(t(-1.0, 1.0), t(1.0, -1.0), t(0.0, 0.0), t(0.0, 0.0), t(1.0, 1.0), t(1.0, 1.0))
    got = PREFERENCE_LOSSES["discopop"](far, PreferenceParams(beta=10.0, discopop_tau=0.05)).losses
    assert got[0].item() == pytest.approx(-ls(-20.0)) and got[1].item() == pytest.approx(math.exp(-20.0), rel=1e-6)
    huge = PreferenceBatch(t(-500.0), t(500.0), t(0.0), t(0.0), t(1.0), t(1.0))
    for name in ("discopop", "fdpo_forward_kl", "fdpo_alpha", "fdpo_js"):
        assert torch.isfinite(PREFERENCE_LOSSES[name](huge, PreferenceParams(beta=1.0)).losses).all(), name


@pytest.mark.parametrize("key", ["beta", "discopop_tau", "f_alpha"])
def test_new_objective_parameters_must_be_positive(key):
    with pytest.raises(ValueError, match=f"{key} must be > 0"):
        PreferenceParams(**{key: 0.0})


@pytest.mark.parametrize("weights", [[1.0, -0.5], [0.0, 0.0]])
def test_loss_weights_that_train_the_other_way_or_nothing_are_refused(weights):
    """preference_loss(..., ["sigmoid", "sft"], [1, -0.5]) raised the chosen answers' NLL; [0, 0] made every loss 0
    (nothing trained, and the zero-gradient guard only fires on a positive loss). Both were accepted by the trainers
    (check_loss_weights only counted them); now refused, and a weight of 0 beside a positive one still combines."""
    from alignkit.losses import check_loss_weights

    with pytest.raises(ValueError, match=r"each must be >= 0 .* and one > 0"):
        check_loss_weights(["sigmoid", "sft"], weights, "PreferenceTrainer")
    batch, _ = random_batch(B=4)
    out = preference_loss(batch, PreferenceParams(), ["sigmoid", "sft"], [1.0, 0.0])
    assert torch.equal(out.losses, PREFERENCE_LOSSES["sigmoid"](batch, PreferenceParams()).losses)


@pytest.mark.parametrize("key, value", [("label_smoothing", 0.7), ("label_smoothing", 0.5), ("label_smoothing", -0.1),
                                        ("orpo_lambda", -0.1), ("cpo_alpha", -1.0), ("slic_lambda", -0.1)])
def test_python_params_past_the_cli_bounds_are_refused(key, value):
    """The CLI refuses these (settings/bounds.py), but PreferenceParams took them: DPOTrainer(loss_type='sigmoid',
    params=PreferenceParams(label_smoothing=0.7)) trained cDPO with its labels mostly flipped, toward the rejected
    answers (at d = 0 the loss's slope in beta d is eps - 1/2 = +0.2, by hand: the loss falls as d falls), exit 0.
    Now a ValueError naming the key when the params are built; the bound itself (0.49, 0) is accepted."""
    from torch.autograd import grad

    z = torch.zeros((), requires_grad=True)  # the slope of cDPO at d = 0 for eps = 0.7: eps - 1/2 > 0 (hand: +0.2)
    batch = PreferenceBatch(z.reshape(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    (slope,) = grad(PREFERENCE_LOSSES["sigmoid"](batch, _unchecked(label_smoothing=0.7, beta=1.0)).losses.sum(), z)
    assert slope.item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match=rf"^{key} must be "):
        PreferenceParams(**{key: value})
    PreferenceParams(**{key: 0.49 if key == "label_smoothing" else 0.0})


def _unchecked(**values) -> PreferenceParams:
    """PreferenceParams without its checks (what an unchecked value did to the loss)."""
    p = object.__new__(PreferenceParams)
    p.__dict__.update({f.name: f.default for f in dataclasses.fields(PreferenceParams)}, **values)
    return p


@pytest.mark.parametrize("name", ["sft", "orpo", "cpo"])
@pytest.mark.parametrize("norm, want", [("weighted", 4.0 / 2), ("count", 4.0 / 102)])
def test_chosen_nll_follows_the_weights_and_their_normalisation(name, norm, want):
    """Weights [1, 0], chosen lengths [2, 100], chosen log-probs [-4, -300]. The trainer reduces sum_i w_i L_i / N
    (N = 2 pairs under "count", sum w = 1 under "weighted"); the NLL term must then be the chosen token mean
    sum w NLL / T with T counted the same way: "weighted" 4 / (1*2) = 2 (the weight-0 pair's 100 tokens out), "count"
    (1*4 + 0*300) / 102. Before: N / T was always B / sum |y_w| = 2 / 102, so "weighted" gave 4 / 51 (25.5x too
    small)."""
    w = torch.tensor([1.0, 0.0])
    batch = PreferenceBatch(torch.tensor([-4.0, -300.0]), torch.tensor([-5.0, -6.0]),
                            chosen_lengths=torch.tensor([2, 100]), rejected_lengths=torch.tensor([3, 3]), weights=w, weight_normalization=norm)
    out = PREFERENCE_LOSSES[name](batch, PreferenceParams())
    nll = out.losses if name == "sft" else out.metrics["nll_loss"]
    n = w.sum() if norm == "weighted" else 2.0
    assert float((w * nll).sum() / n) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="weight_normalization"):
        PreferenceBatch(torch.zeros(2), torch.zeros(2), weight_normalization="mean")
