"""The records the length limits drop, for a trainer built in Python (`prepare_dataset`): over
`max_dropped_fraction` of them (default 0.5, as the CLI's data.max_dropped_fraction) it stops in one line naming the
dataset, the share, the limits, the setting and the fix. Before, only a dataset whose EVERY row was dropped stopped:
one with 6 of 10 rows too long trained on the 4 short ones after a warning. The count is the dataset's true one with
num_proc workers and on datasets' cache hit. Checked to fail without the fix (0.5 gave the 4 rows back)."""

from __future__ import annotations

import json
import logging
import re

import pytest
from datasets import Dataset, load_dataset
from transformers import TrainingArguments

from alignkit.data import DataError, TokenizeConfig, load_records, tokenize_records
from alignkit.data.prepare import prepare_dataset
from alignkit.data.records import SFTRecord
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.settings import ConfigError
from alignkit.trainers import SFTTrainer

LONG = "word " * 50  # about 50+ tokens: no room for a completion under max_length=20 with no prompt limit
TOO_LONG = (0, 1, 3, 5, 7, 9)  # 6 of the 10 rows, by hand: 60 % dropped, in both halves (num_proc=2 shards)
ROWS = [{"prompt": LONG if i in TOO_LONG else f"Q{i}?", "completion": " a"} for i in range(10)]
CFG = {"max_length": 20, "max_prompt_length": None}


def refused(name: str = "train_dataset", keys: str = "") -> str:
    return (rf"^{name}: the length limits \({keys}max_length=20, {keys}max_prompt_length=None\) drop 6 of 10 "
            rf"record\(s\) \(60%: 6 [a-z_]+, e\.g\. \[.*\]\), over {keys}max_dropped_fraction=0\.5: .*raise "
            rf"{keys}max_length .*set {keys}max_dropped_fraction=1 to train on what is left$")


def data(given: str, tmp_path):
    if given == "records":
        return [SFTRecord(r["prompt"], r["completion"], id=f"r{i}") for i, r in enumerate(ROWS)]
    if given == "rows":
        return list(ROWS)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))


@pytest.mark.parametrize("given", ["records", "rows", "file"])
def test_six_of_ten_dropped_is_refused_at_half_and_taken_at_0_7(tiny_dir, tmp_path, given):
    tok = load_tokenizer(tiny_dir("llama"))
    with pytest.raises(DataError, match=refused()):
        prepare_dataset(data(given, tmp_path), tok, ("sft",), TokenizeConfig(**CFG))  # the default, 0.5
    out, _ = prepare_dataset(data(given, tmp_path), tok, ("sft",), TokenizeConfig(**CFG, max_dropped_fraction=0.7))
    assert len(out) == 4  # rows 2, 4, 6, 8
    if given == "records":
        assert [f["id"] for f in out] == ["r2", "r4", "r6", "r8"]
    else:
        assert list(out["id"]) == [f"train_dataset row {i}" for i in (2, 4, 6, 8)]


def test_the_count_is_the_true_one_with_processes_and_on_a_cache_hit(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir("llama"))
    ds = data("file", tmp_path)
    a, _ = prepare_dataset(ds, tok, ("sft",), TokenizeConfig(**CFG, max_dropped_fraction=0.7), num_proc=2)
    b, _ = prepare_dataset(ds, tok, ("sft",), TokenizeConfig(**CFG, max_dropped_fraction=0.6), num_proc=2)
    assert len(a) == len(b) == 4 and len(a.cache_files) == 2 and a.cache_files == b.cache_files  # b: a cache hit
    with pytest.raises(DataError, match=refused("eval_dataset")):  # the threshold is not in the cache key: a hit
        prepare_dataset(ds, tok, ("sft",), TokenizeConfig(**CFG), num_proc=2, name="eval_dataset")


def test_the_trainer_takes_the_setting_beside_max_length(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    model, tok = load_model(path), load_tokenizer(path)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)
    with pytest.raises(DataError, match=refused()):
        SFTTrainer(model, args, train_dataset=Dataset.from_list(ROWS), processing_class=tok, **CFG)
    with pytest.raises(DataError, match=refused("eval_dataset")):
        SFTTrainer(model, args, train_dataset=ROWS[2:3], eval_dataset=ROWS, processing_class=tok, **CFG)
    trainer = SFTTrainer(model, args, train_dataset=ROWS, processing_class=tok, max_dropped_fraction=0.7, **CFG)
    assert len(trainer.train_dataset) == 4


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True, None])
def test_a_share_outside_0_1_is_refused_naming_the_key(bad):
    with pytest.raises(DataError, match=r"^data\.max_dropped_fraction \(TokenizeConfig\.max_dropped_fraction, the "
                                        r"trainers' max_dropped_fraction\): must be a number in \[0, 1\]"):
        TokenizeConfig(max_dropped_fraction=bad)


def test_the_setting_beside_tokenized_data_is_refused_as_ignored(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    model, tok = load_model(path), load_tokenizer(path)
    feats, _ = tokenize_records(load_records(ROWS[2:5], "sft"), tok)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match=r"^SFTTrainer: max_dropped_fraction=0\.7 would be ignored: .*"
                                          r"max_dropped_fraction: to alignkit\.data\.prepare\.check_dropped"):
        SFTTrainer(model, args, train_dataset=feats, processing_class=tok, max_dropped_fraction=0.7)


@pytest.mark.parametrize("given", ["records", "rows", "file"])
def test_a_share_within_the_setting_is_one_warning_naming_count_total_share_and_setting(tiny_dir, tmp_path, given,
                                                                                          caplog):
    """Before: the library path (prepare_dataset, as the trainers call it) warned per drop reason ("6 of 10
    record(s) dropped (completion_too_long)") but never stated the share against the setting, which the CLI's line
    did. Now one warning per prepare, the CLI's own (prepare.check_dropped): 6 of 10, 60%, max_dropped_fraction=0.7."""
    tok = load_tokenizer(tiny_dir("llama"))
    with caplog.at_level(logging.WARNING, logger="alignkit.data.prepare"):
        prepare_dataset(data(given, tmp_path), tok, ("sft",), TokenizeConfig(**CFG, max_dropped_fraction=0.7))
    lines = [r.getMessage() for r in caplog.records if "max_dropped_fraction" in r.getMessage()]
    assert len(lines) == 1, lines
    assert re.match(r"train_dataset: the length limits \(max_length=20, max_prompt_length=None\) drop 6 of 10 "
                    r"record\(s\) \(60%: 6 [a-z_]+, e\.g\. \[.*\]\), within max_dropped_fraction=0\.7", lines[0]), lines
