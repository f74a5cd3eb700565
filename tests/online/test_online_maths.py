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
