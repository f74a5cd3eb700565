"""Collators: tokenized dicts (`alignkit.data.tokenize`) -> padded tensor batches.

Every padded batch has `input_ids`, `attention_mask`, `position_ids` (counting real tokens only, so
left padding is right too), `completion_mask` (1 on completion tokens) and `labels` (= input_ids on
completion tokens, -100 elsewhere; HF models shift them inside), all (rows, T) with T the longest row
(rounded up to `pad_to_multiple_of`), plus `weight` (B,) float32 per example. Padding is on
`padding_side` ("right" or "left").

- `SFTCollator`: rows = examples, B. Unpaired data adds `label` (B,) bool.
- `PreferenceCollator`: the 2B layout, one concatenated forward pass for both responses:
      rows 0 .. B-1   = chosen  of examples 0 .. B-1
      rows B .. 2B-1  = rejected of examples 0 .. B-1
  so `logps[:B]` / `logps[B:]` are the chosen / rejected halves. Adds `margin` (B,) float32 (0 where the
  record had none).
- `RankedCollator`: rows = all responses, example-major, best first: example i's K_i responses are
  rows offsets[i] .. offsets[i]+K_i-1 (N = sum K_i rows). Adds `group_index` (N,) (example of each row),
  `rank` (N,) (the record's rank, equal for ties, 0 = best), `num_responses` (B,). Scatter rewards to a
  (B, K_max) table with `group_index` and the row's position in its group (`position_in_group` (N,)).
- `PackedSFTCollator`: padding-free SFT: all sequences concatenated in one row (1, S): `input_ids`,
  `position_ids` restarting at 0 per sequence, `labels`/`completion_mask` with each sequence's first token
  masked (it must not be predicted from the previous sequence), `cu_seq_lens` (B+1,) int32 cumulative
  lengths starting at 0, `max_seq_len` (int), `sequence_index` (1, S) (example of each token) and
  `weight` (B,). No `attention_mask`: sequence boundaries travel in `position_ids` (transformers builds
  a block-diagonal causal mask from them for sdpa/eager; flash-attention gets `cu_seq_lens` as varlen
  kwargs, see `alignkit.trainers.logps`).
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


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right", multiple_of: int | None = None) -> torch.Tensor:
    """Stack `seqs` into a (len(seqs), T) long tensor, padding with `value` on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max((len(s) for s in seqs), default=0)
    if multiple_of:
        T = -(-T // multiple_of) * multiple_of
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "right":
                out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out


def _rows(ids: list[list[int]], masks: list[list[int]] | None, pad_id: int, side: str,
          multiple_of: int | None) -> dict[str, torch.Tensor]:
    input_ids = pad(ids, pad_id, side, multiple_of)                            # (R, T)
    attention_mask = pad([[1] * len(s) for s in ids], 0, side, multiple_of)    # (R, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                # (R, T)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if masks is not None:
        completion_mask = pad(masks, 0, side, multiple_of)                     # (R, T)
        out["completion_mask"] = completion_mask
        out["labels"] = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return out


def _weights(features: list[dict]) -> torch.Tensor:
    return torch.tensor([float(f.get("weight", 1.0)) for f in features], dtype=torch.float32)  # (B,)


@dataclass
class SFTCollator:
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = _rows([f["input_ids"] for f in features], [f["completion_mask"] for f in features],
                      self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        batch["weight"] = _weights(features)
        if "label" in features[0]:
            batch["label"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)  # (B,)
        return batch


@dataclass
class PreferenceCollator:
    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        masks = [f["chosen_completion_mask"] for f in features] + [f["rejected_completion_mask"] for f in features]
        batch = _rows(ids, masks, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)  # (2B, T)
        batch["weight"] = _weights(features)
        batch["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in features], dtype=torch.float32)
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


def pack(seqs: list[list[int]], masks: list[list[int]]) -> dict[str, Any]:
    """Concatenate `seqs` into one row (1, S) with the boundary keys of the padding-free layout (module docstring).

    Each sequence's first token gets completion_mask 0: it would otherwise be scored as the next token of the
    previous sequence.
    """
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"pack: every sequence needs at least one token, got lengths {lengths}")
    input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]                         # (1, S)
    completion_mask = torch.tensor([m for ms in masks for m in ms], dtype=torch.long)[None]                 # (1, S)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]                                      # (1, S)
    completion_mask = completion_mask.masked_fill(position_ids == 0, 0)  # no prediction across sequences
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)                                                         # (R+1,)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
        "labels": input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX),
        "cu_seq_lens": cu,
        "max_seq_len": max(lengths),
        "sequence_index": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None],  # (1, S)
    }


@dataclass
class PackedSFTCollator:
    """Padding-free SFT batches (see the module docstring)."""

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = pack([f["input_ids"] for f in features], [f["completion_mask"] for f in features])
        batch["weight"] = _weights(features)
        if "label" in features[0]:
            batch["label"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)  # (B,)
        return batch


@dataclass
class PackedPreferenceCollator:
    """Padding-free preference batches: the 2B sequences of `PreferenceCollator` (chosen of examples 0..B-1,
    then their rejected) concatenated in one row (1, S), with the keys of `pack` plus `weight` and `margin` (B,)."""

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        masks = [f["chosen_completion_mask"] for f in features] + [f["rejected_completion_mask"] for f in features]
        batch = pack(ids, masks)
        batch["weight"] = _weights(features)
        batch["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in features], dtype=torch.float32)
        return batch


def packed_version(collator: Any) -> Any:
    """The padding-free counterpart of a padded collator (SFT / preference); a packed one is returned as is."""
    if isinstance(collator, (PackedSFTCollator, PackedPreferenceCollator)):
        return collator
    if isinstance(collator, SFTCollator):
        return PackedSFTCollator()
    if isinstance(collator, PreferenceCollator):
        return PackedPreferenceCollator()
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
