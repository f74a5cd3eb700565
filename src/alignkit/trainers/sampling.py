"""`BatchSampling`: `AlignTrainer`'s overrides of how the `transformers.Trainer` forms its batches.

Length-aware batching: `group_by_length=True` (or `train_sampling_strategy="group_by_length"`) draws training
batches with `alignkit.data.batching.LengthGroupedSampler` (similar lengths together, still random), by the
length of the rows the model runs (`share_prompt`: the shared rows). Under `train_sampling_strategy=
"group_by_length"` the Trainer would length-group evaluation batches too, from an `input_ids` column that
preference / ranked features do not have: evaluation uses our lengths as well.

Record ids: training batches also carry the ids of the records collated into them (`RECORD_IDS`), which the
non-finite guard names; `AlignTrainer` pops them before the objective.

A mixin, not a trainer: `AlignTrainer(BatchSampling, Trainer)` is the one trainer class, and
`alignkit.compat.check_trainer` checks these overrides with the trainer's own.
"""

from __future__ import annotations

from typing import Any

from alignkit.data.batching import LengthGroupedSampler, example_length

RECORD_IDS = "record_ids"  # batch key: the ids of the records collated into it (popped before the objective)


class KeepRecordIds:
    """Collator wrapper: the batch also carries the ids of its records (features' "id"), for error messages."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list) -> Any:
        batch = self.inner(features)
        if isinstance(batch, dict) and features and isinstance(features[0], dict) and "id" in features[0]:
            batch[RECORD_IDS] = [str(f.get("id", "")) for f in features]
        return batch


def data_seed(args: Any) -> int:
    """The seed of the data order: `data_seed`, or `seed` when it is None (as the Trainer reads them; `data_seed=0`
    is a seed, not "unset")."""
    return args.seed if args.data_seed is None else args.data_seed


class BatchSampling:
    """The Trainer's `_get_dataloader`, `_get_train_sampler`, `_get_eval_sampler`, overridden (see the module
    docstring). Reads `self.group_by_length` (set by `AlignTrainer.__init__`) and `self.share_prompt` if any."""

    def _get_dataloader(self, dataset: Any, description: str, batch_size: int, sampler_fn: Any = None,
                        is_training: bool = False, dataloader_key: str | None = None) -> Any:
        inner = self.data_collator
        if is_training and inner is not None:
            self.data_collator = KeepRecordIds(inner)  # only for this loader; `data_collator` stays the user's
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn=sampler_fn,
                                           is_training=is_training, dataloader_key=dataloader_key)
        finally:
            self.data_collator = inner

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        """Under `train_sampling_strategy="group_by_length"` the Trainer length-groups evaluation batches too, from
        an `input_ids` column that preference / ranked features do not have (it raised): our lengths instead."""
        if getattr(self.args, "train_sampling_strategy", None) != "group_by_length" or eval_dataset is None \
                or not hasattr(eval_dataset, "__len__"):
            return super()._get_eval_sampler(eval_dataset)
        lengths = [example_length(eval_dataset[i]) for i in range(len(eval_dataset))]
        return LengthGroupedSampler(lengths, self.args.eval_batch_size, seed=data_seed(self.args))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """`LengthGroupedSampler` over our tokenized examples when `group_by_length`; else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        shared = bool(getattr(self, "share_prompt", False))  # group by the length of the rows the model runs
        lengths = [example_length(dataset[i], shared) for i in range(len(dataset))]
        return LengthGroupedSampler(lengths, self.args.train_batch_size, seed=data_seed(self.args))


__all__ = ["RECORD_IDS", "BatchSampling", "KeepRecordIds", "data_seed"]
