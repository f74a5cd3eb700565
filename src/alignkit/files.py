"""Files alignkit writes and reads back itself: atomic writes (temporary file + fsync + rename, so a reader sees
the old file or the new one, never half of one) and JSON Lines.

Used by the ReFT checkpoint writer (`interventions/io.py`), the run folder (`runs.py`: config, metrics;
`run_commit.py`: the completeness marker), offline rounds (`online/rounds.py`), augmentation output and its LLM cache.
`read_json_object` reads an adapter or base folder's small JSON files (adapters/config.py, adapters/lora.py,
serve/stack.py, `alignkit vllm-serve`'s POST /lora from the request's bytes: `parse_json_object`).
The tokenization cache (`data/tokenize.py`) renames its own process-named temp files without fsync: a lost or
damaged entry is tokenized again, and the fsync of a large features file made the cache write ~5% slower.
Imports no other alignkit module (and so no torch): the torch-free settings and ReFT config
(`interventions/config.py`) write through it too. `DataError` is defined here, with the JSONL reader that raises
it; `alignkit.data.records` (and `alignkit.data`) export it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable


logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data. The message names where (file:line, record id, key) and how to fix it."""


_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """The permission bits a plain `open(path, "w")` gives a new file: 0o666 minus the process umask. Reading
    the umask sets it, so the read is locked: two threads at once (augment's concurrent cache writes) could
    otherwise leave the process with umask 0."""
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def _host() -> str:
    """This machine's name as a temp file carries it: no dots (the name is split on them)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


OLD_TEMP_AGE_S = 24 * 3600  # an old-form temp file (no host, no pid) this much older than now is a crash's leftover
_OLD_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkstemp's random part, the whole middle of an old-form name


def _is_dead_temp(tmp: Path, middle: str, host: str) -> bool:
    """Whether `tmp`, `.<name>.<middle>.tmp` beside a target, is a leftover of a killed write: `<host>.<pid>.<random>`
    for this host and a pid no longer running, or the form alignkit wrote before it named host and pid
    (`<random>` only: mkstemp's 8 characters) last changed more than `OLD_TEMP_AGE_S` ago (a write takes seconds;
    its process cannot be told, so age stands in)."""
    parts = middle.split(".")
    if len(parts) == 1 and _OLD_RANDOM.fullmatch(parts[0]):
        try:
            return time.time() - tmp.stat().st_mtime > OLD_TEMP_AGE_S
        except OSError:
            return False
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False  # another target's temp file, another host's, or a name of another form
    pid = int(parts[1])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_dead_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files `atomic_write` left beside `path` from processes killed part-way: those named for
    this host with a pid that is no longer running, and those of the older form without host and pid that are over
    a day old (`_is_dead_temp`); never a live process's write in progress, never another host's, never a name of
    another form. Returns what was removed."""
    path = Path(path)
    host, prefix, removed = _host(), f".{path.name}.", []
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        if not _is_dead_temp(tmp, tmp.name[len(prefix):-len(".tmp")], host):
            continue
        try:
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
    if removed:
        logger.info("removed %d temporary file(s) of %s left by killed processes", len(removed), path)
    return removed


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file + fsync + rename (a reader sees the old file or the new
    one), with the permission bits `open()` would give. The one atomic writer. The temporary file is
    `.<name>.<host>.<pid>.<random>.tmp`: a kill leaves it, and the next write to `path` removes it once its process
    is gone, as it does an older alignkit's (no host, no pid) over a day old (`remove_dead_temps`)."""
    path = Path(path)
    remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; a written file gets the mode open() would give
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of UTF-8 text, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text.encode("utf-8"))


FileState = tuple[tuple[str, int, int], ...]


class UnchangedSinceChecked:
    """A memo of the files a check has passed in this process, keyed by their state (resolved path, size, mtime_ns):
    the check runs again only when one of the files changed (or moved). Used by the JSON data files check
    (`data/readers/rows.py`) and the output-set comparison (`run_commit.py`): a load reads a file more than once."""

    def __init__(self) -> None:
        self._states: set[FileState] = set()

    @staticmethod
    def state(*paths: str | Path) -> FileState:
        """The state of `paths` now (taken before the check: a change during it is checked again next time)."""
        out = []
        for path in map(Path, paths):
            stat = path.stat()
            out.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
        return tuple(out)

    def __contains__(self, state: FileState) -> bool:
        return state in self._states

    def add(self, state: FileState) -> None:
        self._states.add(state)


def parse_json_object(data: bytes | str, name: str | Path, fix: str, what: str = "") -> dict[str, Any]:
    """The JSON object `data` holds (the bytes of the file `name`, read from disk or received), else ValueError in one
    line naming the file, where json stopped and `fix`: `<name> (<what>): not valid JSON at line L, column C (<json's
    reason>): the file is damaged; <fix>`, or `... holds a JSON list, not an object ...`. The one reader of the small
    JSON files of an adapter or base folder (alignkit_adapter.json, peft's adapter_config.json, a base's config)."""
    label = f"{name} ({what})" if what else f"{name}"
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}): the file is "
                         f"damaged; {fix}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{label}: not valid JSON (not UTF-8 text at byte {e.start}): the file is damaged; {fix}") \
            from None
    if not isinstance(value, dict):
        raise ValueError(f"{label}: holds a JSON {type(value).__name__}, not an object: the file is damaged; {fix}")
    return value


def read_json_object(path: str | Path, fix: str, what: str = "") -> dict[str, Any]:
    """`parse_json_object` of the file at `path`."""
    return parse_json_object(Path(path).read_bytes(), path, fix, what)


def jsonl_text(rows: Iterable[Any]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    return atomic_write_text(path, jsonl_text(rows))


def read_jsonl(path: str | Path, fix: str = "fix or delete that line") -> list[Any]:
    """The values of a JSON Lines file alignkit wrote (blank lines skipped). A broken line is a `DataError`
    naming file:line and `fix`."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: broken JSON line ({e.msg}); {fix}") from None
    return rows


__all__ = ["UnchangedSinceChecked", "atomic_write", "atomic_write_jsonl", "atomic_write_text", "jsonl_text",
           "new_file_mode", "parse_json_object", "read_json_object", "read_jsonl", "remove_dead_temps"]
