"""Save and load ReFT adapters: a folder with `reft_config.json` + `interventions.safetensors`.

`reft_config.json` holds everything needed to rebuild the adapter exactly:
    format / version           "alignkit-reft", 1
    adapter_name               the name it was saved under
    base_model                 model_type (the text config's), hidden_size, num_layers, dtype (checked on load)
    reft_config                the ReftConfig (`ReftConfig.to_dict()`)
    interventions              per representation: layer, component, module path, and `spec`
                               (every constructor argument of the intervention, `Intervention.spec()`)
    weights_sha256             checksum of interventions.safetensors (a stale or corrupt pair fails)
On load, each representation of `reft_config` must agree with its `interventions` entry (layer, component, type,
every argument; None = the type's default): the weights are built from the entry and attached where the
representation says, so a file edited or mixed from two saves is refused naming the key. One exception, for folders
of earlier versions: an entry's dropout 0 against a configured rate > 0 is that rate (`saved_specs`).
`interventions.safetensors` holds only intervention weights, keyed `"<i>.<parameter name>"` with i the
representation's index. Each file is written to a temporary name and renamed, so a crash never leaves
a half-written file. Nothing is ever pickled. A new `ReftModel` from a folder: `interventions/loading.py`
(`load_reft`; `load_pyreft` reads pyreft checkpoints through `pyreft_compat`, torch.load with weights_only=True).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save
from torch import nn
from transformers import CONFIG_MAPPING

from alignkit.files import atomic_write, read_json_object
from alignkit.interventions import intervention_types
from alignkit.interventions.base import Intervention, build_intervention
from alignkit.interventions.config import ReftConfig
from alignkit.interventions.locate import find_decoder_layers, hf_model, hidden_size

if TYPE_CHECKING:  # attach.py (ReftModel) calls this module to save and load; this module never builds one
    from alignkit.interventions.attach import ReftModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "interventions.safetensors"
FORMAT = "alignkit-reft"
VERSION = 1


def base_identity(model: nn.Module) -> dict[str, Any]:
    """What a ReFT checkpoint records about the model it was trained on."""
    base = hf_model(model)
    _, layers = find_decoder_layers(base)
    ref = next((p for p in layers.parameters() if p.is_floating_point()), None)
    cfg = getattr(base, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg  # compat M9: the decoder's own config
    return {"model_type": getattr(text, "model_type", None) or type(base).__name__, "hidden_size": hidden_size(base),
            "num_layers": len(layers),
            "dtype": str(ref.dtype if ref is not None else torch.float32).removeprefix("torch."),
            "name_or_path": str(getattr(cfg, "name_or_path", "") or "")}




def save_reft(reft_model: ReftModel, folder: str | Path, adapter_name: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the only one) of `reft_model` to `folder`."""
    names = reft_model.adapter_names
    if adapter_name is None:
        if len(names) != 1:
            raise ValueError(f"the model has adapters {names}; pass adapter_name to say which one to save")
        adapter_name = names[0]
    if adapter_name not in names:
        raise KeyError(f"unknown ReFT adapter {adapter_name!r}; adapters: {names}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slots = [s for s in reft_model.slots if s.adapter == adapter_name]
    tensors = {f"{s.index}.{k}": v.detach().to("cpu").contiguous()
               for s in slots for k, v in s.intervention.state_dict().items()}
    blob = save(tensors, metadata={"format": FORMAT, "adapter_name": adapter_name})
    meta = {"format": FORMAT, "version": VERSION, "adapter_name": adapter_name,
            "base_model": base_identity(reft_model.model),
            "reft_config": reft_model.adapter_configs[adapter_name].to_dict(),
            "interventions": [{"layer": s.layer, "component": s.component, "path": s.path,
                               "hook_input": s.hook_input, "spec": s.intervention.spec()} for s in slots],
            "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write(folder / WEIGHTS_NAME, blob)
    atomic_write(folder / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("saved ReFT adapter %r (%d interventions) to %s", adapter_name, len(slots), folder)
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"ReFT checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a ReFT checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                                "(written by ReftModel.save_pretrained)")
    meta = read_json_object(path, "save the adapter again")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an alignkit ReFT config (format {meta.get('format')!r}, expected {FORMAT!r}); "
                         "for a pyreft checkpoint use load_pyreft")
    if meta.get("version") != VERSION:  # another layout: read as this one, it would load wrong or fail later
        version = meta.get("version")
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise ValueError(f"{path}: format version {version!r}, this alignkit reads version {VERSION} only; "
                         + ("the adapter was saved by a newer alignkit: upgrade alignkit to load it" if newer else
                            "the file is damaged or was not written by alignkit's save_reft: save the adapter again"))
    missing = [k for k in ("base_model", "reft_config", "interventions") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return meta


def saved_reft_config(folder: str | Path) -> ReftConfig:
    """The `ReftConfig` (representations, positions) that `folder`'s `reft_config.json` was saved with, read and
    checked without building anything."""
    folder = Path(folder)
    meta = _read_meta(folder)
    return ReftConfig.from_dict(meta["reft_config"], where=f"{folder / CONFIG_NAME}: reft_config")


def text_model_type(model_type: Any) -> Any:
    """The model_type of the text config of transformers' config class for `model_type` (gemma3 -> gemma3_text,
    llava -> llama; llama -> llama), from a default config (no model built, compat M17); unknown types as given."""
    try:
        return CONFIG_MAPPING[model_type]().get_text_config().model_type
    except Exception:  # not a transformers type (pyreft's class string, a custom model): compare it as saved
        return model_type


def _check_base(meta: dict[str, Any], model: nn.Module, path: Path) -> None:
    saved, here = meta["base_model"], base_identity(model)
    for key in ("hidden_size", "num_layers"):
        if saved.get(key) != here[key]:
            raise ValueError(f"{path}: the adapter was trained on a model with {key}={saved.get(key)}, "
                             f"this model has {key}={here[key]}; load it onto a {saved.get('model_type')} "
                             f"model of the same shape ({saved.get('name_or_path') or 'see base_model'})")
    # same widths, another network: its edits mean nothing there. The text config's type is saved; a folder saved
    # with a composite's top-level type (gemma3) matches its text type (gemma3_text): the same decoder layers
    if saved.get("model_type") != here["model_type"] and text_model_type(saved.get("model_type")) != here["model_type"]:
        raise ValueError(f"{path}: the adapter was trained on a model with model_type={saved.get('model_type')!r}, "
                         f"this model has model_type={here['model_type']!r}; load it onto the "
                         f"{saved.get('model_type')} model it was trained on "
                         f"({saved.get('name_or_path') or 'see base_model'})")


def _read_weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the checkpoint's intervention weights are not there")
    blob = path.read_bytes()
    want = meta.get("weights_sha256")
    if want is not None and hashlib.sha256(blob).hexdigest() != want:
        raise ValueError(f"{path}: checksum does not match {CONFIG_NAME} (truncated, corrupt, or from another "
                         "save); save the adapter again")
    try:
        return load(blob)
    except Exception as e:  # safetensors raises its own error type for malformed headers / sizes
        raise ValueError(f"{path}: not a readable safetensors file ({e}); save the adapter again") from e


def _build(specs: list[dict[str, Any]], tensors: dict[str, torch.Tensor], path: Path,
           dtype: str) -> list[Intervention]:
    modules, expected = [], set()
    for i, saved in enumerate(specs):
        spec = dict(saved)
        if "dtype" in spec and spec["dtype"] != dtype:
            logger.info("%s: intervention %d saved in %s, the model is %s: building it in %s", path, i,
                        spec["dtype"], dtype, dtype)
            spec["dtype"] = dtype
        iv = build_intervention(spec)
        names = {f"{i}.{k}": k for k in iv.state_dict()}
        expected |= set(names)
        have = {k: tensors[full] for full, k in names.items() if full in tensors}
        missing = sorted(set(names) - set(tensors))
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing} for intervention {i} ({spec.get('type')})")
        iv.load_state_dict(have, strict=True)
        modules.append(iv)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {extra}; the weights do not match {CONFIG_NAME}")
    return modules


_NAMED = ("low_rank_dimension", "dropout", "act_fn", "add_bias", "embed_dim")  # RepresentationConfig's named arguments


def _type_default(kind: str, key: str) -> Any:
    """The default of argument `key` of intervention type `kind`'s constructor; inspect.Parameter.empty if none."""
    types = intervention_types()
    params = inspect.signature(types[kind].__init__).parameters if kind in types else {}
    return params[key].default if key in params else inspect.Parameter.empty


def saved_specs(config: ReftConfig, meta: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """Each `interventions[i]` spec of `meta` as it is built. One repair, for folders saved before the spec kept
    the constructor's rate (`Intervention.configured_rate`): those wrote the live `nn.Dropout.p`, which
    turn_off_dropout (the preference objectives' default) had set to 0, so a spec's `dropout` 0 where its
    representation (saved from the `ReftConfig`, never swept) says a rate > 0 is that rate, logged. Dropout changes
    neither the weights nor inference. Any other disagreement is left for `_entry_differs` to refuse."""
    specs, repaired = [], []
    for i, item in enumerate(meta["interventions"]):
        spec = dict(item["spec"]) if isinstance(item, dict) and isinstance(item.get("spec"), dict) else {}
        rep = config.representations[i] if i < len(config.representations) else None
        if rep is not None and spec.get("type") == rep.intervention and spec.get("dropout") == 0:
            rate = rep.dropout if rep.dropout is not None else _type_default(rep.intervention, "dropout")
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                spec["dropout"] = rate
                repaired.append(f"interventions[{i}]: {rate}")
        specs.append(spec)
    if repaired:
        logger.warning("%s: saved by an older alignkit, with the dropout of %s written as 0.0 (its live rate, "
                       "turned off for training); using the configured rate(s) of reft_config (weights unchanged)",
                       path, ", ".join(repaired))
    return specs


def _entry_differs(config: ReftConfig, meta: dict[str, Any],
                   specs: list[dict[str, Any]]) -> tuple[int, str, Any, Any] | None:
    """The first (i, key, representation's value, saved intervention's value) where `reft_config`'s representation i
    and `interventions[i]` (where its weights were saved from; `specs`: what `_build` builds) disagree; None if none.
    A representation argument left None means the type's default, compared with the spec's value."""
    types = intervention_types()
    for i, (rep, item, spec) in enumerate(zip(config.representations, meta["interventions"], specs)):
        for key in ("layer", "component"):
            if item.get(key) != getattr(rep, key):
                return i, key, getattr(rep, key), item.get(key)
        if spec.get("type") != rep.intervention:
            return i, "intervention", rep.intervention, spec.get("type")
        params = inspect.signature(types[rep.intervention].__init__).parameters if rep.intervention in types else {}
        want = {**{k: getattr(rep, k) for k in _NAMED}, **{k: v for k, v in rep.extra.items() if k != "dtype"}}
        for key, value in want.items():
            if value is None:  # the type's own default is what a None builds (embed_dim: the model's width)
                if key == "embed_dim" or key not in params or params[key].default is inspect.Parameter.empty:
                    continue
                value = params[key].default
            if key in spec and spec[key] != value:
                return i, key, value, spec[key]
    return None


def load_adapter_into(reft_model: ReftModel, folder: str | Path, adapter_name: str = "default") -> None:
    """Attach the adapter saved in `folder` to `reft_model` under `adapter_name`."""
    folder = Path(folder)
    meta = _read_meta(folder)
    cfg_path = folder / CONFIG_NAME
    _check_base(meta, reft_model.model, cfg_path)
    config = ReftConfig.from_dict(meta["reft_config"], where=f"{cfg_path}: reft_config")
    if len(config.representations) != len(meta["interventions"]):
        raise ValueError(f"{cfg_path}: {len(config.representations)} representations but "
                         f"{len(meta['interventions'])} interventions")
    specs = saved_specs(config, meta, cfg_path)
    differs = _entry_differs(config, meta, specs)
    if differs is not None:  # else the weights saved for one place / setting load as the other, without a word
        i, key, have, saved = differs
        raise ValueError(f"{cfg_path}: reft_config.representations[{i}] has {key}={have!r} but interventions[{i}], "
                         f"which its weights were saved from, has {saved!r}; the file was edited or mixed from two "
                         "saves: save the adapter again (or put back the saved file)")
    tensors = _read_weights(folder / WEIGHTS_NAME, meta)
    modules = _build(specs, tensors, folder / WEIGHTS_NAME, base_identity(reft_model.model)["dtype"])
    reft_model.add_adapter(adapter_name, config, modules)


def _check_same_places(reft_model: ReftModel, adapter_name: str, meta: dict[str, Any], path: Path) -> None:
    """Refuse (ValueError, one line) weights saved from interventions at another (layer, component), or trained on
    other positions, than adapter `adapter_name`'s: the same types and sizes would load and edit another place."""
    slots = [s for s in reft_model.slots if s.adapter == adapter_name]
    for i, (item, slot) in enumerate(zip(meta["interventions"], slots)):
        saved, here = (item.get("layer"), item.get("component")), (slot.layer, slot.component)
        if saved != here:
            raise ValueError(f"{path}: interventions[{i}] was trained at layer {saved[0]}, component {saved[1]!r}, "
                             f"and adapter {adapter_name!r} has it at layer {here[0]}, component {here[1]!r}, so its "
                             f"weights would edit another place; build the adapter with the folder's representations, "
                             f"or load the folder whole (load_reft / alignkit.adapters.load_adapter)")
    saved_cfg = ReftConfig.from_dict(meta["reft_config"], where=f"{path}: reft_config")
    live = reft_model.adapter_configs[adapter_name]
    if saved_cfg.positions is not None and live.positions is not None and \
            (saved_cfg.positions, saved_cfg.share_weights) != (live.positions, live.share_weights):
        raise ValueError(f"{path}: the weights were trained on positions {saved_cfg.positions!r} (share_weights="
                         f"{saved_cfg.share_weights}), and adapter {adapter_name!r} edits {live.positions!r} "
                         f"(share_weights={live.share_weights}); set adapter.reft.positions to the saved ones, or load "
                         f"the folder whole (load_reft / alignkit.adapters.load_adapter)")


def read_reft_weights(reft_model: ReftModel, folder: str | Path, adapter_name: str | None = None) -> None:
    """Copy the weights saved in `folder` into the live interventions of adapter `adapter_name` (default:
    the name saved in the folder if the model has it, else the model's only adapter), in place: the
    parameter objects stay the same, so an optimizer holding them lines up (resume, best model). Weights saved from
    interventions of other types or sizes, at another (layer, component), or trained on other positions are refused."""
    folder = Path(folder)
    meta = _read_meta(folder)
    names = reft_model.adapter_names
    if adapter_name is None:
        adapter_name = (meta.get("adapter_name") if meta.get("adapter_name") in names
                        else (names[0] if len(names) == 1 else None))
    if adapter_name not in names:
        raise KeyError(f"{folder / CONFIG_NAME}: cannot tell which adapter of {names} to load into; pass adapter_name")
    live = reft_model.interventions[adapter_name]
    config = ReftConfig.from_dict(meta["reft_config"], where=f"{folder / CONFIG_NAME}: reft_config")
    saved = saved_specs(config, meta, folder / CONFIG_NAME)
    if len(saved) != len(live) or any({**a, "dtype": None} != {**b.spec(), "dtype": None} for a, b in zip(saved, live)):
        raise ValueError(f"{folder / CONFIG_NAME}: the saved interventions {saved} differ from "
                         f"adapter {adapter_name!r}'s {[b.spec() for b in live]}; use load_reft for another layout")
    _check_same_places(reft_model, adapter_name, meta, folder / CONFIG_NAME)
    tensors = _read_weights(folder / WEIGHTS_NAME, meta)
    fresh = _build(saved, tensors, folder / WEIGHTS_NAME, base_identity(reft_model.model)["dtype"])
    with torch.no_grad():
        for iv, new in zip(live, fresh):
            iv.load_state_dict(new.state_dict(), strict=True)  # copies into the existing tensors
