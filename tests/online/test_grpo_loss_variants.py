"""TRL 1.16's GRPO loss variants (grpo_trainer.py `_compute_loss`), each against values written out by hand on a
hand-made batch: GSPO's sequence-level ratio (importance_sampling_level), Dr. GRPO's constant normaliser
(loss_type dr_grpo), the two-sided clip `delta` (= alignkit's dual_clip) and top_entropy_quantile. Before, each was
refused as "alignkit has no equivalent"."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from alignkit.losses import clipped_policy_loss, high_entropy_mask
from alignkit.online.generation import SamplingConfig


def _flat(rows):
    return [v for row in rows for v in row]


def _leaf(rows):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def test_gspo_sequence_ratio_loss_and_gradient_by_hand():
    """One ratio per sequence s_i = exp(mean of its loss tokens' log pi - log pi_old), clipped to [0.8, 1.2];
    loss_i (sequence_mean) = -min(s_i A_i, clip(s_i) A_i); d loss_i / d log pi_t = -A_i s_i / |y_i| when unclipped,
    0 when clipped (TRL: the gradient flows through the mean)."""
    logps = _leaf([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0], [-1.0, -2.0, -9.0]])
    old = torch.tensor([[-1.2, -0.4, -2.1], [-0.8, -1.0, 0.0], [-0.9, -1.1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    adv = torch.tensor([-0.5, 1.0, -1.0], dtype=torch.float64)
    out = clipped_policy_loss(logps, old, adv, mask, clip_eps=0.2, importance_sampling="sequence")
    s0 = math.exp((0.2 - 0.1 + 0.1) / 3)  # 1.069: inside [0.8, 1.2]
    s1 = math.exp((0.5 + 0.3) / 2)  # 1.492 > 1.2 with A > 0: clipped, 1.2 x A
    s2 = math.exp((-0.1 - 0.9) / 2)  # 0.607 < 0.8 with A < 0: clipped, 0.8 x A
    assert 0.8 < s0 < 1.2 and s1 > 1.2 and s2 < 0.8
    assert out.losses.tolist() == pytest.approx([0.5 * s0, -1.2, 0.8], rel=1e-12)
    out.losses.sum().backward()
    g = 0.5 * s0 / 3
    assert _flat(logps.grad.tolist()) == pytest.approx([g, g, g, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-12)
    # per token instead, sequence 2's first token (ratio exp(-0.1) = 0.905) is inside the clip: it has a gradient
    tok = _leaf(logps.detach().tolist())
    clipped_policy_loss(tok, old, adv, mask, clip_eps=0.2).losses.sum().backward()
    assert tok.grad[2, 0].item() == pytest.approx(1.0 * math.exp(-0.1) / 2, rel=1e-12)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_sum", "max_length_mean"])
def test_gspo_on_policy_ratio_is_one_and_its_gradient_is_the_token_mean(aggregation):
    """One update per step (pi_old = detached pi): s_i = 1, so loss_t = -A_i, but d s_i / d log pi_t = 1 / |y_i|:
    the gradient is -A_i / |y_i| per token (sequence_mean) or -A_i (sums), the per-token ratio's exactly."""
    logps = _leaf([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    out = clipped_policy_loss(logps, logps.detach(), adv, mask, importance_sampling="sequence",
                              aggregation=aggregation)
    per_seq = aggregation == "sequence_mean"
    assert out.losses.tolist() == pytest.approx([-2.0, 1.0] if per_seq else [-6.0, 2.0], rel=1e-12)
    out.losses.sum().backward()
    g0, g1 = (-2.0 / 3, 1.0 / 2) if per_seq else (-2.0, 1.0)
    assert _flat(logps.grad.tolist()) == pytest.approx([g0, g0, g0, g1, g1, 0.0], abs=1e-12)
    tok = _leaf(logps.detach().tolist())
    clipped_policy_loss(tok, tok.detach(), adv, mask, aggregation=aggregation).losses.sum().backward()
    assert _flat(tok.grad.tolist()) == pytest.approx(_flat(logps.grad.tolist()), abs=1e-12)


def test_trls_delta_is_the_dual_clip_loss_and_gradient():
    """TRL 1.16: coef_2 = clamp(r, 1 - eps, 1 + eps_high); coef_1 = clamp(r, max=delta); loss = -min(coef_1 A,
    coef_2 A). Written out here on ratios on both sides of the clip, both advantage signs: alignkit's dual_clip=delta
    gives the same loss and gradient (delta > 1 + eps_high). By hand: r = 4, A = -1, delta 3 -> loss 3, no gradient."""
    log_r = [math.log(v) for v in (0.5, 0.9, 1.1, 1.5, 2.5, 4.0)]
    for a in (1.0, -1.0):
        trl_lp, ours_lp = _leaf([log_r]), _leaf([log_r])
        zeros = torch.zeros(1, 6, dtype=torch.float64)
        r = torch.exp(trl_lp - zeros)
        coef_2 = r.clamp(1 - 0.2, 1 + 0.28)
        trl = -torch.minimum(r.clamp(max=3.0) * a, coef_2 * a)
        trl.sum().backward()
        out = clipped_policy_loss(ours_lp, zeros, torch.tensor([a], dtype=torch.float64), torch.ones(1, 6, dtype=bool),
                                  clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, aggregation="token_sum")
        out.losses.sum().backward()
        assert out.losses.item() == pytest.approx(trl.sum().item(), rel=1e-12)
        assert _flat(ours_lp.grad.tolist()) == pytest.approx(_flat(trl_lp.grad.tolist()), abs=1e-12)
    assert trl[0, 5].item() == pytest.approx(3.0) and trl_lp.grad[0, 5].item() == 0.0
    assert trl[0, 3].item() == pytest.approx(1.5) and trl_lp.grad[0, 3].item() == pytest.approx(1.5)


def test_high_entropy_mask_keeps_the_top_quantile_of_loss_tokens():
    """rho = 0.5 over the 5 loss tokens' entropies 0.1, 0.9, 0.5, 0.3, 0.7: the 0.5 quantile is the median 0.5,
    kept: 0.9, 0.5, 0.7 (>=); the padded position (entropy 5.0) is neither counted nor kept. rho 0: only the top."""
    ent = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert high_entropy_mask(ent, mask, 0.5).tolist() == [[False, True, True], [False, True, False]]
    assert high_entropy_mask(ent, mask, 0.0).tolist() == [[False, True, False], [False, False, False]]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == mask.tolist()
    # 0.8 quantile of (0.1, 0.3, 0.5, 0.7, 0.9) by linear interpolation: index 0.2 x 4 = 0.8 -> 0.1 + 0.8 x 0.2 = 0.26
    assert high_entropy_mask(ent, mask, 0.8).tolist() == [[False, True, True], [True, True, False]]


def _stub(world_entropies=None, entropies=None, sent=None, dtype=torch.float64, **kw):
    """A GRPOTrainer without a model over 2 samples of one prompt, advantages +1 / -1 (scale_by_std off, rewards 1
    and -1), 3 and 2 loss tokens, entropies 0.1, 0.9, 0.5 / 0.3, 0.7, one update (pi_old = this forward)."""
    from alignkit.online import GRPOConfig, GRPOTrainer
    from alignkit.online.rollout import TokenStats

    cfg = GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), prompts_per_step=1, kl_coef=0.0,
                     scale_by_std=False, **kw)
    t = object.__new__(GRPOTrainer)
    t.config, t.world, t.kl_ctl, t._step = cfg, 1, SimpleNamespace(value=0.0), 0
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.5, 0.0]], dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ent = torch.tensor(entropies or [[0.1, 0.9, 0.5], [0.3, 0.7, 0.0]], dtype=dtype)
    asked = []
    t.token_stats = lambda batch, entropy=False: asked.append(entropy) or TokenStats(
        logps[batch["row"]], mask[batch["row"]], ent[batch["row"]] if entropy else None)
    t.pass_sums = lambda *a: 0.0
    if world_entropies is not None:  # another process's loss-token entropies, padded to this one's 5 with -1e9
        t.world = 2
        t.accelerator = SimpleNamespace(  # `sent`: what this process adds to the gather
            pad_across_processes=lambda v, dim, pad_index: (sent if sent is not None else []).append(v) or v,
            gather=lambda v: torch.cat([v, torch.tensor(world_entropies + [-1e9] * (5 - len(world_entropies)))]))
    rollout = SimpleNamespace(samples=[], batch={"row": torch.arange(2), "attention_mask": torch.ones(2, 4, dtype=torch.long)}, scores=torch.tensor([1.0, -1.0]),
                              rewards=torch.tensor([1.0, -1.0]), weights=torch.ones(2), mask=mask, old_logps=None,
                              ref_logps=None, metrics={})
    return t, t.build_batch(rollout), logps, asked


def test_top_entropy_quantile_keeps_policy_terms_on_high_entropy_tokens_by_hand():
    """rho 0.5 keeps tokens (0, 1), (0, 2), (1, 1) (entropy >= the median 0.5); sequence_mean still divides by all
    loss tokens (TRL's mask): loss = (mean(-1, -1 over 3) + mean(+1 over 2)) / 2 = (-2/3 + 1/2) / 2 = -1/12;
    gradient -1/3 / 2 on (0, 1), (0, 2), +1/2 / 2 on (1, 1), 0 elsewhere. Entropies are asked for only then."""
    t, pb, logps, asked = _stub(top_entropy_quantile=0.5)
    loss, _ = t.policy_loss(pb, torch.arange(2))
    assert loss.item() == pytest.approx(-1 / 12, rel=1e-12)
    loss.backward()
    assert _flat(logps.grad.tolist()) == pytest.approx([0.0, -1 / 6, -1 / 6, 0.0, 0.25, 0.0], abs=1e-12)
    assert asked == [True]
    # two processes: the other's loss tokens (0.95, 0.96, 0.97, 0.98, 0.99) join the quantile: the 0.5 quantile of
    # the ten is (0.9 + 0.95) / 2 = 0.925, above all of this process's but none: nothing here has a policy term
    t, pb, logps, _ = _stub([0.95, 0.96, 0.97, 0.98, 0.99], top_entropy_quantile=0.5)
    loss, _ = t.policy_loss(pb, torch.arange(2))
    assert loss.item() == 0.0


def test_a_zero_weight_filler_pass_adds_no_entropies_to_the_quantile():
    """Two processes, uneven shares: the one whose share is exhausted runs a zero-weight filler forward over its item 0
    (entropies 0.95, 0.96, 0.97) so that the collectives match. Those tokens carry no weight, so they must not move
    the other process's threshold: it sends nothing, and the other's rho 0.5 quantile stays the median 0.5 of its own
    five (loss -1/12, as with one process). Before, it sent its three: the median of eight, (0.7 + 0.9) / 2 = 0.8,
    left only (0, 1) with a policy term: loss (-1/3 + 0) / 2 = -1/6."""
    sent = []
    t, pb, _, _ = _stub([], entropies=[[0.95, 0.96, 0.97], [0.98, 0.99, 0.0]], sent=sent, top_entropy_quantile=0.5)
    t.filler_pass = True
    t.policy_loss(pb, torch.arange(1))
    assert len(sent) == 1 and sent[0].numel() == 0
    t, pb, _, _ = _stub(sent[0].tolist(), top_entropy_quantile=0.5)
    assert t.policy_loss(pb, torch.arange(2))[0].item() == pytest.approx(-1 / 12, rel=1e-12)
    t, pb, _, _ = _stub([0.95, 0.96, 0.97], top_entropy_quantile=0.5)  # what the filler sent before
    assert t.policy_loss(pb, torch.arange(2))[0].item() == pytest.approx(-1 / 6, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{"aggregation": "token_sum", "entropy_coef": 0.1}, {"aggregation": "token_sum"},
                                {"entropy_coef": 0.1}])
def test_a_filler_pass_with_a_zero_normaliser_contributes_a_finite_zero(kw, dtype):
    """The filler pass of a process whose share ran out, its minibatch's global normaliser 0 (token_sum with
    mask_truncated_completions: every other item of the minibatch cut): `run_minibatches` multiplies its loss by 0,
    which is 0 only if the loss is finite. Before, the entropy share local / 0 = inf made the loss -inf (x 0: NaN, the
    run stopped on a non-finite loss), and float32's |A x tokens| / tiny overflowed: the filler adds exactly 0."""
    t, pb, logps, _ = _stub(entropies=[[1.0, 2.0, 3.0], [2.0, 2.0, 0.0]], dtype=dtype, **kw)
    t.filler_pass = True
    loss, _ = t.policy_loss(pb, torch.arange(1), torch.tensor(0.0, dtype=torch.float64))
    assert math.isfinite(loss.item())
    (loss * 0.0).backward()
    assert (loss * 0.0).item() == 0.0 and _flat(logps.grad.tolist()) == [0.0] * 6


@pytest.mark.parametrize("kw, warned", [
    ({"importance_sampling": "sequence", "aggregation": "token_sum"}, True),
    ({"importance_sampling": "sequence", "aggregation": "max_length_mean"}, True),
    ({"importance_sampling": "sequence", "aggregation": "token_sum", "cispo_max": 5.0}, True),
    ({"importance_sampling": "sequence"}, False),
    ({"aggregation": "token_sum"}, False),
    ({"importance_sampling": "sequence", "aggregation": "sequence_sum"}, False),  # LUSPO as meant
    ({"aggregation": "sequence_sum"}, "luspo"),
])
def test_gspo_with_a_token_sum_normaliser_is_warned(kw, warned, caplog):
    """TRL 1.16 warns when importance_sampling_level=sequence meets a loss type that sums token terms (dapo, bnpo,
    dr_grpo, cispo): GSPO's objective is a mean of sequence terms, and a token sum weights each by its length."""
    import logging

    from alignkit.online import GRPOConfig
    from alignkit.online.grpo import warn_sequence_ratio_sums

    cfg = GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), epochs_per_step=2, **kw)
    with caplog.at_level(logging.WARNING, logger="alignkit.online.grpo"):
        warn_sequence_ratio_sums(cfg)
    said = [r.getMessage() for r in caplog.records]
    if warned == "luspo":
        assert said == ["method.aggregation='sequence_sum' (LUSPO) scales GSPO's sequence terms by their lengths, and "
                        "method.importance_sampling is 'token', so each sequence's token terms are summed without a "
                        "normaliser; set method.importance_sampling=sequence for the LUSPO paper's objective (TRL "
                        "1.16 warns the same for its loss_type luspo)"]
        return
    assert said == ([f"method.importance_sampling='sequence' (GSPO: one ratio per sequence) with method.aggregation="
                     f"{kw.get('aggregation')!r} sums per-token terms, so each sequence's term is weighted by its "
                     "length instead of GSPO's mean over sequences; set method.aggregation=sequence_mean for the GSPO "
                     "paper's objective (TRL 1.16 warns the same for its loss_type dapo / bnpo / dr_grpo / cispo)"]
                    if warned else [])


@pytest.mark.parametrize("kw, policy, bonus", [
    ({}, 0.0, 2.4 / 5),  # TRL: (0.1 + 0.2 + 0.3 + 0.8 + 1.0) / 5, not the mean of sequence means (0.2 + 0.9) / 2
    ({"aggregation": "max_length_mean"}, (-3 + 2) / 8, 2.4 / 5),  # dr_grpo: the same bonus, not 2.4 / 8
    ({"aggregation": "token_sum"}, (-3 + 2) / 5, 2.4 / 5),
    # rho 0.5: the median 0.3 keeps (0, 2), (1, 0), (1, 1); bonus over those: (0.3 + 0.8 + 1.0) / 3 (TRL's
    # effective_mask), policy (-1/3 + 2/2) / 2 (sequence_mean still divides by every loss token)
    ({"top_entropy_quantile": 0.5}, (-1 / 3 + 1) / 2, 2.1 / 3),
])
def test_entropy_bonus_is_trls_token_mean_whatever_the_aggregation(kw, policy, bonus):
    """TRL 1.16's GRPO: loss = policy loss (its loss type's normaliser) - entropy_coef x sum(H x effective_mask) /
    sum(effective_mask), 'the same meaning for every loss type'. Entropies 0.1, 0.2, 0.3 / 0.8, 1.0; advantages
    +1 / -1 on policy (ratio 1). Before, the bonus went through method.aggregation: 0.55 (sequence_mean), 2.4 / 8
    (max_length_mean), 0.5 (sequence_mean over the kept tokens)."""
    t, pb, _, _ = _stub(entropies=[[0.1, 0.2, 0.3], [0.8, 1.0, 0.0]], entropy_coef=0.1, **kw)
    loss, _ = t.policy_loss(pb, torch.arange(2))
    assert loss.item() == pytest.approx(policy - 0.1 * bonus, rel=1e-12)


@pytest.mark.parametrize("kw, first, second", [
    ({}, -1 / 2 - 0.1 * 0.2 / 2, 1 / 2 - 0.1 * 0.9 / 2),
    # token_sum, unequal micro-batches (3 tokens at entropy 1, 2 at entropy 3; normaliser 5 tokens): TRL's bonus
    # (1 + 3) / 2 = 2.0 over the update, policy -3/5 and +2/5. Before: each forward's share of the tokens, 3/5 x 1 +
    # 2/5 x 3 = 1.8 (the reviewer's example: 4 tokens at 1 and 1 at 3 gave 1.4 for TRL's 2.0)
    ({"aggregation": "token_sum"}, -3 / 5 - 0.1 * 1.0 / 2, 2 / 5 - 0.1 * 3.0 / 2),
])
def test_entropy_bonus_over_two_micro_batches_is_trls_per_micro_batch_mean(kw, first, second):
    """Two micro-batches of one sequence each (the minibatch's 2 items): each forward's bonus is its own token mean
    times its share of the minibatch's items (sample weights), 1/2, whatever the aggregation, as TRL 1.16's mean per
    micro-batch / 2 accumulation steps (`_compute_loss`' entropy_loss / accumulation_factor)."""
    ent = [[0.1, 0.2, 0.3], [0.8, 1.0, 0.0]] if not kw else [[1.0, 1.0, 1.0], [3.0, 3.0, 0.0]]
    t, pb, _, _ = _stub(entropies=ent, entropy_coef=0.1, **kw)
    norm = t.normalizer(pb, torch.arange(2)).double()  # the minibatch's: 2 sequences, or 5 tokens
    got = [t.policy_loss(pb, torch.tensor([i]), norm, torch.tensor(2.0, dtype=torch.float64))[0].item()
           for i in (0, 1)]
    assert got == [pytest.approx(first, rel=1e-12), pytest.approx(second, rel=1e-12)]


def test_luspo_is_gspo_times_each_sequence_length_averaged_over_sequences_by_hand():
    """TRL 1.16's luspo: per_token_loss = -min(s_i A_i, clip(s_i) A_i) (B, 1) with the sequence ratio; loss =
    (per_token_loss x mask).sum(-1).mean(). On the GSPO test's batch (lengths 3, 2, 2): losses |y_i| x GSPO's, i.e.
    3 x 0.5 s0, 2 x -1.2, 2 x 0.8; gradient 3 x 0.5 s0 / 3 on sequence 0's tokens. Through the trainer (2 samples,
    ratio 1, A = +1 / -1, lengths 3 / 2): (-3 + 2) / 2 sequences = -1/2, each token's gradient -A / 2."""
    logps = _leaf([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0], [-1.0, -2.0, -9.0]])
    old = torch.tensor([[-1.2, -0.4, -2.1], [-0.8, -1.0, 0.0], [-0.9, -1.1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    adv = torch.tensor([-0.5, 1.0, -1.0], dtype=torch.float64)
    out = clipped_policy_loss(logps, old, adv, mask, clip_eps=0.2, importance_sampling="sequence",
                              aggregation="sequence_sum")
    s0 = math.exp((0.2 - 0.1 + 0.1) / 3)
    assert out.losses.tolist() == pytest.approx([1.5 * s0, -2.4, 1.6], rel=1e-12)
    out.losses.sum().backward()
    assert _flat(logps.grad.tolist()) == pytest.approx([0.5 * s0] * 3 + [0.0] * 6, abs=1e-12)
    t, pb, logps, _ = _stub(aggregation="sequence_sum", importance_sampling="sequence", epochs_per_step=2)
    pb.rollout.old_logps = logps.detach().clone()
    loss, _ = t.policy_loss(pb, torch.arange(2))
    assert loss.item() == pytest.approx(-0.5, rel=1e-12)
    loss.backward()
    assert _flat(logps.grad.tolist()) == pytest.approx([-0.5] * 3 + [0.5, 0.5, 0.0], abs=1e-12)


def test_dr_grpo_divides_token_sums_by_samples_times_max_new_tokens_by_hand():
    """TRL's dr_grpo: sum of the token losses / (sequences x max_completion_length): (-1 x 3 + 1 x 2) / (2 x 4) =
    -1/8; each token's gradient -A / 8. Nothing else asks for entropies (an off-policy forward: none at all)."""
    t, pb, logps, asked = _stub(aggregation="max_length_mean")
    pb.rollout.old_logps = logps.detach().clone()  # a separate old-log-prob pass: this forward is not pi_old
    loss, _ = t.policy_loss(pb, torch.arange(2))
    assert loss.item() == pytest.approx(-1 / 8, rel=1e-12)
    loss.backward()
    assert _flat(logps.grad.tolist()) == pytest.approx([-1 / 8] * 3 + [1 / 8, 1 / 8, 0.0], abs=1e-12)
    assert asked == [False]


@pytest.mark.parametrize("kw, said", [
    ({"importance_sampling": "seq"}, "importance_sampling must be 'token' (a ratio per token) or 'sequence'"),
    ({"aggregation": "dr_grpo"}, "aggregation must be 'sequence_mean' (TRL's grpo), 'token_sum' (dapo / bnpo), "
                                 "'max_length_mean' (dr_grpo) or 'sequence_sum' (luspo), got 'dr_grpo'"),
    ({"top_entropy_quantile": 1.5}, "GRPOConfig.top_entropy_quantile: 1.5 is out of range; it must be in [0, 1]"),
    ({"importance_sampling": "sequence"}, "importance_sampling: 'sequence' takes one ratio pi / pi_old per sequence "
                                          "(GSPO), which at ratio 1 gives the same gradient as a ratio per token, and "
                                          "with one update per generation step"),
])
def test_library_config_refuses_in_one_line(kw, said):
    from alignkit.online import GRPOConfig

    with pytest.raises(ValueError, match=re.escape(said)) as e:
        GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), **kw)
    assert "\n" not in str(e.value)
    several = GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), epochs_per_step=2,
                         importance_sampling="sequence")
    assert several.importance_sampling == "sequence"
    # with the entropy mask the sequence ratio's gradient differs from the token one's even at ratio 1: accepted
    assert GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), importance_sampling="sequence",
                      top_entropy_quantile=0.2).importance_sampling == "sequence"


@pytest.mark.parametrize("key, said", [
    ("method.top_entropy_quantile=-0.1", "method.top_entropy_quantile: -0.1 is out of range; it must be in [0, 1]"),
    ("method.importance_sampling=seq", "method.importance_sampling"),
    ("method.aggregation=dr_grpo", "method.aggregation"),
    ("method.importance_sampling=sequence", "method.importance_sampling: 'sequence' takes one ratio"),
    ("method.cispo_max=5.0", "method.cispo_max: 5.0 caps CISPO's weight pi / pi_old"),
])
def test_run_config_refuses_in_one_line(key, said):
    from alignkit.settings import ConfigError, load_config

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl",
            "annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}"]
    with pytest.raises(ConfigError, match=re.escape(said)) as e:
        load_config(None, [*base, key], command="grpo")
    assert "\n" not in str(e.value)
    cfg = load_config(None, [*base, "method.importance_sampling=sequence", "method.epochs_per_step=2",
                             "method.aggregation=max_length_mean", "method.top_entropy_quantile=0.2"], command="rloo")
    trainer = cfg.trainer_config()
    assert (trainer.importance_sampling, trainer.aggregation, trainer.top_entropy_quantile) == \
        ("sequence", "max_length_mean", 0.2)
    luspo = load_config(None, [*base, "method.importance_sampling=sequence", "method.epochs_per_step=2",
                               "method.aggregation=sequence_sum"], command="grpo").trainer_config()
    assert (luspo.importance_sampling, luspo.aggregation) == ("sequence", "sequence_sum")


def test_cispo_loss_and_gradient_by_hand():
    """TRL 1.16's cispo: per_token_loss = -clamp(ratio, max=epsilon_high).detach() x A x log pi. Ratios 2 and 0.5
    (log pi -1 and -2 over pi_old), A = 3, cap 1.5: weights 1.5 and 0.5, loss = -(1.5 x 3 x -1 + 0.5 x 3 x -2) = 7.5
    (token_sum), gradient -w A: -4.5 and -1.5 (the weight carries none)."""
    logps = _leaf([[-1.0, -2.0]])
    old = torch.tensor([[-1.0 - math.log(2.0), -2.0 + math.log(2.0)]], dtype=torch.float64)
    out = clipped_policy_loss(logps, old, torch.tensor([3.0], dtype=torch.float64), torch.ones(1, 2, dtype=bool),
                              cispo_max=1.5, aggregation="token_sum")
    assert out.losses.item() == pytest.approx(7.5, rel=1e-12)
    out.losses.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([-4.5, -1.5], rel=1e-12)
    assert out.metrics["clip_ratio/region_mean"].item() == 0.5  # the ratio 2 is above the cap
    # TRL's cispo_clip_ratio counts (ratio > epsilon_high) & (A > 0): with A = -3 the capped weight 2 -> 1.5 only
    # shrinks a push down, nothing is clipped: 0 (before: 0.5, every token above the cap whatever its advantage)
    out = clipped_policy_loss(logps, old, torch.tensor([-3.0], dtype=torch.float64), torch.ones(1, 2, dtype=bool),
                              cispo_max=1.5, aggregation="token_sum")
    assert out.metrics["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("kw, said", [
    ({"cispo_max": 5.0, "clip_eps_high": 0.28}, "clip_eps_high=0.28 shapes the clipped loss, and cispo_max=5.0 "
                                                "replaces it with CISPO's"),
    ({"cispo_max": 5.0, "epochs_per_step": 1}, "cispo_max: 5.0 caps CISPO's weight pi / pi_old, which at ratio 1"),
    ({"cispo_max": 0.0, "epochs_per_step": 2}, "RLOOConfig.cispo_max: 0.0 is out of range"),
])
def test_cispo_settings_that_cannot_act_are_refused(kw, said):
    from alignkit.online import RLOOConfig

    with pytest.raises(ValueError, match=re.escape(said)):
        RLOOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), **kw)
    assert RLOOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), cispo_max=0.5).cispo_max == 0.5


@pytest.mark.parametrize("kw", [
    {"importance_sampling": "sequence", "epochs_per_step": 2, "clip_eps_high": 0.28, "dual_clip": 3.0},
    {"aggregation": "max_length_mean", "top_entropy_quantile": 0.2},
    {"cispo_max": 5.0, "aggregation": "token_sum", "mini_batch_size": 4, "importance_sampling": "sequence"},
    {"importance_sampling": "sequence", "aggregation": "sequence_sum", "epochs_per_step": 2, "entropy_coef": 0.01},
])
def test_each_variant_trains_a_tiny_policy_end_to_end(tiny_dir, tokenizer, kw):
    """The real forward (entropies from the model, old log-probs from the rollout pass when several updates): two
    steps run, the loss is finite and the LoRA weights move."""
    from alignkit.online import GRPOConfig, GRPOTrainer

    from .toy import PROMPTS, digit_fraction, toy_policy

    model = toy_policy(tiny_dir("llama"), "lora")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    cfg = GRPOConfig(steps=2, prompts_per_step=2, sampling=SamplingConfig(num_samples=4, max_new_tokens=3),
                     learning_rate=1e-2, **kw)
    rows = []
    trainer = GRPOTrainer(model, tokenizer, PROMPTS, {"type": "function", "fn": digit_fraction}, cfg)
    trainer.log = lambda row: rows.append(row)
    trainer.train()
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
