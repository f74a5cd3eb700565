"""GDPO, TRL 1.16's multi_objective_aggregation="normalize_then_sum" (method.multi_objective_aggregation, grpo):
each reward function's scores standardised within each prompt's group, weighted and summed, then standardised over
the step. Before, alignkit had only TRL's sum_then_normalize and refused the key as TRL's name with no equivalent.
The numbers below are written out from the formula, the stds Bessel-corrected (TRL's nanstd)."""

from __future__ import annotations

import logging
import math
import re
import statistics
from types import SimpleNamespace

import pytest
import torch

from alignkit.online import FunctionAnnotator, GRPOConfig, GRPOTrainer, RLOOConfig
from alignkit.online.generation import SamplingConfig
from alignkit.settings import ConfigError

EPS = 1e-4
NAN = float("nan")
SAMPLING = SamplingConfig(num_samples=3, max_new_tokens=4)
# 2 prompts x 3 samples; f1 scores every item, f2 returns None for item 1
F1 = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
F2 = [0.0, None, 1.0, 2.0, 2.0, 0.0]


def f1(prompts, responses):
    return F1[:len(responses)]


def f2(prompts, responses):
    return F2[:len(responses)]


def _stub(config, annotator, world=None):
    t = object.__new__(GRPOTrainer)
    t.config, t.world, t.kl_ctl, t._step, t.annotator = config, 1, SimpleNamespace(value=0.0), 0, annotator
    if world is not None:  # another process's values after this one's (rank-major, as accelerate gathers)
        t.world = 2
        t.gather = lambda x: torch.cat([x, world(x)])
    return t


def _step(annotator):
    scores = annotator.annotate(["p"] * 6, ["r"] * 6)
    return scores, SimpleNamespace(scores=scores.values, rewards=scores.values.clone(),
                                   per_function=scores.per_function)


def test_normalize_then_sum_by_hand():
    ann = FunctionAnnotator([f1, f2], batched=True, weights=[1.0, 0.5])
    scores, rollout = _step(ann)
    # group 1: f1 (1, 0, 1): mean 2/3, std sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 2) = sqrt(1/3);
    #          f2 (0, None, 1): mean 1/2 over its 2 scores, std sqrt(1/2); item 1 adds 0 for f2 (TRL's nansum)
    a, b = math.sqrt(1 / 3) + EPS, math.sqrt(1 / 2) + EPS
    g1 = [(1 / 3) / a + 0.5 * (-0.5 / b), (-2 / 3) / a, (1 / 3) / a + 0.5 * (0.5 / b)]
    # group 2: f1 (0, 0, 1): mean 1/3, std sqrt(1/3); f2 (2, 2, 0): mean 4/3, std sqrt((4/9 + 4/9 + 16/9) / 2)
    c = math.sqrt(4 / 3) + EPS
    g2 = [(-1 / 3) / a + 0.5 * (2 / 3) / c, (-1 / 3) / a + 0.5 * (2 / 3) / c, (2 / 3) / a + 0.5 * (-4 / 3) / c]
    r = g1 + g2
    by_hand = [(x - statistics.mean(r)) / (statistics.stdev(r) + EPS) for x in r]
    cfg = GRPOConfig(sampling=SAMPLING, prompts_per_step=2, multi_objective_aggregation="normalize_then_sum")
    got = _stub(cfg, ann).advantages(rollout)
    assert got.tolist() == pytest.approx(by_hand, rel=1e-5)
    assert _stub(cfg, ann).decoupled_flat(rollout) is False  # f2's None leaves f1's part of item 1
    # sum_then_normalize (the default) is unchanged: the weighted sum (None skipped), each group's (r - mean) / std
    summed = [1.0, 0.0, 1.5, 1.0, 1.0, 1.0]
    assert scores.values.tolist() == pytest.approx(summed)
    default = _stub(GRPOConfig(sampling=SAMPLING, prompts_per_step=2), ann).advantages(rollout)
    m1, s1 = statistics.mean(summed[:3]), statistics.stdev(summed[:3])
    assert default.tolist()[:3] == pytest.approx([(x - m1) / (s1 + EPS) for x in summed[:3]], rel=1e-5)
    assert default.tolist()[3:] == [0.0, 0.0, 0.0]  # a flat group
    # the metrics stay each function's own, unweighted, over the items it scored (TRL's rewards/<name>/mean)
    assert scores.metrics["rewards/f1/mean"] == pytest.approx(0.5)
    assert scores.metrics["rewards/f2/mean"] == pytest.approx((0 + 1 + 2 + 2 + 0) / 5)
    assert scores.metrics["rewards/f2/std"] == pytest.approx(statistics.stdev([0, 1, 2, 2, 0]))


def test_an_item_no_function_scored_gets_0_and_is_out_of_the_step_statistics():
    def g1(prompts, responses):
        return [1.0, 0.0, None, 3.0, 1.0, 2.0]

    def g2(prompts, responses):
        return [0.0, 1.0, None, 0.0, 0.0, 0.0]

    ann = FunctionAnnotator([g1, g2], batched=True)
    _, rollout = _step(ann)
    # group 1: g1 (1, 0): mean 1/2, std sqrt(1/2); g2 (0, 1): the same, mirrored; item 2 unscored
    a = math.sqrt(1 / 2) + EPS
    r1 = [0.5 / a - 0.5 / a, -0.5 / a + 0.5 / a]  # 0 and 0
    # group 2: g1 (3, 1, 2): mean 2, std 1; g2 (0, 0, 0): std 0, contributes 0 / (0 + eps) = 0
    r2 = [1 / (1 + EPS), -1 / (1 + EPS), 0.0]
    r = r1 + r2
    std = statistics.stdev(r)
    by_hand = [(x - statistics.mean(r)) / (std + EPS) for x in r]
    cfg = GRPOConfig(sampling=SAMPLING, prompts_per_step=2, multi_objective_aggregation="normalize_then_sum")
    got = _stub(cfg, ann).advantages(rollout).tolist()
    assert got[2] == 0.0
    assert got[:2] + got[3:] == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
    # two processes: this one's step is the first prompt's group, the other's adds two more items; the step's mean
    # and std are over all 5 scored items (every process's, as TRL gathers them)
    other = torch.tensor([2.0, -2.0])
    two = _stub(cfg, ann, world=lambda x: other)
    local = SimpleNamespace(scores=rollout.scores[:3], rewards=rollout.rewards[:3],
                            per_function=rollout.per_function[:3])
    everyone = r1 + [2.0, -2.0]
    want = [(x - statistics.mean(everyone)) / (statistics.stdev(everyone) + EPS) for x in r1]
    assert two.advantages(local).tolist() == pytest.approx(want + [0.0], rel=1e-5, abs=1e-6)


KEYS = "so it would be ignored with multi_objective_aggregation='normalize_then_sum'; remove one of them"


@pytest.mark.parametrize("kw, said", [
    ({"scale_by_std": False}, f"scale_by_std=False: normalize_then_sum always divides by the stds, {KEYS}"),
    ({"std_scope": "batch"}, "std_scope='batch': normalize_then_sum always ends with the step's std"),
    ({"reward_normalization": "group", "scale_by_std": True}, "reward_normalization='group': normalize_then_sum "
     "reads each function's raw scores"),
    ({"reward_clip": 1.0}, "reward_clip=1.0: normalize_then_sum reads each function's raw scores"),
    ({"kl_in_reward": True, "kl_coef": 0.1, "kl_estimator": "k1"}, "kl_in_reward=True: normalize_then_sum sums "
     "normalised scores"),
    ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation must be 'sum_then_normalize'"),
])
def test_keys_normalize_then_sum_would_ignore_are_refused(kw, said):
    kw = {"multi_objective_aggregation": "normalize_then_sum", **kw}
    with pytest.raises(ValueError, match=re.escape(said)):
        GRPOConfig(sampling=SAMPLING, **kw)


def test_rloo_and_on_failure_default_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=re.escape("multi_objective_aggregation='normalize_then_sum' is GRPO's "
                                                   "advantage (GDPO), and RLOO's leave-one-out advantage")):
        RLOOConfig(sampling=SAMPLING, multi_objective_aggregation="normalize_then_sum")
    from alignkit.online.trainer import OnlineTrainer

    cfg = GRPOConfig(sampling=SAMPLING, multi_objective_aggregation="normalize_then_sum")
    ann = FunctionAnnotator([f1, f2], batched=True, on_failure="default", default_score=0.0)
    monkeypatch.setattr(OnlineTrainer, "check_inputs", lambda self, *a, **k: setattr(self, "annotator", ann))
    t = _stub(cfg, None)
    with pytest.raises(ValueError, match=re.escape("annotator.on_failure='default' fills one combined default_score")):
        t.check_inputs(None, [], ann, None, None)
    t.config = GRPOConfig(sampling=SAMPLING)
    t.check_inputs(None, [], ann, None, None)  # sum_then_normalize: the default score acts


def test_weights_all_zero_are_refused_negative_and_some_zero_accepted():
    with pytest.raises(ValueError, match=re.escape("weights [0.0, 0] are all 0, so every reward would be 0")):
        FunctionAnnotator([f1, f2], batched=True, weights=[0.0, 0])
    ann = FunctionAnnotator([f1, f2], batched=True, weights=[-1.0, 0.0])  # a penalty; f2 only logged
    assert ann.annotate(["p"] * 3, ["r"] * 3).values.tolist() == [-1.0, 0.0, -1.0]
    from alignkit.settings.online import AnnotatorSettings

    with pytest.raises(ConfigError, match=re.escape("annotator.weights: [0, 0.0] are all 0")):
        AnnotatorSettings(kind="function", function=["alignkit.rewards:digit_fraction"] * 2, weights=[0, 0.0])


def test_run_config_takes_the_key_for_grpo_and_refuses_it_elsewhere(tmp_path):
    from alignkit.settings import load_config

    base = ["model.path=tiny:llama", f"data.path={tmp_path / 'p.jsonl'}", "annotator.kind=function",
            "annotator.function=alignkit.rewards:digit_fraction", "sampling.num_samples=2"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    cfg = load_config(None, command="grpo", overrides=base + ["method.multi_objective_aggregation=normalize_then_sum"])
    assert cfg.trainer_config().multi_objective_aggregation == "normalize_then_sum"
    with pytest.raises(ConfigError, match=re.escape("method: multi_objective_aggregation='normalize_then_sum' is "
                                                    "GRPO's advantage (GDPO)")):
        load_config(None, command="rloo", overrides=base + ["method.multi_objective_aggregation=normalize_then_sum"])
    with pytest.raises(ConfigError, match=re.escape("method.multi_objective_aggregation of alignkit grpo")):
        load_config(None, command="ppo", overrides=base + ["method.multi_objective_aggregation=normalize_then_sum"])


def test_a_function_that_never_varies_within_a_group_is_warned_at_the_end(tiny_dir, tokenizer, caplog):
    """Under normalize_then_sum a function that scores every group's samples alike adds 0 to every advantage: a run
    with such a function (here a constant) said nothing. Now the end of the run names it; a function that varied
    (the response's length) is not named."""
    from .toy import PROMPTS, toy_policy

    def length(prompt, response):
        return float(len(response))

    def constant(prompt, response):
        return 1.0

    cfg = GRPOConfig(steps=2, prompts_per_step=2, sampling=SamplingConfig(num_samples=3, max_new_tokens=3),
                     multi_objective_aggregation="normalize_then_sum", kl_coef=0.0, learning_rate=1e-3)
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                          FunctionAnnotator([length, constant]), cfg)
    with caplog.at_level(logging.WARNING, logger="alignkit.online.grpo"):
        history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    said = [r.getMessage() for r in caplog.records if "scored every prompt's samples alike" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("reward function(s) ") and "<locals>.length" not in said[0]
    assert "<locals>.constant scored every prompt's samples alike at every step of this run" in said[0]


def test_a_step_has_reward_signal_when_the_normalised_functions_do_not_cancel():
    """The no-signal judgement (its warning, and method.stall_steps' stop) read the weighted sums: under
    normalize_then_sum f1 (1, 0) and f2 (0, 2) with weights (2, 1) sum to (2, 2), flat, while GDPO's rewards are
    2 (0.5/s1) + (-1/s2) and its mirror, s1 = sqrt(1/2), s2 = sqrt(2): (+-0.707..), a signal; and f2 = 2 f1 with
    weights (1, -1) sums to -f1, varied, while the normalised functions cancel to 0 everywhere."""
    cfg = GRPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4), prompts_per_step=1,
                     multi_objective_aggregation="normalize_then_sum")

    def step(a, b, weights):
        ann = FunctionAnnotator([lambda p, r: a[int(r)], lambda p, r: b[int(r)]], weights=weights)
        s = ann.annotate(["p", "p"], ["0", "1"])
        return _stub(cfg, ann), SimpleNamespace(scores=s.values, rewards=s.values, per_function=s.per_function)

    t, rollout = step([1.0, 0.0], [0.0, 2.0], [2.0, 1.0])
    assert rollout.scores.tolist() == [2.0, 2.0]
    r = 2 * 0.5 / (math.sqrt(1 / 2) + EPS) - 1.0 / (math.sqrt(2) + EPS)
    assert t.decoupled(rollout)[1].tolist() == pytest.approx([r, -r], rel=1e-5) and abs(r) > 0.7
    assert t.decoupled_flat(rollout) is False
    t, rollout = step([1.0, 0.0], [2.0, 0.0], [1.0, -1.0])
    assert rollout.scores.tolist() == [-1.0, 0.0]
    assert t.decoupled_flat(rollout) is True


def test_each_function_scores_each_sample_once_per_step(tiny_dir, tokenizer):
    """Under normalize_then_sum (GDPO) a reward function is called once per sample: the advantages and the step's
    no-signal judgement read the same scores (a stochastic function or a judge called twice would give two reward
    sets for one sample). 2 steps x 2 prompts x 3 samples: 12 calls of each function, each (prompt, response) once."""
    from .toy import PROMPTS, toy_policy

    calls: dict[str, list[tuple[str, str]]] = {"noisy": [], "length": []}
    gen = torch.Generator().manual_seed(0)

    def noisy(prompt, response):
        calls["noisy"].append((prompt, response))
        return float(torch.rand((), generator=gen))

    def length(prompt, response):
        calls["length"].append((prompt, response))
        return float(len(response))

    cfg = GRPOConfig(steps=2, prompts_per_step=2, sampling=SamplingConfig(num_samples=3, max_new_tokens=3),
                     multi_objective_aggregation="normalize_then_sum", kl_coef=0.0, learning_rate=1e-3)
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                          FunctionAnnotator([noisy, length]), cfg)
    history = trainer.train()
    assert len(history) == 2
    assert len(calls["noisy"]) == len(calls["length"]) == 2 * 2 * 3
