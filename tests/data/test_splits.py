"""Phase splits: disjoint, covering, deterministic, in proportion; groups never span two parts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from alignkit.cli.data import read_splits
from alignkit.data import DataError, SFTRecord, load_records, parse_fractions, split_indices, split_records
from alignkit.data.splits import part_sizes, source_group
from alignkit.settings import DataSettings


def test_parse_fractions():
    assert parse_fractions("2,4,4") == [0.2, 0.4, 0.4]
    assert parse_fractions([95, 5]) == [0.95, 0.05]
    for bad in ("a,b", "0,0", "-1,2"):
        with pytest.raises(DataError):
            parse_fractions(bad)


@pytest.mark.parametrize("method", ["permutation", "hash"])
@pytest.mark.parametrize("spec", ["nan,1", "inf,1", "1,nan", [1e308, 1e308]])
def test_non_finite_weights_are_refused(spec, method):
    # before: the hash split put all 10 items in the last part ([[], [0..9]]; 1e308 + 1e308 overflows to inf, so
    # both fractions were 0), and the permutation split stopped on "cannot convert float NaN to integer"
    with pytest.raises(DataError, match="weights must be finite numbers >= 0 with a positive, finite sum"):
        split_indices(10, spec, method=method)


def test_part_sizes_largest_remainder():
    assert part_sizes(10, [0.2, 0.4, 0.4]) == [2, 4, 4]
    assert part_sizes(11, [0.2, 0.4, 0.4]) == [2, 5, 4]  # 2.2, 4.4, 4.4: one extra to the first largest remainder
    assert part_sizes(3, [1 / 3] * 3) == [1, 1, 1]


@pytest.mark.parametrize("method", ["permutation", "hash"])
def test_phase_split_properties(method):
    n = 1000
    parts = split_indices(n, "2,4,4", seed=7, method=method)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    assert parts == split_indices(n, "2,4,4", seed=7, method=method)  # deterministic
    assert parts != split_indices(n, "2,4,4", seed=8, method=method)
    sizes = [len(p) for p in parts]
    if method == "permutation":
        assert sizes == [200, 400, 400]
    else:  # binomial: 4 standard deviations
        for s, f in zip(sizes, (0.2, 0.4, 0.4)):
            assert abs(s - n * f) < 4 * (n * f * (1 - f)) ** 0.5


@pytest.mark.parametrize("method", ["permutation", "hash"])
def test_a_part_left_empty_is_warned(method, caplog):
    """Two items split "2,4,4" (largest remainder: 0.4, 0.8, 0.8 -> 0, 1, 1) gave the first phase nothing without a
    word. Now one warning naming the empty part(s); a split where every part gets an item says nothing."""
    with caplog.at_level(logging.WARNING):
        parts = split_indices(2, "2,4,4", seed=0, method=method)
    empty = [str(p) for p, idx in enumerate(parts) if not idx]
    assert empty and f"part(s) {', '.join(empty)} get no item although their share is > 0" in caplog.text
    if method == "permutation":
        assert [len(p) for p in parts] == [0, 1, 1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        split_indices(10, "2,4,4", seed=0)
        split_indices(10, "5,0,5", seed=0)  # a share of 0 asked for nothing
    assert "get no item" not in caplog.text


def test_hash_split_is_stable_when_data_grows():
    keys = [f"k{i}" for i in range(200)]
    small = split_indices(keys[:100], "5,5", seed=1, method="hash")
    big = split_indices(keys, "5,5", seed=1, method="hash")
    assert [set(p) for p in small] == [set(i for i in p if i < 100) for p in big]


def test_groups_stay_together():
    recs = [SFTRecord(f"p{i}", " c", meta={"tree_id": f"t{i % 7}"}) for i in range(50)]
    parts = split_records(recs, "6,4", seed=0, group_by="tree_id")
    seen = [{r.meta["tree_id"] for r in p} for p in parts]
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == 7
    assert [len(s) for s in seen] == part_sizes(7, [0.6, 0.4])
    with pytest.raises(DataError, match="no meta\\['lang'\\]"):
        split_records(recs, "6,4", group_by="lang")


OASST_TREES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "oasst" / "oasst_en_trees_sample.jsonl"


@pytest.mark.parametrize("kind", ["sft", "preference", "prompt"])
def test_eval_fraction_keeps_each_oasst_tree_on_one_side(kind):
    """data.eval_fraction split OASST records one by one: on the 40-tree sample every one of the ~20 evaluation
    threads / pairs came from a tree also in training (17 of 20 SFT threads and 28 of 29 pairs with a prompt trained
    on), so the evaluation measured memorised conversations, silently. Now a tree stays on one side."""
    if not OASST_TREES.exists():
        pytest.skip(f"OASST samples not found at {OASST_TREES} (CI puts shared/ beside the repo clone)")
    ds = DataSettings(path=str(OASST_TREES), eval_fraction=0.1,
                      reader_options={"prompts": "all"} if kind == "prompt" else {})
    train, evals = read_splits(ds, kind)
    trees = [{r.meta["tree_id"] for r in part} for part in (train, evals)]
    assert evals and not trees[0] & trees[1]
    assert len(train) + len(evals) == len(load_records(OASST_TREES, kind, **ds.reader_options))
    assert len(trees[1]) == part_sizes(len(trees[0] | trees[1]), [0.9, 0.1])[1]  # 10 % of the trees (40 -> 4)


def test_eval_fraction_keeps_the_pairs_of_one_prompt_on_one_side(tmp_path):
    """Pairs made from one ranked record (K-choose-2: the same prompt and responses) were split apart; now records
    sharing a prompt stay together. Data whose prompts are all distinct splits exactly as before (record by record)."""
    rows = [{"prompt": f"question {i}", "responses": [f" best {i}", f" mid {i}", f" worst {i}"]} for i in range(20)]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals = read_splits(DataSettings(path=str(path), eval_fraction=0.25, split_seed=3), "preference")
    assert len(train) + len(evals) == 60 and len(evals) == 15  # 5 of the 20 prompts, 3 pairs each
    assert not {r.prompt for r in train} & {r.prompt for r in evals}
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(30)))
    train, evals = read_splits(DataSettings(path=str(sft), eval_fraction=0.2, split_seed=7), "sft")
    want = split_records(load_records(sft, "sft"), [0.8, 0.2], seed=7)  # the record-by-record split
    assert [r.id for r in train] == [r.id for r in want[0]] and [r.id for r in evals] == [r.id for r in want[1]]


def test_eval_path_records_also_in_the_training_data_are_warned(tmp_path, caplog):
    """data.eval_path holding records of data.path (the same file twice, or a slice of it) evaluated the run on
    what it trained on, without a word. Now one warning with the count and the first ids; a disjoint file says
    nothing."""
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    held.write_text("".join(json.dumps(r) + "\n" for r in [rows[1], rows[4], rows[3], rows[5]]))
    with caplog.at_level(logging.WARNING):
        _, evals = read_splits(DataSettings(path=str(train), eval_path=str(held)), "sft")
    assert len(evals) == 4
    assert f"2 of 4 evaluation record(s) are also in data.path (same prompt and responses), e.g. {held}:1, {held}:3" \
        in caplog.text
    caplog.clear()
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    with caplog.at_level(logging.WARNING):
        read_splits(DataSettings(path=str(train), eval_path=str(held)), "sft")
    assert "also in data.path" not in caplog.text


def test_repeated_training_records_are_warned(tmp_path, caplog):
    """A training file holding the same record twice (a file concatenated with itself, a join that duplicated rows)
    trained each copy as a record of its own without a word. Now one warning with the count and the first repeats;
    distinct records (the same prompt with another completion included) say nothing."""
    from alignkit.cli.data import load_data
    rows = [{"prompt": "q1", "completion": " a1"}, {"prompt": "q2", "completion": " a2"},
            {"prompt": "q1", "completion": " a1"}, {"prompt": "q1", "completion": " other"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:2]))
    with caplog.at_level(logging.WARNING):
        train, _ = load_data(DataSettings(path=str(path)), "sft")
    assert len(train) == 6  # still trained: the warning says what happens
    assert f"data.path: 3 record(s) repeat an earlier record (same prompt and responses), e.g. {path}:3, {path}:5, " \
           f"{path}:6" in caplog.text
    caplog.clear()
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[1], rows[3]]))
    with caplog.at_level(logging.WARNING):
        load_data(DataSettings(path=str(path)), "sft")
    assert "repeat an earlier record" not in caplog.text


def test_conversations_differing_only_in_turn_weights_are_not_repeats(tmp_path, caplog):
    """Two conversations with the same messages but another per-turn `weight` train different tokens (turn 1 trained
    in one, context in the other), yet were warned as "repeat an earlier record": the repeat key left out the
    record's untrained turns. Now they say nothing; the same conversation with the same weights is still a repeat."""
    from alignkit.cli.data import load_data

    def row(w):
        return {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": w},
                             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row(0), row(1)]))
    with caplog.at_level(logging.WARNING):
        train, _ = load_data(DataSettings(path=str(path)), "sft")
    assert len(train) == 2 and "repeat an earlier record" not in caplog.text
    path.write_text("".join(json.dumps(r) + "\n" for r in [row(0), row(1), row(0), row(None)]))  # null: the default, 1
    with caplog.at_level(logging.WARNING):
        load_data(DataSettings(path=str(path)), "sft")
    assert f"data.path: 2 record(s) repeat an earlier record (same prompt and responses), e.g. {path}:3, {path}:4:" \
        in caplog.text


def test_repeated_prompts_of_an_online_command_are_warned(tmp_path, caplog):
    """annotate's records.jsonl (a row per pair) read back as the prompts of an online command gave each prompt once
    per row, each copy sampled and trained on as a prompt of its own, without a word. Now one warning with the count
    and the first repeats; distinct prompts say nothing."""
    from alignkit.cli.online import read_prompt_splits
    rows = [{"prompt": "q1", "chosen": " a", "rejected": " b", "id": "p:1 (0,1)"},
            {"prompt": "q1", "chosen": " a", "rejected": " c", "id": "p:1 (0,2)"},
            {"prompt": "q2", "chosen": " a", "rejected": " b", "id": "p:2 (0,1)"},
            {"prompt": "q1", "chosen": " b", "rejected": " c", "id": "p:1 (1,2)"}]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        prompts, _ = read_prompt_splits(DataSettings(path=str(path)))
    assert [p.prompt for p in prompts] == ["q1", "q1", "q2", "q1"]
    assert f"data.path: 2 prompt(s) repeat an earlier prompt, e.g. {path}:2, {path}:4: each copy is sampled" in caplog.text
    caplog.clear()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:3]))
    with caplog.at_level(logging.WARNING):
        read_prompt_splits(DataSettings(path=str(path)))
    assert "repeat an earlier" not in caplog.text


def test_a_hash_phase_split_of_records_does_not_move_when_another_dataset_is_listed_first():
    """DeepSpeed-Chat style: one phase split ("2,4,4") over a list of datasets. With method="hash" a record's phase was
    decided by its position in the list, so listing another dataset first moved the old records between phases (a
    record trained in SFT became a reward-model record of the next run). Now by its content: every old record keeps
    its phase, and the new dataset's records are split too."""
    old = [SFTRecord(f"old prompt {i}", f" answer {i}", id=f"old-{i}") for i in range(60)]
    new = [SFTRecord(f"new prompt {i}", f" answer {i}", id=f"new-{i}") for i in range(40)]
    before = {r.id: p for p, part in enumerate(split_records(old, "2,4,4", seed=3, method="hash")) for r in part}
    after = {r.id: p for p, part in enumerate(split_records(new + old, "2,4,4", seed=3, method="hash")) for r in part}
    assert {i: after[i] for i in before} == before
    assert set(after) == set(before) | {r.id for r in new}
    assert len(set(before.values())) == 3  # a real split: every phase got records


def test_the_same_record_in_two_phases_is_warned(caplog):
    """A dataset listed twice (or duplicated rows) split record by record put copies of one record in two phases
    without a word. Now one warning with their count and first ids; grouping by prompt (source_group) keeps the
    copies together and says nothing."""
    recs = [SFTRecord(f"p{i}", " c", id=f"a{i}") for i in range(30)]
    twice = recs + [SFTRecord(r.prompt, r.completion, id=f"b{r.id[1:]}") for r in recs]
    with caplog.at_level(logging.WARNING):
        parts = split_records(twice, "2,4,4", seed=0)
    part_of = {r.id: p for p, part in enumerate(parts) for r in part}
    crossed = [f"a{i}" for i in range(30) if part_of[f"a{i}"] != part_of[f"b{i}"]]
    assert crossed  # by hand: 30 pairs over three parts, the seed-0 permutation separates some
    lines = [r.getMessage() for r in caplog.records if "same content" in r.getMessage()]
    assert len(lines) == 1 and f"split '2,4,4': {len(crossed)} record(s) have the same content as a record in " \
        "another part" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        grouped = split_records(twice, "2,4,4", seed=0, group_by=source_group)
        split_records(recs, "2,4,4", seed=0)  # no copies: nothing to say
    assert not [r for r in caplog.records if "same content" in r.getMessage()]
    assert all(len({r.prompt for r in part} & {r.prompt for r in other}) == 0
               for i, part in enumerate(grouped) for other in grouped[i + 1:])


def test_max_records_over_a_list_of_datasets_says_which_files_give_none(tmp_path, caplog):
    """data.path lists several datasets (DeepSpeed-Chat style) and data.max_records caps them: the cap took the first
    records of the concatenation, so the files listed last gave nothing, without a word. Now one warning naming them
    and their record counts; the records kept are the same (the first max_records, in order)."""
    paths = []
    for name, n in (("a", 5), ("b", 4), ("c", 3)):
        paths.append(str(tmp_path / f"{name}.jsonl"))
        Path(paths[-1]).write_text("".join(json.dumps({"prompt": f"{name}{i}", "completion": " x"}) + "\n"
                                           for i in range(n)))
    with caplog.at_level(logging.WARNING):
        train, _ = read_splits(DataSettings(path=paths, max_records=5), "sft")
    assert [r.prompt for r in train] == [f"a{i}" for i in range(5)]
    lines = [r.getMessage() for r in caplog.records if "max_records" in r.getMessage()]
    assert len(lines) == 1 and f"{paths[1]} (4), {paths[2]} (3) give none" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train, _ = read_splits(DataSettings(path=paths, max_records=7), "sft")  # b gives 2: only c is named
    assert [r.prompt for r in train] == [f"a{i}" for i in range(5)] + ["b0", "b1"]
    lines = [r.getMessage() for r in caplog.records if "max_records" in r.getMessage()]
    assert len(lines) == 1 and f": {paths[2]} (3) give none" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_splits(DataSettings(path=paths, max_records=10), "sft")
    assert not [r for r in caplog.records if "max_records" in r.getMessage()]


_SPLIT_BY_TAGS = """
from alignkit.data import SFTRecord, split_records
recs = [SFTRecord(f"p{i}", "c", id=str(i), meta={"tags": frozenset({"math", "code", f"t{i % 5}"})}) for i in range(40)]
parts = split_records(recs, "2,4,4", seed=3, group_by=lambda r: r.meta["tags"], method="hash")
print([[r.id for r in p] for p in parts])
"""


def test_a_hash_split_by_a_set_valued_group_is_the_same_in_every_process():
    """`method="hash"` hashed str(key): a frozenset's text follows the process's hash seed (PYTHONHASHSEED, random per
    process), so each process of a launch, and each run, put the groups in other parts (seen: [34, 67, 0] records in
    one process, [0, 67, 34] in another). Now keys that are not strings are written by naming.stable_repr (sets
    sorted)."""
    import os
    import subprocess
    import sys

    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", _SPLIT_BY_TAGS], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1, outs


def test_a_hash_split_of_string_and_tuple_keys_is_the_sha256_of_their_text():
    """The hash split's part of a key, by hand: sha256(f"{seed}:{key}") / 2**256 against the cumulative fractions
    (str keys as they are, tuples and ints as str() writes them: stable_repr kept those splits where they were)."""
    import hashlib

    keys = ["k0", "k1", ("prompt", "x"), ("tree", 7), 5, 6, "k2", "k3"]
    want = [[], []]
    for i, k in enumerate(keys):
        u = int.from_bytes(hashlib.sha256(f"4:{k}".encode()).digest(), "big") / 2 ** 256
        want[0 if u < 0.5 else 1].append(i)
    assert split_indices(keys, "5,5", seed=4, method="hash") == want
