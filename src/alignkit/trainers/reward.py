"""Reward modelling: a sequence classifier with one output, trained pairwise (Bradley-Terry) or K-wise.

    r = model(sequence).logits[:, 0]                                  (rows,)
    pairwise (PreferenceCollator, 2B rows):  L_i = -log sigma(r_w - r_l - m_i) + c (r_w + r_l)^2
    ranked   (RankedCollator, N rows):       L_p = mean_{i<j} -log sigma(r_i - r_j)   (best first)

Losses from `alignkit.losses.reward` (margin m_i from the records when `use_margin`; centering c =
`center_rewards_coefficient`). Metrics: accuracy, rewards/chosen, rewards/rejected, margin (pairwise);
accuracy, kendall_tau, rewards/best, rewards/worst (ranked). The reduction is the mean over pairs (or
prompts) of w * loss (`alignkit.trainers.base`).

ReFT on a classifier intervenes on positions of the WHOLE sequence (the score is read at its last
token), chosen by the adapter's position spec (e.g. "f1+l1": first and last token). A LoRA or ReFT
reward model also trains the classifier head (peft's SEQ_CLS `modules_to_save`; ReFT unfreezes it).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from alignkit.data import DataError, PreferenceCollator, RankedCollator
from alignkit.data.prepare import feature_kind, is_tokenized
from alignkit.losses import REWARD_LOSSES, LossOutput, bradley_terry_loss, check_signs, ranking_loss
from alignkit.models import last_layer
from alignkit.adapters import is_classifier, unwrap_lm, unwrap_parallel
from alignkit.settings import ConfigError
from alignkit.trainers.base import AlignTrainer
from alignkit.trainers.data_prep import packed_collator, shared_prompt_collator
from alignkit.trainers.logps import (
    backbone_output, forward_kwargs, is_packed, is_shared, prompt_locations, shared_states,
)
from alignkit.trainers.packing import check_layout, resolve_padding_free, resolve_share_prompt

logger = logging.getLogger(__name__)


def sequence_rewards(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """(rows,) scalar reward of each row of `batch` (input_ids, attention_mask[, position_ids]). A shared-prompt
    batch (`share_prompt`) runs its shared rows and reads each padded row's score as the classifier does."""
    if is_shared(batch):
        return _shared_rewards(model, batch)
    if is_packed(batch):
        return _packed_rewards(model, batch)
    # use_cache=False: no KV cache is wanted, and a ReFT model's frozen-prefix cache only runs without one
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                          "use_cache": False}
    loc = batch.get("intervention_locations")
    if loc is None and kw["attention_mask"] is not None:
        loc = prompt_locations(model, kw["attention_mask"])  # whole sequence = the "prompt" of a classifier
    if loc is not None:
        kw["intervention_locations"] = loc
    with last_layer.reading(model, unwrap_lm(model), _pooled_positions(model, batch["input_ids"]), kw):
        logits = model(**kw).logits  # (rows, 1)
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model must output one score per sequence (num_labels=1), got logits of shape "
                         f"{tuple(logits.shape)}; load the classifier with num_labels=1")
    return logits[:, 0].float()


def _pooled_columns(model: nn.Module, ids: Tensor) -> tuple[Tensor, bool]:
    """((rows,) the column transformers' *ForSequenceClassification pools in each row of `ids`: the rightmost token
    that is not the pad token, or the last column without a pad token id; whether the model has a pad token id)."""
    lm = unwrap_lm(model)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if cfg.pad_token_id is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device), False
    return (torch.arange(ids.shape[1], device=ids.device) * (ids != cfg.pad_token_id)).argmax(-1), True


def _pooled_positions(model: nn.Module, ids: Tensor) -> Tensor | None:
    """The flat (rows * T) position of each row's pooled token (`_pooled_columns`), or None without a pad token id
    (the classifier then pools its last column of a one-row batch; the last layer runs in full)."""
    last, has_pad = _pooled_columns(model, ids)
    return torch.arange(ids.shape[0], device=ids.device) * ids.shape[1] + last if has_pad else None


def _score_head(lm: nn.Module, what: str) -> nn.Module:
    head = getattr(lm, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{what} reads the reward with the classifier's `score` head; {type(lm).__name__} has "
                         f"none: train with {what}=False")
    return head


def _packed_rewards(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Rewards of a padding-free batch (`PackedPreferenceCollator`): the backbone over the packed rows, and the
    classifier head at the token transformers' *ForSequenceClassification pools in each sequence alone (its
    rightmost token that is not the pad token; its first token when all are)."""
    if getattr(unwrap_parallel(model), "span_locations", None) is not None:
        raise ValueError("padding-free reward modeling does not support ReFT models (a classifier's positions are "
                         "placed over the whole padded row); train with padding_free=False")
    lm = unwrap_lm(model)
    head = _score_head(lm, "padding_free")
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if cfg.pad_token_id is None:
        raise ValueError("padding-free reward modeling pools like the padded classifier, which needs a pad token id "
                         "in the model config; set it, or train with padding_free=False")
    ids, pos = batch["input_ids"].reshape(-1), batch["position_ids"].reshape(-1)  # (rows*L,)
    seq = batch["sequence_index"].reshape(-1).to(pos.device)  # (rows*L,), -1 on filler
    R = batch["sequence_length"].shape[0]
    cand = torch.where((ids.to(pos.device) != cfg.pad_token_id) & (seq >= 0), pos, 0)  # offset if not a pad token
    last = torch.zeros(R + 1, dtype=pos.dtype, device=pos.device).scatter_reduce(
        0, torch.where(seq >= 0, seq, R), cand, reduce="amax")[:R]  # (R,) rightmost non-pad offset
    read = batch["sequence_start"].to(pos.device) + last  # (R,) flat positions of the pooled tokens
    h, _ = backbone_output(model, {**forward_kwargs(model, batch), "use_cache": False}, "padding_free", read)
    pooled = h.reshape(-1, h.shape[-1])[read.to(h.device)]  # (R, d)
    return head(pooled.to(head.weight.dtype) if hasattr(head, "weight") else pooled)[:, 0].float()


def _shared_rewards(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Rewards of a shared-prompt batch: the backbone over the shared rows, each padded row's states gathered
    back (`unshare`), and the classifier head at the token transformers' *ForSequenceClassification pools (the
    rightmost token that is not the pad token; the last column without a pad token id)."""
    lm = unwrap_lm(model)
    head = _score_head(lm, "share_prompt")
    ids = batch["input_ids"]
    last, _ = _pooled_columns(model, ids)  # (rows,)
    rows = torch.arange(ids.shape[0], device=ids.device)
    h, _ = shared_states(model, batch, {"use_cache": False}, "share_prompt", (rows, last))  # (rows, T, d)
    pooled = h[rows, last]  # (rows, d)
    return head(pooled.to(head.weight.dtype) if hasattr(head, "weight") else pooled)[:, 0].float()


class RewardTrainer(AlignTrainer):
    """Pairwise (PreferenceCollator batches) or K-wise (RankedCollator batches) reward model training.

    `share_prompt=True` (pairwise only): each pair runs as one row, the chosen sequence then the rejected one
    without their common prefix, so the prompt goes through the model once (see `PreferenceTrainer`); the same
    rewards up to float rounding; sdpa / eager attention, no ReFT. None (default): on CPU runs where the shared rows run
    as one varlen row (`alignkit.trainers.packing.resolve_share_prompt`; a PreferenceCollator must be given).

    `padding_free` (pairwise only, no ReFT): the 2B sequences of a batch packed without padding
    (`PackedPreferenceCollator`), each reward read at the token the padded classifier pools; the same rewards up
    to float rounding. None (default): on CPU runs where it is faster (`alignkit.trainers.packing`: sdpa through
    `alignkit.models.varlen`, no activation checkpointing, alignkit's PreferenceCollator or none, share_prompt
    off), off elsewhere."""

    record_kinds = ("preference", "ranked")
    trl_learning_rate = ("RewardConfig", 1e-4)
    unweighted_metrics = ("num_pairs",)  # a count per prompt

    def __init__(self, model: nn.Module, args: Any, *, center_rewards_coefficient: float | None = None,
                 use_margin: bool = True, l2_coefficient: float = 0.0, share_prompt: bool | None = None,
                 padding_free: bool | None = None, **kwargs: Any) -> None:
        if not is_classifier(model):
            raise ValueError(f"RewardTrainer needs a *ForSequenceClassification model with num_labels=1 (load it with "
                             f"load_model(path, task='classifier', num_labels=1)); got {type(model).__name__}")
        check_signs("RewardTrainer", center_rewards_coefficient=center_rewards_coefficient,
                    l2_coefficient=l2_coefficient)
        check_layout(model, share_prompt, padding_free, reward_model=True,
                     ranked=ranked_data(kwargs.get("data_collator"), kwargs.get("train_dataset"),
                                        kwargs.get("eval_dataset")))
        lm = unwrap_lm(model)
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        share_prompt = resolve_share_prompt(share_prompt, padding_free, model, args, kwargs.get("data_collator"),
                                            collator_required=True)
        if padding_free is None:
            collator = kwargs.get("data_collator")  # None could mean ranked data: only a given PreferenceCollator
            padding_free = (not share_prompt and getattr(unwrap_parallel(model), "span_locations", None) is None
                            and cfg.pad_token_id is not None and type(collator) is PreferenceCollator
                            and resolve_padding_free(None, model, args, collator, paired=True))
        self.center_rewards_coefficient, self.use_margin = center_rewards_coefficient, use_margin
        self.l2_coefficient, self.share_prompt, self.padding_free = l2_coefficient, share_prompt, bool(padding_free)
        if padding_free:
            kwargs["data_collator"] = packed_collator(kwargs.get("data_collator"), model, paired=True,
                                                      checkpointing=bool(args.activation_checkpointing))
        super().__init__(model, args, **kwargs)
        check_loss_settings(center_rewards_coefficient, l2_coefficient, self.data_collator, self.train_dataset,
                            self.eval_dataset)
        self.train_dataset = with_comparisons(self.train_dataset, "train_dataset")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: with_comparisons(v, f"eval_dataset[{k!r}]") for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = with_comparisons(self.eval_dataset, "eval_dataset")
        if share_prompt or padding_free:  # raw ranked rows, known once tokenized: refused before the first step
            check_layout(model, share_prompt, padding_free, reward_model=True,
                         ranked=ranked_data(None, self.train_dataset, self.eval_dataset))
        if share_prompt:
            self.data_collator = shared_prompt_collator(self.data_collator)

    def objective_settings(self) -> dict[str, Any]:
        return {"ranked": isinstance(self.data_collator, RankedCollator)}

    def training_settings(self) -> dict[str, Any]:
        return {**super().training_settings(), "center_rewards_coefficient": self.center_rewards_coefficient,
                "use_margin": self.use_margin, "l2_coefficient": self.l2_coefficient}

    @classmethod
    def objective_metrics(cls, ranked: bool = False, **_: Any) -> tuple[str, ...]:
        """The ranking loss's metrics on ranked data (`ranked`), the Bradley-Terry pair loss's otherwise."""
        return REWARD_LOSSES.metrics["ranking" if ranked else "bradley_terry"]

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        r = sequence_rewards(model, inputs)  # (rows,)
        if "group_index" in inputs:  # ranked: scatter to a (B, K_max) table, best first
            table, mask, ranks = ranked_table(r, inputs)  # replies cut to the same tokens: no pair, as in evaluation
            return ranking_loss(table, mask, self.l2_coefficient, ranks=ranks,
                                exclude=same_tokens(inputs, table.shape[1]))
        B = r.shape[0] // 2
        margin = inputs.get("margin") if self.use_margin else None
        return bradley_terry_loss(r[:B], r[B:], margin=margin,
                                  center_rewards_coefficient=self.center_rewards_coefficient)


def ranked_data(collator: Any, *datasets: Any) -> str | None:
    """Why a reward trainer's data is ranked (`collator` a RankedCollator, or the first tokenized example of
    `datasets` one of K replies), None for pairs or raw data not yet tokenized: the pair layouts (share_prompt,
    padding_free) cannot lay it out."""
    if isinstance(collator, RankedCollator):
        return "the data_collator is a RankedCollator"
    return "the data is ranked" if "ranked" in _feature_kinds(datasets) else None


def _feature_kinds(datasets: tuple[Any, ...]) -> set[str]:
    """The kinds (`feature_kind`) of the first example of each tokenized dataset of `datasets` (a dict: its first)."""
    kinds = set()
    for ds in datasets:
        ds = next(iter(ds.values()), None) if isinstance(ds, dict) else ds
        if ds is not None and is_tokenized(ds) and hasattr(ds, "__len__") and len(ds):
            kinds.add(feature_kind(ds[0]))
    return kinds


def check_loss_settings(center_rewards_coefficient: float | None, l2_coefficient: float, collator: Any,
                        *datasets: Any) -> None:
    """ConfigError for a loss setting the data's loss never reads: `l2_coefficient` (the K-wise ranking loss's
    regulariser) on pairs, `center_rewards_coefficient` (the pair loss's) on ranked data. Data whose kind is not
    known yet (raw, iterable) is not checked."""
    kinds = _feature_kinds(datasets) | ({"ranked"} if isinstance(collator, RankedCollator) else set())
    if center_rewards_coefficient and "ranked" in kinds:
        raise ConfigError(f"RewardTrainer: center_rewards_coefficient={center_rewards_coefficient} is read only by the "
                          "Bradley-Terry pair loss, and the data is ranked (the K-wise ranking loss), so it would be "
                          "ignored; remove it, or use l2_coefficient, the ranking loss's regulariser")
    if l2_coefficient and "preference" in kinds:
        raise ConfigError(f"RewardTrainer: l2_coefficient={l2_coefficient} is read only by the K-wise ranking loss, "
                          "and the data is preference pairs (the Bradley-Terry loss), so it would be ignored; remove "
                          "it, or use center_rewards_coefficient with pairs")


def compares(example: dict) -> bool:
    """Whether a tokenized ranked example holds an ordered pair the K-wise loss can learn from: two replies of
    different rank (a tie is no comparison) whose token ids differ (replies cut to the same tokens score the same)."""
    ranks, ids = example["ranks"], example["input_ids"]
    return any(ranks[i] < ranks[j] and list(ids[i]) != list(ids[j])
               for i in range(len(ranks)) for j in range(i + 1, len(ranks)))


def cut_pairs(example: dict) -> int:
    """The ordered pairs (different ranks) of a tokenized ranked example whose two replies have the same token ids
    (cut to one text by max_length): the trainer leaves them out of the loss (`same_tokens`), as evaluation does."""
    ranks, ids = example["ranks"], example["input_ids"]
    return sum(ranks[i] != ranks[j] and list(ids[i]) == list(ids[j])
               for i in range(len(ranks)) for j in range(i + 1, len(ranks)))


def with_comparisons(dataset: Any, name: str) -> Any:
    """`dataset` without its ranked examples that compare nothing (`compares`: every reply tied, or the ordered ones
    cut to the same tokens), with one warning naming them, and one counting the ordered pairs of the kept examples
    cut to the same tokens (`cut_pairs`; the loss leaves them out): each added a loss of 0 and an accuracy of 0 to the
    means over prompts (a prompt with none halved a batch of two's loss and eval_accuracy). A DataError when
    every example is such; other data (pairs, raw, iterable) is returned unchanged."""
    if dataset is None or not is_tokenized(dataset) or not hasattr(dataset, "__len__") or not len(dataset):
        return dataset
    if feature_kind(dataset[0]) != "ranked":
        return dataset
    keep, cut = [], []
    for i, ex in enumerate(ranked_rows(dataset)):
        if compares(ex):
            keep.append(i)
            cut.append(cut_pairs(ex))
    if any(cut):
        logger.warning("%s: %d ordered pair(s) of replies in %d ranked record(s) are cut to the same tokens by "
                       "max_length and are left out of the loss and the metrics (each would add a constant log 2 and "
                       "an accuracy of 0); raise max_length to keep them", name, sum(cut), sum(map(bool, cut)))
    if len(keep) == len(dataset):
        return dataset
    kept = set(keep)
    first = [i for i in range(len(dataset)) if i not in kept][:3]
    ids = [(dataset[i].get("id") or f"#{i}") for i in first]
    if not keep:
        raise DataError(f"{name}: none of its {len(dataset)} ranked record(s) has two replies of different rank with "
                        f"different tokens (e.g. {ids}: every reply tied, or cut to the same tokens by max_length), "
                        "so the K-wise loss has nothing to compare; give the better replies lower ranks, or raise "
                        "max_length")
    logger.warning("%s: %d of %d ranked record(s) compare nothing (e.g. %s: every reply tied, or the ordered ones cut "
                   "to the same tokens by max_length) and are left out: each would add a loss of 0 and an accuracy "
                   "of 0 to the means; give the better replies lower ranks, or raise max_length", name,
                   len(dataset) - len(keep), len(dataset), ids)
    return dataset.select(keep) if hasattr(dataset, "select") else [dataset[i] for i in keep]


def ranked_rows(dataset: Any, batch_size: int = 256) -> Iterator[dict]:
    """The `ranks` and `input_ids` of each example: a `datasets.Dataset` read `batch_size` rows at a time, only those
    two columns (reading both whole columns into Python lists held 20k ranked records x 3 replies x 256 tokens at
    once: +670 MiB peak on every rank); a list as it is."""
    if not hasattr(dataset, "column_names"):
        yield from dataset
        return
    for batch in dataset.select_columns(["ranks", "input_ids"]).iter(batch_size=batch_size):
        for ranks, ids in zip(batch["ranks"], batch["input_ids"]):
            yield {"ranks": ranks, "input_ids": ids}


def ranked_table(r: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """A ranked batch's row rewards `(N,)` scattered to `(B, K_max)` tables, best first: rewards, the mask of real
    replies and the replies' ranks (ties equal; `RankedCollator`'s `rank`)."""
    idx = (batch["group_index"], batch["position_in_group"])
    B, K = batch["num_responses"].shape[0], int(batch["num_responses"].max())
    table = r.new_zeros(B, K).index_put(idx, r)
    mask = torch.zeros(B, K, dtype=torch.bool, device=r.device).index_put(idx, torch.tensor(True, device=r.device))
    ranks = torch.zeros(B, K, dtype=torch.long, device=r.device).index_put(idx, batch["rank"].to(r.device))
    return table, mask, ranks


def same_tokens(batch: dict[str, Any], K: int) -> torch.Tensor:
    """`(B, K, K)`: whether replies i and j of a ranked batch's record (`RankedCollator`) are the same token
    sequence, e.g. two replies that differ only past data.max_length: their scores are equal whatever the model, so
    the pair says nothing of it."""
    B = batch["num_responses"].shape[0]
    ids = batch.get("input_ids")
    if ids is None:  # no token ids (a batch of scores): nothing to compare
        return torch.zeros(B, K, K, dtype=torch.bool, device=batch["num_responses"].device)
    att = batch.get("attention_mask")
    idx = (batch["group_index"].to(ids.device), batch["position_in_group"].to(ids.device))
    rows = torch.full((B, K, ids.shape[1]), -1, dtype=ids.dtype, device=ids.device).index_put(
        idx, ids if att is None else ids.masked_fill(att == 0, -1))  # (B, K, T); a missing reply: all -1
    return (rows[:, :, None, :] == rows[:, None, :, :]).all(-1)


__all__ = ["RewardTrainer", "check_loss_settings", "compares", "cut_pairs", "ranked_data", "ranked_rows",
           "ranked_table", "same_tokens", "sequence_rewards", "with_comparisons"]
