"""Completion log-probabilities of a (wrapped) causal LM without full `(B, T, V)` logits.

One function serves SFT, the DPO family, KTO and the online trainers:

    token = completion_token_logps(model, batch)     # (B, T-1) log p(x_{t+1} | x_{<=t}), 0 off completion
    sums, counts = completion_logps(model, batch)    # (B,) per-sequence sums, (B,) completion token counts

How. The model is called through its top-level forward (so DDP, peft and ReFT wrappers all run as
usual; ReFT gets `intervention_locations`) with `logits_to_keep` an empty index tensor, so the model's own
LM head runs on no position at all (B, 0, V). A temporary forward hook on the backbone (`lm.base_model`, which ends with
the final norm) captures the final hidden states h (B, T, d). Completion positions are picked with
index tensors (row, col) where the NEXT token is a completion token, and the LM head is applied only
there, in chunks, by `alignkit.losses.chunked_lm_logprobs` (recomputed in backward):

    targets  = input_ids[:, 1:]                        (B, T-1)
    mask     = completion_mask[:, 1:] & attention      (B, T-1)
    rows, cols = mask.nonzero()                        (N,), (N,)
    logp     = chunked_lm_logprobs(h[rows, cols], W_head, b_head, targets[rows, cols])   (N,)

ReFT locations come from the batch (`intervention_locations`) or, if absent, from the model itself: the
`ReftModel` places its saved position spec (`ReftConfig.positions`) over each row's prompt span (first
attended token up to the first completion token, or `prompt_length` when the collator carries it;
`ReftModel.span_locations`), so the same prompt positions are edited for a pair's chosen and rejected
rows. No adapter kind is asked for: a model that edits positions is one that has `span_locations`.

Padding-free (packed) batches (`alignkit.data.PackedSFTCollator` / `PackedPreferenceCollator`: R sequences concatenated
in one row (1, S) or binned into rows (rows, L), `position_ids` restarting at 0 per sequence, `sequence_index`, no
attention_mask) go through the same code. The model sees no attention mask, so transformers derives the sequence
boundaries from `position_ids` (`masking_utils.find_packed_sequence_indices`: a new sequence wherever the position does
not grow by one; only without a KV cache, hence use_cache=False) and builds a block-diagonal causal mask for sdpa /
eager (rows bound its cost: sum of L^2, not S^2); flash-attention models get one row and `cu_seq_lens_q/k`,
`max_length_q/k` (varlen kernels, no recount). The scored token log-probs are then scattered back to the padded layout
(R, L_max - 1) of right padding, (sequence_index, position - 1), so every loss, metric and reduction sees exactly what a
padded batch gives. ReFT locations are computed per sequence and shifted by its start in its row: (rows, I, K * P).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignkit.compat import attn_implementation, check_logits_skipped
from alignkit.distributed import is_zero3_partitioned
from alignkit.interventions.positions import prompt_spans, prompt_spans_from_mask
from alignkit.losses import chunked_lm_logprobs
from alignkit.models import last_layer, varlen
from alignkit.adapters import unwrap_lm, unwrap_parallel


def is_packed(batch: dict[str, Any]) -> bool:
    """True for a padding-free batch (`alignkit.data.collators.pack`: sequences concatenated in rows)."""
    return batch.get("sequence_index") is not None and batch.get("sequence_start") is not None


def packed_prompt_spans(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(start, length) `(R,)` of each packed sequence's prompt in the FLATTENED rows (rows * L): from the
    sequence's first token to its first completion token (or its end when it has none)."""
    comp = batch["completion_mask"].reshape(-1).bool()  # (rows*L,)
    start = batch["sequence_start"].to(comp.device)  # (R,)
    end = start + batch["sequence_length"].to(comp.device)  # (R,)
    R, n = start.shape[0], comp.shape[0]
    seq = batch["sequence_index"].reshape(-1).to(comp.device)  # (rows*L,), -1 on filler
    seq = torch.where(seq >= 0, seq, R)  # filler -> a dummy bucket R
    cand = torch.where(comp, torch.arange(n, device=comp.device), n)  # completion positions, else n
    first = torch.cat([end, end.new_full((1,), n)]).scatter_reduce(0, seq, cand, reduce="amin")[:R]  # (R,)
    return start, first - start


def _packed_locations(loc: Tensor, batch: dict[str, Any]) -> Tensor:
    """(R, I, P) locations in the flattened rows -> (rows, I, K * P), K = most sequences in one row: each row
    holds the positions (within the row) of its own sequences, -1 elsewhere."""
    rows, L = batch["input_ids"].shape
    R, I, P = loc.shape
    row = torch.div(batch["sequence_start"].to(loc.device), L, rounding_mode="floor")  # (R,)
    inrow = torch.where(loc >= 0, loc - (row * L)[:, None, None], -1)  # (R, I, P)
    order = torch.argsort(row, stable=True)  # sequences grouped by row
    first = torch.searchsorted(row[order], row[order], right=False)  # (R,) first slot of the row in `order`
    rank = torch.empty_like(row)
    rank[order] = torch.arange(R, device=loc.device) - first  # (R,) index of the sequence within its row
    K = int(rank.max()) + 1 if R else 1
    out = loc.new_full((rows, I, K * P), -1)
    r_idx = row[:, None, None].expand(R, I, P)
    i_idx = torch.arange(I, device=loc.device)[None, :, None].expand(R, I, P)
    p_idx = (rank[:, None, None] * P + torch.arange(P, device=loc.device)[None, None, :]).expand(R, I, P)
    out[r_idx, i_idx, p_idx] = inrow
    return out


def _spec_error() -> ValueError:
    return ValueError("this ReFT model has no position spec and the batch no `intervention_locations`: build it with "
                      "alignkit.adapters.apply_adapter (AdapterConfig.reft.positions, e.g. 'f1+l1') or set "
                      "ReftConfig.positions")


def batch_locations(model: nn.Module, batch: dict[str, Any]) -> Tensor | None:
    """`intervention_locations (B, I, P)` for a model that edits positions (from the batch, else the model's own
    saved spec over each row's prompt span); None for a model that does not (no `span_locations`).
    For a packed batch: `(rows, I, K * P)`, each sequence's positions shifted by its start in its row."""
    locate = getattr(unwrap_parallel(model), "span_locations", None)  # through DDP / FSDP wrappers
    if locate is None:
        return None
    if batch.get("intervention_locations") is not None:
        return batch["intervention_locations"]
    if is_packed(batch):
        start, length = packed_prompt_spans(batch)
    else:
        att = batch.get("attention_mask")
        if att is None:
            att = torch.ones_like(batch["input_ids"])
        start, length = prompt_spans(att, batch["completion_mask"])
    if batch.get("prompt_length") is not None:  # multi-turn SFT: earlier assistant turns are trained, not prompt ends
        length = batch["prompt_length"].to(length.device)
    loc = locate(start, length)  # (B, I, P), or (R, I, P) over the flattened packed rows
    if loc is None:
        raise _spec_error()
    return _packed_locations(loc, batch) if is_packed(batch) else loc  # packed: (rows, I, K*P)


def prompt_locations(model: nn.Module, attention_mask: Tensor) -> Tensor | None:
    """Locations for prompt-only rows (generation, classification): the whole attended span is the prompt."""
    locate = getattr(unwrap_parallel(model), "span_locations", None)
    if locate is None:
        return None
    loc = locate(*prompt_spans_from_mask(attention_mask))
    if loc is None:
        raise _spec_error()
    return loc


def forward_kwargs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """Model inputs (input_ids, attention_mask, position_ids, ReFT locations) of `batch`."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"]}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            kw[key] = batch[key]
    if is_packed(batch):
        if batch.get("attention_mask") is not None or batch.get("position_ids") is None:
            raise ValueError("a packed batch needs position_ids restarting at 0 per sequence and no attention_mask "
                             "(transformers reads the boundaries from position_ids only then); build it with "
                             "PackedSFTCollator / PackedPreferenceCollator")
        impl = attn_implementation(unwrap_lm(model).config)
        if "flash" in impl:  # varlen kernels: hand over the boundaries instead of re-deriving them
            if batch.get("cu_seq_lens") is None:
                raise ValueError(f"attention {impl!r} needs one packed row (cu_seq_lens); the batch has "
                                 f"{batch['input_ids'].shape[0]} rows: use a packed collator with row_length=None")
            cu = batch["cu_seq_lens"].to(batch["input_ids"].device, torch.int32)
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch["max_seq_len"]),
                      max_length_k=int(batch["max_seq_len"]))
        elif batch["input_ids"].shape[0] == 1 and varlen.usable(unwrap_lm(model)):  # sdpa: varlen_sdpa_attention
            kw[varlen.LAYOUT_KEY] = varlen.varlen_layout(batch["sequence_length"])
    loc = batch_locations(model, batch)
    if loc is not None:
        kw["intervention_locations"] = loc
    return kw


def is_shared(batch: dict[str, Any]) -> bool:
    """True for a batch carrying the shared-prompt layout (`alignkit.data.collators.SharedPromptCollator`)."""
    return batch.get("shared_input_ids") is not None


def shared_attention_mask(segment_ids: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """(G, 1, S, S) attention mask of shared-prefix rows (`alignkit.data.collators.shared_prefix_layout`, segment
    ids -1 prefix, k >= 0 member k, -2 padding): causal, and a member's tokens see the prefix and their own tokens
    only; padding queries see the first token only (no empty softmax row; their outputs are never read).
    Boolean for sdpa, additive (0 / dtype min) for eager attention."""
    S = segment_ids.shape[1]
    q = torch.arange(S, device=segment_ids.device)[:, None]  # (S, 1)
    k = torch.arange(S, device=segment_ids.device)[None, :]  # (1, S)
    sq, sk = segment_ids[:, :, None], segment_ids[:, None, :]  # (G, S, 1), (G, 1, S)
    allowed = (k <= q) & ((sk == -1) | (sk == sq))  # (G, S, S)
    allowed = torch.where(sq == -2, k == 0, allowed)[:, None]  # (G, 1, S, S)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"share_prompt needs sdpa or eager attention (a custom 4D mask), the model uses {impl!r}: load "
                     "it with attn_implementation='sdpa', or train with share_prompt=False (padding_free=True suits "
                     "flash-attention)")


def shared_forward_kwargs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """Model inputs of a shared-prompt batch: its (B, S) rows, their positions and the 4D mask."""
    if getattr(unwrap_parallel(model), "span_locations", None) is not None:
        raise ValueError("share_prompt does not support ReFT models (their positions are placed in the padded rows); "
                         "train with share_prompt=False")
    lm = unwrap_lm(model)
    ids = batch["shared_input_ids"]
    mask = shared_attention_mask(batch["shared_segment_ids"].to(ids.device), attn_implementation(lm.config),
                                 lm.get_input_embeddings().weight.dtype)
    return {"input_ids": ids, "position_ids": batch["shared_position_ids"], "attention_mask": mask}


def shared_varlen_kwargs(batch: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """A shared-prompt batch's (G, S) rows packed into ONE row without their padding, with the varlen layout of
    its groups (`alignkit.models.varlen.shared_varlen_layout`: each member attends over the prompt and its own
    tokens): (model inputs, (B, T) index of each padded-layout token in the packed row)."""
    seg = batch["shared_segment_ids"]  # (G, S): -1 prefix, k member k, -2 padding
    G, S = seg.shape
    groups, lengths = [], []
    for row in seg.tolist():
        P = row.count(-1)
        members = [row.count(k) for k in range(max(row) + 1)] if max(row) >= 0 else [0]
        groups.append((P, members))
        lengths.append(P + sum(members))
    valid = seg != -2
    ids = batch["shared_input_ids"][valid][None]  # (1, N): each row's tokens, padding dropped
    pos = batch["shared_position_ids"][valid.to(batch["shared_position_ids"].device)][None]
    n = torch.tensor(lengths, device=batch["shared_index"].device)
    offsets = torch.cumsum(n, 0) - n  # (G,)
    idx = batch["shared_index"]  # (B, T) into the flattened (G * S) rows; padding points at a row's first token
    index = offsets[torch.div(idx, S, rounding_mode="floor")] + idx % S
    kw = {"input_ids": ids, "position_ids": pos, varlen.LAYOUT_KEY: varlen.shared_varlen_layout(groups)}
    return kw, index


# Above this share of padding in a batch's shared rows, they run packed through varlen attention; at or below it,
# as padded rows with their 4D mask: one sdpa call for the batch beats two per pair when there is little padding
# to remove (RM step, 20 batches of 8 pairs, 1 thread: length-grouped batches (~3 % padding) 40-44 ms padded vs
# 46-50 ms varlen; random batches 47-49 ms varlen vs 58-61 ms padded). Same values either way up to rounding.
SHARED_VARLEN_MIN_PADDING = 0.1


def shared_padding(batch: dict[str, Any]) -> float:
    """The share of padding slots in a shared-prompt batch's (G, S) rows."""
    return float((batch["shared_segment_ids"] == -2).float().mean())


def shared_states(model: nn.Module, batch: dict[str, Any], extra: dict[str, Any], what: str,
                  read: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
    """((B, T, d) final hidden states of a shared-prompt batch in its padded layout, the model's output): the
    shared rows packed in one row through varlen attention (`shared_varlen_kwargs`) where the model runs it
    (`alignkit.models.varlen.runs_varlen`) and the rows hold more than SHARED_VARLEN_MIN_PADDING padding, else the
    (G, S) rows with their 4D mask. `read`: (rows, cols) of the padded layout the caller reads (`backbone_output`)."""
    if getattr(unwrap_parallel(model), "span_locations", None) is None and varlen.runs_varlen(unwrap_lm(model)) \
            and shared_padding(batch) > SHARED_VARLEN_MIN_PADDING:
        kw, index = shared_varlen_kwargs(batch)
        flat = None if read is None else index.to(read[0].device)[read]
        h, out = backbone_output(model, {**kw, **extra}, what, flat)
        return h.reshape(-1, h.shape[-1])[index], out
    flat = None if read is None else batch["shared_index"].to(read[0].device)[read]
    h, out = backbone_output(model, {**shared_forward_kwargs(model, batch), **extra}, what, flat)
    return unshare(h, batch), out


def call_model(model: nn.Module, kwargs: dict[str, Any]) -> Any:
    """`model(**kwargs)`; a packed row with a varlen layout (`forward_kwargs` on sdpa) runs with
    `alignkit.models.varlen.varlen_attention`, so its linear layers see the real tokens only."""
    if varlen.LAYOUT_KEY not in kwargs:
        return model(**kwargs)
    with varlen.varlen_attention(unwrap_lm(model)):
        return model(**kwargs)


def backbone_output(model: nn.Module, kwargs: dict[str, Any], what: str = "completion_logps",
                    read: Tensor | None = None) -> tuple[Tensor, Any]:
    """(final hidden states of the backbone (after its final norm), the model's output) of `model(**kwargs)`,
    captured by a temporary forward hook on the backbone. `read`: the flat (B * T) positions of the model's input
    the caller reads from the states; where the model allows it, the last decoder layer runs on their columns only
    and the states are ZERO elsewhere (`alignkit.models.last_layer`)."""
    lm = unwrap_lm(model)
    backbone = lm.base_model
    if backbone is lm:
        raise ValueError(f"{type(lm).__name__} has no separate backbone (base_model); {what} needs a "
                         "transformers *ForCausalLM / *ForSequenceClassification model")
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output if isinstance(output, Tensor) else output[0])

    handle = backbone.register_forward_hook(hook)
    try:
        with last_layer.reading(model, lm, read, kwargs):
            out = call_model(model, kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one backbone call per forward, saw {len(captured)}")
    return captured[0], out


def final_hidden_states(model: nn.Module, batch: dict[str, Any], read: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(B, T, d) output of the backbone (after its final norm), via the model's own forward. A shared-prompt
    batch (`is_shared`) runs its (G, S) shared rows and returns their states in the padded (B, T) layout.
    `read`: the (rows, cols) the caller reads; the states may be zero everywhere else (`backbone_output`)."""
    # an empty (0,) index: the model's own head projects no position (B, 0, V); ours runs on completions only
    none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    extra = {"logits_to_keep": none, "use_cache": False}
    if is_shared(batch):
        h, out = shared_states(model, batch, extra, "share_prompt", read)
    else:
        flat = None if read is None else read[0] * batch["input_ids"].shape[1] + read[1]
        h, out = backbone_output(model, {**forward_kwargs(model, batch), **extra}, read=flat)
    check_logits_skipped(getattr(out, "logits", None), type(unwrap_lm(model)).__name__)
    return h


def unshare(h: Tensor, batch: dict[str, Any]) -> Tensor:
    """(G, S, d) states of shared-prefix rows -> (B, T, d) in the padded layout (`shared_index`); the gather's
    backward adds both sequences' gradients into their common prefix."""
    idx = batch["shared_index"].to(h.device)  # (B, T)
    return h.reshape(-1, h.shape[-1])[idx]  # (B, T, d)


def _head(lm: nn.Module) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    head = lm.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(lm).__name__} has no output embedding (LM head) with a weight")
    if hasattr(head, "base_layer"):
        raise ValueError("the LM head is wrapped by a LoRA layer; completion_logps applies the head's weight "
                         "directly, so leave lm_head out of LoRA target_modules (peft's 'all-linear' does)")
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    extra = {"logit_scale": float(getattr(cfg, "logit_scale", None) or 1.0),
             "softcap": getattr(cfg, "final_logit_softcapping", None)}
    return head.weight, getattr(head, "bias", None), extra


def completion_token_logps(model: nn.Module, batch: dict[str, Any], chunk_size: int = 1024,
                           stats: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(token_logps (B, T-1), mask (B, T-1) bool): log p of each completion token given its prefix, 0 elsewhere.

    `batch` needs input_ids and completion_mask (B, T); attention_mask, position_ids optional. A packed batch
    (R sequences in one row) gives (R, L_max - 1), as the same sequences right-padded would. A `stats` dict
    is filled with `correct` (N,) bool (the token is the logits' argmax) and `mean_logit` (N,) (the logits'
    mean over the vocabulary) and `row` (N,) (the row of each scored token), no gradient.
    """
    ids = batch["input_ids"]  # (B, T)
    mask = batch["completion_mask"][:, 1:].bool()  # (B, T-1): the NEXT token is scored
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    targets = ids[:, 1:][rows, cols]  # (N,)
    if is_zero3_partitioned(unwrap_lm(model)):
        logp = _zero3_logps(model, batch, mask, rows, cols, targets, stats)
    else:
        logp = _chunked_logps(model, batch, rows, cols, targets, chunk_size, stats)
    if is_packed(batch):
        return _unpack(batch, rows, cols, logp)
    token = logp.new_zeros(mask.shape).index_put((rows, cols), logp)  # (B, T-1)
    return token, mask


def head_logprobs(model: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int = 1024, *,
                  temperature: float = 1.0, entropy: bool = False, with_accuracy: bool = False) -> Any:
    """log p(targets) `(N,)` from final hidden states `hidden` `(N, d)` (positions whose NEXT token is scored,
    from `final_hidden_states`) through the (wrapped) model's own LM head, chunked: its weight, bias, logit
    scale and soft-capping, logits divided by `temperature`. With `entropy` (differentiable) or
    `with_accuracy` (no gradient) the `alignkit.losses.TokenLogprobs` of `chunked_lm_logprobs` is returned
    instead of the log-probs."""
    weight, bias, extra = _head(unwrap_lm(model))
    return chunked_lm_logprobs(hidden, weight, bias, targets, chunk_size, temperature=temperature,
                               return_stats=entropy, with_accuracy=with_accuracy, **extra)


def _chunked_logps(model: nn.Module, batch: dict[str, Any], rows: Tensor, cols: Tensor, targets: Tensor,
                   chunk_size: int, stats: dict[str, Tensor] | None) -> Tensor:
    h = final_hidden_states(model, batch, (rows, cols))  # (B, T, d), zero where not read
    if stats is None:
        return head_logprobs(model, h[rows, cols], targets, chunk_size)  # (N,) float32
    out = head_logprobs(model, h[rows, cols], targets, chunk_size, with_accuracy=True)
    stats.update(correct=out.correct, mean_logit=out.mean_logit,
                 row=batch["sequence_index"][rows, cols + 1] if is_packed(batch) else rows)
    return out.logps  # (N,) float32


def _zero3_logps(model: nn.Module, batch: dict[str, Any], mask: Tensor, rows: Tensor, cols: Tensor,
                 targets: Tensor, stats: dict[str, Tensor] | None) -> Tensor:
    """Under DeepSpeed ZeRO-3 the LM head's weight is a partition outside the head's own forward, so the
    head cannot be applied after the model's forward (the chunked path). Instead the model's own head runs
    on the K columns that hold a scored position in any row (`logits_to_keep` as an index tensor):
    (B, K, V) logits, more memory than the chunked head, same values (the model's own logit scaling and
    soft-capping included); DeepSpeed gathers the head and routes its gradient as for any module."""
    keep = mask.any(0).nonzero(as_tuple=True)[0]  # (K,) columns t whose next token is scored
    out = call_model(model, {**forward_kwargs(model, batch), "logits_to_keep": keep, "use_cache": False})
    logits = out.logits[rows, torch.searchsorted(keep, cols)].float()  # (N, V)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    if stats is not None:
        with torch.no_grad():
            stats.update(correct=logits.argmax(-1) == targets, mean_logit=logits.mean(-1),
                         row=batch["sequence_index"][rows, cols + 1] if is_packed(batch) else rows)
    return logp


def _unpack(batch: dict[str, Any], rows: Tensor, cols: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    """Packed log-probs -> the right-padded layout (R, L_max - 1): the token at (row, c + 1) is token
    position_ids[row, c + 1] of sequence sequence_index[row, c + 1], scored at column position - 1."""
    R = batch["sequence_length"].shape[0]
    seq = batch["sequence_index"][rows, cols + 1]  # (N,)
    col = batch["position_ids"][rows, cols + 1] - 1  # (N,)
    shape = (R, int(batch["max_seq_len"]) - 1)
    token = logp.new_zeros(shape).index_put((seq, col), logp)  # (R, L_max-1)
    mask = torch.zeros(shape, dtype=torch.bool, device=logp.device).index_put(
        (seq, col), torch.ones_like(seq, dtype=torch.bool))  # (R, L_max-1)
    return token, mask


def completion_logps(model: nn.Module, batch: dict[str, Any], chunk_size: int = 1024,
                     stats: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(per-sequence sum of completion log-probs (B,), completion token counts (B,)); `stats` as in
    `completion_token_logps`."""
    token, mask = completion_token_logps(model, batch, chunk_size, stats)
    return token.sum(-1), mask.sum(-1)


__all__ = ["backbone_output", "batch_locations", "call_model", "completion_logps", "completion_token_logps",
           "final_hidden_states", "forward_kwargs", "head_logprobs", "is_packed", "is_shared", "packed_prompt_spans",
           "prompt_locations", "prompt_spans", "shared_attention_mask", "shared_forward_kwargs", "shared_padding",
           "shared_states", "shared_varlen_kwargs", "unshare"]
