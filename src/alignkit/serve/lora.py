"""Per-row LoRA for mixed-adapter batches, without a Python loop over adapters (cf. S-LoRA / Punica).

peft's mixed-adapter forward (`adapter_names=[...]`) registers hooks on every LoRA layer for each call and
loops in Python over the adapters present in every layer; on a small model that costs more than the model.
Here, for every LoRA-wrapped `nn.Linear`, the A and B matrices of all n served adapters are concatenated once
at load time along the rank axis (`A: (n R, in)`, `B: (out, n R)`, each adapter's rank zero-padded to the
largest R), peft's own LoRA path is switched off, and a forward hook adds

    delta = ((x @ A^T) * M) @ B^T          # x: (Bt, T, in); M: (Bt, 1, n R)

where row b's mask M[b] holds its adapter's `scaling` on that adapter's R columns and 0 elsewhere: row b gets
exactly `scaling * (x[b] @ A_s^T) @ B_s^T`, peft's `lora_B(lora_A(x)) * scaling` (dropout is off in eval), and
a row without LoRA gets an exact zero. Two dense matmuls per layer whatever the mix (the n-fold wider first
product is cheap while n R is small, e.g. 4 adapters x r 8 = 32 columns; thousands of adapters would call for
a gathered kernel instead). When every row uses the same adapter only its block is used; when no row uses
LoRA the hook returns at once.

A module an adapter trains whole (`modules_to_save`, e.g. `lm_head`) is peft's `ModulesToSaveWrapper`, which
`disable_adapter_layers` switches off too (it then gives the base's module): a hook on it gives each row of such an
adapter that adapter's trained copy (row P13; they were answered with the base's module). peft's own mixed batches
cannot serve it beside an adapter without that module (a KeyError on the adapter's name).

Only vanilla LoRA on `nn.Linear` qualifies; DoRA and other variants, LoRA biases, adapters on other
layer types, or peft's other auxiliary wrappers (trainable tokens) make `StackedLora.build` return None, and the
engine then uses peft's `adapter_names` path.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

logger = logging.getLogger(__name__)


class StackedLora:
    def __init__(self, names: Sequence[str], rank: int):
        self.names = list(names)
        self.rank = rank  # R: every adapter's block width (its rank zero-padded)
        self.slot = {n: i for i, n in enumerate(self.names)}
        self.scaling: dict[tuple[int, str], float] = {}
        self._mask: torch.Tensor | None = None  # (Bt, 1, n R), None: no routing set
        self._single: int | None = None  # the adapter index every row uses (-1: none; None: mixed)
        self._single_scale: torch.Tensor | None = None
        self._handles: list = []
        self._row_names: list[str | None] | None = None  # each row's adapter (None: none) while `route` is on

    @classmethod
    def build(cls, peft_model: nn.Module, names: Sequence[str]) -> "StackedLora | None":
        """Stack the LoRA weights of `names` from `peft_model`; None if any layer is not vanilla LoRA on Linear."""
        saved = [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]
        if any(isinstance(m, AuxiliaryTrainingWrapper) and not isinstance(m, ModulesToSaveWrapper)
               for m in peft_model.modules()):
            logger.info("serve: a LoRA adapter has trainable tokens: peft's mixed batches are used")
            return None
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
        ranks = [m.lora_A[n].weight.shape[0] for m in layers for n in names if n in m.lora_A]
        if not ranks:
            return None
        self = cls(names, max(ranks))
        R, n_ad = self.rank, len(names)
        scales = torch.zeros(len(layers), n_ad)
        for li, m in enumerate(layers):
            base = m.base_layer
            w = base.weight
            A = w.new_zeros(n_ad * R, base.in_features)  # (n R, in)
            B = w.new_zeros(base.out_features, n_ad * R)  # (out, n R)
            scale = w.new_zeros(n_ad)  # (n,) this layer's scaling per adapter (0: adapter absent here)
            for n in names:
                if n not in m.lora_A:
                    continue
                i, a, b = self.slot[n], m.lora_A[n].weight, m.lora_B[n].weight
                A[i * R:i * R + a.shape[0]] = a.detach().to(w.dtype)
                B[:, i * R:i * R + b.shape[1]] = b.detach().to(w.dtype)
                scale[i] = float(m.scaling[n])
            scales[li] = scale
            self._handles.append(base.register_forward_hook(self._hook(A, B, scale)))
        if not torch.all(scales == scales[:1]):  # layers with different scalings need their own masks
            logger.info("serve: LoRA scalings differ between layers: masks are built per layer")
            self._per_layer = True
        else:
            self._per_layer = False
        self._scale = scales[0]
        for m in saved:  # disable_adapter_layers() below makes them give the base's module: each row gets its copy
            self._handles.append(m.register_forward_hook(self._saved_hook(m), with_kwargs=True))
        peft_model.base_model.disable_adapter_layers()  # peft's own LoRA path off: the hooks add the deltas
        return self

    def _hook(self, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor):
        R = self.rank

        def hook(mod, args, out):
            if self._mask is None or self._single == -1:
                return None
            x = args[0].to(A.dtype)  # (Bt, T, in)
            if self._single is not None:
                i = self._single
                delta = (x @ A[i * R:(i + 1) * R].T) @ B[:, i * R:(i + 1) * R].T * scale[i]  # (Bt, T, out)
            else:
                mask = self._mask if not self._per_layer else self._layer_mask(scale)
                delta = ((x @ A.T) * mask) @ B.T  # (Bt, T, n R) -> (Bt, T, out)
            return out + delta.to(out.dtype)
        return hook

    def _saved_hook(self, wrapper: ModulesToSaveWrapper):
        copies = wrapper.modules_to_save  # adapter name -> its trained copy of the module

        def hook(mod, args, kwargs, out):
            rows_of = {n: [b for b, m in enumerate(self._row_names or ()) if m == n] for n in copies}
            rows_of = {n: rows for n, rows in rows_of.items() if rows}
            if not rows_of:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            out = out.clone()
            for n, rows in rows_of.items():
                idx = torch.tensor(rows, device=out.device)
                out[idx] = copies[n](x[idx.to(x.device)], *args[1:], **kwargs).to(out.dtype)
            return out
        return hook

    def _layer_mask(self, scale: torch.Tensor) -> torch.Tensor:
        onehot = self._onehot  # (Bt, n)
        return (onehot * scale[None, :]).repeat_interleave(self.rank, dim=1)[:, None, :]

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None], device: torch.device) -> Iterator[None]:
        """Inside this block, row b of every forward gets LoRA `names[b]` (None: none)."""
        idx = [self.slot[n] if n is not None else -1 for n in names]
        self._single = idx[0] if all(i == idx[0] for i in idx) else None
        onehot = torch.zeros(len(idx), len(self.names), device=device)  # (Bt, n)
        for b, i in enumerate(idx):
            if i >= 0:
                onehot[b, i] = 1.0
        self._onehot = onehot
        self._row_names = list(names)
        self._mask = (onehot * self._scale.to(device)[None, :]).repeat_interleave(self.rank, dim=1)[:, None, :]
        try:
            yield
        finally:
            self._mask, self._single, self._onehot, self._row_names = None, None, None, None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["StackedLora"]
