"""Metric totals of `AlignTrainer` (trainers/base.py): what its steps and evaluations accumulate between two logs.

Each metric is kept as (sum, count) per name (`Totals`, `add_totals`), summed over processes at logging time and
logged as sum / count. An evaluation also keeps `EvalTotals`: the whole set's loss (sum_i w_i L_i, N), logged as
its eval_loss, and the weighted figures `weighted/<name>` = sum_i w_i v_i / sum_i w_i, logged only when some
example's weight is not 1.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

WEIGHTED_PREFIX = "weighted/"  # evaluation: weighted/<name> = sum w_i v_i / sum w_i (AlignTrainer.weighted_totals)

Totals = dict[str, list[Tensor]]  # name -> [sum, count], summed over batches (and processes, at logging)


@dataclasses.dataclass
class EvalTotals:
    """What an evaluation accumulates besides its metrics (`AlignTrainer._metrics["eval"]`): `loss` = (sum_i w_i L_i,
    N) over the whole set, logged as its eval_loss; `weighted` = name -> (sum_i w_i v_i, sum_i w_i), logged as
    eval_weighted/<name> only when `weights_not_one` (examples whose weight is not 1) is not 0."""

    loss: list[Tensor] | None = None
    weighted: Totals = dataclasses.field(default_factory=dict)
    weights_not_one: Tensor | None = None

    def add_loss(self, total: Tensor, n: Tensor) -> None:
        self.loss = [total.clone(), n.clone()] if self.loss is None else [self.loss[0] + total, self.loss[1] + n]

    def add_weighted(self, totals: dict[str, tuple[Tensor, Tensor]], not_one: Tensor) -> None:
        add_totals(self.weighted, totals)
        self.weights_not_one = not_one.clone() if self.weights_not_one is None else self.weights_not_one + not_one

    def parts(self) -> list[Totals]:
        """The totals as stores for `AlignTrainer._sum_over_processes` (`from_parts` reads them back)."""
        ones = torch.ones(())
        return [{"loss": self.loss} if self.loss is not None else {}, self.weighted,
                {"weights_not_one": [self.weights_not_one, ones]} if self.weights_not_one is not None else {}]

    @staticmethod
    def from_parts(parts: list[dict[str, tuple[float, float]]]) -> tuple[tuple[float, float] | None, dict[str, float]]:
        """(the loss's (sum, N) or None, the weighted figures to log: {} when every weight is 1)."""
        loss, weighted, not_one = parts
        if not not_one.get("weights_not_one", (0.0, 1.0))[0]:  # every weight 1: the weighted figures are the same
            return loss.get("loss"), {}
        return loss.get("loss"), {f"{WEIGHTED_PREFIX}{k}": s / n for k, (s, n) in weighted.items() if n > 0}

    def clear(self) -> None:
        self.loss, self.weights_not_one = None, None
        self.weighted.clear()


def add_totals(store: Totals, totals: dict[str, tuple[Tensor, Tensor]]) -> None:
    for k, (s, n) in totals.items():
        if k in store:
            store[k][0] += s
            store[k][1] += n
        else:
            store[k] = [s.clone(), n.clone()]


__all__ = ["EvalTotals", "Totals", "WEIGHTED_PREFIX", "add_totals"]
