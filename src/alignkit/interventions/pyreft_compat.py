"""Read checkpoints written by pyreft (`ReftModel.save(folder)`, i.e. pyvene's `IntervenableModel.save`).

What pyreft writes (pyvene >= 0.1):
    folder/config.json      pyvene's IntervenableConfig: `representations` (each a list in the field order
                            of pyvene's RepresentationConfig namedtuple, or a dict), `intervention_types`
                            ("<class 'pyreft.interventions.LoreftIntervention'>", one per representation),
                            `sorted_keys`, `intervention_dimensions`, ...
    folder/intkey_<key>.bin one `torch.save`d state dict per representation. <key> is
                            "layer_15_comp_block_output_unit_pos_nunit_1#0" in current pyvene,
                            "layer.15.comp.block_output.unit.pos.nunit.1#0" or
                            "layer.15.repr.block_output.unit.pos.nunit.1#0" in older ones.
pyreft's trainer saves into `output_dir/intervenable_model/`; either folder may be passed here.

State dict names in those files: `LoreftIntervention` overrides `state_dict` and writes `weight`, `bias`
(its `learned_source` Linear) and `rotate_layer` (R as a (d, r) matrix with orthonormal columns). The
other classes use torch's default names (`learned_source.weight`, `proj_layer.weight`,
`rotate_layer.parametrizations.weight.original` + `....0.base`, ...) plus pyvene's scalar buffers
`embed_dim` / `interchange_dim`. pyreft does not record `act_fn` or `dropout` anywhere; pass `act_fn`
if the checkpoint was trained with one.

Every field of a representation is read or refused: a pyvene setting alignkit has no equivalent for
(`subspace_partition`, `group_key`, `intervention_link_key`, `moe_key`, a constant source representation, a
field this reader does not know, `mode` "serial") stops the import with one line naming the file, the
representation and the field, rather than loading the interventions as if it were not there.

Tensors are read with `torch.load(..., weights_only=True)` only: no pickled code runs.

    for item in read_pyreft_folder("path/to/pyreft_ckpt"):
        module = item.build()                # an alignkit Intervention with pyreft's weights
        item.layer, item.component           # where it goes, e.g. 15, "block_output"
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from alignkit.files import read_json_object
from alignkit.interventions.base import DTYPES, Intervention, build_intervention, dtype_name

logger = logging.getLogger(__name__)

# pyreft class name -> alignkit type name. The paper's DiReFT (eq. 3, plain projections) is pyreft's
# *Nodireft*; pyreft's *Direft* keeps an orthonormal R and is alignkit's "direft_orth".
PYREFT_TYPE_MAPPING: dict[str, str] = {
    "LoreftIntervention": "loreft",
    "LoreftIntervention_IdentityInit": "loreft",  # same equation and state dict, other initialisation
    "NoreftIntervention": "noreft",
    "NodireftIntervention": "direft",
    "DireftIntervention": "direft_orth",
    "ConsreftIntervention": "consreft",
    "LobireftIntervention": "lobireft",
}

# Field order of pyvene's RepresentationConfig namedtuple (config.json stores each one as a list; pyvene
# 0.1.8 has all 14, older ones the first 13). `latent_dim` is read only by pyvene's autoencoder intervention,
# a class alignkit refuses, so it has no meaning for the types imported here.
REPRESENTATION_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension",
                         "intervention_type", "intervention", "subspace_partition", "group_key",
                         "intervention_link_key", "moe_key", "source_representation",
                         "hidden_source_representation", "latent_dim")
_PYVENE_BUFFERS = ("embed_dim", "interchange_dim")  # scalar tensors pyvene registers; not weights


@dataclass(frozen=True)
class PyreftIntervention:
    """One intervention of a pyreft checkpoint, converted to alignkit's names.

    layer:        decoder layer index.
    component:    alignkit component ("block_output", "mlp_input", ...), or a module path for pyvene's
                  string components ("model.layers[3].mlp", "input:..." for a module's input).
    spec:         `build_intervention(spec)` input: {"type": ..., "embed_dim": ..., ...}.
    state_dict:   alignkit parameter names -> tensors; `load_state_dict(strict=True)` accepts it.
    key:          pyvene's key for this representation; `weight_file` the file it came from.
    pyreft_class: pyreft's class name, e.g. "LoreftIntervention".
    link_key:     pyvene's `intervention_link_key`; always None (a set one is refused: alignkit does not share
                  one intervention between representations).
    """

    layer: int
    component: str
    spec: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    key: str
    weight_file: Path
    pyreft_class: str
    link_key: Any = None

    def build(self) -> Intervention:
        module = build_intervention(self.spec)
        module.load_state_dict(self.state_dict)
        return module


def read_pyreft_folder(folder: str | Path, act_fn: str | None = None) -> list[PyreftIntervention]:
    """Every intervention in a pyreft checkpoint folder, in config order. `act_fn` (not recorded by
    pyreft) is set on the types that have one. Raises ValueError / FileNotFoundError naming the file."""
    folder = Path(folder)
    config_path = _find_config(folder)
    folder = config_path.parent
    config = _read_config(config_path)
    _check_mode(config, config_path)
    reps = config["representations"]
    types = config.get("intervention_types")
    if isinstance(types, str) or types is None:
        types = [types] * len(reps)
    if len(types) != len(reps):
        raise ValueError(f"{config_path}: {len(reps)} representations but {len(types)} intervention_types; "
                         "the config is inconsistent, re-save it with pyreft")
    sorted_keys = config.get("sorted_keys") or []
    collisions: dict[str, int] = {}
    items = []
    for i, (raw, type_str) in enumerate(zip(reps, types)):
        rep = _representation(raw, config_path, i)
        cls = _class_name(type_str)
        if cls not in PYREFT_TYPE_MAPPING:
            raise ValueError(f"{config_path}: representation {i} uses pyreft/pyvene class {cls!r}, which alignkit "
                             f"cannot import; supported: {sorted(PYREFT_TYPE_MAPPING)}")
        if rep["unit"] != "pos" or int(rep["max_number_of_units"]) != 1:
            raise ValueError(f"{config_path}: representation {i} intervenes on unit={rep['unit']!r} "
                             f"max_number_of_units={rep['max_number_of_units']}; alignkit imports only "
                             "unit='pos' with one unit (what pyreft uses)")
        candidates = _candidate_keys(rep, collisions)
        if i < len(sorted_keys) and sorted_keys[i] not in candidates:
            candidates.append(sorted_keys[i])  # last resort: a key spelling this reader does not know
        path = next((folder / f"intkey_{k}.bin" for k in candidates if (folder / f"intkey_{k}.bin").is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder}: no weight file for representation {i} (layer {rep['layer']}, "
                                    f"{rep['component']}); looked for {['intkey_' + k + '.bin' for k in candidates]}. "
                                    "Copy the intkey_*.bin files pyreft saved next to config.json")
        layer, component = _component(rep, config_path, i)
        kind = PYREFT_TYPE_MAPPING[cls]
        spec, state = _convert(kind, _load_tensors(path), path, cls, act_fn)
        if rep["low_rank_dimension"] not in (None, spec["low_rank_dimension"]):
            logger.warning("%s: config says low_rank_dimension=%s but the weights have rank %d; using the weights",
                           path, rep["low_rank_dimension"], spec["low_rank_dimension"])
        items.append(PyreftIntervention(layer, component, spec, state, path.name[len("intkey_"):-len(".bin")],
                                        path, cls, rep.get("intervention_link_key")))
    return items


def _find_config(folder: Path) -> Path:
    for candidate in (folder / "config.json", folder / "intervenable_model" / "config.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no config.json (nor intervenable_model/config.json). Pass the folder that "
                            "pyreft's ReftModel.save() wrote: config.json plus one intkey_*.bin per intervention")


def _read_config(path: Path) -> dict[str, Any]:
    config = read_json_object(path, "re-save it with pyreft")
    if not isinstance(config.get("representations"), list):
        raise ValueError(f"{path}: expected pyvene's IntervenableConfig with a 'representations' list; "
                         "is this a pyreft checkpoint folder?")
    return config


# pyvene fields that change what an intervention does but that alignkit has no equivalent for: set in a
# checkpoint, they are refused rather than dropped (pyreft leaves every one of them unset).
_UNSUPPORTED_FIELDS = {
    "subspace_partition": "it intervenes on subspaces of the representation",
    "group_key": "it groups interventions to run one after another",
    "intervention_link_key": "it shares one intervention between representations (alignkit would load "
                             "independent copies that training then pulls apart)",
    "moe_key": "it routes through a mixture of interventions",
    "source_representation": "it swaps in a constant source representation",
    "hidden_source_representation": "it swaps in a constant source representation (not saved in the folder)",
}


def _representation(raw: Any, path: Path, i: int) -> dict[str, Any]:
    """One pyvene RepresentationConfig (a list in field order, or a dict) as a dict; a field alignkit does not
    know, or one it cannot honour (`_UNSUPPORTED_FIELDS`) when set, is refused in one line."""
    if isinstance(raw, list):
        if len(raw) > len(REPRESENTATION_FIELDS):
            raise ValueError(f"{path}: representation {i} has {len(raw)} fields, pyvene's RepresentationConfig "
                             f"{len(REPRESENTATION_FIELDS)} ({', '.join(REPRESENTATION_FIELDS)}); the extra ones "
                             "come from a newer pyvene this reader does not know, so their meaning would be dropped")
        rep = dict(zip(REPRESENTATION_FIELDS, raw))
    elif isinstance(raw, dict):
        rep = dict(raw)
        unknown = sorted(set(rep) - set(REPRESENTATION_FIELDS))
        if unknown:
            raise ValueError(f"{path}: representation {i} has unknown field(s) {unknown}; pyvene's "
                             f"RepresentationConfig has {list(REPRESENTATION_FIELDS)}, so their meaning would "
                             "be dropped")
    else:
        raise ValueError(f"{path}: representation {i} is {type(raw).__name__}, expected a list or a dict")
    for name, why in _UNSUPPORTED_FIELDS.items():
        if rep.get(name) not in (None, False):
            raise ValueError(f"{path}: representation {i} sets {name}={rep[name]!r}: {why}, which alignkit cannot "
                             "import (pyreft never sets it); load this checkpoint with pyvene")
    defaults = {"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1,
                "low_rank_dimension": None}
    return {**defaults, **{k: v for k, v in rep.items() if v is not None}}


def _check_mode(config: dict[str, Any], path: Path) -> None:
    """pyvene's `mode`: "parallel" (pyreft's; every intervention edits the one forward pass) is what alignkit
    runs; "serial" chains source runs through the interventions, which alignkit does not do."""
    mode = config.get("mode", "parallel")
    if mode != "parallel":
        raise ValueError(f"{path}: mode={mode!r}; alignkit runs every intervention in one forward pass (pyvene's "
                         "'parallel', what pyreft saves) and cannot import a 'serial' one; load it with pyvene")


def _class_name(type_str: Any) -> str:
    """"<class 'pyreft.interventions.LoreftIntervention'>" -> "LoreftIntervention"."""
    text = str(type_str).strip()
    text = text.removeprefix("<class ").strip("'\"<> ")
    return text.rsplit(".", 1)[-1]


def _candidate_keys(rep: dict[str, Any], collisions: dict[str, int]) -> list[str]:
    """pyvene's key for this representation in each of its historical spellings (plus collision index)."""
    layer, comp, unit, n = rep["layer"], rep["component"], rep["unit"], rep["max_number_of_units"]
    if "." in comp:  # a module path component ("model.layers[3].output")
        proposals = [f"comp_{comp.replace('.', '_')}_unit_{unit.replace('.', '_')}_nunit_{n}",
                     f"comp.{comp}.unit.{unit}.nunit.{n}"]
    else:
        proposals = [f"layer_{layer}_comp_{comp}_unit_{unit.replace('.', '_')}_nunit_{n}",
                     f"layer.{layer}.comp.{comp}.unit.{unit}.nunit.{n}",
                     f"layer.{layer}.repr.{comp}.unit.{unit}.nunit.{n}"]
    index = collisions.get(proposals[0], -1) + 1
    collisions[proposals[0]] = index
    return [f"{p}#{index}" for p in proposals]


_NAMED = {"mlp": "mlp", "self_attn": "attention", "attn": "attention", "attention": "attention"}


def _component(rep: dict[str, Any], path: Path, i: int) -> tuple[int, str]:
    """pyvene component -> (layer, alignkit component). Named components pass through unchanged."""
    comp = rep["component"]
    if "." not in comp:
        return int(rep["layer"]), comp
    match = re.search(r"\[(\d+)\]\.(?:(\w+)\.)?(output|input)$", comp)
    if match and (match.group(2) is None or match.group(2) in _NAMED):
        block = "block" if match.group(2) is None else _NAMED[match.group(2)]
        return int(match.group(1)), f"{block}_{match.group(3)}"
    module, _, side = comp.rpartition(".")
    layer = re.search(r"\[(\d+)\]", comp)
    if side not in ("output", "input") or layer is None:
        raise ValueError(f"{path}: representation {i} has component {comp!r}; expected a pyvene module path "
                         "ending in .output or .input with a layer index like model.layers[3].mlp.output")
    return int(layer.group(1)), module if side == "output" else f"input:{module}"


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be used
        reason = (str(e).strip().splitlines() or [""])[0][:160]  # torch's own advice (weights_only=False) is not ours
        raise ValueError(f"{path}: cannot read it as a torch.save'd state dict of plain tensors ({type(e).__name__}: "
                         f"{reason}). The file is corrupt or holds pickled objects; re-save or re-download the "
                         "checkpoint") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}; not a pyreft weight file")
    return {k: v for k, v in state.items() if k not in _PYVENE_BUFFERS}


def _pop_rotation(state: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    """R as pyreft's (d, r) matrix with orthonormal columns, from whichever form the file holds."""
    if "rotate_layer" in state:
        return state.pop("rotate_layer")
    if "rotate_layer.weight" in state:
        return state.pop("rotate_layer.weight")
    original = state.pop("rotate_layer.parametrizations.weight.original", None)
    if original is None:
        raise ValueError(f"{path}: no rotation tensor (rotate_layer or rotate_layer.parametrizations.weight.*)")
    base = state.pop("rotate_layer.parametrizations.weight.0.base", None)
    # Re-evaluate pyreft's parametrization: torch's orthogonal() with its defaults on a (d, r) weight.
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(original.shape, dtype=torch.float64))
    d, r = original.shape
    orthogonal(holder, "weight", orthogonal_map="matrix_exp" if d == r else "householder",
               use_trivialization=base is not None)
    tensors = {"parametrizations.weight.original": original.double()}
    if base is not None:
        tensors["parametrizations.weight.0.base"] = base.double()
    holder.load_state_dict(tensors)
    with torch.no_grad():
        return holder.weight.to(original.dtype)


def _pop_linear(state: dict[str, torch.Tensor], prefix: str,
                bare: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    weight, bias = state.pop(f"{prefix}.weight", None), state.pop(f"{prefix}.bias", None)
    if weight is None and bare:  # LoreftIntervention.state_dict writes its Linear unprefixed
        weight, bias = state.pop("weight", None), state.pop("bias", None)
    return weight, bias


def _convert(kind: str, state: dict[str, torch.Tensor], path: Path, cls: str,
             act_fn: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """pyreft tensors -> (alignkit spec, alignkit state dict), by building the module and filling it."""
    names = sorted(state)
    rotation = _pop_rotation(state, path) if kind in ("loreft", "direft_orth", "consreft", "lobireft") else None
    if kind in ("consreft", "lobireft"):
        source_w, source_b = None, state.pop("learned_source", None)
        if source_b is None:
            raise ValueError(f"{path}: {cls} needs a 'learned_source' vector; found {names}")
    else:
        source_w, source_b = _pop_linear(state, "learned_source", bare=(kind == "loreft"))
        if source_w is None:
            raise ValueError(f"{path}: {cls} needs learned_source weights; found {names}")
    proj_w, proj_b = _pop_linear(state, "proj_layer", bare=False) if kind in ("noreft", "direft") else (None, None)
    if kind in ("noreft", "direft") and proj_w is None:
        raise ValueError(f"{path}: {cls} needs proj_layer.weight; found {names}")
    if state:
        raise ValueError(f"{path}: unexpected tensors {sorted(state)} for {cls}; alignkit would drop learned "
                         f"weights. Tensors in the file: {names}")

    reference = source_w if source_w is not None else source_b
    if dtype_name(reference.dtype) not in DTYPES:
        raise ValueError(f"{path}: tensors of dtype {reference.dtype} are not supported; valid: {sorted(DTYPES)}")
    d, r = rotation.shape if rotation is not None else (proj_w.shape[1], proj_w.shape[0])
    spec: dict[str, Any] = {"type": kind, "embed_dim": int(d), "low_rank_dimension": int(r), "dropout": 0.0,
                            "dtype": dtype_name(reference.dtype)}
    if kind not in ("consreft", "lobireft"):
        spec.update(act_fn=act_fn, add_bias=source_b is not None)
    if kind == "noreft":
        spec["proj_bias"] = proj_b is not None
    if kind == "direft" and proj_b is not None:
        logger.info("%s: dropping proj_layer.bias of %s; it never enters the output", path, cls)

    module = build_intervention(spec)
    try:
        with torch.no_grad():
            if rotation is not None:
                _check_orthonormal(rotation, path)
                module.rotate_layer.assign(rotation)
            if kind in ("consreft", "lobireft"):
                module.learned_source.copy_(source_b)
            else:
                module.learned_source.weight.copy_(source_w)
                if source_b is not None:
                    module.learned_source.bias.copy_(source_b)
            if proj_w is not None:
                module.proj_layer.weight.copy_(proj_w)
                if kind == "noreft" and proj_b is not None:
                    module.proj_layer.bias.copy_(proj_b)
    except RuntimeError as e:  # shape mismatch between tensors of one file
        raise ValueError(f"{path}: tensor shapes do not fit a {cls} with embed_dim={d}, rank={r}: {e}") from None
    return spec, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _check_orthonormal(rotation: torch.Tensor, path: Path) -> None:
    r64 = rotation.double()  # (d, r)
    error = (r64.T @ r64 - torch.eye(r64.shape[1], dtype=torch.float64)).abs().max().item()
    if error > 1e-3:
        logger.warning("%s: pyreft's R is not orthonormal (max |RᵀR - I| = %.1e; torch's Householder map zeroes "
                       "a column of R once weight decay moves its diagonal). alignkit uses the orthonormal Q factor "
                       "of that R, so outputs will differ from pyreft's", path, error)
