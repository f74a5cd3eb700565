"""The reader registry: name -> how to recognise a source and turn its rows into records.

A reader is a function `fn(source, *, kind, on_invalid="raise", split=None, **options) -> list[Record]`
registered with `@register_reader(name, kinds=..., detect=..., priority=..., description=...)`.
`kinds` lists the record kinds it produces natively (first = default); `detect(first_row) -> bool`
says whether a row looks like its format, and among matching readers the highest `priority` wins
(e.g. HH-RLHF text beats plain chosen/rejected columns). `whole=True` marks a reader whose records join rows
(Open-Assistant's flat export: a tree's messages are rows anywhere in the source), so it must see every row at once:
a trainer's dataset is then read in one map batch (`alignkit.data.prepare`), not 1,000 rows at a time. The CLI's
`alignkit ls` prints `READERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from alignkit.data.records import DataError


@dataclass(frozen=True)
class ReaderInfo:
    name: str
    fn: Callable
    kinds: tuple[str, ...]
    detect: Callable[[dict], bool]
    priority: int
    description: str
    whole: bool = False  # its records join rows from anywhere in the source: read it in one piece


READERS: dict[str, ReaderInfo] = {}


def register_reader(name: str, *, kinds: tuple[str, ...], detect: Callable[[dict], bool], priority: int = 0,
                    description: str = "", whole: bool = False) -> Callable:
    def deco(fn: Callable) -> Callable:
        if name in READERS:
            raise ValueError(f"reader {name!r} is already registered (by {READERS[name].fn.__module__})")
        READERS[name] = ReaderInfo(name, fn, tuple(kinds), detect, priority, description, whole)
        return fn
    return deco


def detect_reader(row: dict, where: str) -> ReaderInfo:
    """The registered reader that recognises `row`, or a DataError listing the known formats."""
    matches = [r for r in READERS.values() if _safe(r.detect, row)]
    if not matches:
        nulls = [k for k, v in row.items() if v is None]
        filled = [r.name for r in READERS.values() if nulls and _safe(r.detect, {**row, **dict.fromkeys(nulls, "x")})]
        if filled:  # else "unknown combination of columns" listing every format, for a row with a missing value
            raise DataError(f"{where}: column(s) {nulls} are null (no value: Parquet and datasets write a missing "
                            f"value so), and with values the row would be read by reader {filled[0]!r}; give the row "
                            "its values, or drop it")
        # a value neither text nor a list (a number, a dict) where the readers look for text: 'prompt': 3
        odd = {k: v for k, v in row.items() if not isinstance(v, (str, list, type(None)))}
        odd = {k: v for k, v in odd.items() if any(_safe(r.detect, {**row, k: "x"}) for r in READERS.values())}
        typed = [r.name for r in READERS.values() if odd and _safe(r.detect, {**row, **dict.fromkeys(odd, "x")})]
        if typed:
            shown = ", ".join(f"{k!r} is {type(v).__name__} {repr(v)[:40]}" for k, v in odd.items())
            raise DataError(f"{where}: {shown}, not text or a list of messages, and with text the row would be read by "
                            f"reader {typed[0]!r}; write the value as text (a string), or drop the row")
        if "text" in row:  # TRL's language-modeling rows: say so rather than list every format
            raise DataError(f"{where}: a 'text' column is TRL's language-modeling format (columns {sorted(row)}), "
                            "which has no prompt to tell from the completion, and alignkit trains completions after "
                            "their prompt; give each row 'prompt' and 'completion' columns, or a 'messages' "
                            "conversation")
        known = "; ".join(f"{r.name}: {r.description}" for r in READERS.values())
        raise DataError(f"{where}: unknown combination of columns {sorted(row)}; no reader recognises it. "
                        f"Rename the columns to one of the known formats ({known}) or pass reader=<name>")
    best = max(r.priority for r in matches)
    top = [r for r in matches if r.priority == best]
    if len(top) > 1:
        raise DataError(f"{where}: columns {sorted(row)} match several readers {[r.name for r in top]}; "
                        f"pass reader=<name>")
    return top[0]


def _safe(detect: Callable[[dict], bool], row: dict) -> bool:
    try:
        return bool(detect(row))
    except Exception:  # a detector must never break detection of other formats
        return False
