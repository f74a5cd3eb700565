"""Rows from a file or a dataset, each with the place it came from (for error messages).

Sources: a `.jsonl` file (one JSON value per line; blank lines skipped; a line holding a bare JSON string is read as
`{"prompt": <string>}`, so a file of prompts is a prompt dataset), a `.json` file holding a list of objects (or one
object per line, as `datasets.Dataset.to_json` writes: read as `.jsonl`; a UTF-8 byte order mark at the start of a file
is skipped; a dict of columns, `{"prompt": [...], ...}`, is refused naming the layout and the fix, as
`datasets.load_dataset` reads it as one row), a `.parquet` file, a folder written by `datasets.Dataset.save_to_disk`, a
`datasets.Dataset`, or an in-memory list of dicts. Any other folder is read the way `datasets.load_dataset(folder)`
reads a dataset repository (its data files, or the configs its README declares), and an "org/name" that is not a local
path as a Hugging Face dataset name; both take split "train" unless `split` says otherwise. Places are "path:LINE"
(1-based) for JSON lines and "path row N" (0-based) for tables. A JSON object that holds a key twice is a DataError
naming the place and the key (`json.loads` keeps the last value without a word), in a folder's `.json` / `.jsonl` data
files too, checked before `datasets.load_dataset` reads them (`check_json_data_files`; a Hub dataset's files are not).

`collect` runs a row -> record(s) conversion with one policy for bad rows: `on_invalid="raise"` (the
default) stops at the first bad row with its place; `"skip"` drops it, counts it and logs a warning
with the first places, so nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from alignkit.data.readers.notes import SKIPPED_SHOWN, ReaderNotes
from alignkit.data.records import DataError
from alignkit.files import UnchangedSinceChecked
from alignkit.run_commit import check_output_file

logger = logging.getLogger(__name__)

Row = tuple[dict, str]  # (row, where)


def source_name(source: Any) -> str:
    """How a message names `source`: a path as given; rows that know their place (`NamedRows`, one batch of a
    trainer's `datasets.map`) by their first and last place ("train_dataset rows 0-999"); else its type."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, NamedRows) and source:
        first, last = source[0][1], source[-1][1]
        head, sep, start = first.rpartition(" row ")
        end = last.rpartition(" row ")[2]
        return first if first == last else f"{head} rows {start}-{end}" if sep and last.startswith(head) else \
            f"{first} to {last}"
    return f"<{type(source).__name__}>"


def decode_utf8(raw: bytes, where: str) -> str:
    """`raw` as UTF-8 text; a DataError naming `where`, the byte and the fix when it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        at = f"line {line}, column {col}" if line > 1 else f"column {col}"  # a JSON line's `where` names its line
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at {at}); save the file "
                        f"as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


class DuplicateKey(ValueError):
    """A JSON object holding one key twice (`json.loads` keeps the last value silently)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """`object_pairs_hook` of every JSON value read as data: the object as a dict, or DuplicateKey naming the first
    key it holds twice ({"prompt": "a", "prompt": "b"}: an export bug json.loads would settle on "b" without a word)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def duplicate_key_error(where: str, key: str) -> DataError:
    return DataError(f"{where}: an object holds the key {key!r} twice, and only its last value would be read; keep "
                     f"one {key!r} in it (the export that wrote the file repeated the key)")


def _loads(text: str | bytes, where: str) -> Any:
    """json.loads of a value read as data: a DataError naming `where` and the key when an object repeats a key."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as e:
        raise duplicate_key_error(where, e.key) from None


def _iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = decode_utf8(raw[3:] if lineno == 1 and raw.startswith(BOM) else raw, where)
            if not line.strip():
                continue
            try:
                value = _loads(line, where)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: broken JSON line ({e.msg} at column {e.colno}); each line must hold one "
                                f"complete JSON object: fix or delete this line") from None
            if isinstance(value, str):
                value = {"prompt": value}
            if not isinstance(value, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(value).__name__}; "
                                f"write one {{...}} object per line")
            yield value, where


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors (Notepad, Excel) write at the start of a file


def _is_json_lines(path: Path) -> bool:
    """Whether a `.json` file holds one JSON object per line (what `datasets.Dataset.to_json` writes by default, and
    `datasets.load_dataset("json")` reads) rather than one JSON value: its first non-blank line is an object."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw.removeprefix(BOM)), dict)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
    return False


def _json_item_of_duplicate(path: Path, text: str) -> str:
    """Where in a `.json` file the first object repeating a key is: "path item I (line L)" in a list of objects,
    "path:L" in one object per line (only on that error: the file is decoded item by item)."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    ws = re.compile(r"[\s,]*")
    listed = text.lstrip().startswith("[")
    pos = ws.match(text, text.index("[") + 1).end() if listed else ws.match(text).end()
    i = 0
    while pos < len(text):
        try:
            _, end = decoder.raw_decode(text, pos)
        except DuplicateKey:
            line = text.count("\n", 0, pos) + 1
            return f"{path} item {i} (line {line})" if listed else f"{path}:{line}"
        except json.JSONDecodeError:
            break
        pos, i = ws.match(text, end).end(), i + 1
    return str(path)


JSON_LINES = object()  # what `_json_value` returns for a `.json` file holding one object per line


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and "role" in item


def column_layout(value: dict) -> str | None:
    """The layout of a `.json` object holding columns, not one row: "lists" (`{"prompt": [...], "completion": [...]}`,
    as `DataFrame.to_dict(orient="list")` or an export writes) or "index" (`{"prompt": {"0": ..., "1": ...}, ...}`, as
    pandas' `to_json(orient="columns")` writes), or None for a row. `datasets.load_dataset("json")` reads a
    pretty-printed such file as columns (pandas.read_json, its fallback; compat row D7), so alignkit does too, on one
    line or many. A row also holds lists (a conversation, token ids), so the lists are columns only when every value is
    one, none holds a message dict (a conversation is a row's prompt), and some holds text or conversations (a row of
    token ids holds ints only)."""
    if not value:
        return None
    columns = list(value.values())
    if all(isinstance(c, dict) and c for c in columns):
        keys = [list(c) for c in columns]
        if all(k == keys[0] for k in keys) and all(k.isdigit() for k in keys[0]):
            return "index"
        return None
    if not all(isinstance(c, list) and c for c in columns) or any(_is_message(x) for c in columns for x in c):
        return None
    return "lists" if any(all(isinstance(x, (str, list)) for x in c) for c in columns) else None


def columns_error(value: dict, path: Path) -> DataError:
    """The DataError for a `.json` file holding a dict of columns (`column_layout`): `datasets.load_dataset("json")`
    (a folder's data files, TRL's scripts) reads it as ONE row whose values are the whole lists (compat row D7), so
    alignkit refuses it rather than read rows the same file does not give elsewhere; before, the row stopped on a
    misleading "prompt[0] must be a dict"."""
    layout = "{column: [values]}" if column_layout(value) == "lists" else "{column: {index: value}}"
    sizes = ", ".join(f"{k}: {len(c)}" for k, c in list(value.items())[:6])
    return DataError(f"{path}: holds a dict of columns {layout} ({sizes}), not rows, and datasets.load_dataset('json') "
                     f"reads such a file as one row of lists; write one object per row, e.g. pandas "
                     f"df.to_json(path, orient='records', lines=True) or datasets.Dataset.from_dict(columns)"
                     f".to_json(path), as .jsonl")


def _json_value(path: Path) -> Any:
    """The JSON value a `.json` file holds (`JSON_LINES` when it holds one object per line, as Dataset.to_json
    writes); a DataError naming the place for text that is not UTF-8, broken JSON or an object repeating a key."""
    try:
        text = decode_utf8(path.read_bytes().removeprefix(BOM), str(path))
        value = json.loads(text, object_pairs_hook=_unique_keys)
        if isinstance(value, dict) and column_layout(value):
            raise columns_error(value, path)
        # one object on its line: what Dataset.to_json writes for a single row (datasets.load_dataset reads it back)
        return JSON_LINES if isinstance(value, dict) and _is_json_lines(path) else value
    except DuplicateKey as e:
        raise duplicate_key_error(_json_item_of_duplicate(path, text), e.key) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _is_json_lines(path):
            return JSON_LINES
        raise DataError(f"{path}:{e.lineno}: broken JSON ({e.msg}); fix the file "
                        f"(or write one object per line as .jsonl)") from None


def check_json_data_files(folder: Path) -> None:
    """Parse, with the checks of our own JSON reading (a key given twice, broken JSON, not UTF-8), the `.json` /
    `.jsonl` data files `datasets.load_dataset(folder)` reads (those of every split: it prepares them all), first:
    its JSON builder keeps one value of a repeated key without a word (a `.json` list goes through ujson), or fails
    on one in a JSON line with "An error occurred while generating the dataset", naming no file, line or key. The
    files are those `datasets.load_dataset_builder(folder).config.data_files` lists (a folder it cannot
    resolve is left to load_dataset's own error). Costs one more parse of each file, once per process while it is
    unchanged: 0.7-1.5 s per 50k lines (33 MB) on this 2-core machine, against ~2.5 s for load_dataset's first read."""
    from datasets import load_dataset_builder

    try:
        files = load_dataset_builder(str(folder)).config.data_files or {}
    except Exception:  # noqa: BLE001  (no data files, an unknown config...: load_dataset says so, as before)
        return
    for paths in files.values():
        for f in map(Path, paths):
            if f.suffix not in (".json", ".jsonl") or not f.is_file():
                continue
            seen = _CHECKED.state(f)
            if seen in _CHECKED:  # the same file, unchanged: a source is read more than once (first row, all rows)
                continue
            if f.suffix == ".jsonl" or _json_value(f) is JSON_LINES:
                for _ in _iter_jsonl(f):
                    pass
            _CHECKED.add(seen)


_CHECKED = UnchangedSinceChecked()  # the files check_json_data_files found sound, in the state it read them


def dataset_data_files(folder: Path) -> dict[str, list]:
    """The data files, by split, `datasets.load_dataset(folder)` would read from a dataset repository folder (listed,
    not read); a folder it finds no dataset in is a DataError naming it, as load_dataset's failure would be."""
    from datasets import load_dataset_builder

    try:
        files = load_dataset_builder(str(folder)).config.data_files or {}
    except Exception as e:  # noqa: BLE001  (what load_dataset would fail on: one line naming the folder)
        raise DataError(f"{folder}: datasets.load_dataset finds no dataset in this folder ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); point data.path at a dataset folder, a "
                        ".jsonl/.json/.parquet file or a save_to_disk folder") from None
    return {str(split): list(paths) for split, paths in files.items()}


def _iter_table(table: Any, name: str) -> Iterator[Row]:
    for i, row in enumerate(table):
        yield dict(row), f"{name} row {i}"


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def load_hf_dataset(source: str, split: str | None):
    """`datasets.load_dataset(source, split=split or "train")` for a dataset repository folder (data files, with
    or without a README declaring configs) or a Hugging Face dataset name; failures are DataErrors."""
    from datasets import load_dataset

    split = split or "train"
    try:
        return load_dataset(str(source), split=split)
    except ValueError as e:  # e.g. an unknown split
        raise DataError(f"{source}: datasets.load_dataset could not give split {split!r} ({e}); set "
                        "data.split") from None
    except Exception as e:  # noqa: BLE001  (not found, offline, no data files: one line naming the source)
        raise DataError(f"{source}: datasets.load_dataset failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); point data.path at a dataset folder, a "
                        ".jsonl/.json/.parquet file or a save_to_disk folder"
                        ) from None


def missing_split(split: str | None, splits: list[str]) -> str:
    """Why a DatasetDict's split cannot be read (none asked for and no 'train', or one it does not have) and the fix:
    before, a split it does not have (a typo, 'validation' for 'test') was answered as if none had been given."""
    if split is None:
        return f"is a DatasetDict with splits {splits}; pass split=<one of them> (data.split)"
    return (f"is a DatasetDict with splits {splits}, and split {split!r} (data.split, or data.eval_split for "
            f"data.eval_path) is not one of them; pass one of them")


def _load_dataset_dir(path: Path, split: str | None):
    from datasets import load_from_disk

    if not is_saved_dataset(path):
        check_json_data_files(path)
        return load_hf_dataset(str(path), split)
    if (path / "dataset_dict.json").exists():  # a saved DatasetDict: the split's own saved Dataset, alone
        splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text()).get("splits", [])]
        split = split if split is not None else ("train" if "train" in splits else None)
        if split is None or split not in splits:
            raise DataError(f"{path}: {missing_split(split, splits)}")
        check_saved_rows(path / split, f"{path}: split {split!r}")
        return load_from_disk(str(path / split))
    check_saved_rows(path, str(path))
    ds = load_from_disk(str(path))
    check_single_split(path, split, "a saved Dataset", str(ds.split) if ds.split is not None else "train")
    return ds


def check_saved_rows(folder: Path, where: str) -> None:
    """DataError for a saved Dataset of no rows: `save_to_disk` writes no data file for it (its state.json lists none),
    and `load_from_disk` then stops on an IndexError (compat D8), which reached the user as 'unexpected error'; other
    empty sources are one line, 'no rows'. A split of a saved DatasetDict is checked alone, so an empty `test` split no
    longer stops the reading of `train`."""
    state = folder / "state.json"
    try:
        files = json.loads(state.read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return  # not datasets' layout: load_from_disk says what is wrong
    if files == []:
        raise DataError(f"{where}: no rows; the source is empty (a saved Dataset of 0 rows)")


def has_splits(source: Any) -> bool:
    """Whether `split` chooses among the rows of `source`: a folder (a saved DatasetDict, a dataset repository), a
    Hugging Face dataset name or a `datasets.DatasetDict`; a data file or a single Dataset holds one split."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        return path.is_dir() or (not path.exists() and looks_like_hub_id(str(source)))
    return type(source).__name__ in ("DatasetDict", "IterableDatasetDict")


def check_single_split(source: Any, split: str | None, what: str, holds: str = "train") -> None:
    """DataError when `split` names a split other than the one split `holds` of a single-split source (a data file:
    "train", as datasets.load_dataset names its rows): the split was ignored and every row read."""
    if split is not None and split != holds:
        raise DataError(f"{source}: split {split!r} asked for (data.split, or data.eval_split for data.eval_path), "
                        f"but {what} holds one split ({holds!r}) and every row would be read; remove the split "
                        f"setting, or point the path at a dataset folder with a {split!r} split")


def looks_like_hub_id(value: str) -> bool:
    """"org/name" that is not a local path: a Hugging Face dataset name."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value)) and not Path(value).exists() and \
        Path(value).suffix not in (".jsonl", ".json", ".parquet")


def read_parquet(path: Path) -> list[dict]:
    """The rows of a Parquet file; a file pyarrow cannot read (empty, truncated, not Parquet) is a DataError naming
    it (it stopped the command on an "unexpected error: ArrowInvalid", naming no setting)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise parquet_error(path, e) from None


def parquet_error(path: Path, e: Exception) -> DataError:
    """The DataError for a file pyarrow could not read as Parquet (the run's, and a dry run's)."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DataError(f"{path}: not a readable Parquet file ({first}); the file is empty, truncated or not Parquet: "
                     "write it again (e.g. pandas' to_parquet / datasets' to_parquet), or point data.path at the "
                     "complete file")


class NamedRows(list):
    """A list of (row dict, where) pairs: rows that already know their place (e.g. one batch of a
    `datasets.map`, named by their index in the whole dataset)."""


def split_name(source: str, split: str | None) -> str:
    """How a folder's or dataset name's rows are named: by the source alone for its default split, `train`, and with
    the split beside it for another (`data/ [test] row 3`): a DatasetDict's train and test splits named their rows
    alike, so an error in the test split's row 3 pointed at the train split's as much."""
    return source if split in (None, "train") else f"{source} [{split}]"


def iter_rows(source: Any, split: str | None = None) -> Iterator[Row]:
    """Yield (row dict, where) from any supported source (see the module docstring)."""
    if isinstance(source, NamedRows):
        yield from source
        return
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists() and looks_like_hub_id(str(source)):
            yield from _iter_table(load_hf_dataset(str(source), split), split_name(str(source), split))
            return
        if not path.exists():
            raise DataError(f"{path}: no such file or folder; check the path (relative paths start at {Path.cwd()})")
        check_output_file(path)  # one of a command's output set a kill left mixed (generations.jsonl, augmented.jsonl)
        if not path.is_dir() and path.suffix in (".jsonl", ".json", ".parquet"):
            check_single_split(path, split, f"a {path.suffix} file")
        if path.is_dir():  # save_to_disk output, or a dataset repository folder (datasets.load_dataset)
            yield from _iter_table(_load_dataset_dir(path, split), split_name(str(path), split))
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path)
        elif path.suffix == ".json":
            value = _json_value(path)
            if value is JSON_LINES:  # JSON lines in a .json file (Dataset.to_json)
                yield from _iter_jsonl(path)
                return
            if not isinstance(value, list):
                raise DataError(f"{path}: a .json file must hold a list of objects, a dict of columns (one list per "
                                f"column) or one object per line (.jsonl); got a {type(value).__name__}")
            for i, row in enumerate(value):
                if not isinstance(row, dict):
                    raise DataError(f"{path} item {i}: expected an object, got {type(row).__name__}")
                yield row, f"{path} item {i}"
        elif path.suffix == ".parquet":
            yield from _iter_table(read_parquet(path), str(path))
        else:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or a "
                            f"save_to_disk folder")
        return
    try:
        from datasets import Dataset, DatasetDict
    except ImportError:  # pragma: no cover
        Dataset = DatasetDict = ()  # type: ignore[assignment]
    if isinstance(source, DatasetDict):
        if split is None or split not in source:
            raise DataError(f"<DatasetDict>: {missing_split(split, list(source))}")
        source = source[split]
    elif isinstance(source, Dataset):
        check_single_split("<Dataset>", split, "a Dataset", str(source.split) if source.split is not None else "train")
    if isinstance(source, Dataset):
        yield from _iter_table(source, "<Dataset>")
        return
    if isinstance(source, (list, tuple)):
        for i, row in enumerate(source):
            if not isinstance(row, dict):
                raise DataError(f"<list>[{i}]: expected a dict, got {type(row).__name__}")
            yield row, f"<list>[{i}]"
        return
    raise DataError(f"cannot read records from a {type(source).__name__}; pass a path (.jsonl/.json/.parquet/"
                    f"save_to_disk folder), a datasets.Dataset or a list of dicts")


def first_row(source: Any, split: str | None = None) -> Row:
    for row in iter_rows(source, split):
        return row
    raise DataError(f"{source_name(source)}: no rows; the source is empty")


def collect(rows: Iterable[Row], convert: Callable[[dict, str], Any], on_invalid: str = "raise",
            name: str = "") -> list:
    """Apply `convert(row, where)` (returning a record, a list of records or None) to every row."""
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    out: list = []
    skipped: list[str] = []
    for row, where in rows:
        try:
            res = convert(row, where)
        except DataError as e:
            if on_invalid == "raise":
                raise
            skipped.append(str(e))
            continue
        if isinstance(res, list):
            out.extend(res)
        elif res is not None:
            out.append(res)
    if skipped:  # one warning per source; a trainer's map batch adds them to its held notes (said once per dataset)
        ReaderNotes(skipped=len(skipped), skipped_first=skipped[:SKIPPED_SHOWN]).warn(name)
    return out


def get_field(row: dict, key: str, where: str, types: type | tuple[type, ...], expected: str) -> Any:
    """row[key], checked: a missing key or wrong type is a DataError naming place, key and fix."""
    if key not in row or row[key] is None:
        what = f"field {key!r} is null (no value)" if key in row else f"missing field {key!r} (found {sorted(row)})"
        raise DataError(f"{where}: {what}; add {key!r} ({expected})")
    value = row[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise DataError(f"{where}: field {key!r} must be {expected}, got {type(value).__name__} {str(value)[:60]!r}")
    return value
