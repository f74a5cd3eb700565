"""The last decoder layer on the positions a loss reads only.

A decoder layer's output at position t feeds the next layer's keys and values everywhere after t; the LAST layer's
output feeds only the final norm and the head, position by position. A loss that reads some positions of the
final hidden states (an SFT / DPO / KTO loss: the positions whose next token is a completion token; a reward
model: the one token each sequence is pooled at) needs the last layer's queries, attention output, output
projection and MLP at those positions only; its keys and values are still needed at every position. On the
tiny model of the CPU benchmark (4 layers) the last layer is ~21 % of an SFT step; completion tokens are about
half of the tokens there, and a reward model reads one token per sequence. On a 32-layer model the saving is
1/32 of that: small, and free.

`reading(model, lm, read, kwargs)` swaps the last decoder layer's `forward` for the call's duration with one that
computes every row at the columns `read` holds (read: flat indices into the model input's (B, T) positions; the
columns are their union over rows) and returns ZEROS at every other position: a read of a position outside
`read` gets a visibly wrong value, never a plausible one (and no NaN, which a backward would spread). It applies
only where nothing else sees the layer (`unusable_reason`: transformers' own Llama / Qwen2 decoder layer, sdpa or
alignkit's varlen attention, no hook on the layer or inside it (a ReFT intervention there, FSDP2 / ZeRO-3 gathers,
offload) and no global module hook (`alignkit.models.restate`), no activation checkpointing, no compiled layer,
no attention dropout in training, no KV cache, no hidden states or attention weights asked for), and otherwise runs
the model as it is. Values equal the full layer's at the read
positions up to float rounding (another matmul shape, an explicit mask instead of sdpa's causal flag):
tests/models/test_last_layer.py, against the model's own forward, for every layout (padded rows, padded rows
with a custom 4D mask, one packed varlen row, shared-prompt varlen rows), values and gradients.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.models import varlen
from alignkit.models.restate import FAMILIES, family_module, global_hooks, has_hooks

# The families whose decoder layer this module re-states (input norm -> attention -> residual -> post norm -> MLP
# -> residual, rotary from their modeling module's `apply_rotary_pos_emb`), exactly transformers' classes of
# `<Family>DecoderLayer` / `<Family>Attention`; tests/compat pins each against the model.
SUPPORTED = ("llama", "qwen2")
ENABLED = True  # module switch, for A/B measurements (bench) and tests


def _layers(lm: nn.Module) -> nn.ModuleList | None:
    backbone = getattr(lm, "base_model", None)
    layers = getattr(backbone, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def unusable_reason(lm: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why the last decoder layer of the transformers model `lm` must run in full for a forward with `kwargs`
    (None: it may run on the read positions only)."""
    if not ENABLED:
        return "switched off (alignkit.models.last_layer.ENABLED)"
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return "hidden states or attention weights are asked for"
    if kwargs.get("use_cache") is not False or kwargs.get("past_key_values") is not None:
        return "a KV cache may be written (use_cache is not False)"
    layers = _layers(lm)
    if layers is None:
        return f"{type(lm).__name__} has no decoder layer list at base_model.layers"
    layer = layers[-1]
    mod, fam = family_module(lm), FAMILIES.get(getattr(lm.config, "model_type", None))
    if mod is None or lm.config.model_type not in SUPPORTED:
        return f"model_type {getattr(lm.config, 'model_type', None)!r} (the last layer is re-stated for {SUPPORTED})"
    if type(layer) is not getattr(mod, f"{fam}DecoderLayer", None) or \
            type(layer.self_attn) is not getattr(mod, f"{fam}Attention", None):
        return f"{type(layer).__name__} is not exactly transformers' {fam}DecoderLayer with {fam}Attention"
    if not callable(getattr(mod, "apply_rotary_pos_emb", None)):
        return f"modeling_{lm.config.model_type} has no apply_rotary_pos_emb"
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", varlen.VARLEN_SDPA):
        return f"attention implementation {impl!r} (sdpa or alignkit's varlen only)"
    attn = layer.self_attn
    if getattr(attn, "sliding_window", None) is not None:
        return "sliding-window attention"
    if layer.training and float(getattr(attn, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout in training"
    if getattr(layer, "gradient_checkpointing", False):
        return "activation checkpointing is on"
    if "forward" in layer.__dict__ or getattr(layer, "_compiled_call_impl", None) is not None:
        return "the layer's forward is replaced or compiled"
    if global_hooks():
        return "a global module hook is registered (it would see the re-stated layer's calls, not the model's)"
    for m in layer.modules():
        if layer.training and isinstance(m, nn.Dropout) and m.p > 0:  # (LoRA dropout) other draws on fewer rows
            return f"dropout (p={m.p}) in the last layer in training"
        if has_hooks(m) or getattr(m, "_hf_hook", None) is not None or type(m).__name__.startswith("FSDP"):
            return f"a hook on {type(m).__name__} in the last layer (an intervention, sharding or offload)"
    if any(hasattr(p, "ds_id") for p in layer.parameters()):
        return "DeepSpeed ZeRO-3 partitions the last layer"
    return None


@contextlib.contextmanager
def reading(model: nn.Module, lm: nn.Module, read: Tensor | None, kwargs: dict[str, Any]) -> Iterator[None]:
    """Around one `model(**kwargs)` call whose caller reads the final hidden states at the flat (B * T) positions
    `read` only: the last decoder layer of `lm` (the transformers model inside `model`) computes those columns
    only (see the module's docstring). `read` None, or a model `unusable_reason` names: nothing changes."""
    if read is None or read.numel() == 0 or unusable_reason(lm, kwargs) is not None:
        yield
        return
    layer = _layers(lm)[-1]
    layer.forward = functools.partial(_forward, layer, read)
    try:
        yield
    finally:
        layer.__dict__.pop("forward", None)


def _allow_one(mask: Tensor) -> Tensor:
    """A boolean mask whose all-False query rows (a padding column of a shorter row) see key 0: an empty softmax
    row is NaN, which a backward spreads even where its output is never read."""
    empty = ~mask.any(-1, keepdim=True)
    if not bool(empty.any()):
        return mask
    first = torch.zeros(mask.shape[-1], dtype=torch.bool, device=mask.device)
    first[0] = True
    return mask | (empty & first)


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, layout: varlen.VarlenLayout, scale: float,
                      gqa: bool) -> Tensor:
    """Attention of the queries at columns `keep` (sorted) of one packed row, each over its own call's keys."""
    call_of, pos_of = layout.kept_positions
    cols = keep.cpu()
    calls, pos = call_of[cols], pos_of[cols]
    if bool((calls < 0).any()) or bool((calls[1:] < calls[:-1]).any()):
        raise RuntimeError("alignkit.models.last_layer: a read position is no call's output, or the calls' outputs "
                           "are not in column order; run without it (alignkit.models.last_layer.ENABLED = False)")
    counts = torch.bincount(calls, minlength=len(layout.calls)).tolist()
    sizes, segments = layout.segments
    kp, vp, qp = k.split(sizes, 2), v.split(sizes, 2), q.split(counts, 2)
    outs, start = [], 0
    for i, (n, (seg, _)) in enumerate(zip(counts, segments)):
        if n == 0:
            continue
        kc, vc = varlen.segment_columns(kp, seg), varlen.segment_columns(vp, seg)
        p = pos[start:start + n].to(q.device)
        start += n
        mask = torch.arange(kc.shape[2], device=q.device)[None, :] <= p[:, None]  # (n, keys of the call)
        outs.append(F.scaled_dot_product_attention(qp[i], kc, vc, attn_mask=mask, scale=scale, enable_gqa=gqa))
    return torch.cat(outs, 2)


def _forward(layer: nn.Module, read: Tensor, hidden_states: Tensor, attention_mask: Tensor | None = None,
             position_ids: Tensor | None = None, position_embeddings: tuple[Tensor, Tensor] | None = None,
             **kwargs: Any) -> Tensor:
    """The decoder layer's forward at the columns of `read` (zeros elsewhere)."""
    B, T, d = hidden_states.shape
    keep = torch.unique(read.to(hidden_states.device) % T)  # (K,) sorted columns
    attn = layer.self_attn
    hd = attn.head_dim
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's (`unusable_reason` checked it)
    cos, sin = position_embeddings
    x = layer.input_layernorm(hidden_states)  # (B, T, d): every position's keys and values are read
    q = attn.q_proj(x[:, keep]).view(B, keep.numel(), -1, hd).transpose(1, 2)  # (B, H, K, hd)
    k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    q, _ = rope(q, q, cos[:, keep], sin[:, keep])
    _, k = rope(k, k, cos, sin)
    gqa = q.shape[1] != k.shape[1]
    layout = kwargs.get(varlen.LAYOUT_KEY)
    if isinstance(layout, varlen.VarlenLayout):
        if B != 1 or attention_mask is not None:
            raise RuntimeError("alignkit.models.last_layer: a varlen layout with more than one row or a mask")
        o = _varlen_attention(q, k, v, keep, layout, attn.scaling, gqa)
    else:
        if attention_mask is None:  # causal over rows without padding
            mask = torch.arange(T, device=keep.device)[None, :] <= keep[:, None]  # (K, T)
        elif attention_mask.dim() == 4:
            mask = attention_mask[:, :, keep, :]  # (B, 1, K, T): padding, or a custom (shared-prompt) mask
            if mask.dtype == torch.bool:
                mask = _allow_one(mask)
        else:
            raise RuntimeError(f"alignkit.models.last_layer: an attention mask of shape {tuple(attention_mask.shape)} "
                               "(None or 4D expected); run without it (alignkit.models.last_layer.ENABLED = False)")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
    o = attn.o_proj(o.transpose(1, 2).reshape(B, keep.numel(), -1))  # (B, K, d)
    h = hidden_states[:, keep] + o
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden_states.new_zeros(B, T, d).index_copy(1, keep, h)


__all__ = ["ENABLED", "SUPPORTED", "reading", "unusable_reason"]
