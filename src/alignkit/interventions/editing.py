"""Gather -> intervene -> scatter: what one hook does to one module's hidden states (ReFT, Wu, Arora et al. 2024).

A forward or `generate` call of `ReftModel` creates one `Run` (the locations and which interventions are on); every
forward of the base model inside it (the prefill, then each decode step) gets a `Step`, the run plus the step's absolute
offset. The offset comes from counting the tokens the base model has processed in the run (`locate_step`), cross-checked
against the KV cache and the attention mask where the call carries them, so it does not depend on the keyword under
which transformers passes the cache; a step that cannot be placed raises `ReftPositionError` rather than being edited at
a guess. For a hidden state `h: (B, T, d)` of that step, `edit_positions` picks the selected (row, position) pairs `h[b,
loc[b, p] - offset]`, applies the intervention `Φ: (N, d) -> (N, d)` to them and writes them back out of place; every
other value is a bitwise copy of `h`.

Fast path: `Run.last_location` is the largest location of the run, computed once per call. A step whose
window `[offset, offset + T)` starts after it (every decode step when only the prompt is edited) returns
`h` itself: no tensor op, no device sync, no call of the intervention. Not under torch.compile (`train.compile`
compiles the layers, and the hooks with them): dynamo would guard on the Python int `last_location`, which changes
with every batch, and recompile the hook per batch until its recompile limit; traced, the step takes the general
path, whose result is the same (no location inside the window selects nothing: a bitwise copy of `h`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alignkit.interventions.base import Intervention


@dataclass
class Slot:
    """One attached intervention: its global index in `intervention_locations` and where it sits."""

    adapter: str
    index: int  # within its adapter
    pos: int  # global index (dim 1 of intervention_locations)
    layer: int
    component: str
    path: str  # module path inside the transformers model
    hook_input: bool  # edit the module's input (pre-hook) rather than its output
    intervention: Intervention


@dataclass(frozen=True)
class Run:
    """The state of one `ReftModel.forward` / `generate` call."""

    locations: torch.Tensor | None  # (B, I, P) long, on the model's device; None = no edits
    active: frozenset  # global slot indices that are switched on
    generated_from: int | None = None  # also edit every position >= this (generation)
    row_active: torch.Tensor | None = None  # (B, I) bool: rows routed to each intervention
    last_location: int | None = None  # max of `locations` (-1: none); None = unknown, never skip


@dataclass(frozen=True)
class Step:
    run: Run
    offset: int  # absolute position of the first token of this forward (KV-cache length)


def largest_location(locations: torch.Tensor) -> int:
    """max(locations), -1 for an empty tensor. One device sync if `locations` lives on an accelerator,
    so call it once per run, on the CPU copy when there is one."""
    return int(locations.max()) if locations.numel() else -1


class ReftPositionError(RuntimeError):
    """A forward inside a ReFT call whose absolute positions cannot be established with certainty.
    ReFT then edits nothing and raises: an edit at a guessed position would silently change results."""


# The keywords under which transformers has passed the KV cache to a model's forward: `past_key_values`
# (up to 5.23) and `cache` (5.24 on). Any other keyword holding an object with `get_seq_length` is found
# too, so a rename is still cross-checked; the token count below never depends on these names.
CACHE_KEYWORDS = ("past_key_values", "cache")


def find_cache(kwargs: dict) -> tuple[str | None, Any]:
    """(keyword, cache) of the KV cache among a forward's keyword arguments, or (None, None)."""
    for key in CACHE_KEYWORDS:
        value = kwargs.get(key)
        if value is not None:
            return key, value
    for key, value in kwargs.items():
        if value is not None and hasattr(value, "get_seq_length"):
            return key, value
    return None, None


def cache_length(past: Any) -> int:
    """Tokens held by a KV cache (a transformers `Cache`, or legacy per-layer (key, value) tuples)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:  # legacy tuples
        return int(past[0][0].shape[-2])
    return 0


def locate_step(counted: int, length: int, kwargs: dict) -> int:
    """The absolute offset of one forward of the base model inside a ReFT call.

    `counted` is how many tokens the base model has processed so far in this call (prefill, then one
    step at a time); `length` is this forward's input length. That count decides; the KV cache (under
    any keyword), a 2-D attention mask or 2-D position ids are cross-checks where present:
    - a cache must hold exactly `counted` tokens (a cache that was cropped or rolled back, as in
      assisted decoding, cannot be followed: error). Reading its length costs no device sync;
    - without a cache, the mask covers the earlier tokens plus this input (`mask_len - length ==
      counted`), or this input alone (`== 0`: the whole sequence is run again, e.g. `use_cache=False`);
      without a mask, the position ids say the same (their largest last entry is `offset + length - 1`
      in any row without left padding, and a batch always has one);
    - with none of them, a one-token input after earlier tokens is the next decode step; anything else
      is ambiguous (error).
    """
    name, cache = find_cache(kwargs)
    if cache is not None:
        held = cache_length(cache)
        if held == counted:
            return counted
        raise ReftPositionError(
            f"ReFT cannot locate this forward's positions: {counted} tokens were processed in this call but the "
            f"KV cache passed as `{name}` holds {held}. ReFT edits nothing it cannot place; generate without a "
            f"cache that is cropped or rolled back (assisted/speculative decoding), or call forward with explicit "
            f"intervention_locations per step")
    if counted == 0:  # the first forward of the call, no cache: nothing before it (packed rows' position ids
        return 0      # restart per sequence, so they are no evidence here)
    before, source = None, None
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        before, source = int(mask.shape[1]) - length, f"the attention mask covers {int(mask.shape[1])}"
    elif isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.numel():
        last = int(pos[:, -1].max())  # one device sync, only on this cache-less path
        before, source = last + 1 - length, f"the position ids end at {last}"
    if before is not None:
        if before == counted:
            return counted
        if before == 0:
            return 0
        raise ReftPositionError(
            f"ReFT cannot locate this forward's positions: {counted} tokens were processed in this call, the input "
            f"has {length} and {source}, which fits neither a cached step nor a full recompute; ReFT edits "
            f"nothing it cannot place")
    if length == 1:
        return counted
    raise ReftPositionError(
        f"ReFT cannot locate this forward's positions: {length} new tokens after {counted} processed, with no KV "
        f"cache, attention mask or position ids to tell a cached step from a recompute; pass attention_mask")
def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def edit_positions(h: torch.Tensor, slot: Slot, step: Step) -> torch.Tensor:
    """Apply `slot.intervention` at the positions selected for it; everything else is copied bitwise."""
    run = step.run
    if run.locations is None or slot.pos not in run.active:
        return h
    if not torch.compiler.is_compiling() and run.generated_from is None and run.last_location is not None \
            and step.offset > run.last_location:  # (traced, this int comparison is a guard on each batch's largest
        return h  # location: a recompile per batch up to dynamo's limit) nothing inside [offset, offset + T)
    if h.dim() != 3:
        raise ValueError(f"intervention at {slot.path!r} expects hidden states (batch, seq, dim), got {tuple(h.shape)}")
    B, T, d = h.shape  # (B, T, d)
    loc = run.locations[:, slot.pos, :]  # (B0, P)
    row_active = run.row_active[:, slot.pos] if run.row_active is not None else None
    if loc.shape[0] != B:  # generate expanded rows (beams / num_return_sequences)
        if B % loc.shape[0]:
            raise ValueError(f"batch of {B} rows at {slot.path!r} but intervention_locations has {loc.shape[0]}")
        loc = loc.repeat_interleave(B // loc.shape[0], dim=0)
        row_active = None if row_active is None else row_active.repeat_interleave(B // row_active.shape[0], 0)
    rel = loc - step.offset  # (B, P) positions inside this forward
    valid = (loc >= 0) & (rel >= 0) & (rel < T)
    if run.generated_from is not None and step.offset + T > run.generated_from:
        t = torch.arange(T, device=h.device)  # (T,)
        new_tok = (step.offset + t >= run.generated_from)[None, :] & row_active[:, None]  # (B, T)
        rel = torch.cat([rel, t.expand(B, T)], dim=1)
        valid = torch.cat([valid, new_tok], dim=1)
    rows = torch.arange(B, device=h.device)[:, None]  # (B, 1)
    flat = rows * T + rel  # (B, P') index into (B*T)
    h2 = h.reshape(B * T, d)
    picked = h2[torch.where(valid, flat, 0).reshape(-1)]  # (N, d), N = B*P'
    edited = slot.intervention(picked).to(h.dtype)  # (N, d)
    dummy = torch.where(valid, flat, B * T).reshape(-1)  # unselected pairs land on a dummy row
    buf = torch.cat([h2, h2.new_zeros(1, d)], dim=0)  # (B*T + 1, d): the one copy of h
    buf.index_put_((dummy,), edited)  # in place on the fresh copy (cat's backward does not need it)
    return buf[: B * T].view(B, T, d)
