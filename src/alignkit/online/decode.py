"""A lean sampling loop over a causal LM's forward: `model.generate`'s tokens without its per-step bookkeeping.

    reason = lean_unsupported(model, generation_config)        # None: `lean_generate` gives generate's tokens
    out = lean_generate(model, input_ids, attention_mask, generation_config, cache=None)   # (B, T + n) like generate

`generation.generate_responses` uses it where every option of the call is one it supports, and `model.generate`
otherwise. Supported: a decoder-only transformers model (or a peft wrapper of one that is not prompt learning)
whose `generate` and `prepare_inputs_for_generation` are transformers' own, whose KV cache is all full-attention
`DynamicLayer`s; greedy or sampling with temperature / top-k / top-p; EOS ids and a pad id; `max_new_tokens`.
Anything else that would change `generate`'s loop (stop strings, another logits processor, beams, a cache
implementation, ... set on the call or on the model's `generation_config`) makes `lean_unsupported` name it and
the caller falls back. A ReftModel never takes this path (its edits happen inside its own `generate`).

Exactness: each forward gets what `generate` (transformers 5.19-5.24) gives it: position ids from the attention
mask (cumsum - 1, 0 on pads), the 2D mask (dropped when it has no padding), the cache under
`compat.cache_keyword`, `logits_to_keep=1`; it continues after the tokens already in a passed cache. Tokens are
chosen with the same ops in the same order (the last position's logits copied to float32, transformers' own
Temperature / TopK / TopP warpers, softmax + `torch.multinomial`, or argmax), finished rows get the pad id, the
loop stops when every row has ended or after `max_new_tokens`. Under the same torch seed the tokens are
`generate`'s: `tests/compat/test_transformers_generation.py` pins that against the installed transformers
(it fails loudly when transformers changes its loop).

Sampler: `lean_generate(..., sampler="multinomial")` (the function's default) draws with `torch.multinomial`, as
above. `generate_responses` passes "inverse_cdf" unless `SamplingConfig.sampler` says otherwise:
`inverse_cdf_sample` draws from the same warped distribution with one or two uniforms per row (10-60x less CPU
than torch.multinomial, which on a CPU costs one exponential per vocabulary entry), so its tokens are other draws
from the same distribution, not `generate`'s (tests/online/test_generation.py checks the frequencies against the
model's own next-token probabilities). With that sampler, and in one process, rows that ended also leave the batch
(their KV cache rows with them) once a quarter of the running rows has ended (`DROP_FRACTION`), so later steps
run only the rows still generating; `generate` keeps running ended rows on pad tokens to the end.

Decode step: with the inverse-CDF sampler, the one-token steps (not the prefill) run `fast_step.DecodeStep`, the
model's own submodules in its modeling code's order without transformers' per-step Python (decorators, mask
building, output dataclasses, attention dispatch): 15-25 % less CPU per generate call on the online suite's tiny
Llama (bench/README.md, "Online decoding: a fast decode step"). Llama / Qwen2 / Mistral with sdpa attention only;
`fast_step.fast_step_unsupported` names why not (debug log) and the step is then the model's forward. Its logits
are the model's (bitwise on the families pinned in tests/compat/test_fast_decode_step.py), and the loop checks that
at run time: the first fast step per model object and mask kind also runs the model's forward on the same cache
and raises `FastStepMismatchError` past `fast_step.tolerance`. `FAST_STEP = False` turns it off.

The KV cache (`preallocated_cache`): `PreallocatedLayer` keeps each layer's keys / values in one buffer sized
for prompt + new tokens and writes each step's token in place; attention reads a view of the filled part (the
same values and shapes as `DynamicLayer`'s `torch.cat`, which copies the whole cache every step).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from transformers import DynamicCache, GenerationConfig, GenerationMixin
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from alignkit.adapters import unwrap_lm
from alignkit.adapters.base import unwrap_parallel
from alignkit.compat import cache_keyword
from alignkit.guards import NonFiniteLogitsError
from alignkit.interventions.attach import ReftModel
from alignkit.online.fast_step import DecodeStep, FastStepMismatchError, fast_step_unsupported, tolerance

logger = logging.getLogger(__name__)
PREPARED_MASK = True  # False: let the model build every step's mask (an A/B switch for bench/online_gen_ab.py)
DROP_FINISHED = True  # False: finished rows stay in the batch (an A/B switch for bench/online_gen_ab.py)
DROP_FRACTION = 0.25  # rows leave the batch once at least this share of the running rows has ended
# False: every decode step is the model's own forward (an A/B switch; also the way out of the fast step)
FAST_STEP = True
# (model, padded?) pairs whose fast step was checked against the model's own forward (`_checked_step`)
_CHECKED: "weakref.WeakKeyDictionary[Any, set[bool]]" = weakref.WeakKeyDictionary()

# generation-config fields `lean_generate` implements
USED = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id"}
# fields that change nothing in a decoder-only sampling / greedy loop when they hold these values (or any value)
ANY = object()
NEUTRAL: dict[str, tuple] = {
    "num_beams": (1,), "num_return_sequences": (1,), "use_cache": (True,), "repetition_penalty": (1.0,),
    "output_attentions": (False,), "output_hidden_states": (False,), "output_scores": (False,),
    "output_logits": (False,), "return_dict_in_generate": (False,), "min_length": (0,), "no_repeat_ngram_size": (0,),
    "encoder_repetition_penalty": (1.0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "renormalize_logits": (False,), "remove_invalid_values": (False,), "num_beam_groups": (1,),
    "diversity_penalty": (0.0,), "is_assistant": (False,), "token_healing": (False,),
    # beam-search-only, lengths that max_new_tokens overrides, ids only read for encoder-decoders, metadata
    "length_penalty": (ANY,), "early_stopping": (ANY,), "max_length": (ANY,), "bos_token_id": (ANY,),
    "decoder_start_token_id": (ANY,), "transformers_version": (ANY,), "_from_model_config": (ANY,),
}


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys / values live in one buffer of `capacity` positions: `update` writes the new
    tokens in place and returns views of the filled part (what `DynamicLayer` returns, without re-copying the
    cache each step). Grows (one copy) if a sequence outgrows the buffer."""

    def __init__(self, capacity: int, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.capacity = int(capacity)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def _adopt(self, n: int, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A buffer for `need` positions holding the current `n` (after a first call, a growth, or an outside
        reassignment of keys / values such as DynamicLayer's crop)."""
        b, cap = key_states.shape[0], max(need, self.capacity)
        kb = key_states.new_empty(b, key_states.shape[1], cap, key_states.shape[-1])
        vb = value_states.new_empty(b, value_states.shape[1], cap, value_states.shape[-1])
        if n:
            kb[:, :, :n].copy_(self.keys)
            vb[:, :, :n].copy_(self.values)
        self._kbuf, self._vbuf = kb, vb

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        need = n + key_states.shape[-2]
        kb = self._kbuf
        if (kb is None or need > kb.shape[-2] or kb.shape[0] != key_states.shape[0]
                or (n and self.keys.data_ptr() != kb.data_ptr())):
            self._adopt(n, need, key_states, value_states)
        self._kbuf[:, :, n:need].copy_(key_states)
        self._vbuf[:, :, n:need].copy_(value_states)
        self.keys, self.values = self._kbuf[:, :, :need], self._vbuf[:, :, :need]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.get_seq_length()
        if n > 0 and self._kbuf is not None and self.keys.data_ptr() == self._kbuf.data_ptr():
            kb = self._kbuf.new_empty(len(indices), *self._kbuf.shape[1:])  # (B', H, capacity, D): filled part copied
            vb = self._vbuf.new_empty(len(indices), *self._vbuf.shape[1:])
            kb[:, :, :n].copy_(self._kbuf[indices, :, :n])
            vb[:, :, :n].copy_(self._vbuf[indices, :, :n])
            self._kbuf, self._vbuf = kb, vb
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
        else:
            super().batch_select_indices(indices)


CACHE_LAYERS = (DynamicLayer, PreallocatedLayer)  # the cache layers lean_generate writes (fast_step_unsupported)


def preallocated_cache(model: Any, capacity: int) -> DynamicCache:
    """`DynamicCache(config=...)` of the model, with `PreallocatedLayer`s of `capacity` positions in place of its
    full-attention `DynamicLayer`s (a cache with other layer types, e.g. sliding windows, is returned as is)."""
    cache = DynamicCache(config=unwrap_lm(model).config)
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        for i in range(len(layers)):
            layers[i] = PreallocatedLayer(capacity)
    return cache


@lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _effective_config(model: Any, cfg: GenerationConfig) -> dict[str, Any]:
    """The call's set fields, then the model's generation_config for fields the call leaves unset (how
    transformers 5.x merges them: only None fields take the model's value)."""
    out = {k: v for k, v in unwrap_lm(model).generation_config.to_dict().items() if v is not None}
    out.update({k: v for k, v in cfg.to_dict().items() if v is not None})
    return out


def lean_unsupported(model: Any, cfg: GenerationConfig) -> str | None:
    """Why `lean_generate` would not reproduce `model.generate(..., generation_config=cfg)` (None: it does)."""
    if isinstance(unwrap_parallel(model), ReftModel):
        return "a ReftModel edits hidden states inside its own generate"
    if unwrap_parallel(model) is not model:
        return f"a {type(model).__name__} wrapper"
    lm = unwrap_lm(model)
    if model is not lm:
        peft_cfg = getattr(model, "active_peft_config", None)
        if peft_cfg is None or getattr(peft_cfg, "is_prompt_learning", True):
            return f"a {type(model).__name__} wrapper (only peft adapters that are not prompt learning)"
    if not isinstance(lm, GenerationMixin) or getattr(lm.config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    for name in ("generate", "prepare_inputs_for_generation", "_update_model_kwargs_for_generation"):
        if getattr(type(lm), name, None) is not getattr(GenerationMixin, name, None):
            return f"{type(lm).__name__} has its own {name}"
    if not _forward_accepts(type(lm), "position_ids"):
        return f"{type(lm).__name__}.forward takes no position_ids"
    layers = getattr(DynamicCache(config=lm.config), "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "its KV cache is not all full-attention DynamicLayers (sliding window / hybrid / linear attention)"
    eff = _effective_config(model, cfg)
    if eff.get("max_new_tokens") is None:
        return "no max_new_tokens"
    extra = generation_options(model, cfg)
    return f"generation option {extra[0][0]}={extra[0][1]!r}" if extra else None


def generation_options(model: Any, cfg: GenerationConfig) -> list[tuple[str, Any]]:
    """(option, value) of `model.generate(..., generation_config=cfg)` beyond alignkit's sampling settings (`USED`)
    that change what is generated: the call's own, and the model's generation_config ones it leaves unset
    (`_effective_config`), e.g. min_new_tokens, no_repeat_ngram_size, min_p, suppress_tokens, stop_strings."""
    out = []
    for k, v in _effective_config(model, cfg).items():
        ok = NEUTRAL.get(k)
        if not (k in USED or (ok is not None and (ok[0] is ANY or v in ok))):
            out.append((k, v))
    return out


def _warpers(eff: dict[str, Any]) -> LogitsProcessorList:
    """transformers' sampling warpers for these options, in `generate`'s order (min_tokens_to_keep 1: no beams)."""
    out = LogitsProcessorList()
    t, k, p = eff.get("temperature"), eff.get("top_k"), eff.get("top_p")
    if t is not None and t != 1.0:
        out.append(TemperatureLogitsWarper(t))
    if k is not None and k != 0:
        out.append(TopKLogitsWarper(top_k=k, min_tokens_to_keep=1))
    if p is not None and p < 1.0:
        out.append(TopPLogitsWarper(top_p=p, min_tokens_to_keep=1))
    return out


def sharded_over_processes(model: Any) -> bool:
    """Whether every forward of `model` is a collective over several processes: parameters sharded by FSDP2
    (DTensors) or ZeRO-3 (partitioned, `ds_id`). Then every rank must run the same number of decode steps: a rank
    whose rows have all ended keeps stepping (on pad tokens) until every rank's have (`lean_generate`, and
    `model.generate` with `synced_gpus=True`, which transformers sets by itself only for models it sharded)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return _has_sharded_parameters(model)


def _has_sharded_parameters(model: Any) -> bool:
    """Parameters sharded by FSDP2 (DTensors) or partitioned by ZeRO-3 (`ds_id`)."""
    return any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters())


def _anyone_unfinished(unfinished: torch.Tensor, synced: bool) -> bool:
    """Whether a row of this process (or, `synced`, of any process: a collective) is still generating."""
    if not synced:
        return bool(unfinished.any())
    flag = unfinished.any().to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def inference_context(model: Any) -> Any:
    """`torch.inference_mode()` for the lean path in a single process with plain parameters (~10 % less time
    per decode step than no_grad on the suite's tiny Llama); a null context with several processes or sharded
    parameters (FSDP2 DTensors, ZeRO-3's partitioned ones), which are gathered and freed in place around each
    forward (an in-place update of a tensor made in inference mode is an error outside it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return contextlib.nullcontext()
    if _has_sharded_parameters(model):
        return contextlib.nullcontext()
    return torch.inference_mode()


CDF_BLOCK = 1024  # inverse_cdf_sample: vocabularies above this many tokens are sampled block first, then token


def _below(total: torch.Tensor, generator: Any = None) -> torch.Tensor:
    """A uniform draw in [0, total) per row of `total` (B, 1), strictly below it (in `total`'s dtype). `generator`:
    one `torch.Generator` for the batch, or a list of one per row (each row's draw from its own)."""
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand((1, 1), dtype=total.dtype, device=total.device, generator=g) for g in generator])
    else:
        u = torch.rand(total.shape, dtype=total.dtype, device=total.device, generator=generator)
    u = u * total
    return torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))


def inverse_cdf_sample(probs: torch.Tensor, generator: Any = None) -> torch.Tensor:
    """One token per row of `probs` (B, V): the first index whose running sum exceeds a uniform draw in
    [0, row sum). -> (B,) long. The same distribution as `torch.multinomial(probs, 1)` with one or two random
    numbers per row instead of one exponential per vocabulary entry (CPU, 1 thread: torch.multinomial 0.43 ms for
    16 x 1 024, 13.5 ms for 16 x 32 000, 65 ms for 16 x 151 936; this 0.06 / 0.85 / 7.3 ms).

    Above `CDF_BLOCK` tokens the draw is two-level: a block of 1 024 tokens by its mass (summed and accumulated in
    float64), then a token inside it, so a running float32 sum never spans more than one block. Exactness: the
    running sums are non-decreasing, so a token of probability 0 is never drawn (its sum equals its
    predecessor's), and every other token's chance is its probability within one float32 rounding of its block's
    running sum (<= 6e-8 x the block's mass); each draw is kept strictly below its sum, so it never runs past the
    last token with mass. A row that is not finite or sums to 0 (NaN / inf logits) is an error, as it is for
    torch.multinomial. `generator`: draw from it instead of torch's default generator (serve: one per request), or
    from a list of one generator per row (`lean_generate(generators=...)`)."""
    if probs.dtype not in (torch.float32, torch.float64):  # bf16 / fp16 logits (serve on a GPU): a half-precision
        probs = probs.float()  # running sum stops growing past ~256 steps of 1 / V and never reaches the last tokens
    b, v = probs.shape
    if v <= CDF_BLOCK:
        cum = probs.cumsum(dim=-1)  # (B, V)
        total = cum[:, -1:]  # (B, 1)
        _check_rows(total)
        return torch.searchsorted(cum, _below(total, generator), right=True).squeeze(1)
    nb = -(-v // CDF_BLOCK)
    blocks = torch.nn.functional.pad(probs, (0, nb * CDF_BLOCK - v)).view(b, nb, CDF_BLOCK)  # zeros past V
    mass = blocks.sum(dim=-1, dtype=torch.float64)  # (B, nb)
    cum_blocks = mass.cumsum(dim=-1)
    _check_rows(cum_blocks[:, -1:])
    # (B,) a block with mass
    k = torch.searchsorted(cum_blocks, _below(cum_blocks[:, -1:], generator), right=True).squeeze(1)
    cum = blocks[torch.arange(b, device=probs.device), k].cumsum(dim=-1)  # (B, CDF_BLOCK)
    return k * CDF_BLOCK + torch.searchsorted(cum, _below(cum[:, -1:], generator), right=True).squeeze(1)


def _check_rows(total: torch.Tensor) -> None:
    ok = torch.isfinite(total) & (total > 0)
    if not bool(ok.all()):
        raise NonFiniteLogitsError(int((~ok).nonzero()[0, 0]), "sampling: its probabilities are not finite or sum to 0")


class _StepPlan(NamedTuple):
    """What every decode step of one `lean_generate` call reads, fixed for the call (`_step_plan`)."""

    kw: str  # the keyword the model's forward takes the cache under (`compat.cache_keyword`)
    extra: dict[str, Any]  # {"logits_to_keep": 1} where the forward takes it, as generate passes it
    sample: bool  # sampling; False: greedy
    sampler: str  # "multinomial" or "inverse_cdf"
    warp: LogitsProcessorList  # transformers' sampling warpers (empty for greedy)
    eos: list[int]  # the end ids
    eos_t: torch.Tensor | None  # (E,) the end ids; None: rows never end before max_new_tokens
    pad_t: torch.Tensor  # the id written after a row's end (the pad id, else the first end id, else 0)
    synced: bool  # every rank steps until every rank's rows have ended (`sharded_over_processes`)
    drop: bool  # ended rows leave the batch (with their KV cache rows)
    fast: DecodeStep | None  # the one-token steps' `fast_step.DecodeStep`; None: the model's own forward


def _end_ids(eff: dict[str, Any], input_ids: torch.Tensor) -> tuple[list[int], torch.Tensor | None, torch.Tensor]:
    """The call's end ids (a list, and a tensor or None without any) and the id written after a row's end: the
    pad id, else the first end id (generate's fallback), else 0."""
    dev = input_ids.device
    eos = eff.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad_id = eff.get("pad_token_id")
    if eos and pad_id is None:
        pad_id = eos[0]  # generate's fallback
    eos_t = torch.tensor(eos, device=dev, dtype=torch.long) if eos else None
    pad_t = torch.tensor(pad_id if pad_id is not None else 0, dtype=input_ids.dtype, device=dev)
    return eos, eos_t, pad_t


def _fast_step(model: Any, cache: Any, wanted: bool) -> DecodeStep | None:
    """The fast decode step for the one-token steps where `wanted` (the inverse-CDF sampler, more than one new
    token) and `FAST_STEP` is on and `fast_step.fast_step_unsupported` finds nothing against it; else None (the
    model's own forward: multinomial / greedy keep it, and so generate's exact tokens)."""
    if not (FAST_STEP and wanted):
        return None
    why = fast_step_unsupported(model, cache, CACHE_LAYERS)
    if why is not None:
        logger.debug("lean_generate: decode steps use the model's own forward: %s", why)
        return None
    return DecodeStep(model)


def _step_plan(model: Any, eff: dict[str, Any], cache: Any, input_ids: torch.Tensor, sampler: str,
              n_new: int) -> _StepPlan:
    """The fixed part of a `lean_generate` call with the effective options `eff` (`_effective_config`)."""
    lm = unwrap_lm(model)
    eos, eos_t, pad_t = _end_ids(eff, input_ids)
    sample = bool(eff.get("do_sample"))
    synced = sharded_over_processes(model)  # every rank steps until every rank's rows have ended
    # rows that ended leave the batch (their KV cache rows too): only when the draws need not be generate's (the
    # inverse-CDF sampler; multinomial and greedy keep generate's batch and so its exact tokens) and in one process
    # (a sharded model's forwards are collectives over every rank's batch)
    drop = DROP_FINISHED and sample and sampler == "inverse_cdf" and eos_t is not None and not synced
    return _StepPlan(kw=cache_keyword(model),
                    extra={"logits_to_keep": 1} if _forward_accepts(type(lm), "logits_to_keep") else {},
                    sample=sample, sampler=sampler, warp=_warpers(eff) if sample else LogitsProcessorList(),
                    eos=eos, eos_t=eos_t, pad_t=pad_t, synced=synced, drop=drop,
                    fast=_fast_step(model, cache, sample and sampler == "inverse_cdf" and n_new > 1))


def _step_masks(lm: Any, attention_mask: torch.Tensor, n_new: int, fast: DecodeStep | None) -> tuple[Any, Any, Any]:
    """The steps' attention masks, made once and sliced per step: the 2D mask (None without padding: generate
    drops it), the boolean 4D mask sdpa's create_causal_mask would build at a one-token step (None unless
    `PREPARED_MASK` and sdpa; a prepared 4D mask is passed through as is) and the fast step's additive mask."""
    b = attention_mask.shape[0]
    mask = None if bool((attention_mask == 1).all()) else torch.cat(  # generate drops a mask without padding
        [attention_mask, attention_mask.new_ones(b, n_new)], dim=-1)  # (B, T + n_new)
    mask4 = mask.bool()[:, None, None, :] if mask is not None and PREPARED_MASK and getattr(
        lm.config, "_attn_implementation", None) == "sdpa" else None  # (B, 1, 1, T + n_new)
    fmask = None if mask is None or fast is None else fast.additive_mask(mask.bool()[:, None, None, :])
    return mask, mask4, fmask


def _step_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, past: int,
                    n_new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first step's ids and position ids (the tokens after the `past` ones already in the cache) and the new
    tokens' positions (B, n_new), counted from each row's first attended token as generate counts them."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
    step_ids = input_ids[:, past:].clone(memory_format=torch.contiguous_format)  # what prefill continues with
    step_pos = position_ids[:, past:].clone(memory_format=torch.contiguous_format)
    later_pos = position_ids[:, -1:] + torch.arange(1, n_new + 1, device=input_ids.device)  # (B, n_new)
    return step_ids, step_pos, later_pos


def _select_rows(keep: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Rows `keep` of each tensor (None stays None): what the still running rows keep when ended ones leave."""
    return tuple(None if x is None else x[keep] for x in tensors)


def draw(probs: torch.Tensor, sampler: str, generators: list | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V) -> (B,): `inverse_cdf_sample` or torch.multinomial, from torch's default
    generator or (`generators`) each row from its own."""
    if sampler == "inverse_cdf":
        return inverse_cdf_sample(probs, generators)
    if generators is None:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generators)]).squeeze(1)


@torch.no_grad()
def lean_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: GenerationConfig,
                  cache: Any = None, sampler: str = "multinomial", generators: list | None = None) -> torch.Tensor:
    """`model.generate(input_ids=..., attention_mask=..., generation_config=cfg, <cache keyword>=cache)` for a
    call `lean_unsupported` accepts: (B, T + n) ids, the prompt then n <= max_new_tokens new tokens (a row that
    ended has the pad id after its EOS). `cache` may hold the first tokens of every row already (the shared
    prompt prefill); otherwise one is made (`preallocated_cache`). `generate_responses` runs it (and the prefill)
    inside `inference_context(model)`: read the ids it returns there (`.tolist()`), do not feed them to autograd.
    `sampler`: "multinomial" draws `generate`'s tokens; "inverse_cdf" draws from the same distribution with
    `inverse_cdf_sample` (other tokens under one seed, far less CPU per step). `generators`: one `torch.Generator`
    per row, each row's draws from its own (tokens that do not depend on the other rows of the batch; one small
    draw per row and step, for `alignkit generate` / `sample`, not for the online loop); None: torch's generator."""
    if sampler not in ("multinomial", "inverse_cdf"):
        raise ValueError(f"lean_generate: sampler must be 'multinomial' or 'inverse_cdf', got {sampler!r}")
    eff = _effective_config(model, cfg)
    n_new = int(eff["max_new_tokens"])
    if cache is None:
        cache = preallocated_cache(model, input_ids.shape[1] + n_new)
    plan = _step_plan(model, eff, cache, input_ids, sampler, n_new)
    new, non_finite = _decode_steps(model, plan, cache, input_ids, attention_mask, n_new, generators)
    if non_finite is not None and bool(non_finite.any()):
        raise NonFiniteLogitsError(int(non_finite.nonzero()[0, 0]), "greedy: its largest logit is NaN or inf")
    return torch.cat([input_ids, new], dim=-1)


def _decode_steps(model: Any, plan: _StepPlan, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  n_new: int, generators: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lean_generate`'s loop: the prompt tokens not in `cache`, then one token a step, until every row has
    ended or after `n_new` steps (`generators`: one per row, `lean_generate`'s). -> (B, n) new ids (pads after a
    row's end); (B,) rows whose greedy pick came from non-finite logits (None when sampling)."""
    kw, extra, sample, sampler, warp, eos, eos_t, pad_t, synced, drop, fast = plan  # locals: read every step
    b, t = input_ids.shape
    dev = input_ids.device
    mask, mask4, fmask = _step_masks(unwrap_lm(model), attention_mask, n_new, fast)
    step_ids, step_pos, later_pos = _step_positions(input_ids, attention_mask, cache.get_seq_length(), n_new)
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    new = torch.full((b, n_new), int(pad_t), dtype=input_ids.dtype, device=dev)  # a row that left keeps pads
    n = 0
    rows: torch.Tensor | None = None  # (B',) the original row of each running row, once some have left
    warp_ids = input_ids
    non_finite: torch.Tensor | None = None  # greedy (rows never leave): (B,) rows that picked from non-finite logits
    for i in range(n_new):
        step_mask = (None if mask is None else mask4[..., :t + i] if mask4 is not None and step_ids.shape[1] == 1
                     else mask[:, :t + i])
        # the fast step extends a filled cache: not at a 1-token prompt's first step (t + i == 1, nothing cached)
        if fast is not None and step_ids.shape[1] == 1 and t + i > 1:
            fm = None if fmask is None else fmask[..., :t + i]
            if (fmask is None) in _CHECKED.get(model, ()):
                logits = fast(step_ids, step_pos, fm, cache)
            else:
                logits = _checked_step(model, fast, step_ids, step_pos, step_mask, fm, cache, kw, extra)
            logits = logits.to(dtype=torch.float32, device=dev)  # (B, V)
        else:
            out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                        return_dict=True, **{kw: cache}, **extra)
            # generate copies these logits to float32 (no copy needed to read them: same values)
            logits = out.logits[:, -1].to(dtype=torch.float32, device=dev)  # (B, V)
            del out
        if sample:
            probs = torch.nn.functional.softmax(warp(warp_ids, logits), dim=-1)  # (B, V)
            nxt = draw(probs, sampler, generators)  # (B,)
        else:
            nxt = torch.argmax(logits, dim=-1)
            # argmax takes a NaN as the largest value and a row of -inf gives index 0: the picked logit is finite
            # only when the row's maximum is; collected on the device, read once after the loop (no extra sync)
            picked = logits.gather(1, nxt[:, None]).squeeze(1)  # (B,)
            non_finite = ~torch.isfinite(picked) & unfinished if non_finite is None else (
                non_finite | (~torch.isfinite(picked) & unfinished))
        if eos_t is not None:  # generate: next * unfinished + pad * (1 - unfinished)
            nxt = torch.where(unfinished, nxt, pad_t)
        if rows is None:
            new[:, i] = nxt
        else:
            new[rows, i] = nxt
        n = i + 1
        if eos_t is not None:
            unfinished &= (nxt != eos_t[0]) if len(eos) == 1 else ~torch.isin(nxt, eos_t)
            if not _anyone_unfinished(unfinished, synced):
                break
            if drop and i + 1 < n_new:
                running = int(unfinished.sum())
                if unfinished.numel() - running >= max(1.0, DROP_FRACTION * unfinished.numel()):
                    keep = unfinished.nonzero().squeeze(1)  # (B',)
                    rows = keep if rows is None else rows[keep]
                    if generators is not None:
                        generators = [generators[j] for j in keep.tolist()]
                    cache.batch_select_indices(keep)
                    mask, mask4, fmask, later_pos, warp_ids, nxt, unfinished = _select_rows(
                        keep, mask, mask4, fmask, later_pos, warp_ids, nxt, unfinished)
        step_ids = nxt[:, None]
        step_pos = later_pos[:, i:i + 1]
    return new[:, :n], non_finite


def _checked_step(model: Any, fast: DecodeStep, ids: torch.Tensor, pos: torch.Tensor, step_mask: Any,
                  fmask: torch.Tensor | None, cache: Any, kw: str, extra: dict[str, Any]) -> torch.Tensor:
    """The fast step checked against the model's own forward on the same cache (once per model object and mask
    kind): the model's forward first, its cache entries dropped, then the fast step; logits further apart than
    `fast_step.tolerance` raise. -> the fast step's logits (B, V)."""
    n = [layer.keys.shape[-2] for layer in cache.layers]
    ref = model(input_ids=ids, attention_mask=step_mask, position_ids=pos, use_cache=True, return_dict=True,
                **{kw: cache}, **extra).logits[:, -1]
    for layer, m in zip(cache.layers, n):  # the step's keys / values leave the cache again
        layer.keys, layer.values = layer.keys[..., :m, :], layer.values[..., :m, :]
    got = fast(ids, pos, fmask, cache)
    got32, ref32 = got.float(), ref.float()
    same = (got32 == ref32) | (got32.isnan() & ref32.isnan())  # equal infinities / NaNs: the loop's own error follows
    err = float((got32 - ref32).abs().masked_fill(same, 0).max())
    scale = max(1.0, float(ref32.abs().nan_to_num(0.0, 0.0, 0.0).max()))
    if not err <= tolerance(ref.dtype) * scale:  # NaN too
        raise FastStepMismatchError(
            f"lean_generate: the fast decode step of {type(unwrap_lm(model)).__name__} gives other logits than the "
            f"model's own forward (max |difference| {err:.3g}, logits up to {scale:.3g}; "
            f"{'padded' if fmask is not None else 'unpadded'} batch), so its samples would come from another model: "
            "set alignkit.online.decode.FAST_STEP = False or sampling.sampler: multinomial, and report it "
            "(alignkit/online/fast_step.py)")
    _CHECKED.setdefault(model, set()).add(fmask is None)
    return got


__all__ = ["draw", "generation_options", "lean_generate", "inverse_cdf_sample", "lean_unsupported",
           "inference_context", "preallocated_cache", "PreallocatedLayer", "sharded_over_processes"]
