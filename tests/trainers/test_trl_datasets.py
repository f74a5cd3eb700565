"""A TRL user's dataset goes into the Python trainers unchanged: raw rows with TRL's columns and the tokenizer as
`processing_class`; the trainer tokenizes them itself (datasets.map: cached, num_proc) and picks the collator."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, Features, Value, load_dataset
from transformers import TrainingArguments

from alignkit.data import DataError, TokenizeConfig, load_records, tokenize_records
from alignkit.data.prepare import prepare_dataset
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.trainers import DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]


def args(tmp_path, **kw):
    return TrainingArguments(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True, **kw)


def test_sft_trainer_takes_a_messages_dataset(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    model, tok = load_model(path), load_tokenizer(path)
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    trainer = SFTTrainer(model, args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tok)
    feats = trainer.train_dataset
    expected, _ = tokenize_records(load_records(rows, "sft"), tok)  # the records path, row for row
    assert list(feats["input_ids"]) == [e["input_ids"] for e in expected]
    assert list(feats["completion_mask"]) == [e["completion_mask"] for e in expected]
    assert list(feats["id"]) == ["train_dataset row 0", "train_dataset row 1"]
    # every assistant turn is trained by default: row 0 has two spans of ones
    mask = feats["completion_mask"][0]
    assert sum(1 for a, b in zip([0] + mask, mask) if (a, b) == (0, 1)) == 2
    out = trainer.train()
    assert out.global_step == 1
    last, _ = prepare_dataset(Dataset.from_list(rows), tok, ("sft",), TokenizeConfig(loss_on="last_assistant"))
    assert sum(last["completion_mask"][0]) < sum(mask)


def test_dpo_kto_rm_take_trl_columns(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    pref = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"prompt": "Grass is", "chosen": " green.", "rejected": " blue."}]
    dpo = DPOTrainer(load_model(path), args(tmp_path), train_dataset=Dataset.from_list(pref), processing_class=tok)
    assert set(dpo.train_dataset.column_names) >= {"chosen_input_ids", "rejected_completion_mask"}
    assert dpo.train().global_step == 1
    unpaired = [{"prompt": "The sky is", "completion": " blue.", "label": True},
                {"prompt": "Grass is", "completion": " blue.", "label": False}]
    kto = KTOTrainer(load_model(path), args(tmp_path), train_dataset=unpaired, processing_class=tok)  # a list too
    assert list(kto.train_dataset["label"]) == [True, False]
    assert kto.train().global_step == 1
    implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}] * 2  # TRL's implicit prompt
    rm = RewardTrainer(load_model(tiny_dir("llama", classifier=True, num_labels=1), task="classifier", num_labels=1),
                       args(tmp_path), train_dataset=Dataset.from_list(implicit), processing_class=tok)
    assert rm.train().global_step == 1


def test_map_is_cached_and_runs_in_processes(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir("llama"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(6)))
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    a, kind = prepare_dataset(ds, tok, ("sft",))
    b, _ = prepare_dataset(ds, tok, ("sft",))
    assert kind == "sft" and a.cache_files and a.cache_files == b.cache_files  # the second call loaded the cache
    c, _ = prepare_dataset(ds, tok, ("sft",), TokenizeConfig(max_length=64), num_proc=2)  # not cached: new settings
    assert list(c["input_ids"]) == list(a["input_ids"]) and len(c.cache_files) == 2  # one shard per process


def test_raw_rows_without_a_tokenizer_are_an_error(tiny_dir, tmp_path):
    model = load_model(tiny_dir("llama"))
    with pytest.raises(ValueError, match=r"train_dataset holds raw rows \(columns \['messages'\]\); pass the "
                                         r"tokenizer as processing_class"):
        SFTTrainer(model, args(tmp_path), train_dataset=Dataset.from_list([{"messages": CHAT}]))


def test_transformers_default_learning_rate_is_named(tiny_dir, tmp_path, caplog):
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    plain = TrainingArguments(str(tmp_path / "o"), report_to="none", use_cpu=True)  # learning_rate 5e-5
    DPOTrainer(load_model(path), plain, train_dataset=[{"prompt": "a", "chosen": " b", "rejected": " c"}],
               processing_class=tok)
    assert "learning_rate is transformers' default 5e-05; TRL's DPOConfig uses 1e-06" in caplog.text


def test_data_without_a_length_is_refused_in_one_line(tiny_dir, tmp_path):
    """An iterable / streaming dataset (raw rows or features) stopped the trainer's construction with a bare
    `TypeError: object of type 'IterableDataset' has no len()`; now one line naming the argument and the fix."""
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    rows = Dataset.from_list([{"prompt": "The sky is", "completion": " blue."}])
    feats = Dataset.from_list(list(SFTTrainer(load_model(path), args(tmp_path), train_dataset=rows,
                                              processing_class=tok).train_dataset))
    for data in (rows.to_iterable_dataset(), feats.to_iterable_dataset()):
        with pytest.raises(ValueError, match=r"SFTTrainer: train_dataset \(IterableDataset\) has no length \(an "
                                             r"iterable or streaming dataset\).*pass map-style data"):
            SFTTrainer(load_model(path), args(tmp_path), train_dataset=data, processing_class=tok)


def test_a_data_problem_is_one_warning_per_dataset_across_map_batches_processes_and_the_cache(tiny_dir, tmp_path,
                                                                                               caplog):
    """prepare_dataset logged its summary once per datasets.map batch (1,000 rows), so one problem in a large dataset
    repeated its warning thousands of times, and a cached map (no batch run) said nothing. Now one line per kind of
    warning per dataset, with the count and the first records, from the map's output: the same with num_proc and on
    a cache hit; a first batch whose records are all dropped still maps (its features typed from a kept row)."""
    import logging

    tok = load_tokenizer(tiny_dir("llama"))
    data = tmp_path / "d.jsonl"
    long_rows = {i for i in range(2500) if i % 7 == 3 or i < 1000}  # every row of the first map batch, then 1 in 7
    data.write_text("".join(json.dumps({"prompt": "Q " * (60 if i in long_rows else 2), "completion": " A."}) + "\n"
                            for i in range(2500)))
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    n_long = 1000 + sum(1 for i in range(1000, 2500) if i % 7 == 3)  # 1000 + 214
    for num_proc in (None, None, 2):  # the second call reads datasets' cache
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="alignkit.data.prepare"):
            out, _ = prepare_dataset(ds, tok, ("sft",), TokenizeConfig(max_length=40), num_proc=num_proc)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [f"train_dataset: 1,214 of 2,500 record(s) dropped (prompt_too_long) (first: "
                            f"{', '.join(f'train_dataset row {i}' for i in range(5))})",
                            # the share line (prepare.check_dropped): 1214 / 2500 = 48.56 %, within the default 0.5
                            "train_dataset: the length limits (max_length=40, max_prompt_length=512) drop 1,214 of "
                            "2,500 record(s) (49%: 1,214 prompt_too_long, e.g. ['train_dataset row 0', 'train_dataset "
                            "row 1', 'train_dataset row 2']), within max_dropped_fraction=0.5 (over it the run stops); "
                            "raise max_length (or max_prompt_length) to keep them"], (num_proc, warnings)
        assert n_long == 1214
        assert list(out["id"]) == [f"train_dataset row {i}" for i in range(2500) if i not in long_rows]
        assert out.column_names == ["input_ids", "completion_mask", "prompt_length", "length", "weight", "id"]
        assert all(len(ids) <= 40 for ids in out["input_ids"])


PAIRS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": "Grass is", "chosen": " green.", "rejected": " red."}]
CONV = [{"prompt": [{"role": "user", "content": "Sky?"}], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Green."}]}] * 2


def test_several_raw_evaluation_sets_are_each_tokenized(tiny_dir, tmp_path):
    """eval_dataset={"name": raw rows, ...} (TRL's trainers tokenize each set): the sets were left raw, and building
    the trainer stopped with datasets' `ValueError: Column 'weight' doesn't exist`. Each set is now tokenized under
    the trainer's settings, its ids naming the set, and scored as the same rows tokenized by hand."""
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    trainer = DPOTrainer(load_model(path), args(tmp_path), train_dataset=Dataset.from_list(PAIRS),
                         eval_dataset={"plain": Dataset.from_list(PAIRS), "chat": CONV}, processing_class=tok)
    assert list(trainer.eval_dataset["chat"]["id"]) == ["eval_dataset['chat'] row 0", "eval_dataset['chat'] row 1"]
    got = trainer.evaluate()
    for name, rows in (("plain", PAIRS), ("chat", CONV)):
        feats, _ = tokenize_records(load_records(rows, "preference"), tok)
        assert list(trainer.eval_dataset[name]["chosen_input_ids"]) == [f["chosen_input_ids"] for f in feats]
        by_hand = trainer.evaluate(feats)
        for metric in ("loss", "logps/chosen", "logps/rejected"):
            assert got[f"eval_{name}_{metric}"] == pytest.approx(by_hand[f"eval_{metric}"], rel=1e-6)
    assert got["eval_plain_logps/rejected"] != pytest.approx(got["eval_chat_logps/rejected"])  # two sets, two figures


def test_evaluate_takes_raw_rows(tiny_dir, tmp_path):
    """trainer.evaluate(eval_dataset=raw rows) reached the collator untokenized: `KeyError: 'chosen_input_ids'`. The
    rows are now tokenized as the trainer's own data (same settings), and score as the same rows tokenized by hand;
    rows of a kind the trainer's collator does not take are refused in one line."""
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    trainer = DPOTrainer(load_model(path), args(tmp_path), train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok, max_prompt_length=4)
    feats, _ = tokenize_records(load_records(CONV, "preference"), tok, TokenizeConfig(max_prompt_length=4))
    got, by_hand = trainer.evaluate(Dataset.from_list(CONV)), trainer.evaluate(feats)
    for metric in ("loss", "logps/chosen", "logps/rejected"):
        assert got[f"eval_{metric}"] == pytest.approx(by_hand[f"eval_{metric}"], rel=1e-6)
    sft_rows = [{"prompt": "The sky is", "completion": " blue."}]
    with pytest.raises(ValueError, match=r"eval_dataset: its rows give sft records, and this trainer needs preference"):
        trainer.evaluate(sft_rows)
    sft_feats, _ = tokenize_records(load_records(sft_rows, "sft"), tok)  # tokenized: the collator's KeyError before
    with pytest.raises(ValueError, match=r"PreferenceTrainer.evaluate: eval_dataset holds sft examples, and this trainer's "
                                         r"collator takes preference ones"):
        trainer.evaluate(sft_feats)


def test_ignored_columns_of_a_trainers_rows_name_the_rows(tiny_dir, caplog):
    """A TRL dataset's extra columns (UltraFeedback's score_chosen, ...) were reported by a repr of the map batch's
    first row cut at 80 characters ("[({'prompt': 'The sky is', 'chosen': ... 'score_cho: ignored column(s)"), not
    by where they are; the warning now names the argument (once for the whole dataset)."""
    import logging

    tok = load_tokenizer(tiny_dir("llama"))
    rows = [dict(p, score_chosen=8.0, score_rejected=3.0) for p in PAIRS]
    with caplog.at_level(logging.WARNING):
        prepare_dataset(Dataset.from_list(rows), tok, ("preference",), name="eval_dataset")
    said = [r.getMessage() for r in caplog.records if "ignored column" in r.getMessage()]
    assert said == ["eval_dataset: ignored column(s) ['score_chosen', 'score_rejected'] (not read by this "
                    "reader; counts: score_chosen in 2 row(s), score_rejected in 2 row(s))"]


KIND_ROWS = {
    "sft": [{"messages": CHAT}, {"messages": CHAT[:2]}],
    "unpaired": [{"prompt": "The sky is", "completion": " blue.", "label": True},
                 {"prompt": "Grass is", "completion": " blue.", "label": False}],
    "preference": [dict(p, margin=m) for p, m in zip(PAIRS, (1.5, 0.25))],
    "ranked": [{"prompt": "The sky is", "responses": [" blue.", " grey.", " green."], "ranks": [0, 1, 1]}],
}


@pytest.mark.parametrize("kind", sorted(KIND_ROWS))
def test_the_map_tokenizes_each_record_once_into_the_features_datasets_infers(tiny_dir, monkeypatch, kind):
    """prepare_dataset typed the map's output by tokenizing the dataset's first 64 rows once more (more rows when all
    64 were dropped), so those rows were tokenized twice. The output features are now declared
    (`prepare.map_features`): each record is tokenized once, and the declared features are, key for key and in
    order, those datasets infers from the map function's own output (what the 64-row probe gave), so they hash
    alike and a dataset cached by datasets before this change is still found in its cache."""
    from datasets.fingerprint import Hasher

    import alignkit.data.prepare as prepare

    tok = load_tokenizer(tiny_dir("llama"))
    rows = KIND_ROWS[kind] * 40
    calls = []
    real = prepare.tokenize_record
    monkeypatch.setattr(prepare, "tokenize_record", lambda r, *a, **k: calls.append(r.id) or real(r, *a, **k))
    out, got_kind = prepare_dataset(Dataset.from_list(rows), tok, (kind,))
    assert got_kind == kind and sorted(calls) == sorted(f"train_dataset row {i}" for i in range(len(rows)))
    probe = prepare._tokenize_batch(Dataset.from_list(rows)[:], list(range(len(rows))), tokenizer=tok,
                                    cfg=TokenizeConfig(), kind=kind, reader=prepare.detect_reader(rows[0], "r").name,
                                    name="train_dataset", options={})
    inferred = Dataset.from_dict(probe).features
    declared = prepare.map_features(kind)
    assert list(declared.items()) == list(inferred.items())
    assert Hasher.hash(declared) == Hasher.hash(inferred)
    assert out.features == Features({k: inferred[k] for k in prepare.FEATURE_KEYS[kind]})


def test_margins_given_in_no_row_are_a_float_column(tiny_dir):
    """Preference rows without margins (None in every row) still get a float64 margin column (datasets would type
    an all-None column as null), as the probe's fix-up gave them."""
    tok = load_tokenizer(tiny_dir("llama"))
    out, _ = prepare_dataset(Dataset.from_list(PAIRS), tok, ("preference",))
    assert out.features["margin"] == Value("float64") and list(out["margin"]) == [None, None]
    assert out.features["weight"] == Value("float64") and list(out["weight"]) == [1.0, 1.0]


def test_ignored_columns_are_one_warning_per_dataset_across_map_batches_processes_and_the_cache(tiny_dir, tmp_path,
                                                                                                caplog):
    """A reader's "ignored column(s)" warning on a trainer's raw datasets.Dataset was said once per 1,000-row map
    batch (3 warnings for 2,500 rows, each naming its batch's rows and counting them alone). Now once per dataset,
    the counts summed over the batches, from the map's output (a note on each batch's first record): the same for an
    in-memory dataset, with num_proc, and on a cache hit (where no batch runs)."""
    import logging

    tok = load_tokenizer(tiny_dir("llama"))
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}.", "source": "web", "lang": "en" if i % 2 else None}
            for i in range(2500)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    want = ("train_dataset: ignored column(s) ['lang', 'source'] (not read by this reader; counts: lang in 2500 row(s), "
            "source in 2500 row(s))")
    for data_set, num_proc in ((Dataset.from_list(rows), None), (ds, None), (ds, None), (ds, 2)):  # 3rd: the cache
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out, _ = prepare_dataset(data_set, tok, ("sft",), num_proc=num_proc)
        said = [r.getMessage() for r in caplog.records if "ignored column" in r.getMessage()]
        assert said == [want], (num_proc, said)
        assert len(out) == 2500 and out.column_names == ["input_ids", "completion_mask", "prompt_length", "length",
                                                          "weight", "id"]


def _said(caplog, data_set, tok, what, num_proc=None, kinds=("sft",)):
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out, _ = prepare_dataset(data_set, tok, kinds, num_proc=num_proc)
    return out, [r.getMessage() for r in caplog.records if what in r.getMessage()]


def test_a_weight_given_in_some_rows_is_judged_over_the_whole_dataset_not_per_map_batch(tiny_dir, tmp_path, caplog):
    """A trainer's raw dataset was read one 1,000-row map batch at a time and "column given in some rows only" was
    judged per batch: rows 0-999 with a weight and rows 1000-2499 without it gave no batch a mix, so nothing was said
    while 1,500 rows trained at the default weight 1. Now judged over the dataset (each batch's counts carried through
    the map), in one line as a file read whole says it: in memory, from a file, on a cache hit and with num_proc=2;
    a weight in every row says nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(tiny_dir("llama"))
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}.", **({"weight": 2.0} if i < 1000 else {})} for i in range(2500)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    tail = "the other 1500 weigh 1 (the default) (the first: {}). Give every row a weight if they should not"
    want = ("train_dataset: column 'weight' is given in 1000 of 2500 rows (the first: train_dataset row 0); "
            + tail.format("train_dataset row 1000"))
    for data_set, num_proc in ((Dataset.from_list(rows), None), (ds, None), (ds, None), (ds, 2)):  # 3rd: the cache
        out, said = _said(caplog, data_set, tok, "is given in", num_proc)
        assert said == [want], (num_proc, said)
        assert list(out["weight"]) == [2.0] * 1000 + [1.0] * 1500
    # the same file read whole (JSONL, and Parquet, where the lost values are nulls) says the same, by its lines / rows
    pq.write_table(pa.Table.from_pylist([{**r, "weight": r.get("weight")} for r in rows]), tmp_path / "d.parquet")
    for f, first, other in ((data, f"{data}:1", f"{data}:1001"),
                            (tmp_path / "d.parquet", f"{tmp_path / 'd.parquet'} row 0", f"{tmp_path / 'd.parquet'} row 1000")):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert len(load_records(f, "sft")) == 2500
        said = [r.getMessage() for r in caplog.records if "is given in" in r.getMessage()]
        assert said == [f"{f}: column 'weight' is given in 1000 of 2500 rows (the first: {first}); " + tail.format(other)]
    # the first row giving it may come in a later batch; given in every row: nothing to say
    late = [{"prompt": "Q", "completion": " A", "weight": 0.5 if i >= 1500 else None} for i in range(2500)]  # from_list
    # takes its columns from the first row's keys: a null there, not a missing key, keeps the column
    assert _said(caplog, Dataset.from_list(late), tok, "is given in")[1] == [
        "train_dataset: column 'weight' is given in 1000 of 2500 rows (the first: train_dataset row 1500); the other "
        "1500 weigh 1 (the default) (the first: train_dataset row 0). Give every row a weight if they should not"]
    every = [{"prompt": "Q", "completion": " A", "weight": 2.0 if i < 1000 else 1.0} for i in range(2500)]
    assert _said(caplog, Dataset.from_list(every), tok, "is given in")[1] == []


def test_dropped_message_keys_are_one_warning_per_dataset_across_map_batches(tiny_dir, tmp_path, caplog):
    """"message key(s) dropped" on a trainer's raw dataset was said once per 1,000-row map batch (3 lines for 2,500
    rows, each counting its batch). Now one line per dataset with the summed count: in memory, from a file, on a
    cache hit and with num_proc=2."""
    tok = load_tokenizer(tiny_dir("llama"))
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}", "name": "ann" if i % 2 else None},
                          {"role": "assistant", "content": "Hello", "name": "bot"}]} for i in range(2500)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    want = ("train_dataset: message key(s) ['name'] dropped (each message keeps its role and content only, so the chat "
            "template never sees them; counts: name in 3750 message(s)); fold what matters into the content, or drop "
            "those keys from the data")
    for data_set, num_proc in ((Dataset.from_list(rows), None), (ds, None), (ds, None), (ds, 2)):  # 3rd: the cache
        out, said = _said(caplog, data_set, tok, "message key(s)", num_proc)
        assert said == [want], (num_proc, said)
        assert len(out) == 2500


def test_a_list_of_rows_keeps_a_column_first_given_in_a_later_row(tiny_dir, caplog):
    """A trainer's list of dicts went through Dataset.from_list, which takes its columns from the first row's keys:
    a `weight` given from row 1 on was dropped without a word (every row trained at weight 1), and a misspelt
    column in a later row was never seen. Now every row gets every key first: the weights are kept and the rows
    without one are said, as in a file; the misspelt column is refused."""
    tok = load_tokenizer(tiny_dir("llama"))
    rows = [{"prompt": "Q", "completion": " A"}, {"prompt": "Q", "completion": " B", "weight": 3.0}]
    out, said = _said(caplog, rows, tok, "is given in")
    assert list(out["weight"]) == [1.0, 3.0]
    assert said == ["train_dataset: column 'weight' is given in 1 of 2 rows (the first: train_dataset row 1); the "
                    "other 1 weigh 1 (the default) (the first: train_dataset row 0). Give every row a weight if they "
                    "should not"]
    with pytest.raises(DataError, match=r"unknown column 'weigth' \(did you mean 'weight'\?\)"):
        prepare_dataset([rows[0], {**rows[1], "weigth": 3.0}], tok, ("sft",))


def _logged(caplog, data_set, tok, what, level, num_proc=None, kinds=("sft",), **reader_options):
    caplog.clear()
    with caplog.at_level(level, logger="alignkit"):
        try:
            out, _ = prepare_dataset(data_set, tok, kinds, num_proc=num_proc, reader_options=reader_options)
        except DataError as e:
            out = e
    return out, [r.getMessage() for r in caplog.records if what in r.getMessage()]


def _file_dataset(tmp_path, rows):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))


def test_rows_skipped_as_invalid_are_one_warning_per_dataset_across_map_batches(tiny_dir, tmp_path, caplog):
    """on_invalid='skip' said "skipped N invalid row(s)" once per 1,000-row map batch, each counting its batch. Now
    one line per dataset: 3 rows without a completion (rows 5, 1500, 1501: batches 0 and 1) -> "skipped 3", quoting
    the first three in row order; in memory, from a file, on a cache hit and with num_proc=2."""
    tok = load_tokenizer(tiny_dir("llama"))
    bad = (5, 1500, 1501)
    rows = [{"prompt": f"Q{i}?", "completion": None if i in bad else f" A{i}."} for i in range(2500)]
    ds = _file_dataset(tmp_path, rows)
    for data_set, num_proc in ((Dataset.from_list(rows), None), (ds, None), (ds, None), (ds, 2)):  # 3rd: the cache
        out, said = _logged(caplog, data_set, tok, "invalid row(s)", 30, num_proc, on_invalid="skip")
        assert len(said) == 1, (num_proc, said)
        assert said[0].startswith("train_dataset: skipped 3 invalid row(s) (on_invalid='skip'); first: "), said
        assert [part.split(":")[0] for part in said[0].split("first: ")[1].split(" | ")] == [
            f"train_dataset row {i}" for i in bad]
        assert len(out) == 2500 - 3


def _trees(n: int, lang_of, state_of=lambda i: "ready_for_export", rank2_of=lambda i: 1) -> list[dict]:
    """`n` OASST trees: a reviewed prompter root in `lang_of(i)` with two reviewed assistant replies, ranked 0 and
    `rank2_of(i)`."""
    def msg(mid, role, lang, rank=None, replies=None):
        m = {"message_id": mid, "text": f"{role} {mid}", "role": role, "lang": lang, "review_result": True,
             "rank": rank}
        return m | ({"replies": replies} if replies is not None else {})

    return [{"message_tree_id": f"t{i}", "tree_state": state_of(i),
             "prompt": msg(f"m{i}", "prompter", lang_of(i), None,
                           [msg(f"a{i}", "assistant", lang_of(i), 0), msg(f"b{i}", "assistant", lang_of(i), rank2_of(i))])}
            for i in range(n)]


def test_oasst_langs_and_filter_counts_are_judged_and_said_once_per_dataset(tiny_dir, tmp_path, caplog):
    """The OASST tree reader judged "langs matches no tree's first message" per 1,000-row map batch: with langs=['en']
    a batch of German trees said every tree was removed while the other batches trained on English ones, and its
    filter counts were one INFO line per batch. Now judged and counted over the dataset: 2,500 trees, 0-999 German
    (batch 0 gives no record at all), the rest English, trees 7, 507, ... 2007 (5) in state 'growing'. By hand: lang
    removes the 998 German roots still ready and their 2 replies each (1996); 1,497 English trees give 2 threads
    each (2994 records); langs=['fr'] matches no tree: one warning. In memory, from a file, cache hit, num_proc=2."""
    import logging

    tok = load_tokenizer(tiny_dir("llama"))
    rows = _trees(2500, lambda i: "de" if i < 1000 else "en", lambda i: "growing" if i % 500 == 7 else "ready_for_export")
    ds = _file_dataset(tmp_path, rows)
    want = ("train_dataset: OASST filters removed {'lang': 998, 'removed with their parent': 1996, "
            "'tree_state=growing': 5}")
    for data_set, num_proc in ((Dataset.from_list(rows), None), (ds, None), (ds, None), (ds, 2)):  # 3rd: the cache
        out, said = _logged(caplog, data_set, tok, "OASST", logging.INFO, num_proc, langs=["en"])
        assert said == [want], (num_proc, said)
        assert len(out) == 2994 and not [r for r in caplog.records if "matches no tree" in r.getMessage()]
        assert "tokenized 2,994/2,994 record(s)" in caplog.text  # the carrying row of batch 0 is no record
        out, said = _logged(caplog, data_set, tok, "matches no tree", logging.WARNING, num_proc, langs="fr")
        # the run stops on the reader having given nothing, not on "the length limits" (no row was too long)
        assert isinstance(out, DataError) and str(out) == (
            "train_dataset: reader 'oasst' gave no record from its 2500 row(s) (see the warnings above); check the "
            "rows and the reader's options (reader_options)"), out
        assert said == ["train_dataset: reader_options.langs ['fr'] matches no tree's first message (their languages: "
                        "{'de': 1000, 'en': 1500}), so every tree was removed; set langs to some of those"], said


def test_oasst_ranked_counts_are_summed_into_one_line_per_dataset(tiny_dir, tmp_path, caplog):
    """The OASST ranked counts were one INFO line per map batch. The trees of the test above, every third one's second
    reply unranked: by hand, of the 1,497 English trees still ready (1000-2499 less 1007, 1507, 2007), the 499 whose
    number is a multiple of 3 (1002 ... 2499 is 500, 2007 among them) have a turn with fewer than 2 ranked replies;
    the other 998 give a ranked record each. One line per dataset: in memory, from a file, cache hit, num_proc=2."""
    import logging

    from alignkit.data.oasst import NO_REPLY, ONE_RANKED, TIED, UNRANKED

    tok = load_tokenizer(tiny_dir("llama"))
    rows = _trees(2500, lambda i: "de" if i < 1000 else "en", lambda i: "growing" if i % 500 == 7 else "ready_for_export",
                  lambda i: None if i % 3 == 0 else 1)
    ds = _file_dataset(tmp_path, rows)
    want = (f"train_dataset: OASST ranked records: 998, none from 0 {NO_REPLY} and 499 {ONE_RANKED}; 0 {TIED}; "
            f"0 {UNRANKED}")
    for data_set, num_proc in ((Dataset.from_list(rows), None), (ds, None), (ds, None), (ds, 2)):  # 3rd: the cache
        out, said = _logged(caplog, data_set, tok, "OASST ranked", logging.INFO, num_proc, ("ranked",), langs=["en"])
        assert said == [want], (num_proc, said)
        assert len(out) == 998


@pytest.mark.parametrize("given", ["records", "rows"])
def test_a_dataset_whose_every_record_is_dropped_is_an_error_as_records_or_rows(tiny_dir, given):
    """Rows dropped whole by the length limits were a DataError, but a list of alignkit records dropped whole came
    back as an empty feature list (a warning only) and went on to the trainer. Both are now one error naming the
    argument and both limits. Checked to fail without the fix: the records gave ([], 'sft')."""
    from alignkit.data.records import SFTRecord

    tok = load_tokenizer(tiny_dir("llama"))
    prompt = "word " * 50  # about 100 tokens: no room for a completion under max_length=20 with no prompt limit
    data = ([SFTRecord(prompt, " a", id=f"r{i}") for i in range(3)] if given == "records"
            else [{"prompt": prompt, "completion": " a"} for _ in range(3)])
    with pytest.raises(DataError, match=r"^train_dataset: every record was dropped by the length limits "
                                        r"\(max_length=20, max_prompt_length=None; .*raise max_length"):
        prepare_dataset(data, tok, ("sft",), TokenizeConfig(max_length=20, max_prompt_length=None))


@pytest.mark.parametrize("given", ["records", "rows"])
def test_pairs_cut_to_the_same_tokens_are_said_and_all_of_them_refused(tiny_dir, caplog, given):
    """The CLI refused a preference file whose every pair had chosen == rejected once cut to max_length, and warned
    about some; a trainer given the same pairs (rows or records) trained on them without a word: a DPO loss with no
    gradient, nothing learned. Now the same warning / DataError. Checked to fail without the fix."""
    import logging

    from alignkit.data.records import PreferenceRecord

    tok = load_tokenizer(tiny_dir("llama"))
    same = " the same start of a long answer" * 4
    pairs = [("The sky is", same + " blue.", same + " grey."), ("Grass is", " green.", " blue.")]

    def data(n):
        if given == "records":
            return [PreferenceRecord(p, c, r, id=f"pair-{i}") for i, (p, c, r) in enumerate(pairs[:n])]
        return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs[:n]]

    cfg = TokenizeConfig(max_length=16, max_prompt_length=8)
    with caplog.at_level(logging.WARNING):
        out, _ = prepare_dataset(data(2), tok, ("preference",), cfg)
    assert len(out) == 2
    said = [r.getMessage() for r in caplog.records if "chosen == rejected" in r.getMessage()]
    first = "pair-0" if given == "records" else "train_dataset row 0"
    assert len(said) == 1 and said[0].startswith("train_dataset: 1 of 2 pair(s) have chosen == rejected once "
                                                 "tokenized and cut to max_length=16 / max_prompt_length=8")
    assert first in said[0]
    with pytest.raises(DataError, match=r"^train_dataset: every one of the 1 pair\(s\) has chosen == rejected once "
                                        r"tokenized and cut to max_length=16"):
        prepare_dataset(data(1), tok, ("preference",), cfg)
