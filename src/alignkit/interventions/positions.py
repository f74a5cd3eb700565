"""Position selection for ReFT: which prompt tokens each intervention acts on.

A position spec is pyreft's short form, "f<n>", "l<n>" or "f<n>+l<n>" (first n / last n tokens of the
prompt), or the equivalent `Positions(first_n=..., last_n=...)`. From the prompt's span inside a padded
batch (its first absolute index `start` and its length `length`, both in token space) we build the
`intervention_locations` tensor that `ReftModel.forward` takes:

    locations: LongTensor (B, K, P)   B rows, K interventions, P position slots; -1 = no position

Layout of the P slots (indices are absolute into the padded tensor, so left and right padding both work):

- `share_weights=True` (every intervention sees every selected position): P = f + l. Slots [0, f) hold
  the first f prompt positions start+0 .. start+f-1; slots [f, f+l) hold the last l positions
  start+L-l .. start+L-1. Every one of the K rows is identical.
- `share_weights=False` (pyreft's split): requires f > 0 and l > 0 and an even K. Interventions
  [0, K/2) get the first f positions, interventions [K/2, K) the last l positions; P = max(f, l),
  slots beyond a group's count are -1.
- only one of f / l given: every intervention gets that group (share_weights does not matter).

A prompt shorter than the spec (L < f, L < l or L < f + l) never yields an out-of-range index: a first
slot past the prompt end is -1, a last slot before the prompt start is -1 (slot i of the last group always
means position L - l + i, so the trailing slots stay filled), and with `share_weights=True` a last slot
already covered by a first slot is -1 (de-duplicated: no position is edited twice by one intervention).
An empty prompt (L = 0) gives all -1.

This differs from pyreft on such prompts (pyreft 0.1.0 `get_intervention_locations`): pyreft takes min(L // 2, n)
positions of each group, so for L = 5 and "f3+l3" it edits [0, 1] and [3, 4] (alignkit: all five), with
share_weights=False the halves get [0, 1] / [3, 4] (alignkit: [0, 1, 2] / [2, 3, 4]), and for L = 1 it edits no
prompt token (its unused slots point at a pad token it prepends). From L >= 2·max(f, l) on both agree.

Such a prompt is edited at fewer positions than the spec names (the same rule in training, evaluation, generation
and serving, so the model meets at inference what it was trained on), which is rarely what a user meant:
`locations_from_spans` logs one warning per spec and process the first time it meets one (how many rows, the
shortest length; the serving engine counts and logs each such request instead: `serve/engine.py`), and
`check_prompt_lengths` says it once for a whole training set before training starts, stopping on an empty prompt
(no position to edit at all: the row would train nothing of the intervention).

All of it is vectorised torch ops over the batch; nothing is built as Python lists per row.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from alignkit.settings.typed import ConfigError
from alignkit.interventions.config import Positions

logger = logging.getLogger(__name__)
_WARNED: set[tuple[str, bool]] = set()  # (spec, share_weights) already warned about in this process


def needed_length(spec: "str | Positions", share_weights: bool = True) -> int:
    """The fewest prompt tokens at which every slot of `spec` is a distinct position of its group: f + l when one
    intervention sees both groups (share_weights, or only one group), else max(f, l)."""
    pos = Positions.parse(spec)
    if pos.first_n and pos.last_n and not share_weights:
        return max(pos.first_n, pos.last_n)
    return pos.first_n + pos.last_n


def _short_text(spec: Positions, share_weights: bool, short: int, total: int, shortest: int) -> str:
    need = needed_length(spec, share_weights)
    return (f"ReFT positions {str(spec)!r} need prompts of at least {need} tokens; {short} of {total} prompts are "
            f"shorter (shortest: {shortest} tokens), so they are edited at fewer positions than {str(spec)!r} names; "
            f"choose a shorter spec (adapter.reft.positions, e.g. 'l1') if prompts are "
            f"this short")


def check_prompt_lengths(spec: "str | Positions", share_weights: bool, lengths: Sequence[int],
                         ids: Sequence[object] | None = None, where: str = "data.path") -> None:
    """Before training: warn once if some prompts are shorter than `spec` needs; ConfigError naming the first
    record if a prompt is empty (no position to edit: the row would train nothing of the intervention)."""
    pos = Positions.parse(spec)
    lengths = [int(n) for n in lengths]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        first = ids[empty[0]] if ids is not None else empty[0]
        raise ConfigError(f"{where}: record {first} has an empty prompt ({len(empty)} of {len(lengths)} records do), "
                          f"and ReFT edits prompt positions ({str(pos)!r}): there is nothing to edit in it; give "
                          f"every record a prompt, or train this data with adapter.kind=lora or full")
    need = needed_length(pos, share_weights)
    short = [n for n in lengths if n < need]
    if short:
        _WARNED.add((str(pos), bool(share_weights)))  # the per-batch warning would repeat this one
        logger.warning("%s: %s", where, _short_text(pos, share_weights, len(short), len(lengths), min(short)))


def check_truncated_prompts(spec: "str | Positions", truncated: int, total: int, ids: Sequence[object],
                            limit: int | None, where: str = "data.path") -> None:
    """Before training: one warning when `truncated` of `total` records had their prompt cut to its LAST `limit`
    tokens (data.max_prompt_length, `alignkit.data.tokenize`) and `spec` edits first positions. Positions are
    counted on the tokens kept (as pyreft counts them on its truncated prompt), so their "first" tokens are
    tokens from the middle of the prompt, while generation and serving of the whole prompt edit its real first
    tokens. Last positions are unaffected (the end of a prompt is always kept), so `l<n>` specs are not warned."""
    pos = Positions.parse(spec)
    if not truncated or not pos.first_n:
        return
    logger.warning("%s: %d of %d record(s) have a prompt longer than data.max_prompt_length=%s that keeps only its "
                   "last %s tokens (e.g. %s), so ReFT positions %r edit their first KEPT tokens, from the middle of "
                   "the prompt, not its first ones (generation and serving of the whole prompt edit its real first "
                   "tokens); raise data.max_prompt_length (or set it to null) to keep whole prompts, or use last "
                   "positions only (adapter.reft.positions, e.g. 'l%d')", where, truncated, total, limit, limit,
                   ", ".join(str(i) for i in ids) or "?", str(pos), max(pos.last_n, 1))


def _warn_short(pos: Positions, share_weights: bool, length: torch.Tensor) -> None:
    key = (str(pos), bool(share_weights))
    if key in _WARNED or length.numel() == 0:
        return
    short = length < needed_length(pos, share_weights)
    if bool(short.any()):
        _WARNED.add(key)
        logger.warning(_short_text(pos, share_weights, int(short.sum()), int(length.numel()), int(length.min())))


def _first_slots(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) start, (B,) length -> (B, n): start + i where i < length, else -1."""
    i = torch.arange(n, device=start.device)  # (n,)
    pos = start[:, None] + i[None, :]  # (B, n)
    return torch.where(i[None, :] < length[:, None], pos, -1)


def _last_slots(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) start, (B,) length -> (B, n): slot i is start + length - n + i where that is >= start, else -1."""
    rel = length[:, None] - n + torch.arange(n, device=start.device)[None, :]  # (B, n) index within prompt
    return torch.where(rel >= 0, start[:, None] + rel, -1)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=-1)


def locations_from_spans(spec: "str | Positions", start: torch.Tensor, length: torch.Tensor,
                         num_interventions: int, share_weights: bool = True, warn: bool = True) -> torch.Tensor:
    """Intervention locations for prompts spanning [start, start + length) of each padded row.

    start, length: (B,) integer tensors (token space, absolute in the padded tensor).
    Returns LongTensor (B, num_interventions, P), -1 = none; layout in the module docstring. `warn`: the warning of a
    prompt shorter than the spec (once per spec and process); False where the caller says it itself (the serving
    engine, for each request: `Engine.note_short_prompts`).
    """
    pos = Positions.parse(spec)
    if num_interventions < 1:
        raise ValueError(f"num_interventions must be >= 1, got {num_interventions}")
    start = torch.as_tensor(start, dtype=torch.long)
    length = torch.as_tensor(length, dtype=torch.long).to(start.device)
    if start.dim() != 1 or start.shape != length.shape:
        raise ValueError(f"start and length must both be (B,); got {tuple(start.shape)} and {tuple(length.shape)}")
    if bool((length < 0).any()) or bool((start < 0).any()):
        raise ValueError("start and length must be >= 0")
    if warn:
        _warn_short(pos, share_weights, length)
    f, l, k = pos.first_n, pos.last_n, num_interventions
    first = _first_slots(start, length, f)  # (B, f)
    last = _last_slots(start, length, l)  # (B, l)
    if f and l and not share_weights:
        if k % 2:
            raise ValueError(f"share_weights=False with positions {pos} splits the interventions in two halves "
                             f"(first half on the first tokens, second on the last), so it needs an even number "
                             f"of interventions; got {k}")
        width = max(f, l)
        per_group = torch.stack([_pad_to(first, width), _pad_to(last, width)], dim=1)  # (B, 2, P)
        return per_group.repeat_interleave(k // 2, dim=1).contiguous()  # (B, K, P)
    # de-duplicate: a last slot is already covered by a first slot when its index within the prompt < f
    if f and l:
        rel_last = last - start[:, None]  # (B, l)
        last = torch.where((last >= 0) & (rel_last < f), -1, last)
    slots = torch.cat([first, last], dim=1)  # (B, f + l)
    return slots[:, None, :].expand(-1, k, -1).contiguous()  # (B, K, P)


def check_one_span(attention_mask: torch.Tensor) -> None:
    """Refuse (ValueError, one line naming the row and the hole) a (B, T) attention mask whose row is not one
    contiguous span of 1s (a 0 between attended tokens): positions counted from a row's first attended token
    (ReFT positions, the prompt / completion split) would be placed off its tokens. A GPU sync on accelerators."""
    mask = attention_mask.to(torch.long)
    starts = (torch.diff(mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1)) > 0).sum(dim=1)  # (B,) spans
    if bool((starts > 1).any()):
        row = int((starts > 1).nonzero()[0, 0])
        on = mask[row].nonzero()[:, 0].tolist()
        gap = next(i for i in range(len(on) - 1) if on[i + 1] > on[i] + 1)
        raise ValueError(f"attention_mask row {row} is not one contiguous span of attended tokens (0 at index "
                         f"{on[gap] + 1}, between attended tokens {on[gap]} and {on[gap + 1]}), so positions counted "
                         f"from its first attended token over {len(on)} tokens (ReFT positions, its prompt / "
                         f"completion split) would miss its tokens; pad each row on one side only (left or right), "
                         f"with 0 only in the padding")


def prompt_spans_from_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of the non-pad span of each row of a prompt-only batch, left or right padded.

    attention_mask: (B, T) of 0/1, one contiguous span of 1s per row (left or right padding); a row with holes
    (a 0 between 1s) is refused (`check_one_span`), since its positions would be placed off its tokens.
    """
    check_one_span(attention_mask)
    mask = attention_mask.to(torch.long)
    length = mask.sum(dim=1)  # (B,)
    start = mask.argmax(dim=1)  # (B,) first 1 (0 for an all-pad row)
    return start, length


_SPANS_CHECKED_ON: set[torch.device] = set()  # accelerators whose first prompt_spans mask was checked


def prompt_spans(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) `(B,)` of each row's prompt: from its first attended token to its first completion
    token (or to its last attended token when the row has no completion). Left or right padding; one contiguous
    span of attended tokens per row (alignkit's collators build such masks; a mask with holes is refused by
    `check_one_span`: on CPU tensors at every call, on an accelerator at the first call of the process only, which
    avoids a GPU sync per batch)."""
    if attention_mask.device.type == "cpu" or attention_mask.device not in _SPANS_CHECKED_ON:
        check_one_span(attention_mask)
        if attention_mask.device.type != "cpu":
            _SPANS_CHECKED_ON.add(attention_mask.device)
    att = attention_mask.long()
    comp = completion_mask.long() * att
    start = att.argmax(dim=1)  # (B,) first real token
    end_all = start + att.sum(dim=1)  # (B,) one past the last real token
    first_comp = torch.where(comp.any(dim=1), comp.argmax(dim=1), end_all)  # (B,)
    return start, first_comp - start


IGNORE_INDEX = -100  # the label of a token outside the loss (transformers' cross-entropy `ignore_index`)


def completion_mask_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 completion mask of a pyreft batch (labels -100 off the response): 1 on each target token. What
    ReftTrainer derives for a batch without `completion_mask` and `ReftModel.forward(labels=...)` for a call without
    one, so both place a row's prompt (its tokens before its first target) alike."""
    return (labels != IGNORE_INDEX).long()


def prompt_spans_from_labels(attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) `(B,)` of each row's prompt in a batch of prompt + response rows whose labels are -100 off the
    response (pyreft's batches): `prompt_spans` over `completion_mask_from_labels`, i.e. from a row's first attended
    token to its first target. A row without a target (all -100: a response cut off by truncation, or a prompt-only
    row) is prompt up to its last attended token, as pyreft places it (from its prompt's token count) and as
    ReftTrainer trains it. A row whose first attended token is already a target (no -100 before its response, e.g.
    labels=input_ids) has no prompt end to place positions at: ValueError naming the row."""
    completion = completion_mask_from_labels(labels)
    start, length = prompt_spans(attention_mask, completion)
    bad = (length == 0) & (completion * attention_mask.long()).any(dim=1)  # (B,) a target, and no token before it
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels row {row}: its first attended token (index {int(start[row])}) is already a target "
                         f"(label != -100; {int(bad.sum())} of {bad.shape[0]} rows are so), so the row has no prompt "
                         f"before its response and the ReFT positions, placed on the tokens before a row's first "
                         f"target, cannot be located; set labels to -100 on each row's prompt tokens, or pass "
                         f"completion_mask (zeros: the whole row is the prompt) or intervention_locations")
    return start, length


def locations_from_mask(spec: "str | Positions", attention_mask: torch.Tensor, num_interventions: int,
                        share_weights: bool = True) -> torch.Tensor:
    """Locations for a batch that holds prompts only (generation, classification): the whole row is the prompt."""
    start, length = prompt_spans_from_mask(attention_mask)
    return locations_from_spans(spec, start, length, num_interventions, share_weights)


__all__ = ["IGNORE_INDEX", "Positions", "check_one_span", "check_prompt_lengths", "check_truncated_prompts",
           "completion_mask_from_labels", "locations_from_spans", "needed_length", "locations_from_mask",
           "prompt_spans", "prompt_spans_from_labels", "prompt_spans_from_mask"]
