"""New maths of the online loop against numbers derived by hand: reward whitening (running and per group),
clipping, and the PPO batch's token rewards, GAE advantages and returns on a 3-token response."""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch

from alignkit.online.generation import SamplingConfig
from alignkit.online.normalize import RunningMoments, group_normalize, normalize_rewards
from alignkit.online.ppo import ppo_advantages


def test_running_moments_match_the_naive_formula_over_all_values():
    chunks = [[1.0, 2.0, 3.0], [5.0], [float("nan"), -4.0, 0.5, 7.0]]
    m = RunningMoments()
    seen: list[float] = []
    for c in chunks:
        m.update(torch.tensor(c))
        seen += [x for x in c if not math.isnan(x)]
        assert m.count == len(seen)
        assert m.mean == pytest.approx(statistics.mean(seen))
        assert m.var == pytest.approx(statistics.variance(seen))


def test_running_normalisation_by_hand():
    m = RunningMoments()
    # first batch: mean 2, unbiased variance 1
    assert normalize_rewards(torch.tensor([1.0, 2.0, 3.0]), "running", moments=m).tolist() == pytest.approx([-1, 0, 1])
    # then [5]: all four values have mean 2.75 and variance (1.75^2 + 0.75^2 + 0.25^2 + 2.25^2) / 3 = 8.75 / 3
    out = normalize_rewards(torch.tensor([5.0]), "running", moments=m)
    assert float(out) == pytest.approx(2.25 / math.sqrt(8.75 / 3))
    # clipping comes after the whitening
    m2 = RunningMoments()
    clipped = normalize_rewards(torch.tensor([0.0, 0.0, 0.0, 10.0]), "running", moments=m2, clip=1.0)
    # mean 2.5, variance (3 * 2.5^2 + 7.5^2) / 3 = 25 -> z = [-0.5, -0.5, -0.5, 1.5] -> clipped at 1
    assert clipped.tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.0])


def test_group_normalisation_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    out = group_normalize(r, 3)
    assert out[:3].tolist() == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)])  # std 1 (unbiased)
    assert out[3:].tolist() == [0.0, 0.0, 0.0]  # a tied group carries no signal
    with_nan = group_normalize(torch.tensor([1.0, float("nan"), 3.0]), 3)  # mean 2, std sqrt(2), NaN ignored
    assert with_nan[0].item() == pytest.approx(-1 / (math.sqrt(2) + 1e-4))
    assert math.isnan(with_nan[1].item())
    assert normalize_rewards(r, "none", clip=2.5).tolist() == [1.0, 2.0, 2.5, 2.5, 2.5, 2.5]
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_normalize(torch.ones(5), 3)
    with pytest.raises(ValueError, match="unknown"):
        normalize_rewards(r, "batch")


def test_grpo_advantage_undoes_reward_normalisation_so_the_configs_refuse_it():
    """GRPO's advantage (r - group mean) / (group std + 1e-4) standardises each group again, so a "group" or "running"
    reward_normalization (a shift and a positive scale) cancelled in it: accepted, and the advantages were those of
    the raw rewards. Online DPO's best_worst pairs follow the rewards' order, which a normalisation keeps. Both
    configs now refuse it where nothing reads the scale; a clip, Dr. GRPO, RLOO or a margin reader still build."""
    from alignkit.losses import group_advantages, rloo_advantages
    from alignkit.online import GRPOConfig, OnlineDPOConfig, RLOOConfig
    from alignkit.online.feedback import best_worst_pairs
    from alignkit.online.generation import Sample

    raw = torch.tensor([1.0, 3.0, 2.0, 6.0])  # one prompt's 4 samples: mean 3, unbiased variance 14 / 3
    by_hand = [d / (math.sqrt(14 / 3) + 1e-4) for d in (-2.0, 0.0, -1.0, 3.0)]
    assert group_advantages(raw, 4).tolist() == pytest.approx(by_hand, rel=1e-5)
    for mode in ("group", "running"):
        normed = normalize_rewards(raw, mode, group_size=4, moments=RunningMoments())
        assert group_advantages(normed, 4).tolist() == pytest.approx(by_hand, rel=1e-3)  # the same advantages
    # RLOO keeps the scale: (r_i - mean of the 3 others) = 4/3 (r_i - 3) of the raw rewards, divided by their std
    assert rloo_advantages(group_normalize(raw, 4), 4).tolist() == pytest.approx(
        [4 / 3 * d / (math.sqrt(14 / 3) + 1e-4) for d in (-2.0, 0.0, -1.0, 3.0)], rel=1e-5)
    samples = [Sample("p", str(i), [1], [2], "eos", group=0, index=i) for i in range(4)]
    pair = best_worst_pairs(samples, raw.tolist())[0].meta
    assert (pair["chosen_index"], pair["rejected_index"]) == (3, 0)
    assert best_worst_pairs(samples, group_normalize(raw, 4).tolist())[0].meta["chosen_index"] == 3  # the same pair

    sampling = SamplingConfig(num_samples=4, max_new_tokens=4)
    for mode in ("group", "running"):
        with pytest.raises(ValueError, match=re.escape(
                f"reward_normalization={mode!r} is undone by GRPO's advantage, which standardises each prompt's "
                "rewards again ((r - group mean) / group std, scale_by_std=True)")):
            GRPOConfig(sampling=sampling, reward_normalization=mode)
        with pytest.raises(ValueError, match=re.escape(
                f"online DPO config: reward_normalization={mode!r} shifts and scales the rewards (by a positive "
                "factor, per group or per step), which keeps their order, and feedback='best_worst' pairs samples by "
                "that order; nothing here reads their scale")):
            OnlineDPOConfig(sampling=sampling, reward_normalization=mode)
    with pytest.raises(ValueError, match=r"reward_clip=1\.0 acts on each response's reward, and feedback='judge_pairs'"):
        OnlineDPOConfig(sampling=sampling, feedback="judge_pairs", reward_clip=1.0)
    for kw in ({"reward_clip": 2.0}, {"scale_by_std": False}):
        assert GRPOConfig(sampling=sampling, reward_normalization="group", **kw).reward_normalization == "group"
    assert RLOOConfig(sampling=sampling, reward_normalization="running").reward_normalization == "running"
    for kw in ({"reward_clip": 2.0}, {"feedback_kwargs": {"min_margin": 0.5}}, {"reweighters": ["margin_sigmoid"]}):
        assert OnlineDPOConfig(sampling=sampling, reward_normalization="group", **kw).reward_normalization == "group"


def test_k1_in_the_loss_has_no_expected_kl_gradient_so_grpo_refuses_it():
    """One position, a policy over 5 tokens: the expected gradient of a KL term in the loss is
    sum_a pi(a) grad KL_est(a) (what sampled tokens average to). For k1 = log pi - log ref it is
    sum_a pi(a) grad log pi(a) = grad sum_a pi(a) = 0: GRPOConfig(kl_estimator='k1', kl_coef=0.1) trained with no pull
    toward the reference at all. k2's is the exact gradient of KL(pi || ref) (sum_a grad pi(a) (log pi - log ref));
    k3's, sum_a (pi(a) - ref(a)) grad log pi(a), is not 0. Now k1 with kl_coef > 0 is refused; k1 stays the logged KL's
    estimator with kl_coef 0."""
    from alignkit.losses import clipped_policy_loss
    from alignkit.online import GRPOConfig, RLOOConfig

    theta = torch.tensor([0.3, -1.2, 0.8, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([1.0, 0.5, -0.5, 0.2, 0.0], dtype=torch.float64), -1)
    tokens = torch.arange(5)

    def expected_grad(estimator: str) -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)
        rows = logp[tokens][:, None]  # (5, 1): every token as one sampled row of length 1
        out = clipped_policy_loss(rows, rows.detach(), torch.zeros(5, dtype=torch.float64), torch.ones(5, 1),
                                  ref_logps=ref[tokens][:, None], kl_coef=1.0, kl_estimator=estimator)
        weights = logp.detach().exp()  # each row weighted by its probability: the exact expectation
        (g,) = torch.autograd.grad((out.losses * weights).sum(), theta)
        return g

    assert expected_grad("k1").abs().max().item() < 1e-12
    logp = torch.log_softmax(theta, -1)
    (true_kl_grad,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)  # grad KL(pi || ref)
    assert expected_grad("k2").tolist() == pytest.approx(true_kl_grad.tolist(), abs=1e-12)
    k3 = expected_grad("k3")
    assert k3.abs().max().item() > 1e-2 and float(k3 @ true_kl_grad) > 0  # it moves toward the reference

    sampling = SamplingConfig(num_samples=4, max_new_tokens=4)
    for config, kw in ((GRPOConfig, {"kl_coef": 0.1}), (RLOOConfig, {"kl_coef": 0.1, "kl_target": 2.0})):
        with pytest.raises(ValueError, match=re.escape(
                "kl_estimator='k1' as a loss term does not pull the policy toward the reference: its gradient is "
                "kl_coef x grad log pi(sampled token), whose mean over the policy's own samples is 0")):
            config(sampling=sampling, kl_estimator="k1", **kw)
    assert GRPOConfig(sampling=sampling, kl_estimator="k1", kl_coef=0.0, reference="copy").kl_estimator == "k1"
    assert GRPOConfig(sampling=sampling, kl_estimator="k2", kl_coef=0.1).kl_estimator == "k2"


def test_ppo_advantages_on_three_tokens_by_hand():
    # one row laid out like a rollout: a prompt position, 3 response tokens, a pad position
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -2.0, -1.0, 0.0]])
    values = torch.tensor([[0.0, 0.2, 0.4, 0.6, 0.0]])
    adv, ret, rewards = ppo_advantages(torch.tensor([1.0]), old, ref, values, mask, kl_coef=0.1, kl_estimator="k1",
                                       gamma=1.0, lam=0.9, whiten=False)
    # k1 = old - ref = [0.5, 0, 0.5]; r_t = -0.1 k1_t, plus the score 1.0 on the last token
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.0, 0.95, 0.0])
    # delta_2 = 0.95 - 0.6 = 0.35                    A_2 = 0.35
    # delta_1 = 0 + 0.6 - 0.4 = 0.2                  A_1 = 0.2 + 0.9 * 0.35 = 0.515
    # delta_0 = -0.05 + 0.4 - 0.2 = 0.15             A_0 = 0.15 + 0.9 * 0.515 = 0.6135
    assert adv[0].tolist() == pytest.approx([0.0, 0.6135, 0.515, 0.35, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, 0.8135, 0.915, 0.95, 0.0])  # A + V
    # whitened over the 3 response tokens (unbiased variance), zero elsewhere
    white, _, _ = ppo_advantages(torch.tensor([1.0]), old, ref, values, mask, kl_coef=0.1, kl_estimator="k1",
                                 gamma=1.0, lam=0.9, whiten=True)
    a = [0.6135, 0.515, 0.35]
    mu, sd = statistics.mean(a), statistics.stdev(a)
    assert white[0].tolist() == pytest.approx([0.0] + [(x - mu) / sd for x in a] + [0.0], abs=1e-6)
    # gamma < 1 discounts: with gamma = 0.5, lam = 1, no KL: A_2 = 1 - 0.6, A_1 = 0.5*0.6 - 0.4 + 0.5 A_2, ...
    adv2, _, _ = ppo_advantages(torch.tensor([1.0]), old, ref, values, mask, kl_coef=0.0, gamma=0.5, lam=1.0,
                                whiten=False)
    a2 = 0.4
    a1 = 0.5 * 0.6 - 0.4 + 0.5 * a2
    a0 = 0.5 * 0.4 - 0.2 + 0.5 * a1
    assert adv2[0, 1:4].tolist() == pytest.approx([a0, a1, a2])


def test_ppo_whitening_leaves_failed_annotations_out():
    """A failed annotation (weight 0) used to enter the whitening with its filled-in score, moving the scored
    samples' advantages. No KL, values 0, gamma = lam = 1: every token's advantage is its row's score."""
    mask = torch.ones(3, 2)
    zeros = torch.zeros(3, 2)
    scores = torch.tensor([1.0, 3.0, 0.0])  # the third failed: 0 is its filled-in reward
    adv, _, _ = ppo_advantages(scores, zeros, zeros, zeros, mask, kl_coef=0.0, gamma=1.0, lam=1.0,
                               scored=torch.tensor([True, True, False]))
    # scored tokens [1, 1, 3, 3]: mean 2, unbiased variance 4 / 3 -> -+ 1 / sqrt(4 / 3) = -+ 0.8660
    z = 1 / math.sqrt(4 / 3)
    assert adv.tolist() == [pytest.approx([-z, -z], abs=1e-6), pytest.approx([z, z], abs=1e-6), [0.0, 0.0]]


def test_annotator_counts_are_summed_over_processes_and_rates_recomputed(monkeypatch):
    """Two processes' rows, by hand: the annotators' counts (judge/parse_failures, function/failures, ...) were
    averaged like any metric, logging half the step's failures; now they are summed, and judge/failure_rate is
    (2 + 0 + 1 + 1) / (4 + 4) = 0.5, not the mean of the two rates; other metrics stay averaged."""
    import alignkit.online.metrics as m

    rank0 = {"step": 3.0, "judge/parse_failures": 2.0, "judge/out_of_range": 0.0, "judge/answers": 4.0,
             "judge/failure_rate": 0.5, "function/failures": 3.0, "reward_model/truncated": 1.0, "loss": 1.0}
    rank1 = {"step": 3.0, "judge/parse_failures": 1.0, "judge/out_of_range": 1.0, "judge/answers": 4.0,
             "judge/failure_rate": 0.5, "function/failures": 0.0, "reward_model/truncated": 2.0, "loss": 3.0}
    monkeypatch.setattr(m, "gather_objects", lambda obj, world: [rank0, rank1])

    class Two(m.ProcessMetrics):
        world = 2

    out = Two().reduce_metrics(rank0)
    assert out["judge/parse_failures"] == 3.0 and out["judge/out_of_range"] == 1.0 and out["judge/answers"] == 8.0
    assert out["function/failures"] == 3.0 and out["reward_model/truncated"] == 3.0
    assert out["judge/failure_rate"] == pytest.approx(4 / 8)
    rank1["judge/answers"], rank1["judge/failure_rate"] = 2.0, 1.0  # unequal shares: 4 failures of 6 answers
    out = Two().reduce_metrics(rank0)
    assert out["judge/failure_rate"] == pytest.approx(4 / 6)
    assert out["loss"] == 2.0 and out["step"] == 3.0


def test_reward_function_mean_and_std_are_exact_over_processes(monkeypatch):
    """rewards/<fn>/mean and /std were each process's, averaged over processes: exact only when every process
    scored as many items. Rank 0 scores 1, 2, 3 (and one failure), rank 1 scores 5: the step's values are
    1, 2, 3, 5, mean 11 / 4 = 2.75, Bessel variance (1.75² + 0.75² + 0.25² + 2.25²) / 3 = 8.75 / 3 (the averages
    were (2 + 5) / 2 = 3.5, and a NaN std from rank 1's single score)."""
    import alignkit.online.metrics as m
    from alignkit.online.annotators import FunctionAnnotator

    def digits(prompt, response):
        return None if response == "x" else float(response)

    s0 = FunctionAnnotator(digits).annotate(["p"] * 4, ["1", "2", "3", "x"])
    s1 = FunctionAnnotator(digits).annotate(["p"], ["5"])
    (key,) = s0.moments  # rewards/<the function's name>
    assert key.endswith("digits") and s0.moments[key] == (3.0, 6.0, 14.0) and s1.moments == {key: (1.0, 5.0, 25.0)}
    other = torch.tensor([list(s1.moments[key])], dtype=torch.float64)

    class Two(m.ProcessMetrics):
        world = 2

        def reduce_sum(self, t):
            return t + other

    out = Two().reward_moments(s0.moments)
    assert out[f"{key}/mean"] == pytest.approx(2.75) and out[f"{key}/std"] == pytest.approx(math.sqrt(8.75 / 3))
    # every rank then holds the same value, which reduce_metrics keeps as it is (averaging it is exact only for 2)
    rows = [{"step": 1.0, "rewards/digits/mean": 0.1, "loss": 1.0}, {"step": 1.0, "rewards/digits/mean": 0.1, "loss": 2.0}]
    rows.append(dict(rows[0]))
    monkeypatch.setattr(m, "gather_objects", lambda obj, world: rows)
    reduced = Two().reduce_metrics(rows[0])
    assert reduced["rewards/digits/mean"] == 0.1 and reduced["loss"] == pytest.approx(4 / 3)


def _grpo_stub(config, world_rewards=None):
    """A GRPOTrainer without a model: `advantages`, `policy_loss` and `build_batch` read only these."""
    from types import SimpleNamespace

    from alignkit.online import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    t.config, t.world, t.kl_ctl, t._step = config, 1, SimpleNamespace(value=0.0), 0
    if world_rewards is not None:  # another process's rewards after this one's (rank-major, as accelerate gathers)
        t.world = 2
        t.gather = lambda x: torch.cat([x, world_rewards])
    return t


def test_grpo_std_scope_batch_divides_by_the_whole_steps_sample_std_as_trl_scale_rewards_batch():
    """TRL 1.16's scale_rewards="batch": A = (r - group mean) / (nanstd(every process's rewards) + 1e-4), nanstd the
    Bessel-corrected std of the scored rewards. alignkit had only the group std (scale_by_std) and refused "batch"
    as TRL's name with no equivalent; now method.std_scope=batch."""
    from types import SimpleNamespace

    from alignkit.online import GRPOConfig

    sampling = SamplingConfig(num_samples=2, max_new_tokens=4)
    cfg = GRPOConfig(sampling=sampling, prompts_per_step=2, std_scope="batch")
    r = torch.tensor([1.0, 3.0, 2.0, 6.0])  # groups (1, 3), (2, 6): means 2 and 4
    # the batch: mean 3, squared deviations 4 + 0 + 1 + 9 = 14, sample variance 14 / 3
    by_hand = [d / (math.sqrt(14 / 3) + 1e-4) for d in (-1.0, 1.0, -2.0, 2.0)]
    got = _grpo_stub(cfg).advantages(SimpleNamespace(scores=r.clone(), rewards=r))
    assert got.tolist() == pytest.approx(by_hand, rel=1e-6)
    # the group std instead (the default): each group's (r - mean) / (std + 1e-4), std sqrt(2) and sqrt(8)
    group = _grpo_stub(GRPOConfig(sampling=sampling, prompts_per_step=2)).advantages(SimpleNamespace(scores=r, rewards=r))
    assert group.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4),
                                            -2 / (math.sqrt(8) + 1e-4), 2 / (math.sqrt(8) + 1e-4)], rel=1e-6)
    # a failed annotation (NaN score) is out of its group's mean and of the batch std, and gets 0: std of 1, 2, 6 is
    # sqrt((4 + 1 + 9) / 2); the group (1, NaN) has one scored reward, centred to 0
    scores = torch.tensor([1.0, float("nan"), 2.0, 6.0])
    got = _grpo_stub(cfg).advantages(SimpleNamespace(scores=scores, rewards=torch.tensor([1.0, 1.0, 2.0, 6.0])))
    assert got.tolist() == pytest.approx([0.0, 0.0, -2 / (math.sqrt(7) + 1e-4), 2 / (math.sqrt(7) + 1e-4)], rel=1e-6)
    # two processes: this one holds the group (1, 3), the other (2, 6); the std is the whole step's, as above
    one = GRPOConfig(sampling=sampling, prompts_per_step=2, std_scope="batch")
    rank0 = _grpo_stub(one, world_rewards=torch.tensor([2.0, 6.0]))
    got = rank0.advantages(SimpleNamespace(scores=r[:2].clone(), rewards=r[:2].clone()))
    assert got.tolist() == pytest.approx(by_hand[:2], rel=1e-6)


@pytest.mark.parametrize("kw, said", [
    ({"std_scope": "batch", "scale_by_std": False}, "std_scope='batch' says which std GRPO's advantage divides by, "
     "and scale_by_std=False (Dr. GRPO) divides by no std, so it would be ignored; remove std_scope or set scale_by_std"),
    ({"std_scope": "all"}, "std_scope must be 'group'"),
    ({"std_scope": "batch", "reward_normalization": "running"}, "reward_normalization='running' is undone by GRPO's "
     "advantage, which centres each prompt's rewards and divides them by the step's std"),
])
def test_grpo_std_scope_that_would_be_ignored_is_refused(kw, said):
    from alignkit.online import GRPOConfig, RLOOConfig

    sampling = SamplingConfig(num_samples=2, max_new_tokens=4)
    with pytest.raises(ValueError, match=re.escape(said)):
        GRPOConfig(sampling=sampling, **kw)
    with pytest.raises(ValueError, match=re.escape("std_scope='batch' says which std GRPO's advantage divides by, and "
                                                   "RLOO's leave-one-out baseline never divides by a std")):
        RLOOConfig(sampling=sampling, std_scope="batch")
    # per-group normalisation is not undone by a batch std (each group's own scale stays): accepted
    assert GRPOConfig(sampling=sampling, std_scope="batch", reward_normalization="group").std_scope == "batch"


def _masked_batch(aggregation):
    """One prompt, 2 samples with advantages +0.5 / -0.5 (scale_by_std=False, rewards 1 and 0): sample 0 ended
    ("eos", 2 tokens), sample 1 was cut at max_new_tokens ("length", 3 tokens)."""
    from types import SimpleNamespace

    from alignkit.online import GRPOConfig
    from alignkit.online.generation import Sample
    from alignkit.online.rollout import TokenStats

    cfg = GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=3), prompts_per_step=1, kl_coef=0.0,
                     scale_by_std=False, aggregation=aggregation, mask_truncated_completions=True)
    t = _grpo_stub(cfg)
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    t.token_stats = lambda batch, entropy=False: TokenStats(logps[batch["row"]], mask[batch["row"]])
    samples = [Sample("p", "a", [1], [2, 3], "eos", group=0, index=0),
               Sample("p", "b", [1], [2, 3, 4], "length", group=0, index=1)]
    batch = {"row": torch.arange(2), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    rollout = SimpleNamespace(samples=samples, batch=batch, scores=torch.tensor([1.0, 0.0]),
                              rewards=torch.tensor([1.0, 0.0]), weights=torch.ones(2), mask=mask,
                              old_logps=logps.detach().clone(), ref_logps=None, metrics={})
    return t, t.build_batch(rollout), logps


@pytest.mark.parametrize("aggregation, masked, unmasked", [
    # TRL's grpo: the mean over sequences of each one's token mean; the cut one is a zero-loss sequence, still counted:
    # (-0.5 + 0) / 2; without masking (-0.5 + 0.5) / 2
    ("sequence_mean", -0.25, 0.0),
    # TRL's dapo / bnpo: the sum over the kept tokens over their count: (-0.5 x 2) / 2; without (-1 + 1.5) / 5
    ("token_sum", -0.5, 0.1),
    # TRL's dr_grpo: the kept tokens' sum over samples x max_new_tokens, the cut one counted: (-0.5 x 2) / (2 x 3);
    # without (-1 + 1.5) / 6
    ("max_length_mean", -1 / 6, 1 / 12),
])
def test_mask_truncated_completions_gives_cut_samples_no_loss_with_trls_normaliser(aggregation, masked, unmasked):
    """TRL's mask_truncated_completions (DAPO) was refused as having no equivalent; now a sample whose finish reason is
    "length" has no loss term (no gradient), its reward still in its group's advantage. Ratio 1 (pi = pi_old), so each
    token's loss is -A."""
    t, pb, logps = _masked_batch(aggregation)
    assert pb.keep.tolist() == [True, False]
    assert pb.advantages.tolist() == pytest.approx([0.5, -0.5])  # the cut sample's reward stays in the group mean
    idx = torch.arange(2)
    loss, _ = t.policy_loss(pb, idx)
    assert float(loss.detach()) == pytest.approx(masked)
    loss.backward()
    assert logps.grad[1].abs().sum() == 0 and logps.grad[0].abs().sum() > 0  # the cut sample trains nothing
    pb.keep = None  # as with mask_truncated_completions off
    assert float(t.policy_loss(pb, idx)[0].detach()) == pytest.approx(unmasked)


def test_every_completion_truncated_with_masking_warns_at_the_step_and_counts_at_the_end(caplog):
    """With every completion of a step cut, mask_truncated_completions leaves no loss term: the step's loss was a
    silent 0. Now the first such step warns, and the end of the run counts them."""
    t, _, _ = _masked_batch("sequence_mean")
    from types import SimpleNamespace

    rollout = SimpleNamespace(samples=[], mask=torch.ones(0, 1, dtype=torch.bool), scores=torch.zeros(0),
                              rewards=torch.zeros(0), metrics={"completions/clipped_ratio": 1.0})
    t.config.prompts_per_step = 0  # an empty rollout: only the warning is under test
    t.advantages = lambda r: torch.zeros(0)
    with caplog.at_level("WARNING", logger="alignkit.online.grpo"):
        t.build_batch(rollout)
        t.build_batch(rollout)
    said = [r.getMessage() for r in caplog.records if "mask_truncated_completions" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("step 1: every one of the step's completions reached "
                                                 "sampling.max_new_tokens (3)"), said
    caplog.clear()
    t.config.steps, t._counted_from, t._clipped_steps, t._flat_steps = 5, 0, 2, 0
    with caplog.at_level("WARNING"):
        t.warn_whole_run(0)
    assert any(r.getMessage().startswith("2 of this run's 5 step(s) had every completion cut at "
                                         "sampling.max_new_tokens (3), and method.mask_truncated_completions gave "
                                         "those no loss") for r in caplog.records), caplog.records


def test_a_mini_batch_size_above_the_steps_items_is_refused_or_warned(caplog):
    """mini_batch_size above a step's items made one update over the whole step, as if unset, without a word. The
    config refuses it where the step's most items are known (prompts_per_step x num_samples; pairs for online DPO);
    a step that gives fewer (fewer prompts in the data, pairs dropped) warns once naming both numbers."""
    from types import SimpleNamespace

    from alignkit.online import GRPOConfig, OnlineDPOConfig
    from alignkit.online.updates import MinibatchUpdates

    sampling = SamplingConfig(num_samples=4, max_new_tokens=4)
    with pytest.raises(ValueError, match=re.escape(
            "mini_batch_size: 9 items per optimizer step is more than a step gives, at most 8 sample(s) "
            "(prompts_per_step 2 x sampling.num_samples 4), so each step makes one update over all of them")):
        GRPOConfig(sampling=sampling, prompts_per_step=2, mini_batch_size=9)
    with pytest.raises(ValueError, match=re.escape("mini_batch_size: 3 items per optimizer step is more than a step "
                                                   "gives, at most 2 pair(s)")):
        OnlineDPOConfig(sampling=sampling, prompts_per_step=2, mini_batch_size=3)
    assert GRPOConfig(sampling=sampling, prompts_per_step=2, mini_batch_size=8).mini_batch_size == 8
    h = MinibatchUpdates()
    h.config = SimpleNamespace(mini_batch_size=8)
    with caplog.at_level("WARNING", logger="alignkit.online.updates"):
        h.warn_whole_step_minibatch(8)  # as many: nothing to say
        h.warn_whole_step_minibatch(6)
        h.warn_whole_step_minibatch(6)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["mini_batch_size (method.mini_batch_size) is 8, and this step has 6 item(s) over all processes: "
                    "it makes one update over all of them, as if mini_batch_size were unset; lower it for several "
                    "updates a step"], said


def test_rloo_kl_in_reward_subtracts_the_summed_kl_before_the_baseline_as_trls_rloo():
    """TRL 1.16's RLOOTrainer subtracts beta x each completion's summed k1 (sampling policy minus reference) from its
    reward before the leave-one-out baseline and has no KL in the loss; alignkit's rloo had the KL only as a per-token
    loss term, so TRL's beta (-> method.kl_coef) trained another objective. Now method.kl_in_reward."""
    from types import SimpleNamespace

    from alignkit.online import RLOOConfig
    from alignkit.online.generation import Sample
    from alignkit.online.rollout import TokenStats

    sampling = SamplingConfig(num_samples=2, max_new_tokens=3)
    cfg = RLOOConfig(sampling=sampling, prompts_per_step=1, kl_coef=0.1, kl_estimator="k1", kl_in_reward=True)
    t = _grpo_stub(cfg)
    t.kl_ctl.value = 0.1
    assert not t.reuses_training_pass()  # the advantages read pi_old: the rollout's policy pass runs
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.5, -9.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    samples = [Sample("p", "a", [1], [2, 3], "eos", group=0, index=0),
               Sample("p", "b", [1], [2, 3, 4], "eos", group=0, index=1)]
    rollout = SimpleNamespace(samples=samples, scores=torch.tensor([1.0, 0.0]), rewards=torch.tensor([1.0, 0.0]),
                              old_logps=old, ref_logps=ref, mask=mask, weights=torch.ones(2), metrics={},
                              batch={"row": torch.arange(2), "attention_mask": torch.ones(2, 4, dtype=torch.long)})
    # summed k1 over each sample's tokens: 0.5 - 0.5 = 0 and 1 + 1 + 1 = 3 -> rewards 1 and 0 - 0.1 x 3 = -0.3;
    # leave-one-out with K = 2: A = 1 - (-0.3) = 1.3 and -1.3
    assert t.advantages(rollout).tolist() == pytest.approx([1.3, -1.3])
    # no KL term in the loss: ratio 1, losses -1.3 and 1.3 per sequence, mean 0 (a k3 term would add a positive KL)
    logps = old.clone().requires_grad_(True)
    t.token_stats = lambda batch, entropy=False: TokenStats(logps[batch["row"]], mask[batch["row"]])
    pb = t.build_batch(rollout)
    assert float(t.policy_loss(pb, torch.arange(2))[0].detach()) == pytest.approx(0.0, abs=1e-7)
    # the default: the KL in the loss, the advantages of the scores alone
    plain = _grpo_stub(RLOOConfig(sampling=sampling, prompts_per_step=1, kl_coef=0.1))
    assert plain.advantages(rollout).tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match=re.escape("kl_in_reward=True subtracts kl_coef x each sample's summed KL from "
                                                   "its reward, and kl_coef is 0, so it would be ignored")):
        RLOOConfig(sampling=sampling, kl_coef=0.0, kl_in_reward=True)
    with pytest.raises(ValueError, match="kl_estimator='k1' as a loss term"):
        RLOOConfig(sampling=sampling, kl_coef=0.1, kl_estimator="k1")
