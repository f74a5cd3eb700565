"""ADAPTERS: the one test table of adapter kinds, shared by every test file (as PEFT's testing_common.py), and
`perturb`, which moves an adapted model's trainable weights off their initial values.

Each row says what the generic tests (`tests/adapters/test_protocol.py`) expect of a kind; other test files
take their kind lists and configs from here. Adding an adapter kind: its file in `src/alignkit/adapters/`,
its row in `alignkit.adapters.config.KINDS`, and one row below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignkit.adapters.config import AdapterConfig, LoraSettings, ReftSettings


@dataclass(frozen=True)
class AdapterRow:
    kind: str
    lora: bool  # has a LoRA part (served rows route through a LoRA)
    reft: bool  # has a ReFT part (needs adapter.reft; served rows carry ReFT positions)
    whole_model: bool  # trains (and saves) the whole model: no switching off, not servable as an adapter
    files: tuple[str, ...]  # what a saved folder holds besides alignkit_adapter.json

    @property
    def can_switch_off(self) -> bool:
        return not self.whole_model

    def config(self, positions: str = "f1+l1", lora_r: int = 2, lora_alpha: float = 4.0, reft_rank: int = 2,
               layers: tuple[int, ...] = (0, 1)) -> AdapterConfig:
        """A small config of this kind: LoRA rank `lora_r`, ReFT rank `reft_rank` on `layers` at `positions` (each only
        for a kind with that part: apply_adapter refuses settings of a part the kind lacks)."""
        reps = [{"layer": layer, "low_rank_dimension": reft_rank} for layer in layers]
        return AdapterConfig(kind=self.kind, lora=LoraSettings(r=lora_r, alpha=lora_alpha) if self.lora else LoraSettings(),
                             reft=ReftSettings(config={"representations": reps}, positions=positions) if self.reft else None)


LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
REFT_FILES = ("reft_config.json", "interventions.safetensors")

ADAPTERS = (
    AdapterRow("full", lora=False, reft=False, whole_model=True, files=("config.json", "model.safetensors")),
    AdapterRow("lora", lora=True, reft=False, whole_model=False, files=LORA_FILES),
    AdapterRow("reft", lora=False, reft=True, whole_model=False, files=REFT_FILES),
    AdapterRow("reft+lora", lora=True, reft=True, whole_model=False, files=LORA_FILES + REFT_FILES),
)

ROWS = {row.kind: row for row in ADAPTERS}
KINDS = tuple(ROWS)  # every kind
SWITCHABLE = tuple(row.kind for row in ADAPTERS if row.can_switch_off)  # kinds whose reference is "adapter off"
REFT_KINDS = tuple(row.kind for row in ADAPTERS if row.reft)


def adapter_config(kind: str, **kw) -> AdapterConfig:
    """`ROWS[kind].config(**kw)`."""
    return ROWS[kind].config(**kw)


def perturb(model: nn.Module, scale: float = 0.2, seed: int = 1) -> nn.Module:
    """Add `scale` * N(0, 1) noise (a generator seeded with `seed`) to every trainable parameter, in place, so an
    adapter does something (a LoRA starts as the identity) and the policy is no longer its reference (DPO not
    at log 2). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model
