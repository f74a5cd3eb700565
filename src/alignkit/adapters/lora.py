"""LoRA / DoRA through peft: the transformers model wrapped in a `PeftModel` (base frozen; for a sequence
classifier peft also trains the head, `modules_to_save`).

A saved folder holds peft's `adapter_config.json` + `adapter_model.safetensors` (its base path made
absolute). peft, a dependency of alignkit, is imported with this module, which the adapter registry imports
(`alignkit.adapters`): an environment without peft cannot import alignkit's adapters or trainers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ContextManager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from alignkit.adapters.base import Adapter, Route, is_classifier, is_reft, register_adapter
from alignkit.adapters.config import AdapterConfig
from alignkit.compat import check_peft_load
from alignkit.interventions.locate import is_peft_model

WEIGHTS_NAME = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME


def absolute_base_path(peft_config: Path) -> None:
    """peft writes `base_model_name_or_path` as the model was loaded; a relative local folder ("runs/x/base")
    only resolves from the directory training ran in, so it is made absolute (hub ids are kept)."""
    if not peft_config.is_file():
        return
    data = json.loads(peft_config.read_text())
    base = data.get("base_model_name_or_path")
    if isinstance(base, str) and base and not Path(base).is_absolute() and Path(base).exists():
        data["base_model_name_or_path"] = str(Path(base).resolve())
        peft_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@register_adapter
class Lora(Adapter):
    """LoRA on the model it is given (in the ReFT+LoRA stack: the model inside the `ReftModel`)."""

    kind = "lora"
    weight_files = (("adapter_config.json", "peft's LoRA config"), (WEIGHTS_NAME, "the LoRA weights"))
    vllm_sync = "lora_request"

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return not is_reft(model) and is_peft_model(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        s = self.config.lora
        task = "SEQ_CLS" if is_classifier(model) else "CAUSAL_LM"
        names = [n for n, _ in model.named_modules() if n]
        for key in s.modules_to_save or []:  # peft wraps the modules whose name ends with it, and says nothing if none
            if not any(n.endswith(key) for n in names):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "layers." not in n})  # outside the layers
                raise ValueError(f"adapter.lora.modules_to_save: {key!r} matches no module of the model, so nothing "
                                 f"would be trained for it; name modules of the model, e.g. {leaves[:8]}")
        if isinstance(s.target_modules, (list, tuple)):  # peft refuses a list none of whose names match, not one
            for key in s.target_modules:  # name of several that matches nothing (it adapts the others, silently)
                if not any(n == key or n.endswith("." + key) for n in names):
                    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                     if isinstance(m, nn.Linear) and n})
                    raise ValueError(f"adapter.lora.target_modules: {key!r} matches no module of the model, so it "
                                     f"would get no LoRA; the model's linear layers are named {leaves[:12]}")
        cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                         use_dora=s.use_dora, modules_to_save=s.modules_to_save, task_type=task)
        wrapped = get_peft_model(model, cfg)
        head = None if task == "SEQ_CLS" else wrapped.get_output_embeddings()
        if head is not None and hasattr(head, "base_layer"):  # trainers.logps applies the head's own weight
            raise ValueError(f"adapter.lora.target_modules: {s.target_modules!r} puts LoRA on the LM head, which "
                             "alignkit's objectives apply as its plain weight (trainers/logps.py), so that LoRA would "
                             "never run and the first step would stop; leave the head out ('all-linear' does), or "
                             "list it in adapter.lora.modules_to_save to train it whole")
        return wrapped

    def off(self, model: nn.Module) -> ContextManager[Any]:
        return model.disable_adapter()

    def route(self, name: str) -> Route:
        return Route(name, self.kind, lora=name)

    def save_weights(self, model: nn.Module, folder: Path, config: AdapterConfig,
                     state_dict: dict[str, torch.Tensor] | None) -> None:
        model.save_pretrained(folder)
        absolute_base_path(folder / "adapter_config.json")

    def load(self, model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        path = folder / WEIGHTS_NAME
        check_peft_load(set_peft_model_state_dict(model, load_file(str(path))), str(path))

    def trained_task(self, folder: Path) -> tuple[str, str] | None:
        """peft's `task_type` in adapter_config.json: SEQ_CLS (a classifier, its head in modules_to_save) or
        CAUSAL_LM, as `wrap` set it from the model it was trained on."""
        path = Path(folder) / "adapter_config.json"
        try:
            task_type = json.loads(path.read_text()).get("task_type")
        except (OSError, ValueError):
            return None
        task = {"SEQ_CLS": "classifier", "CAUSAL_LM": "causal_lm"}.get(str(task_type))
        return None if task is None else (task, f"{path.name} task_type {task_type}")

    def settings_summary(self) -> dict[str, Any]:
        lora = self.config.lora if self.config is not None else None
        return {f"lora.{k}": v for k, v in dataclasses.asdict(lora).items() if v is not None} if lora else {}
