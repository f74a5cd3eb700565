"""Variable-length attention for padding-free batches on sdpa: linear layers on real tokens only.

A padding-free batch holds R sequences concatenated in ONE row (1, S), positions restarting at 0 per sequence
(`alignkit.data.collators.pack`, `row_length=None`). Flash-attention runs such a row with its varlen kernels.
sdpa / eager have none: transformers builds a dense block-diagonal (S, S) mask, so alignkit used to bin the
sequences into rows of the batch's longest sequence instead. This module gives sdpa models
the varlen layout too: every layer's projections, MLP, norms and rotary embedding run on the S real tokens (no
padding at all), and the attention runs on each sequence's slice of the row alone (`is_causal=True`, no mask):
sum of n_r^2 attention work instead of R * T_max^2 for the padded batch (measured, 8-16 sequences of 17-97
tokens, fwd + bwd, 1 thread: 25-35 % less than one padded sdpa call, and no copies into a padded layout).
A shared-prompt member k >= 1 queries only its own tokens, over the prompt's and its own keys, with the causal
mask of that suffix (`VarlenLayout.suffix_mask`; CPU sdpa runs it in its flash kernel): no attention work on
prompt queries whose outputs member 0 already gives. Queries, keys and values are cut into the calls' pieces
with one `split` per layer (`VarlenLayout.segments`).

`VarlenLayout` holds the attention calls (each sequence's columns), computed once per batch from the sequence
lengths (`varlen_layout`; `shared_varlen_layout` for shared-prompt groups, each member attending over the prompt
and its own tokens); it travels to every attention call as the model-forward keyword
`alignkit_varlen` (transformers passes unknown forward keywords down to the attention function). While
`varlen_attention(lm)` is entered, the config names the attention function `alignkit_varlen_sdpa` (registered
in transformers' `AttentionInterface`; no mask function is registered for it, so transformers builds no
mask at all). The function refuses a call without the layout, so a forward that lost the keyword fails
loudly instead of attending across sequences.

Same values as the padded batch up to float rounding (different matmul shapes, the causal kernel instead
of a masked one); tests/trainers/test_varlen.py bounds the difference. Not with activation checkpointing:
its recomputation runs in backward, after the context has restored the config (`usable` says no).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

VARLEN_SDPA = "alignkit_varlen_sdpa"
LAYOUT_KEY = "alignkit_varlen"


@dataclass(frozen=True)
class VarlenLayout:
    """The attention calls of a packed row of `length` tokens: each call is (column ranges, keep). Its queries, keys
    and values are the row's columns in those ranges, concatenated (a sequence, or a shared prompt followed by one
    member's own tokens); it attends causally, and its outputs from query `keep` on are the outputs of its last
    range's columns. The kept outputs of all calls, in order, are the row's outputs, column by column."""
    calls: tuple[tuple[tuple[tuple[int, int], ...], int], ...]
    length: int

    @cached_property
    def segments(self) -> tuple[list[int], tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]]:
        """The row cut at every range's ends: (segment sizes, per call (its key segments, its query segments)).
        Attention takes its inputs as `split` pieces (one backward copy for the whole row) rather than slices
        (each slice's backward writes a zero tensor of the whole row). A call with `keep` > 0 queries its last
        range only (the outputs it keeps), over keys of all its ranges (`suffix_mask`)."""
        cuts = sorted({0, self.length} | {e for ranges, _ in self.calls for r in ranges for e in r})
        index = {c: i for i, c in enumerate(cuts)}
        sizes = [b - a for a, b in zip(cuts, cuts[1:])]
        calls = []
        for ranges, keep in self.calls:
            if keep != sum(b - a for a, b in ranges[:-1]):
                raise ValueError(f"VarlenLayout: a call keeps its outputs from query {keep} on, but its ranges "
                                 f"{ranges} put its last range at {sum(b - a for a, b in ranges[:-1])}")
            key = tuple(i for a, b in ranges for i in range(index[a], index[b]))
            last = ranges[-1]
            calls.append((key, tuple(range(index[last[0]], index[last[1]])) if keep else key))
        return sizes, tuple(calls)

    @cached_property
    def kept_positions(self) -> tuple[Tensor, Tensor]:
        """((length,) call index, (length,) position inside its call) of each column whose output a call keeps
        (-1, -1 for a column no call keeps); on the host."""
        call_of = torch.full((self.length,), -1, dtype=torch.long)
        pos_of = torch.full((self.length,), -1, dtype=torch.long)
        for i, (ranges, keep) in enumerate(self.calls):
            cols = torch.cat([torch.arange(a, b) for a, b in ranges])
            call_of[cols[keep:]] = i
            pos_of[cols[keep:]] = torch.arange(keep, cols.numel())
        return call_of, pos_of

    @cached_property
    def _masks(self) -> dict:
        return {}

    def suffix_mask(self, n: int, keep: int, device: torch.device) -> Tensor:
        """(n, keep + n) bool: query i (the i-th of the last n columns) sees key j when j <= keep + i, i.e. the
        causal mask of the whole call, restricted to its last n queries. Built once per batch and device."""
        k = (n, keep, device)
        if k not in self._masks:
            self._masks[k] = torch.ones(n, keep + n, dtype=torch.bool, device=device).tril(keep)
        return self._masks[k]


def varlen_layout(lengths: Tensor | list[int]) -> VarlenLayout:
    """The layout of sequences of `lengths` (R,) packed back to back in one row (one host sync per batch)."""
    calls, start = [], 0
    for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths):
        calls.append((((start, start + int(n)),), 0))
        start += int(n)
    return VarlenLayout(tuple(calls), start)


def shared_varlen_layout(groups: list[tuple[int, list[int]]]) -> VarlenLayout:
    """The layout of shared-prefix groups packed back to back: group g = (P, [n_0, n_1, ...]) is its prefix of P
    tokens, then member k's n_k tokens after it, for each member in order. Member 0 attends as one sequence (prefix
    + its tokens); member k >= 1 attends over the prefix followed by its own tokens, keeping the outputs of its own
    tokens (its prefix outputs are member 0's)."""
    calls, o = [], 0
    for P, members in groups:
        calls.append((((o, o + P + members[0]),), 0))
        start = o + P + members[0]
        for n in members[1:]:
            calls.append((((o, o + P), (start, start + n)), P))
            start += n
        o = start
    return VarlenLayout(tuple(calls), o)


def segment_columns(pieces: tuple[Tensor, ...], segments: tuple[int, ...]) -> Tensor:
    """The `split` pieces (dim 2) of a row at `segments` (indices into `VarlenLayout.segments`' sizes), concatenated."""
    if len(segments) == 1:
        return pieces[segments[0]]
    return torch.cat([pieces[i] for i in segments], 2)


def varlen_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention-interface function: causal sdpa on each sequence of a packed row alone."""
    layout = kwargs.get(LAYOUT_KEY)
    if not isinstance(layout, VarlenLayout):
        raise RuntimeError(f"{VARLEN_SDPA}: the attention call got no `{LAYOUT_KEY}` layout (the model did not pass "
                           "its forward keywords to the attention function): this model cannot run padding-free "
                           "rows with sdpa; train it with padding_free=False")
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != layout.length:
        raise RuntimeError(f"{VARLEN_SDPA}: expected one packed row of {layout.length} tokens and no mask, got query "
                           f"{tuple(query.shape)}" + (" and a mask" if attention_mask is not None else ""))
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise RuntimeError(f"{VARLEN_SDPA}: soft-capped / sliding-window attention is not supported")
    gqa = query.shape[1] != key.shape[1]
    sizes, segments = layout.segments
    q, k, v = query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)
    outs = []
    for (_, keep), (seg, qseg) in zip(layout.calls, segments):
        qc = segment_columns(q, qseg)
        mask = layout.suffix_mask(qc.shape[2], keep, query.device) if keep else None
        outs.append(F.scaled_dot_product_attention(qc, segment_columns(k, seg), segment_columns(v, seg),
                                                   attn_mask=mask, dropout_p=dropout,
                                                   scale=scaling, is_causal=not keep, enable_gqa=gqa))  # (1, H, n, D)
    return torch.cat(outs, 2).transpose(1, 2), None  # (1, S, H, D)


_registered = False


def register() -> None:
    """Register `varlen_sdpa_attention` under VARLEN_SDPA in transformers' AttentionInterface (once)."""
    global _registered
    if not _registered:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
        _registered = True


def _checkpointing(lm: nn.Module) -> bool:
    # what transformers' `is_activation_checkpointing` reads (its old name `is_gradient_checkpointing` warns since 5.2x)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in lm.modules())


def usable(lm: nn.Module) -> bool:
    """True when `lm` (a transformers model) can run a packed row with `varlen_attention`: sdpa attention (the
    config's own, sub-configs included), no sliding window or soft-capping, no activation checkpointing."""
    cfg = lm.config
    configs = [cfg] + [getattr(cfg, n) for n in getattr(cfg, "sub_configs", {}) if getattr(cfg, n, None) is not None]
    for c in configs:
        if str(getattr(c, "_attn_implementation", "") or "") != "sdpa":
            return False
        if getattr(c, "sliding_window", None) or getattr(c, "attn_logit_softcapping", None):
            return False
    return not _checkpointing(lm)


# architectures whose attention receives the forward keywords (tests/trainers/test_varlen.py and
# tests/compat/test_transformers_models.py run each)
VARLEN_MODEL_TYPES = frozenset({"llama", "qwen2", "gpt2", "gpt_neox"})


def runs_varlen(lm: nn.Module, checkpointing: bool = False) -> bool:
    """True when a packed row of the transformers model `lm` runs through `varlen_sdpa_attention`: a tested
    architecture (VARLEN_MODEL_TYPES) that is `usable` and not about to checkpoint activations."""
    return not checkpointing and getattr(lm.config, "model_type", None) in VARLEN_MODEL_TYPES and usable(lm)


@contextlib.contextmanager
def varlen_attention(lm: nn.Module) -> Iterator[None]:
    """While entered, `lm`'s attention is `varlen_sdpa_attention` (its config's `_attn_implementation`, shared by
    every layer); restored on exit."""
    register()
    cfg = lm.config
    before = cfg._attn_implementation
    cfg._attn_implementation = VARLEN_SDPA
    try:
        yield
    finally:
        cfg._attn_implementation = before


__all__ = ["LAYOUT_KEY", "VARLEN_MODEL_TYPES", "VARLEN_SDPA", "VarlenLayout", "register", "runs_varlen",
           "segment_columns", "shared_varlen_layout", "usable",
           "varlen_attention", "varlen_layout", "varlen_sdpa_attention"]
