"""pyreft-style entry point: `ReftTrainer`, a thin name over alignkit's one trainer stack.

For users moving over from pyreft: `ReftTrainer(model=get_reft_model(...), args=TrainingArguments(...),
**make_multiple_position_supervised_data_module(...))` trains as pyreft's does, but it IS
`alignkit.trainers.SFTTrainer` (an `AlignTrainer`): the same loss reduction, gradient accumulation, argument
rewrites (`remove_unused_columns` off, non-reentrant activation checkpointing through the adapter), weight
decay rule, non-finite guard, checkpoint save and resume as `alignkit sft` with `adapter.kind: reft`. What it
adds, and nothing else:

- the prompt positions the data used (a `ReftDataCollator`'s spec) are recorded on the model
  (`ReftModel.set_positions`), so the folder it saves is an ordinary adapter folder: `alignkit_adapter.json`
  + `reft_config.json` + `interventions.safetensors`, read back by `alignkit.adapters.load_adapter`
  (and `model.adapter_path` in a config), by `load_reft`, and by a reloaded model's plain
  `generate(**inputs)`, which then edits the positions training edited;
- pyreft's batches are accepted: a collator that yields `labels` (-100 off the response) but no
  `completion_mask` gets one (labels != -100, `positions.completion_mask_from_labels`, which
  `ReftModel.forward(labels=...)` uses too);
- a ReFT on a sequence classifier (batches with one class id per row) trains on per-example cross-entropy
  of the class logits; the normaliser is then examples, not tokens.

New code should use `alignkit.trainers.SFTTrainer` with `alignkit.adapters.apply_adapter` directly
(what `alignkit demo --reft` does). Removed with the second stack it replaced (migration): the helpers
`intervention_state_dict` (use `alignkit.adapters.trainable_state_dict`), `save_intervention_weights`
(`save_adapter`) and `load_intervention_weights` (`load_adapter_weights`, or `io.read_reft_weights`);
a checkpoint of a model holding several ReFT adapters is refused (save each with `save_pretrained`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import TrainerCallback

from alignkit.adapters import is_classifier, unwrap_parallel
from alignkit.interventions.positions import completion_mask_from_labels, prompt_spans_from_labels
from alignkit.losses import LossOutput
from alignkit.trainers.sft import SFTTrainer

logger = logging.getLogger(__name__)


class StopAtLoss(TrainerCallback):
    """Stop training once a logged training loss is below `target` (log every step to check every step)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and float(logs["loss"]) < self.target:
            logger.info("loss %.4g < %.4g at step %d: stopping", float(logs["loss"]), self.target, state.global_step)
            control.should_training_stop = True
        return control


class _CompletionMaskFromLabels:
    """Collator wrapper: a pyreft batch (labels, -100 off the response) also gets `completion_mask`; a row whose
    first attended token is already a target (labels = input_ids: no -100 on a prompt) trained with no position at
    all, silently: ValueError naming the row (`prompt_spans_from_labels`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list) -> Any:
        batch = self.inner(features)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is not None and labels.dim() == 2 and batch.get("completion_mask") is None:
            mask = batch.get("attention_mask")
            if mask is not None:  # a row labelled from its first token has no prompt to place positions on
                prompt_spans_from_labels(mask, labels)
            batch["completion_mask"] = completion_mask_from_labels(labels)  # (B, T): labels != -100
        return batch


def record_positions(model: nn.Module, collator: Any) -> None:
    """Give a one-adapter ReftModel without a position spec the spec its data uses (a `ReftDataCollator`'s
    `positions` / `share_weights`), so that what is saved says what was trained. A model that has a spec
    must agree with the collator's."""
    reft = unwrap_parallel(model)
    spec = getattr(collator, "positions", None)
    if spec is None or not hasattr(reft, "set_positions") or len(reft.adapter_names) != 1:
        return
    name = reft.adapter_names[0]
    have = reft.adapter_configs[name]
    want = (str(spec), bool(getattr(collator, "share_weights", True)))
    if have.positions is None:
        reft.set_positions(name, *want)
        logger.info("ReFT adapter %r: positions %s (share_weights=%s) from the data collator", name, *want)
    elif (have.positions, have.share_weights) != want:
        raise ValueError(f"the ReftModel's positions ({have.positions!r}, share_weights={have.share_weights}) and the "
                         f"data collator's ({want[0]!r}, share_weights={want[1]}) disagree; build both with one spec")


class ReftTrainer(SFTTrainer):
    """`SFTTrainer` under pyreft's name (see the module docstring): `ReftTrainer(model=reft_model,
    args=TrainingArguments(...), train_dataset=..., data_collator=...)`. `args` is copied, never mutated."""

    def __init__(self, model: nn.Module, args: Any, **kwargs: Any) -> None:
        record_positions(model, kwargs.get("data_collator"))
        if kwargs.get("data_collator") is not None:
            kwargs["data_collator"] = _CompletionMaskFromLabels(kwargs["data_collator"])
        if is_classifier(model):
            self.normalizer = "examples"  # one class id per row
        super().__init__(model, args, **kwargs)

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        if not is_classifier(model):
            return super().objective(model, inputs)
        kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "intervention_locations") if k in inputs}
        logits = model(**kw).logits  # (B, C)
        losses = nn.functional.cross_entropy(logits.float(), inputs["labels"].to(logits.device), reduction="none")
        accuracy = (logits.argmax(-1) == inputs["labels"].to(logits.device)).float()  # (B,)
        return LossOutput(losses, {"accuracy": accuracy.detach()})


__all__ = ["ReftTrainer", "StopAtLoss", "record_positions"]


def __getattr__(name: str) -> Any:  # the removed helpers: one clear line each
    moved = {"intervention_state_dict": "alignkit.adapters.trainable_state_dict",
             "save_intervention_weights": "alignkit.adapters.save_adapter",
             "load_intervention_weights": "alignkit.adapters.load_adapter_weights"}
    if name in moved:
        raise AttributeError(f"alignkit.interventions.training.{name} was removed with the ReFT-only training stack; "
                             f"use {moved[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

