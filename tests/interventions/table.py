"""The intervention test table, shared by every test file (as tests/adapters/table.py's ADAPTERS is for adapter
kinds): one row per built-in type. Adding a type = its file in src/alignkit/interventions/ + one row here; the
generic tests (maths, save/load, every component, pyreft mapping) then cover it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class InterventionRow:
    kind: str
    orthogonal: bool  # R has orthonormal rows (stored as rotate_layer.weight = Rᵀ)
    component: str  # where tests/interventions/test_attach.py's mixed config puts it
    variants: tuple[dict[str, Any], ...] = ()  # non-default constructor arguments, checked against the maths
    saved: dict[str, Any] = field(default_factory=dict)  # RepresentationConfig arguments for the save/load round trip


INTERVENTION_ROWS = (
    InterventionRow("loreft", True, "block_output", ({"act_fn": "relu", "add_bias": False},),
                    dict(act_fn="relu", add_bias=False, dropout=0.1)),
    InterventionRow("noreft", False, "mlp_output", ({"act_fn": "tanh", "proj_bias": True},),
                    dict(extra={"proj_bias": True})),
    InterventionRow("direft", False, "attention_output", ({"act_fn": "silu"},), dict(act_fn="silu")),
    InterventionRow("consreft", True, "attention_input", (), {}),
    InterventionRow("lobireft", True, "block_input", (), dict(dropout=0.2)),
    InterventionRow("direft_orth", True, "mlp_input", ({"act_fn": "gelu"},), dict(act_fn="gelu")),
)
KINDS = [r.kind for r in INTERVENTION_ROWS]
