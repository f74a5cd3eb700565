"""Read records from files and datasets: `load_records(source, kind=...)` and the `READERS` registry.

`load_records` looks at the first row, picks the registered reader that recognises it (or the one you
name with `reader=`), reads every row, and converts the records to `kind` with the views of
`alignkit.data.records` (ranked -> pairs, preference -> SFT on chosen, ...). Readers for TRL-style
columns live in `columns.py`; Open-Assistant trees and HH-RLHF text register themselves from
`alignkit.data.oasst` and `alignkit.data.hh` (imported by `alignkit.data`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any

from alignkit.data.readers import columns  # noqa: F401  (registers the column readers)
from alignkit.data.readers.columns import RESPONSE_COLUMNS
from alignkit.data.readers.registry import READERS, ReaderInfo, detect_reader, register_reader
from alignkit.data.readers.rows import collect, first_row, get_field, iter_rows, source_name
from alignkit.data.records import KINDS, DataError, Record, can_convert, convert

logger = logging.getLogger(__name__)


def load_records(source: Any, kind: str | None = None, *, reader: str | None = None, on_invalid: str = "raise",
                 split: str | None = None, **options: Any) -> list[Record]:
    """Records of `kind` (None: the reader's own kind) from a path, `datasets.Dataset` or list of dicts.

    `reader` forces a registered reader (see `READERS`); `on_invalid="skip"` drops bad rows with a logged
    count instead of raising; `split` picks a split of a DatasetDict; other `options` go to the reader
    (e.g. `mode="best"` for OASST SFT threads).
    """
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}; valid: {', '.join(KINDS)}")
    info = reader_of(source, reader, split, kind)
    native = native_kind(info, kind, source)
    check_options(info, options)
    records = info.fn(source, kind=native, on_invalid=on_invalid, split=split, **options)
    logger.info("%s: read %d %s record(s) with reader %r", source_name(source), len(records), native, info.name)
    if kind is not None and kind != native:
        records = convert(records, kind)
        logger.info("%s: converted to %d %s record(s)", source_name(source), len(records), kind)
    return records


def reader_of(source: Any, reader: str | None = None, split: str | None = None, kind: str | None = None) -> ReaderInfo:
    """The registered reader `load_records` reads `source` with: `reader` by name, else the one its first row fits.
    Prompts (`kind` "prompt") from TRL-style rows with a `prompt` column beside their responses are read by the
    `prompt` reader, which keeps every other column for reward functions, as TRL's GRPOTrainer passes them (all but
    prompt and completion): read as completions or pairs first and then cut to their prompts, a row's `solution` or
    `answer` was dropped, and a reward function that takes it failed at the first step."""
    if reader is not None:
        if reader not in READERS:
            raise DataError(f"unknown reader {reader!r}; registered: {', '.join(READERS)}")
        return READERS[reader]
    info = detect_reader(*first_row(source, split))
    return READERS["prompt"] if kind == "prompt" and info.name in columns.WITH_PROMPT_COLUMN else info


def native_kind(info: ReaderInfo, kind: str | None, source: Any = None) -> str:
    """The kind reader `info` reads records as for `kind` (None: its own), before they are converted to `kind`:
    e.g. "ranked" for Open-Assistant trees or ranked columns read as preference pairs."""
    if kind is None or kind in info.kinds:
        return kind or info.kinds[0]
    native = next((k for k in info.kinds if can_convert(k, kind)), None)
    if native is None and info.kinds == ("prompt",):  # prompts only, e.g. TRL's stepwise rows or a GRPO prompt set
        raise DataError(f"{source_name(source)}: the rows have a prompt and none of the responses alignkit trains "
                        f"{kind} records on (columns {', '.join(RESPONSE_COLUMNS)}), so there is nothing to train; "
                        "TRL's stepwise-supervision rows (completions + labels: process reward data) are not read "
                        "for training; give the responses in those columns, or use these prompts with an online "
                        "command (grpo, rloo, online-dpo, ppo)")
    if native is None:
        raise DataError(f"{source_name(source)}: reader {info.name!r} gives {'/'.join(info.kinds)} records, and "
                        f"none of them converts to {kind!r}; pick another kind or convert the data yourself")
    return native


def check_options(info: ReaderInfo, options: dict[str, Any]) -> None:
    """DataError naming the first option (`data.reader_options.<key>`) that reader `info` does not take (a typo or
    another reader's option would otherwise stop on an 'unexpected error: TypeError' that names no config key). A
    reader taking `**options` checks them itself."""
    params = inspect.signature(info.fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return  # a reader taking **options checks them itself
    valid = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in ("kind", "on_invalid", "split")]
    for key in options:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise DataError(f"data.reader_options.{key}: reader {info.name!r} takes no option {key!r}; {hint}its "
                            f"options: {', '.join(valid) or 'none'}")


__all__ = ["READERS", "ReaderInfo", "register_reader", "detect_reader", "load_records", "iter_rows", "first_row",
           "collect", "get_field", "source_name", "check_options", "native_kind", "reader_of"]
