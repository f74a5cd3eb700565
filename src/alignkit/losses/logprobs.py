"""Token log-probabilities without materialising full float32 logits.

One implementation of log p(token) serves SFT, the DPO family, KTO and online objectives.

- `selective_log_softmax(logits, index)`: log p(index) from logits you already have, `(..., V)`.
  Rows are processed in chunks, so the only float32 temporaries are `(chunk, V)`.
- `chunked_lm_logprobs(hidden, weight, bias, targets)`: applies the LM head ONLY at the given
  (completion) positions, in row chunks, and recomputes each chunk's logits in the backward pass
  (a custom autograd Function). Saved for backward: hidden `(N, d)`, weight `(V, d)`, bias, targets
  `(N,)` and the per-row logsumexp `(N,)`; never an `(N, V)` tensor.
- `sequence_logps(token_logps, mask)`: per-sequence sum (or mean) over completion tokens.
- `entropy_from_logits(logits)`: per-position entropy, row-chunked.

Logits, as in HF models: z = softcap(logit_scale * (h W^T + b)) / temperature, with
softcap(x) = c * tanh(x / c) (Gemma-2 style; off when `softcap` is None). Then
    log p(y) = z_y - logsumexp(z)            H = logsumexp(z) - sum_j p_j z_j
and the gradients used in the backward pass are
    d log p(y) / d z = onehot(y) - p,   d lse / d z = p,   d H / d z = -p * (log p + H).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _float(x: Tensor) -> Tensor:
    """Low precision (bf16/fp16) -> float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log p(index) from (N, V) logits; backward recomputes softmax per chunk from the saved lse."""

    @staticmethod
    def forward(ctx, flat, idx, chunk_size):
        acc = _float(flat[:0]).dtype
        logp = flat.new_empty(flat.shape[0], dtype=acc)
        lse = flat.new_empty(flat.shape[0], dtype=acc)
        for s in range(0, flat.shape[0], chunk_size):
            z = _float(flat[s:s + chunk_size])  # (c, V) float32 only for this chunk
            lse[s:s + chunk_size] = torch.logsumexp(z, dim=-1)
            logp[s:s + chunk_size] = z.gather(-1, idx[s:s + chunk_size, None]).squeeze(-1) - lse[s:s + chunk_size]
        ctx.save_for_backward(flat, idx, lse)  # the logits the caller already holds, no copy
        ctx.chunk_size = chunk_size
        return logp

    @staticmethod
    def backward(ctx, g):
        flat, idx, lse = ctx.saved_tensors
        grad = torch.empty_like(flat)
        for s in range(0, flat.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            gz = -g[s:e, None] * torch.exp(_float(flat[s:e]) - lse[s:e, None])  # -g * softmax
            gz.scatter_add_(-1, idx[s:e, None], g[s:e, None])  # + g * onehot
            grad[s:e] = gz.to(flat.dtype)
        return grad, None, None


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_size: int = 1024,
                          ignore_index: int | None = IGNORE_INDEX) -> Tensor:
    """log softmax(logits)[index] for `logits (..., V)`, `index (...)` -> `(...)`.

    Rows are handled `chunk_size` at a time (logsumexp in float32 for bf16/fp16 input) and the
    backward pass recomputes softmax per chunk from the saved logsumexp, so apart from the logits
    themselves (and their gradient) no `(N, V)` tensor is made. The result is float32 for
    bf16/fp16 input (sums of log-probs are too coarse in bf16), otherwise the input dtype.
    Positions where `index == ignore_index` get 0 (and no gradient).
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"selective_log_softmax: logits {tuple(logits.shape)} and index {tuple(index.shape)} "
                         "must agree on all but the last (vocabulary) dimension")
    if chunk_size < 1:
        raise ValueError(f"selective_log_softmax: chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    idx = index.reshape(-1)  # (N,)
    ignore = (idx == ignore_index) if ignore_index is not None else None
    safe_idx = idx.masked_fill(ignore, 0) if ignore is not None else idx
    logp = _SelectiveLogSoftmax.apply(flat, safe_idx.long(), chunk_size)
    if ignore is not None:
        logp = logp.masked_fill(ignore, 0.0)
    return logp.reshape(index.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Entropy H = lse(z) - sum_j softmax(z)_j z_j of `logits (..., V)` -> `(...)`, row-chunked.

    Meant for logging (call under no_grad); for a differentiable entropy bonus without (N, V) memory use
    `chunked_lm_logprobs(..., return_stats=True).entropy`.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    out = []
    for s in range(0, flat.shape[0], chunk_size):
        z = _float(flat[s:s + chunk_size])  # (c, V)
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        out.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    ent = torch.cat(out) if out else flat.new_zeros(0, dtype=_float(flat).dtype)
    return ent.reshape(logits.shape[:-1])


class TokenLogprobs(NamedTuple):
    """Output of `chunked_lm_logprobs(..., return_stats=True)`; all `(N,)` float32 (or float64)."""

    logps: Tensor  # log p(target)
    entropy: Tensor  # H(p) per position
    logsumexp: Tensor  # lse(z) per position
    correct: Tensor | None = None  # (N,) bool: the target is the argmax of z (`with_accuracy=True`)
    mean_logit: Tensor | None = None  # (N,) mean of z over the vocabulary (TRL's logits/chosen per token)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: float,
                  softcap: float | None, temperature: float) -> tuple[Tensor, Tensor | None]:
    """(c, d) -> logits z (c, V) in float32 (or float64), and tanh(.) of the softcap (for backward)."""
    raw = h @ weight.T  # (c, V) in the input dtype
    if bias is not None:
        raw = raw + bias
    z = _float(raw)
    if logit_scale != 1.0:
        z = z * logit_scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    if temperature != 1.0:
        z = z / temperature
    return z, t


class _ChunkedLMLogprobs(torch.autograd.Function):
    """Outputs (logps, entropy, lse), each (N,). Entropy is computed only when `with_entropy` (otherwise
    zeros, and it must not be used). Gradients of unused outputs arrive as None (no materialised zeros), so
    the backward pass does only the work the loss asks for."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, logit_scale, softcap, temperature, with_entropy,
                with_accuracy=False):
        N = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logps = hidden.new_empty(N, dtype=acc)
        ent = hidden.new_zeros(N, dtype=acc)
        lse = hidden.new_empty(N, dtype=acc)
        correct = hidden.new_zeros(N, dtype=torch.bool)
        mean_z = hidden.new_zeros(N, dtype=acc)
        for s in range(0, N, chunk_size):
            z, _ = _chunk_logits(hidden[s:s + chunk_size], weight, bias, logit_scale, softcap, temperature)
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            lse[s:s + chunk_size] = lse_c
            z_y = z.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)  # (c,)
            logps[s:s + chunk_size] = z_y - lse_c
            if with_accuracy:
                correct[s:s + chunk_size] = z.argmax(-1) == targets[s:s + chunk_size]  # ties: first index, as TRL
                mean_z[s:s + chunk_size] = z.mean(-1)
            if with_entropy:
                p = torch.exp(z - lse_c[:, None])  # (c, V)
                ent[s:s + chunk_size] = lse_c - (p * z).sum(-1)
        # One chunk and no softcap: keep its logits for backward instead of recomputing them (the same values,
        # bitwise: backward would run the same matmul); the (N, V) block lives until backward. Larger inputs
        # recompute chunk by chunk, so their peak stays a few (chunk_size, V) blocks.
        keep = z if 0 < N <= chunk_size and softcap is None and any(ctx.needs_input_grad[:3]) else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, keep)
        ctx.cfg = (chunk_size, logit_scale, softcap, temperature)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.mark_non_differentiable(correct, mean_z)
        return logps, ent, lse, correct, mean_z

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse, g_correct=None, g_mean=None):
        hidden, weight, bias, targets, lse, kept = ctx.saved_tensors
        chunk_size, logit_scale, softcap, temperature = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        none = (None,) * 10
        if g_logp is None and g_ent is None and g_lse is None:
            return none
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s:s + chunk_size]  # (c, d)
            if kept is not None:  # the forward's logits (one chunk, no softcap)
                z, t = kept, None
            else:
                z, t = _chunk_logits(h, weight, bias, logit_scale, softcap, temperature)  # (c, V)
            lse_c = lse[s:s + chunk_size, None]  # (c, 1)
            p = torch.exp(z - lse_c)  # (c, V)
            # d/dz of  g_logp * logp + g_lse * lse + g_ent * H  =  (g_lse - g_logp) * p + g_logp * onehot
            #                                                      - g_ent * p * (log p + H)
            coef = None
            if g_logp is not None:
                coef = -g_logp[s:s + chunk_size, None]
            if g_lse is not None:
                coef = g_lse[s:s + chunk_size, None] if coef is None else coef + g_lse[s:s + chunk_size, None]
            gz = p * coef if coef is not None else torch.zeros_like(z)
            if g_logp is not None:
                gz.scatter_add_(-1, targets[s:s + chunk_size, None], g_logp[s:s + chunk_size, None])
            if g_ent is not None:
                H = lse_c - (p * z).sum(-1, keepdim=True)  # (c, 1)
                gz -= g_ent[s:s + chunk_size, None] * p * (z - lse_c + H)
            # chain rule back through /temperature, softcap and logit_scale to the raw logits
            if temperature != 1.0:
                gz = gz / temperature
            if softcap is not None:
                gz = gz * (1.0 - t * t)
            if logit_scale != 1.0:
                gz = gz * logit_scale
            g_raw = gz.to(hidden.dtype)  # (c, V)
            if need_h:
                grad_h[s:s + chunk_size] = g_raw @ weight
            if need_w:
                grad_w += (g_raw.T @ h).to(acc)
            if need_b:
                grad_b += gz.sum(0).to(acc)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None) + none[3:]


def chunked_lm_logprobs(hidden_states: Tensor, lm_head_weight: Tensor, lm_head_bias: Tensor | None,
                        target_ids: Tensor, chunk_size: int = 1024, *, logit_scale: float = 1.0,
                        softcap: float | None = None, temperature: float = 1.0,
                        ignore_index: int | None = IGNORE_INDEX,
                        return_stats: bool = False, with_accuracy: bool = False) -> Tensor | TokenLogprobs:
    """log p(target) at selected positions, applying the LM head chunk by chunk.

    Args:
        hidden_states: `(N, d)` final hidden states (after the final norm) at the positions whose
            NEXT token is scored, e.g. `h[:, :-1][completion_mask[:, 1:]]`.
        lm_head_weight: `(V, d)`; lm_head_bias: `(V,)` or None.
        target_ids: `(N,)` the next tokens; `ignore_index` entries get logp 0 and no gradient.
        chunk_size: rows per chunk; peak extra memory is a few `(chunk_size, V)` float32 tensors.
        logit_scale, softcap, temperature: z = softcap(logit_scale * raw) / temperature.
        return_stats: also return per-position entropy and logsumexp (both differentiable).
        with_accuracy: also return (in `TokenLogprobs`) whether each target is the argmax of the logits, and
            the logits' mean over the vocabulary (no gradient; TRL's `mean_token_accuracy`, `logits/chosen`).

    Returns `(N,)` log-probs in float32 (float64 for float64 input), or `TokenLogprobs`.
    Gradients flow to hidden_states, lm_head_weight and lm_head_bias (only those that require it).
    """
    if hidden_states.dim() != 2 or lm_head_weight.dim() != 2:
        raise ValueError(f"chunked_lm_logprobs: hidden_states must be (N, d) and lm_head_weight (V, d), got "
                         f"{tuple(hidden_states.shape)} and {tuple(lm_head_weight.shape)}; flatten the selected "
                         "positions first")
    if hidden_states.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(f"chunked_lm_logprobs: hidden size {hidden_states.shape[-1]} != lm_head_weight "
                         f"input size {lm_head_weight.shape[-1]}")
    if target_ids.shape != hidden_states.shape[:1]:
        raise ValueError(f"chunked_lm_logprobs: target_ids {tuple(target_ids.shape)} must be (N,) = "
                         f"({hidden_states.shape[0]},)")
    if chunk_size < 1:
        raise ValueError(f"chunked_lm_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"chunked_lm_logprobs: temperature must be > 0, got {temperature}")
    weight = lm_head_weight.to(hidden_states.dtype) if lm_head_weight.dtype != hidden_states.dtype else lm_head_weight
    bias = lm_head_bias
    if bias is not None and bias.dtype != hidden_states.dtype:
        bias = bias.to(hidden_states.dtype)
    ignore = (target_ids == ignore_index) if ignore_index is not None else None
    targets = target_ids.masked_fill(ignore, 0) if ignore is not None else target_ids
    V = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"chunked_lm_logprobs: target ids must lie in [0, {V}) (or equal ignore_index="
                         f"{ignore_index}); got range [{int(targets.min())}, {int(targets.max())}]")
    logps, ent, lse, correct, mean_z = _ChunkedLMLogprobs.apply(
        hidden_states, weight, bias, targets.long(), chunk_size, float(logit_scale), softcap, float(temperature),
        return_stats, with_accuracy)
    if ignore is not None:
        logps = logps.masked_fill(ignore, 0.0)
    if with_accuracy:
        return TokenLogprobs(logps, ent, lse, correct, mean_z)
    if return_stats:
        return TokenLogprobs(logps, ent, lse)
    return logps


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, if `average`) of `token_logps (B, T)` over `mask (B, T)` -> `(B,)`.

    The mean divides by max(number of completion tokens, 1), so an empty completion gives 0.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"sequence_logps: token_logps {tuple(token_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    m = mask.to(token_logps.dtype)
    total = (token_logps * m).sum(-1)  # (B,)
    if average:
        return total / m.sum(-1).clamp(min=1.0)
    return total
