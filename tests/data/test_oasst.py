"""Open-Assistant tree reader on the real sample, with counts derived by a separate naive walk."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from alignkit.data import DataError, load_records, read_oasst, split_records

OASST = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "oasst"
TREES = OASST / "oasst_en_trees_sample.jsonl"
PROMPTS = OASST / "oasst_en_prompts_sample.jsonl"
pytestmark = pytest.mark.skipif(not TREES.exists(), reason=f"OASST samples not found at {OASST} "
                                "(CI puts shared/ beside the repo clone)")


def trees() -> list[dict]:
    return [json.loads(line) for line in TREES.read_text().splitlines() if line.strip()]


def keep(msg, langs=None):  # the default filters, written out again
    return (not msg.get("deleted") and not msg.get("synthetic") and msg.get("review_result") is True
            and (langs is None or msg.get("lang") in langs))


def filtered(msg, langs=None):
    """A copy of the tree with filtered messages (and their subtrees) removed, or None."""
    if not keep(msg, langs):
        return None
    kids = [filtered(r, langs) for r in msg.get("replies", [])]
    return {**msg, "replies": [k for k in kids if k is not None]}


def nodes(msg):
    yield msg
    for r in msg["replies"]:
        yield from nodes(r)


def kept_roots(rows, langs=None):
    out = [filtered(t["prompt"], langs) for t in rows if t["tree_state"] == "ready_for_export"]
    return [r for r in out if r is not None]


def test_sft_leaves_count():
    # a conversation end = an assistant leaf, or an assistant whose reply is an unanswered prompter leaf
    expected = sum(1 for root in kept_roots(trees()) for n in nodes(root) if n["role"] == "assistant" and (
        not n["replies"] or any(not p["replies"] for p in n["replies"])))
    recs = load_records(TREES, kind="sft")
    assert len(recs) == expected > 100
    assert all(r.completion[0]["role"] == "assistant" and r.prompt[-1]["role"] == "user" for r in recs)
    assert len({r.meta["message_id"] for r in recs}) == len(recs)


def test_sft_every_turn_and_best_counts():
    roots = kept_roots(trees())
    assert len(load_records(TREES, kind="sft", mode="every_turn")) == sum(
        1 for root in roots for n in nodes(root) if n["role"] == "assistant")
    best = load_records(TREES, kind="sft", mode="best")
    assert len(best) == sum(1 for root in roots if root["replies"])
    # the first turn of every best thread is the rank-0 reply when the root's replies are ranked
    for rec in best:
        root = next(r for r in roots if r["message_id"] == rec.meta["tree_id"])
        ranked = [r for r in root["replies"] if r.get("rank") is not None]
        first = rec.completion[0]["content"] if len(rec.prompt) == 1 else rec.prompt[1]["content"]
        if ranked:
            assert first == min(ranked, key=lambda r: r["rank"])["text"]


def test_ranked_count_and_order():
    groups = [n for root in kept_roots(trees()) for n in nodes(root)
              if n["role"] == "prompter" and sum(r.get("rank") is not None for r in n["replies"]) >= 2]
    recs = load_records(TREES, kind="ranked")
    assert len(recs) == len(groups) > 20
    for rec, g in zip(recs, groups):
        ranked = sorted((r for r in g["replies"] if r.get("rank") is not None), key=lambda r: r["rank"])
        assert [resp[0]["content"] for resp in rec.responses] == [r["text"] for r in ranked]
        assert rec.prompt[-1]["content"] == g["text"]
    n_pairs = sum(sum(1 for i in range(len(r.ranks)) for j in range(i + 1, len(r.ranks)) if r.ranks[i] < r.ranks[j])
                  for r in recs)
    assert len(load_records(TREES, kind="preference")) == n_pairs


def test_synthetic_tree_by_hand():
    # line 1 is a synthetic tree: one prompt and three assistant replies ranked 0, 1, 2
    assert [r for r in load_records(TREES, kind="ranked") if r.id.startswith(f"{TREES}:1 ")] == []
    recs = [r for r in load_records(TREES, kind="ranked", drop_synthetic=False) if r.id.startswith(f"{TREES}:1 ")]
    assert len(recs) == 1 and recs[0].ranks == [0, 1, 2]
    assert recs[0].prompt == [{"role": "user", "content": "How can I find the best 401k plan for my needs?"}]
    assert recs[0].responses[0][0]["content"].startswith("The first step is to research")
    assert recs[0].responses[2][0]["content"].startswith("The best way to find")


def test_prompts():
    roots = kept_roots(trees())
    recs = load_records(TREES, kind="prompt")
    assert [r.prompt[0]["content"] for r in recs] == [r["text"] for r in roots]
    all_p = load_records(TREES, kind="prompt", prompts="all")
    assert len(all_p) == sum(1 for root in roots for n in nodes(root) if n["role"] == "prompter")
    lines = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    plain = load_records(PROMPTS)
    assert [r.prompt for r in plain] == lines and len(plain) == 100


def test_filters_remove_subtrees(tmp_path):
    rows = trees()[1:4]
    rows[0]["prompt"]["replies"][0]["deleted"] = True
    rows[1]["prompt"]["replies"][0]["review_result"] = None
    rows[2]["prompt"]["replies"][-1]["lang"] = "de"
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))

    def n_assistant(roots):
        return sum(1 for root in roots for n in nodes(root) if n["role"] == "assistant")

    everything = n_assistant([t["prompt"] for t in rows])
    expected = n_assistant(kept_roots(rows, langs=["en"]))
    assert len(read_oasst(f, kind="sft", mode="every_turn", langs="en")) == expected < everything
    # each filter alone removes exactly the flagged message's subtree
    dele = sum(1 for n in nodes(rows[0]["prompt"]["replies"][0]) if n["role"] == "assistant")
    unrev = sum(1 for n in nodes(rows[1]["prompt"]["replies"][0]) if n["role"] == "assistant")
    de = sum(1 for n in nodes(rows[2]["prompt"]["replies"][-1]) if n["role"] == "assistant")
    assert dele > 0 and unrev > 0 and de > 0
    assert len(read_oasst(f, kind="sft", mode="every_turn", drop_unreviewed=False)) == everything - dele
    assert len(read_oasst(f, kind="sft", mode="every_turn", drop_deleted=False)) == everything - unrev
    assert len(read_oasst(f, kind="sft", mode="every_turn", drop_deleted=False, drop_unreviewed=False,
                          langs="en")) == everything - de
    assert read_oasst(f, kind="sft", langs=["fr"]) == []  # every root is English


def test_ties_and_missing_ranks(tmp_path):
    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "message_id": "p", "text": "Q?", "role": "prompter", "review_result": True, "replies": [
            {"message_id": "a", "text": "A", "role": "assistant", "review_result": True, "rank": 1, "replies": []},
            {"message_id": "b", "text": "B", "role": "assistant", "review_result": True, "rank": 0, "replies": []},
            {"message_id": "c", "text": "C", "role": "assistant", "review_result": True, "rank": 1, "replies": []},
            {"message_id": "d", "text": "D", "role": "assistant", "review_result": True, "replies": []}]}}
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(tree) + "\n")
    (rec,) = read_oasst(f, kind="ranked")
    assert [r[0]["content"] for r in rec.responses] == ["B", "A", "C"] and rec.ranks == [0, 1, 1]  # D unranked
    pairs = load_records(f, kind="preference")
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("B", "A"), ("B", "C")]
    (best,) = read_oasst(f, kind="sft", mode="best")
    assert best.completion[0]["content"] == "B"


def test_split_by_tree_is_disjoint():
    recs = load_records(TREES, kind="sft")
    train, val = split_records(recs, "80,20", seed=3, group_by="tree_id")
    t_trees, v_trees = {r.meta["tree_id"] for r in train}, {r.meta["tree_id"] for r in val}
    assert not t_trees & v_trees and len(train) + len(val) == len(recs)
    assert len(v_trees) == round(0.2 * len(t_trees | v_trees))


def test_errors_name_the_line(tmp_path):
    row = trees()[1]
    bad = copy.deepcopy(row)
    bad["prompt"]["replies"][0]["role"] = "bot"
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: message .* role 'bot'"):
        read_oasst(f)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(row) + "\n")
    assert len(read_oasst(f, on_invalid="skip")) == len(read_oasst(good)) > 0
    with pytest.raises(DataError, match="gives sft/ranked/prompt"):
        load_records(TREES, kind="unpaired")


@pytest.mark.parametrize("kind, options, message", [
    ("ranked", {"mode": "best"}, "data.reader_options.mode: 'best' chooses the sft records of the OASST trees, and "
     "this command reads ranked records from them, so it would be ignored; remove it"),
    ("preference", {"mode": "every_turn"}, "data.reader_options.mode: 'every_turn' chooses the sft records"),
    ("sft", {"prompts": "all"}, "data.reader_options.prompts: 'all' chooses the prompt records of the OASST trees, "
     "and this command reads sft records from them"),
    ("sft", {"preset": "oasst", "mode": "best"}, "data.reader_options.mode: 'best' does not apply to preset 'oasst'"),
    ("ranked", {"preset": "oasst", "drop_synthetic": False},
     "data.reader_options.drop_synthetic: False does not apply to preset 'oasst'"),
    ("prompt", {"preset": "oasst", "tree_states": ["ready_for_export", "growing"]},
     "data.reader_options.tree_states: ('ready_for_export', 'growing') does not apply to preset 'oasst'"),
])
def test_an_option_this_read_would_ignore_is_refused(kind, options, message):
    with pytest.raises(DataError) as e:  # each was accepted and had no effect on the records
        load_records(str(TREES), kind, **options)
    assert str(e.value).startswith(message)


def test_options_at_their_defaults_and_options_that_apply_are_accepted():
    assert load_records(str(TREES), "ranked", mode="leaves", prompts="roots", tree_states=["ready_for_export"])
    assert load_records(str(TREES), "sft", preset="oasst", drop_deleted=True)
    assert len(load_records(str(TREES), "prompt", prompts="all")) == 175  # the module docstring's table


def test_tree_states_as_one_string_is_one_state_not_a_substring(tmp_path):
    """YAML `tree_states: ready_for_export` (a string) was matched as a substring: a tree in state "export" (or
    "ready") was kept. Now a string is one state, as for `langs`."""
    rows = [t for t in trees() if t["tree_state"] == "ready_for_export" and keep(t["prompt"])][:3]
    rows[1]["tree_state"] = "export"
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ids = {r.meta["tree_id"] for r in read_oasst(f, kind="prompt", tree_states="ready_for_export")}
    assert ids == {rows[0]["message_tree_id"], rows[2]["message_tree_id"]}


def test_langs_match_case_insensitively_and_a_language_matching_no_tree_is_named(caplog):
    """`langs: [EN]` removed every (English) tree, with only an INFO log. Now languages match case-insensitively;
    languages matching no tree's first message log a warning naming those present."""
    roots = [t["prompt"] for t in trees() if t["tree_state"] == "ready_for_export" and keep(t["prompt"])]
    assert len(read_oasst(TREES, kind="prompt", langs=["EN"])) == len(roots) == 37
    assert len(read_oasst(TREES, kind="prompt", langs=["EN"], preset="oasst")) == 175  # the docstring's table
    assert read_oasst(TREES, kind="prompt", langs="En") == read_oasst(TREES, kind="prompt", langs=["en"])
    with caplog.at_level("WARNING"):
        assert read_oasst(TREES, kind="prompt", langs=["english"]) == []
    assert "reader_options.langs ['english'] matches no tree's first message (their languages: {'en': 40})" \
        in caplog.text


@pytest.mark.parametrize("key", ["drop_deleted", "drop_synthetic", "drop_unreviewed"])
def test_a_quoted_bool_filter_option_is_refused(key):
    """reader_options `drop_deleted: "false"` (a string) was truthy: the filter stayed on, the same records as the
    default, without a word. Now refused, naming the key."""
    with pytest.raises(DataError) as e:
        read_oasst(TREES, kind="sft", **{key: "false"})
    assert str(e.value) == (f"data.reader_options.{key}: must be true or false, got 'false' (a str); write it "
                            "without quotes")


def ranked_counts(caplog) -> tuple[int, ...]:
    """(records, unanswered turns, turns with < 2 ranked replies, tied pairs) from the reader's log line."""
    import re

    (line,) = [r.getMessage() for r in caplog.records if "OASST ranked records" in r.getMessage()]
    m = re.search(r"records: (\d+), none from (\d+) .* without an assistant reply and (\d+) .* fewer than 2 ranked "
                  r"replies; (\d+) tied", line)
    return tuple(int(x) for x in m.groups())


@pytest.mark.parametrize("preset", ["strict", "oasst"])
def test_turns_without_a_ranked_record_and_tied_pairs_are_counted(preset, tmp_path, caplog):
    """Prompter turns with fewer than 2 ranked replies gave no ranked record, and tied replies no pair, without a
    count. Now one INFO line with the filters' gives each count. By hand: P's replies ranked 0, 1, 1 (and one
    unranked): a record, 1 tied pair; P2 one ranked reply: none; P3 unanswered: none; P4 three replies ranked 0:
    a record, 3 tied pairs. On the shared sample: the counts of a naive walk of the filtered trees."""
    def msg(mid, role, rank=None, replies=()):
        return {"message_id": mid, "text": mid, "role": role, "review_result": True, "lang": "en", "rank": rank,
                "replies": list(replies)}

    tree = msg("P", "prompter", replies=[
        msg("A", "assistant", 0, [msg("P2", "prompter", replies=[msg("E", "assistant", 0)])]),
        msg("B", "assistant", 1, [msg("P3", "prompter")]),
        msg("C", "assistant", 1, [msg("P4", "prompter", replies=[msg(x, "assistant", 0) for x in "FGH"])]),
        msg("D", "assistant")])
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": tree}) + "\n")
    with caplog.at_level("INFO", logger="alignkit.data.oasst"):
        assert len(read_oasst(f, kind="ranked", preset=preset)) == 2
    assert ranked_counts(caplog) == (2, 1, 1, 4)
    if preset == "oasst":
        return
    caplog.clear()
    turns = [n for t in trees() if t["tree_state"] == "ready_for_export" and (root := filtered(t["prompt"]))
             for n in nodes(root) if n["role"] == "prompter"]
    ranks = [[r["rank"] for r in n["replies"] if r.get("rank") is not None] for n in turns]
    want = (sum(len(r) >= 2 for r in ranks), sum(not n["replies"] for n in turns),
            sum(len(r) < 2 and bool(n["replies"]) for n, r in zip(turns, ranks)),
            sum(a == b for r in ranks if len(r) >= 2 for i, a in enumerate(r) for b in r[i + 1:]))
    with caplog.at_level("INFO", logger="alignkit.data.oasst"):
        assert len(read_oasst(TREES, kind="ranked")) == want[0]
    assert ranked_counts(caplog) == want and sum(want[:3]) == len(turns)


@pytest.mark.parametrize("preset", ["strict", "oasst"])
def test_unranked_replies_beside_ranked_ones_are_counted(preset, tmp_path, caplog):
    """A turn with >= 2 ranked replies gives a ranked record of those; its unranked replies (never compared) were
    left out of it without a count. By hand: P's replies ranked 0, 1 and two unranked (C, D): 2 left out; P2's
    only reply is unranked (no record: counted as a turn with fewer than 2 ranked replies, not here)."""
    def msg(mid, role, rank=None, replies=()):
        return {"message_id": mid, "text": mid, "role": role, "review_result": True, "lang": "en", "rank": rank,
                "replies": list(replies)}

    tree = msg("P", "prompter", replies=[msg("A", "assistant", 0), msg("B", "assistant", 1),
                                         msg("C", "assistant", None, [msg("P2", "prompter", replies=[msg("E", "assistant")])]),
                                         msg("D", "assistant")])
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": tree}) + "\n")
    with caplog.at_level("INFO", logger="alignkit.data.oasst"):
        (record,) = read_oasst(f, kind="ranked", preset=preset)
    assert [r[0]["content"] for r in record.responses] == ["A", "B"]
    assert ranked_counts(caplog) == (1, 0, 1, 0)
    (line,) = [r.getMessage() for r in caplog.records if "OASST ranked records" in r.getMessage()]
    assert "; 2 unranked assistant reply(ies) of those turns left out (never compared)" in line, line


def test_a_batch_of_tree_rows_read_alone_is_named_by_its_rows_not_its_text(caplog):
    """read_oasst named its source by str(source): a trainer's map batch (NamedRows) by the repr of all its trees
    ("[({'message_tree_id': ..."), built for every batch. Now as the column readers name it: by its rows."""
    import logging

    from alignkit.data.readers.rows import NamedRows

    tree = {"message_tree_id": "t", "tree_state": "ready_for_export",
            "prompt": {"message_id": "m", "text": "Q", "role": "prompter", "lang": "de", "review_result": True}}
    rows = NamedRows((dict(tree, message_tree_id=f"t{i}"), f"train_dataset row {i}") for i in range(2))
    with caplog.at_level(logging.INFO, logger="alignkit.data.oasst"):
        assert read_oasst(rows, kind="prompt", langs="en") == []
    assert [r.getMessage() for r in caplog.records] == [
        "train_dataset rows 0-1: OASST filters removed {'lang': 2, 'removed with their parent': 0}",
        "train_dataset rows 0-1: reader_options.langs ['en'] matches no tree's first message (their languages: "
        "{'de': 2}), so every tree was removed; set langs to some of those"]


# F6 (audit, session 25): filter typos. The valid tree states are Open-Assistant's `State` enum
# (backend/oasst_backend/models/message_tree_state.py), written out here, not taken from the reader.
OA_STATES = ["initial_prompt_review", "prompt_lottery_waiting", "growing", "ranking", "backlog_ranking",
             "ready_for_scoring", "scoring_failed", "ready_for_export", "aborted_low_grade", "halted_by_moderator"]


@pytest.mark.parametrize("states,typo", [("ready", "ready"),
                                         (["ready_for_export", "prompt_lottery_wating"], "prompt_lottery_wating")])
def test_a_tree_state_open_assistant_does_not_have_is_refused_listing_the_valid_ones(states, typo):
    """`tree_states: ready` kept no tree with only an INFO line, and a typo beside a valid state was silent."""
    with pytest.raises(DataError) as e:
        load_records(TREES, kind="sft", tree_states=states)
    text = str(e.value)
    assert f"tree_states: {typo!r} is not an Open-Assistant tree state" in text and "\n" not in text
    assert all(state in text for state in OA_STATES)
    assert len(load_records(TREES, kind="sft", tree_states=["ready_for_export", "growing"])) == 202  # valid: read


def test_a_language_matching_no_tree_beside_one_that_matches_is_warned_once_per_value(caplog):
    """`langs: [en, dee]` kept the English trees and said nothing of 'dee'."""
    with caplog.at_level("WARNING", logger="alignkit.data.oasst"):
        assert len(load_records(TREES, kind="sft", langs=["en", "dee", "xx", "DEE"])) == 202  # the docstring's count
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # 'dee' (given twice, case aside) and 'xx', once each
    assert "langs value 'dee' matches no tree's first message (their languages: {'en': 40})" in said[0]
    assert "langs value 'xx'" in said[1]


def test_filters_removing_every_tree_are_named_with_the_values_the_file_holds(caplog):
    """A valid state no tree of the file is in removed all 40 trees: an INFO line, then the CLI's "holds no sft
    records" named no filter. Now a warning, and the CLI's error names the filter and the file's states."""
    from alignkit.cli.data import read_records
    from alignkit.settings import ConfigError, DataSettings

    with caplog.at_level("WARNING", logger="alignkit.data.oasst"):
        assert load_records(TREES, kind="sft", tree_states="growing") == []
    assert "removed all 40 trees" in caplog.text and "{'ready_for_export': 40}" in caplog.text
    ds = DataSettings(path=str(TREES), reader_options={"tree_states": ["growing"]})
    with pytest.raises(ConfigError) as e:
        read_records(ds.path, ds, "sft", None, "data.path")
    text = str(e.value)
    assert text.startswith(f"data.path: {TREES} holds no sft records; ") and "\n" not in text
    assert "tree_states ['growing'] removed 40 (the file's tree states: {'ready_for_export': 40})" in text
    ds = DataSettings(path=str(TREES), reader_options={"langs": ["de"]})
    with pytest.raises(ConfigError) as e:  # 3 roots are synthetic (drop_synthetic), the other 37 English
        read_records(ds.path, ds, "sft", None, "data.path")
    assert "langs ['de'] removed 37 (the languages of the trees' first messages: {'en': 40})" in str(e.value)
    assert "drop_synthetic=true removed 3" in str(e.value)
