"""Completion log-probabilities of a (wrapped) causal LM without full `(B, T, V)` logits.

One function serves SFT, the DPO family, KTO and the online trainers:

    token = completion_token_logps(model, batch)     # (B, T-1) log p(x_{t+1} | x_{<=t}), 0 off completion
    sums, counts = completion_logps(model, batch)    # (B,) per-sequence sums, (B,) completion token counts

How. The model is called through its top-level forward (so DDP, peft and ReFT wrappers all run as
usual; ReFT gets `intervention_locations`) with `logits_to_keep=1`, so the LM head only runs on the
last position (B, 1, V). A temporary forward hook on the backbone (`lm.base_model`, which ends with
the final norm) captures the final hidden states h (B, T, d). Completion positions are picked with
index tensors (row, col) where the NEXT token is a completion token, and the LM head is applied only
there, in chunks, by `alignkit.losses.chunked_lm_logprobs` (recomputed in backward):

    targets  = input_ids[:, 1:]                        (B, T-1)
    mask     = completion_mask[:, 1:] & attention      (B, T-1)
    rows, cols = mask.nonzero()                        (N,), (N,)
    logp     = chunked_lm_logprobs(h[rows, cols], W_head, b_head, targets[rows, cols])   (N,)

ReFT locations come from the batch (`intervention_locations`) or, if absent, from the prompt span of
each row (first attended token up to the first completion token) and the position spec recorded on
the model by `apply_adapter`, so the same prompt positions are edited for a pair's chosen and
rejected rows.

Padding-free (packed) batches (`alignkit.data.PackedSFTCollator` / `PackedPreferenceCollator`: one row
(1, S) of R concatenated sequences, `position_ids` restarting at 0 per sequence, `cu_seq_lens` (R+1,),
no attention_mask) go through the same code. The model sees no attention mask, so transformers derives
the sequence boundaries from `position_ids` (`masking_utils.find_packed_sequence_indices`: a new sequence
wherever the position does not grow by one; only without a KV cache, hence use_cache=False) and builds a
block-diagonal causal mask for sdpa / eager; flash-attention models also get `cu_seq_lens_q/k`, `max_length_q/k` (varlen kernels, no recount). The
scored token log-probs are then scattered back to the padded layout (R, L_max - 1) of right padding,
(sequence_index, position - 1), so every loss, metric and reduction sees exactly what a padded batch
gives. ReFT locations are computed per sequence and shifted by its start in the row: (1, I, R * P).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignkit.losses import chunked_lm_logprobs
from alignkit.models.adapters import adapter_kind, reft_settings, unwrap_lm, unwrap_parallel


def prompt_spans(attention_mask: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(start, length) `(B,)` of each row's prompt: from its first attended token to its first completion
    token (or to its last attended token when the row has no completion). Left or right padding."""
    att = attention_mask.long()
    comp = completion_mask.long() * att
    start = att.argmax(dim=1)  # (B,) first real token
    end_all = start + att.sum(dim=1)  # (B,) one past the last real token
    first_comp = torch.where(comp.any(dim=1), comp.argmax(dim=1), end_all)  # (B,)
    return start, first_comp - start


def is_packed(batch: dict[str, Any]) -> bool:
    """True for a padding-free batch (one row of concatenated sequences with `cu_seq_lens`)."""
    return batch.get("cu_seq_lens") is not None


def packed_prompt_spans(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(start, length) `(R,)` of each packed sequence's prompt in the flat row: from the sequence's first token
    to its first completion token (or its end when it has none)."""
    cu = batch["cu_seq_lens"].to(batch["input_ids"].device).long()  # (R+1,)
    start, end = cu[:-1], cu[1:]  # (R,)
    comp = batch["completion_mask"][0].bool()  # (S,)
    pos = torch.arange(comp.shape[0], device=comp.device)  # (S,)
    cand = torch.where(comp, pos, comp.shape[0])  # (S,) completion positions, else S
    seq = batch["sequence_index"][0].to(comp.device)  # (S,)
    first = end.clone().scatter_reduce(0, seq, cand, reduce="amin", include_self=True)  # (R,)
    return start, first - start


def batch_locations(model: nn.Module, batch: dict[str, Any]) -> Tensor | None:
    """`intervention_locations (B, I, P)` for a ReFT model (from the batch, else from prompt spans); None otherwise.
    For a packed batch: `(1, I, R * P)`, each sequence's positions shifted by its start in the row."""
    if "reft" not in adapter_kind(model):
        return None
    if batch.get("intervention_locations") is not None:
        return batch["intervention_locations"]
    settings = reft_settings(model)
    if settings is None:
        raise ValueError("a ReFT model needs `intervention_locations` in the batch, or a position spec: build it "
                         "with alignkit.models.adapters.apply_adapter (AdapterConfig.reft.positions, e.g. 'f1+l1')")
    from alignkit.data.positions import locations_from_spans

    k = unwrap_parallel(model).num_interventions  # through DDP / FSDP wrappers
    if is_packed(batch):
        start, length = packed_prompt_spans(batch)
        loc = locations_from_spans(settings.positions, start, length, k, settings.share_weights)  # (R, I, P)
        R, I, P = loc.shape
        return loc.permute(1, 0, 2).reshape(1, I, R * P)  # (1, I, R*P), absolute in the flat row
    att = batch.get("attention_mask")
    if att is None:
        att = torch.ones_like(batch["input_ids"])
    start, length = prompt_spans(att, batch["completion_mask"])
    return locations_from_spans(settings.positions, start, length, k, settings.share_weights)


def prompt_locations(model: nn.Module, attention_mask: Tensor) -> Tensor | None:
    """Locations for prompt-only rows (generation, classification): the whole attended span is the prompt."""
    if "reft" not in adapter_kind(model):
        return None
    from alignkit.data.positions import locations_from_mask

    settings = reft_settings(model)
    if settings is None:
        raise ValueError("ReFT model without a position spec: build it with apply_adapter")
    k = unwrap_parallel(model).num_interventions
    return locations_from_mask(settings.positions, attention_mask, k, settings.share_weights)


def forward_kwargs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """Model inputs (input_ids, attention_mask, position_ids, ReFT locations) of `batch`."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"]}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            kw[key] = batch[key]
    if is_packed(batch):
        if batch.get("attention_mask") is not None or batch.get("position_ids") is None:
            raise ValueError("a packed batch (cu_seq_lens) needs position_ids restarting at 0 per sequence and no "
                             "attention_mask (transformers reads the boundaries from position_ids only then); "
                             "build it with PackedSFTCollator / PackedPreferenceCollator")
        impl = str(getattr(unwrap_lm(model).config, "_attn_implementation", "") or "")
        if "flash" in impl:  # varlen kernels: hand over the boundaries instead of re-deriving them
            cu = batch["cu_seq_lens"].to(batch["input_ids"].device, torch.int32)
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch["max_seq_len"]),
                      max_length_k=int(batch["max_seq_len"]))
    loc = batch_locations(model, batch)
    if loc is not None:
        kw["intervention_locations"] = loc
    return kw


def final_hidden_states(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """(B, T, d) output of the backbone (after its final norm), via the model's own forward."""
    lm = unwrap_lm(model)
    backbone = lm.base_model
    if backbone is lm:
        raise ValueError(f"{type(lm).__name__} has no separate backbone (base_model); completion_logps needs a "
                         "transformers *ForCausalLM model")
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output if isinstance(output, Tensor) else output[0])

    handle = backbone.register_forward_hook(hook)
    try:
        model(**forward_kwargs(model, batch), logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one backbone call per forward, saw {len(captured)}")
    return captured[0]


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


def completion_token_logps(model: nn.Module, batch: dict[str, Any], chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(token_logps (B, T-1), mask (B, T-1) bool): log p of each completion token given its prefix, 0 elsewhere.

    `batch` needs input_ids and completion_mask (B, T); attention_mask, position_ids optional. A packed batch
    (R sequences in one row) gives (R, L_max - 1), as the same sequences right-padded would.
    """
    ids = batch["input_ids"]  # (B, T)
    mask = batch["completion_mask"][:, 1:].bool()  # (B, T-1): the NEXT token is scored
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    h = final_hidden_states(model, batch)  # (B, T, d)
    rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
    weight, bias, extra = _head(unwrap_lm(model))
    targets = ids[:, 1:][rows, cols]  # (N,)
    logp = chunked_lm_logprobs(h[rows, cols], weight, bias, targets, chunk_size, **extra)  # (N,) float32
    if is_packed(batch):
        return _unpack(batch, rows, cols, logp)
    token = logp.new_zeros(mask.shape).index_put((rows, cols), logp)  # (B, T-1)
    return token, mask


def _unpack(batch: dict[str, Any], rows: Tensor, cols: Tensor, logp: Tensor) -> tuple[Tensor, Tensor]:
    """Packed flat log-probs -> the right-padded layout (R, L_max - 1): the token at flat column c + 1 is
    token position_ids[c + 1] of sequence sequence_index[c + 1], scored at column position - 1."""
    R = batch["cu_seq_lens"].shape[0] - 1
    seq = batch["sequence_index"][0, cols + 1]  # (N,)
    col = batch["position_ids"][0, cols + 1] - 1  # (N,)
    shape = (R, int(batch["max_seq_len"]) - 1)
    token = logp.new_zeros(shape).index_put((seq, col), logp)  # (R, L_max-1)
    mask = torch.zeros(shape, dtype=torch.bool, device=logp.device).index_put((seq, col), torch.ones_like(seq, dtype=torch.bool))
    return token, mask


def completion_logps(model: nn.Module, batch: dict[str, Any], chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(per-sequence sum of completion log-probs (B,), completion token counts (B,))."""
    token, mask = completion_token_logps(model, batch, chunk_size)
    return token.sum(-1), mask.sum(-1)


__all__ = ["batch_locations", "completion_logps", "completion_token_logps", "final_hidden_states", "forward_kwargs",
           "is_packed", "packed_prompt_spans", "prompt_locations", "prompt_spans"]
