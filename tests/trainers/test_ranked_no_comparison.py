"""Ranked records that compare nothing are left out of a reward model's training and evaluation (session 24's
objectives audit)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset

from alignkit.data import DataError, RankedCollator, RankedRecord, tokenize_records
from alignkit.trainers import RewardTrainer

from .conftest import BAD, GOOD, PROMPTS, fast_args


def nls(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log sigma(x)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_a_record_of_tied_replies_no_longer_halves_the_loss_and_eval_accuracy(as_dataset, make_model, tokenizer,
                                                                               tmp_path, caplog):
    """Before: a ranked record whose replies all tie (ranks [0, 0], e.g. an OASST turn) stayed in the data with a
    loss of 0 and an accuracy of 0, so beside one real record of 2 ordered pairs trainer.evaluate() reported
    eval_loss and eval_accuracy at half their value (0.25 where evaluate_reward_model and the hand count say 0.5),
    and training's loss was halved the same way. Now it is left out with one warning naming it; the figures are
    those of the real record, by hand from rewards scored row by row."""
    recs = [RankedRecord(PROMPTS[0], [GOOD[0], BAD[0], GOOD[0] + BAD[0]], ranks=[0, 0, 1], id="t0"),
            RankedRecord(PROMPTS[1], [GOOD[1], BAD[1]], ranks=[0, 0], id="tied")]
    feats, _ = tokenize_records(recs, tokenizer, max_length=32, max_prompt_length=16)
    data = Dataset.from_list(feats) if as_dataset else feats
    model = make_model("full", classifier=True)
    model.eval()
    with torch.no_grad():
        a, b, c = (float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in feats[0]["input_ids"])
    with caplog.at_level(logging.WARNING, logger="alignkit.trainers.reward"):
        trainer = RewardTrainer(model, fast_args(tmp_path), train_dataset=data, eval_dataset=data,
                                data_collator=RankedCollator(tokenizer.pad_token_id))
    said = [r.getMessage() for r in caplog.records if "compare nothing" in r.getMessage()]
    assert len(said) == 2 and all("1 of 2 ranked record(s)" in m and "'tied'" in m for m in said), said
    assert len(trainer.train_dataset) == len(trainer.eval_dataset) == 1
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx((nls(a - c) + nls(b - c)) / 2, rel=1e-4)  # pairs (0, 2), (1, 2)
    assert metrics["eval_accuracy"] == pytest.approx(((a > c) + (b > c)) / 2)
    assert metrics["eval_num_pairs"] == 2.0


def test_records_that_all_compare_nothing_are_refused_in_one_line(make_model, tokenizer, tmp_path):
    """Every record tied, or its ordered replies cut to the same tokens by max_length: a run would train a loss of
    0 (exit 0, nothing learnt). Now a DataError naming the dataset and a record, before anything is written."""
    long = " and so on" * 40
    recs = [RankedRecord(PROMPTS[0], [GOOD[0], BAD[0]], ranks=[0, 0], id="tied"),
            RankedRecord(PROMPTS[1], [GOOD[1] + long + " A", GOOD[1] + long + " B"], id="cut")]
    feats, _ = tokenize_records(recs, tokenizer, max_length=24, max_prompt_length=8)
    assert feats[1]["input_ids"][0] == feats[1]["input_ids"][1]  # the two replies differ only past max_length
    with pytest.raises(DataError) as e:
        RewardTrainer(make_model("full", classifier=True), fast_args(tmp_path, output_dir=str(tmp_path / "run")),
                      train_dataset=feats, data_collator=RankedCollator(tokenizer.pad_token_id))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train_dataset: none of its 2 ranked record(s)") and "'tied'" in msg
    assert not any((tmp_path / "run").rglob("*"))  # the Trainer makes the folder; nothing is written in it


def test_pairs_cut_to_the_same_tokens_leave_the_training_loss_as_they_leave_evaluation(make_model, tokenizer,
                                                                                      tmp_path, caplog):
    """A record of 3 ordered replies whose first two differ only past max_length: before, training kept the pair
    (0, 1) (equal scores: a constant log 2, accuracy 0) while evaluation left it out, so the training loss was
    (log 2 + l02 + l12) / 3 where evaluation said (l02 + l12) / 2. Now the loss leaves it out too (hand values from
    the rows' scores), with one warning counting it."""
    long = " and so on" * 40
    recs = [RankedRecord(PROMPTS[1], [GOOD[1] + long + " A", GOOD[1] + long + " B", BAD[1]], id="cut")]
    feats, _ = tokenize_records(recs, tokenizer, max_length=24, max_prompt_length=8)
    assert feats[0]["input_ids"][0] == feats[0]["input_ids"][1] != feats[0]["input_ids"][2]
    model = make_model("full", classifier=True)
    model.eval()
    with torch.no_grad():
        a, _, c = (float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in feats[0]["input_ids"])
    collator = RankedCollator(tokenizer.pad_token_id)
    with caplog.at_level(logging.WARNING, logger="alignkit.trainers.reward"):
        trainer = RewardTrainer(model, fast_args(tmp_path), train_dataset=feats, data_collator=collator)
    said = [r.getMessage() for r in caplog.records if "cut to the same tokens" in r.getMessage()]
    assert len(said) == 1 and "train_dataset: 1 ordered pair(s) of replies in 1 ranked record(s)" in said[0], said
    model.train()
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, collator(feats), return_outputs=True)
    assert float(loss) == pytest.approx(nls(a - c), rel=1e-4)  # pairs (0, 2) and (1, 2): replies 0 and 1 score a
    assert float(out.metrics["num_pairs"][0]) == 2.0
    assert float(out.metrics["accuracy"][0]) == float(a > c)


def test_a_dataset_is_filtered_in_batches_reading_two_columns_and_three_left_out_rows(monkeypatch):
    """Before: with_comparisons read the whole `ranks` and `input_ids` columns of a datasets.Dataset into Python
    lists (20k ranked records x 3 replies x 256 tokens: +670 MiB peak at RewardTrainer init on every rank), and
    read every left-out row to name three. Now it reads the two columns a batch at a time and only the three rows it
    names; the rows kept and the ids named are those of the list input (the ids written out by hand)."""
    from alignkit.trainers.reward import with_comparisons
    tied, good = {"ranks": [0, 0], "input_ids": [[5, 6], [5, 7]]}, {"ranks": [0, 1], "input_ids": [[5, 6], [5, 7]]}
    cut = {"ranks": [0, 1], "input_ids": [[5, 6], [5, 6]]}  # ordered, but cut to the same tokens
    rows = [dict(good, id="g0"), dict(tied, id="t1"), dict(cut, id="c2"), dict(tied, id="t3"), dict(good, id="g4"),
            dict(tied, id="t5"), dict(tied, id="t6")]
    data = Dataset.from_list(rows)
    read_columns, read_rows = [], []
    original = Dataset.__getitem__

    def spy(self, key):
        (read_columns if isinstance(key, str) else read_rows).append(key)
        return original(self, key)
    monkeypatch.setattr(Dataset, "__getitem__", spy)
    out = with_comparisons(data, "train_dataset")
    monkeypatch.undo()
    assert out["id"] == ["g0", "g4"] == [r["id"] for r in with_comparisons(rows, "train_dataset")]
    assert read_columns == [] and sorted(read_rows) == [0, 1, 2, 3]  # row 0: the kind; 1, 2, 3: the ids named
