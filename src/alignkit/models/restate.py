"""Shared checks for code that re-states part of a transformers model's forward instead of calling it
(`alignkit.online.fast_step`: the one-token decode step; `alignkit.models.last_layer`: the last decoder layer on the
read positions). Both run only on the classes of a known family's installed modeling module (exact classes, not
names), and only where nothing else watches the calls they replace: a module's own hooks or torch's global ones
(an intervention, a sharding or offload hook, a profiler) would see other calls, or none."""

from __future__ import annotations

import sys
from typing import Any

import torch

# model_type -> the class-name prefix of its modeling module (LlamaDecoderLayer, Qwen2Attention, ...)
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


def family_module(lm: Any) -> Any:
    """The installed `transformers.models.<type>.modeling_<type>` module of `lm`'s family (None: not one of
    FAMILIES, or not imported)."""
    mt = getattr(lm.config, "model_type", None)
    if mt not in FAMILIES:
        return None
    return sys.modules.get(f"transformers.models.{mt}.modeling_{mt}")


def has_hooks(m: torch.nn.Module) -> bool:
    """`m` has a forward / backward (pre-)hook of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks() -> bool:
    """A global module hook is registered (`torch.nn.modules.module.register_module_forward_hook` and kin)."""
    mm = torch.nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or mm._global_backward_pre_hooks)


__all__ = ["FAMILIES", "family_module", "global_hooks", "has_hooks"]
