"""The functions callers use: each asks the adapter object (`alignkit.adapters.base`) of the config or model.

    model = apply_adapter(load_model(path), AdapterConfig(kind="reft+lora", lora=LoraSettings(r=8),
                                                          reft=ReftSettings(config={...}, positions="f1+l1")))
    with reference_off(model):        # the same model with its adapter switched off (a DPO reference)
        ...
    save_adapter(model, "out/")        # only what trains: peft files and/or ReFT safetensors + json
    model = load_adapter(load_model(path), "out/")

Every module of this package other than base/config/api is an adapter kind, imported here so that it
registers itself: adding a kind is adding its file (and its row to `config.KINDS`).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

import alignkit.adapters as _package
from alignkit.adapters.base import (ADAPTERS, Adapter, adapter_for, adapter_in, adapter_of, base_fingerprint,
                                    recorded_base, unwrap_lm, unwrap_parallel)
from alignkit.adapters.base import check_base as check_saved_base
from alignkit.adapters.config import AdapterConfig, ReftSettings, read_adapter_config

logger = logging.getLogger(__name__)

for _info in pkgutil.iter_modules(_package.__path__):
    if _info.name not in ("api", "base", "config"):
        importlib.import_module(f"{_package.__name__}.{_info.name}")


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap a transformers model as `cfg` says; returns the model to train.

    full: the model itself (all parameters trainable). lora: a `PeftModel`. reft: a `ReftModel` (base
    frozen; a sequence classifier's head stays trainable). reft+lora: `ReftModel(PeftModel(model))`.
    Dtypes are left as they are.
    """
    cfg.check()  # settings its kind would ignore: the CLI's check, so the same line
    adapter = adapter_for(cfg)
    base = None if adapter.saves_whole_model else base_fingerprint(model)  # before training can change it
    out = adapter.record(adapter.wrap(model), adapter.config, base)
    n_train = sum(p.numel() for p in out.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in out.parameters())
    logger.info("adapter %s: %d trainable of %d parameters (%.4f%%)", adapter.kind, n_train, n_all,
                100.0 * n_train / max(n_all, 1))
    return out


def reference_off(model: nn.Module) -> ContextManager[Any]:
    """Inside this block `model` computes as its base model (adapter switched off): a DPO reference
    without a second copy. LoRA: peft's `disable_adapter()`; ReFT: `disable_adapters()`; both for
    reft+lora. Full finetuning has no adapter to switch off (ValueError): keep a frozen copy instead."""
    model = unwrap_parallel(model)
    return adapter_of(model).off(model)


def kept_when_off(model: nn.Module) -> list[str]:
    """The modules `reference_off(model)` leaves as trained ([] when it gives the base model exactly): a ReFT's own
    `modules_to_save` (e.g. lm_head), trained in place."""
    return adapter_of(unwrap_parallel(model)).kept_when_off()


def adapter_kind(model: nn.Module) -> str:
    """"full", "lora", "reft" or "reft+lora", from the wrappers around the transformers model (a name to
    log or record; to act on it, ask `adapter_of(model)`)."""
    return adapter_of(model).kind


def can_switch_off(model: nn.Module) -> bool:
    """Whether `reference_off(model)` gives the base model (a reference without a second copy)."""
    return adapter_of(model).can_switch_off


def saves_whole_model(model: nn.Module) -> bool:
    """Whether the trainable state is the whole transformers model (full finetuning): its checkpoints are
    the Trainer's own; an adapter's are `save_adapter` folders."""
    return adapter_of(model).saves_whole_model


def reft_settings(model: nn.Module) -> ReftSettings | None:
    """The ReFT position settings `apply_adapter` / `load_adapter` recorded on a model (None: no ReFT part)."""
    cfg = adapter_of(model).config
    return cfg.reft if cfg is not None and "reft" in cfg.parts else None


def save_adapter(model: nn.Module, folder: str | Path, tokenizer: Any = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save only the trainable state of `model` to `folder` (each kind's files + `alignkit_adapter.json`): the
    folder `load_adapter` reads back. `state_dict`: full finetuning only, the (gathered) weights to write."""
    return adapter_of(model).save(model, folder, tokenizer, state_dict)


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False, check_base: bool = True) -> nn.Module:
    """Wrap the base transformers `model` with the adapter saved in `folder` (by `save_adapter`).

    `check_base`: refuse (ValueError), before loading, a base that is not the one the adapter was trained on
    (`alignkit_base.json`: shapes and an embedding probe); an adapter on another base with the same shapes would
    otherwise load without a word and compute something else. A folder missing one of the kind's files
    (`Adapter.weight_files`): FileNotFoundError naming it. Full finetuning folders are complete models: load them
    with `load_model`."""
    adapter = adapter_in(folder)
    adapter.require_files(folder)
    if check_base:  # before loading: a base of another shape fails inside peft / ReFT with their own errors
        check_saved_base(model, folder)
    base_ids = {id(p) for p in model.parameters()}
    base = base_fingerprint(model)  # re-saved (a resumed or continued run), the folder still names this base
    loaded = adapter.record(adapter.load(model, Path(folder), trainable), adapter.config, base)
    check_finite([(n, p) for n, p in loaded.named_parameters() if id(p) not in base_ids], folder)
    return loaded


def check_finite(named: list[tuple[str, torch.Tensor]], folder: str | Path) -> None:
    """ValueError naming the first of `named` (the weights an adapter folder gave) holding a NaN or an infinity:
    every output through it would be NaN, and eval / generate would report NaN metrics or emit garbage."""
    for name, p in named:
        bad = int((~torch.isfinite(p.detach())).sum())
        if bad:
            raise ValueError(f"{folder}: adapter weight {name!r} holds {bad} non-finite value(s) (NaN or inf), so "
                             "every output through it would be NaN; load a checkpoint saved before the values "
                             "diverged, or train the adapter again")


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy the weights saved in `folder` into an already wrapped `model`, in place (checkpoint resume:
    the optimizer state then lines up with the same parameters). A folder lacking one of its kind's files, or saved
    from a run on another base than the one `model` was built on (`check_base`), is refused first."""
    folder = Path(folder)
    check_adapter_weights(model, folder).load_weights(unwrap_parallel(model), folder)


def check_adapter_weights(model: nn.Module, folder: str | Path) -> Adapter:
    """What `load_adapter_weights` checks before copying anything, returning the folder's adapter: the same kind as
    `model`'s (ValueError), the kind's files (FileNotFoundError), and, for the kinds on a frozen base, the base it was
    trained on (`alignkit_base.json`) against the one `model` was built on (ValueError). Callable before a run writes
    anything (a resume of a checkpoint trained on another base was refused only once the Trainer loaded it)."""
    folder = Path(folder)
    adapter, cfg = adapter_of(model), read_adapter_config(folder)
    if cfg.kind != adapter.kind:
        raise ValueError(f"{folder}: holds a {cfg.kind!r} adapter but the model is {adapter.kind!r}")
    saved = adapter_for(cfg)
    saved.require_files(folder)
    if not saved.saves_whole_model:  # a checkpoint of a run on another base would resume without a word
        check_saved_base(model, folder, found=recorded_base(model),
                         off="start a new run from its weights (model.path=<that base>, model.adapter_path=<it>)")
    return saved


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict | None = None) -> None:
    """Activation checkpointing in the transformers model, non-reentrant by default (reentrant
    checkpointing would cut the gradients of adapters whose base inputs need no grad; if asked for,
    input embeddings are made to require grad). Turns the KV cache off."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    every_n = kwargs.pop("every_n_layers", 1)
    lm = unwrap_lm(model)
    if kwargs["use_reentrant"] and adapter_of(model).can_switch_off:  # a frozen base under the adapter
        lm.enable_input_require_grads()
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(lm.config, "use_cache", None):
        lm.config.use_cache = False


__all__ = ["ADAPTERS", "adapter_kind", "apply_adapter", "can_switch_off", "check_adapter_weights", "kept_when_off",
           "enable_gradient_checkpointing",
           "load_adapter", "load_adapter_weights", "reference_off", "reft_settings", "save_adapter",
           "saves_whole_model"]
