"""The loss contract: what every loss returns, the one reduction, and the registries by name.

A loss is a pure function of tensors. It returns `LossOutput(losses, metrics)`:

- `losses`: shape `(B,)`, one value per example (per pair for pairwise losses, per prompt for
  ranking losses). Never reduced inside the loss.
- `metrics`: name -> detached tensor, either per example `(B,)` or a scalar `()`. A trainer logs the
  mean of each value (after gathering across processes if it wants global figures).
- `num_tokens`: optional `(B,)` count of tokens behind each loss value, for token-normalised
  objectives (SFT, token-level policy gradient): the trainer then passes the global token count of
  the optimizer step as `normalizer` to `reduce_loss`.

Reduction happens once, in the trainer base, through `reduce_loss`:

    loss = sum_i w_i * losses_i / normalizer        (w_i = 1 when weights is None)
    normalizer defaults to sum_i w_i (i.e. B without weights): a (weighted) mean.

Gradient accumulation: pass as `normalizer` the total over ALL micro-batches of the optimizer step
(sum of weights, number of examples, or number of tokens) and do not divide by the number of
accumulation steps again. Then summing the micro-batch gradients gives exactly the gradient of
the full batch (see tests/losses/test_sft.py::test_accumulation_invariant).

Registries map a name (as used in configs, TRL's `loss_type` where one exists) to a function.
`REGISTRIES` lists them all for `alignkit ls`. Each entry also declares the names of the metrics its
`LossOutput` carries (`Registry.metrics[name]`; the registry's `default_metrics` unless the entry says
otherwise): the trainers derive what they log from them (`AlignTrainer.eval_metrics`), and
tests/trainers/test_matrix.py checks them against a real evaluation of every registered loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from alignkit.loss_bounds import allowed, past_bound


@dataclass
class LossOutput:
    """Per-example losses `(B,)`, detached metrics, and optional per-example token counts `(B,)`."""

    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    num_tokens: Tensor | None = None


def reduce_loss(losses: Tensor, weights: Tensor | None = None,
                normalizer: Tensor | float | int | None = None) -> Tensor:
    """The one reduction: `sum_i w_i * losses_i / normalizer` (a weighted mean by default).

    Args:
        losses: `(B,)` per-example values from a loss function.
        weights: optional `(B,)` non-negative sample weights (w_i = 1 when None).
        normalizer: what to divide the weighted sum by. Default: `sum_i w_i` (B when unweighted).
            Under gradient accumulation pass the total over the whole optimizer step (examples,
            weights or tokens, across micro-batches and, under DDP, across processes times the
            number of processes, because DDP averages gradients).
    """
    if losses.dim() != 1:
        raise ValueError(f"reduce_loss expects per-example losses of shape (B,), got {tuple(losses.shape)}; "
                         "losses must not be reduced inside the loss function")
    if weights is not None:
        if weights.shape != losses.shape:
            raise ValueError(f"reduce_loss: weights shape {tuple(weights.shape)} != losses shape "
                             f"{tuple(losses.shape)}; pass one weight per example")
        weights = weights.to(losses.dtype)
        total = (losses * weights).sum()
        default_norm = weights.sum()
    else:
        total = losses.sum()
        default_norm = losses.new_tensor(float(losses.numel()))
    norm = default_norm if normalizer is None else normalizer
    if not isinstance(norm, Tensor):
        norm = losses.new_tensor(float(norm))
    # an empty (all-zero-weight / no-token) batch has total 0 and gives 0 instead of NaN;
    # no host sync (no float(tensor)) so this stays cheap on accelerators
    return total / norm.to(losses.dtype).clamp(min=torch.finfo(losses.dtype).tiny)


def check_signs(who: str, **values: float | None) -> None:
    """ValueError naming `who` and the argument for a loss hyper-parameter past the CLI's bounds (one table,
    `alignkit.loss_bounds.LOSS_BOUNDS`) given to a trainer in Python: a beta <= 0 or a negative weight / coefficient
    trains its term the other way (toward the undesirable answers; rewards pushed away from 0 without bound)."""
    for key, value in values.items():
        if past_bound(key, value):
            raise ValueError(f"{who}: {key}={value} must be {allowed(key)}")


class Registry(dict):
    """name -> loss function, with an error that lists the valid names when a name is unknown."""

    def __init__(self, kind: str, default_metrics: tuple[str, ...] = ()):
        super().__init__()
        self.kind = kind
        self.default_metrics = tuple(default_metrics)
        self.metrics: dict[str, tuple[str, ...]] = {}  # name -> the metric names of its LossOutput

    def register(self, name: str, metrics: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
        """Register a function under `name`; `metrics`: the names of the metrics it returns (default: the
        registry's `default_metrics`)."""
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name].__module__} and "
                                 f"{fn.__module__}); choose another name")
            self[name] = fn
            self.metrics[name] = self.default_metrics if metrics is None else tuple(metrics)
            return fn

        return deco

    def __getitem__(self, name: str) -> Callable:
        try:
            return super().__getitem__(name)
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {sorted(self)}") from None

    def describe(self) -> Iterator[tuple[str, str]]:
        """(name, first line of the docstring) for each entry, sorted by name."""
        for name in sorted(self):
            doc = (super().__getitem__(name).__doc__ or "").strip().splitlines()
            yield name, (doc[0] if doc else "")


# the metrics every pairwise preference loss returns (TRL's names), beside its own extras
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")
# an unpaired loss's metrics: sums and counts per side (a trainer logs sum / count: rewards/chosen, ...) and the KL
UNPAIRED_METRICS = ("rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum",
                    "count/chosen", "count/rejected", "kl")

SFT_LOSSES = Registry("SFT loss")
REWARD_LOSSES = Registry("reward loss")
PREFERENCE_LOSSES = Registry("preference loss", default_metrics=PAIR_METRICS)
UNPAIRED_LOSSES = Registry("unpaired preference loss", default_metrics=UNPAIRED_METRICS)
POLICY_LOSSES = Registry("policy loss")
ADVANTAGES = Registry("advantage estimator")
KL_ESTIMATORS = Registry("KL estimator")

REGISTRIES: dict[str, Registry] = {
    "sft": SFT_LOSSES,
    "reward": REWARD_LOSSES,
    "preference": PREFERENCE_LOSSES,
    "unpaired": UNPAIRED_LOSSES,
    "policy": POLICY_LOSSES,
    "advantage": ADVANTAGES,
    "kl": KL_ESTIMATORS,
}

