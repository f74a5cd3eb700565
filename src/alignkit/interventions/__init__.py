"""ReFT interventions: one nn.Module per type, registered by name on import.

| type          | class        | equation                          | pyreft class            |
|---------------|--------------|-----------------------------------|-------------------------|
| "loreft"      | LoReFT       | h + Rᵀ(act(Wh + b) − Rh)          | LoreftIntervention      |
| "noreft"      | NoReFT       | h + W₂ᵀ(act(W₁h + b) − W₂h − c)   | NoreftIntervention      |
| "direft"      | DiReFT       | h + W₂ᵀ act(W₁h + b)  (paper eq.3)| NodireftIntervention    |
| "direft_orth" | DiReFTOrth   | h + Rᵀ act(Wh + b)                | DireftIntervention      |
| "consreft"    | ConsReFT     | h + Rᵀ(b − Rh)                    | ConsreftIntervention    |
| "lobireft"    | LobiReFT     | h + Rᵀb                           | LobireftIntervention    |

R has orthonormal rows. Build one from a spec with `build_intervention({"type": "loreft", ...})`.

The public ReFT API is importable from here as well (loaded lazily, so importing the intervention types
does not import `transformers.Trainer`):

    from alignkit.interventions import (ReftConfig, RepresentationConfig, get_reft_model, ReftModel,
                                        save_reft, load_reft, load_pyreft, ReftTrainer)
"""

from __future__ import annotations

import importlib
from typing import Any

from alignkit.interventions.base import (
    ACTIVATIONS, DTYPES, INTERVENTIONS, Intervention, LowRankRotation, build_intervention, get_activation,
    register_intervention, resolve_dtype,
)
from alignkit.interventions.consreft import ConsReFT
from alignkit.interventions.direft import DiReFT
from alignkit.interventions.direft_orth import DiReFTOrth
from alignkit.interventions.lobireft import LobiReFT
from alignkit.interventions.loreft import LoReFT
from alignkit.interventions.noreft import NoReFT
from alignkit.interventions.pyreft_compat import PYREFT_TYPE_MAPPING, PyreftIntervention, read_pyreft_folder

__all__ = [
    "ACTIVATIONS", "DTYPES", "INTERVENTIONS", "Intervention", "LowRankRotation", "build_intervention",
    "get_activation", "register_intervention", "resolve_dtype",
    "LoReFT", "NoReFT", "DiReFT", "DiReFTOrth", "ConsReFT", "LobiReFT",
    "PYREFT_TYPE_MAPPING", "PyreftIntervention", "read_pyreft_folder",
    "ReftConfig", "RepresentationConfig", "get_reft_model", "ReftModel", "save_reft", "load_reft", "load_pyreft",
    "ReftTrainer", "ReftPositionError",
]

# public name -> submodule that defines it (imported on first access)
_LAZY = {
    "ReftConfig": "config", "RepresentationConfig": "config",
    "get_reft_model": "attach", "ReftModel": "attach",
    "save_reft": "io", "load_reft": "io", "load_pyreft": "io",
    "ReftTrainer": "training", "ReftPositionError": "editing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
