"""The `oasst` preset of the OASST tree reader reproduces Open-Assistant's own dataset rules, beside the strict
default: checked on a hand-built tree (expected threads written by hand) and on the shared sample against an
independent re-implementation of OA's `load_oasst_export` (tests/data/test_multiturn.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.data import DataError, load_records
from tests.data.test_multiturn import OASST, _oa_threads


def msg(mid, role, replies=(), **kw):
    base = {"message_id": mid, "text": f"text of {mid}", "role": role, "lang": "en", "review_result": True,
            "deleted": False, "synthetic": False, "rank": None}
    return {**base, **kw, "replies": list(replies)}


def tree(tid, root, state="ready_for_export"):
    return {"message_tree_id": tid, "tree_state": state, "prompt": root}


TREES = [
    tree("t1", msg("R", "prompter", [
        msg("A1", "assistant", [msg("P2", "prompter"), msg("P3", "prompter")], review_result=False, rank=0),
        msg("A4", "assistant", [msg("P5", "prompter", [msg("A6", "assistant")])], synthetic=True, rank=1),
        msg("A7", "assistant", rank=2, lang="de"),
    ])),
    tree("t2", msg("S", "prompter", [msg("B1", "assistant")], lang="de")),  # a German root
    tree("t3", msg("U", "prompter", [msg("C1", "assistant")], review_result=False)),  # an unreviewed root
]


@pytest.fixture
def trees_file(tmp_path):
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TREES))
    return str(path)


def threads(records):
    return sorted(tuple(r.meta["thread"]) for r in records)


def test_hand_built_tree(trees_file):
    # Open-Assistant: English reviewed roots only; P2 (first reply, a leaf) ends a thread, cut back to A1 even though
    # A1 is unreviewed (no per-message review check); P3 (second reply) does not; A4's branch is dropped (synthetic)
    # but not its siblings; A7 is kept although German (only the root's language counts)
    assert threads(load_records(trees_file, "sft", preset="oasst")) == [("R", "A1"), ("R", "A7")]
    # strict default: A1 (unreviewed) and A4 (synthetic) go with their subtrees; every language; U's tree goes
    assert threads(load_records(trees_file, "sft")) == [("R", "A7"), ("S", "B1")]
    # ranked: R has 3 ranked replies; OA sorts them by rank whatever they are flagged
    (r,) = load_records(trees_file, "ranked", preset="oasst")
    assert [m[0]["content"] for m in r.responses] == ["text of A1", "text of A4", "text of A7"]
    # prompts (OA's "rl" mode): prompter-ending clean paths; P5 sits under the synthetic A4
    assert threads(load_records(trees_file, "prompt", preset="oasst")) == [("R",), ("R", "A1", "P2"), ("R", "A1", "P3")]
    with pytest.raises(DataError, match="unknown OASST preset 'oa'; valid: strict, oasst"):
        load_records(trees_file, "sft", preset="oa")


@pytest.mark.skipif(not OASST.exists(), reason="shared OASST sample not present")
def test_shared_sample_counts_and_threads():
    trees = [json.loads(line) for line in OASST.read_text().splitlines()]
    expected = sorted(tuple(m["message_id"] for m in t) for tr in trees for t in _oa_threads(tr))
    oa = load_records(str(OASST), "sft", preset="oasst")
    assert threads(oa) == expected and len(oa) == 197
    strict = load_records(str(OASST), "sft")
    assert len(strict) == 202  # strict also cuts back prompter leaves that are not their parent's first reply
    counts = {p: (len(load_records(str(OASST), "ranked", preset=p)), len(load_records(str(OASST), "prompt", preset=p)))
              for p in ("strict", "oasst")}
    assert counts == {"strict": (73, 37), "oasst": (73, 175)}  # the table in alignkit/data/oasst.py


def left_out_line(caplog) -> str:
    (line,) = [r.getMessage() for r in caplog.records if "preset 'oasst' left out" in r.getMessage()]
    return line


@pytest.mark.parametrize("kind, expected", [
    # by hand from TREES: the path R-A4-P5-A6 runs through the synthetic A4; P3 is R-A1's second reply, a leaf
    ("sft", "1 path(s) through a deleted or synthetic message and 1 prompter leaf (leaves) not its parent's first reply"),
    ("ranked", "1 path(s) through a deleted or synthetic message"),  # P5, under A4
    ("prompt", "1 path(s) through a deleted or synthetic message"),
])
def test_oasst_preset_counts_the_paths_it_leaves_out(trees_file, caplog, kind, expected):
    """Open-Assistant's rules drop a thread through a deleted / synthetic message, and a prompter leaf that is not its
    parent's first reply; both used to go without a word (the strict preset's filters are counted)."""
    with caplog.at_level("INFO", logger="alignkit.data.oasst"):
        load_records(trees_file, kind, preset="oasst")
    assert expected in left_out_line(caplog)


@pytest.mark.skipif(not OASST.exists(), reason="shared OASST sample not present")
def test_oasst_preset_left_out_count_on_the_shared_sample(caplog):
    """Every leaf path of the sample is a record or counted: counted independently from the raw JSON."""
    trees = [json.loads(line) for line in OASST.read_text().splitlines()]
    dirty = late = 0
    for tr in trees:
        stack = [(tr["prompt"], [], None)]
        while stack:
            m, path, parent = stack.pop()
            path = path + [m]
            if not m["replies"] and len(path) > 1:
                if m["role"] == "prompter" and parent["replies"][0] is not m:
                    late += 1
                elif any(x["deleted"] or x["synthetic"] for x in path):
                    dirty += 1
            stack += [(r, path, m) for r in m["replies"]]
    with caplog.at_level("INFO", logger="alignkit.data.oasst"):
        assert len(load_records(str(OASST), "sft", preset="oasst")) == 197
    assert dirty > 0 and late > 0
    assert (f"{dirty} path(s) through a deleted or synthetic message and {late} prompter leaf (leaves) not its "
            f"parent's first reply") in left_out_line(caplog)
