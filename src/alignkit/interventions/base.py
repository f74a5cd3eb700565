"""The intervention contract and its registry.

An intervention is an `nn.Module` that maps hidden states `h: (N, d) -> (N, d)`, where N counts the
selected (row, position) pairs gathered from a batch. Its constructor takes typed arguments only (no
`**kwargs`), and `spec()` returns every one of them as JSON-able values so that
`build_intervention(spec)` rebuilds it exactly. Dropout acts on the edit, never on `h` itself, and is
off in `eval()` mode.

Adding a type: one file with a subclass decorated by `@register_intervention("name")`, plus one row in
the generic test table (tests/interventions).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

INTERVENTIONS: dict[str, type["Intervention"]] = {}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def get_activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if name is None:
        return ACTIVATIONS["identity"]
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


class Intervention(nn.Module):
    """Base class. Subclasses set `kind` (via the registry decorator) and implement `forward(h)`."""

    kind: ClassVar[str] = ""

    def spec(self) -> dict[str, Any]:
        """Every constructor argument, JSON-able, plus `type`. Subclasses must override."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        raise NotImplementedError


def register_intervention(name: str) -> Callable[[type[Intervention]], type[Intervention]]:
    def deco(cls: type[Intervention]) -> type[Intervention]:
        if name in INTERVENTIONS and INTERVENTIONS[name] is not cls:
            raise ValueError(f"intervention type {name!r} is already registered by {INTERVENTIONS[name].__name__}")
        cls.kind = name
        INTERVENTIONS[name] = cls
        return cls

    return deco


def build_intervention(spec: dict[str, Any]) -> Intervention:
    """Rebuild an intervention from `spec()` output (a dict with `type` and constructor arguments)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in INTERVENTIONS:
        raise ValueError(f"unknown intervention type {kind!r}; valid: {sorted(INTERVENTIONS)}")
    return INTERVENTIONS[kind](**spec)
