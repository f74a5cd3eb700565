"""Speed-ups that change how a model runs, not what it computes: regional `torch.compile` and fused GPU kernels.

- `compile_layers(model)` (`train.compile: true`): `torch.compile` of each decoder layer in place (regional
  compilation). The layers of a decoder share one code path, so one compiled graph serves them all and
  compile time does not grow with depth, unlike compiling the whole model; the embedding, the LM head
  (alignkit applies it in chunks itself) and everything outside the layers stay eager. Works on CPU
  (inductor's C++ backend) and GPU. Adapters are applied first, so LoRA's layers are compiled with the
  layer; ReFT's hooks on a layer's output run within the compiled layer call (dynamo traces them or breaks
  the graph there; either way the losses equal eager's: tests/models/test_efficiency.py, full / LoRA / ReFT).
  The hooks read no per-batch Python int under compile (`interventions/editing.py`), so a new batch's
  locations do not recompile them.
- `apply_kernels(model, "liger")` (`model.kernels: liger`): Liger's Triton kernels (RMSNorm, SwiGLU, RoPE)
  patched into the model instance. Needs the `liger-kernel` package, a CUDA GPU and an architecture Liger covers;
  anything missing is one `ConfigError` naming both the key and what is missing, raised by `check_model_kernels` before
  the model loads (the run, and --dry-run, which loads none) and again by `apply_kernels` on the loaded model. Liger's
  fused linear cross-entropy is not used: alignkit never builds full logits (its LM head runs in chunks at completion
  positions only, recomputed in backward: `losses/logprobs.py`), which is the memory saving that kernel exists for.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.settings.tiny import tiny_arch
from alignkit.settings.typed import ConfigError

logger = logging.getLogger(__name__)

KERNELS = ("liger",)
LIGER_OPTIONS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: the first `nn.ModuleList` of `num_hidden_layers` modules of one class
    (model.model.layers for Llama/Qwen2, transformer.h for GPT-2, gpt_neox.layers, through peft/ReFT wrappers)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n) \
                and len({type(m) for m in module}) == 1:
            return module
    raise ValueError(f"{type(model).__name__}: no stack of decoder layers found to compile (looked for an "
                     f"nn.ModuleList of {n} identical modules)")


def check_compile_options(options: dict[str, Any], where: str = "train.compile") -> None:
    """ConfigError naming `where.<key>` for an option `torch.compile` does not take, or a flag that is not true /
    false (a string such as `fullgraph: "no"` was passed on and read as true)."""
    params = {n: p for n, p in inspect.signature(torch.compile).parameters.items() if p.kind == p.KEYWORD_ONLY}
    for key, value in options.items():
        if key not in params:
            raise ConfigError(f"{where}.{key}: not a torch.compile option; valid: {', '.join(params)} (or "
                              f"{where}: true for its defaults)")
        default = params[key].default
        if isinstance(default, bool) or key == "dynamic":
            if not isinstance(value, bool) and not (key == "dynamic" and value is None):
                raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")


def compile_layers(model: nn.Module, where: str = "train.compile", **compile_kwargs: Any) -> int:
    """`torch.compile` every decoder layer of `model` in place (`nn.Module.compile`). Returns the layer count.

    `compile_kwargs` go to `torch.compile` (e.g. `backend`, `mode`, `dynamic`). Sequence lengths vary from
    batch to batch: torch recompiles once with dynamic shapes after the first change, then reuses the graph.
    Options torch refuses (an unknown backend or mode, mode with options, ...) are one ConfigError naming `where`,
    raised before any layer is compiled."""
    check_compile_options(compile_kwargs, where)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        try:
            layer.compile(**compile_kwargs)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            if i:  # the same options worked on the first layer: not a setting's fault
                raise
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise ConfigError(f"{where}: torch.compile refused {compile_kwargs} ({type(e).__name__}: {first}); "
                              f"fix the options, or set {where}: true for torch.compile's defaults") from None
    logger.info("torch.compile: %d decoder layers (%s) compiled regionally", len(layers), type(layers[0]).__name__)
    return len(layers)


def check_fullgraph(option: Any, padding_free: bool, where: str = "train.compile") -> None:
    """ConfigError when `fullgraph: true` meets padding-free batches: their attention (`alignkit.models.varlen`) reads
    the batch's layout in Python, a graph break that fullgraph turns into dynamo's "Unsupported" error at the first
    step, after the run folder was written. Not lifted: with that break gone (`cached_property`'s lock in
    `VarlenLayout`), the layout's split sizes are Python ints that dynamo specialises on, so each batch of other
    sequence lengths recompiles every layer and fullgraph fails hard at the recompile limit (torch 2.13, tried with
    backend="eager"); a whole graph needs the layout as tensors (cu_seqlens) and a varlen kernel."""
    if isinstance(option, dict) and option.get("fullgraph") is True and padding_free:
        raise ConfigError(f"{where}.fullgraph: true needs one graph per decoder layer, and this run packs its batches "
                          "without padding (train.padding_free, on by default on CPU), whose attention breaks the "
                          f"graph (dynamo would stop at the first step); remove {where}.fullgraph, or set "
                          "train.padding_free: false")


def liger_missing() -> list[str]:
    """What this machine lacks for Liger's kernels: the package, a CUDA GPU (empty: both here)."""
    missing = []
    if importlib.util.find_spec("liger_kernel") is None:
        missing.append("the liger-kernel package (pip install liger-kernel)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (Liger's kernels are Triton GPU kernels)")
    return missing


def liger_model_types() -> frozenset[str]:
    """The model types Liger has kernels for (its `MODEL_TYPE_TO_APPLY_LIGER_FN`); needs liger-kernel."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def check_kernels(kind: str | None, where: str = "model.kernels", model_type: str | None = None) -> None:
    """Raise a `ConfigError` naming `where` and what is missing if kernels `kind` cannot run here: the package, a
    CUDA GPU, and (`model_type` given) kernels for that architecture."""
    if kind is None:
        return
    if kind not in KERNELS:
        raise ConfigError(f"{where}: {kind!r} is not a kernel set alignkit knows; valid: {', '.join(KERNELS)}")
    missing = liger_missing()
    if missing:
        raise ConfigError(f"{where}: liger needs {' and '.join(missing)}, which this machine lacks; remove "
                          f"{where} to train without fused kernels")
    if model_type is not None and model_type not in (types := liger_model_types()):
        raise ConfigError(f"{where}: liger has no kernels for the {model_type} architecture (supported: "
                          f"{', '.join(sorted(types))}); remove {where} to train without fused kernels")


def settings_model_type(path: str) -> str | None:
    """The model_type of the model `path` (a run config's model.path) read without loading it: `tiny:<arch>`'s arch,
    a local folder's config.json; None for a hub id or a folder without a readable one (the load checks it)."""
    arch = tiny_arch(path, "model.path")
    if arch is not None:
        return arch
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_model_kernels(ms: Any, where: str = "model.kernels") -> None:
    """`check_kernels` for a run config's model section (`ms`: model.kernels, model.path), before anything is loaded
    or written: what `apply_kernels` refuses once the model is loaded (the real run) or never reaches (--dry-run)."""
    if getattr(ms, "kernels", None) is not None:
        check_kernels(ms.kernels, where, settings_model_type(ms.path))


def apply_kernels(model: nn.Module, kind: str | None, where: str = "model.kernels") -> nn.Module:
    """Patch fused kernels of `kind` ("liger") into `model` in place; None: unchanged. Returns the model."""
    if kind is None:
        return model
    base = model
    while not hasattr(base, "config") and hasattr(base, "model"):  # ReFT wrapper
        base = base.model
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    check_kernels(kind, where, model_type)
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base, **LIGER_OPTIONS)
    logger.info("liger kernels applied to %s: %s", model_type, ", ".join(k for k, v in LIGER_OPTIONS.items() if v))
    return model


__all__ = ["KERNELS", "apply_kernels", "check_compile_options", "check_fullgraph", "check_kernels",
           "check_model_kernels", "compile_layers", "decoder_layers", "liger_missing", "liger_model_types",
           "settings_model_type"]
