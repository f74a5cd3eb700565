"""Sampled token ids -> training tensors, and per-token statistics of the policy and its reference.

The online trainers learn from the EXACT token ids the policy sampled (`Sample.prompt_ids` +
`Sample.response_ids`), never from re-tokenized text: a policy gradient must score the actions that were
taken. Rows are right-padded (prompt, response, pads), so position ids count from each row's first token
as in generation, and `completion_mask` marks the response tokens:

    input_ids        (B, T)   prompt_ids + response_ids + pad
    attention_mask   (B, T)   1 on prompt and response
    completion_mask  (B, T)   1 on response tokens

`token_stats` runs ONE forward of the (wrapped) policy and returns, at the positions whose NEXT token is a
response token (the shifted layout of `alignkit.trainers.logps`, width T-1):

    logps    (B, T-1)   log pi(a_t | s_t), sampled at `temperature`  (0 off the response)
    mask     (B, T-1)   bool, the response tokens
    entropy  (B, T-1)   H(pi(. | s_t))                               (if asked)
    hidden   (B, T-1, d) final hidden state of s_t (after the final norm; for a value head, if asked)

The LM head runs only at response positions, chunked (`alignkit.trainers.logps.head_logprobs`). For a ReFT
policy the prompt positions are intervened on from each row's prompt span (as in generation).
Logits are divided by the sampling temperature, so the scored distribution is the one that was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from alignkit.data.collators import pad, shared_prefix_layout
from alignkit.online.generation import Sample
from alignkit.trainers.logps import final_hidden_states, head_logprobs


@dataclass
class TokenStats:
    logps: Tensor  # (B, T-1)
    mask: Tensor  # (B, T-1) bool
    entropy: Tensor | None = None  # (B, T-1)
    hidden: Tensor | None = None  # (B, T-1, d)


def rows_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
               device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """(prompt ids, response ids) rows -> right-padded `input_ids`, `attention_mask`, `completion_mask` (B, T)."""
    for i, (p, r) in enumerate(rows):
        if not p or not r:
            raise ValueError(f"row {i}: a training row needs prompt and response tokens, got {len(p)} and {len(r)}")
    ids = [list(p) + list(r) for p, r in rows]
    comp = [[0] * len(p) + [1] * len(r) for p, r in rows]
    return {"input_ids": pad(ids, pad_id, side="right").to(device),  # (B, T)
            "attention_mask": pad([[1] * len(x) for x in ids], 0, side="right").to(device),  # (B, T)
            "completion_mask": pad(comp, 0, side="right").to(device)}  # (B, T)


def samples_batch(samples: Sequence[Sample], pad_id: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """One row per sample (see `rows_batch`)."""
    return rows_batch([(s.prompt_ids, s.response_ids) for s in samples], pad_id, device)


def select(batch: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    """Rows `idx` of every (B, ...) tensor in `batch`, trimmed to the longest selected row."""
    out = {k: v[idx] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(-1).max())
    return {k: v[:, :width] if v.dim() >= 2 else v for k, v in out.items()}


def token_stats(model: nn.Module, batch: dict[str, Tensor], *, temperature: float = 1.0, entropy: bool = False,
                hidden: bool = False, chunk_size: int = 1024) -> TokenStats:
    """Per-token log-probs (and entropy, hidden states) of the response tokens; see the module docstring."""
    if batch.get("share_groups") is not None:  # `share_prompt`: the rows of one prompt run as one shared row
        batch = {**batch, **shared_prefix_layout(batch["input_ids"], batch["attention_mask"], batch["share_groups"])}
    ids = batch["input_ids"]  # (B, T)
    mask = (batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:]).bool()  # (B, T-1)
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    # without `hidden`, only the response positions are read (the last layer may run on those only)
    h = final_hidden_states(model, batch, None if hidden else (rows, cols))  # (B, T, d)
    out = head_logprobs(model, h[rows, cols], ids[:, 1:][rows, cols], chunk_size, temperature=temperature,
                        entropy=entropy)  # entropy only when asked
    lp = out.logps if entropy else out
    logps = lp.new_zeros(mask.shape).index_put((rows, cols), lp)  # (B, T-1)
    ent = out.entropy.new_zeros(mask.shape).index_put((rows, cols), out.entropy) if entropy else None
    return TokenStats(logps, mask, ent, h[:, :-1] if hidden else None)


def sequence_sums(token_values: Tensor, mask: Tensor) -> Tensor:
    """(B, T-1) per-token values -> (B,) sums over the response tokens."""
    return (token_values * mask.to(token_values.dtype)).sum(-1)


__all__ = ["TokenStats", "rows_batch", "samples_batch", "select", "token_stats", "sequence_sums"]
