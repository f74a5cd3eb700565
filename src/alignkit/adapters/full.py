"""Full finetuning: every parameter of the transformers model trains; nothing wraps it.

Its trained weights ARE the model, so there is nothing to switch off (a reference is a frozen copy or
precomputed log-probs), a saved folder is a whole model (`save_pretrained`, safetensors) loaded back with
`load_model`, and it is served as its own base, not as an adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from alignkit.adapters.base import Adapter, Route, is_reft, register_adapter
from alignkit.adapters.config import AdapterConfig
from alignkit.interventions.locate import is_peft_model


@register_adapter
class Full(Adapter):
    kind = "full"
    can_switch_off = False
    saves_whole_model = True
    merges = True  # nothing to fold: the model is its own weights
    vllm_sync = "weights"
    weight_files = (("config.json", "the model's transformers config"),)
    # transformers' save_pretrained: one safetensors file, or shards and their index
    other_files = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                   "generation_config.json")

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return not is_reft(model) and not is_peft_model(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def off(self, model: nn.Module) -> ContextManager[nn.Module]:
        raise ValueError("reference_off: a fully finetuned model has no adapter to switch off; use a frozen copy of "
                         "the initial model (PreferenceTrainer(ref_model=...)) or precomputed log-probs")

    def route(self, name: str) -> Route:
        raise ValueError("holds a fully finetuned model, not an adapter; serve it as its own --base")

    def save_weights(self, model: nn.Module, folder: Path, config: AdapterConfig,
                     state_dict: dict[str, torch.Tensor] | None) -> None:
        model.save_pretrained(folder, state_dict=state_dict)

    def load(self, model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
        raise ValueError(f"{folder}: holds a fully finetuned model, not an adapter; load it with "
                         "alignkit.models.loading.load_model")

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Nothing: a fully finetuned model's checkpoints are the Trainer's own (it loads them itself)."""

    def how_to_load(self, folder: str, base: str, classifier: bool, rope_scaling: dict[str, Any] | None = None) -> str:
        # the saved model's config carries the scaling
        task = ', task="classifier", num_labels=1' if classifier else ""
        return (f"from alignkit.models.loading import load_model, load_tokenizer\n"
                f"model = load_model(\"{folder}\"{task})\ntokenizer = load_tokenizer(\"{folder}\")")
