"""Scored samples -> training records of the SAME record model the offline trainers read.

Inputs: `samples` (from `generate_responses`: `Sample.group` is the prompt index) and their scores, a
`Scores` or any (N,) sequence of floats, aligned with `samples`. Items with no usable score (NaN) or an
empty response (records hold no empty responses) are left out and counted in the log.

| builder            | records           | rule                                                                 |
|--------------------|-------------------|----------------------------------------------------------------------|
| `pointwise`        | UnpairedRecord    | t = `threshold` (fixed) or each prompt's median score: s > t         |
|                    |                   | desirable, s < t undesirable, s == t dropped (ambiguous); KTO / BCO  |
| `best_worst_pairs` | PreferenceRecord  | per prompt, best (first argmax) vs worst (first argmin), when        |
|                    |                   | best - worst > `min_margin` (so an all-equal group gives no pair)    |
| `random_pairs`     | PreferenceRecord  | up to `pairs_per_prompt` random distinct pairs per prompt with       |
|                    |                   | |s_i - s_j| > `min_margin`, the higher one chosen (seeded RNG)        |
| `judge_pairs`      | PreferenceRecord  | random pairs compared by `annotator.prefer_batch`; the A/B order of  |
|                    |                   | each comparison is flipped by a seeded coin first (position bias)    |
| `best_of_n`        | SFTRecord         | the top `k` responses of each prompt (score >= `min_score`), the     |
|                    |                   | Open-Assistant / rejection-sampling augmentation                     |

Every record keeps the prompt record's `weight` (reweighting comes after: `alignkit.online.reweighting`).
`PreferenceRecord.margin` = chosen score - rejected score; `meta` holds the scores (`score`,
`chosen_score`/`rejected_score`), the prompt index `group`, the `prompt_id`, for pairs the sample numbers
`chosen_index`/`rejected_index` (`Sample.index`: the online trainers find the sampled token ids by them),
and for unpaired records `margin` = |s - t|.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, defaultdict
from typing import Sequence

import torch

from alignkit.data.records import PreferenceRecord, SFTRecord, UnpairedRecord
from alignkit.online.annotators import Annotator, Scores
from alignkit.online.generation import Sample

logger = logging.getLogger(__name__)

FEEDBACK_MODES = ("pointwise", "best_worst", "random_pairs", "judge_pairs", "best_of_n")

# What each builder's records carry, for the reweighters that read them (`Reweighter.reads_margin`, `reads_meta`):
# the modes whose records have a margin (`PreferenceRecord.margin`, or `meta["margin"]` for pointwise), and each
# mode's `meta` keys (tests/online/test_feedback.py builds records with each mode and compares)
MARGIN_MODES = ("pointwise", "best_worst", "random_pairs")
_PAIR_META = ("group", "prompt_id", "chosen_score", "rejected_score", "chosen_index", "rejected_index")
RECORD_META = {"pointwise": ("group", "prompt_id", "score", "threshold", "margin"),
               "best_worst": _PAIR_META, "random_pairs": _PAIR_META,
               "judge_pairs": ("group", "prompt_id", "swapped", "chosen_index", "rejected_index"),
               "best_of_n": ("group", "prompt_id", "score")}


def score_list(scores: Scores | torch.Tensor | Sequence[float], n: int) -> list[float]:
    values = scores.values if isinstance(scores, Scores) else scores
    values = values.tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{len(values)} scores for {n} samples; pass one score per sample, in the same order")
    return values


def usable_groups(samples: Sequence[Sample], scores: Scores | torch.Tensor | Sequence[float] | None,
                  where: str) -> dict[int, list[tuple[Sample, float]]]:
    """group -> [(sample, score)] in sample order, without unscored items or empty responses."""
    values = score_list(scores, len(samples)) if scores is not None else [0.0] * len(samples)
    groups: dict[int, list[tuple[Sample, float]]] = defaultdict(list)
    n_nan = n_empty = 0
    for s, v in zip(samples, values):
        if math.isnan(v):
            n_nan += 1
        elif not s.response.strip():
            n_empty += 1
        else:
            groups[s.group].append((s, v))
    if n_nan or n_empty:
        logger.info("%s: left out %d unscored and %d empty response(s) of %d", where, n_nan, n_empty, len(samples))
    return dict(groups)


def median(values: Sequence[float]) -> float:
    """The middle value (odd count) or the mean of the two middle values (even count)."""
    vs = sorted(values)
    m = len(vs) // 2
    return vs[m] if len(vs) % 2 else (vs[m - 1] + vs[m]) / 2


def _meta(s: Sample, **extra) -> dict:
    return {"group": s.group, "prompt_id": s.prompt_id, **extra}


def _pair(c: tuple[Sample, float], r: tuple[Sample, float], tag: str, **extra) -> PreferenceRecord:
    (sc, vc), (sr, vr) = c, r
    return PreferenceRecord(sc.prompt, sc.response, sr.response, weight=sc.weight, margin=vc - vr,
                            id=f"{sc.prompt_id or 'prompt'} {tag}({sc.index},{sr.index})",
                            meta=_meta(sc, chosen_score=vc, rejected_score=vr, chosen_index=sc.index,
                                       rejected_index=sr.index, **extra))


def pointwise(samples: Sequence[Sample], scores: Scores | torch.Tensor | Sequence[float],
              threshold: float | str = "median") -> list[UnpairedRecord]:
    """Desirable / undesirable labels by a fixed `threshold` or each prompt's median ("median")."""
    if not (threshold == "median" or isinstance(threshold, (int, float))):
        raise ValueError(f"threshold must be a number or 'median', got {threshold!r}")
    out, ties = [], 0
    for g, items in usable_groups(samples, scores, "pointwise feedback").items():
        t = median([v for _, v in items]) if threshold == "median" else float(threshold)
        for s, v in items:
            if v == t:
                ties += 1
                continue
            out.append(UnpairedRecord(s.prompt, s.response, v > t, weight=s.weight,
                                      id=f"{s.prompt_id or 'prompt'} sample({s.index})",
                                      meta=_meta(s, score=v, threshold=t, margin=abs(v - t))))
    if ties:
        logger.info("pointwise feedback: dropped %d response(s) scored exactly at the threshold", ties)
    return out


def best_worst_pairs(samples: Sequence[Sample], scores: Scores | torch.Tensor | Sequence[float],
                     min_margin: float = 0.0) -> list[PreferenceRecord]:
    """One pair per prompt: best vs worst, if best - worst > min_margin."""
    out = []
    for g, items in usable_groups(samples, scores, "best/worst pairs").items():
        best = max(items, key=lambda x: x[1])  # first of the maxima
        worst = min(items, key=lambda x: x[1])  # first of the minima
        if best[1] - worst[1] > min_margin:
            out.append(_pair(best, worst, "best_worst"))
    return out


def _candidate_pairs(n: int, rng: random.Random, limit: int) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    rng.shuffle(pairs)
    return pairs[:limit] if limit > 0 else pairs


def random_pairs(samples: Sequence[Sample], scores: Scores | torch.Tensor | Sequence[float], min_margin: float = 0.0,
                 pairs_per_prompt: int = 1, seed: int = 0) -> list[PreferenceRecord]:
    """Up to `pairs_per_prompt` random pairs per prompt whose scores differ by more than `min_margin`."""
    rng = random.Random(seed)
    out = []
    for g, items in sorted(usable_groups(samples, scores, "random pairs").items()):
        ok = [(i, j) for i, j in _candidate_pairs(len(items), rng, 0) if abs(items[i][1] - items[j][1]) > min_margin]
        for i, j in ok[:pairs_per_prompt]:
            hi, lo = (items[i], items[j]) if items[i][1] > items[j][1] else (items[j], items[i])
            out.append(_pair(hi, lo, "random"))
    return out


def judge_pairs(samples: Sequence[Sample], annotator: Annotator, pairs_per_prompt: int = 1,
                seed: int = 0) -> list[PreferenceRecord]:
    """Random pairs per prompt judged by `annotator.prefer_batch`, each shown in a coin-flipped A/B order.

    The verdict is mapped back to the original order; undecided comparisons (None) give no record.
    `meta["swapped"]` records whether the pair was shown reversed.
    """
    rng = random.Random(seed)
    jobs = []  # (first, second, swapped)
    for g, items in sorted(usable_groups(samples, None, "judge pairs").items()):
        for i, j in _candidate_pairs(len(items), rng, pairs_per_prompt):
            jobs.append((items[i], items[j], rng.random() < 0.5))
    shown = [(y, x) if sw else (x, y) for x, y, sw in jobs]
    verdicts = annotator.prefer_batch([a[0].prompt for a, _ in shown], [a[0].response for a, _ in shown],
                                      [b[0].response for _, b in shown])
    out = []
    for (x, y, sw), (a, b), v in zip(jobs, shown, verdicts):
        if v is None:
            continue
        win, lose = (a[0], b[0]) if v == 0 else (b[0], a[0])
        out.append(PreferenceRecord(win.prompt, win.response, lose.response, weight=win.weight,
                                    id=f"{win.prompt_id or 'prompt'} judge({win.index},{lose.index})",
                                    meta=_meta(win, swapped=sw, chosen_index=win.index, rejected_index=lose.index)))
    logger.info("judge pairs: %d comparison(s), %d decided", len(jobs), len(out))
    return out


def best_of_n(samples: Sequence[Sample], scores: Scores | torch.Tensor | Sequence[float], k: int = 1,
              min_score: float | None = None) -> list[SFTRecord]:
    """The `k` best responses of each prompt (stable order on ties), each scoring >= `min_score` if given."""
    if k < 1:
        raise ValueError(f"best_of_n needs k >= 1, got {k}")
    most = max(Counter(s.group for s in samples).values(), default=0)
    if min_score is None and 0 < most <= k:
        logger.warning("best_of_n: k=%d keeps every response of each prompt (at most %d sampled per prompt), so the "
                       "scores select nothing and the records are all the samples; lower k (feedback_kwargs.k) below "
                       "the samples per prompt (sampling.num_samples), or set min_score", k, most)
    out = []
    for g, items in usable_groups(samples, scores, "best-of-n").items():
        ranked = sorted(items, key=lambda x: -x[1])[:k]  # sorted is stable: earlier samples win ties
        for s, v in ranked:
            if min_score is None or v >= min_score:
                out.append(SFTRecord(s.prompt, s.response, weight=s.weight,
                                     id=f"{s.prompt_id or 'prompt'} best({s.index})", meta=_meta(s, score=v)))
    return out


def build_records(mode: str, samples: Sequence[Sample], scores: Scores | None, annotator: Annotator | None = None,
                  **kwargs) -> list:
    """Dispatch by `mode` (one of FEEDBACK_MODES) to the builder above; `kwargs` go to it."""
    if mode not in FEEDBACK_MODES:
        raise ValueError(f"unknown feedback mode {mode!r}; valid: {', '.join(FEEDBACK_MODES)}")
    if mode == "judge_pairs":
        if annotator is None:
            raise ValueError("feedback mode 'judge_pairs' needs the annotator (its prefer_batch compares the pairs)")
        return judge_pairs(samples, annotator, **kwargs)
    if scores is None:
        raise ValueError(f"feedback mode {mode!r} needs scores; annotate the samples first")
    fn = {"pointwise": pointwise, "best_worst": best_worst_pairs, "random_pairs": random_pairs,
          "best_of_n": best_of_n}[mode]
    return fn(samples, scores, **kwargs)


__all__ = ["FEEDBACK_MODES", "build_records", "median", "pointwise", "best_worst_pairs", "random_pairs",
           "judge_pairs", "best_of_n", "usable_groups", "score_list"]
