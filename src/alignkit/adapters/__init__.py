"""How the model is changed, as an object: full finetuning, LoRA/DoRA (peft), ReFT, or ReFT + LoRA together.

| module         | what it holds                                                                          |
|----------------|----------------------------------------------------------------------------------------|
| `config`       | `AdapterConfig` (the `adapter:` section) and `KINDS`, the table of kinds; no torch      |
| `base`         | the `Adapter` protocol, the registry (`ADAPTERS`, `adapter_of/for/in`), unwrapping       |
| `full`, `lora`, `reft`, `reft_lora` | one `Adapter` per kind (`reft_lora` stacks the other two)          |
| `api`          | `apply_adapter`, `reference_off`, `save_adapter`, `load_adapter`, ... (ask the object)  |

Nobody outside this package and `alignkit.interventions` tests which kind an adapter is: they call
`adapter_of(model)` / `adapter_for(config)` / `adapter_in(folder)` and ask the object (a test enforces it).

An adapter folder holds `alignkit_adapter.json` (the `AdapterConfig`), plus
- lora: peft's `adapter_config.json` + `adapter_model.safetensors`;
- reft: `reft_config.json` + `interventions.safetensors` (`alignkit.interventions.io`), and for a
  sequence classifier the trained head in `modules_to_save.safetensors`;
- reft+lora: both (their file names do not collide).
Full finetuning saves the whole transformers model (`save_pretrained`, safetensors).

The config names are importable without torch (`from alignkit.adapters.config import AdapterConfig`, or from
here); everything else is loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from alignkit.adapters.config import (ADAPTER_CONFIG_NAME, KINDS, AdapterConfig, KindInfo, LoraSettings,
                                      ReftSettings, read_adapter_config)

# public name -> submodule that defines it (imported on first access: it imports torch)
_LAZY = {
    **{name: "base" for name in ("Adapter", "BASE_FINGERPRINT_NAME", "Route", "adapter_for", "adapter_in", "adapter_of",
                                 "base_fingerprint", "base_mismatch", "check_base", "record_base", "is_classifier",
                                 "register_adapter", "registry", "trainable_state_dict", "unwrap_lm",
                                 "unwrap_parallel")},
    **{name: "api" for name in ("ADAPTERS", "adapter_kind", "apply_adapter", "can_switch_off", "check_adapter_weights",
                                "enable_gradient_checkpointing", "kept_when_off",
                                "load_adapter", "load_adapter_weights", "reference_off", "reft_settings",
                                "save_adapter", "saves_whole_model")},
    "merge_adapter": "merge",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAPTER_CONFIG_NAME", "AdapterConfig", "KINDS", "KindInfo", "LoraSettings", "ReftSettings",
           "read_adapter_config", *_LAZY]
