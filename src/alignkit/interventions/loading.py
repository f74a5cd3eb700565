"""A new `ReftModel` from a saved folder: `load_reft` (alignkit's format, `io.py`) and `load_pyreft` (a pyreft
checkpoint, `pyreft_compat.py`). Above both `attach.py` (the wrapper) and `io.py` (the file format), which
`ReftModel.save_pretrained` / `load_adapter` use directly.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from alignkit.interventions.attach import ReftModel
from alignkit.interventions.config import ReftConfig, RepresentationConfig
from alignkit.interventions.io import load_adapter_into
from alignkit.interventions.locate import hf_model, hidden_size
from alignkit.interventions.pyreft_compat import read_pyreft_folder


def load_reft(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> ReftModel:
    """Wrap `model` (freezing it) and attach the adapter saved in `folder`."""
    reft = ReftModel(model)
    load_adapter_into(reft, folder, adapter_name)
    return reft


def load_pyreft(model: nn.Module, folder: str | Path, act_fn: str | None = None,
                adapter_name: str = "default", positions: str | None = None,
                share_weights: bool = True) -> ReftModel:
    """Wrap `model` with the interventions of a pyreft checkpoint folder (`pyreft_compat`).

    pyreft records neither `act_fn` nor the positions it trained on: pass them. With `positions` ("f1+l1", and
    `share_weights` as in training) a call without `intervention_locations` (`generate(**inputs)`) edits those
    positions and `save_adapter` can describe the model; without, such a call edits nothing (one warning)."""
    items = read_pyreft_folder(folder, act_fn=act_fn)
    width = hidden_size(hf_model(model))
    reps, modules = [], []
    for i, item in enumerate(items):
        spec = dict(item.spec)
        if spec.get("embed_dim") not in (None, width):
            raise ValueError(f"{folder}/{item.weight_file.name}: intervention {i} has embed_dim={spec['embed_dim']} "
                             f"but the model's hidden size is {width}; load it onto the model it was trained on")
        kind = spec.pop("type")
        spec.pop("dtype", None)
        named = {k: spec.pop(k) for k in ("low_rank_dimension", "dropout", "act_fn", "add_bias", "embed_dim")
                 if k in spec}
        reps.append(RepresentationConfig(layer=item.layer, component=item.component, intervention=kind,
                                         extra=spec, **named))
        modules.append(item.build())
    config = ReftConfig(reps, positions=positions, share_weights=share_weights)  # a bad spec: before wrapping
    reft = ReftModel(model)
    reft.add_adapter(adapter_name, config, modules)
    return reft


__all__ = ["load_pyreft", "load_reft"]
