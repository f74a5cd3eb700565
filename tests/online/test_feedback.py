"""Feedback builders: best vs worst, random pairs above a margin, judge pairs in randomised A/B order,
pointwise thresholds for KTO, best-of-n SFT records; every expectation worked out by hand below."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from alignkit.data.records import PreferenceRecord, SFTRecord, UnpairedRecord
from alignkit.online.annotators import Annotator
from alignkit.online.feedback import (best_of_n, best_worst_pairs, build_records, judge_pairs, median, pointwise,
                                      random_pairs)
from alignkit.online.generation import Sample


def make_samples(groups: list[list[str]], weights: list[float] | None = None) -> list[Sample]:
    """Samples laid out as generate_responses does: prompt-major, `group` = prompt index, `index` = sample."""
    out = []
    for g, responses in enumerate(groups):
        for k, r in enumerate(responses):
            out.append(Sample(f"prompt {g}", r, [1, 2], [3, 4], "eos", group=g, index=k, prompt_id=f"p{g}",
                              weight=1.0 if weights is None else weights[g]))
    return out


def test_best_worst_pairs_first_argmax_vs_first_argmin():
    samples = make_samples([["a", "b", "c", "d"], ["e", "f", "g"], ["h", "i"]], weights=[1.0, 2.0, 1.0])
    scores = [0.2, 0.9, 0.1, 0.9,  # best = first 0.9 (b, index 1), worst = c (index 2): margin 0.8
              0.5, 0.5, 0.5,  # all equal: no pair
              0.3, 0.6]  # margin 0.3
    pairs = best_worst_pairs(samples, scores)
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "c"), ("i", "h")]
    assert all(isinstance(p, PreferenceRecord) for p in pairs)
    assert pairs[0].margin == pytest.approx(0.8) and pairs[1].margin == pytest.approx(0.3)
    assert pairs[0].meta["chosen_index"] == 1 and pairs[0].meta["rejected_index"] == 2
    assert pairs[1].meta == {"group": 2, "prompt_id": "p2", "chosen_score": 0.6, "rejected_score": 0.3,
                             "chosen_index": 1, "rejected_index": 0}
    # min_margin is strict: 0.3 is not > 0.3
    assert [(p.chosen, p.rejected) for p in best_worst_pairs(samples, scores, min_margin=0.3)] == [("b", "c")]
    # the prompt weight is kept
    weighted = best_worst_pairs(make_samples([["a", "b"], ["c", "d"]], weights=[1.0, 2.5]), [0, 1, 1, 0])
    assert [p.weight for p in weighted] == [1.0, 2.5]


def test_unscored_and_empty_responses_are_left_out():
    samples = make_samples([["a", "b", "  ", "d"]])
    pairs = best_worst_pairs(samples, [float("nan"), 0.5, 9.0, 0.1])  # nan and the blank response drop out
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "d")]
    with pytest.raises(ValueError, match="3 scores for 4 samples"):
        best_worst_pairs(samples, [1.0, 2.0, 3.0])


def test_random_pairs_are_all_above_the_margin_with_higher_chosen():
    responses = ["r0", "r1", "r2", "r3", "r4"]
    scores = [0.0, 0.05, 0.5, 0.52, 1.0]
    samples = make_samples([responses])
    # naive enumeration: pairs whose scores differ by more than 0.1, the higher one chosen
    want = {(responses[i], responses[j]) if scores[i] > scores[j] else (responses[j], responses[i])
            for i, j in itertools.combinations(range(5), 2) if abs(scores[i] - scores[j]) > 0.1}
    assert len(want) == 8  # 10 pairs minus (r0, r1) and (r2, r3)
    all_pairs = random_pairs(samples, scores, min_margin=0.1, pairs_per_prompt=100, seed=3)
    got = [(p.chosen, p.rejected) for p in all_pairs]
    assert set(got) == want and len(got) == len(want)  # distinct
    for p in all_pairs:
        assert p.margin == pytest.approx(p.meta["chosen_score"] - p.meta["rejected_score"]) and p.margin > 0.1
    two = random_pairs(samples, scores, min_margin=0.1, pairs_per_prompt=2, seed=3)
    assert len(two) == 2 and {(p.chosen, p.rejected) for p in two} <= want
    again = random_pairs(samples, scores, min_margin=0.1, pairs_per_prompt=2, seed=3)
    assert [(p.chosen, p.rejected) for p in two] == [(p.chosen, p.rejected) for p in again]  # seeded
    seeds = {tuple((p.chosen, p.rejected) for p in random_pairs(samples, scores, 0.1, 2, seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the choice is random across seeds


class OrderJudge(Annotator):
    """Knows the true quality (the number in the response) and records the order it was shown; `bias_a`
    makes it a fully position-biased judge that always answers 'A'."""

    def __init__(self, bias_a: bool = False):
        self.bias_a, self.shown = bias_a, []

    def prefer_batch(self, prompts, a, b):
        self.shown += list(zip(a, b))
        return [0 if self.bias_a else (0 if int(x[1:]) > int(y[1:]) else 1) for x, y in zip(a, b)]


def test_judge_pairs_randomise_the_order_and_map_verdicts_back():
    samples = make_samples([[f"q{k}" for k in range(4)] for _ in range(10)])
    judge = OrderJudge()
    pairs = judge_pairs(samples, judge, pairs_per_prompt=3, seed=0)
    assert len(pairs) == 30 and len(judge.shown) == 30
    # a truthful judge: the higher number always wins, whatever order it was shown in
    assert all(int(p.chosen[1:]) > int(p.rejected[1:]) for p in pairs)
    swapped = [p.meta["swapped"] for p in pairs]
    assert 8 <= sum(swapped) <= 22  # both orders are used (a seeded coin per pair)
    # a judge that always says "A": the record's chosen response is whichever was shown first
    biased = OrderJudge(bias_a=True)
    bpairs = judge_pairs(samples, biased, pairs_per_prompt=3, seed=0)
    assert [(p.chosen, p.rejected) for p in bpairs] == biased.shown
    # same seed, same coin flips: the biased judge's wins follow the coin, not the true quality
    assert [p.meta["swapped"] for p in bpairs] == swapped
    assert any(int(p.chosen[1:]) < int(p.rejected[1:]) for p in bpairs)
    for p in bpairs:
        assert samples[p.meta["group"] * 4 + p.meta["chosen_index"]].response == p.chosen
        assert samples[p.meta["group"] * 4 + p.meta["rejected_index"]].response == p.rejected


def test_pointwise_fixed_threshold():
    samples = make_samples([["a", "b", "c", "d"]])
    recs = pointwise(samples, [0.9, 0.5, 0.2, 0.7], threshold=0.5)
    assert all(isinstance(r, UnpairedRecord) for r in recs)
    assert [(r.completion, r.label) for r in recs] == [("a", True), ("c", False), ("d", True)]  # b == t dropped
    assert [r.meta["margin"] for r in recs] == pytest.approx([0.4, 0.3, 0.2])


def test_pointwise_median_per_prompt():
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5
    samples = make_samples([["a", "b", "c"], ["d", "e", "f", "g"]])
    # group 0 median 2 (b dropped); group 1 median (10 + 20) / 2 = 15
    recs = pointwise(samples, [1.0, 2.0, 3.0, 10.0, 40.0, 0.0, 20.0])
    assert [(r.completion, r.label, r.meta["threshold"]) for r in recs] == [
        ("a", False, 2.0), ("c", True, 2.0), ("d", False, 15.0), ("e", True, 15.0), ("f", False, 15.0),
        ("g", True, 15.0)]
    with pytest.raises(ValueError, match="threshold"):
        pointwise(samples, [0.0] * 7, threshold="mean")


def test_best_of_n_keeps_the_best_as_sft_records():
    samples = make_samples([["a", "b", "c", "d"], ["e", "f"]])
    scores = [0.1, 0.8, 0.8, 0.3, -1.0, -2.0]
    top1 = best_of_n(samples, scores)
    assert [(r.completion, r.meta["score"]) for r in top1] == [("b", 0.8), ("e", -1.0)]  # tie: earlier wins
    assert all(isinstance(r, SFTRecord) and r.prompt == f"prompt {i}" for i, r in enumerate(top1))
    top2 = best_of_n(samples, scores, k=2, min_score=0.0)
    assert [r.completion for r in top2] == ["b", "c"]  # group 1 scores below min_score
    with pytest.raises(ValueError, match="k >= 1"):
        best_of_n(samples, scores, k=0)


def test_best_of_n_that_keeps_every_sample_warns(caplog):
    """k >= the samples per prompt without min_score: every response is kept, the scores select nothing (the
    records are the samples, silently). One warning; k below the largest group, or a min_score, is quiet."""
    samples = make_samples([["a", "b", "c", "d"], ["e", "f"]])
    scores = [0.1, 0.8, 0.8, 0.3, -1.0, -2.0]
    with caplog.at_level("WARNING", logger="alignkit.online.feedback"):
        assert len(best_of_n(samples, scores, k=4)) == 6
    assert [r.getMessage()[:61] for r in caplog.records] == [
        "best_of_n: k=4 keeps every response of each prompt (at most 4"], caplog.records
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignkit.online.feedback"):
        best_of_n(samples, scores, k=3)
        best_of_n(samples, scores, k=4, min_score=0.0)
    assert not caplog.records


def test_build_records_dispatch_and_errors():
    samples = make_samples([["a", "b"]])
    assert [r.chosen for r in build_records("best_worst", samples, [0.0, 1.0])] == ["b"]
    assert [r.completion for r in build_records("best_of_n", samples, [0.0, 1.0])] == ["b"]
    with pytest.raises(ValueError, match="unknown feedback mode"):
        build_records("pairs", samples, [0.0, 1.0])
    with pytest.raises(ValueError, match="needs scores"):
        build_records("pointwise", samples, None)
    with pytest.raises(ValueError, match="needs the annotator"):
        build_records("judge_pairs", samples, None)
    assert math.isclose(build_records("random_pairs", samples, [0.0, 1.0], seed=1)[0].margin, 1.0)


def test_record_meta_lists_what_each_builder_writes():
    """`RECORD_META` / `MARGIN_MODES` (what the config checks of reweighters read) agree with the builders."""
    from alignkit.online.feedback import FEEDBACK_MODES, MARGIN_MODES, RECORD_META

    samples = make_samples([["q0", "q1", "q2"]])
    scores = [0.1, 0.9, 0.5]
    for mode in FEEDBACK_MODES:
        records = build_records(mode, samples, None if mode == "judge_pairs" else scores, OrderJudge())
        assert records and all(set(r.meta) == set(RECORD_META[mode]) for r in records), mode
        has_margin = all((getattr(r, "margin", None) if getattr(r, "margin", None) is not None
                          else r.meta.get("margin")) is not None for r in records)
        assert has_margin == (mode in MARGIN_MODES), mode


@pytest.mark.parametrize("keys, said", [
    ({"feedback_kwargs": {"min_margn": 0.1}}, "feedback_kwargs.min_margn: unknown key; did you mean 'min_margin'?"),
    ({"feedback_kwargs": {"pairs_per_prompt": 2}}, "feedback_kwargs.pairs_per_prompt: unknown key"),  # best_worst's
    # best_worst paired an all-equal group's first sample with itself (chosen = rejected), silently
    ({"feedback_kwargs": {"min_margin": -1.0}}, "feedback_kwargs.min_margin: -1.0 must be a number >= 0"),
    # random_pairs formed no pair at all (ok[:0]), and the no-pair warning blamed the rewards
    ({"feedback": "random_pairs", "feedback_kwargs": {"pairs_per_prompt": 0}},
     "feedback_kwargs.pairs_per_prompt: 0 must be a whole number >= 1"),
    ({"feedback": "judge_pairs", "reweighters": ["margin_sigmoid"]},
     "reweighters[0]: margin_sigmoid weighs records by their margin, and feedback=judge_pairs gives records with no "
     "margin"),
])
def test_online_dpo_config_refuses_feedback_settings_its_pairs_cannot_take(keys, said):
    """OnlineDPOConfig built in Python took feedback_kwargs the pair builder has no parameter for, and reweighters its
    records cannot feed: the trainer was built and the first step stopped (TypeError / ValueError) after its folder was
    written. The CLI refused them from its config; the library config now runs the same check when built."""
    from alignkit.online import OnlineDPOConfig

    with pytest.raises(ValueError, match="^" + re.escape(said)):
        OnlineDPOConfig(**keys)
    assert OnlineDPOConfig(feedback="random_pairs", feedback_kwargs={"pairs_per_prompt": 2, "min_margin": 0.1},
                           reweighters=["margin_sigmoid"]).feedback_kwargs["pairs_per_prompt"] == 2
