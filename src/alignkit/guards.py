"""Stops a run at the first non-finite loss or gradient, before the optimizer applies it.

A NaN or infinite loss (or gradient norm) means every later step trains on garbage and any weights saved
after it are NaN. The trainers (`alignkit.trainers.AlignTrainer`, `alignkit.online.OnlineTrainer`) check
each micro-batch's loss and each step's gradient norm and raise `NonFiniteError` at once: the optimizer
step is not taken, no model or checkpoint is written after it, and the checkpoints already written stay as
they are. The message names the optimizer step, the records of the batch and the likely causes.

A gradient norm of exactly 0 while the loss is positive is the other result that cannot be right (a model
collapsed to constant logits after a huge learning rate keeps a finite loss, ln(vocab), and would otherwise
be saved as if trained): the first such step logs a warning, `ZERO_GRAD_PATIENCE` in a row raise
`StalledTrainingError`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; the run stopped at `step` (1-based optimizer step)."""

    def __init__(self, what: str, value: float, step: int, record_ids: Sequence[str] | None = None, *,
                 causes: str) -> None:
        self.what, self.value, self.step = what, value, step
        self.record_ids = [str(r) for r in record_ids or [] if str(r)]
        ids = _show_ids(self.record_ids)
        super().__init__(f"{what} is {value} at optimizer step {step}{ids}; the run stopped before this update "
                         f"(no weights written after it; earlier checkpoints are kept). Likely causes: {causes}")


def likely_causes(scale: str | None) -> str:
    """The causes a `NonFiniteError` names; `scale`: the setting(s) that scale the objective's loss, as the trainer's
    `loss_scale` names them (None: no such setting, e.g. SFT, or an ORPO / SLiC preference loss, which refuse
    method.beta). No generic default: a trainer names its own objective's knob, never another's."""
    scaled = f", a loss scale too large ({scale})" if scale else ""
    return (f"a learning rate too high (train.learning_rate){scaled}, extreme data weights or margins in the records "
            "named, or fp16 overflow (use bf16 or fp32); lower the culprit and rerun (or resume from the last "
            "checkpoint)")


class StalledTrainingError(RuntimeError):
    """The gradient norm was exactly 0 for `steps` optimizer steps in a row while the loss stayed positive:
    nothing can learn any more, so the run stops instead of saving a model it cannot have trained."""

    def __init__(self, first: int, last: int, loss: float, scale: str | None = None) -> None:
        self.first, self.last, self.loss = first, last, loss
        lower = f"train.learning_rate (or {scale})" if scale else "train.learning_rate"
        super().__init__(f"the gradient norm has been exactly 0 at optimizer steps {first}-{last} while the loss is "
                         f"{loss:.6g} > 0: the model no longer learns (weights saturated, e.g. by a learning rate far "
                         "too high, or a loss scale so large that the loss saturates); the run stopped before saving "
                         f"(earlier checkpoints are kept). Lower {lower} and rerun")


class RewardStallError(RuntimeError):
    """An online run's feedback gave no signal (`OnlineTrainer.no_signal`: every prompt's samples scored alike, no
    preference pair formed) at `method.stall_steps` steps in a row: the run stops instead of spending its compute
    on updates the reward cannot steer. `first`, `last`: the 1-based steps of that stretch."""

    def __init__(self, first: int, last: int, message: str) -> None:
        self.first, self.last = first, last
        super().__init__(message)


class NonFiniteLogitsError(ValueError):
    """Generation met NaN / inf next-token logits: a sampled token cannot be drawn, and a greedy one would be the
    first NaN's index (argmax treats NaN as the largest value), i.e. garbage written as an answer."""

    def __init__(self, row: int, how: str) -> None:
        self.row = row
        super().__init__(f"generation: row {row}'s next-token logits are not finite ({how}): the model gives NaN / inf "
                         "logits, so no token it picks means anything; check the model's weights and its training "
                         "loss, or use model.dtype float32 / bfloat16 if it ran in float16 (overflow)")


ZERO_GRAD_PATIENCE = 3  # consecutive optimizer steps with a zero gradient norm and a positive loss


def _show_ids(ids: list[str], limit: int = 8) -> str:
    if not ids:
        return ""
    shown = ", ".join(ids[:limit]) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")
    return f" (batch records: {shown})"


def is_finite(value: Any) -> bool:
    """True for a finite float / 0-d tensor (one device sync for a tensor)."""
    if hasattr(value, "detach"):
        value = value.detach().float()
        return bool(value.isfinite().all())
    return value is None or math.isfinite(float(value))


def as_float(value: Any) -> float:
    return float(value.detach().float().item()) if hasattr(value, "detach") else float(value)


__all__ = ["likely_causes", "NonFiniteError", "NonFiniteLogitsError", "StalledTrainingError", "ZERO_GRAD_PATIENCE",
           "as_float", "is_finite"]
