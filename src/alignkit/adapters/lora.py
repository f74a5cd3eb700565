"""LoRA / DoRA through peft: the transformers model wrapped in a `PeftModel` (base frozen; for a sequence
classifier peft also trains the head, `modules_to_save`).

A saved folder holds peft's `adapter_config.json` + `adapter_model.safetensors` (its base path made
absolute). peft, a dependency of alignkit, is imported with this module, which the adapter registry imports
(`alignkit.adapters`): an environment without peft cannot import alignkit's adapters or trainers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, ContextManager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from alignkit.adapters.base import Adapter, Route, is_classifier, is_reft, register_adapter
from alignkit.adapters.config import AdapterConfig
from alignkit.compat import check_peft_load
from alignkit.files import read_json_object
from alignkit.interventions.locate import is_peft_model

WEIGHTS_NAME = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
# a saved LoRA tensor's key: peft's `base_model.model.` + the base's module name + the LoRA part (compat row P15)
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                      r"lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$")
RANK_AXIS = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}  # where r is in its shape
# where the base layer's width is in its shape: A is (r, in), B is (out, r) (nn.Linear, Conv1D, conv: more axes after
# those; nn.Embedding: A (r, num_embeddings), B (embedding_dim, r)) (compat row P16)
WIDTH_AXIS = {"lora_A": (1, "in"), "lora_embedding_A": (1, "in"), "lora_B": (0, "out"), "lora_embedding_B": (0, "out")}
NESTED = ".base_layer"  # peft's name for the module a LoRA layer wraps; one per nested ParamWrapper (row P18)


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


def linear_leaves(model: nn.Module) -> list[str]:
    """The last name parts of the model's linear layers (what target_modules usually lists), at most 12."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})[:12]


def _head_message(target_modules: Any) -> str:
    return (f"adapter.lora.target_modules: {target_modules!r} puts LoRA on the LM head, which alignkit's objectives "
            "apply as its plain weight (trainers/logps.py), so that LoRA would never run and the first step would "
            "stop; leave the head out ('all-linear' does), or list it in adapter.lora.modules_to_save to train it "
            "whole")


LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str] | None:
    """The names of the modules of `model` that `get_peft_model(model, cfg)` gives a LoRA layer, found with peft's
    own matcher (`check_target_module_exists`: a list entry is a name or a suffix after a dot, a string a regex
    matched in full, modules_to_save excluded); None for target_modules 'all-linear' (every linear layer but the
    output embedding: peft's `_maybe_include_all_linear_layers`) or None (peft's per-model default). Compat row P12."""
    target = cfg.target_modules
    if target is None or (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return None
    return [n for n, _ in model.named_modules() if n and check_target_module_exists(cfg, n)]


def check_lora_targets(model: nn.Module, cfg: LoraConfig, given: Any = None) -> None:
    """ValueError (one line, naming adapter.lora.target_modules and the fix) for a target that peft would refuse or
    alignkit could not use, decided from the names alone so that nothing of `model` has changed yet: the LM head
    (alignkit's objectives apply its plain weight), or a block of layers (peft adapts layers such as nn.Linear; on
    a block, e.g. 'mlp', it raises only after the modules before it in the model already got their LoRA layers).
    `given`: target_modules as the user wrote them, for the message (LoraConfig turns a list into a set)."""
    shown = cfg.target_modules if given is None else given
    targets = lora_targets(model, cfg)
    if not targets:
        return
    modules = dict(model.named_modules())
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if cfg.task_type != "SEQ_CLS" and callable(get_head) else None
    if head is not None and any(modules[n] is head for n in targets):
        raise ValueError(_head_message(shown))
    for n in targets:
        m = modules[n]
        if not isinstance(m, (*LAYER_TYPES, BaseTunerLayer)) and next(m.children(), None) is not None:
            raise ValueError(f"adapter.lora.target_modules: {_entry(shown, n)!r} matches {n} "
                             f"({type(m).__name__}), a block of layers, not a layer LoRA can adapt; name the layers "
                             f"inside it instead (the model's linear layers are named {linear_leaves(model)})")


def matches_entry(name: str, entry: str) -> bool:
    """Whether module `name` matches a list entry of target_modules as peft matches one: the whole name, or its
    end after a dot (peft's `check_target_module_exists`, compat row P12)."""
    return name == entry or name.endswith("." + entry)


def _entry(target_modules: Any, name: str) -> Any:
    """The entry of `target_modules` that matched module `name` (the regex itself when it is a string)."""
    if isinstance(target_modules, str):
        return target_modules
    return next((k for k in target_modules if matches_entry(name, k)), target_modules)


def _misfit(folder: Any, base: Any, what: str) -> ValueError:
    return ValueError(f"{folder}: this LoRA adapter does not fit the base model {base}: {what}, so only part of the "
                      "adapter would run; use it with the base it was trained on")


def layer_widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer peft gives LoRA, as peft's `_get_in_out_features` reads them (row P16): nn.Linear's
    in/out_features, a conv's in/out_channels, nn.Embedding's (num_embeddings, embedding_dim), GPT-2's Conv1D's weight
    shape (in, out); a layer peft already wrapped is read through its base layer; None for another module."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _check_width(folder: Any, key: str, shape: tuple, part: str, name: str, widths: tuple[int, int] | None,
                 what: str, base: Any) -> None:
    """ValueError (one line: the tensor, its shape and the one the base's layer takes) when the saved LoRA tensor
    `key` has another width than `widths` (in, out) of the base's module or parameter `name` (`what`: its type or
    shape, for the message): a LoRA of a base with another hidden size (peft failed with torch's multi-line size
    mismatch)."""
    axis, side = WIDTH_AXIS.get(part, (None, None))
    if widths is None or axis is None or len(shape) <= axis:
        return
    want = widths[0] if side == "in" else widths[1]
    if shape[axis] != want:
        expected = list(shape)
        expected[axis] = want
        raise ValueError(f"{folder}: saved LoRA tensor {key} has shape {list(shape)} but the base model {base}'s "
                         f"{name} ({what}, {side} width {want}) takes {expected}, so this adapter "
                         "was trained on a base of another width; use it with the base it was trained on")


def targeted_parameters(module: nn.Module, name: str, targets: list[str]) -> list[tuple[str, nn.Parameter]]:
    """The parameters of `module` (named `name` in the base) that peft's `target_parameters` entries `targets`
    match (`name.param` equal to an entry or ending with `.` + it), in the order peft wraps them: its registration
    order, the first innermost (peft's `_inject_parameters`, row P18). A module peft wrapped is read through its
    base layer."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    full = {p: f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return [(p, t) for p, t in module.named_parameters(recurse=False)
            if any(full[p] == k or full[p].endswith("." + k) for k in targets)]


def param_widths(shape: tuple, owner: nn.Module) -> tuple[int, int, int] | None:
    """(in, out, experts) of a parameter peft's `ParamWrapper` adapts (row P18): a 3-D (experts, out, in), or
    (experts, in, out) for a module marked `is_transposed` (transformers' `use_experts_implementation`); a 2-D
    (out, in) with 1 expert; None for another shape (peft refuses it). Its LoRA A is (r x experts, in), B (out, r x
    experts)."""
    if len(shape) == 3:
        experts, a, b = (int(n) for n in shape)
        return (a, b, experts) if getattr(owner, "is_transposed", False) else (b, a, experts)
    if len(shape) == 2:
        return int(shape[1]), int(shape[0]), 1
    return None


def param_target(modules: dict[str, nn.Module], module: str, targets: list[str]) -> tuple[str, tuple, Any] | None:
    """For a saved LoRA tensor's module name `module` (of a LoRA with `target_parameters` `targets`): the full name
    of the base's parameter it adapts, that parameter's shape, and the module holding it; None when it adapts no
    parameter. peft wraps the k targeted parameters of one module in k nested `ParamWrapper`s, the outermost (the
    module's own name) the last, each inner one a `.base_layer` further (row P18)."""
    if not targets:
        return None
    name, depth = module, 0
    while name.endswith(NESTED):
        name, depth = name[: -len(NESTED)], depth + 1
    owner = modules.get(name)
    if owner is None:
        return None
    params = targeted_parameters(owner, name, targets)
    if depth >= len(params):
        return None
    pname, param = params[len(params) - 1 - depth]
    owner = owner.get_base_layer() if isinstance(owner, BaseTunerLayer) else owner
    return f"{name}.{pname}", tuple(getattr(param, "ds_shape", param.shape)), owner


def _check_param(folder: Any, key: str, shape: tuple, part: str, r: int, target: tuple[str, tuple, Any],
                 base: Any) -> None:
    """ValueError (one line) when the saved tensor `key` of a LoRA on the parameter `target` (`param_target`) has
    another rank axis than peft builds (r x the parameter's experts: a base with another expert count, or an
    adapter_config.json of another run) or another width (`_check_width`: a base of another hidden size)."""
    name, pshape, owner = target
    widths = param_widths(pshape, owner)
    axis = RANK_AXIS.get(part)
    if widths is None or axis is None or len(shape) <= axis:
        return
    if shape[axis] != r * widths[2]:
        raise ValueError(f"{folder}: saved LoRA tensor {key} has {shape[axis]} on its rank axis (shape "
                         f"{list(shape)}) but the base model {base}'s {name} (shape {list(pshape)}) takes r x experts "
                         f"= {r} x {widths[2]} = {r * widths[2]} with adapter_config.json's r, so this adapter was "
                         "trained on a base with another number of experts (or its adapter_config.json is another "
                         "run's); use it with the base and adapter_config.json it was saved with")
    _check_width(folder, key, shape, part, name, widths[:2], f"parameter {list(pshape)}", base)


def check_lora_fits(model: nn.Module, folder: str | Path, base: Any) -> None:
    """ValueError (one line, naming `folder` and one tensor), before anything is loaded into `model` (the base
    transformers model, or its skeleton on the meta device), when a LoRA tensor saved in `folder` does not fit it
    (`check_lora_shapes`)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / "adapter_config.json").is_file():
        return  # refused, naming the file, by the caller's check of the folder's files (Adapter.require_files)
    cfg = read_json_object(folder / "adapter_config.json", "save the adapter again", "peft's LoRA config")
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    check_lora_shapes(model, folder, cfg, shapes, base)


def check_lora_shapes(model: nn.Module, where: Any, cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                      base: Any) -> None:
    """ValueError (one line, naming `where` and one tensor) when a LoRA, given as its adapter_config.json mapping
    `cfg` and its tensors' shapes (name -> shape), has a tensor that names a module `model` lacks (peft's
    `from_pretrained` drops it without a word, row P14; vLLM matches only the module's last name part and drops it
    too) or has another rank than `cfg` gives that module (`r`, or the entry of `rank_pattern` peft would pick) or
    another width than the module's (`_check_width`: a base of another hidden size). A tensor of a LoRA on a parameter
    (`cfg`'s `target_parameters`: a mixture of experts' 3-D expert weights, row P18) is compared with that parameter:
    rank r x its experts, its widths (`_check_param`: a base with another expert count or hidden size).
    `check_lora_fits` reads a folder for it; `alignkit vllm-serve`'s POST /lora passes the request's bytes, before
    anything is written."""
    pattern = cfg.get("rank_pattern") or {}
    modules = dict(model.named_modules())
    dropped, targets = [], list(cfg.get("target_parameters") or [])
    for key, shape in sorted(shapes.items()):
        m = LORA_KEY.match(key)
        if m is None:  # modules_to_save, trainable tokens: compared after loading (check_lora_placed)
            continue
        target = param_target(modules, m["module"], targets)
        name = m["module"] if target is None else target[0]  # rank_pattern names a targeted parameter in full
        r = int(pattern.get(get_pattern_key(list(pattern), name), cfg.get("r", 8)))
        if target is not None:
            _check_param(where, key, shape, m["part"], r, target, base)
            continue
        if m["module"] not in modules:
            dropped.append(key)
            continue
        axis = RANK_AXIS.get(m["part"])
        if axis is not None and len(shape) > axis and shape[axis] != r:
            raise ValueError(f"{where}: saved LoRA tensor {key} has rank {shape[axis]} (shape {list(shape)}) but "
                             f"adapter_config.json gives {m['module']} r={r}, so peft would build layers it cannot "
                             "fill; use the adapter_config.json saved with these weights")
        module = modules[m["module"]]
        _check_width(where, key, shape, m["part"], m["module"], layer_widths(module), type(module).__name__, base)
    if dropped:
        raise _misfit(where, base, f"{len(dropped)} saved tensor(s) fit no module of the base (e.g. {dropped[0]})")


def check_lora_placed(model: nn.Module, name: str, folder: str | Path, base: Any) -> None:
    """ValueError naming `folder` unless every LoRA tensor it saved was placed in `model` (peft's adapter `name`) and
    every LoRA layer peft made for it got one (row P14): peft drops saved tensors for modules the base lacks (an
    adapter of a deeper model: its last layers) without a word, and leaves a LoRA layer with no saved tensor at its
    initial value (B = 0: no LoRA there), so an adapter trained on another base runs in part, silently. peft's
    `save_embedding_layers` is given (never its "auto", which asks the Hub for the base's config.json when the
    adapter names a Hub id): the LoRA tensors without the base's embedding weights, and those weights apart, which a
    folder may hold (saved with save_embedding_layers=True, or resized embeddings) and peft loads."""
    saved = set(load_peft_weights(str(folder), device="cpu"))
    placed = set(get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False))
    embeddings = set(get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=True)) - placed
    extra, missing = sorted(saved - placed - embeddings), sorted(placed - saved)
    if extra:
        raise _misfit(folder, base, f"{len(extra)} saved tensor(s) fit no module of the base (e.g. {extra[0]})")
    if missing:
        raise _misfit(folder, base, f"{len(missing)} LoRA tensor(s) of the base's modules are not in it "
                                    f"(e.g. {missing[0]})")


def _base_of(model: nn.Module) -> Any:
    return getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__


@register_adapter
class Lora(Adapter):
    """LoRA on the model it is given (in the ReFT+LoRA stack: the model inside the `ReftModel`)."""

    kind = "lora"
    merges = True  # peft's merge_and_unload
    weight_files = (("adapter_config.json", "peft's LoRA config"), (WEIGHTS_NAME, "the LoRA weights"))
    vllm_sync = "lora_request"

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return not is_reft(model) and is_peft_model(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` wrapped by peft. Every refusal comes BEFORE `get_peft_model`, which injects LoRA layers into
        `model` itself: a caller that catches the error keeps its model as it was."""
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
                if not any(matches_entry(n, key) for n in names):
                    raise ValueError(f"adapter.lora.target_modules: {key!r} matches no module of the model, so it "
                                     f"would get no LoRA; the model's linear layers are named {linear_leaves(model)}")
        cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                         use_dora=s.use_dora, modules_to_save=s.modules_to_save, task_type=task)
        check_lora_targets(model, cfg, s.target_modules)
        wrapped = get_peft_model(model, cfg)
        head = None if task == "SEQ_CLS" else wrapped.get_output_embeddings()
        if head is not None and hasattr(head, "base_layer"):  # foreseen by check_lora_targets (row P12): a net
            raise ValueError(_head_message(s.target_modules))
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
        """`model` wrapped by peft with the LoRA in `folder`; a LoRA of another base (a module it lacks, another
        rank) is refused before peft changes `model`, and what peft placed is compared with what was saved."""
        check_lora_fits(model, folder, _base_of(model))
        loaded = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
        check_lora_placed(loaded, "default", folder, _base_of(model))
        return loaded

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Copy the LoRA in `folder` into the wrapped `model` (a resume); one that does not fit its base (a module it
        lacks, another rank: `check_lora_fits`) is refused in one line before anything is copied."""
        check_lora_fits(model.get_base_model(), folder, _base_of(model.get_base_model()))
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
