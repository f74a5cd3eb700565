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
length limits are dropped (logged once per dataset, one line per reason with a count and the first records,
from the map's output, so also with `num_proc` and on a cache hit); the reader's own warnings (columns it does not
read, message keys it drops, an optional column given in some rows only) are said once per dataset the same way,
judged over all its rows, as for a file read whole. A reader registered `whole` (its records join rows from anywhere:
Open-Assistant's flat export) gets the dataset in one batch, one process. Preference pairs whose chosen and rejected
token ids are the same once cut to the length limits (or given the same text) are said in one warning, and refused when
every pair is such (`say_identical`: the CLI's rule, `alignkit.cli.data.check_cut_identical`). Already tokenized data
(`input_ids` / `chosen_input_ids` / `prompt_input_ids` columns) is returned unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from datasets import Dataset, DatasetDict, Features, List, Value

from alignkit.data.oasst import say_oasst_notes
from alignkit.data.readers import READERS, detect_reader, first_row, load_records
from alignkit.data.readers.notes import ReaderNotes, held_reader_notes
from alignkit.data.readers.rows import NamedRows
from alignkit.data.records import RECORD_CLASSES, DataError, can_convert, convert
from alignkit.data.tokenize import (
    TokenizeConfig, TokenizeStats, Unfit, records_batch, tokenize_record, tokenize_records,
)
from alignkit.data.tokenize_cache import code_fingerprint, formatters_fingerprint, function_fingerprint, sha

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


# per-record columns the map adds (removed before the dataset is returned): why it was dropped ("" kept), how many
# of its sequences were truncated, the roles of messages the formatter did not render ("" none), and on the first
# record of each map batch what the reader would have said about the batch's rows (ReaderNotes.to_json; "" none:
# ignored columns, dropped message keys, the rows giving each optional column, rows skipped as invalid, the OASST
# reader's counts; a batch that gives no record writes one NOTES_ONLY row to carry them). Every
# record gets a row (dropped ones with None features), so the dataset's summary is read from the map's output: the
# same with num_proc workers and with datasets' cache (where the batch function does not run at all).
DROP, PROMPT_CUT, COMPLETION_CUT, UNRENDERED, READER_NOTES = "_alignkit_drop", "_alignkit_prompt_cut", \
    "_alignkit_completion_cut", "_alignkit_unrendered", "_alignkit_reader_notes"
IDENTICAL = "_alignkit_identical"  # 1: a kept pair whose chosen and rejected token ids are the same (`say_identical`)
EMPTY_CONTEXT = "_alignkit_empty_context"  # the roles of a record's empty system / tool messages ("" none)
NOTE_COLUMNS = (DROP, PROMPT_CUT, COMPLETION_CUT, UNRENDERED, READER_NOTES, IDENTICAL, EMPTY_CONTEXT)
# the DROP of the row a map batch that gives no record writes to carry its reader notes: no record, not counted
NOTES_ONLY = "\x00reader notes only"


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, cfg: TokenizeConfig, kind: str,
                    reader: str, name: str, options: dict, code: str = "") -> dict[str, list]:
    """The map's function; `code` is not read: it is there for datasets' cache key (`feature_code`)."""
    keys = list(batch)
    rows = NamedRows(({k: batch[k][j] for k in keys}, f"{name} row {i}") for j, i in enumerate(indices))
    with held_reader_notes() as notes:  # said once per dataset (_summarize), not once per batch
        records = load_records(rows, kind, reader=reader, **options)
    out: dict[str, list] = {k: [] for k in (*FEATURE_KEYS[kind], *NOTE_COLUMNS)}
    out[READER_NOTES] = [notes.to_json() if notes and not j else "" for j in range(len(records))]
    if notes and not records:  # a row of its own carries them (e.g. an OASST batch whose trees are all filtered out)
        out = {k: [None] for k in out} | {DROP: [NOTES_ONLY], PROMPT_CUT: [0], COMPLETION_CUT: [0], UNRENDERED: [""],
                                         READER_NOTES: [notes.to_json()], IDENTICAL: [0], EMPTY_CONTEXT: [""]}
    with records_batch(tokenizer):  # the appended EOS resolved once per map batch, not once per encoding
        for r in records:
            one = TokenizeStats(total=1)
            try:
                f, drop = tokenize_record(r, tokenizer, cfg, one), ""
            except Unfit as e:
                f, drop = {"id": r.id}, e.reason
            for k in FEATURE_KEYS[kind]:
                out[k].append(f.get(k))
            out[DROP].append(drop)
            out[PROMPT_CUT].append(one.prompt_truncated)
            out[COMPLETION_CUT].append(one.completion_truncated)
            out[UNRENDERED].append(",".join(one.unrendered_roles) if one.system_unrendered else "")
            out[IDENTICAL].append(int(is_identical_pair(f)))
            out[EMPTY_CONTEXT].append(",".join(one.empty_context_roles))
    return out


def is_identical_pair(feature: dict) -> bool:
    """A preference feature whose chosen and rejected token ids are the same: the same text, or texts that differ
    only past the length limits."""
    return feature.get("chosen_input_ids") is not None and \
        list(feature["chosen_input_ids"]) == list(feature["rejected_input_ids"])


def say_identical(name: str, identical: list[str], kept: int, cfg: TokenizeConfig) -> None:
    """The pairs (`identical`: their ids) whose chosen == rejected once tokenized and cut, of `kept` pairs: their loss
    has no gradient (no preference signal), they only dilute the batch: a warning; all of them, a DataError (the run
    would learn nothing). The CLI says the same (alignkit.cli.data.check_cut_identical)."""
    if not identical:
        return
    limits = f"max_length={cfg.max_length} / max_prompt_length={cfg.max_prompt_length}"
    if len(identical) == kept:
        raise DataError(f"{name}: every one of the {kept} pair(s) has chosen == rejected once tokenized and cut to "
                        f"{limits} (e.g. {identical[:3]}): nothing is left to prefer; raise max_length, or fix the "
                        f"pairs (chosen / rejected given the same text?)")
    logger.warning("%s: %d of %d pair(s) have chosen == rejected once tokenized and cut to %s (no preference signal: "
                   "they only dilute the batch), e.g. %s; raise max_length, or drop those pairs", name,
                   len(identical), kept, limits, identical[:3])


# the modules besides tokenize_cache.FEATURE_MODULES whose source decides a trainer's features: the readers, this one
MAP_MODULES = ("alignkit.data.readers", "alignkit.data.readers.columns", "alignkit.data.readers.rows",
               "alignkit.data.readers.notes", __name__)


def feature_code(reader_fn: Any) -> str:
    """The code the map's features depend on (the encoding and formatters: `tokenize_cache`; every registered
    formatter; the readers, `reader_fn` included; this module), hashed into `fn_kwargs` for datasets' map cache
    (compat D6): datasets hashes the map's function and `fn_kwargs`, and what that function calls by reference only,
    so a cache written before alignkit changed (an upgrade) or a registered formatter changed was read back with the
    old features."""
    return sha(code_fingerprint(), formatters_fingerprint(), function_fingerprint(reader_fn),
               code_fingerprint(MAP_MODULES))


def _int(bits: int = 64) -> Value:
    return Value(f"int{bits}")


def _ids(depth: int = 1, bits: int = 64) -> List:
    return List(_ids(depth - 1, bits)) if depth > 1 else List(_int(bits))


# the type of each feature `tokenize_record` gives (alignkit.data.tokenize's docstring: lists of ids and 0/1 masks,
# int lengths, a float weight, a float or None margin, a bool label, int ranks, a str id), as datasets infers it from
# kept rows: ints as int64, except in a column named `input_ids`, which datasets stores as int32 (its column-name
# optimisation, compat row D4); a ranked record's input_ids / completion_mask are lists of sequences. Fresh objects
# on every call: datasets hashes `features=` into the map's fingerprint (its cache file name), and a pickled object
# used twice is written as a back-reference, so shared objects would hash otherwise than the inferred features did.
FEATURE_TYPES = {
    "input_ids": lambda depth=1: _ids(depth, 32), "completion_mask": _ids, "chosen_input_ids": _ids,
    "chosen_completion_mask": _ids, "rejected_input_ids": _ids, "rejected_completion_mask": _ids, "ranks": _ids,
    "prompt_length": _int, "length": _int, "weight": lambda: Value("float64"), "margin": lambda: Value("float64"),
    "label": lambda: Value("bool"), "id": lambda: Value("string"),
    DROP: lambda: Value("string"), PROMPT_CUT: _int, COMPLETION_CUT: _int, UNRENDERED: lambda: Value("string"),
    READER_NOTES: lambda: Value("string"), IDENTICAL: _int, EMPTY_CONTEXT: lambda: Value("string"),
}


def map_features(kind: str) -> Features:
    """The features of the map's output for records of `kind` (FEATURE_KEYS, then the note columns), declared from
    what `tokenize_record` gives. Before, they were inferred from the first 64 rows tokenized once more (and more
    rows when all 64 were dropped: a first batch of None features would type its columns as null), so those rows
    were tokenized twice."""
    nested = {"input_ids", "completion_mask"} if kind == "ranked" else set()
    return Features({k: FEATURE_TYPES[k](2) if k in nested else FEATURE_TYPES[k]()
                     for k in (*FEATURE_KEYS[kind], *NOTE_COLUMNS)})


def _summarize(out: Any, name: str) -> tuple[list[int], TokenizeStats]:
    """(the rows of the map's output `out` that were kept, the dataset's `TokenizeStats`: its records, kept and
    dropped counted from the map's output, so the true ones with num_proc workers and on a cache hit). The dataset's
    `TokenizeStats`, from its note columns, are logged as one line per kind of warning (the reader's, from its batches'
    notes merged: ignored columns, dropped message keys, an optional column given in some rows only; each reason records
    were dropped for, messages not rendered) with its count and first records, and the totals (info; with the records
    holding an empty system / tool message, kept)."""
    column = {k: out.data.column(k).to_pylist() for k in (*NOTE_COLUMNS, "id")}  # the map's own table: no indices
    notes = ReaderNotes()
    for note in filter(None, column[READER_NOTES]):  # in row order, with num_proc too: the first rows come first
        notes.merge(ReaderNotes.from_json(note))
    notes.warn(name)
    if notes.oasst is not None:
        say_oasst_notes(name, notes.oasst)
    ids, keep = column["id"], [i for i, reason in enumerate(column[DROP]) if not reason]
    kept = len(keep)
    stats = TokenizeStats(total=len(ids) - column[DROP].count(NOTES_ONLY), kept=kept,
                          prompt_truncated=sum(column[PROMPT_CUT]), completion_truncated=sum(column[COMPLETION_CUT]))
    for i, reason in enumerate(column[DROP]):
        if reason and reason != NOTES_ONLY:
            stats.drop(reason, ids[i])
    for i, roles in enumerate(column[UNRENDERED]):
        if roles:
            stats.note_system_unrendered(ids[i], roles.split(","))
    for i, roles in enumerate(column[EMPTY_CONTEXT]):
        if roles:
            stats.note_empty_context(ids[i], roles.split(","))
    for reason, n in stats.dropped.items():
        logger.warning("%s: %s of %s record(s) dropped (%s) (first: %s)", name, f"{n:,}", f"{stats.total:,}", reason,
                       ", ".join(stats.dropped_ids[reason]))
    if stats.system_unrendered:
        roles = " or ".join(stats.unrendered_roles) or "system"
        logger.warning("%s: %s of %s record(s) have a %s message the formatter (data.formatter: the chat template) "
                       "does not render, so the model never reads it (first: %s): fold it into the first user message "
                       "(a tool's result: into a user message after the call), or use a template that renders %s "
                       "messages",
                       name, f"{stats.system_unrendered:,}", f"{stats.total:,}", roles,
                       ", ".join(stats.system_unrendered_ids), roles)
    logger.info("%s: tokenized %s/%s record(s); prompt truncated: %d, completion truncated: %d%s", name, f"{kept:,}",
                f"{stats.total:,}", stats.prompt_truncated, stats.completion_truncated,
                f"; {stats.empty_context_note()}" if stats.empty_context else "")
    return keep, stats


def check_dropped(stats: TokenizeStats, cfg: TokenizeConfig, name: str, keys: str = "",
                  error: type[Exception] = DataError) -> None:
    """The records the length limits dropped (`stats`): over `cfg.max_dropped_fraction` of them an `error` in one line
    (the run would train on the short minority the limits let through), else, when any, one warning with the count,
    the total, the share, the limits, the setting and the fix (once per dataset prepared, beside the tokenizer's
    per-reason warnings). `keys` prefixes the settings' names: "data." in the CLI (its data section), "" for a trainer
    built in Python (its arguments). The one rule and wording of both (`prepare_dataset` and
    alignkit.cli.data.tokenize call it)."""
    dropped = stats.total - stats.kept
    if not dropped:
        return
    share = dropped / stats.total
    what = (f"{name}: the length limits ({keys}max_length={cfg.max_length}, {keys}max_prompt_length="
            f"{cfg.max_prompt_length}) drop {dropped:,} of {stats.total:,} record(s) ({share:.0%}: "
            f"{', '.join(f'{n:,} {reason}' for reason, n in stats.dropped.items())}, e.g. "
            f"{next(iter(stats.dropped_ids.values()), [])[:3]})")
    if share > cfg.max_dropped_fraction:
        raise error(f"{what}, over {keys}max_dropped_fraction={cfg.max_dropped_fraction}: the run would train on the "
                    f"short records only; raise {keys}max_length (or {keys}max_prompt_length), or set "
                    f"{keys}max_dropped_fraction=1 to train on what is left")
    logger.warning("%s, within %smax_dropped_fraction=%s (over it the run stops); raise %smax_length (or "
                   "%smax_prompt_length) to keep them", what, keys, cfg.max_dropped_fraction, keys, keys)


def all_dropped(name: str, cfg: TokenizeConfig) -> DataError:
    """The error of a dataset whose every record the length limits dropped (the warning before it says why)."""
    return DataError(f"{name}: every record was dropped by the length limits (max_length={cfg.max_length}, "
                     f"max_prompt_length={cfg.max_prompt_length}; the warning above names why); raise max_length, or "
                     f"set max_prompt_length below it (a longer prompt is then cut from its start, not dropped)")


def prepare_dataset(dataset: Any, tokenizer: Any, kinds: Sequence[str], cfg: TokenizeConfig | None = None, *,
                    num_proc: int | None = None, reader: str | None = None, name: str = "train_dataset",
                    reader_options: dict | None = None) -> tuple[Any, str]:
    """(tokenized dataset, record kind) from raw rows or records; see the module docstring. `kinds` are the
    record kinds the trainer takes, preferred first (the reward trainer takes "preference" or "ranked")."""
    cfg = cfg if cfg is not None else TokenizeConfig()  # loss_on and the length limits checked when it was built
    if is_tokenized(dataset):
        first = dataset[0] if len(dataset) else {}
        return dataset, feature_kind(first)
    if isinstance(dataset, DatasetDict):  # its splits' rows are not one dataset: which split was meant is not said
        raise DataError(f"{name}: a DatasetDict with splits {list(dataset)}, and a trainer takes one split; pass "
                        f"{name}=dataset[{next(iter(dataset), 'train')!r}] (or the split meant)")
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, tuple(RECORD_CLASSES.values()))
                                                              for r in dataset):
        kind = _pick_kind(sorted({r.kind for r in dataset}), kinds, name)

        feats, stats = tokenize_records(convert(list(dataset), kind), tokenizer, cfg)  # it warns of what it drops
        if not feats:  # as rows dropped alike (below); before, an empty list went on to the trainer
            raise all_dropped(name, cfg)
        check_dropped(stats, cfg, name)
        say_identical(name, [f["id"] for f in feats if is_identical_pair(f)], len(feats), cfg)
        return feats, kind
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise DataError(f"{name}: empty; pass at least one row")
        if not all(isinstance(r, dict) for r in dataset):
            raise DataError(f"{name}: a list must hold dicts (rows with TRL's columns) or alignkit records")
        # every row given every key (None where it has none): Dataset.from_list takes its columns from the first
        # row's keys and drops the others without a word (compat D5), e.g. a weight given from row 1 on
        keys = list(dict.fromkeys(k for r in dataset for k in r))
        dataset = Dataset.from_list([{k: r.get(k) for k in keys} for r in dataset])
    if not hasattr(dataset, "map") or not hasattr(dataset, "column_names"):
        raise DataError(f"{name}: cannot tokenize a {type(dataset).__name__}; pass a datasets.Dataset, a list of "
                        f"dicts with TRL's columns, or alignkit records")
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset has no rows")
    row, _ = first_row(dataset)
    info = READERS[reader] if reader is not None else detect_reader(row, f"{name} row 0")
    kind = _pick_kind(info.kinds, kinds, name)
    n = len(dataset)
    # the threshold left out of the map's cache key (datasets hashes fn_kwargs): it does not change the features
    features_cfg = dataclasses.replace(cfg, max_dropped_fraction=TokenizeConfig.max_dropped_fraction)
    fn_kwargs = {"tokenizer": tokenizer, "cfg": features_cfg, "kind": kind, "reader": info.name, "name": name,
                 "options": dict(reader_options or {}), "code": feature_code(info.fn)}
    batch_size = 1000  # datasets' default
    if info.whole:  # e.g. a tree's messages anywhere in the rows: read in one batch, one process
        if num_proc not in (None, 1):
            logger.warning("%s: reader %r joins rows from anywhere in the dataset (a tree's messages), so the rows are "
                           "read in one batch by one process: num_proc=%s is not used for it", name, info.name,
                           num_proc)
        batch_size, num_proc = None, None
    out = dataset.map(_tokenize_batch, batched=True, batch_size=batch_size, with_indices=True,
                      remove_columns=dataset.column_names, num_proc=num_proc, desc=f"Tokenizing {name}",
                      features=map_features(kind), fn_kwargs=fn_kwargs)
    keep, stats = _summarize(out, name)  # it warns of what was dropped, per reason
    say_identical(name, [i for i, same in zip(out.data.column("id").to_pylist(), out.data.column(IDENTICAL).to_pylist())
                         if same], len(keep), cfg)
    out = out.remove_columns(list(NOTE_COLUMNS))
    out = out.select(keep) if len(keep) < len(out) else out
    if len(out) == 0 and stats.total == 0:  # the reader's filters (e.g. OASST langs / tree states) kept nothing
        raise DataError(f"{name}: reader {info.name!r} gave no record from its {n} row(s) (see the warnings above); "
                        "check the rows and the reader's options (reader_options)")
    if len(out) == 0:
        raise all_dropped(name, cfg)
    check_dropped(stats, cfg, name)
    logger.info("%s: %d row(s) -> %d tokenized %s example(s) (reader %r, loss_on=%s)", name, n, len(out), kind,
                info.name, cfg.loss_on)
    return out, kind


__all__ = ["FEATURE_KEYS", "check_dropped", "feature_kind", "is_tokenized", "prepare_dataset"]
