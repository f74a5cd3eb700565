"""Supervised finetuning: masked next-token NLL on completion tokens, normalised by the step's tokens.

    L = -(1 / N_tokens) * sum_i w_i * sum_{t in completion(i)} log p_theta(y_{i,t} | x_i, y_{i,<t})

N_tokens counts the completion tokens of the whole optimizer step (all micro-batches, all processes);
see `alignkit.trainers.base`. Token log-probs come from `completion_token_logps` (LM head applied only
at completion positions), the loss from the `SFT_LOSSES` registry (default "nll"). Metrics add TRL's
`mean_token_accuracy`: the share of completion tokens that are the argmax of the model's logits.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from alignkit.losses import SFT_LOSSES, LossOutput
from alignkit.trainers.base import AlignTrainer
from alignkit.trainers.data_prep import packed_collator
from alignkit.trainers.logps import completion_token_logps
from alignkit.trainers.packing import resolve_padding_free


class SFTTrainer(AlignTrainer):
    """SFT for any adapter kind. Batches from `alignkit.data.SFTCollator` (input_ids, attention_mask,
    position_ids, completion_mask, weight), or padding-free from `PackedSFTCollator`.

    padding_free: pack each batch's sequences into one row without padding (the collator is swapped for its
        packed version; `alignkit.trainers.logps` explains the masking). Same loss as padded batches up to
        float rounding. None (default): on CPU runs where it is faster (sdpa attention through
        `alignkit.models.varlen`, no activation checkpointing, alignkit's SFTCollator or none given;
        `alignkit.trainers.packing`), off elsewhere.
    group_by_length: batches of similar lengths (`alignkit.data.batching.LengthGroupedSampler`).
    """

    normalizer = "tokens"
    unweighted_metrics = ("mean_token_accuracy",)  # one value per target token, not per example
    trl_learning_rate = ("SFTConfig", 2e-5)

    def __init__(self, model: nn.Module, args: Any, *, loss_type: str = "nll", chunk_size: int = 1024,
                 padding_free: bool | None = None, **kwargs: Any) -> None:
        SFT_LOSSES[loss_type]  # unknown names fail here, listing the valid ones
        padding_free = resolve_padding_free(padding_free, model, args, kwargs.get("data_collator"), paired=False)
        self.loss_type, self.chunk_size, self.padding_free = loss_type, chunk_size, padding_free
        if padding_free:
            kwargs["data_collator"] = packed_collator(kwargs.get("data_collator"), model, paired=False,
                                                      checkpointing=bool(args.activation_checkpointing))
        super().__init__(model, args, **kwargs)

    def objective_settings(self) -> dict[str, Any]:
        return {"loss_type": self.loss_type}

    def training_settings(self) -> dict[str, Any]:
        return {**super().training_settings(), "loss_type": self.loss_type}

    @classmethod
    def objective_metrics(cls, loss_type: str = "nll", **_: Any) -> tuple[str, ...]:
        return SFT_LOSSES.metrics[loss_type] + ("mean_token_accuracy",)

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        stats: dict = {}
        token_logps, mask = completion_token_logps(model, inputs, self.chunk_size, stats)  # (B, T-1) each
        out = SFT_LOSSES[self.loss_type](token_logps, mask)
        out.metrics["mean_token_accuracy"] = stats["correct"].float()  # (N,): averaged over tokens, as TRL's
        return out


__all__ = ["SFTTrainer"]
