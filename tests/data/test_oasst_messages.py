"""Open-Assistant flat message exports: the shared tree sample, flattened here into one row per message
(shuffled), must give exactly the tree reader's records; broken exports name the row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignkit.data import DataError, load_records, read_oasst, read_oasst_messages

OASST = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "oasst"
TREES = OASST / "oasst_en_trees_sample.jsonl"


def flatten(tree: dict) -> list[dict]:
    """oasst1-style rows: the message's own fields + parent_id, message_tree_id, tree_state; no replies."""
    out = []

    def walk(msg: dict, parent: str | None) -> None:
        out.append({**{k: v for k, v in msg.items() if k != "replies"}, "parent_id": parent,
                    "message_tree_id": tree["message_tree_id"], "tree_state": tree["tree_state"]})
        for r in msg.get("replies", []):
            walk(r, msg["message_id"])

    walk(tree["prompt"], None)
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def flat_file(tmp_path_factory):
    if not TREES.exists():
        pytest.skip(f"OASST samples not found at {OASST}")
    rows = [m for line in TREES.read_text().splitlines() if line.strip() for m in flatten(json.loads(line))]
    random.Random(0).shuffle(rows)  # trees interleaved, replies before parents: grouping must not care
    return write(tmp_path_factory.mktemp("oasst") / "messages.jsonl", rows)


def content(records) -> list:
    return sorted(json.dumps([r.prompt, getattr(r, "completion", None), getattr(r, "responses", None),
                              getattr(r, "ranks", None), r.meta], sort_keys=True, default=str) for r in records)


@pytest.mark.parametrize("kind,expected", [("sft", 202), ("ranked", 73), ("prompt", 37)])
def test_flat_export_equals_tree_export(flat_file, kind, expected):
    flat = read_oasst_messages(flat_file, kind=kind)
    assert len(flat) == expected  # the tree reader's counts on this sample (tests/data/test_oasst.py)
    assert content(flat) == content(read_oasst(TREES, kind=kind))


def test_reader_detected_from_columns(flat_file):
    assert len(load_records(flat_file, kind="sft")) == 202


def _msg(mid, parent, tree="t1", role="prompter", **kw):
    return {"message_id": mid, "parent_id": parent, "message_tree_id": tree, "tree_state": "ready_for_export",
            "text": f"text {mid}", "role": role, "lang": "en", "review_result": True, "deleted": False,
            "synthetic": False, **kw}


def test_small_tree_by_hand(tmp_path):
    rows = [_msg("a2", "p", role="assistant", rank=1), _msg("p", None), _msg("a1", "p", role="assistant", rank=0)]
    recs = read_oasst_messages(write(tmp_path / "m.jsonl", rows), kind="ranked")
    assert len(recs) == 1
    assert [r[0]["content"] for r in recs[0].responses] == ["text a1", "text a2"]  # ordered by rank, not by row


def test_orphan_message_names_its_line(tmp_path):
    rows = [_msg("p", None), _msg("x", "missing", role="assistant")]
    with pytest.raises(DataError, match=r"m\.jsonl:2: message x replies to missing"):
        read_oasst_messages(write(tmp_path / "m.jsonl", rows))


def test_two_roots_and_duplicates(tmp_path):
    with pytest.raises(DataError, match="2 root messages"):
        read_oasst_messages(write(tmp_path / "a.jsonl", [_msg("p", None), _msg("q", None)]))
    with pytest.raises(DataError, match=r"b\.jsonl:2: message_id p appears twice \(first at .*b\.jsonl:1\)"):
        read_oasst_messages(write(tmp_path / "b.jsonl", [_msg("p", None), _msg("p", None)]))


@pytest.mark.parametrize("loop", [[_msg("s", "s")], [_msg("x", "y"), _msg("y", "x", role="assistant")]])
def test_a_message_whose_parents_loop_is_refused_at_its_line(tmp_path, loop):
    """A message whose parent_id chain loops (onto itself, or two messages onto each other) hangs from no root: the
    tree was read from its root and those messages were left out without a word. Now the row is named."""
    rows = [_msg("p", None), _msg("a", "p", role="assistant"), *loop]
    with pytest.raises(DataError, match=rf"m\.jsonl:3: message {loop[0]['message_id']} of tree t1 does not lead back "
                                        rf"to its root p \(its parent_id chain loops; {len(loop)} such message"):
        read_oasst_messages(write(tmp_path / "m.jsonl", rows))


def test_skip_keeps_the_good_trees(tmp_path):
    rows = [_msg("p", None), _msg("a", "p", role="assistant"), _msg("x", "missing", tree="t2", role="assistant")]
    recs = read_oasst_messages(write(tmp_path / "m.jsonl", rows), on_invalid="skip")
    assert [r.completion[0]["content"] for r in recs] == ["text a"]


def test_a_trainers_flat_export_is_read_whole_not_per_map_batch(flat_file, tokenizer, caplog):
    """A trainer given the flat export as a datasets.Dataset read it one 1,000-row map batch at a time, so a tree
    whose messages fell in two batches stopped the run on "message ... replies to ..., which is not in tree ... in
    this file; export whole trees" although the data was whole. The reader is now marked `whole` and its rows are
    read in one batch (num_proc is not used for it, with a warning): the same records as the file read whole."""
    from datasets import Dataset

    from alignkit.data import tokenize_records
    from alignkit.data.prepare import prepare_dataset

    base = [json.loads(line) for line in flat_file.read_text().splitlines()]
    rows = [{**r, **{k: f"{c}-{r[k]}" for k in ("message_id", "parent_id", "message_tree_id") if r[k] is not None}}
            for c in range(4) for r in base]  # 1,736 rows, 4 copies of the trees, messages shuffled
    random.Random(1).shuffle(rows)
    expected, _ = tokenize_records(load_records(Dataset.from_list(rows), "sft"), tokenizer)
    assert len(load_records(Dataset.from_list(rows), "sft")) == 4 * 202
    for num_proc in (None, 2):
        caplog.clear()
        with caplog.at_level("WARNING"):
            out, kind = prepare_dataset(Dataset.from_list(rows), tokenizer, ("sft",), num_proc=num_proc)
        assert kind == "sft" and sorted(map(tuple, out["input_ids"])) == sorted(tuple(e["input_ids"]) for e in expected)
        said = [r.getMessage() for r in caplog.records if "num_proc" in r.getMessage()]
        assert said == ([] if num_proc is None else [
            "train_dataset: reader 'oasst-messages' joins rows from anywhere in the dataset (a tree's messages), so the "
            "rows are read in one batch by one process: num_proc=2 is not used for it"])
