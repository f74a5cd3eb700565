"""A command's data: `data.path` resolved (a file or folder, or `bundled:<path>` for a file shipped in
`alignkit/resources/`, e.g. `bundled:data/hh_rlhf_sample.jsonl`), read, split, checked and tokenized (with the
on-disk tokenization cache)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

from alignkit.data import PreferenceRecord, RankedRecord, TokenizeConfig, load_records, split_records, tokenize_records
from alignkit.data.oasst import emptied_reads
from alignkit.data.prepare import check_dropped as drop_share
from alignkit.data.readers import check_options, native_kind, reader_of
from alignkit.data.readers.rows import (NamedRows, dataset_data_files, first_row, has_splits, is_saved_dataset,
                                        looks_like_hub_id, parquet_error)
from alignkit.data.splits import source_group
from alignkit.data.records import TRAINING_META, DataError
from alignkit.settings import ONLINE_COMMANDS, TRAIN_COMMANDS, ConfigError, DataSettings

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"


def data_path(path: str) -> str:
    if path.startswith(BUNDLED_PREFIX):
        resolved = Path(str(files("alignkit") / "resources" / path[len(BUNDLED_PREFIX):]))
        if not resolved.exists():
            raise ConfigError(f"{path}: no such bundled file (looked in {resolved})")
        return str(resolved)

    if not Path(path).exists() and not looks_like_hub_id(path):
        raise FileNotFoundError(f"{path}: no such data file or folder (relative paths are from the current directory)")
    return path


def _paths(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def read_records(paths: str | list[str] | None, ds: DataSettings, kind: str, split: str | None, where: str, *,
                 inherited_split: str | None = None) -> list:
    """The records of `kind` in `paths`, split `split`; without one, a source with splits (a dataset folder or name)
    gives `inherited_split` (data.path's split, for data.eval_path) and a data file its rows (a split other than its
    one is refused: `alignkit.data.readers.rows.check_single_split`)."""
    return [r for recs in read_each(paths, ds, kind, split, where, inherited_split=inherited_split) for r in recs]


def read_each(paths: str | list[str] | None, ds: DataSettings, kind: str, split: str | None, where: str, *,
              inherited_split: str | None = None) -> list[list]:
    """`read_records`, one list of records per path."""
    out = []
    with emptied_reads() as emptied:
        for p in _paths(paths):
            source = data_path(p)
            which = split if split is not None else inherited_split if has_splits(source) else None
            out.append(load_records(source, kind, reader=ds.reader, on_invalid=ds.on_invalid, split=which,
                                    **ds.reader_options))
    if paths is not None and not any(out):  # an OASST read whose filters removed every tree: they are named
        raise ConfigError(f"{where}: {paths} holds no {kind} records" + "".join(f"; {e}" for e in emptied))
    return out


def native_kinds(paths: str | list[str] | None, ds: DataSettings, kind: str, split: str | None) -> set[str]:
    """The kinds `read_records(paths, ds, kind, split, ...)` reads its records as before converting them to `kind`
    (one per source; e.g. {"ranked"} for Open-Assistant trees read as preference pairs)."""
    return {native_kind(reader_of(data_path(p), ds.reader, split, kind), kind, p) for p in _paths(paths)}


def record_kind(command: str, method: Any) -> str:
    """The kind of records a training command reads from data.path."""
    return {"sft": "sft", "dpo": "preference", "kto": "unpaired"}.get(command) or \
        ("ranked" if method.ranked else "preference")


def command_record_kind(command: str, cfg: Any) -> str | None:
    """The kind of records `command` reads from `cfg.data` through the readers (None: it reads none that way:
    annotate reads its round folder, augment its own sources)."""
    if command in TRAIN_COMMANDS:
        return record_kind(command, cfg.method)
    if command == "eval":
        return "preference"  # (ranked records of a reward model convert to pairs as well)
    return "prompt" if command in (*ONLINE_COMMANDS, "sample", "generate") else None


JSON_PROBE_BYTES = 64 << 20  # a .json file is one JSON value: up to this size a dry run parses it for its first row


def check_sources(ds: DataSettings, kind: str) -> list[str]:
    """What a dry run can check of `data.path` and `data.eval_path` without reading their records: each exists
    (bundled, a local file or folder), can be read, is a format alignkit reads, and its first row fits a reader that
    gives `kind` records (with `data.reader` / `data.reader_options`). A Hugging Face dataset name is not looked up
    (no download). Errors are the run's own (DataError / ConfigError / FileNotFoundError naming the path); returns
    one line per source, saying what was checked."""
    out = []
    for key, paths, split in (("data.path", ds.path, ds.split), ("data.eval_path", ds.eval_path, ds.eval_split)):
        for p in _paths(paths):
            source = data_path(p)
            which = split if split is not None else ds.split if key == "data.eval_path" and has_splits(source) else None
            out.append(f"{key} {p}: {probe_source(Path(source), ds, kind, which)}")
    return out


def probe_source(path: Path, ds: DataSettings, kind: str, split: str | None) -> str:
    """`check_sources` for one resolved path: what it is and which reader its first row fits."""
    if not path.exists():  # data_path let it through: a Hugging Face dataset name
        return "a Hugging Face dataset name, not looked up by a dry run (no download); read when the run starts"
    try:
        os.listdir(path) if path.is_dir() else path.open("rb").close()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); fix its permissions or point data.path at a "
                        "readable copy") from None
    if path.is_dir() and not is_saved_dataset(path):
        return dataset_folder(path)
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or a save_to_disk "
                        "folder")
    what = "a save_to_disk folder" if path.is_dir() else f"a {path.suffix} file"
    if path.suffix == ".parquet":
        row, what = parquet_first_row(path)
    elif path.suffix == ".json" and path.stat().st_size > JSON_PROBE_BYTES:
        return f"{what} of {path.stat().st_size >> 20} MB, not parsed by a dry run; read when the run starts"
    else:
        row = first_row(path, split)
    info = reader_of(NamedRows([row]), ds.reader, None, kind)
    check_options(info, ds.reader_options)
    native = native_kind(info, kind, path)
    got = f"{native} records" + (f", converted to {kind}" if native != kind else "")
    return f"{what}; its first row is read by reader {info.name!r} as {got}"


def parquet_first_row(path: Path) -> tuple[tuple[dict, str], str]:
    """The first row of a Parquet file and what it is, from its footer and first batch (not the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        rows = next(pf.iter_batches(batch_size=1), None)
    except (pa.ArrowException, OSError) as e:
        raise parquet_error(path, e) from None
    if rows is None or rows.num_rows == 0:
        raise DataError(f"{path}: no rows; the source is empty")
    return (rows.to_pylist()[0], f"{path} row 0"), f"a .parquet file of {pf.metadata.num_rows} rows"


def dataset_folder(path: Path) -> str:
    """A folder `datasets.load_dataset` reads (a dataset repository): its data files are listed, not read."""
    files = dataset_data_files(path)
    n = sum(len(v) for v in files.values())
    return (f"a dataset folder ({n} data file(s), split(s) {', '.join(files)}), read by datasets.load_dataset when "
            "the run starts (not by a dry run)")


def read_splits(ds: DataSettings, kind: str) -> tuple[list, list]:
    """(train records, eval records) of `kind` as read: `data.path` (the first `max_records`), and the evaluation
    records of `data.eval_path` or of an `eval_fraction` split of the training ones (seeded by `split_seed`)."""
    if ds.max_records is None or len(_paths(ds.path)) < 2:
        records = read_records(ds.path, ds, kind, ds.split, "data.path")
        records = records if ds.max_records is None else records[:ds.max_records]
    else:
        records = first_records(ds, kind)
    evals = read_records(ds.eval_path, ds, kind, ds.eval_split, "data.eval_path", inherited_split=ds.split)
    warn_trained_evals(records, evals)
    if ds.eval_path is None and ds.eval_fraction > 0:
        if not 0 < ds.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in (0, 1), got {ds.eval_fraction}")
        n, groups = len(records), len({source_group(r) for r in records})
        records, evals = split_records(records, [1 - ds.eval_fraction, ds.eval_fraction], seed=ds.split_seed,
                                       group_by=source_group)  # no evaluation prompt (OASST tree) is trained on
        if not evals or not records:
            raise ConfigError(f"data.eval_fraction: {ds.eval_fraction} of {n} record(s) leaves "
                              f"{'no evaluation' if not evals else 'no training'} record (records sharing a prompt or "
                              f"an OASST tree stay on one side: {groups} such group(s)); set it so both parts get "
                              "at least one record, set data.eval_fraction=0 (no evaluation) or give data.eval_path")
    warn_repeated(records, "data.path")
    return records, evals


def first_records(ds: DataSettings, kind: str) -> list:
    """The first `data.max_records` records of the files listed in `data.path`, read file by file; one warning naming
    the files that give none (the cap is reached before them): a list of datasets capped by max_records trained on
    the first dataset(s) only, without a word."""
    per_path = read_each(ds.path, ds, kind, ds.split, "data.path")
    cut = [f"{p} ({len(r)})" for p, r, before in zip(_paths(ds.path), per_path,
                                                    [sum(map(len, per_path[:i])) for i in range(len(per_path))])
           if before >= ds.max_records]
    if cut:
        logger.warning("data.max_records=%d keeps the first %d record(s) of data.path, all from the files listed "
                       "first: %s give none (record counts in brackets); raise data.max_records, or cut each file to "
                       "the records meant", ds.max_records, ds.max_records, ", ".join(cut))
    return [r for recs in per_path for r in recs][:ds.max_records]


def _content(record: Any, meta: tuple[str, ...] = ()) -> str:
    """A record's compared fields (prompt, responses, label, weight, ...; not its id, nor its meta but the keys in
    `meta`) as one string."""
    return json.dumps([record.kind] + [getattr(record, f.name) for f in dataclasses.fields(record) if f.compare] +
                      [{k: record.meta[k] for k in meta if k in record.meta}], sort_keys=True, default=str)


def warn_trained_evals(records: list, evals: list) -> None:
    """One warning when records of data.eval_path are also in data.path (the same prompt and responses: the same
    file given twice, or an evaluation file cut from the training data): their metrics measure memorised data."""
    if not evals:
        return
    trained = {_content(r) for r in records}
    same = [r.id or "?" for r in evals if _content(r) in trained]
    if same:
        logger.warning("data.eval_path: %d of %d evaluation record(s) are also in data.path (same prompt and "
                       "responses), e.g. %s: the evaluation measures data the run trains on; hold them out of "
                       "data.path (or use data.eval_fraction, which keeps them apart)",
                       len(same), len(evals), ", ".join(same[:3]))


def warn_repeated(records: list, where: str) -> None:
    """One warning when records repeat an earlier one (the same prompt and responses: a file concatenated twice, a
    join that duplicated rows): each copy is trained on as a record of its own, so it weighs double. Prompts (of an
    online command or `sample`) repeat when the same prompt is given twice, e.g. read back from annotate's
    records.jsonl (a row per pair) or from rows with several completions per prompt: each copy is sampled again.
    Records whose text is the same but whose trained tokens differ (another per-turn `weight` in a conversation:
    `records.TRAINING_META`) are not repeats."""
    seen: set[str] = set()
    repeated = []
    for r in records:
        key = _content(r, TRAINING_META)
        if key in seen:
            repeated.append(r.id or "?")
        seen.add(key)
    if repeated and all(r.kind == "prompt" for r in records):
        logger.warning("%s: %d prompt(s) repeat an earlier prompt, e.g. %s: each copy is sampled and trained on as a "
                       "prompt of its own (rows with several responses per prompt, such as annotate's records.jsonl, "
                       "give their prompt once per row); de-duplicate the prompts if that is not meant", where,
                       len(repeated), ", ".join(repeated[:3]))
    elif repeated:
        logger.warning("%s: %d record(s) repeat an earlier record (same prompt and responses), e.g. %s: each copy is "
                       "trained on as a record of its own; de-duplicate the data if that is not meant", where,
                       len(repeated), ", ".join(repeated[:3]))


def load_data(ds: DataSettings, kind: str) -> tuple[list, list]:
    """(train records, eval records) of `kind`; eval from `data.eval_path` or an `eval_fraction` split; pairs
    with nothing to prefer dropped (`drop_degenerate`)."""
    records, evals = read_splits(ds, kind)
    records = drop_degenerate(records, "data.path")
    evals = drop_degenerate(evals, "data.eval_path" if ds.eval_path is not None else "evaluation split")
    check_weights(records, "data.path")
    check_weights(evals, "data.eval_path" if ds.eval_path is not None else "evaluation split")
    logger.info("data: %d training and %d evaluation %s record(s)", len(records), len(evals), kind)
    return records, evals


def warn_unread_margins(records: list, command: str) -> None:
    """One warning when preference records carry a `margin` and `command` trains a loss that never reads one: margins
    enter only the reward model's Bradley-Terry loss (alignkit rm, method.use_margin); the DPO losses (TRL's too) take
    none, so `alignkit dpo` on a file with margins ignored them without a word."""
    if command == "rm":
        return
    given = [r.id or "?" for r in records if getattr(r, "margin", None) is not None]
    if given:
        logger.warning("data: %d of %d pair(s) have a margin (e.g. %s), and alignkit %s's losses do not read margins "
                       "(only alignkit rm's pair loss does, with method.use_margin), so they are ignored; drop the "
                       "margin column if that is not meant to be", len(given), len(records), ", ".join(given[:3]),
                       command)


def _degenerate(r: Any) -> bool:
    """No preference signal: a pair whose chosen equals rejected, or a ranked record whose replies all tie."""
    if isinstance(r, PreferenceRecord):
        return r.chosen == r.rejected
    if isinstance(r, RankedRecord):
        return min(r.ranks) == max(r.ranks)
    return False


def drop_degenerate(records: list, where: str) -> list:
    """Policy for records with nothing to prefer: preference pairs whose chosen equals rejected, ranked records
    whose replies all share one rank (their loss is 0: they only dilute the mean). Dropped with ONE warning giving
    their count and first ids; if every record is such, an error (the run would train for nothing)."""
    same = [r for r in records if _degenerate(r)]
    if not same:
        return records
    ids = ", ".join(r.id or "?" for r in same[:3]) + (", ..." if len(same) > 3 else "")
    ranked = isinstance(same[0], RankedRecord)
    what = "record(s) whose replies all share one rank" if ranked else "pair(s) whose chosen == rejected"
    if len(same) == len(records):
        if ranked:
            raise DataError(f"{where}: the replies of every one of the {len(records)} ranked record(s) share one rank "
                            f"(e.g. {ids}), so there is nothing to prefer; check the 'ranks' column")
        raise DataError(f"{where}: chosen == rejected in every one of the {len(records)} pair(s) (e.g. {ids}), so "
                        "there is nothing to prefer; check the columns (chosen / rejected swapped in a join?)")
    logger.warning("%s: dropped %d of %d %s (no preference signal): %s", where, len(same), len(records), what, ids)
    return [r for r in records if not _degenerate(r)]


def check_weights(records: list, where: str) -> None:
    """Every record weighted 0 makes every loss term 0: the run would report loss 0.0 and train nothing (the
    zero-gradient guard only fires on a positive loss). One line instead; some zero weights are fine."""
    if records and all(getattr(r, "weight", 1.0) == 0 for r in records):
        ids = ", ".join(r.id or "?" for r in records[:3]) + (", ..." if len(records) > 3 else "")
        raise DataError(f"{where}: every one of the {len(records)} record(s) has weight 0 (e.g. {ids}), so every "
                        "loss term is 0 and nothing would be learned or measured; give records a weight > 0 (or "
                        "remove the weight column: the default is 1)")


def tokenize_cache_dir() -> Path | None:
    """Where tokenized features are kept between runs: `$ALIGNKIT_CACHE/tokenized` (default
    `~/.cache/alignkit/tokenized`); `ALIGNKIT_CACHE=off` turns the cache off."""
    root = os.environ.get("ALIGNKIT_CACHE", "~/.cache/alignkit")
    return None if root.strip().lower() in ("", "off", "0", "none") else Path(root).expanduser() / "tokenized"


def cut_identical(features: list[dict]) -> list[dict]:
    """The preference features whose chosen and rejected token ids are the same (texts that differ only past
    data.max_length / data.max_prompt_length): they carry no preference."""
    return [f for f in features if "chosen_input_ids" in f
            and list(f["chosen_input_ids"]) == list(f["rejected_input_ids"])]


def check_cut_identical(features: list[dict], ds: DataSettings, where: str, warn: bool = True) -> list[dict]:
    """The pairs cut to identical tokens (`cut_identical`): all of them is a DataError (nothing left to prefer), some
    a warning (`warn`; else the caller says it: `alignkit eval` leaves them out of its figures)."""
    cut = cut_identical(features)
    same = [f.get("id") for f in cut]
    if same and len(same) == len(features):
        raise DataError(f"{where}: every one of the {len(same)} pair(s) of {ds.path} has chosen == rejected once "
                        f"truncated to data.max_length={ds.max_length} / data.max_prompt_length="
                        f"{ds.max_prompt_length} (e.g. {same[:3]}): nothing is left to prefer; raise data.max_length")
    if same and warn:
        logger.warning("%s: %d of %d pair(s) have chosen == rejected once truncated to data.max_length=%s (no "
                       "preference signal; they only dilute the batch), e.g. %s; raise data.max_length", where,
                       len(same), len(features), ds.max_length, same[:3])
    return cut


def tokenize(records: list, tokenizer: Any, ds: DataSettings, where: str, say_identical: bool = True
             ) -> tuple[list[dict], Any]:
    """Tokenized features and their stats, with the length limits' losses said (prompts and completions cut; pairs
    cut to identical tokens: `check_cut_identical`, or with `say_identical=False` left to the caller, who must call
    it)."""
    cfg = tokenize_config(ds)
    features, stats = tokenize_records(records, tokenizer, cfg, cache_dir=tokenize_cache_dir())
    logger.info("%s: %s", where, stats.summary())
    if records and not features:
        raise ConfigError(f"{where}: every record was dropped ({stats.summary()}); raise data.max_length")
    check_dropped(stats, ds, where)
    if features and stats.prompt_truncated * 2 > len(features):  # as the completions below: said when most are cut
        logger.warning("%s: %d of %d record(s) lose the start of their prompt to data.max_prompt_length=%s (each keeps "
                       "its last tokens, so the model trains without the beginning of the conversation: system "
                       "message, first turns; TRL's SFT and DPO have no prompt limit); raise data.max_prompt_length, "
                       "or set it to null to cut only at data.max_length", where, stats.prompt_truncated,
                       len(features), ds.max_prompt_length)
    if features and stats.completion_truncated * 2 > len(features):
        logger.warning("%s: %d of %d record(s) lose the end of their completion to data.max_length=%s (those "
                       "tokens are never trained on); raise data.max_length if that is not intended", where,
                       stats.completion_truncated, len(features), ds.max_length)
    if say_identical:
        check_cut_identical(features, ds, where)
    return features, stats


def tokenize_config(ds: DataSettings) -> TokenizeConfig:
    """The `TokenizeConfig` of the data settings `ds`: the length limits, formatter, add_eos, loss_on and
    max_dropped_fraction."""
    return TokenizeConfig(max_length=ds.max_length, max_prompt_length=ds.max_prompt_length, formatter=ds.formatter,
                          add_eos=ds.add_eos, loss_on=ds.loss_on, max_dropped_fraction=ds.max_dropped_fraction)


def check_dropped(stats: Any, ds: DataSettings, where: str) -> None:
    """The records the length limits dropped: over `data.max_dropped_fraction` of them a ConfigError (the run would
    train on the short minority its limits let through), else, when any, a warning with the share, the limits and the
    fix (before: a count inside the tokenization summary, and a stop only when every record was dropped). The
    library's rule (`alignkit.data.prepare.check_dropped`, which the trainers built in Python apply too)."""
    drop_share(stats, tokenize_config(ds), where, keys="data.", error=ConfigError)
