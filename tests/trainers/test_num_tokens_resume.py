"""TRL's `num_tokens` (cumulative input tokens of training) survives a resume: a run resumed from a checkpoint
continues the count from the checkpoint's value, including the steps after the last logged one."""

from __future__ import annotations

import json

import pytest

from transformers import TrainingArguments

from alignkit.models.loading import load_model, load_tokenizer
from alignkit.trainers import SFTTrainer
from alignkit.trainers.checks import STATE_JSON

ROWS = [{"prompt": "The sky is", "completion": " blue today."}, {"prompt": "Grass", "completion": " is green."},
        {"prompt": "Snow is", "completion": " white."}, {"prompt": "Coal", "completion": " is black, yes indeed."}]


def _args(out):
    # logging at step 3 only, checkpoints at 2 and 4: the checkpoint-2 count holds 2 steps nobody logged
    return TrainingArguments(str(out), max_steps=4, per_device_train_batch_size=1, logging_steps=3,
                             save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
                             dataloader_pin_memory=False, disable_tqdm=True, learning_rate=1e-3, seed=0)


def _logged(trainer):
    return {h["step"]: h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h}


def test_resumed_run_continues_num_tokens(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    a = SFTTrainer(load_model(path), _args(tmp_path / "a"), train_dataset=ROWS, processing_class=tok)
    a.train()
    total = sum(len(a.train_dataset[i]["input_ids"]) for i in range(4))  # one epoch: every row once, no padding
    ck2, ck4 = (json.loads((tmp_path / "a" / f"checkpoint-{n}" / STATE_JSON).read_text())["num_tokens"]
                for n in (2, 4))
    assert ck4 == total and 0 < ck2 < total
    uninterrupted = _logged(a)[3]
    assert ck2 < uninterrupted < total

    b = SFTTrainer(load_model(path), _args(tmp_path / "b"), train_dataset=ROWS, processing_class=tok)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert _logged(b)[3] == uninterrupted  # from 0 again it would be one row's tokens, < ck2
    assert json.loads((tmp_path / "b" / "checkpoint-4" / STATE_JSON).read_text())["num_tokens"] == total


def test_a_new_run_into_a_folder_of_checkpoints_says_it_replaces_them(tiny_dir, tmp_path, caplog):
    """A second train() (not resumed) into an output_dir of an earlier run's checkpoints wrote its checkpoint-2 and -4
    over the earlier run's without a word (the Trainer's behaviour). Now one warning naming them and the way to
    continue instead; a resumed run and a run into an empty folder say nothing."""
    import logging

    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    first = SFTTrainer(load_model(path), _args(tmp_path / "a"), train_dataset=ROWS, processing_class=tok)
    with caplog.at_level(logging.WARNING, logger="alignkit.trainers.checkpointing"):
        first.train()
        assert not [r for r in caplog.records if "of an earlier run" in r.message]
        SFTTrainer(load_model(path), _args(tmp_path / "a"), train_dataset=ROWS, processing_class=tok).train()
        said = [r.message for r in caplog.records if "of an earlier run" in r.message]
        assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'a'} holds checkpoint-2, checkpoint-4 of an "
                                                     "earlier run, and this run is not resumed"), said
        caplog.clear()
        SFTTrainer(load_model(path), _args(tmp_path / "a"), train_dataset=ROWS,
                   processing_class=tok).train(resume_from_checkpoint=True)
        assert not [r for r in caplog.records if "of an earlier run" in r.message]


def test_a_resumed_runs_training_loss_counts_the_steps_before_the_checkpoint(tiny_dir, tmp_path):
    """Resumed from checkpoint-2 (its 2 steps never logged: logging at step 3): `train()`'s training_loss and the
    summary row's train_loss were the mean of steps 3-4 only; now the mean of all 4, as the uninterrupted run's."""
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    a = SFTTrainer(load_model(path), _args(tmp_path / "a"), train_dataset=ROWS, processing_class=tok)
    whole = a.train().training_loss
    b = SFTTrainer(load_model(path), _args(tmp_path / "b"), train_dataset=ROWS, processing_class=tok)
    out = b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert out.training_loss == pytest.approx(whole, rel=1e-6)
    assert [h["train_loss"] for h in b.state.log_history if "train_loss" in h] == [out.training_loss]
