"""KTO and other unpaired objectives (`UNPAIRED_LOSSES`: "kto", "apo_zero_unpaired") on labelled completions.

Batches come from `alignkit.data.SFTCollator` over unpaired features (`label` (B,) bool: desirable).
The KL reference point z_ref is estimated, as in TRL's KTOTrainer, from MISMATCHED pairs: row i's
prompt with the completion of row i-1 (a rotation of the batch), scored by the policy without gradient
and by the reference:

    rho_i  = log pi(y_i|x_i) - log pi_ref(y_i|x_i)
    z_ref  = max(0, mean_i [log pi(y_{i-1}|x_i) - log pi_ref(y_{i-1}|x_i)])     (mean across processes)
    losses = kto_loss(pi, pi_ref, desirable, z_ref, beta, lambda_D, lambda_U)      (B,)

The reference is the adapter switched off or a frozen copy (precomputed log-probs are not offered:
the mismatched pairs depend on how batches are drawn). KTO needs batches of at least 2 examples; a loss that does not
read z_ref (`alignkit.losses.KL_LOSSES`: apo_zero_unpaired) scores no mismatched pairs and logs no `kl` (TRL logs
0 there, a figure that is not a KL; metric_for_best_model "kl" is refused for it).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.losses import KL_LOSSES, UNPAIRED_LOSSES, LossOutput, check_signs
from alignkit.settings import ConfigError
from alignkit.trainers.base import AlignTrainer
from alignkit.trainers.logps import completion_logps, prompt_spans
from alignkit.trainers.ref_sync import SyncsReference, as_ref_sync, check_ref_sync
from alignkit.trainers.reference import HasReference, Reference, build_reference

logger = logging.getLogger(__name__)


def mismatched_batch(batch: dict[str, Any]) -> dict[str, Tensor]:
    """Row i = prompt of row i + completion of row i-1 (mod B), right padded. Vectorised gathers only."""
    ids = batch["input_ids"]  # (B, T)
    att = batch.get("attention_mask")
    att = torch.ones_like(ids) if att is None else att
    comp = batch["completion_mask"].long() * att.long()
    B, T = ids.shape
    start, plen = prompt_spans(att, comp)  # (B,), (B,)
    cstart, clen = start + plen, comp.sum(1)  # (B,), (B,)
    j = (torch.arange(B, device=ids.device) - 1) % B  # partner row
    new_len = plen + clen[j]  # (B,)
    t = torch.arange(int(new_len.max()), device=ids.device)[None, :]  # (1, L)
    in_prompt = t < plen[:, None]  # (B, L)
    in_comp = (t >= plen[:, None]) & (t < new_len[:, None])  # (B, L)
    rows = torch.where(in_prompt, torch.arange(B, device=ids.device)[:, None], j[:, None])  # (B, L)
    cols = torch.where(in_prompt, start[:, None] + t, cstart[j][:, None] + t - plen[:, None]).clamp(0, T - 1)
    new_att = (in_prompt | in_comp).long()
    new_ids = torch.where(new_att.bool(), ids[rows, cols], ids[0, 0].expand_as(rows))
    return {"input_ids": new_ids, "attention_mask": new_att, "completion_mask": in_comp.long(),
            "position_ids": (new_att.cumsum(-1) - 1).clamp(min=0)}


def unpadded_rows(batch: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """(input ids, completion mask) of each row of a collated batch, without its padding (either side)."""
    att = batch.get("attention_mask")
    att = torch.ones_like(batch["input_ids"]) if att is None else att
    return [(ids[m.bool()], comp[m.bool()]) for ids, comp, m in zip(batch["input_ids"], batch["completion_mask"], att)]


def rows_batch(rows: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Rows of `unpadded_rows` as one right-padded batch (input_ids, attention_mask, completion_mask), for
    `mismatched_batch` (which reads no padding id)."""
    pad = torch.nn.utils.rnn.pad_sequence
    return {"input_ids": pad([r[0] for r in rows], batch_first=True),
            "completion_mask": pad([r[1] for r in rows], batch_first=True),
            "attention_mask": pad([torch.ones_like(r[0]) for r in rows], batch_first=True)}


def label_counts(dataset: Any) -> tuple[int, int] | None:
    """(desirable, undesirable) examples of tokenized unpaired features; None without a dataset or labels."""
    if dataset is None:
        return None
    try:
        labels = list(dataset["label"]) if hasattr(dataset, "column_names") else [f["label"] for f in dataset]
    except (KeyError, TypeError):
        return None  # the missing label is the objective's error (at the first batch)
    n_des = sum(bool(x) for x in labels)
    return n_des, len(labels) - n_des


def side_weights(dataset: Any) -> tuple[float, float] | None:
    """The sums of the record weights (`weight`) of the desirable and of the undesirable examples; None when the data
    has no weight other than 1 (the counts say the same)."""
    try:
        if hasattr(dataset, "column_names"):
            if "weight" not in dataset.column_names:
                return None
            pairs = list(zip(dataset["label"], dataset["weight"]))
        else:
            pairs = [(f["label"], f.get("weight", 1.0)) for f in dataset]
    except (KeyError, TypeError):
        return None
    weights = [1.0 if w is None else float(w) for _, w in pairs]
    if all(w == 1.0 for w in weights):
        return None
    return (sum(w for (label, _), w in zip(pairs, weights) if label),
            sum(w for (label, _), w in zip(pairs, weights) if not label))


def check_label_balance(dataset: Any, desirable_weight: float, undesirable_weight: float) -> tuple[int, int] | None:
    """Warn when the labels are one-sided, a side present in the data has weight 0, or the weighted balance is off
    (the KTO paper's and TRL's rule: keep desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in
    [1, 4/3]; with record weights, n_* are the sides' weight sums: 100 undesirable examples of weight 0.1 weigh as 10,
    which the counts alone called balanced). A ConfigError when the weights give every example a loss of 0 (nothing
    would be trained). Returns the counts."""
    counts = label_counts(dataset)
    if counts is None:
        return None
    n_des, n_und = counts
    if not n_des + n_und:
        return 0, 0
    if desirable_weight * n_des + undesirable_weight * n_und == 0:
        raise ConfigError(f"method.desirable_weight={desirable_weight:g} and method.undesirable_weight="
                          f"{undesirable_weight:g}: the {n_des} desirable and {n_und} undesirable training example(s) "
                          "all have their KTO loss multiplied by 0, so nothing would be trained; set the weight of a "
                          "side the data has above 0")
    if n_des == 0 or n_und == 0:
        logger.warning("KTO: every one of the %d training example(s) is %s: the loss then only moves them against "
                       "the KL reference point (no contrast); check the label column if both kinds were expected",
                       n_des + n_und, "desirable" if n_und == 0 else "undesirable")
        return n_des, n_und
    if desirable_weight == 0 or undesirable_weight == 0:
        side, n = ("desirable", n_des) if desirable_weight == 0 else ("undesirable", n_und)
        logger.warning("KTO: method.%s_weight is 0, so the %d %s training example(s) add no loss and only the other "
                       "side trains (no contrast); remove the weight of 0 if both sides should train", side, n, side)
        return n_des, n_und
    sums = side_weights(dataset)
    w_des, w_und = sums if sums is not None else (n_des, n_und)
    if w_des == 0 or w_und == 0:
        side, n = ("desirable", n_des) if w_des == 0 else ("undesirable", n_und)
        logger.warning("KTO: the %d %s training example(s) all have record weight 0, so they add no loss and only the "
                       "other side trains (no contrast); give them a weight > 0 if both sides should train", n, side)
        return n_des, n_und
    ratio = desirable_weight * w_des / (undesirable_weight * w_und)
    if not 1.0 <= ratio <= 4 / 3:
        weighed = "" if sums is None else f" (record weights summing to {w_des:.4g} and {w_und:.4g})"
        logger.warning("KTO: %d desirable and %d undesirable example(s)%s with desirable_weight %.3g and "
                       "undesirable_weight %.3g weigh %.2f : 1; the KTO paper (and TRL) keep this in [1, 4/3]: e.g. "
                       "method.desirable_weight=%.3g", n_des, n_und, weighed, desirable_weight, undesirable_weight,
                       ratio, undesirable_weight * w_und / w_des * (1.0 if ratio < 1 else 4 / 3))
    return n_des, n_und


def check_kl_batches(dataset: Any, batch_size: int, world_size: int, drop_last: bool, key: str, what: str) -> None:
    """KTO's KL pairs need >= 2 examples in every batch: a batch size of 1, or (one process, no drop_last) a dataset
    whose last batch holds 1 example, would stop the run at that batch (an epoch's end, or the evaluation after
    hours of training). Refused before anything is written. Several processes: accelerate fills the last batches
    (even_batches), so only the batch size counts."""
    if dataset is None:
        return
    if batch_size < 2:
        raise ConfigError(f"train.{key}={batch_size}: KTO estimates its KL reference point from mismatched pairs "
                          f"within a batch, which needs >= 2 examples; set train.{key}=2 or more (lower "
                          "train.gradient_accumulation_steps to keep the global batch)")
    n = len(dataset)
    if world_size == 1 and not drop_last and n % batch_size == 1:
        raise ConfigError(f"train.{key}={batch_size}: {n} {what} example(s) leave a last batch of 1, which has no "
                          "mismatched pair for KTO's KL estimate (the run would stop at that batch); set "
                          f"train.dataloader_drop_last=true, or a train.{key} that leaves 0 or >= 2")


class KTOTrainer(HasReference, SyncsReference, AlignTrainer):
    """Unpaired preference trainer for any adapter kind (KTO by default)."""

    record_kinds = ("unpaired",)
    trl_learning_rate = ("KTOConfig", 1e-6)

    def __init__(self, model: nn.Module, args: Any, *, loss_type: str = "kto", beta: float = 0.1,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, reference: str = "auto",
                 ref_model: nn.Module | None = None, chunk_size: int = 1024, disable_dropout: bool = True,
                 ref_sync: Any = None, **kwargs: Any) -> None:
        UNPAIRED_LOSSES[loss_type]
        check_signs("KTOTrainer", beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        self.loss_type, self.beta, self.chunk_size = loss_type, beta, chunk_size
        self.reads_kl = loss_type in KL_LOSSES  # else no mismatched pairs are scored (no kl logged)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        # its KL pairs depend on how batches are drawn, so they cannot be precomputed
        self.reference: Reference = build_reference(model, reference, ref_model=ref_model, chunk_size=chunk_size,
                                                    supports=("adapter_off", "copy"), owner="KTOTrainer")
        ref_sync = as_ref_sync(ref_sync)  # TR-DPO's syncing, as PreferenceTrainer's (alignkit.trainers.ref_sync)
        check_ref_sync(ref_sync, self.reference.mode, model, ref_model, "KTOTrainer")
        super().__init__(model, args, disable_dropout=disable_dropout, **kwargs)
        a = self.args
        if self.reads_kl:
            check_kl_batches(self.train_dataset, a.per_device_train_batch_size, a.world_size, a.dataloader_drop_last,
                             "per_device_train_batch_size", "training")
        if self.reads_kl and (a.eval_strategy != "no" or self.eval_dataset is not None):
            check_kl_batches(self.eval_dataset, a.per_device_eval_batch_size, a.world_size, a.dataloader_drop_last,
                             "per_device_eval_batch_size", "evaluation")
        check_label_balance(self.train_dataset, desirable_weight, undesirable_weight)
        self._check_best_metric_side()
        self.reference.place(self.args.device, self.accelerator, disable_dropout=disable_dropout)
        self.setup_ref_sync(ref_sync)

    PER_SIDE = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")  # logged as <name>_sum / count

    def objective_settings(self) -> dict[str, Any]:
        return {"loss_type": self.loss_type}

    def training_settings(self) -> dict[str, Any]:
        return {**super().training_settings(), "loss_type": self.loss_type, "beta": self.beta,
                "desirable_weight": self.desirable_weight, "undesirable_weight": self.undesirable_weight}

    @classmethod
    def loss_scale(cls, **_: Any) -> str | None:
        return "method.beta"

    @classmethod
    def objective_metrics(cls, loss_type: str = "kto", **_: Any) -> tuple[str, ...]:
        """`metric_totals`' names: `kl` only for a loss that reads z_ref (`KL_LOSSES`). An evaluation whose examples
        are all of one side (desirable or not) has no count for the other, and does not log that side's two
        metrics."""
        return (*cls.PER_SIDE, "kl") if loss_type in KL_LOSSES else cls.PER_SIDE

    def _check_best_metric_side(self) -> None:
        """A metric_for_best_model of one side (rewards/chosen, logps/rejected, ...) with an evaluation set that has
        no example of that side: it is never logged (no count), and transformers would stop the run at the first
        evaluation with a KeyError. Refused when built."""
        name = self.args.metric_for_best_model
        metric = str(name or "").removeprefix("eval_")
        counts = label_counts(self.eval_dataset) if metric in self.PER_SIDE else None
        if counts is None:
            return
        chosen = metric.endswith("/chosen")
        if counts[0 if chosen else 1] == 0:
            side = "desirable" if chosen else "undesirable"
            raise ConfigError(f"metric_for_best_model: {name!r} averages over the {side} evaluation examples, and the "
                              f"evaluation set ({sum(counts)} examples) has none, so it is never logged and the first "
                              "evaluation would stop the run (transformers' KeyError); choose a metric of the other "
                              f"side, loss or kl, or evaluate on examples of both kinds")

    def metric_totals(self, metrics: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """KTO's metrics come as sums with counts: log rewards/chosen = rewards/chosen_sum / count/chosen etc."""
        out = {}
        for name in self.PER_SIDE:
            side = name.split("/")[1]
            out[name] = (metrics[f"{name}_sum"].float(), metrics[f"count/{side}"].float())
        if self.reads_kl:  # else the loss got 0 for z_ref: not a KL, not logged
            kl = metrics["kl"].float()
            out["kl"] = (kl, torch.ones_like(kl))
        return out

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        if "label" not in inputs:
            raise ValueError("KTOTrainer needs a boolean `label` per example (desirable or not): tokenize "
                             "UnpairedRecord data and collate with SFTCollator")
        if self.reads_kl and inputs["input_ids"].shape[0] < 2:
            raise ValueError("KTOTrainer needs at least 2 examples per batch to form mismatched KL pairs")
        policy, _ = completion_logps(model, inputs, self.chunk_size)  # (B,)
        unwrapped = self.accelerator.unwrap_model(model)
        ref = self.reference.logps(unwrapped, inputs)  # (B,)
        kl = self.kl_estimate(model, inputs) if self.reads_kl else policy.new_zeros(())
        return UNPAIRED_LOSSES[self.loss_type](policy, ref, inputs["label"].bool(), kl, beta=self.beta,
                                               desirable_weight=self.desirable_weight,
                                               undesirable_weight=self.undesirable_weight)

    def evaluation_loop(self, dataloader: Any, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's, with z_ref estimated once over the whole evaluation set first (`eval_kl`) and used by every
        evaluation batch: each batch's own mismatched pairs made eval_loss and kl depend on
        per_device_eval_batch_size."""
        self._eval_kl = self.eval_kl(dataloader) if self.reads_kl else None
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self._eval_kl = None

    @torch.no_grad()
    def eval_kl(self, dataloader: Any) -> Tensor:
        """z_ref of an evaluation set: the mean policy-minus-reference log-ratio of its mismatched pairs, example i's
        prompt with example i-1's completion in the set's order (cyclic; each process's share of the set, summed
        over processes), clamped at 0: the same pairs whatever the batch size. Scored per eval batch size."""
        rows = [r for batch in dataloader for r in unpadded_rows(batch)]
        model, size = self.model, max(int(self.args.per_device_eval_batch_size), 1)
        total = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # sum of log-ratios, pairs
        was = model.training
        model.eval()
        try:
            for s in range(0, len(rows), size):
                chunk = [rows[(s - 1) % len(rows)], *rows[s:s + size]]  # the partner of the chunk's first row
                kl_batch = {k: v[1:].to(self.args.device) for k, v in mismatched_batch(rows_batch(chunk)).items()}
                with self.compute_loss_context_manager():
                    policy_kl, _ = completion_logps(model, kl_batch, self.chunk_size)  # (b,)
                    ref_kl = self.reference.logps(self.accelerator.unwrap_model(model), kl_batch)  # (b,)
                total += torch.stack([(policy_kl - ref_kl).double().sum(), total.new_tensor(len(policy_kl))])
        finally:
            model.train(was)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1].clamp(min=1)).float().clamp(min=0)

    def kl_estimate(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """z_ref of the batch: the mismatched pairs' mean policy-minus-reference log-ratio (over every process),
        clamped at 0, without gradient; in an evaluation the whole set's (`evaluation_loop`)."""
        if getattr(self, "_eval_kl", None) is not None:
            return self._eval_kl.to(inputs["input_ids"].device)
        kl_batch = mismatched_batch(inputs)
        with torch.no_grad():
            policy_kl, _ = completion_logps(model, kl_batch, self.chunk_size)  # (B,)
        ref_kl = self.reference.logps(self.accelerator.unwrap_model(model), kl_batch)  # (B,)
        kl = (policy_kl - ref_kl).mean().detach()
        if self.args.world_size > 1:
            kl = self.accelerator.gather(kl.reshape(1)).mean()
        return kl.clamp(min=0)


__all__ = ["KTOTrainer", "mismatched_batch"]
