"""Committing run folders atomically: `model/`, every checkpoint, and a whole run folder under --overwrite.

`model/` and every `checkpoints/checkpoint-N` are written into a staging folder and renamed into place with
`alignkit_complete.json` (each file's size) written last, so a kill leaves either the previous state or a
complete folder; `latest_complete_checkpoint` skips (and names) any checkpoint without a valid marker. A resume
continues from a checkpoint's step (`resumed_step`) and keeps metrics.jsonl up to it (`truncate_metrics`).
The files a one-shot command (generate, eval, augment) writes beside each other are a set (`output_set`): a
manifest, `alignkit_<command>_outputs.json`, is marked unfinished before the first of them is written and lists
each file's size and sha256 after the last; `check_output_file` (every data file alignkit reads, library or CLI:
`alignkit.data.readers.rows.iter_rows`) refuses a file of an unfinished set (a kill between two writes left new files
beside old ones) and warns about one changed since.
The rest of the run folder (config, metrics, plots, model card) is `alignkit.runs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from alignkit.files import DataError, UnchangedSinceChecked, atomic_write_text

logger = logging.getLogger(__name__)


COMPLETE_MARKER = "alignkit_complete.json"  # written last into a finished folder: file names and sizes
STAGING_MARK = ".alignkit-staging"  # inside folders alignkit made for itself (staging, to be removed)


class CheckpointError(ValueError):
    """A checkpoint or saved folder that cannot be used (incomplete, truncated, missing); names the folder."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_marker(folder: str | Path, **info: Any) -> Path:
    """Write `COMPLETE_MARKER` into `folder`: every file's relative path and size (checked on load)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in (COMPLETE_MARKER, STAGING_MARK)}
    return atomic_write_text(folder / COMPLETE_MARKER,
                             json.dumps({"complete": True, **info, "files": files}, indent=1, default=str) + "\n")


def incomplete_reason(folder: str | Path) -> str | None:
    """None when `folder` holds a complete save (marker present, every listed file with its size); else why not."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"{folder} has no {COMPLETE_MARKER} (written last: the save was interrupted or never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{marker} is damaged (not the JSON alignkit writes)"
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, {size} were written (truncated or changed)"
    return None


def saved_step(folder: str | Path) -> int | None:
    """The optimizer step a complete folder was saved at (its marker's `step`); None when it is incomplete or
    records none."""
    if incomplete_reason(folder) is not None:
        return None
    step = json.loads((Path(folder) / COMPLETE_MARKER).read_text()).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _remove_marked(folder: Path) -> None:
    """Remove a folder that carries `STAGING_MARK`, the mark last: a kill part-way leaves it marked (the next
    `remove_own` finishes it) or empty, never an unmarked remainder. (`shutil.rmtree` removes in directory order: a
    kill after it had taken the mark left `.<name>.old` / `.<name>.staging` for the user to remove by hand.)"""
    for entry in folder.iterdir():
        if entry.name == STAGING_MARK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / STAGING_MARK).unlink(missing_ok=True)
    folder.rmdir()


def refuse_foreign(folder: Path) -> None:
    """CheckpointError unless `remove_own` may remove `folder`: absent, empty, or made by alignkit for itself (it
    carries `STAGING_MARK`). Removes nothing (`--dry-run` checks with it)."""
    if not folder.exists() or (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
        return
    if not (folder / STAGING_MARK).is_file():
        raise CheckpointError(f"{folder} is in the way and was not made by alignkit; move or remove it yourself")


def remove_own(folder: Path) -> None:
    """Remove `folder` only if alignkit made it for itself (it carries `STAGING_MARK`) or it is empty (what a kill
    at the very end of a removal leaves: nothing to lose); else refuse (`refuse_foreign`)."""
    refuse_foreign(folder)
    if not folder.exists():
        return
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()
        return
    _remove_marked(folder)


def recover_swap(final: str | Path, staging: str | Path | None = None) -> str | None:
    """Undo what a kill between `commit_staging`'s two renames left: `final` absent, `.<name>.old` (the previous
    folder, marked) and the finished staging folder (unmarked; `.<name>.staging` unless given) beside it. A finished
    staging folder is renamed into place (the swap completed), else the previous folder is restored; the leftover
    `.old` is removed. Logs one warning naming what was done; returns it (None when there was nothing to do)."""
    final = Path(final)
    old = final.parent / f".{final.name}.old"
    staging = Path(staging) if staging is not None else final.parent / f".{final.name}.staging"
    if final.is_dir():  # what a kill left after the swap (the previous folder, part-removed) or before it (a mark)
        if old.is_dir() and ((old / STAGING_MARK).is_file() or not any(old.iterdir())):
            remove_own(old)
            logger.info("removed %s, left by an interrupted replacement of %s", old, final)
        (final / STAGING_MARK).unlink(missing_ok=True)
        return None
    if final.exists() or not (old / STAGING_MARK).is_file():
        return None
    if staging.is_dir() and not (staging / STAGING_MARK).exists() and (
            not (staging / COMPLETE_MARKER).exists() or incomplete_reason(staging) is None):
        os.rename(staging, final)
        _remove_marked(old)
        done = (f"{final} was missing after an interrupted replacement: the finished new folder {staging} was renamed "
                f"into place and the previous one ({old}) removed")
    else:
        os.rename(old, final)
        (final / STAGING_MARK).unlink(missing_ok=True)
        done = f"{final} was missing after an interrupted replacement: the previous folder was restored from {old}"
    _fsync_dir(final.parent)
    logger.warning("%s", done)
    return done


def new_staging(final: str | Path) -> Path:
    """An empty folder beside `final` to write into (`.<name>.staging`, marked as alignkit's own)."""
    final = Path(final)
    staging = final.parent / f".{final.name}.staging"
    recover_swap(final, staging)  # a replacement killed half-way: completed before anything new is written
    remove_own(staging)  # a leftover of an interrupted save
    staging.mkdir(parents=True)
    (staging / STAGING_MARK).touch()
    return staging


def commit_staging(staging: Path, final: str | Path, marker: bool = True, **info: Any) -> Path:
    """Rename a finished staging folder to `final` (replacing a previous `final` as a whole), marker written
    last into it first. A kill at any point leaves what `recover_swap` / `remove_own` complete or undo: before the
    swap the previous `final` (the staging folder still marked, removed by the next save); between the two renames
    `final` absent and `.<name>.old` complete; after them `.<name>.old` marked or empty, removed by the next save or
    `recover_swap`."""
    final = Path(final)
    if marker:
        write_marker(staging, **info)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        remove_own(old)
        (final / STAGING_MARK).touch()  # from here on it is ours to remove
        os.rename(final, old)
        (staging / STAGING_MARK).unlink(missing_ok=True)  # after the marker: an unmarked staging folder is finished
        os.rename(staging, final)
        _remove_marked(old)
    else:
        os.rename(staging, final)
        (final / STAGING_MARK).unlink(missing_ok=True)  # a kill before this: recover_swap removes the mark
    _fsync_dir(final.parent)
    return final


class staged:
    """`with staged(run.model) as tmp: save(tmp)`: written to a staging folder, renamed into place with a
    completeness marker only when the block succeeds (an exception leaves `final` as it was)."""

    def __init__(self, final: str | Path, enabled: bool = True, **info: Any) -> None:
        self.final, self.enabled, self.info = Path(final), enabled, info

    def __enter__(self) -> Path:
        self.tmp = new_staging(self.final) if self.enabled else self.final
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None and self.enabled:
            commit_staging(self.tmp, self.final, **self.info)


CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def resumed_step(checkpoint: str | Path) -> int | None:
    """The optimizer steps a checkpoint had done, where a resume continues: its trainer_state.json's (`global_step`
    of the Trainer's, `step` of an online checkpoint), else the N of its `checkpoint-N` name (None: neither). Not
    the name first: a checkpoint folder copied or renamed (`checkpoints/best`) and resumed with
    train.resume_from_checkpoint kept the killed run's metrics.jsonl rows and TensorBoard events after its step
    beside the resumed run's."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        state = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        state = {}
    step = state.get("global_step", state.get("step")) if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else checkpoint_step(Path(checkpoint))


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest `checkpoint-N` in `folder` that is complete; each newer incomplete one is skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(((checkpoint_step(p), p) for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   reverse=True)
    for _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, reason)
    return None


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep only the rows of metrics.jsonl up to `step` (a resume continues after them). Returns rows kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a row cut by a kill: it and anything after it are dropped
        if isinstance(row.get("step"), (int, float)) and row["step"] > step:
            break
        kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


OUTPUTS_MANIFEST = "alignkit_{command}_outputs.json"  # one per command, beside the files it lists


def outputs_manifest(folder: str | Path, command: str) -> Path:
    return Path(folder) / OUTPUTS_MANIFEST.format(command=command)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


class output_set:
    """`with output_set(folder, "generate", names) as outs: outs.add(write(...))`: the files one command writes
    into `folder`, as a set. `begin()` (on entry, or where the first write is when `lazy`) replaces the manifest by
    an unfinished one naming `names` and the previous set's files: a kill from there on leaves a set
    `check_output_file` refuses, one before it the previous set as it was. A clean exit lists each added file's
    size and sha256; an exception after `begin()` leaves the set unfinished (it is). `enabled=False` (not the main
    process): nothing is written."""

    def __init__(self, folder: str | Path, command: str, names: list[str], enabled: bool = True,
                 lazy: bool = False) -> None:
        self.folder, self.command, self.names, self.enabled, self.lazy = Path(folder), command, names, enabled, lazy
        self.manifest = outputs_manifest(folder, command)
        self.files: list[Path] = []
        self.begun = False

    def begin(self) -> None:
        if self.begun or not self.enabled:
            return
        previous = _read_manifest(self.manifest) if self.manifest.is_file() else None
        if previous is not None and not previous.get("complete"):
            logger.warning("the previous `alignkit %s` in %s did not finish (its files are a mixed set); they are "
                           "replaced now", self.command, self.folder)
        listed = sorted({*self.names, *((previous or {}).get("files") or {})})
        atomic_write_text(self.manifest, json.dumps({"command": self.command, "complete": False,
                                                     "files": {n: None for n in listed}}, indent=1) + "\n")
        self.begun = True

    def add(self, path: str | Path) -> Path:
        """Record a file written into the set (after `begin()`); returns it."""
        if self.enabled and not self.begun:
            raise RuntimeError(f"{path} was written before output_set.begin()")
        self.files.append(Path(path))
        return Path(path)

    def __enter__(self) -> output_set:
        if not self.lazy:
            self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is not None or not self.begun:
            return
        files = {p.relative_to(self.folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(set(self.files))}
        atomic_write_text(self.manifest, json.dumps({"command": self.command, "complete": True, "files": files},
                                                    indent=1) + "\n")


_COMPARED = UnchangedSinceChecked()  # (file, its manifest) states compared in this process: a load reads a file
#   twice (its first row, then every row); one sha256 and at most one warning a state


def check_output_file(path: str | Path) -> None:
    """Before reading `path` as data: a `DataError` when a manifest beside it lists it in a set that did not
    finish (a kill or failure between two of the command's writes: files of two runs side by side); a warning
    when it differs from what the finished set recorded (changed since, e.g. edited by hand)."""
    path = Path(path)
    if not path.is_file():
        return
    for manifest in sorted(path.parent.glob(OUTPUTS_MANIFEST.format(command="*"))):
        m = _read_manifest(manifest)
        if m is None or path.name not in m["files"]:
            continue
        command = m.get("command", "?")
        if not m.get("complete"):
            raise DataError(f"{path}: the `alignkit {command}` that wrote it did not finish ({manifest} is marked "
                            f"unfinished: the files in {path.parent} may be from two runs); rerun `alignkit {command}` "
                            f"with output_dir={path.parent}")
        want = m["files"][path.name] or {}
        seen = _COMPARED.state(path, manifest)
        if seen in _COMPARED:
            continue
        changed = want.get("bytes") != seen[0][1] or want.get("sha256") != _sha256(path)
        _COMPARED.add(seen)
        if changed:
            logger.warning("%s was changed after `alignkit %s` wrote it (its size / sha256 differ from %s): the files "
                           "beside it describe what was written, not this file", path, command, manifest)


__all__ = ["CHECKPOINT_PREFIX", "COMPLETE_MARKER", "OUTPUTS_MANIFEST", "STAGING_MARK", "CheckpointError",
           "check_output_file", "checkpoint_step", "commit_staging", "incomplete_reason", "latest_complete_checkpoint",
           "new_staging", "output_set", "outputs_manifest", "recover_swap", "refuse_foreign", "remove_own",
           "resumed_step", "saved_step", "staged", "truncate_metrics", "write_marker"]
