"""Paired in-process A/B of a fused training forward of the Llama family's decoder layer (llama, qwen2) against
transformers' own layer, on the CPU suite's "small" SFT step at the fastest settings (tiny Llama 4 x 128, vocab
1024, batches of 8 ragged 16-96-token examples packed in one padding-free row, varlen sdpa, float32):

    nice -n 19 .venv/bin/python bench/fused_layer_ab.py --rounds 21      # ~2 CPU minutes, 1 thread

The fused forward (`fused(lm, kwargs, levers)`: each decoder layer's `forward` swapped for `layer_forward` for one
model call; layers `alignkit.models.last_layer` already re-states keep theirs) does transformers' arithmetic with
the attention function called directly (sdpa's or alignkit's varlen: no interface dispatch, no decorators),
queries and keys rotated in one tensor (`alignkit.online.fast_step.rope_qk`) and RMSNorm as one autograd Function
(`RMSNorm`: backward by hand, forward the module's ops); the other levers are switched per variant:
  silu   SiLU(gate) * up as one autograd Function (`SiluMul`, backward by aten's silu_backward)
  qkv    q|k|v in one matmul (weights concatenated in every forward: the optimizer moves them in place)
  gu     gate|up in one matmul (likewise)
It applies only where nothing else sees the layers (`unusable_reason`); the script stops where it does not.

Each variant trains its own copy of the same model with its own AdamW on the same `--batches` SFT steps per round
(`completion_token_logps` -> SFT "nll" loss -> backward -> optimizer step), the variants interleaved and their
order reversed every other round. Before timing, every variant's loss and parameter gradients are compared with
transformers' on the first batches (relative difference <= 1e-5 loss, 1e-4 gradient, else the script stops: a
faster step that computes something else is no result). Reported: CPU ms per step of each variant (median,
min-max) and the paired ratio transformers / variant per round (median, min-max, the median's CI from
`common.median_ci`); gain = 1 - 1 / ratio. Measured and not kept in the library (bench/README.md, "Fused decoder
layer for training").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
from alignkit.models import varlen  # noqa: E402
from alignkit.models.restate import FAMILIES, family_module, global_hooks, has_hooks  # noqa: E402
from alignkit.online.fast_step import rope_qk  # noqa: E402

SUPPORTED = ("llama", "qwen2")
LEVERS = ("silu", "qkv", "gu")
VARIANTS = {"transformers": None, "fused": (), "fused+silu": ("silu",), "fused+qkv": ("qkv",),
            "fused+gu": ("gu",), "fused+all": LEVERS}


class RMSNorm(torch.autograd.Function):
    """The family's RMSNorm in float32, w * (x * rsqrt(mean(x^2) + eps)) (its forward's ops), backward by hand."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xh = x * rstd
        ctx.save_for_backward(xh, w, rstd)
        return w * xh

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        xh, w, rstd = ctx.saved_tensors
        gw = g * w
        return rstd * (gw - xh * (gw * xh).mean(-1, keepdim=True)), (g * xh).reshape(-1, xh.shape[-1]).sum(0), None


class SiluMul(torch.autograd.Function):
    """silu(g) * u, backward by hand (aten's silu_backward: one kernel)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, u: Tensor) -> Tensor:
        a = F.silu(g)
        ctx.save_for_backward(g, u, a)
        return a * u

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        g, u, a = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * u, g), grad * a


def _layers(lm: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(lm, "base_model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _plain(*ms: Any) -> bool:
    return all(type(m) is nn.Linear and not has_hooks(m) for m in ms)


def unusable_reason(lm: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why the decoder layers of the transformers model `lm` must run as transformers' for `model(**kwargs)`."""
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return "hidden states or attention weights are asked for"
    if kwargs.get("use_cache") is not False:
        return "a KV cache may be written (use_cache is not False)"
    layers, mt, cfg = _layers(lm), getattr(lm.config, "model_type", None), lm.config
    mod, fam = family_module(lm), FAMILIES.get(mt)
    if layers is None or mod is None or mt not in SUPPORTED:
        return f"model_type {mt!r} (the fused layer is {SUPPORTED}'s)"
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", varlen.VARLEN_SDPA):
        return f"attention implementation {cfg._attn_implementation!r} (sdpa or alignkit's varlen only)"
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "mlp_bias", False):
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} / mlp_bias (silu without bias only)"
    if global_hooks():
        return "a global module hook is registered"
    for layer in layers:
        classes = [(layer, "DecoderLayer"), (layer.self_attn, "Attention"), (layer.mlp, "MLP"),
                   (layer.input_layernorm, "RMSNorm"), (layer.post_attention_layernorm, "RMSNorm")]
        if any(type(m) is not getattr(mod, fam + name, None) for m, name in classes):
            return f"{type(layer).__name__} is not exactly transformers' {fam}DecoderLayer and its modules"
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            return "sliding-window attention"
        if layer.training and float(getattr(layer.self_attn, "attention_dropout", 0.0) or 0.0) > 0:
            return "attention dropout in training"
        if getattr(layer, "gradient_checkpointing", False) or getattr(layer, "_compiled_call_impl", None):
            return "activation checkpointing or a compiled layer"
        for m in layer.modules():
            if has_hooks(m) or getattr(m, "_hf_hook", None) is not None or type(m).__name__.startswith("FSDP"):
                return f"a hook on {type(m).__name__} in a decoder layer (an intervention, sharding or offload)"
            if layer.training and isinstance(m, nn.Dropout) and m.p > 0:
                return f"dropout (p={m.p}) in a decoder layer in training"
        if any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in layer.parameters()):
            return "sharded parameters (FSDP2 / ZeRO-3)"
    return None


@contextlib.contextmanager
def fused(lm: nn.Module, kwargs: dict[str, Any], levers: tuple[str, ...] = ()) -> Iterator[None]:
    """Around one `model(**kwargs)` call of the transformers model `lm`: its decoder layers run `layer_forward`.
    Refuses (RuntimeError) where `unusable_reason` names a reason: a measurement of another computation is none."""
    why = unusable_reason(lm, kwargs)
    if why is not None:
        raise RuntimeError(f"fused_layer_ab: the fused layer does not apply: {why}")
    state: dict[str, Any] = {"levers": frozenset(levers)}
    swapped = [x for x in _layers(lm) if "forward" not in x.__dict__]
    for layer in swapped:
        layer.forward = functools.partial(layer_forward, layer, state)
    try:
        yield
    finally:
        for layer in swapped:
            layer.__dict__.pop("forward", None)


def _norm(n: nn.Module, h: Tensor) -> Tensor:
    if h.dtype is torch.float32 and n.weight.dtype is torch.float32:
        return RMSNorm.apply(h, n.weight, n.variance_epsilon)
    return n.forward(h)


@functools.cache
def _sdpa() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def layer_forward(layer: nn.Module, state: dict[str, Any], hidden_states: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None, position_embeddings: tuple[Tensor, Tensor] | None = None,
                  **kwargs: Any) -> Tensor:
    """transformers' decoder layer forward, re-stated (see the module docstring); `state` holds the levers and the
    rotary's signed sine, made once per model call."""
    attn, mlp, levers = layer.self_attn, layer.mlp, state["levers"]
    B, T, _ = hidden_states.shape
    hd = attn.head_dim
    cos, sin = position_embeddings
    if state.get("sin") is not sin:  # rotate_half(x) * sin = cat(x2, x1) * cat(-sin1, sin2)
        state["sin"], state["rope"] = sin, (cos.unsqueeze(1), torch.cat([-sin[..., :hd // 2], sin[..., hd // 2:]], -1)
                                            .unsqueeze(1))
    cos1, sin_signed = state["rope"]
    x = _norm(layer.input_layernorm, hidden_states)
    qp, kp, vp = attn.q_proj, attn.k_proj, attn.v_proj
    nq = qp.out_features // hd
    if "qkv" in levers and _plain(qp, kp, vp):
        b = None if qp.bias is None else torch.cat([qp.bias, kp.bias, vp.bias])
        qkv = F.linear(x, torch.cat([qp.weight, kp.weight, vp.weight]), b).view(B, T, -1, hd).transpose(1, 2)
        nkv = kp.out_features // hd
        qk, v = qkv[:, :nq + nkv], qkv[:, nq + nkv:]
    else:  # per module (a LoRA module on q / v applies as in the model's forward)
        qk = torch.cat([qp(x).view(B, T, -1, hd), kp(x).view(B, T, -1, hd)], 2).transpose(1, 2)
        v = vp(x).view(B, T, -1, hd).transpose(1, 2)
    qk = rope_qk(qk, nq, cos1, sin_signed)
    fn = varlen.varlen_sdpa_attention if attn.config._attn_implementation == varlen.VARLEN_SDPA else _sdpa()
    o, _ = fn(attn, qk[:, :nq], qk[:, nq:], v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    h = hidden_states + attn.o_proj(o.reshape(B, T, -1))
    x = _norm(layer.post_attention_layernorm, h)
    gp, up = mlp.gate_proj, mlp.up_proj
    if "gu" in levers and _plain(gp, up):
        g, u = F.linear(x, torch.cat([gp.weight, up.weight])).split(gp.out_features, -1)
    else:
        g, u = gp(x), up(x)
    return h + mlp.down_proj(SiluMul.apply(g, u) if "silu" in levers else F.silu(g) * u)


@contextlib.contextmanager
def fused_calls(levers: tuple[str, ...] | None) -> Iterator[None]:
    """While entered, alignkit's model calls (`alignkit.trainers.logps.call_model`) run the fused layers with
    `levers` (None: transformers' layers)."""
    from alignkit.adapters import unwrap_lm
    from alignkit.trainers import logps

    if levers is None:
        yield
        return
    plain = logps.call_model

    def call(model: nn.Module, kwargs: dict[str, Any]) -> Any:
        with fused(unwrap_lm(model), kwargs, levers):
            return plain(model, kwargs)

    logps.call_model = call
    try:
        yield
    finally:
        logps.call_model = plain


def setup(run_dir: Path, n_batches: int, batch_size: int):
    from alignkit.data import SFTRecord, tokenize_records
    from alignkit.data.collators import PackedSFTCollator
    from alignkit.models.loading import load_model

    spec = common.SCENARIOS["small"]
    if not (run_dir / "small" / "spec.json").exists():
        common.prepare_scenario(spec, run_dir)
    spec = common.load_spec(run_dir / "small" / "spec.json")
    tok = common.load_tokenizer(common.model_dir(run_dir, spec))
    rows = common.read_jsonl(common.data_file(run_dir, spec, "sft"))[: n_batches * batch_size]
    feats, _ = tokenize_records([SFTRecord(r["prompt"], r["completion"], id=str(i)) for i, r in enumerate(rows)],
                                tok, max_length=spec["max_length"], max_prompt_length=None)
    collate = PackedSFTCollator()
    batches = [collate(feats[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
    torch.manual_seed(0)
    return load_model(common.model_dir(run_dir, spec), dtype="float32").train(), batches


def loss_of(model: nn.Module, batch: dict[str, Any], levers: tuple[str, ...] | None) -> Tensor:
    from alignkit.losses import SFT_LOSSES
    from alignkit.trainers.logps import completion_token_logps

    with fused_calls(levers):
        token_logps, mask = completion_token_logps(model, batch)
    return SFT_LOSSES["nll"](token_logps, mask).losses.sum() / mask.sum()


def loss_and_grads(model: nn.Module, batch: dict[str, Any], levers: tuple[str, ...] | None):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, batch, levers)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def same_work(model: nn.Module, batches: list[dict], levers: tuple[str, ...]) -> list[str]:
    """Why the fused step with `levers` is not transformers' on `batches` ([] = it is): loss or a gradient apart."""
    out = []
    for i, b in enumerate(batches):
        (la, ga), (lb, gb) = loss_and_grads(model, b, None), loss_and_grads(model, b, levers)
        if not abs(la - lb) <= 1e-5 * max(1.0, abs(la)):
            out.append(f"batch {i}: loss {la!r} vs {lb!r}")
        if ga.keys() != gb.keys():
            out.append(f"batch {i}: gradients of other parameters")
        for n in sorted(ga.keys() & gb.keys()):
            d = float((ga[n] - gb[n]).abs().max()) / max(1e-12, float(ga[n].abs().max()))
            if not d <= 1e-4:
                out.append(f"batch {i}: gradient of {n} apart by {d:.1e} of its largest value")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="a bench/run_cpu.py run folder holding small/ (else a temp one)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS)[1:], default=list(VARIANTS)[1:],
                    help="the variants timed against transformers' layers (default: all)")
    args = ap.parse_args(argv)
    variants = {name: VARIANTS[name] for name in ["transformers", *args.variants]}
    torch.set_num_threads(args.threads)
    model, batches = setup(Path(args.run_dir or tempfile.mkdtemp(prefix="fused_layer_ab-")), args.batches,
                           args.batch_size)
    for name, levers in variants.items():  # the same work, checked before anything is timed
        bad = [] if levers is None else same_work(model, batches[:2], levers)
        if bad:
            sys.exit(f"fused_layer_ab: {name} is not transformers' step (no timing): {'; '.join(bad[:4])}")
    sides = {name: copy.deepcopy(model) for name in variants}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in sides.items()}

    def train(name: str, bs: list[dict]) -> list[float]:
        losses = []
        for b in bs:
            loss = loss_of(sides[name], b, variants[name])
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    for name in variants:  # warm-up, untimed (first-call costs); every copy takes the same step
        train(name, batches[:1])
    ms: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            t = time.process_time()
            losses[name] += train(name, batches)
            ms[name].append((time.process_time() - t) / len(batches) * 1000)
    base = ms["transformers"]
    drift = max(abs(a - b) / max(1.0, abs(a)) for name in variants for a, b in zip(losses["transformers"],
                                                                                   losses[name]))
    print(f"CPU ms per SFT step (one packed row, varlen sdpa, AdamW), {args.rounds} rounds x {args.batches} steps, "
          f"{args.threads} thread(s); max relative loss difference over the timed steps {drift:.1e}")
    summary: dict[str, Any] = {"rounds": args.rounds, "batches": args.batches, "threads": args.threads,
                               "max_rel_loss_difference": drift, "ms": ms, "ratios": {}}
    for name, xs in ms.items():
        ratios = [b / x for b, x in zip(base, xs)]
        summary["ratios"][name] = ratios
        gain = 100 * (1 - 1 / statistics.median(ratios))
        print(f"  {name:13s} {statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})   transformers / this "
              f"{common.paired_summary(ratios)}   gain {gain:+.1f} %")
    return summary


if __name__ == "__main__":
    main()
