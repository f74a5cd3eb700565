"""ReFT + LoRA as a stack: the transformers model wrapped by peft first, then by a `ReftModel` (its `.model`
is the `PeftModel`; the LoRA layers sit inside the transformers modules, so the backbone called directly
sees them). Every step is the LoRA part's on the inner model, then the ReFT part's on the outer one; a
saved folder holds both parts' files (their names do not collide).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from alignkit.adapters.base import Adapter, Route, is_reft, register_adapter, unwrap_parallel
from alignkit.adapters.config import AdapterConfig
from alignkit.adapters.lora import Lora
from alignkit.adapters.reft import Reft
from alignkit.interventions.attach import requires_grad_restored_on_error
from alignkit.interventions.locate import is_peft_model


@register_adapter
class ReftLora(Adapter):
    kind = "reft+lora"
    weight_files = Lora.weight_files + Reft.weight_files
    other_files = Lora.other_files + Reft.other_files

    def __init__(self, config: AdapterConfig | None = None) -> None:
        super().__init__(config)
        self.lora, self.reft = Lora(config), Reft(config)
        self.reft.trains_head = False  # peft's modules_to_save trains a classifier head here

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return is_reft(model) and is_peft_model(unwrap_parallel(model).model)

    @staticmethod
    def _inner(model: nn.Module) -> nn.Module:
        return unwrap_parallel(model).model  # the PeftModel

    def wrap(self, model: nn.Module) -> nn.Module:
        """LoRA, then ReFT on the PeftModel. A ReFT part refused after the LoRA part changed `model` (peft injects its
        layers into it) is undone: peft's `unload()` puts the model's own modules back, and every parameter gets its
        requires_grad back, so a caller that catches the error keeps its model as it was."""
        with requires_grad_restored_on_error(model):
            wrapped = self.lora.wrap(model)
            try:
                return self.reft.wrap(wrapped)
            except BaseException:
                wrapped.unload()
                raise

    @contextlib.contextmanager
    def off(self, model: nn.Module) -> Iterator[nn.Module]:
        with self.reft.off(model), self.lora.off(self._inner(model)):
            yield model

    def route(self, name: str) -> Route:
        return dataclasses.replace(self.reft.route(name), kind=self.kind, lora=name)

    def save_weights(self, model: nn.Module, folder: Path, config: AdapterConfig,
                     state_dict: dict[str, torch.Tensor] | None) -> None:
        self.lora.save_weights(self._inner(model), folder, config, state_dict)
        self.reft.save_weights(model, folder, config, state_dict)

    def written_files(self, folder: Path, config: AdapterConfig) -> set[str]:
        return self.lora.written_files(folder, config) | self.reft.written_files(folder, config)

    def load(self, model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
        return self.reft.load(self.lora.load(model, folder, trainable), folder, trainable)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        self.lora.load_weights(self._inner(model), folder)
        self.reft.load_weights(model, folder)

    def own_config(self, model: nn.Module) -> AdapterConfig:
        raise ValueError(f"save_adapter: cannot describe this {self.kind} model (it was not built by "
                         "apply_adapter/load_adapter); build it with alignkit.adapters.apply_adapter")

    def trained_task(self, folder: Path) -> tuple[str, str] | None:
        return self.lora.trained_task(folder)  # peft's modules_to_save trains the classifier head here

    def settings_summary(self) -> dict[str, Any]:
        return {**self.lora.settings_summary(), **self.reft.settings_summary()}
