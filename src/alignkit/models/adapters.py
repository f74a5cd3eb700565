"""The adapter API under its earlier import path; it lives in `alignkit.adapters` (one object per kind)."""

from __future__ import annotations

from alignkit.adapters.api import (adapter_kind, apply_adapter, can_switch_off, enable_gradient_checkpointing,
                                   load_adapter, load_adapter_weights, reference_off, reft_settings, save_adapter,
                                   saves_whole_model)
from alignkit.adapters.base import (_PARALLEL_WRAPPERS, adapter_for, adapter_in, adapter_of, is_classifier,  # noqa: F401
                                    trainable_state_dict, unwrap_lm, unwrap_parallel)
from alignkit.adapters.config import (ADAPTER_CONFIG_NAME, KINDS, AdapterConfig, LoraSettings, ReftSettings,  # noqa: F401
                                      read_adapter_config)
from alignkit.adapters.lora import absolute_base_path  # noqa: F401
from alignkit.adapters.reft import HEAD_WEIGHTS_NAME  # noqa: F401

__all__ = ["AdapterConfig", "LoraSettings", "ReftSettings", "KINDS", "adapter_kind", "apply_adapter", "can_switch_off",
           "enable_gradient_checkpointing", "is_classifier", "load_adapter", "load_adapter_weights",
           "read_adapter_config", "reference_off", "reft_settings", "save_adapter", "saves_whole_model",
           "trainable_state_dict", "unwrap_lm"]
