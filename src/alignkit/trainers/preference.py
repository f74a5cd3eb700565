"""Offline pairwise preference optimisation: the DPO family, SimPO, ORPO, SLiC (any `PREFERENCE_LOSSES` name).

Batches come from `alignkit.data.PreferenceCollator`: 2B rows, chosen completions of the B pairs first,
then their rejected completions, so chosen and rejected go through ONE forward pass:

    logps, lengths = completion_logps(policy, batch)          # (2B,), (2B,)
    pi_w, pi_l = logps[:B], logps[B:]
    ref = reference.logps(policy, batch)                      # (2B,): adapter off / frozen copy / precomputed; None
    losses = preference_loss(pair_batch(logps, lengths, ref), params, loss_type, weights)

Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected, logits/chosen, logits/rejected (the logits' mean over the vocabulary and the
completion tokens), plus loss/<name> for combinations). Reduction: the mean over pairs of
w * loss, normalised over the optimizer step (`alignkit.trainers.base`). Dropout is switched off by
default (TRL's `disable_dropout`), so the policy and its reference see the same network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from alignkit.losses import (CHOSEN_NLL_LOSSES, PREFERENCE_LOSSES, LossOutput, PreferenceParams, check_loss_weights,
                             preference_loss, resolve_params)
from alignkit.trainers.base import AlignTrainer, completion_tokens, packed_collator, shared_prompt_collator
from alignkit.trainers.logps import completion_logps
from alignkit.trainers.packing import check_layout, resolve_padding_free, resolve_share_prompt
from alignkit.trainers.pairs import pair_batch
from alignkit.settings.sections import (REFERENCE_FREE, PreferenceObjective, loss_names, reference_free,
                                        refuse_unread_loss_params)
from alignkit.trainers.ref_sync import SyncsReference, as_ref_sync, check_ref_sync
from alignkit.trainers.reference import HasReference, Reference, build_reference


class PreferenceTrainer(HasReference, SyncsReference, AlignTrainer):
    """DPO-family trainer for any adapter kind.

    Args:
        loss_type: a `PREFERENCE_LOSSES` name ("sigmoid" = DPO, "ipo", "simpo", "orpo", ...) or a list of them.
        loss_weights: one weight per loss type (default 1 each).
        params: `PreferenceParams` (beta, label_smoothing, ...); `beta` alone is a shortcut.
        reference: "auto" | "adapter_off" | "copy" | "precomputed" | "none" (`alignkit.trainers.reference`).
        ref_model: the frozen reference to use ("auto" then means "copy"; default: a copy of the model at construction).
        reference_cache_dir: where precomputed reference log-probs are cached (implies "precomputed").
        padding_free: pack the 2B sequences of each batch into one row without padding (`PackedPreferenceCollator`;
            masking in `alignkit.trainers.logps`). Same losses as padded batches up to float rounding. None (default):
            on CPU runs where it is faster (sdpa through `alignkit.models.varlen`, no activation checkpointing,
            alignkit's PreferenceCollator or none, share_prompt off; `alignkit.trainers.packing`), off elsewhere.
        share_prompt: run each pair as ONE row, the chosen sequence then the rejected one without their common
            prefix (the prompt), with a mask that hides the chosen tokens from the rejected ones
            (`alignkit.data.collators.shared_prompt_layout`): the prompt goes through the model once instead of
            twice. Same log-probs and losses as padded batches up to float rounding; sdpa / eager attention,
            no ReFT, not with padding_free. None (default): on CPU runs where the shared rows run as one varlen row
            (sdpa, no activation checkpointing, no ReFT, alignkit's right-padded PreferenceCollator or none;
            `alignkit.trainers.packing.resolve_share_prompt`).
        group_by_length: batches of similar lengths (`alignkit.data.batching.LengthGroupedSampler`).
        ref_sync: TR-DPO reference syncing, {"alpha": a, "steps": tau} (`alignkit.trainers.ref_sync`): every tau
            optimizer steps the reference copy becomes a * policy + (1 - a) * reference. Full finetuning only.
    """

    rows_per_example = 2

    record_kinds = ("preference",)
    unweighted_metrics = ("logits/chosen", "logits/rejected")  # one value per completion token
    trl_learning_rate = ("DPOConfig", 1e-6)

    def __init__(self, model: nn.Module, args: Any, *, loss_type: str | Sequence[str] = "sigmoid",
                 loss_weights: Sequence[float] | None = None, beta: float = 0.1,
                 params: PreferenceParams | None = None, reference: str = "auto", ref_model: nn.Module | None = None,
                 reference_cache_dir: str | None = None, chunk_size: int = 1024, disable_dropout: bool = True,
                 padding_free: bool | None = None, share_prompt: bool | None = None,
                 ref_sync: Any = None, **kwargs: Any) -> None:
        check_layout(model, share_prompt, padding_free, reward_model=False)
        share_prompt = resolve_share_prompt(share_prompt, padding_free, model, args, kwargs.get("data_collator"))
        if padding_free is None:
            padding_free = not share_prompt and resolve_padding_free(None, model, args, kwargs.get("data_collator"),
                                                                     paired=True)
        self.padding_free, self.share_prompt = padding_free, share_prompt
        if padding_free:
            kwargs["data_collator"] = packed_collator(kwargs.get("data_collator"), model, paired=True,
                                                      checkpointing=bool(args.activation_checkpointing))
        names = loss_names(loss_type)
        for name in names:
            PREFERENCE_LOSSES[name]  # unknown names fail here, listing the valid ones
        check_loss_weights(names, loss_weights, type(self).__name__)  # before the first step, not at it
        self.loss_type, self.loss_weights, self.chunk_size = names, loss_weights, chunk_size
        self.params = resolve_params(params, beta, type(self).__name__)
        # a loss parameter no loss of loss_type reads (label_smoothing with hinge, orpo_lambda with sigmoid, ...)
        refuse_unread_loss_params(names, dataclasses.asdict(self.params), where="params.",
                                  who=f"{type(self).__name__}: ")
        self.reference: Reference = build_reference(model, reference, ref_model=ref_model, owner=type(self).__name__,
                                                    reference_free=reference_free(names),
                                                    cache_dir=reference_cache_dir, chunk_size=chunk_size)
        ref_sync = as_ref_sync(ref_sync)
        check_ref_sync(ref_sync, self.reference.mode, model, ref_model, type(self).__name__)
        super().__init__(model, args, disable_dropout=disable_dropout, **kwargs)
        if share_prompt:
            self.data_collator = shared_prompt_collator(self.data_collator)
        self.reference.place(self.args.device, self.accelerator, disable_dropout=disable_dropout)
        self.setup_ref_sync(ref_sync)
        self._precompute()

    def _precompute(self) -> None:
        """"precomputed": the datasets get their cached reference log-probs and the collator passes them on."""
        common = dict(tokenizer=self.processing_class, batch_size=self.args.per_device_eval_batch_size,
                      device=self.args.device, paired=True)
        collator, ref = self.data_collator, self.reference
        self.train_dataset = ref.cached_dataset(self.model, self.train_dataset, collator, "train", **common)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: ref.cached_dataset(self.model, ds, collator, f"eval_{name}", **common)
                                 for name, ds in self.eval_dataset.items()}
        else:
            self.eval_dataset = ref.cached_dataset(self.model, self.eval_dataset, collator, "eval", **common)
        self.data_collator = ref.collator(collator)

    def objective_settings(self) -> dict[str, Any]:
        return {"loss_type": self.loss_type}

    def training_settings(self) -> dict[str, Any]:
        params = {k: v for k, v in dataclasses.asdict(self.params).items() if k != "bco_delta"}  # bco_delta: state
        return {**super().training_settings(), "loss_type": list(self.loss_type), "loss_weights":
                None if self.loss_weights is None else list(self.loss_weights), **params}

    @classmethod
    def loss_scale(cls, loss_type: str | Sequence[str] = "sigmoid", **_: Any) -> str | None:
        """method.beta, except for losses that do not read it (orpo, slic, sft: method.beta is refused there)."""
        return PreferenceObjective.beta_scale(loss_type)

    @classmethod
    def objective_metrics(cls, loss_type: str | Sequence[str] = "sigmoid", **_: Any) -> tuple[str, ...]:
        """Each loss's metrics (the first loss's value wins a shared name), `loss/<name>` per loss of a
        combination, and the logits' means."""
        names = loss_names(loss_type)
        own = [m for name in names for m in PREFERENCE_LOSSES.metrics[name]]
        parts = [f"loss/{name}" for name in names] if len(names) > 1 else []
        return tuple(dict.fromkeys([*own, *parts, "logits/chosen", "logits/rejected"]))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """The step's N (the base class's), and for a loss with a chosen-NLL term (sft, orpo, cpo) the step's N / T:
        T the chosen completion tokens of every micro-batch and process, counted as N counts pairs (sum_i |y_w,i|,
        or sum_i w_i |y_w,i| under "weighted"), so that the NLL term is the step's token mean (each micro-batch's
        own N / T made it the mean of the micro-batches' token means: batch 4 x 1 differed from 2 x 2)."""
        n = super()._get_num_items_in_batch(batch_samples, device)
        self._nll_step_scale = None
        if n is None or not CHOSEN_NLL_LOSSES & set(self.loss_type):
            return n
        t = sum(self._chosen_tokens(b).to(device) for b in batch_samples)
        if self.args.world_size > 1:
            t = self.accelerator.gather(t.reshape(1)).sum()
        self._nll_step_scale = n.float() / t.float().clamp(min=torch.finfo(torch.float32).tiny)
        return n

    def _chosen_tokens(self, batch: dict[str, Any]) -> Tensor:
        """T of one micro-batch: its chosen completions' tokens (at least 1 each, as `PreferenceBatch.lengths`)."""
        rows = completion_tokens(batch)
        lw = rows[:rows.shape[0] // 2].clamp(min=1.0)
        w = batch.get("weight")
        if self.weight_normalization == "weighted" and w is not None:
            lw = lw * w.to(lw.device, lw.dtype)
        return lw.sum()

    def evaluation_loop(self, dataloader: Any, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's, with a chosen-NLL term's N / T counted over the whole evaluation set first
        (`eval_nll_scale`): each evaluation batch's own N / T made eval_loss and nll_loss depend on
        per_device_eval_batch_size (the mean of the batches' token means, not the set's token mean)."""
        self._eval_nll_scale = self.eval_nll_scale(dataloader) if CHOSEN_NLL_LOSSES & set(self.loss_type) else None
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self._eval_nll_scale = None

    def eval_nll_scale(self, dataloader: Any) -> Tensor:
        """N / T of a whole evaluation set (every batch of `dataloader` and every process), counted as a training
        step counts them (`_get_num_items_in_batch`): collation only, no model call."""
        dev = self.args.device
        n = t = torch.zeros((), dtype=torch.float64, device=dev)
        for batch in dataloader:
            n = n + self.count_items(batch).to(dev, torch.float64)
            t = t + self._chosen_tokens(batch).to(dev, torch.float64)
        if self.args.world_size > 1:
            n, t = self.accelerator.reduce(torch.stack([n, t]), reduction="sum").unbind()
        return (n / t.clamp(min=torch.finfo(torch.float32).tiny)).float()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        # the step's N / T for a training micro-batch of the step counted; in an evaluation the whole set's
        # (`evaluation_loop`); a direct call: None, this batch's own
        self._nll_scale_now = getattr(self, "_nll_step_scale", None) if num_items_in_batch is not None else \
            getattr(self, "_eval_nll_scale", None)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._nll_scale_now = None

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        stats: dict = {}
        logps, lengths = completion_logps(model, inputs, self.chunk_size, stats)  # (2B,), (2B,)
        B = logps.shape[0] // 2
        ref = self.reference.logps(self.accelerator.unwrap_model(model), inputs)  # (2B,) or None (reference-free)
        w = inputs.get("weight")
        pairs = pair_batch(logps, lengths, ref, None if w is None else w.to(logps.device, logps.dtype),
                           self.weight_normalization)
        pairs.nll_step_scale = getattr(self, "_nll_scale_now", None)
        out = preference_loss(pairs, self.params, self.loss_type, self.loss_weights)
        chosen = stats["row"] < B  # (N,) tokens of the chosen rows
        out.metrics["logits/chosen"] = stats["mean_logit"][chosen]  # token-weighted means, as TRL's
        out.metrics["logits/rejected"] = stats["mean_logit"][~chosen]
        return out


DPOTrainer = PreferenceTrainer

__all__ = ["DPOTrainer", "PreferenceTrainer", "REFERENCE_FREE"]
