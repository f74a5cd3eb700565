"""Offline pairwise preference optimisation: the DPO family, SimPO, ORPO, SLiC (any `PREFERENCE_LOSSES` name).

Batches come from `alignkit.data.PreferenceCollator`: 2B rows, chosen completions of the B pairs first,
then their rejected completions, so chosen and rejected go through ONE forward pass:

    logps, lengths = completion_logps(policy, batch)          # (2B,), (2B,)
    pi_w, pi_l = logps[:B], logps[B:]
    ref_w, ref_l = reference log-probs (adapter off / frozen copy / precomputed; none if reference-free)
    losses = preference_loss(PreferenceBatch(pi_w, pi_l, ref_w, ref_l, |y_w|, |y_l|), params, loss_type, weights)

Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected, logits/chosen, logits/rejected (the logits' mean over the vocabulary and the
completion tokens), plus loss/<name> for combinations). Reduction: the mean over pairs of
w * loss, normalised over the optimizer step (`alignkit.trainers.base`). Dropout is switched off by
default (TRL's `disable_dropout`), so the policy and its reference see the same network.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from alignkit.distributed import shard_reference
from alignkit.losses import PREFERENCE_LOSSES, LossOutput, PreferenceBatch, PreferenceParams, preference_loss
from alignkit.trainers.base import AlignTrainer, packed_collator, shared_prompt_collator, turn_off_dropout
from alignkit.trainers.logps import completion_logps
from alignkit.trainers.reference import (
    ReferenceCollator, attach_reference, frozen_copy, load_or_compute, reference_logps, resolve_mode,
)

REFERENCE_FREE = frozenset({"simpo", "orpo", "slic", "sft"})


class PreferenceTrainer(AlignTrainer):
    """DPO-family trainer for any adapter kind.

    Args:
        loss_type: a `PREFERENCE_LOSSES` name ("sigmoid" = DPO, "ipo", "simpo", "orpo", ...) or a list of them.
        loss_weights: one weight per loss type (default 1 each).
        params: `PreferenceParams` (beta, label_smoothing, ...); `beta` alone is a shortcut.
        reference: "auto" | "adapter_off" | "copy" | "precomputed" | "none" (`alignkit.trainers.reference`).
        ref_model: the frozen reference for "copy" (default: a copy of the model at construction).
        reference_cache_dir: where precomputed reference log-probs are cached (implies "precomputed").
        padding_free: pack the 2B sequences of each batch into one row without padding (`PackedPreferenceCollator`;
            masking in `alignkit.trainers.logps`). Same losses as padded batches.
        share_prompt: run each pair as ONE row, the chosen sequence then the rejected one without their common
            prefix (the prompt), with a mask that hides the chosen tokens from the rejected ones
            (`alignkit.data.collators.shared_prompt_layout`): the prompt goes through the model once instead of
            twice. Same log-probs and losses as padded batches up to float rounding; sdpa / eager attention,
            no ReFT, not with padding_free.
        group_by_length: batches of similar lengths (`alignkit.data.batching.LengthGroupedSampler`).
    """

    rows_per_example = 2

    record_kinds = ("preference",)
    trl_learning_rate = ("DPOConfig", 1e-6)

    def __init__(self, model: nn.Module, args: Any, *, loss_type: str | Sequence[str] = "sigmoid",
                 loss_weights: Sequence[float] | None = None, beta: float = 0.1,
                 params: PreferenceParams | None = None, reference: str = "auto", ref_model: nn.Module | None = None,
                 reference_cache_dir: str | None = None, chunk_size: int = 1024, disable_dropout: bool = True,
                 padding_free: bool = False, share_prompt: bool = False, **kwargs: Any) -> None:
        if padding_free and share_prompt:
            raise ValueError("share_prompt and padding_free are two different layouts: set one of them")
        self.padding_free, self.share_prompt = padding_free, share_prompt
        if padding_free:
            kwargs["data_collator"] = packed_collator(kwargs.get("data_collator"), model,
                                                      paired=True)
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        for name in names:
            PREFERENCE_LOSSES[name]  # unknown names fail here, listing the valid ones
        self.loss_type, self.loss_weights, self.chunk_size = names, loss_weights, chunk_size
        self.params = params if params is not None else PreferenceParams(beta=beta)
        reference_free = all(n in REFERENCE_FREE for n in names)
        if reference == "auto" and reference_cache_dir is not None and not reference_free:
            reference = "precomputed"
        self.reference_mode = resolve_mode(reference, model, reference_free)
        if self.reference_mode == "copy" and ref_model is None:
            ref_model = frozen_copy(model)
        super().__init__(model, args, disable_dropout=disable_dropout, **kwargs)
        if share_prompt:
            self.data_collator = shared_prompt_collator(self.data_collator)
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            if disable_dropout:
                turn_off_dropout(self.ref_model)

            self.ref_model = shard_reference(self.ref_model, self.accelerator)  # FSDP2: sharded like the policy
        if self.reference_mode == "precomputed":
            self._precompute(reference_cache_dir)

    def _precompute(self, cache_dir: str | None) -> None:
        if cache_dir is None:
            raise ValueError("reference='precomputed' needs reference_cache_dir (a folder for the cached log-probs)")
        common = dict(tokenizer=self.processing_class, batch_size=self.args.per_device_eval_batch_size,
                      device=self.args.device, paired=True, ref_model=self.ref_model, chunk_size=self.chunk_size)
        collator = self.data_collator
        if self.train_dataset is not None:
            tensors, _ = load_or_compute(self.model, self.train_dataset, collator, cache_dir, "train", **common)
            self.train_dataset = attach_reference(self.train_dataset, tensors)
        if isinstance(self.eval_dataset, dict):
            for name, ds in list(self.eval_dataset.items()):
                tensors, _ = load_or_compute(self.model, ds, collator, cache_dir, f"eval_{name}", **common)
                self.eval_dataset[name] = attach_reference(ds, tensors)
        elif self.eval_dataset is not None:
            tensors, _ = load_or_compute(self.model, self.eval_dataset, collator, cache_dir, "eval", **common)
            self.eval_dataset = attach_reference(self.eval_dataset, tensors)
        self.data_collator = ReferenceCollator(collator)

    def reference_pair(self, model: nn.Module, inputs: dict[str, Any]):
        """(ref chosen (B,), ref rejected (B,)) or (None, None) for reference-free losses."""
        if self.reference_mode == "none":
            return None, None
        if self.reference_mode == "precomputed":
            if "reference_chosen_logps" not in inputs:
                raise ValueError("the batch has no reference_chosen_logps: with reference='precomputed' the data "
                                 "collator must be wrapped in ReferenceCollator (the trainer does this itself)")
            return inputs["reference_chosen_logps"], inputs["reference_rejected_logps"]
        ref, _ = reference_logps(self.accelerator.unwrap_model(model), inputs, self.reference_mode, self.ref_model,
                                 self.chunk_size)
        B = ref.shape[0] // 2
        return ref[:B], ref[B:]

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        stats: dict = {}
        logps, lengths = completion_logps(model, inputs, self.chunk_size, stats)  # (2B,), (2B,)
        B = logps.shape[0] // 2
        ref_w, ref_l = self.reference_pair(model, inputs)
        batch = PreferenceBatch(logps[:B], logps[B:], ref_w, ref_l, lengths[:B], lengths[B:])
        out = preference_loss(batch, self.params, self.loss_type, self.loss_weights)
        chosen = stats["row"] < B  # (N,) tokens of the chosen rows
        out.metrics["logits/chosen"] = stats["mean_logit"][chosen]  # token-weighted means, as TRL's
        out.metrics["logits/rejected"] = stats["mean_logit"][~chosen]
        return out


DPOTrainer = PreferenceTrainer

__all__ = ["DPOTrainer", "PreferenceTrainer", "REFERENCE_FREE"]
