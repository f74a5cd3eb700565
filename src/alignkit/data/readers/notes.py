"""What the readers say about a source once it is read, held per map batch and said once per dataset.

A reader warns once per source: the columns no reader read, the message keys dropped, an optional column given in
some rows only (`alignkit.data.readers.columns`), the rows `collect` skipped (`on_invalid="skip"`), what the OASST
tree reader's filters and record rules left out and whether its `langs` matched any tree (`alignkit.data.oasst`).
A trainer's `datasets.Dataset` is read one map batch (1,000 rows) at a time, so `alignkit.data.prepare` holds each
batch's notes (`held_reader_notes`), carries them through the map as JSON and merges them: the dataset gets the
warnings a file read whole gets, once and judged over every row. This module imports no reader, so that `rows`,
`columns` and `oasst` all report through it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

logger = logging.getLogger(__name__)

SKIPPED_SHOWN = 3  # the first skipped rows' errors a warning quotes


def warn_ignored(where: str, unknown: dict[str, int]) -> None:
    """One warning for the source named `where` for the columns `check_columns` counted into `unknown` (none:
    nothing said)."""
    if unknown:
        logger.warning("%s: ignored column(s) %s (not read by this reader; counts: %s)", where, sorted(unknown),
                       ", ".join(f"{k} in {v} row(s)" for k, v in sorted(unknown.items())))


def warn_dropped_message_keys(where: str, dropped: dict[str, int]) -> None:
    """One warning for the source named `where` for the message keys `count_message_keys` counted (none: nothing
    said)."""
    if dropped:
        logger.warning(
            "%s: message key(s) %s dropped (each message keeps its role and content only, so the chat template never "
            "sees them; counts: %s); fold what matters into the content, or drop those keys from the data",
            where, sorted(dropped), ", ".join(f"{k} in {v} message(s)" for k, v in sorted(dropped.items())))


def warn_skipped(where: str, n: int, first: list[str]) -> None:
    """One warning for the `n` rows `collect` skipped as invalid (on_invalid='skip'), quoting the `first` errors."""
    if n:
        logger.warning("%s: skipped %d invalid row(s) (on_invalid='skip'); first: %s", where, n, " | ".join(first))


# optional columns whose absence means a default: a file that gives one in some rows only gets one warning
DEFAULTED = {"weight": "weigh 1 (the default)", "margin": "have margin 0 (the default)"}


class PartialColumns:
    """Counts, per optional column of `DEFAULTED`, the rows that give it (not missing, not null) and the first row
    that does and that does not. A column given in some rows of a file but not all is most often a join or export
    that lost values (a Parquet null, a JSONL row written without it): the rows without it silently take the
    default, so `warn` says so once per file, with the counts and the first row of each kind."""

    def __init__(self, columns: tuple[str, ...] = ()) -> None:
        self.rows = 0
        self.given = dict.fromkeys(columns, 0)
        self.first_with: dict[str, str] = {}
        self.first_without: dict[str, str] = {}

    def add(self, row: dict, where: str) -> None:
        self.rows += 1
        for c in self.given:
            if row.get(c) is not None:
                self.given[c] += 1
                self.first_with.setdefault(c, where)
            else:
                self.first_without.setdefault(c, where)

    def merge(self, other: PartialColumns) -> None:
        """Add the counts of `other`, rows read after this one's (its first rows count only where this has none)."""
        self.rows += other.rows
        for c, n in other.given.items():
            self.given[c] = self.given.get(c, 0) + n
            for mine, theirs in ((self.first_with, other.first_with), (self.first_without, other.first_without)):
                if c in theirs:
                    mine.setdefault(c, theirs[c])

    def warn(self, where: str) -> None:
        for c, n in self.given.items():
            if 0 < n < self.rows:
                logger.warning(
                    "%s: column %r is given in %d of %d rows (the first: %s); the other %d %s (the first: %s). Give "
                    "every row a %s if they should not", where, c, n, self.rows, self.first_with[c],
                    self.rows - n, DEFAULTED[c], self.first_without[c], c)


def merge_oasst(mine: dict | None, theirs: dict | None) -> dict | None:
    """The OASST reader's notes (`ReaderNotes.oasst`) of two reads, `theirs` after `mine`: the
    records and every count summed; its kind, preset and wanted languages are the same for every batch."""
    if theirs is None:
        return mine
    if mine is None:
        return json.loads(json.dumps(theirs))
    mine["records"] += theirs["records"]
    mine["kept"] = mine.get("kept", 0) + theirs.get("kept", 0)
    for key in ("removed", "skipped", "roots_removed"):
        mine[key] = dict(Counter(mine.get(key) or {}) + Counter(theirs.get(key) or {}))
    for key in ("root_langs", "states"):
        seen = Counter({value: n for value, n in mine.get(key) or []})
        for value, n in theirs.get(key) or []:
            seen[value] += n
        mine[key] = [[value, n] for value, n in seen.items()]  # pairs: a null value stays null in JSON
    return mine


class ReaderNotes:
    """What the readers say about a source once it is read: the columns no reader read (`ignored`: column -> rows),
    the message keys dropped (`message_keys`: key -> messages), the optional columns given in some rows only
    (`partial`), the rows skipped as invalid (`skipped`: their number, `skipped_first`: the first errors) and the
    OASST tree reader's counts (`oasst`, a JSON-able dict: `alignkit.data.oasst.read_oasst_rows`). Held per map batch
    by `held_reader_notes`, carried through the map as JSON (`to_json` / `from_json`) and merged, so a trainer's
    dataset gets each warning once, judged over every row: a weight column given in rows 0-999 only is then said,
    where no batch alone saw a mix, and OASST `langs` matching no tree of one batch is not."""

    def __init__(self, ignored: dict[str, int] | None = None, message_keys: dict[str, int] | None = None,
                 partial: PartialColumns | None = None, skipped: int = 0, skipped_first: list[str] | None = None,
                 oasst: dict | None = None) -> None:
        self.ignored = dict(ignored or {})
        self.message_keys = dict(message_keys or {})
        self.partial = partial if partial is not None else PartialColumns()
        self.skipped = skipped
        self.skipped_first = list(skipped_first or [])[:SKIPPED_SHOWN]
        self.oasst = oasst

    def __bool__(self) -> bool:
        return bool(self.ignored or self.message_keys or self.partial.rows or self.skipped or self.oasst)

    def merge(self, other: ReaderNotes) -> None:
        """Add `other`'s counts (a source read after this one)."""
        for mine, theirs in ((self.ignored, other.ignored), (self.message_keys, other.message_keys)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
        self.partial.merge(other.partial)
        self.skipped += other.skipped
        self.skipped_first = (self.skipped_first + other.skipped_first)[:SKIPPED_SHOWN]
        self.oasst = merge_oasst(self.oasst, other.oasst)

    def to_json(self) -> str:
        p = self.partial
        return json.dumps({"ignored": self.ignored, "message_keys": self.message_keys, "rows": p.rows,
                           "given": {c: [n, p.first_with.get(c), p.first_without.get(c)] for c, n in p.given.items()},
                           "skipped": [self.skipped, self.skipped_first], "oasst": self.oasst}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReaderNotes:
        note = json.loads(text)
        partial = PartialColumns(tuple(note["given"]))
        partial.rows = note["rows"]
        for c, (n, first_with, first_without) in note["given"].items():
            partial.given[c] = n
            for firsts, where in ((partial.first_with, first_with), (partial.first_without, first_without)):
                if where is not None:
                    firsts[c] = where
        skipped, skipped_first = note["skipped"]
        return cls(note["ignored"], note["message_keys"], partial, skipped, skipped_first, note["oasst"])

    def held(self) -> bool:
        """Inside `held_reader_notes`: these notes added to its notes (True); outside: False, nothing done."""
        held = _HELD_NOTES.get()
        if held is not None:
            held.merge(self)
        return held is not None

    def warn(self, where: str) -> None:
        """One warning per kind for the source named `where` (nothing to say: none); inside `held_reader_notes`,
        added to its notes instead (`held`). The OASST counts are said by `alignkit.data.oasst.say_oasst_notes`
        (which imports the readers: this module imports none), called by the OASST reader and by
        `alignkit.data.prepare` per dataset."""
        if self.held():
            return
        warn_ignored(where, self.ignored)
        self.partial.warn(where)
        warn_dropped_message_keys(where, self.message_keys)
        warn_skipped(where, self.skipped, self.skipped_first)


_HELD_NOTES: ContextVar[ReaderNotes | None] = ContextVar("alignkit_held_reader_notes", default=None)


@contextmanager
def held_reader_notes() -> Iterator[ReaderNotes]:
    """Within it, the readers' per-source warnings (`ReaderNotes.warn`) are added to the notes it yields instead of
    said: `alignkit.data.prepare` reads a trainer's rows one datasets.map batch at a time and says the notes of all
    its batches once per dataset."""
    held = ReaderNotes()
    token = _HELD_NOTES.set(held)
    try:
        yield held
    finally:
        _HELD_NOTES.reset(token)
