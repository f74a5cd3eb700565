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
