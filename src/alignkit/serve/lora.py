"""Per-row LoRA for mixed-adapter batches, gathered and batched (the idea of S-LoRA / Punica's BGMV kernels).

peft's mixed-adapter forward (`adapter_names=[...]`) registers hooks on every LoRA layer for each call and
loops in Python over the adapters present in every layer; on a small model that costs more than the model.
Here, for every LoRA-wrapped `nn.Linear`, the A and B matrices of all served adapters are stacked once at
load time (`A: (n + 1, r, in)`, `B: (n + 1, out, r)`, rank padded to the largest with zeros; slot 0 is all
zeros = no LoRA), peft's own LoRA path is switched off, and a forward hook adds, for row b routed to slot s_b,

    delta[b] = scaling[s_b] * (x[b] @ A[s_b]^T) @ B[s_b]^T          # (T, out), two batched matmuls per layer

the same sum peft computes (`lora_B(lora_A(x)) * scaling`, dropout being off in eval). When every row uses
the same slot the gather is skipped (plain matmuls), and when no row uses LoRA the hook returns at once.

Only vanilla LoRA on `nn.Linear` qualifies; DoRA and other variants, LoRA biases, or adapters on other
layer types make `StackedLora.build` return None, and the engine then uses peft's `adapter_names` path.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class StackedLora:
    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.slot = {n: i + 1 for i, n in enumerate(self.names)}  # 0 = no LoRA
        self._rows: torch.Tensor | None = None  # (B,) slot per row, on the model's device
        self._single: int | None = None  # the one slot every row uses (None: mixed)
        self._handles: list = []

    @classmethod
    def build(cls, peft_model: nn.Module, names: Sequence[str]) -> "StackedLora | None":
        """Stack the LoRA weights of `names` from `peft_model`; None if any layer is not vanilla LoRA on Linear."""
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear

        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for m in layers:
            if not isinstance(m, LoraLinear) or not isinstance(m.base_layer, nn.Linear):
                logger.info("serve: %s is not LoRA on nn.Linear: peft's mixed batches are used", type(m).__name__)
                return None
            if getattr(m, "lora_variant", None) or any(getattr(m, "use_dora", {}).get(n, False) for n in names):
                logger.info("serve: a LoRA variant (e.g. DoRA) is loaded: peft's mixed batches are used")
                return None
            if any(m.lora_B[n].bias is not None for n in names if n in m.lora_B):
                logger.info("serve: LoRA with biases: peft's mixed batches are used")
                return None
        self = cls(names)
        for m in layers:
            base = m.base_layer
            present = [n for n in names if n in m.lora_A]
            if not present:
                continue
            r = max(m.lora_A[n].weight.shape[0] for n in present)
            w = base.weight
            A = w.new_zeros(len(names) + 1, r, base.in_features)  # (n+1, r, in)
            B = w.new_zeros(len(names) + 1, base.out_features, r)  # (n+1, out, r)
            scale = w.new_zeros(len(names) + 1)  # (n+1,)
            for n in present:
                s, a, b = self.slot[n], m.lora_A[n].weight, m.lora_B[n].weight
                A[s, :a.shape[0]] = a.detach().to(w.dtype)
                B[s, :, :b.shape[1]] = b.detach().to(w.dtype)
                scale[s] = float(m.scaling[n])
            self._handles.append(base.register_forward_hook(self._hook(A, B, scale)))
        peft_model.base_model.disable_adapter_layers()  # peft's own LoRA path off: the hooks add the deltas
        return self

    def _hook(self, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor):
        def hook(mod, args, out):
            rows = self._rows
            if rows is None or self._single == 0:
                return None
            x = args[0].to(A.dtype)  # (Bt, T, in)
            if self._single is not None:
                s = self._single
                delta = (x @ A[s].T) @ B[s].T * scale[s]  # (Bt, T, out)
            else:
                delta = torch.bmm(torch.bmm(x, A[rows].transpose(1, 2)), B[rows].transpose(1, 2))  # (Bt, T, out)
                delta = delta * scale[rows][:, None, None]
            return out + delta.to(out.dtype)
        return hook

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None], device: torch.device) -> Iterator[None]:
        """Inside this block, row b of every forward gets LoRA `names[b]` (None: none)."""
        slots = [self.slot[n] if n is not None else 0 for n in names]
        self._single = slots[0] if all(s == slots[0] for s in slots) else None
        self._rows = torch.tensor(slots, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self._rows, self._single = None, None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["StackedLora"]
