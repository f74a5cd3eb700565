"""Length-aware batching: a sampler that puts examples of similar length in the same batch, keeping randomness.

Padded batches cost compute on every pad token: a batch is as long as its longest row. Shuffled data of
ragged lengths wastes a large fraction of each batch on padding. `LengthGroupedSampler` does, per epoch:

    perm      = random permutation of the N examples                  (seeded by seed + epoch)
    megas     = perm cut into consecutive groups of M = batch_size * mega_batches examples
    in a mega = sort by length, longest first, cut into batches of batch_size
    batches   = all batches of all megas, in a random order (the one holding the longest example first,
                so an out-of-memory shows at step 1, not hours in)

Every example appears exactly once per epoch; which examples share a batch and the batch order change
from epoch to epoch. The larger `mega_batches`, the less padding and the less randomness (M = N sorts the
whole dataset). Lengths come from `example_length` (tokens of the padded rows an example becomes: its
`input_ids`, or the longer of its chosen / rejected, or its longest ranked response).

The trainers use it when built with `group_by_length=True` (or `TrainingArguments(train_sampling_strategy=
"group_by_length")`); `padding_fraction` measures what it saves.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def example_length(example: dict, shared_prompt: bool = False) -> int:
    """Tokens of the longest row the example becomes in a padded batch. `shared_prompt` (preference examples):
    the tokens of its one shared-prompt row instead (`share_prompt`: chosen + rejected - their common prefix)."""
    if shared_prompt and "chosen_input_ids" in example:
        a, b = list(example["chosen_input_ids"]), list(example["rejected_input_ids"])
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return len(a) + len(b) - common
    if "input_ids" in example:
        ids = example["input_ids"]
        if ids and isinstance(ids[0], (list, tuple)):  # ranked: one row per response
            return max(len(r) for r in ids)
        return len(ids)
    if "chosen_input_ids" in example:
        return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
    if "prompt_input_ids" in example:
        return len(example["prompt_input_ids"])
    raise ValueError(f"example_length: no input_ids / chosen_input_ids / prompt_input_ids in an example with keys "
                     f"{sorted(example)}; tokenize the records first (alignkit.data.tokenize_records)")


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of pad tokens when `batches` (lists of example indices) are right-padded to their longest example."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches if len(b))
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if total == 0 else 1.0 - real / total


class LengthGroupedSampler(Sampler[int]):
    """Yields example indices so that consecutive runs of `batch_size` have similar lengths (module docstring).

    Args:
        lengths: length of each example (`example_length`).
        batch_size: examples per batch (per device).
        mega_batches: batches per sorted group (default 16).
        seed: base seed; epoch e uses seed + e (`set_epoch`, called by the Trainer; otherwise each `iter` advances).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, mega_batches: int = 16, seed: int = 0) -> None:
        if batch_size < 1 or mega_batches < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size and mega_batches must be >= 1, got {batch_size}, "
                             f"{mega_batches}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)  # (N,)
        self.batch_size, self.mega_batches, self.seed = batch_size, mega_batches, seed
        self.epoch: int | None = None
        self._iterations = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (lists of indices), in the order they are yielded."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.lengths), generator=g)  # (N,)
        M = self.batch_size * self.mega_batches
        out: list[list[int]] = []
        for s in range(0, len(perm), M):
            mega = perm[s:s + M]
            mega = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]  # longest first
            out += [mega[b:b + self.batch_size].tolist() for b in range(0, len(mega), self.batch_size)]
        if not out:
            return out
        order = torch.randperm(len(out), generator=g).tolist()
        out = [out[i] for i in order]
        longest = max(range(len(out)), key=lambda i: int(self.lengths[out[i]].max()))
        out[0], out[longest] = out[longest], out[0]
        return out

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch if self.epoch is not None else self._iterations
        self._iterations += 1
        for b in self.batches(epoch):
            yield from b


__all__ = ["LengthGroupedSampler", "example_length", "padding_fraction"]
