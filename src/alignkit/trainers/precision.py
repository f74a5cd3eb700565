"""Trainable weights stored in bf16 / fp16: the optimizer's updates round away.

Mixed precision (`train.bf16`) keeps fp32 weights and computes in bf16. Loading a model in bf16
(`model.dtype: bfloat16`) and training it makes the weights themselves bf16: an update smaller than half the spacing
of bf16 numbers around a weight (|w| * 2^-8; fp16: 2^-11) rounds to no change. An Adam step moves a weight by about
the learning rate, so at lr = 1e-5 every weight above ~0.0026 in magnitude does not move at all, and the loss stays
flat without an error. `low_precision_report` measures, before training, the share of trainable elements an update
of size `lr` cannot move; the trainers log it as a warning naming the fix (fp32 weights + `train.bf16`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)
_MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11}  # fraction bits + 1: spacing at |w| is |w| * 2^-bits
_CHUNK = 1 << 22  # elements compared at a time: the float32 copy stays small for a large model's embedding


def low_precision_report(model: nn.Module, lr: float) -> str | None:
    """A sentence when some trainable parameters are bf16 / fp16 (share of elements whose update of size `lr` rounds
    to nothing: |w| * 2^-bits / 2 > lr), else None."""
    total = stuck = 0
    dtypes: set[str] = set()
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad or p.dtype not in _MANTISSA_BITS:
                continue
            dtypes.add(str(p.dtype).replace("torch.", ""))
            # |w| * 2^-bits / 2 > lr  <=>  |w| > lr * 2^(bits+1) (a power of two: exact in float32)
            bound = lr * 2.0 ** (_MANTISSA_BITS[p.dtype] + 1)
            for chunk in p.detach().reshape(-1).split(_CHUNK):
                stuck += int(torch.count_nonzero(chunk.float().abs() > bound))
            total += p.numel()
    if not total:
        return None
    share = f"{stuck / total:.0%}" if stuck == 0 or stuck / total >= 0.005 else "under 1%"
    # most of them stuck: the loss barely moves; fewer: updates smaller than lr (a decaying schedule) round away later
    effect = ("the loss barely moves" if stuck / total >= 0.5 else
              "smaller updates (a learning rate decaying below it, small Adam steps) round away for more")
    return (f"{total:,} trainable weights are stored in {'/'.join(sorted(dtypes))} (model.dtype), so an optimizer "
            f"step of about the learning rate {lr:g} rounds to no change for {share} of them and {effect}; load the "
            f"model in float32 (model.dtype=float32) and compute in bf16 with train.bf16=true (mixed precision: fp32 "
            f"weights)")


def warn_low_precision(model: nn.Module, lr: float) -> str | None:
    """Log `low_precision_report` once as a warning; returns it."""
    text = low_precision_report(model, lr)
    if text is not None:
        logger.warning(text)
    return text


def weight_dtypes(model: nn.Module) -> dict[str, str]:
    """The model card's record of what the weights really were during training: `{"trainable weights": "float32",
    "frozen weights": "bfloat16"}` (several dtypes joined, e.g. a LoReFT on a bf16 base: its rotation stays float32;
    no entry for a kind with none). `train.bf16` and the card's `mixed precision` say how the forward computed, not
    the weights' dtype, which `model.dtype` sets (a LoRA on a bf16 base trains float32 weights: peft upcasts them)."""
    found: dict[str, set[str]] = {"trainable weights": set(), "frozen weights": set()}
    for p in model.parameters():
        found["trainable weights" if p.requires_grad else "frozen weights"].add(str(p.dtype).removeprefix("torch."))
    return {k: ", ".join(sorted(v)) for k, v in found.items() if v}


__all__ = ["low_precision_report", "warn_low_precision", "weight_dtypes"]
