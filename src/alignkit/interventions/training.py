"""Train a ReFT with `transformers.Trainer`: `ReftTrainer`.

The base model is frozen; only the interventions train. The subclass changes four things and nothing else:

- `remove_unused_columns` is forced off: the Trainer would otherwise drop `intervention_locations`,
  which the wrapped model's forward takes but the base model's signature does not name.
- saving (`_save`, reached by `save_model` and by every checkpoint) writes only the ReftModel's own
  folder (`ReftModel.save_pretrained`: intervention weights as safetensors + JSON spec) plus the
  tokenizer and `training_args.json`; never the frozen base, never a pickle.
- loading a checkpoint (`resume_from_checkpoint=...`, `load_best_model_at_end`) reads those intervention
  weights back into the live interventions in place, so the optimizer state the Trainer restores next
  lines up with the same parameters.
- activation (gradient) checkpointing is switched on in the base model (non-reentrant, so gradients
  reach interventions hooked inside checkpointed layers even though the base's inputs need no grad).

Loss: the wrapped model's own (causal LM: masked next-token cross-entropy; sequence classifier:
cross-entropy on class ids), reduced by the Trainer; gradient accumulation is the Trainer's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from alignkit.compat import check_trainer

logger = logging.getLogger(__name__)

TRAINING_ARGS_JSON = "training_args.json"


def intervention_state_dict(reft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters of `reft_model` (the interventions), by name."""
    return {n: p for n, p in reft_model.named_parameters() if p.requires_grad}


def _adapter_folders(reft_model: torch.nn.Module, folder: str | Path) -> dict[str, Path]:
    """Where each adapter lives in a checkpoint: the folder itself for one adapter, else `folder/<name>`."""
    names = list(reft_model.adapter_names)
    return {names[0]: Path(folder)} if len(names) == 1 else {n: Path(folder) / n for n in names}


def save_intervention_weights(reft_model: torch.nn.Module, folder: str | Path) -> None:
    """Write every adapter of `reft_model` with `ReftModel.save_pretrained` (layout: `_adapter_folders`)."""
    for name, sub in _adapter_folders(reft_model, folder).items():
        reft_model.save_pretrained(str(sub), adapter_name=name)


def load_intervention_weights(reft_model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the intervention weights saved in `folder` (by `save_intervention_weights`) into the live
    interventions of `reft_model`, in place (the optimizer keeps pointing at the same tensors).
    Every tensor must be present with the right shape (strict load)."""
    from alignkit.interventions.io import CONFIG_NAME, WEIGHTS_NAME

    for name, sub in _adapter_folders(reft_model, folder).items():
        path = sub / WEIGHTS_NAME
        if not path.is_file() or not (sub / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{sub}: no ReFT checkpoint for adapter {name!r} ({WEIGHTS_NAME} + "
                                    f"{CONFIG_NAME}); was it written by ReftTrainer?")
        tensors = load_file(str(path))  # keys "<i>.<parameter>"
        modules = reft_model.interventions[name]
        for i, module in enumerate(modules):
            prefix = f"{i}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path}: intervention {i} of adapter {name!r} does not match the model's "
                                 f"({e})") from None
        extra = {k.split(".", 1)[0] for k in tensors} - {str(i) for i in range(len(modules))}
        if extra:
            raise ValueError(f"{path}: weights for intervention(s) {sorted(extra)} that adapter {name!r} lacks")


def _base_model(reft_model: torch.nn.Module) -> torch.nn.Module:
    for name in ("model", "base_model"):
        base = getattr(reft_model, name, None)
        if isinstance(base, torch.nn.Module):
            return base
    raise AttributeError(f"{type(reft_model).__name__} exposes no base model as .model or .base_model")


class StopAtLoss(TrainerCallback):
    """Stop training once a logged training loss is below `target` (log every step to check every step)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and float(logs["loss"]) < self.target:
            logger.info("loss %.4f < %.4f at step %d: stopping", float(logs["loss"]), self.target, state.global_step)
            control.should_training_stop = True
        return control


class ReftTrainer(Trainer):
    """`transformers.Trainer` for a `ReftModel`: trains and saves only the interventions.

    Use as a Trainer: `ReftTrainer(model=reft_model, args=TrainingArguments(...), train_dataset=...,
    data_collator=...)` with a collator that yields `intervention_locations` (see
    `alignkit.data.reft_data`). `args` is copied, never mutated.
    """

    def __init__(self, model: torch.nn.Module, args: TrainingArguments, **kwargs: Any) -> None:
        check_trainer(type(self))  # the private Trainer methods overridden below must still be the Trainer's
        changes: dict[str, Any] = {}
        if args.remove_unused_columns:
            changes["remove_unused_columns"] = False  # keep intervention_locations
        gc_kwargs = None
        if args.activation_checkpointing:
            gc_kwargs = dict(args.activation_checkpointing_kwargs or {})
            changes["activation_checkpointing"] = False  # we switch it on in the base model ourselves
            changes["gradient_checkpointing"] = False
        if changes:
            args = dataclasses.replace(args, **changes)
        super().__init__(model=model, args=args, **kwargs)
        if gc_kwargs is not None:
            gc_kwargs.setdefault("use_reentrant", False)
            every_n = gc_kwargs.pop("every_n_layers", 1)
            _base_model(self.model).activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs,
                                                                    every_n_layers=every_n)
            logger.info("activation checkpointing on in the base model (%s)", gc_kwargs)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        logger.info("ReFT trainable parameters: %d of %d (%.4f%%)", n_train, n_all, 100.0 * n_train / max(n_all, 1))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_intervention_weights(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        Path(output_dir, TRAINING_ARGS_JSON).write_text(self.args.to_json_string())
        logger.info("saved ReFT interventions to %s", output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("loading ReFT interventions from %s", resume_from_checkpoint)
        load_intervention_weights(model, resume_from_checkpoint)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """As the Trainer's, minus the orthogonal parametrizations' `original` tensors: with
        `use_trivialization=False` their diagonal holds exact signs (read with `.int()`), and weight decay
        shrinking 1.0 to 0.9999 would zero the rotation R."""
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith("parametrizations.weight.original")]

    def _load_best_model(self) -> None:
        logger.info("loading best ReFT interventions from %s (score %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_intervention_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


__all__ = ["ReftTrainer", "StopAtLoss", "intervention_state_dict", "save_intervention_weights", "load_intervention_weights"]
