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

# The built-in intervention types: module -> class. Importing a type's module registers it in
# `base.INTERVENTIONS`; `intervention_types()` imports them all. The package itself imports nothing heavy, so
# `alignkit.interventions.config` (ReftConfig, plain data) is read by the settings without importing torch.
BUILTIN_TYPES = {"loreft": "LoReFT", "noreft": "NoReFT", "direft": "DiReFT", "direft_orth": "DiReFTOrth",
                 "consreft": "ConsReFT", "lobireft": "LobiReFT"}

# public name -> submodule that defines it (imported on first access)
_LAZY = {
    **{name: "base" for name in ("ACTIVATIONS", "DTYPES", "INTERVENTIONS", "Intervention", "LowRankRotation",
                                 "build_intervention", "get_activation", "register_intervention", "resolve_dtype")},
    **{cls: module for module, cls in BUILTIN_TYPES.items()},
    **{name: "pyreft_compat" for name in ("PYREFT_TYPE_MAPPING", "PyreftIntervention", "read_pyreft_folder")},
    "ReftConfig": "config", "RepresentationConfig": "config",
    "get_reft_model": "attach", "ReftModel": "attach",
    "save_reft": "io", "load_reft": "loading", "load_pyreft": "loading",
    "ReftTrainer": "training", "ReftPositionError": "editing",
}

__all__ = ["BUILTIN_TYPES", "intervention_types", *_LAZY]


def intervention_types() -> dict[str, type]:
    """The intervention registry (`base.INTERVENTIONS`: name -> class), the built-in types registered."""
    for module in BUILTIN_TYPES:
        importlib.import_module(f"{__name__}.{module}")
    return importlib.import_module(f"{__name__}.base").INTERVENTIONS


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        if _LAZY[name] != "config":
            intervention_types()
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
