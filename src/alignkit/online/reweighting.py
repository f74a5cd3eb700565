"""Sample reweighting: per-record factors that reach the loss through the record `weight` field.

A `Reweighter` computes a raw non-negative value r_i per record, then normalises it to mean 1 over the
records it is given (one round's dataset):

    f_i = r_i * N / sum_j r_j              (mean_i f_i = 1; a constant r leaves every weight unchanged)
    weight_i <- weight_i * f_i             (meta["reweight"] = f_i)

so the average example keeps weight 1 and the learning rate keeps its meaning. The online trainers then reduce
with `sum_i w_i l_i / sum_i w_i` (`alignkit.losses.registry.reduce_loss`); the offline ones (records of
`alignkit annotate` trained by `alignkit dpo` / `rm` / `sft`) with their `weight_normalization`: "count" (the default,
`sum_i w_i l_i / N`) or "weighted" (`/ sum_i w_i`, as online), the same in expectation since the factors have
mean 1 over the round. Applying several reweighters multiplies their factors (each normalised on its own).

| name                       | r_i                                                                       |
|----------------------------|---------------------------------------------------------------------------|
| "margin_sigmoid"           | sigmoid(m_i / tau): a Bradley-Terry confidence that the pair is ordered   |
| "margin_linear"            | |m_i| (the normalised margin: f_i = |m_i| / mean |m|)                     |
| "confidence"               | meta[key] in [0, 1], an annotator's own confidence in the label           |
| "inverse_prompt_frequency" | 1 / (number of records with this prompt): each prompt counts the same     |

The margin m_i is `PreferenceRecord.margin` (chosen score - rejected score), else `meta["margin"]` (set by
`feedback.pointwise` as |score - threshold|). A record without one is an error naming its id. What a reweighter
reads is declared (`reads_margin`, `reads_meta`): the online commands and `alignkit annotate` refuse, when the
config is read, one that the feedback mode's records cannot feed (`feedback.MARGIN_MODES`, `feedback.RECORD_META`;
no feedback builder writes meta["confidence"], so "confidence" is for records built elsewhere).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any, Sequence

import torch

from alignkit.data.records import DataError, Record
from alignkit.losses.registry import Registry

REWEIGHTERS = Registry("reweighter")


def normalize_mean_one(raw: torch.Tensor, who: str) -> torch.Tensor:
    """f = raw * N / sum(raw) (float64); raw must be finite, >= 0 and not all zero."""
    raw = raw.to(torch.float64)
    if raw.numel() == 0:
        return raw
    if not bool(torch.isfinite(raw).all()) or bool((raw < 0).any()):
        raise ValueError(f"reweighter {who!r}: raw weights must be finite and >= 0, got {raw.tolist()[:8]}")
    total = float(raw.sum())
    if total <= 0:
        raise ValueError(f"reweighter {who!r}: every raw weight is 0 (e.g. all margins 0), so they cannot be "
                         f"normalised to mean 1; drop this reweighter or the zero-margin records")
    return raw * raw.numel() / total


class Reweighter:
    """Subclasses implement `raw(records) -> (N,) tensor`; calling one returns reweighted copies."""

    name = "reweighter"
    reads_margin = False  # True: needs each record's margin (`record_margin`), which judge_pairs records lack

    @property
    def reads_meta(self) -> tuple[str, ...]:
        """The `meta` keys it needs on every record (`feedback.RECORD_META`: what each feedback mode's records
        carry)."""
        return ()

    def raw(self, records: Sequence[Record]) -> torch.Tensor:
        raise NotImplementedError

    def factors(self, records: Sequence[Record]) -> torch.Tensor:
        """(N,) float64 factors with mean 1."""
        return normalize_mean_one(self.raw(records), self.name)

    def __call__(self, records: Sequence[Record]) -> list[Record]:
        f = self.factors(records).tolist()
        return [replace(r, weight=r.weight * fi, meta={**r.meta, "reweight": r.meta.get("reweight", 1.0) * fi})
                for r, fi in zip(records, f)]

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def record_margin(r: Record) -> float:
    m = getattr(r, "margin", None)
    if m is None:
        m = r.meta.get("margin")
    if m is None or not math.isfinite(float(m)):
        raise DataError(f"{r.id or 'record'}: margin reweighting needs a margin (PreferenceRecord.margin or "
                        f"meta['margin']); build records with scores (feedback.best_worst_pairs / pointwise) or "
                        f"use another reweighter")
    return float(m)


@REWEIGHTERS.register("margin_sigmoid")
class MarginSigmoid(Reweighter):
    """r = sigmoid(margin / tau)."""

    name = "margin_sigmoid"
    reads_margin = True

    def __init__(self, tau: float = 1.0):
        if not tau > 0:
            raise ValueError(f"margin_sigmoid: tau must be > 0, got {tau}")
        self.tau = float(tau)

    def raw(self, records: Sequence[Record]) -> torch.Tensor:
        m = torch.tensor([record_margin(r) for r in records], dtype=torch.float64)  # (N,)
        return torch.sigmoid(m / self.tau)


@REWEIGHTERS.register("margin_linear")
class MarginLinear(Reweighter):
    """r = |margin| (normalised margin)."""

    name = "margin_linear"
    reads_margin = True

    def raw(self, records: Sequence[Record]) -> torch.Tensor:
        return torch.tensor([abs(record_margin(r)) for r in records], dtype=torch.float64)


@REWEIGHTERS.register("confidence")
class Confidence(Reweighter):
    """r = meta[key], an annotator's confidence in [0, 1]."""

    name = "confidence"

    def __init__(self, key: str = "confidence"):
        self.key = key

    @property
    def reads_meta(self) -> tuple[str, ...]:
        return (self.key,)  # no feedback builder writes meta["confidence"]: records from elsewhere (library use)

    def raw(self, records: Sequence[Record]) -> torch.Tensor:
        out = []
        for r in records:
            c = r.meta.get(self.key)
            if not isinstance(c, (int, float)) or not 0.0 <= float(c) <= 1.0:
                raise DataError(f"{r.id or 'record'}: confidence reweighting needs meta[{self.key!r}] in [0, 1], "
                                f"got {c!r}")
            out.append(float(c))
        return torch.tensor(out, dtype=torch.float64)


@REWEIGHTERS.register("inverse_prompt_frequency")
class InversePromptFrequency(Reweighter):
    """r = 1 / count of records sharing the prompt."""

    name = "inverse_prompt_frequency"

    def raw(self, records: Sequence[Record]) -> torch.Tensor:
        keys = [json.dumps(r.prompt, sort_keys=True) for r in records]
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        return torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.float64)


def build_reweighter(spec: str | dict[str, Any] | Reweighter) -> Reweighter:
    """"margin_sigmoid" or {"type": "margin_sigmoid", "tau": 2.0} -> a Reweighter."""
    if isinstance(spec, Reweighter):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"reweighter spec must be a name or a mapping with 'type' (one of {sorted(REWEIGHTERS)}), "
                         f"got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    try:
        return REWEIGHTERS[spec["type"]](**kwargs)
    except TypeError as e:
        raise ValueError(f"reweighter {spec['type']!r}: bad arguments {sorted(kwargs)} ({e})") from e


def reweight(records: Sequence[Record], reweighters: Sequence[str | dict | Reweighter]) -> list[Record]:
    """Apply each reweighter in turn (their mean-one factors multiply)."""
    out = list(records)
    for spec in reweighters:
        out = build_reweighter(spec)(out)
    return out


__all__ = ["REWEIGHTERS", "Reweighter", "MarginSigmoid", "MarginLinear", "Confidence", "InversePromptFrequency",
           "normalize_mean_one", "record_margin", "build_reweighter", "reweight"]
