"""`online.fast_step.DecodeStep` (the lean loop's one-token forward for the Llama family) against the installed
transformers: its next-token logits must be the model's own forward's (with the model's own cache), for tiny
llama / qwen2 (q/k/v bias) / mistral configs, with and without a peft LoRA adapter, on left-padded and unpadded
batches, with rope scaling (linear, llama3), in both of its forms: fused (one matmul for q/k/v and one for
gate/up per layer, queries and keys rotated in one tensor, `torch.rms_norm`; the default where the projections
are plain `nn.Linear`s) and per module (`fast_step.FUSE` off; where LoRA replaced a projection). Tolerance: `fast_step.tolerance(float32)` = 64 float32 epsilons
(7.6e-6) x max(1, max |logit|); the models are initialised with a large spread (initializer_range 0.5) so that a
rotary, mask or cache-position mistake moves the logits by orders of magnitude more (checked in both forms:
applying the rotary to the queries only fails every case, skipping the padding mask every padded case). Why a
tolerance at all: a fused matmul over q|k|v is free to block its reduction differently from three separate ones
(measured here: bitwise equal anyway); 64 epsilons of the largest logit is far below what any of those mistakes
moves (>= 0.09) and far above what a reordered float32 sum of these sizes moves (a few epsilons)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen2Config

from alignkit.compat import cache_keyword
from alignkit.online.decode import CACHE_LAYERS, preallocated_cache
import alignkit.online.fast_step as fast_step
from alignkit.online.fast_step import DecodeStep, fast_step_unsupported, tolerance

from .guards import check, guard

TF = "transformers"
WHERE = "alignkit/online/fast_step.py:DecodeStep (lean_generate's decode steps with the inverse-CDF sampler)"
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5, pad_token_id=0,
             tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "llama, mha, attention bias": lambda: LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, attention_bias=True),
    "llama, rope linear": lambda: LlamaConfig(**SMALL, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 10000.0}),
    "llama, rope llama3": lambda: LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
}


def _model(name: str, lora: bool):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))  # B != 0: the adapter changes the logits
    return model.eval()


def _steps(model, ids, mask, fast: bool, fused: bool = True):
    """Prefill with the model's forward, then 3 one-token steps (the model's own forward with its own cache, or
    `DecodeStep` on a preallocated cache) feeding fixed tokens. -> per step the (B, V) logits."""
    b, t = ids.shape
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = preallocated_cache(model, t + 3) if fast else DynamicCache(config=model.config)
    kw = {cache_keyword(model): cache}
    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
    padded = bool((mask == 0).any())
    step = DecodeStep(model) if fast else None
    if fast:  # the form asked for is the one that runs: every plain layer fused, none without FUSE
        parts = [x[10:] for x in step.layers]
        lora = model is not model.get_base_model() if hasattr(model, "get_base_model") else False
        want = [True, not lora, True, not lora] if fused else [False] * 4  # LoRA on q/v and down_proj: per module
        check(all([p is not None for p in ps] == want for ps in parts), TF, "the fast step's fused parts are not the "
              f"expected ones ({[[p is not None for p in ps] for ps in parts]}, want {want})", WHERE)
    if fast:
        check(fast_step_unsupported(model, cache, CACHE_LAYERS) is None, TF, "the fast step refuses a plain model of its family "
              f"({fast_step_unsupported(model, cache, CACHE_LAYERS)})", WHERE)
    out = []
    for i, tok in enumerate([7, 11, 13]):
        x = torch.full((b, 1), tok)
        p = pos[:, -1:] + i + 1
        full = torch.cat([mask, mask.new_ones(b, i + 1)], dim=-1)  # (B, T + i + 1)
        if fast:
            out.append(step(x, p, full.bool()[:, None, None, :] if padded else None, cache))
        else:
            out.append(model(input_ids=x, attention_mask=full if padded else None, position_ids=p, use_cache=True,
                             **kw).logits[:, -1])
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-module"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_decode_step_gives_the_models_own_logits(name, lora, fused, monkeypatch):
    monkeypatch.setattr(fast_step, "FUSE", fused)
    model = _model(name, lora)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 15, 16]])
    mask = (ids != 0).long()
    with torch.no_grad():
        for label, (x, m) in {"left-padded": (ids, mask), "no padding": (ids[1:2].repeat(2, 1), mask[1:2].repeat(2, 1))}.items():
            want = _steps(model, x, m, fast=False)
            with guard(TF, "DecodeStep raised", WHERE):
                got = _steps(model, x, m, fast=True, fused=fused)
            for i, (g, w) in enumerate(zip(got, want)):
                err = float((g - w).abs().max())
                scale = max(1.0, float(w.abs().max()))
                check(w.abs().max() > 1.0, TF, "the reference logits are too small to tell a wrong step", WHERE)
                check(err <= tolerance(torch.float32) * scale, TF, f"the fast decode step's logits differ from the "
                      f"model's own forward ({name}, {'LoRA' if lora else 'no adapter'}, {label}, "
                      f"{'fused' if fused else 'per module'}, step {i})", WHERE,
                      f"max |difference| {err:.3g}, logits up to {scale:.3g}")
