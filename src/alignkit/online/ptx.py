"""PPO-ptx (Ouyang et al. 2022, InstructGPT's eq. 2; DeepSpeed-Chat step 3's --unsupervised_dataset_name /
--unsup_coef): each PPO update also takes a language-modelling loss on pretraining / SFT text,

    loss = loss_PPO + ptx_coef * NLL(ptx batch),   NLL = mean over the batch's loss-masked tokens of -log pi(x_t | x_<t)

in the SAME optimizer step (InstructGPT's objective; DeepSpeed-Chat instead takes a second optimizer step on
unsup_coef x the LM loss after each PPO step). A batch is `ptx_batch_size` records (default: the update's number of
samples) drawn from `PtxData`: the records in a seeded shuffle per epoch, cycled; the position is kept in the
checkpoints, so a resumed run takes the batches the uninterrupted one would. Several processes: each takes its
contiguous share of the global batch and the NLL is divided by the global token count (DDP's gradient average is
then the one-process gradient). Under gradient accumulation a process's share runs in micro-batches of at most
the update's micro-batch size (ceil(minibatch / gradient_accumulation_steps) rows), each divided by the same
global token count, so the gradient is one forward's over the batch. Logit temperature 1 (the sampling
temperature is for the policy-gradient terms).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from alignkit.data.chat import without_added_suffix
from alignkit.data.collators import SFTCollator
from alignkit.data.records import SFTRecord
from alignkit.data.tokenize import tokenize_records
from alignkit.online.rollout import token_stats
from alignkit.settings import ConfigError


def as_ptx_features(data: Sequence[Any], tokenizer: Any) -> list[dict[str, Any]]:
    """`ptx_data` as token features (`input_ids`, `completion_mask`: the SFT tokenization's loss mask): features
    as given, or SFT records (`alignkit.data.records.SFTRecord`, plain strings: every token trained) tokenized with
    the default `alignkit.data.TokenizeConfig`. A string is a pretraining document: its ids with special tokens (BOS
    where the tokenizer adds one), then exactly ONE EOS, whatever the tokenizer appends itself (none without an EOS
    token). Decided so: pretraining corpora end each document in EOS (GPT-NeoX / Pythia, Llama), the model learns
    where a text ends, and an SFT plain-text record (data.ptx_path's rows) ends in EOS by data.add_eos alike; before,
    a string ended in EOS only under a tokenizer that appends it (GPT-NeoX style), not under a Llama-style one."""
    out, records = [], []
    for i, x in enumerate(data):
        if isinstance(x, dict) and "input_ids" in x and "completion_mask" in x:
            out.append(x)
        elif isinstance(x, str):
            # a whole text (no prompt): only the appended EOS left out (one, below); a BERT-style [SEP] is kept
            ids, eos = without_added_suffix(list(tokenizer(x)["input_ids"]), tokenizer), tokenizer.eos_token_id
            ids += [eos] if eos is not None and ids[-1:] != [eos] else []
            out.append({"input_ids": ids, "completion_mask": [1] * len(ids), "id": f"ptx_data[{i}]"})
        elif isinstance(x, SFTRecord):
            records.append(x)
        else:
            raise TypeError(f"ptx_data[{i}]: expected an SFTRecord, a string or token features (input_ids, "
                            f"completion_mask), got {type(x).__name__}")
    return out + (tokenize_records(records, tokenizer)[0] if records else [])


def trainable_tokens(feature: dict[str, Any]) -> int:
    """The tokens a record trains on: loss-masked positions after the first (a row's first token has no context)."""
    return int(sum(feature["completion_mask"][1:]))


def check_ptx_tokens(features: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The features with a trainable token; a ConfigError (one line, naming `where`) when none has one."""
    kept = [f for f in features if trainable_tokens(f) > 0]
    if not kept:
        raise ConfigError(f"{where}: none of its {len(features)} record(s) has a trainable token after tokenization "
                         "(an empty completion, or every one dropped as too long), so the pretraining-mix loss would "
                         "have nothing to take; give SFT records with completions (data.loss_on, data.max_length)")
    return kept


class PtxData:
    """The ptx records and the position of the next batch in their stream (epoch e: a shuffle seeded by (seed, e))."""

    def __init__(self, features: list[dict[str, Any]], seed: int) -> None:
        self.features, self.seed, self.position = features, seed, 0
        self._orders: dict[int, list[int]] = {}
        digest = hashlib.sha256(json.dumps([[f["input_ids"], f["completion_mask"]] for f in features])
                                .encode()).hexdigest()[:16]
        self._fingerprint = {"count": len(features), "sha256": digest}  # once: every checkpoint stores it

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.features), generator=torch.Generator().manual_seed(
                self.seed * 1000003 + epoch)).tolist()}
        return self._orders[epoch]

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next `n` records of the stream (crossing into the next epoch's shuffle as needed)."""
        n_all = len(self.features)
        out = [self.features[self._order(k // n_all)[k % n_all]] for k in range(self.position, self.position + n)]
        self.position += n
        return out

    @property
    def epochs(self) -> float:
        """Passes over the records so far (fractional)."""
        return self.position / len(self.features)

    def fingerprint(self) -> dict[str, Any]:
        """The records' count and a digest of their tokens, kept in checkpoints (a resume over other data: refused);
        computed once, when the data is given."""
        return dict(self._fingerprint)


def ptx_batch(features: list[dict[str, Any]], pad_id: int, device: torch.device | str) -> dict[str, Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `completion_mask` (B, T) of token features (the SFT collator's
    rows; its other columns are not read here)."""
    batch = SFTCollator(pad_id)(features)
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")}


def ptx_nll_sum(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(sum of -log pi over the loss-masked tokens, their count) of one batch; temperature 1."""
    stats = token_stats(model, batch, temperature=1.0, chunk_size=chunk_size)
    return -(stats.logps * stats.mask).sum(), stats.mask.sum()


__all__ = ["PtxData", "check_ptx_tokens", "as_ptx_features", "ptx_batch", "ptx_nll_sum", "trainable_tokens"]
