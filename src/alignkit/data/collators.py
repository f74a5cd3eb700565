"""Collators: tokenized dicts (`alignkit.data.tokenize`) -> padded tensor batches.

Every padded batch has `input_ids`, `attention_mask`, `position_ids` (counting real tokens only, so
left padding is right too), `completion_mask` (1 on completion tokens) and `labels` (= input_ids on
completion tokens, -100 elsewhere; HF models shift them inside), all (rows, T) with T the longest row
(rounded up to `pad_to_multiple_of`), plus `weight` (B,) float32 per example. Padding is on
`padding_side` ("right" or "left").

- `SFTCollator`: rows = examples, B. Unpaired data adds `label` (B,) bool. `prompt_length` (B,) (the tokens
  before the final completion) comes along when the features carry it: ReFT places its positions in that
  prompt even when earlier assistant turns are trained (`tokenize.loss_on`).
- `PreferenceCollator`: the 2B layout, one concatenated forward pass for both responses:
      rows 0 .. B-1   = chosen  of examples 0 .. B-1
      rows B .. 2B-1  = rejected of examples 0 .. B-1
  so `logps[:B]` / `logps[B:]` are the chosen / rejected halves. Adds `margin` (B,) float32 (0 where the
  record had none).
- `RankedCollator`: rows = all responses, example-major, best first: example i's K_i responses are
  rows offsets[i] .. offsets[i]+K_i-1 (N = sum K_i rows). Adds `group_index` (N,) (example of each row),
  `rank` (N,) (the record's rank, equal for ties, 0 = best), `num_responses` (B,). Scatter rewards to a
  (B, K_max) table with `group_index` and the row's position in its group (`position_in_group` (N,)).
- `PackedSFTCollator(row_length=None)`: padding-free SFT: all sequences concatenated in one row (1, S):
  `input_ids`, `position_ids` restarting at 0 per sequence, `labels`/`completion_mask` with each sequence's first token
  masked (it must not be predicted from the previous sequence), `sequence_index` (1, S) (example of each token),
  `sequence_start` / `sequence_length` (B,), `max_seq_len` (int), `cu_seq_lens` (B+1,) int32 cumulative lengths starting
  at 0, and `weight` (B,). With `row_length` ("longest" or an int) the sequences are binned first-fit-decreasing into
  rows of at most max(row_length, longest) tokens, (rows, L), each row's tail a filler segment (sequence_index -1), and
  no `cu_seq_lens`: sdpa / eager attention then costs sum(L^2) per batch instead of S^2 for one row. No
  `attention_mask`: sequence boundaries travel in `position_ids` (transformers builds a block-diagonal causal mask from
  them for sdpa/eager; flash-attention gets `cu_seq_lens` as varlen kwargs, see `alignkit.trainers.logps`).
- `PackedPreferenceCollator`: padding-free 2B layout: the chosen then the rejected sequences packed in one
  row, keys as `PackedSFTCollator` plus `margin` (B,). `packed_version(collator)` maps padded -> packed.
- `PromptCollator`: prompts for generation, left-padded by default: `input_ids`, `attention_mask`,
  `position_ids`, `weight`, and `prompts` (the records' prompts, a list).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


def _as_list(s: Any) -> list:
    return s.tolist() if hasattr(s, "tolist") else list(s)


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right", multiple_of: int | None = None) -> torch.Tensor:
    """Stack `seqs` into a (len(seqs), T) long tensor, padding with `value` on `side`.

    The padded rows are built as Python lists and converted by ONE `torch.tensor` call (a per-row
    `torch.as_tensor` + slice assignment costs ~10 us a row, which a small model's step notices)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max((len(s) for s in seqs), default=0)
    if multiple_of:
        T = -(-T // multiple_of) * multiple_of
    if not seqs:
        return torch.empty((0, T), dtype=torch.long)
    rows = [_as_list(s) for s in seqs]
    if side == "right":
        rows = [r + [value] * (T - len(r)) for r in rows]
    else:
        rows = [[value] * (T - len(r)) + r for r in rows]
    return torch.tensor(rows, dtype=torch.long)  # (R, T)


def _rows(ids: list[list[int]], masks: list[list[int]] | None, pad_id: int, side: str,
          multiple_of: int | None) -> dict[str, torch.Tensor]:
    input_ids = pad(ids, pad_id, side, multiple_of)                            # (R, T)
    R, T = input_ids.shape
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.long)            # (R,)
    col = torch.arange(T)[None, :]                                             # (1, T)
    real = col < lengths[:, None] if side == "right" else col >= (T - lengths)[:, None]
    attention_mask = real.long()                                               # (R, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                # (R, T)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if masks is not None:
        completion_mask = pad(masks, 0, side, multiple_of)                     # (R, T)
        out["completion_mask"] = completion_mask
        out["labels"] = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return out


def _weights(features: list[dict]) -> torch.Tensor:
    return torch.tensor([float(f.get("weight", 1.0)) for f in features], dtype=torch.float32)  # (B,)


def _margins(features: list[dict]) -> torch.Tensor:
    return torch.tensor([float(f.get("margin") or 0.0) for f in features], dtype=torch.float32)  # (B,)


def _with_sft_columns(batch: dict[str, Any], features: list[dict]) -> dict[str, Any]:
    """The per-example columns of an SFT / unpaired batch (padded or packed): weight, label, prompt_length."""
    batch["weight"] = _weights(features)
    if "label" in features[0]:
        batch["label"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)  # (B,)
    if all(f.get("prompt_length") is not None for f in features):  # the prompt before the final turn (ReFT)
        batch["prompt_length"] = torch.tensor([int(f["prompt_length"]) for f in features], dtype=torch.long)
    return batch


@dataclass
class SFTCollator:
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = _rows([f["input_ids"] for f in features], [f["completion_mask"] for f in features],
                      self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        return _with_sft_columns(batch, features)


@dataclass
class PreferenceCollator:
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        masks = [f["chosen_completion_mask"] for f in features] + [f["rejected_completion_mask"] for f in features]
        batch = _rows(ids, masks, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)  # (2B, T)
        batch.update(weight=_weights(features), margin=_margins(features))
        return batch


@dataclass
class RankedCollator:
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        ids = [s for f in features for s in f["input_ids"]]
        masks = [m for f in features for m in f["completion_mask"]]
        batch = _rows(ids, masks, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)  # (N, T)
        sizes = [len(f["input_ids"]) for f in features]
        batch["group_index"] = torch.repeat_interleave(torch.arange(len(features)), torch.tensor(sizes))  # (N,)
        batch["position_in_group"] = torch.cat([torch.arange(k) for k in sizes])                        # (N,)
        batch["rank"] = torch.tensor([r for f in features for r in f["ranks"]], dtype=torch.long)       # (N,)
        batch["num_responses"] = torch.tensor(sizes, dtype=torch.long)                                  # (B,)
        batch["weight"] = _weights(features)
        return batch


def _rows_of(lengths: list[int], row_length: int | str | None) -> list[list[int]]:
    """Sequence indices per row: all in one row (None), or first-fit-decreasing bins of capacity
    max(row_length, longest) ("longest": the longest sequence of the batch)."""
    if row_length is None:
        return [list(range(len(lengths)))]
    longest = max(lengths)
    if row_length == "longest":
        cap = longest
    elif isinstance(row_length, int) and row_length > 0:
        cap = max(row_length, longest)
    else:
        raise ValueError(f"row_length must be None, 'longest' or a positive int, got {row_length!r}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        r = next((j for j, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([i])
            free.append(cap - lengths[i])
        else:
            rows[r].append(i)
            free[r] -= lengths[i]
    return rows


def pack(seqs: list[list[int]], masks: list[list[int]], row_length: int | str | None = None,
         pad_token_id: int = 0) -> dict[str, Any]:
    """Pack `seqs` without padding between them: one row (1, S) (`row_length=None`), or rows of at most
    max(row_length, longest) tokens filled first-fit-decreasing, (rows, L) (module docstring).

    Each sequence's first token gets completion_mask 0: it would otherwise be scored as the next token of the
    previous sequence. The tail of a multi-row layout is filler (`pad_token_id`, positions 0, 1, ... so it is a
    segment of its own, sequence_index -1, never scored).
    """
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"pack: every sequence needs at least one token, got lengths {lengths}")
    groups = _rows_of(lengths, row_length)
    L = max(sum(lengths[i] for i in g) for g in groups)
    ids, pos, comp, seq = [], [], [], []
    start = [0] * len(seqs)
    for r, g in enumerate(groups):
        row_ids, row_pos, row_comp, row_seq = [], [], [], []
        for i in g:
            start[i] = r * L + len(row_ids)
            row_ids += seqs[i]
            row_pos += range(lengths[i])
            row_comp += [0] + list(masks[i][1:])  # no prediction across sequences
            row_seq += [i] * lengths[i]
        k = L - len(row_ids)
        ids.append(row_ids + [pad_token_id] * k)
        pos.append(row_pos + list(range(k)))
        comp.append(row_comp + [0] * k)
        seq.append(row_seq + [-1] * k)
    input_ids = torch.tensor(ids, dtype=torch.long)                # (rows, L)
    completion_mask = torch.tensor(comp, dtype=torch.long)         # (rows, L)
    batch = {
        "input_ids": input_ids,
        "position_ids": torch.tensor(pos, dtype=torch.long),       # (rows, L), 0 at each sequence start
        "completion_mask": completion_mask,
        "labels": input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX),
        "sequence_index": torch.tensor(seq, dtype=torch.long),     # (rows, L), -1 on filler
        "sequence_start": torch.tensor(start, dtype=torch.long),   # (R,) offset in the flattened (rows * L)
        "sequence_length": torch.tensor(lengths, dtype=torch.long),  # (R,)
        "max_seq_len": max(lengths),
    }
    if len(groups) == 1:  # one row: cumulative lengths for flash-attention varlen kernels
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)            # (R+1,)
        batch["cu_seq_lens"] = cu
    return batch


@dataclass
class PackedSFTCollator:
    """Padding-free SFT batches (see the module docstring)."""

    row_length: int | str | None = None
    pad_token_id: int = 0

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = pack([f["input_ids"] for f in features], [f["completion_mask"] for f in features], self.row_length,
                     self.pad_token_id)
        return _with_sft_columns(batch, features)


@dataclass
class PackedPreferenceCollator:
    """Padding-free preference batches: the 2B sequences of `PreferenceCollator` (chosen of examples 0..B-1,
    then their rejected) packed as `pack` does, plus `weight` and `margin` (B,)."""

    row_length: int | str | None = None
    pad_token_id: int = 0

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        masks = [f["chosen_completion_mask"] for f in features] + [f["rejected_completion_mask"] for f in features]
        batch = pack(ids, masks, self.row_length, self.pad_token_id)
        batch.update(weight=_weights(features), margin=_margins(features))
        return batch


def packed_version(collator: Any, row_length: int | str | None = None) -> Any:
    """The padding-free counterpart of a padded collator (SFT / preference); a packed one is returned as is."""
    if isinstance(collator, (PackedSFTCollator, PackedPreferenceCollator)):
        return collator
    if isinstance(collator, SFTCollator):
        return PackedSFTCollator(row_length, collator.pad_token_id)
    if isinstance(collator, PreferenceCollator):
        return PackedPreferenceCollator(row_length, collator.pad_token_id)
    raise ValueError(f"padding_free=True: no padding-free version of {type(collator).__name__}; use SFTCollator, "
                     "PreferenceCollator, PackedSFTCollator or PackedPreferenceCollator")


@dataclass
class PromptCollator:
    pad_token_id: int
    padding_side: str = "left"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = _rows([f["prompt_input_ids"] for f in features], None, self.pad_token_id, self.padding_side,
                      self.pad_to_multiple_of)
        batch["weight"] = _weights(features)
        batch["prompts"] = [f["prompt"] for f in features]
        return batch


SHARED_KEYS = ("shared_input_ids", "shared_position_ids", "shared_segment_ids", "shared_index")


def shared_prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: torch.Tensor,
                         pad_token_id: int = 0) -> dict[str, Any]:
    """The shared-prefix layout of right-padded rows (R, T) whose `groups (R,)` say which rows share a prompt.

    Each group becomes ONE row: the prefix its members have in common (at least the prompt), then each member's
    tokens after it, in row order:

        row g  = prefix[0:P] + m_0[P:n_0] + m_1[P:n_1] + ...      (P = the group's common prefix, S = longest row)
        positions 0..P-1, then P..n_k-1 for every member          (each member keeps its own positions)
        attention: causal, and a member's tokens see the prefix and their own tokens only

    A causal model's hidden state at a position depends only on the tokens it attends to and their positions,
    so every hidden state of every member is the one the padded layout gives (up to float rounding).
    Returns `shared_input_ids` / `shared_position_ids` (G, S), `shared_segment_ids` (G, S) (-1 on the prefix,
    the member's index k >= 0 on its tokens, -2 on padding; `alignkit.trainers.logps.shared_attention_mask`) and
    `shared_index` (R, T): for each padded-layout token its flat index in the (G * S) shared rows (padding
    points at the row's first token; it is never read). Groups are numbered by first appearance."""
    R, T = input_ids.shape
    att = attention_mask.bool()
    lengths = att.sum(-1)
    if not bool((att == (torch.arange(T, device=att.device)[None, :] < lengths[:, None])).all()):
        raise ValueError("share_prompt needs right-padded rows (PreferenceCollator(padding_side='right'))")
    ids, n, grp = input_ids.tolist(), lengths.tolist(), groups.tolist()
    members: dict[Any, list[int]] = {}
    for r, g in enumerate(grp):
        members.setdefault(g, []).append(r)
    rows, pos, seg, where = [], [], [], [[0] * T for _ in range(R)]
    for gi, rs in enumerate(members.values()):
        first = ids[rs[0]][:n[rs[0]]]
        P = n[rs[0]]
        for r in rs[1:]:
            other = ids[r][:n[r]]
            P = next((i for i, (x, y) in enumerate(zip(first[:P], other)) if x != y), min(P, len(other)))
        row, p, sg = first[:P], list(range(P)), [-1] * P
        for k, r in enumerate(rs):
            start = len(row)
            row += ids[r][P:n[r]]
            p += list(range(P, n[r]))
            sg += [k] * (n[r] - P)
            where[r] = list(range(P)) + list(range(start, start + n[r] - P)) + [0] * (T - n[r])
        rows.append((gi, row, p, sg))
    S = max((len(x[1]) for x in rows), default=0)
    out_ids = [row + [pad_token_id] * (S - len(row)) for _, row, _, _ in rows]
    out_pos = [p + [0] * (S - len(p)) for _, _, p, _ in rows]
    out_seg = [sg + [-2] * (S - len(sg)) for _, _, _, sg in rows]
    gi_of = {g: i for i, g in enumerate(members)}
    index = [[gi_of[grp[r]] * S + c for c in where[r]] for r in range(R)]
    dev = input_ids.device
    return {"shared_input_ids": torch.tensor(out_ids, dtype=torch.long, device=dev),
            "shared_position_ids": torch.tensor(out_pos, dtype=torch.long, device=dev),
            "shared_segment_ids": torch.tensor(out_seg, dtype=torch.long, device=dev),
            "shared_index": torch.tensor(index, dtype=torch.long, device=dev)}


def shared_prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pad_token_id: int = 0) -> dict[str, Any]:
    """`shared_prefix_layout` of a right-padded 2B preference batch (chosen rows 0..B-1, rejected B..2B-1): pair b
    is one row, chosen_b then the rejected tokens after the prefix the two have in common."""
    R = input_ids.shape[0]
    if R % 2:
        raise ValueError(f"a shared-prompt batch needs the 2B preference layout (chosen rows, then rejected), got {R} "
                         "rows")
    pair = torch.arange(R // 2)
    return shared_prefix_layout(input_ids, attention_mask, torch.cat([pair, pair]), pad_token_id)


class SharedPromptCollator:
    """Wraps a (right-padded) preference collator: the batch also carries its shared-prompt layout
    (`shared_prompt_layout`), which the trainers' forward uses instead of the padded rows (`share_prompt=True`).
    The padded keys stay as they are: log-probs, rewards and every loss are read in the padded layout."""

    def __init__(self, collator: Any, pad_token_id: int = 0) -> None:
        self.collator, self.pad_token_id = collator, pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        if batch.get("group_index") is not None:
            raise ValueError("share_prompt applies to pairwise preference batches (chosen / rejected), not ranked ones "
                             "(RankedCollator): train with share_prompt=False")
        if batch.get("attention_mask") is None or batch.get("sequence_index") is not None:
            raise ValueError("share_prompt needs padded preference batches (PreferenceCollator), not packed ones: "
                             "use padding_free=False with share_prompt=True")
        batch.update(shared_prompt_layout(batch["input_ids"], batch["attention_mask"], self.pad_token_id))
        return batch
