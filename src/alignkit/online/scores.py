"""An annotator's scores (`Scores`: one float32 value per item, NaN where it could not score), the failure policy
that fills them (`finalize_scores`, `check_policy`) and the error an annotator raises naming the item. Kept apart
from `alignkit.online.annotators` (which re-exports them) so that module holds the annotators themselves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FAILURE_POLICIES = ("skip", "default")


class AnnotatorError(RuntimeError):
    """An annotator could not run (bad function, bad return value, bad model). The message names which item."""


@dataclass
class Scores:
    values: torch.Tensor  # (N,) float32, NaN = no score
    failed: torch.Tensor  # (N,) bool
    meta: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # "rewards/<function>" -> (count, sum, sum of squares) of the function's scored items: the online loop reduces
    # them over processes into exact `rewards/<function>/mean` and `/std` (`ProcessMetrics.reward_moments`)
    moments: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # (N, F) each reward function's own score, NaN = None (FunctionAnnotator): GRPO's normalize_then_sum reads it
    per_function: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool: items with a usable score."""
        return ~torch.isnan(self.values)

    def __len__(self) -> int:
        return self.values.numel()


def finalize_scores(raw: Sequence[float | None], on_failure: str, default_score: float | None,
                    meta: list[dict] | None = None, metrics: dict[str, float] | None = None,
                    who: str = "the annotator") -> Scores:
    """Raw per-item scores (None = failed) -> `Scores`, applying the failure policy; a score float32 cannot hold
    is an `AnnotatorError` naming `who` and the item."""
    failed = torch.tensor([r is None for r in raw], dtype=torch.bool)
    fill = float("nan") if on_failure == "skip" else float(default_score)
    values = torch.tensor([fill if r is None else float(r) for r in raw], dtype=torch.float32)
    big = torch.isinf(values).nonzero().flatten().tolist()
    if big:  # finite in Python, inf in float32: the group statistics became NaN and the loss was blamed
        i = big[0]
        what = (f"default_score {default_score!r} (for failed item {i})" if raw[i] is None
                else f"{raw[i]!r} for item {i}")
        raise AnnotatorError(f"{who}: score {what} is beyond float32's range (|score| <= {FLOAT32_MAX:.3g}), in "
                             f"which rewards are kept ({len(big)} such item(s) of {len(raw)}); scale the reward down")
    return Scores(values, failed, meta if meta is not None else [{} for _ in raw], dict(metrics or {}))


def check_policy(on_failure: str, default_score: float | None, who: str) -> None:
    if on_failure not in FAILURE_POLICIES:
        raise ValueError(f"{who}: on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
    if on_failure == "default" and (default_score is None or not math.isfinite(default_score)):
        raise ValueError(f"{who}: on_failure='default' needs a finite default_score")


def check_lengths(prompts: Sequence, responses: Sequence, who: str) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{who}: {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")


__all__ = ["AnnotatorError", "FAILURE_POLICIES", "FLOAT32_MAX", "Scores", "check_lengths", "check_policy",
           "finalize_scores"]
