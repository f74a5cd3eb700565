"""Supervised finetuning: masked next-token cross-entropy, normalised by completion tokens.

    L = - (1 / N_tokens) * sum_{examples i} sum_{t in completion(i)} log p_theta(y_{i,t} | x_i, y_{i,<t})

where N_tokens counts the completion tokens of the WHOLE optimizer step (all micro-batches of
gradient accumulation, all processes). `sft_loss` therefore returns per-example SUMS of the token
NLL (`losses`) and per-example token counts (`num_tokens`); the trainer base divides once:

    # before the micro-batches of one optimizer step:
    n_step = sum(mask.sum() for each micro-batch of the step)      # (x world_size under DDP: sum
                                                                   #  across processes, then * world
                                                                   #  size, since DDP averages grads)
    # for each micro-batch:
    out = sft_loss(token_logps, mask)
    loss = reduce_loss(out.losses, weights, normalizer=n_step)      # do NOT divide by accumulation
    loss.backward()                                                 # steps again

With `transformers.Trainer` this is the `num_items_in_batch` argument of `compute_loss` (counted
over `labels[..., 1:] != -100`; with `average_tokens_across_devices` it is already the global count
and the Trainer multiplies the loss by the number of processes) together with
`loss_is_scaled_for_ga = True` (or `model_accepts_loss_kwargs = True`) so that the Trainer does not
divide by `gradient_accumulation_steps` a second time. Then batch 8 x accumulation 1 and batch 1 x
accumulation 8 give the same gradient (tests/losses/test_sft.py::test_accumulation_invariant).
"""

from __future__ import annotations

from torch import Tensor

from .registry import SFT_LOSSES, LossOutput


@SFT_LOSSES.register("nll", metrics=("nll/token", "target_tokens"))
def sft_loss(token_logps: Tensor, mask: Tensor) -> LossOutput:
    """Masked next-token NLL: losses_i = -sum_t mask_it * log p(y_it); num_tokens_i = sum_t mask_it.

    Args:
        token_logps: `(B, T)` log p of each target token (e.g. from `selective_log_softmax` or
            `chunked_lm_logprobs` scattered back), already aligned with `mask`.
        mask: `(B, T)` 1 on completion tokens that are scored, 0 on prompt and padding.

    Returns per-example sums (divide by the step's token count with `reduce_loss(..., normalizer=)`),
    `num_tokens (B,)`, and metrics `nll/token (B,)` (per-example mean NLL, for logging) and
    `target_tokens (B,)` (scored tokens per example; not TRL's `num_tokens`, the cumulative count of input
    tokens, which the trainer logs).
    """
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise ValueError(f"sft_loss: token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} "
                         "must both be (B, T)")
    m = mask.to(token_logps.dtype)
    nll_sum = -(token_logps * m).sum(-1)  # (B,)
    n = m.sum(-1)  # (B,)
    metrics = {"nll/token": (nll_sum / n.clamp(min=1.0)).detach(), "target_tokens": n.detach()}
    return LossOutput(losses=nll_sum, metrics=metrics, num_tokens=n.detach())
