"""A one-token decode step of our own for the Llama family (llama, qwen2, mistral), used by `decode.lean_generate`.

    why = fast_step_unsupported(model, cache, layer_types)   # None: `DecodeStep(model)` computes the model's own step
    logits = DecodeStep(model)(ids, pos, mask4, cache)      # (B, V) float of the last (only) position

At a one-token step of a small model about half of transformers' forward is Python around the arithmetic: three
decorators and an output dataclass per forward, the causal mask built from the 2D mask, per-layer config lookups,
the attention-interface dispatch, `GradientCheckpointingLayer.__call__`, `Cache.update`. `DecodeStep` does the
same arithmetic with none of that: it calls the model's own submodules in the order the installed modeling code
does (embed_tokens, the rotary module with its own rope scaling, per layer input_layernorm, q/k/v_proj, the
family's `apply_rotary_pos_emb`, the cache layer's `update`, `F.scaled_dot_product_attention` with one query,
o_proj, post_attention_layernorm, mlp; norm, lm_head on the one position). The attention call is
`sdpa_attention_forward`'s for one query: no mask (no padding) with `enable_gqa`, else the padding mask
(B, 1, 1, L), made once per call as the float mask sdpa would make of it (`additive_mask`), with the query grouped
per key/value head (`pack_gqa`).

Two forms per part of a layer (`_fused_parts`, decided when the step is made, i.e. per `lean_generate` call):
- fused (`FUSE`, the default where it applies): q/k/v in one matmul over their concatenated weights and gate/up
  in one (copies made when the call starts: the optimizer changes the parameters in place between calls, so
  nothing is kept across calls), queries and keys rotated in one tensor (`rope_qk`: the family's products), the
  family's RMSNorm as `torch.rms_norm` in float32. Only where the projections are plain `nn.Linear`s, the norms
  the family's RMSNorm, the MLP the family's with a SiLU, nothing hooked; only on CPU and while the copies stay
  under `FUSE_MAX_BYTES` (256 MiB: what fusing saves is per-op overhead, which matters for small models).
- per module: the modules are called, not their raw weights, so a peft LoRA / IA3 / ... layer that replaced
  q_proj (or any called module) applies as in the model's forward. A LoRA on q/v keeps the attention part per
  module; the MLP and norms of that layer are still fused unless an adapter sits there too.

Where it applies (`fast_step_unsupported` names the first reason it does not, decided once per `lean_generate`
call): a `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` of the installed transformers (exact
classes of its model, decoder layers and attention modules: a replaced module type means the step would not be
the model's), sdpa attention, every layer full attention (no sliding window), eval mode, no hook on a module the
step bypasses (the LM, its backbone, decoder layers, attention modules) and no global module hook, a
`DynamicCache` of `DynamicLayer`s (or `decode.PreallocatedLayer`s) without offloading.

Loudness: `lean_generate` checks the step once per model object and mask kind against the model's own forward
(`check_step`): the first fast step of a call is also run through `model(...)` on the same cache, and logits that
differ by more than `tolerance(dtype)` raise `FastStepMismatchError` naming the model class and the switch
(`decode.FAST_STEP = False` / `SamplingConfig(sampler="multinomial")`). `tests/compat/test_fast_decode_step.py`
pins both forms against the installed transformers (tiny llama / qwen2 with bias / mistral, LoRA, left padding,
rope scaling).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alignkit.adapters import unwrap_lm
from alignkit.models.restate import FAMILIES, family_module, global_hooks, has_hooks

try:
    from transformers.activations import SiLUActivation as _SILU
except ImportError:  # older transformers: ACT2FN['silu'] is nn.SiLU
    _SILU = torch.nn.SiLU

class FastStepMismatchError(RuntimeError):
    """The fast decode step's logits are not the model's own forward's (a modeling change it does not follow)."""


def fast_step_unsupported(model: Any, cache: Any, layer_types: tuple[type, ...] = (DynamicLayer,)) -> str | None:
    """Why `DecodeStep` would not be the model's own one-token forward (None: it is, see the module docstring).
    `layer_types`: the cache layer classes whose `update` is a full-attention DynamicLayer's (`lean_generate`
    adds its `PreallocatedLayer`)."""
    lm = unwrap_lm(model)
    cfg = lm.config
    mod = family_module(lm)
    if mod is None:
        return f"model_type {getattr(cfg, 'model_type', None)!r} (the fast step knows {sorted(FAMILIES)})"
    fam = FAMILIES[cfg.model_type]
    if type(lm) is not getattr(mod, f"{fam}ForCausalLM", None):
        return f"{type(lm).__name__} is not transformers' {fam}ForCausalLM"
    base = getattr(lm, "model", None)
    if type(base) is not getattr(mod, f"{fam}Model", None):
        return f"its backbone {type(base).__name__} is not transformers' {fam}Model"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} (the fast step is sdpa's)"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "a layer that is not full attention (sliding window)"
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return f"mistral sliding_window={cfg.sliding_window}"
    if lm.training or model.training:
        return "the model is in training mode (dropout)"
    layers = list(base.layers[: cfg.num_hidden_layers])
    for layer in layers:
        if type(layer) is not getattr(mod, f"{fam}DecoderLayer", None):
            return f"decoder layer {type(layer).__name__} is not transformers' {fam}DecoderLayer"
        if type(layer.self_attn) is not getattr(mod, f"{fam}Attention", None):
            return f"attention module {type(layer.self_attn).__name__} is not transformers' {fam}Attention"
    if not callable(getattr(mod, "apply_rotary_pos_emb", None)):
        return f"modeling_{cfg.model_type} has no apply_rotary_pos_emb"
    if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in lm.parameters()):
        return "sharded parameters (FSDP2 / ZeRO-3 gather them in hooks around the modules' forwards)"
    bypassed = [model, lm, base, *layers, *(x.self_attn for x in layers)]
    if any(has_hooks(m) for m in bypassed) or global_hooks():
        return "a forward / backward hook on the model, its backbone, a decoder layer or attention module (or global)"
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return f"cache {type(cache).__name__} (the fast step writes DynamicCache layers)"
    if len(cache.layers) != len(layers) or any(type(x) not in layer_types for x in cache.layers):
        return "a cache layer that is not a full-attention DynamicLayer"
    return None


def tolerance(dtype: torch.dtype) -> float:
    """Largest |fast - model| accepted per logit, relative to max(1, max |model logit|): 64 units of the dtype's
    rounding (float32: 7.6e-6; bfloat16: 0.5). A wrong rotary / mask / cache position moves logits far more."""
    return 64 * torch.finfo(dtype).eps


def _direct(m: torch.nn.Module) -> Any:
    """What calling `m` computes, without `Module.__call__`'s hook bookkeeping: a plain `nn.Linear` becomes
    `F.linear` on its own parameters (read now: a `DecodeStep` lives for one `lean_generate` call), any other
    module its bound `forward`; a module with hooks stays the module (its hooks run)."""
    if has_hooks(m) or global_hooks():
        return m
    if type(m) is torch.nn.Linear:
        return partial(F.linear, weight=m.weight, bias=m.bias)
    return m.forward


class DecodeStep:
    """The model's one-token forward without transformers' per-step Python (see the module docstring). Made per
    `lean_generate` call (it holds the modules' parameters of that moment, and copies of some: `_fused_parts`)."""

    def __init__(self, model: Any):
        lm = unwrap_lm(model)
        base = lm.model
        mod = family_module(lm)
        fam = FAMILIES[lm.config.model_type]
        self.embed, self.rotary, self.norm, self.head = (_direct(base.embed_tokens), _direct(base.rotary_emb),
                                                         _direct(base.norm), _direct(lm.lm_head))
        layers = base.layers[: lm.config.num_hidden_layers]
        fits = _fits(layers)
        self.layers = [(_direct(x.input_layernorm), _direct(x.self_attn.q_proj), _direct(x.self_attn.k_proj),
                        _direct(x.self_attn.v_proj), _direct(x.self_attn.o_proj), _direct(x.post_attention_layernorm),
                        _direct(x.mlp), x.self_attn.head_dim, x.self_attn.num_key_value_groups, x.self_attn.scaling,
                        *_fused_parts(x, mod, fam, fits))
                       for x in layers]
        self.rope = mod.apply_rotary_pos_emb  # the per-module form's rotary (q, k separately)
        self.rope_qk = rope_qk  # the fused form's (queries and keys in one tensor)
        self.dtype = base.embed_tokens.weight.dtype

    def additive_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A bool padding mask (B, 1, 1, L) as the float mask sdpa makes of it on every call (0 kept, -inf
        masked, the model's dtype): made once per `lean_generate` call instead of once per layer and step."""
        return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        """ids, pos (B, 1); mask: None (no padding), or bool / `additive_mask` (B, 1, 1, L) over the cached
        positions and this one.
        -> (B, V) logits of the step (the model's dtype), after writing its keys / values into `cache`."""
        h = self.embed(ids)  # (B, 1, D)
        cos, sin = self.rotary(h, pos)  # (B, 1, hd) each, the model's rope (scaling included)
        b = h.shape[0]
        rope, rope_qk, sdpa = self.rope, self.rope_qk, F.scaled_dot_product_attention
        half = cos.shape[-1] // 2
        sin_signed = None  # rotate_half(x) * sin = cat(x2, x1) * cat(-sin1, sin2): the sign moved onto sin, once
        for layer, (ln1, qp, kp, vp, op, ln2, mlp, hd, groups, scale, n1, att, n2, ffn) in zip(cache.layers,
                                                                                               self.layers):
            x = ln1(h) if n1 is None else _rms_norm(h, *n1)
            if att is None:
                q = qp(x).view(b, 1, -1, hd).transpose(1, 2)  # (B, H, 1, hd)
                k = kp(x).view(b, 1, -1, hd).transpose(1, 2)  # (B, Hkv, 1, hd)
                v = vp(x).view(b, 1, -1, hd).transpose(1, 2)
                q, k = rope(q, k, cos, sin)
            else:  # q, k, v in one matmul; queries and keys rotated together (element for element the family's)
                wqkv, bqkv, nq, nkv = att
                qkv = F.linear(x, wqkv, bqkv).view(b, nq + 2 * nkv, hd)  # (B, H + 2 Hkv, hd)
                if sin_signed is None:
                    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # (B, 1, hd)
                qk = rope_qk(qkv[:, : nq + nkv], nq, cos, sin_signed)
                q, k, v = qk[:, :nq, None], qk[:, nq:, None], qkv[:, nq + nkv:, None]  # (B, H or Hkv, 1, hd)
            k, v = layer.update(k, v)  # (B, Hkv, L, hd)
            if groups > 1 and mask is None:
                o = sdpa(q, k, v, scale=scale, enable_gqa=True)
            else:
                if groups > 1:  # one query: the query heads of a key/value head become its "positions"
                    q = q.reshape(b, q.shape[1] // groups, groups, hd)
                o = sdpa(q, k, v, attn_mask=mask, scale=scale)
            h = h + op(o.reshape(b, -1, 1, hd).transpose(1, 2).reshape(b, 1, -1))  # (B, 1, H * hd)
            x = ln2(h) if n2 is None else _rms_norm(h, *n2)
            if ffn is None:
                h = h + mlp(x)
            else:  # gate and up in one matmul
                wgu, bgu, inter, wd, bd = ffn
                gu = F.linear(x, wgu, bgu)  # (B, 1, 2 I)
                h = h + F.linear(F.silu(gu[..., :inter]) * gu[..., inter:], wd, bd)
        return self.head(self.norm(h))[:, -1]


FUSE = True  # False: every layer calls its modules one at a time (an A/B switch for bench/online_gen_ab.py)
# the fused form's copies of q|k|v and gate|up weights stay below this many bytes per call, or nothing is fused: what
# fusing saves is per-op overhead (small models), its cost a copy of most of the model's weights per call
FUSE_MAX_BYTES = 256 * 2**20


def rope_qk(qk: torch.Tensor, nq: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The family's `apply_rotary_pos_emb` on the queries and keys of one step in one tensor: qk (B, H + Hkv, hd)
    (the first `nq` heads are queries; the same rotation for both), cos (B, 1, hd), sin_signed = cat(-sin1, sin2).
    The family's x * cos + cat(-x2, x1) * sin, with the sign on sin instead of x2: bitwise the same products."""
    half = qk.shape[-1] // 2
    return qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin_signed


def _rms_norm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The family's RMSNorm (`LlamaRMSNorm.forward`): in float32 `torch.rms_norm`, one kernel (bitwise the same
    values on every shape tried, and the run-time check compares), in other dtypes the module's own ops (it rounds
    to the input dtype before the weight multiplies, `torch.rms_norm` does not)."""
    if h.dtype is torch.float32 and w.dtype is torch.float32:
        return torch.rms_norm(h, (h.shape[-1],), w, eps)
    x32 = h.to(torch.float32)
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _plain_linear(m: Any) -> bool:
    return type(m) is torch.nn.Linear and not has_hooks(m)


def _cat_bias(mods: tuple[torch.nn.Linear, ...]) -> tuple[bool, torch.Tensor | None]:
    """(whether the biases concatenate: all present or all absent, the concatenation or None)."""
    bs = [m.bias for m in mods]
    present = [x is not None for x in bs]
    if not any(present):
        return True, None
    if not all(present):
        return False, None
    return True, torch.cat(bs)


def _fits(layers: Any) -> bool:
    """Whether the fused form's weight copies of all `layers` (q|k|v and gate|up) stay under `FUSE_MAX_BYTES`."""
    n = 0
    for x in layers:
        for m in (x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj, x.mlp.gate_proj, x.mlp.up_proj):
            w = getattr(m, "weight", None)
            n += w.numel() * w.element_size() if isinstance(w, torch.Tensor) else 0
    return n <= FUSE_MAX_BYTES


def _fused_parts(layer: Any, mod: Any, fam: str, fits: bool = True) -> tuple[Any, Any, Any, Any]:
    """(input norm, attention projections, post-attention norm, MLP) of one decoder layer's fused form; a None part
    calls the layer's module instead. A norm: (weight, eps) where it is the family's RMSNorm. The attention: (one
    weight q|k|v, its bias or None, H, Hkv) where q/k/v are plain `nn.Linear`s. The MLP: (one weight gate|up, its
    bias, I, down's weight, bias) where it is the family's MLP with plain `nn.Linear`s and a SiLU. A LoRA (or any
    other) layer in place of a projection keeps its part per module; nothing hooked is fused. The concatenated
    weights are copies of the parameters of this moment: a `DecodeStep` lives for one `lean_generate` call, and
    the optimizer updates the parameters in place between calls. Only on CPU (where it is measured) and where the
    copies of all layers fit in `FUSE_MAX_BYTES` (`fits`)."""
    att, mlp = layer.self_attn, layer.mlp
    if not (FUSE and fits) or global_hooks() or att.q_proj.weight.device.type != "cpu":  # measured on CPU only
        return None, None, None, None
    norm_cls, mlp_cls = getattr(mod, f"{fam}RMSNorm", None), getattr(mod, f"{fam}MLP", None)

    def norm(n: Any) -> Any:
        ok = type(n) is norm_cls and not has_hooks(n) and isinstance(getattr(n, "variance_epsilon", None), float)
        return (n.weight, n.variance_epsilon) if ok else None

    qkv, fused_att = (att.q_proj, att.k_proj, att.v_proj), None
    ok, bias = _cat_bias(qkv) if all(_plain_linear(m) for m in qkv) else (False, None)
    hd = att.head_dim
    if (ok and att.q_proj.out_features % hd == 0 and att.k_proj.out_features % hd == 0
            and att.k_proj.out_features == att.v_proj.out_features):
        fused_att = (torch.cat([m.weight for m in qkv]), bias, att.q_proj.out_features // hd,
                     att.k_proj.out_features // hd)
    gud, fused_mlp = (mlp.gate_proj, mlp.up_proj, mlp.down_proj), None
    if (type(mlp) is mlp_cls and not has_hooks(mlp) and all(_plain_linear(m) for m in gud)
            and type(mlp.act_fn) in (torch.nn.SiLU, _SILU) and not has_hooks(mlp.act_fn)):
        ok, bias = _cat_bias(gud[:2])
        if ok and mlp.gate_proj.out_features == mlp.up_proj.out_features:
            fused_mlp = (torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), bias, mlp.gate_proj.out_features,
                         mlp.down_proj.weight, mlp.down_proj.bias)
    return norm(layer.input_layernorm), fused_att, norm(layer.post_attention_layernorm), fused_mlp


__all__ = ["DecodeStep", "FastStepMismatchError", "fast_step_unsupported", "tolerance", "FAMILIES", "rope_qk"]
