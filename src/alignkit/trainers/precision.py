"""Trainable weights stored in bf16 / fp16: the optimizer's updates round away.

Mixed precision (`train.bf16`) keeps fp32 weights and computes in bf16. Loading a model in bf16
(`model.dtype: bfloat16`) and training it makes the weights themselves bf16: an update smaller than half the spacing
of bf16 numbers around a weight (|w| * 2^-8; fp16: 2^-11) rounds to no change. An Adam step moves a weight by about
the learning rate, so at lr = 1e-5 every weight above ~0.0026 in magnitude does not move at all, and the loss stays
flat without an error. `low_precision_report` measures, before training, the share of trainable elements an update
of size `lr` cannot move; the trainers log it as a warning naming the fix (fp32 weights + `train.bf16`).
float16 weights with torch's AdamW are refused before anything is written (`refuse_float16_adam`): the optimizer's
state is float16 too, squared gradients underflow to 0 and the updates blow up (nan within a few steps).
`weight_dtypes` is the model card's record of the weights' dtypes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignkit.settings.typed import ConfigError

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


# torch's AdamW by the names the offline (TrainingArguments.optim) and online (OnlineConfig.optimizer) trainers use
TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw", "adamw_fused")


def refuse_float16_adam(model: nn.Module, optim: str, where: str = "train.optim", mixed: bool = True) -> None:
    """A ConfigError when trainable float16 weights meet torch's AdamW (`optim`): its state takes the weights' dtype,
    and grad^2 underflows to 0 in float16 for every gradient under ~2.4e-4 (2^-24 is float16's smallest number), so
    the next update divides by eps alone (the fused kernel) or by 0 (the per-tensor loop: -inf). The sft-tiny example
    with model.dtype=float16 went 6.06, 6.02, 6.14, 49.1, then nan at step 5, after the run folder was written.
    `mixed`: the run can compute in mixed precision (offline: train.fp16 / train.bf16; the online loop cannot)."""
    optim = str(getattr(optim, "value", optim))
    if optim not in TORCH_ADAMW:
        return
    n = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dtype == torch.float16)
    if n:
        raise ConfigError(f"model.dtype: {n:,} trainable weights would be float16 with {where}={optim}, whose state "
                          "is float16 too: the squared gradient underflows to 0 for gradients under ~2.4e-4 and their "
                          "updates blow up (nan within a few steps); load the model in float32 (model.dtype=float32)"
                          + (" and use mixed precision (train.fp16 / train.bf16: fp32 weights and optimizer state)"
                             if mixed else "") + ", or in bfloat16 (model.dtype=bfloat16)")


def weight_dtypes(model: nn.Module) -> dict[str, str]:
    """The model card's record of what the weights really were during training: `{"trainable weights": "float32",
    "frozen weights": "bfloat16"}` (several dtypes joined, e.g. a LoReFT on a bf16 base: its rotation stays float32;
    no entry for a kind with none). `train.bf16` and the card's `mixed precision` say how the forward computed, not
    the weights' dtype, which `model.dtype` sets (a LoRA on a bf16 base trains float32 weights: peft upcasts them)."""
    found: dict[str, set[str]] = {"trainable weights": set(), "frozen weights": set()}
    for p in model.parameters():
        found["trainable weights" if p.requires_grad else "frozen weights"].add(str(p.dtype).removeprefix("torch."))
    return {k: ", ".join(sorted(v)) for k, v in found.items() if v}


__all__ = ["TORCH_ADAMW", "low_precision_report", "refuse_float16_adam", "warn_low_precision", "weight_dtypes"]
