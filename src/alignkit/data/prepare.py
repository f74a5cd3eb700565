"""Raw rows -> tokenized features inside the trainers, TRL-style: pass a dataset and a tokenizer.

    trainer = SFTTrainer(model, args, train_dataset=Dataset.from_list([{"messages": [...]}, ...]),
                         processing_class=tokenizer)

`prepare_dataset` takes what a TRL user passes as `train_dataset` / `eval_dataset`: a `datasets.Dataset`
with TRL's columns (messages; prompt/completion; prompt/chosen/rejected; chosen/rejected; prompt/
completion/label; or any registered reader's columns), a list of such dicts, or a list of alignkit records.
The reader is detected once from the first row (`alignkit.data.readers`), its records converted to the
trainer's kind, and tokenized with `alignkit.data.tokenize` under one `TokenizeConfig`.

A `datasets.Dataset` is tokenized with `Dataset.map` (batched, with a progress bar, `num_proc` worker
processes, and datasets' own cache when the dataset comes from files: a second run with the same data,
tokenizer and settings loads the cached result instead of tokenizing again). Rows that do not fit the
length limits are dropped (logged with a count, as `tokenize_records` does). Already tokenized data
(`input_ids` / `chosen_input_ids` / `prompt_input_ids` columns) is returned unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from datasets import Dataset

from alignkit.data.readers import READERS, detect_reader, first_row, load_records
from alignkit.data.readers.rows import NamedRows
from alignkit.data.records import RECORD_CLASSES, DataError, can_convert, convert
from alignkit.data.tokenize import TokenizeConfig, TokenizeStats, Unfit, tokenize_record, tokenize_records

logger = logging.getLogger(__name__)

TOKENIZED_KEYS = ("input_ids", "chosen_input_ids", "prompt_input_ids")
FEATURE_KEYS = {
    "sft": ("input_ids", "completion_mask", "prompt_length", "length", "weight", "id"),
    "unpaired": ("input_ids", "completion_mask", "prompt_length", "length", "weight", "id", "label"),
    "preference": ("chosen_input_ids", "chosen_completion_mask", "rejected_input_ids", "rejected_completion_mask",
                   "prompt_length", "length", "margin", "weight", "id"),
    "ranked": ("input_ids", "completion_mask", "ranks", "prompt_length", "length", "weight", "id"),
}


def _columns(dataset: Any) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    if isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], dict):
        return list(dataset[0])
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, (str, dict)) \
            and len(dataset):
        first = dataset[0]  # a map-style (torch) dataset of feature dicts, e.g. data.reft_data's
        return list(first) if isinstance(first, dict) else []
    return []


def is_tokenized(dataset: Any) -> bool:
    """True when `dataset` already holds features (token ids), not raw rows or records."""
    return any(k in _columns(dataset) for k in TOKENIZED_KEYS)


def feature_kind(example: dict) -> str:
    """The record kind a tokenized example came from (for the default collator)."""
    if "chosen_input_ids" in example:
        return "preference"
    if "prompt_input_ids" in example:
        return "prompt"
    ids = example.get("input_ids")
    if ids is not None and len(ids) and isinstance(ids[0], (list, tuple)):
        return "ranked"
    return "unpaired" if "label" in example else "sft"


def _pick_kind(native: Sequence[str], kinds: Sequence[str], where: str) -> str:
    for k in kinds:
        if k in native:
            return k
    for k in kinds:
        if any(can_convert(n, k) for n in native):
            return k
    raise DataError(f"{where}: its rows give {'/'.join(native)} records, and this trainer needs "
                    f"{' or '.join(kinds)}; pass data with the trainer's columns (e.g. prompt/chosen/rejected for DPO)")


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, cfg: TokenizeConfig, kind: str,
                    reader: str, name: str, options: dict) -> dict[str, list]:
    keys = list(batch)
    rows = NamedRows(({k: batch[k][j] for k in keys}, f"{name} row {i}") for j, i in enumerate(indices))
    records = load_records(rows, kind, reader=reader, **options)
    out: dict[str, list] = {k: [] for k in FEATURE_KEYS[kind]}
    stats = TokenizeStats(total=len(records))
    for r in records:
        try:
            f = tokenize_record(r, tokenizer, cfg, stats)
        except Unfit as e:
            stats.drop(e.reason, r.id)
            continue
        for k in out:
            out[k].append(f[k])
    if stats.warns:
        logger.warning("%s: %s", name, stats.summary())
    return out


def prepare_dataset(dataset: Any, tokenizer: Any, kinds: Sequence[str], cfg: TokenizeConfig | None = None, *,
                    num_proc: int | None = None, reader: str | None = None, name: str = "train_dataset",
                    reader_options: dict | None = None) -> tuple[Any, str]:
    """(tokenized dataset, record kind) from raw rows or records; see the module docstring. `kinds` are the
    record kinds the trainer takes, preferred first (the reward trainer takes "preference" or "ranked")."""
    cfg = cfg if cfg is not None else TokenizeConfig()  # loss_on and the length limits checked when it was built
    if is_tokenized(dataset):
        first = dataset[0] if len(dataset) else {}
        return dataset, feature_kind(first)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, tuple(RECORD_CLASSES.values()))
                                                              for r in dataset):
        kind = _pick_kind(sorted({r.kind for r in dataset}), kinds, name)

        feats, _ = tokenize_records(convert(list(dataset), kind), tokenizer, cfg)
        return feats, kind
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise DataError(f"{name}: empty; pass at least one row")
        if not all(isinstance(r, dict) for r in dataset):
            raise DataError(f"{name}: a list must hold dicts (rows with TRL's columns) or alignkit records")
        dataset = Dataset.from_list(list(dataset))
    if not hasattr(dataset, "map") or not hasattr(dataset, "column_names"):
        raise DataError(f"{name}: cannot tokenize a {type(dataset).__name__}; pass a datasets.Dataset, a list of "
                        f"dicts with TRL's columns, or alignkit records")
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset has no rows")
    row, _ = first_row(dataset)
    info = READERS[reader] if reader is not None else detect_reader(row, f"{name} row 0")
    kind = _pick_kind(info.kinds, kinds, name)
    n = len(dataset)
    out = dataset.map(_tokenize_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                      num_proc=num_proc, desc=f"Tokenizing {name}",
                      fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "kind": kind, "reader": info.name,
                                 "name": name, "options": dict(reader_options or {})})
    if len(out) == 0:
        raise DataError(f"{name}: every row was dropped by the length limits (max_length={cfg.max_length}); raise "
                        f"max_length")
    logger.info("%s: %d row(s) -> %d tokenized %s example(s) (reader %r, loss_on=%s)", name, n, len(out), kind,
                info.name, cfg.loss_on)
    return out, kind


__all__ = ["FEATURE_KEYS", "feature_kind", "is_tokenized", "prepare_dataset"]
