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
"""

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
]
