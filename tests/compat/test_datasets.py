"""datasets behaviour alignkit relies on: save_to_disk folders, map caching and features, load_dataset json
(rows D1-D8 of the table in docs/architecture.md; split from test_accelerate_datasets.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alignkit.data.readers.rows import iter_rows
from alignkit.interventions import ReftConfig
from alignkit.interventions.attach import ReftModel, get_reft_model
from alignkit.adapters.base import _PARALLEL_WRAPPERS, unwrap_parallel
from alignkit.trainers.reference import attach_reference

from .guards import check, guard, params

ACC = "accelerate"


def test_datasets_folders_rows_and_columns(tmp_path):
    """A save_to_disk folder is recognised by dataset_info.json / dataset_dict.json, its rows iterate as dicts, and
    Dataset.add_column attaches precomputed reference log-probs."""
    where = "alignkit/data/readers/rows.py:iter_rows, trainers/reference.py:attach_reference"
    with guard("datasets", "Dataset / DatasetDict / save_to_disk / load_from_disk moved", where):
        from datasets import Dataset, DatasetDict

        ds = Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
        ds.save_to_disk(str(tmp_path / "one"))
        DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "two"))
    check((tmp_path / "one" / "dataset_info.json").is_file() and (tmp_path / "two" / "dataset_dict.json").is_file(),
          "datasets", "save_to_disk no longer writes dataset_info.json / dataset_dict.json", where)
    with guard("datasets", "reading a save_to_disk folder failed", where):
        one = [r for r, _ in iter_rows(tmp_path / "one")]
        two = [r for r, _ in iter_rows(tmp_path / "two", split="train")]
        with_ref = attach_reference(ds, {"logps": torch.tensor([-1.0, -2.0])})
    want = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    check(one == want and two == want, "datasets", "rows of a saved Dataset no longer iterate as dicts", where, str(one))
    check(with_ref["reference_logps"] == [-1.0, -2.0], "datasets", "Dataset.add_column no longer adds the column",
          where)
    repo = tmp_path / "repo"  # a dataset repository folder: data files, no README
    repo.mkdir()
    (repo / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    with guard("datasets", "datasets.load_dataset(folder, split='train') failed on a folder of JSONL files",
               "alignkit/data/readers/rows.py:load_hf_dataset"):
        rows = [r for r, _ in iter_rows(repo)]
    check(rows == want, "datasets", "load_dataset(folder, split='train') no longer gives the folder's rows",
          "alignkit/data/readers/rows.py:load_hf_dataset", str(rows))
    where = "alignkit/data/readers/rows.py:check_json_data_files"
    with guard("datasets", "load_dataset_builder(folder).config.data_files failed", where):
        from datasets import load_dataset_builder

        files = {str(k): list(v) for k, v in load_dataset_builder(str(repo)).config.data_files.items()}
    check(files == {"train": [str(repo / "train.jsonl")]}, "datasets", "load_dataset_builder(folder).config.data_files "
          "no longer lists the folder's data files per split (the JSON files alignkit checks for repeated keys)", where,
          str(files))


def test_dataset_map_as_prepare_calls_it():
    """Raw TRL-style rows are tokenized with `Dataset.from_list(...).map(fn, batched=True, with_indices=True,
    remove_columns=..., num_proc=, desc=, features=, fn_kwargs=)`, one output row per input row, a dropped row's
    features None (typed by `features=` even where a whole first batch is None), then `remove_columns` of the note
    columns and `select` of the kept rows."""
    where = "alignkit/data/prepare.py:prepare_dataset"
    from datasets import Dataset, Features, List, Value

    def fn(batch, indices, keep):
        fits = [len(t) >= keep for t in batch["text"]]
        return {"n": [[len(t)] if f else None for t, f in zip(batch["text"], fits)],
                "index": list(indices), "drop": ["" if f else "short" for f in fits]}

    features = Features({"n": List(Value("int64")), "index": Value("int64"), "drop": Value("string")})
    with guard("datasets", "Dataset.from_list / Dataset.map(batched, with_indices, remove_columns, num_proc, desc, "
               "features, fn_kwargs) / remove_columns / select failed", where):
        ds = Dataset.from_list([{"text": "a", "x": 1}, {"text": "b", "x": 2}, {"text": "bbb", "x": 3},
                                {"text": "cc", "x": 4}])
        out = ds.map(fn, batched=True, batch_size=2, with_indices=True, remove_columns=ds.column_names, num_proc=None,
                     desc="Tokenizing test", features=features, fn_kwargs={"keep": 2})  # batch 1: all None
        drops = out["drop"]
        kept = out.remove_columns(["drop"]).select([i for i, d in enumerate(drops) if not d])
    check(kept.column_names == ["n", "index"] and kept["n"] == [[3], [2]] and kept["index"] == [2, 3] and
          drops == ["short", "short", "", ""], "datasets", "a batched map with features= whose first batch is all None, "
          "then remove_columns and select, no longer gives the kept rows", where, f"{kept.column_names}: {kept[:]}")
    seen = []  # batch_size=None: the whole dataset in one batch (a `whole` reader: Open-Assistant's flat trees)
    with guard("datasets", "Dataset.map(batched=True, batch_size=None) failed", where):
        ds.map(lambda batch: seen.append(len(batch["text"])) or batch, batched=True, batch_size=None)
    check(seen == [4], "datasets", "a batched map with batch_size=None no longer gives the whole dataset as one batch",
          where, f"batch sizes {seen}")


def _map_probe(batch, marker):  # a module-level map function: datasets hashes it, and fn_kwargs, into the cache key
    return {"out": [t + marker for t in batch["text"]]}


def test_dataset_map_cache_keys_on_fn_kwargs(tmp_path):
    """datasets' map cache (a dataset from files) is keyed by a fingerprint of the function and `fn_kwargs`: the same
    call again reads the cached result, a changed `fn_kwargs` value is a miss. prepare_dataset puts a hash of the code
    its features depend on into `fn_kwargs` (`prepare.feature_code`), since what the map function calls (the
    formatters, the encoding) is not part of that fingerprint."""
    where = "alignkit/data/prepare.py:prepare_dataset/feature_code"
    import datasets

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    with guard("datasets", "load_dataset('json') / Dataset.map(fn_kwargs=) with its cache failed", where):
        ds = datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=str(tmp_path / "cache"))
        first = ds.map(_map_probe, batched=True, fn_kwargs={"marker": "1"})
        again = ds.map(_map_probe, batched=True, fn_kwargs={"marker": "1"})
        other = ds.map(_map_probe, batched=True, fn_kwargs={"marker": "2"})
    files = [[c["filename"] for c in d.cache_files if "cache-" in c["filename"]] for d in (first, again, other)]
    check(all(files) and files[0] == files[1] and files[0] != files[2] and other["out"] == ["a2", "b2"], "datasets",
          "Dataset.map's cache no longer keys on fn_kwargs (feature_code in fn_kwargs then does not stop a stale hit: "
          "key the cache otherwise)", where, f"cache files {files}, {other['out']}")


def test_dataset_from_list_takes_the_first_rows_keys():
    """`Dataset.from_list` builds its columns from the first row's keys and drops a key first given in a later row
    without a word; prepare_dataset gives every row every key first, so a trainer's list of dicts keeps a `weight`
    given from row 1 on (and its reader sees it)."""
    where = "alignkit/data/prepare.py:prepare_dataset"
    from datasets import Dataset

    with guard("datasets", "Dataset.from_list of rows with different keys failed", where):
        ds = Dataset.from_list([{"prompt": "a"}, {"prompt": "b", "weight": 2.0}])
        filled = Dataset.from_list([{"prompt": "a", "weight": None}, {"prompt": "b", "weight": 2.0}])
    check(ds.column_names == ["prompt"] and filled.column_names == ["prompt", "weight"] and
          filled["weight"] == [None, 2.0], "datasets", "Dataset.from_list no longer takes the first row's keys only "
          "(the filling in prepare_dataset is then redundant: drop it and this row)", where,
          f"{ds.column_names} / {filled.column_names}")


def test_datasets_infers_the_features_prepare_declares():
    """prepare_dataset declares its map's output features (`prepare.map_features`) instead of inferring them from rows
    tokenized a second time. To keep the dtypes and datasets' cache file names of that inference, the declaration must
    be what `Dataset.from_dict` infers from the map function's rows: int lists as int64, but a column named
    `input_ids` as int32 (datasets' column-name optimisation, OptimizedTypedSequence), nested lists alike; and it
    must hash (`Hasher`, the map's fingerprint) as the inferred features do."""
    where = "alignkit/data/prepare.py:map_features"
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    from alignkit.data.prepare import NOTE_COLUMNS, map_features

    notes = {"_alignkit_drop": ["", "prompt_too_long"], "_alignkit_prompt_cut": [0, 1], "_alignkit_completion_cut": [1, 0],
             "_alignkit_unrendered": ["", "system"], "_alignkit_identical": [0, 1]}
    assert set(notes) <= set(NOTE_COLUMNS)
    notes = {k: notes.get(k, ["", ""]) for k in NOTE_COLUMNS}  # in the map's column order
    rows = {
        "sft": {"input_ids": [[1, 5, 9], None], "completion_mask": [[0, 1, 1], None], "prompt_length": [1, None],
                "length": [3, None], "weight": [1.0, None], "id": ["r0", "r1"]},
        "ranked": {"input_ids": [[[1, 5], [1, 6, 7]], None], "completion_mask": [[[0, 1], [0, 1, 1]], None],
                   "ranks": [[0, 1], None], "prompt_length": [1, None], "length": [5, None], "weight": [0.5, None],
                   "id": ["r0", "r1"]},
        "preference": {"chosen_input_ids": [[1, 5], None], "chosen_completion_mask": [[0, 1], None],
                       "rejected_input_ids": [[1, 6], None], "rejected_completion_mask": [[0, 1], None],
                       "prompt_length": [1, None], "length": [2, None], "margin": [0.5, None], "weight": [1.0, None],
                       "id": ["r0", "r1"]},
    }
    for kind, columns in rows.items():
        with guard("datasets", "Dataset.from_dict no longer infers features from python lists", where):
            inferred = Dataset.from_dict({**columns, **notes}).features
        declared = map_features(kind)
        check(list(declared.items()) == list(inferred.items()), "datasets", f"{kind}: from_dict infers "
              f"{dict(inferred)}, prepare declares {dict(declared)}", where)
        check(Hasher.hash(declared) == Hasher.hash(inferred), "datasets", f"{kind}: equal Features hash apart: the "
              "map's fingerprint (its cache file) differs from the inferred features'", where)
    check(str(map_features("sft")["input_ids"].feature.dtype) == "int32", "datasets", "input_ids no longer int32",
          where)


def test_load_dataset_json_reads_a_dict_of_columns_as_one_row(tmp_path):
    """`datasets.load_dataset("json")` reads a `.json` dict of columns (`{"prompt": [...], ...}`, and pandas'
    `to_json(orient="columns")` {column: {index: value}}), pretty-printed or on one line, as ONE row holding the whole
    columns; alignkit refuses such a file (`rows.columns_error`), in a folder's data files too, rather than read rows
    from it that datasets (and TRL's scripts) do not."""
    import json

    where = "alignkit/data/readers/rows.py:column_layout/columns_error"
    from datasets import load_dataset

    from alignkit.data.records import DataError

    lists = {"prompt": ["p0", "p1", "p2"], "completion": ["c0", "c1", "c2"]}
    index = {k: {str(i): x for i, x in enumerate(v)} for k, v in lists.items()}
    read, refused = {}, []
    for name, value in (("lists", lists), ("index", index)):
        for indent in (2, None):
            path = tmp_path / f"{name}{indent}" / "data.json"
            path.parent.mkdir()
            path.write_text(json.dumps(value, indent=indent))
            with guard("datasets", "load_dataset('json') of a dict of columns failed", where):
                ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
            read[f"{name}{indent}"] = ds.to_list()
            try:
                list(iter_rows(path))
            except DataError as e:
                refused.append("dict of columns" in str(e) and str(path) in str(e))
    check(all(rows == [value] for (name, rows), value in zip(read.items(), (lists, lists, index, index))), "datasets",
          "load_dataset('json') no longer reads a dict of columns as one row (if it reads it as rows now, alignkit "
          "can read it so too: drop rows.columns_error)", where, str(read))
    assert refused == [True] * 4


def test_an_empty_saved_dataset_has_no_data_file_and_load_from_disk_fails_on_it(tmp_path):
    """D8: `save_to_disk` of a Dataset of 0 rows lists no data file in its state.json, and `load_from_disk` of it (or
    of a DatasetDict holding it) raises; a DatasetDict's splits are saved Datasets in sub-folders named by split,
    listed in dataset_dict.json, each loadable alone."""
    where = "alignkit/data/readers/rows.py:_load_dataset_dir/check_saved_rows"
    import json

    with guard("datasets", "save_to_disk / load_from_disk of a DatasetDict moved", where):
        from datasets import Dataset, DatasetDict, load_from_disk

        full = Dataset.from_list([{"prompt": "a", "completion": "b"}])
        DatasetDict({"train": full, "test": full.select([])}).save_to_disk(str(tmp_path / "dict"))
        splits = json.loads((tmp_path / "dict" / "dataset_dict.json").read_text())["splits"]
        state = json.loads((tmp_path / "dict" / "test" / "state.json").read_text())
        train = [dict(r) for r in load_from_disk(str(tmp_path / "dict" / "train"))]
    check(splits == ["train", "test"] and train == [{"prompt": "a", "completion": "b"}], "datasets",
          "a saved DatasetDict's splits are no longer listed in dataset_dict.json and saved in sub-folders named by "
          "split", where, str(splits))
    check(state.get("_data_files") == [], "datasets", "an empty saved Dataset's state.json no longer lists an empty "
          "_data_files (check_saved_rows would not see it is empty)", where, str(state))
    try:
        load_from_disk(str(tmp_path / "dict" / "test"))
        loaded = True
    except IndexError:
        loaded = False
    check(not loaded, "datasets", "load_from_disk now reads an empty saved Dataset: check_saved_rows' refusal may go "
          "(the reader's own 'no rows' line would then say it)", where)
