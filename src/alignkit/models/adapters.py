"""How the model is changed: full finetuning, LoRA/DoRA (peft), ReFT, or ReFT + LoRA together.

    model = apply_adapter(load_model(path), AdapterConfig(kind="reft+lora", lora=LoraSettings(r=8),
                                                          reft=ReftSettings(config={...}, positions="f1+l1")))
    with reference_off(model):        # the same model with its adapter switched off (a DPO reference)
        ...
    save_adapter(model, "out/")        # only what trains: peft files and/or ReFT safetensors + json
    model = load_adapter(load_model(path), "out/")

Wrapping order for "reft+lora": the transformers model is wrapped by peft first, then by a
`ReftModel` (its `.model` is the `PeftModel`; the LoRA layers sit inside the transformers modules, so
the backbone called directly sees them). `unwrap_lm(model)` returns the transformers model in all cases.

An adapter folder holds `alignkit_adapter.json` (this file's `AdapterConfig`), plus
- lora: peft's `adapter_config.json` + `adapter_model.safetensors`;
- reft: `reft_config.json` + `interventions.safetensors` (`alignkit.interventions.io`), and for a
  sequence classifier the trained head in `modules_to_save.safetensors`;
- reft+lora: both (their file names do not collide).
Full finetuning saves the whole transformers model (`save_pretrained`, safetensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("full", "lora", "reft", "reft+lora")
ADAPTER_CONFIG_NAME = "alignkit_adapter.json"
HEAD_WEIGHTS_NAME = "modules_to_save.safetensors"


@dataclass
class LoraSettings:
    """peft `LoraConfig` arguments (DoRA with `use_dora`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    modules_to_save: list[str] | None = None  # None: peft's default (the classifier head for SEQ_CLS)


@dataclass
class ReftSettings:
    """A ReFT adapter: `config` is a `ReftConfig` dict; `positions` the prompt positions ("f1+l1")."""

    config: dict[str, Any] = field(default_factory=dict)
    positions: str = "f1+l1"
    share_weights: bool = True
    modules_to_save: list[str] | None = None  # None: the head of a sequence classifier ("score")


@dataclass
class AdapterConfig:
    kind: Literal["full", "lora", "reft", "reft+lora"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    reft: ReftSettings | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is unknown; valid: {list(KINDS)}")
        if isinstance(self.lora, dict):
            self.lora = _from_dict(LoraSettings, self.lora, "adapter.lora")
        if isinstance(self.reft, dict):
            self.reft = _from_dict(ReftSettings, self.reft, "adapter.reft")
        if "reft" in self.kind and (self.reft is None or not self.reft.config):
            raise ValueError(f"adapter kind {self.kind!r} needs adapter.reft.config (a ReftConfig mapping with "
                             "'representations'), e.g. {'representations': [{'layer': 1, 'low_rank_dimension': 4}]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return _from_dict(cls, data, "adapter")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    return cls(**data)


# ----------------------------------------------------------------------------------------------------
# What a wrapped model is
# ----------------------------------------------------------------------------------------------------

_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel / FSDP (v1) / DeepSpeed wrappers (what `accelerate` puts around
    it in `Trainer`); the ReFT and peft wrappers stay."""
    while type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _is_reft(model: nn.Module) -> bool:
    from alignkit.interventions.attach import ReftModel

    return isinstance(unwrap_parallel(model), ReftModel)


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def adapter_kind(model: nn.Module) -> str:
    """"full", "lora", "reft" or "reft+lora", from the wrappers around the transformers model."""
    model = unwrap_parallel(model)
    if _is_reft(model):
        return "reft+lora" if _is_peft(model.model) else "reft"
    return "lora" if _is_peft(model) else "full"


def unwrap_lm(model: nn.Module) -> nn.Module:
    """The transformers model under the ReFT and peft wrappers (and DDP's `.module`)."""
    model = unwrap_parallel(model)
    if _is_reft(model):
        model = model.model
    return model.get_base_model() if _is_peft(model) else model


def is_classifier(model: nn.Module) -> bool:
    return type(unwrap_lm(model)).__name__.endswith("ForSequenceClassification")


def can_switch_off(model: nn.Module) -> bool:
    """Whether `reference_off(model)` gives the base model (a reference without a second copy): every adapter
    but full finetuning, whose trained weights ARE the model."""
    return adapter_kind(model) != "full"


def saves_whole_model(model: nn.Module) -> bool:
    """Whether the trainable state is the whole transformers model (full finetuning): its checkpoints are
    the Trainer's own; an adapter's are `save_adapter` folders."""
    return adapter_kind(model) == "full"


def reft_settings(model: nn.Module) -> ReftSettings | None:
    """The ReFT position settings `apply_adapter`/`load_adapter` recorded on a ReFT model."""
    model = unwrap_parallel(model)
    cfg = getattr(model, "alignkit_adapter_config", None) if _is_reft(model) else None
    return cfg.reft if cfg is not None else None


# ----------------------------------------------------------------------------------------------------
# Applying, switching off, saving, loading
# ----------------------------------------------------------------------------------------------------

def _head_names(model: nn.Module, names: list[str] | None) -> list[str]:
    if names is not None:
        return names
    if not is_classifier(model):
        return []
    lm = unwrap_lm(model)
    return [n for n in ("score", "classifier") if isinstance(getattr(lm, n, None), nn.Module)][:1]


def _apply_lora(model: nn.Module, s: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    task = "SEQ_CLS" if is_classifier(model) else "CAUSAL_LM"
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                     use_dora=s.use_dora, modules_to_save=s.modules_to_save, task_type=task)
    return get_peft_model(model, cfg)


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap a transformers model as `cfg` says; returns the model to train.

    full: the model itself (all parameters trainable). lora: a `PeftModel`. reft: a `ReftModel` (base
    frozen; a sequence classifier's head stays trainable). reft+lora: `ReftModel(PeftModel(model))`.
    Dtypes are left as they are.
    """
    if cfg.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        out = model
    else:
        out = _apply_lora(model, cfg.lora) if "lora" in cfg.kind else model
        if "reft" in cfg.kind:
            from alignkit.data.positions import Positions
            from alignkit.interventions.attach import get_reft_model
            from alignkit.interventions.config import ReftConfig

            Positions.parse(cfg.reft.positions)  # fail early on a bad spec
            heads = _head_names(model, cfg.reft.modules_to_save) if cfg.kind == "reft" else []
            rc = ReftConfig.from_dict(cfg.reft.config, where="adapter.reft.config")
            if rc.positions is not None and (rc.positions, rc.share_weights) != (
                    str(Positions.parse(cfg.reft.positions)), cfg.reft.share_weights):
                raise ValueError(f"adapter.reft.config.positions ({rc.positions!r}, share_weights={rc.share_weights}) "
                                 f"and adapter.reft.positions ({cfg.reft.positions!r}, share_weights="
                                 f"{cfg.reft.share_weights}) disagree; set adapter.reft.positions only")
            rc = dataclasses.replace(rc, positions=cfg.reft.positions, share_weights=cfg.reft.share_weights)
            out = get_reft_model(out, rc)
            lm = unwrap_lm(out)
            for name in heads:
                for p in lm.get_submodule(name).parameters():
                    p.requires_grad_(True)
            if heads:
                cfg = dataclasses.replace(cfg, reft=dataclasses.replace(cfg.reft, modules_to_save=heads))
    out.alignkit_adapter_config = cfg
    n_train = sum(p.numel() for p in out.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in out.parameters())
    logger.info("adapter %s: %d trainable of %d parameters (%.4f%%)", cfg.kind, n_train, n_all,
                100.0 * n_train / max(n_all, 1))
    return out


@contextlib.contextmanager
def reference_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block `model` computes as its base model (adapter switched off): a DPO reference
    without a second copy. LoRA: peft's `disable_adapter()`; ReFT: `disable_adapters()`; both for
    reft+lora. Full finetuning has no adapter to switch off: keep a frozen copy instead."""
    model = unwrap_parallel(model)
    kind = adapter_kind(model)
    if kind == "full":
        raise ValueError("reference_off: a fully finetuned model has no adapter to switch off; use a frozen "
                         "copy of the initial model (PreferenceTrainer(ref_model=...)) or precomputed log-probs")
    with contextlib.ExitStack() as stack:
        if "reft" in kind:
            stack.enter_context(model.disable_adapters())
        if "lora" in kind:
            peft_model = model.model if _is_reft(model) else model
            stack.enter_context(peft_model.disable_adapter())
        yield model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached tensor of every parameter that requires grad (what an optimizer updates)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


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


def _own_config(model: nn.Module, kind: str) -> AdapterConfig:
    """The `AdapterConfig` of a model that `apply_adapter` / `load_adapter` did not build: full and LoRA need
    nothing more; a ReFT (built by `get_reft_model`, e.g. through the pyreft-style `ReftTrainer`) describes
    itself from its one adapter's `ReftConfig`, which must carry its position spec."""
    if "reft" not in kind:
        return AdapterConfig(kind=kind)
    names = list(unwrap_parallel(model).adapter_names)
    rc = unwrap_parallel(model).adapter_configs[names[0]] if len(names) == 1 else None
    if kind != "reft" or rc is None or rc.positions is None:
        why = (f"it holds {len(names)} ReFT adapters {names} (save each with ReftModel.save_pretrained)"
               if len(names) != 1 else "it was not built by apply_adapter/load_adapter" if kind != "reft"
               else "its ReftConfig has no position spec")
        raise ValueError(f"save_adapter: cannot describe this {kind} model ({why}); build it with "
                         "alignkit.models.adapters.apply_adapter, or give the ReftConfig positions= (e.g. 'f1+l1')")
    reft = ReftSettings(config={"representations": rc.to_dict()["representations"]}, positions=rc.positions,
                        share_weights=rc.share_weights)
    return AdapterConfig(kind="reft", reft=reft)


def save_adapter(model: nn.Module, folder: str | Path, tokenizer: Any = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save only the trainable state of `model` to `folder` (layout in the module docstring): the folder
    `load_adapter` reads back. `state_dict`: full finetuning only, the (gathered) weights to write."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = adapter_kind(model)
    cfg = getattr(model, "alignkit_adapter_config", None) or _own_config(model, kind)
    if kind == "full":
        model.save_pretrained(folder, state_dict=state_dict)
    if "lora" in kind:
        (model.model if _is_reft(model) else model).save_pretrained(folder)
        absolute_base_path(folder / "adapter_config.json")
    if "reft" in kind:
        model.save_pretrained(str(folder))
        heads = (cfg.reft.modules_to_save or []) if kind == "reft" else []
        if heads:
            lm = unwrap_lm(model)
            tensors = {f"{h}.{k}": v.detach().cpu().contiguous() for h in heads
                       for k, v in lm.get_submodule(h).state_dict().items()}
            save_file(tensors, str(folder / HEAD_WEIGHTS_NAME), metadata={"format": "alignkit-heads"})
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    logger.info("saved %s adapter to %s", kind, folder)
    return folder


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an alignkit adapter folder is written by save_adapter "
                                "(or a Trainer's save_model)")
    try:
        return AdapterConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); save the adapter again") from e


def _load_heads(model: nn.Module, folder: Path, cfg: AdapterConfig, trainable: bool) -> None:
    from safetensors.torch import load_file

    heads = (cfg.reft.modules_to_save or []) if cfg.kind == "reft" else []
    if not heads:
        return
    path = folder / HEAD_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the adapter config lists trained modules {heads}")
    tensors = load_file(str(path))
    lm = unwrap_lm(model)
    for h in heads:
        sub = {k[len(h) + 1:]: v for k, v in tensors.items() if k.startswith(h + ".")}
        lm.get_submodule(h).load_state_dict(sub, strict=True)
        for p in lm.get_submodule(h).parameters():
            p.requires_grad_(trainable)


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False) -> nn.Module:
    """Wrap the base transformers `model` with the adapter saved in `folder` (by `save_adapter`).

    Full finetuning folders are complete models: load them with `load_model` instead."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    if cfg.kind == "full":
        raise ValueError(f"{folder}: holds a fully finetuned model, not an adapter; load it with "
                         "alignkit.models.loading.load_model")
    out = model
    if "lora" in cfg.kind:
        from peft import PeftModel

        out = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    if "reft" in cfg.kind:
        from alignkit.interventions.io import load_reft

        out = load_reft(out, folder)
        if out.adapter_configs["default"].positions is None:  # folders saved before positions lived in reft_config.json
            out.set_positions("default", cfg.reft.positions, cfg.reft.share_weights)
        for p in out.interventions.parameters():
            p.requires_grad_(trainable)
        _load_heads(out, folder, cfg, trainable)
    out.alignkit_adapter_config = cfg
    return out


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy the weights saved in `folder` into an already wrapped `model`, in place (checkpoint resume:
    the optimizer state then lines up with the same parameters)."""
    folder = Path(folder)
    kind = adapter_kind(model)
    cfg = read_adapter_config(folder)
    if cfg.kind != kind:
        raise ValueError(f"{folder}: holds a {cfg.kind!r} adapter but the model is {kind!r}")
    if "lora" in kind:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        peft_model = model.model if _is_reft(model) else model
        from alignkit.compat import check_peft_load

        path = folder / "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
        check_peft_load(set_peft_model_state_dict(peft_model, load_file(str(path))), str(path))
    if "reft" in kind:
        from alignkit.interventions.io import read_reft_weights

        read_reft_weights(unwrap_parallel(model), folder)
        _load_heads(model, folder, cfg, True)


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict | None = None) -> None:
    """Activation checkpointing in the transformers model, non-reentrant by default (reentrant
    checkpointing would cut the gradients of adapters whose base inputs need no grad; if asked for,
    input embeddings are made to require grad). Turns the KV cache off."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    every_n = kwargs.pop("every_n_layers", 1)
    lm = unwrap_lm(model)
    if kwargs["use_reentrant"] and adapter_kind(model) != "full":
        lm.enable_input_require_grads()
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(lm.config, "use_cache", None):
        lm.config.use_cache = False


__all__ = ["AdapterConfig", "LoraSettings", "ReftSettings", "KINDS", "adapter_kind", "apply_adapter", "can_switch_off",
           "enable_gradient_checkpointing", "is_classifier", "load_adapter", "load_adapter_weights",
           "read_adapter_config", "reference_off", "reft_settings", "save_adapter", "saves_whole_model", "trainable_state_dict",
           "unwrap_lm"]
