"""A library resume with other training settings than the checkpoint's. `trainer.train(resume_from_checkpoint=...)`
with, say, another learning rate or DPO beta ran: the Trainer restored the checkpoint's optimizer and scheduler
states (the scheduler's base learning rate is the old one, so the new learning_rate was silently ignored) and
skipped the batches seen, counted in the new batch size. The CLI refused such changes (its config comparison);
a Python caller got nothing. Now `check_resume` compares the checkpoint's `training_args.json` and the objective
settings each checkpoint records, and refuses a change in one line naming `key: old -> new`; how long the run goes
and what it logs may still change."""

from __future__ import annotations

import json

import pytest
from transformers import TrainingArguments

from alignkit.models.loading import load_model, load_tokenizer
from alignkit.run_commit import CheckpointError
from alignkit.trainers import KTOTrainer, PreferenceTrainer, SFTTrainer
from alignkit.trainers.checks import STATE_JSON, training_changes

SFT_ROWS = [{"prompt": "The sky is", "completion": " blue today."}, {"prompt": "Grass", "completion": " is green."}]
PREF_ROWS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
             {"prompt": "Grass is", "chosen": " green.", "rejected": " loud."}]
KTO_ROWS = [{"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": "Grass is", "completion": " loud.", "label": False}] * 2


def _args(out, **over):
    base = dict(max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_strategy="steps", save_steps=1,
                report_to="none", use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True, learning_rate=1e-3,
                seed=0)
    return TrainingArguments(str(out), **{**base, **over})


# (trainer, rows, its first run's keywords, the resumed run's arguments / keywords, what the one line names)
CASES = {
    "learning_rate": (SFTTrainer, SFT_ROWS, {}, ({"learning_rate": 5e-4}, {}), "learning_rate: 0.001 -> 0.0005"),
    "batch": (SFTTrainer, SFT_ROWS, {}, ({"per_device_train_batch_size": 1}, {}),
              "per_device_train_batch_size: 2 -> 1"),
    "seed": (SFTTrainer, SFT_ROWS, {}, ({"seed": 1}, {}), "seed: 0 -> 1"),
    "weights": (SFTTrainer, SFT_ROWS, {}, ({}, {"weight_normalization": "weighted"}),
                "weight_normalization: 'count' -> 'weighted'"),
    "dpo beta": (PreferenceTrainer, PREF_ROWS, {"beta": 0.1}, ({}, {"beta": 0.5}), "beta: 0.1 -> 0.5"),
    "dpo loss": (PreferenceTrainer, PREF_ROWS, {}, ({}, {"loss_type": "ipo"}), "loss_type: ['sigmoid'] -> ['ipo']"),
    "kto weight": (KTOTrainer, KTO_ROWS, {}, ({}, {"undesirable_weight": 2.0}), "undesirable_weight: 1.0 -> 2.0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_other_training_settings_is_refused(case, tiny_dir, tmp_path):
    cls, rows, first_kw, (args_over, kw), named = CASES[case]
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    cls(load_model(path), _args(tmp_path / "a"), train_dataset=rows, processing_class=tok, **first_kw).train()
    ck = tmp_path / "a" / "checkpoint-1"
    assert "training_settings" in json.loads((ck / STATE_JSON).read_text())
    before = sorted(p.name for p in (tmp_path / "a").rglob("*"))
    resumed = cls(load_model(path), _args(tmp_path / "b", **args_over), train_dataset=rows, processing_class=tok,
                  **{**first_kw, **kw})
    with pytest.raises(CheckpointError) as err:
        resumed.train(resume_from_checkpoint=str(ck))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"resume_from_checkpoint: {ck} was trained with other settings")
    assert named in msg and "start a new run from its weights" in msg, msg
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").glob("checkpoint-*"))
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == before  # the earlier run is untouched


def test_resume_may_change_how_long_it_runs_and_what_it_logs(tiny_dir, tmp_path):
    """max_steps, logging, evaluation batch size and saving are not the training itself: the resume goes on."""
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    SFTTrainer(load_model(path), _args(tmp_path / "a"), train_dataset=SFT_ROWS, processing_class=tok).train()
    b = SFTTrainer(load_model(path), _args(tmp_path / "b", max_steps=3, logging_steps=2, save_steps=3,
                                           per_device_eval_batch_size=4),
                   train_dataset=SFT_ROWS, processing_class=tok)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert b.state.global_step == 3


def test_what_a_checkpoint_does_not_record_is_not_compared(tmp_path):
    """A checkpoint of an older alignkit (no `training_settings` in its state file) or arguments of another
    transformers version (a field one side lacks) are compared on what both record, by hand here."""
    (tmp_path / "training_args.json").write_text(json.dumps({"learning_rate": 0.001, "seed": 0, "output_dir": "x"}))
    (tmp_path / STATE_JSON).write_text(json.dumps({"world_size": 1}))
    now = {"learning_rate": 0.001, "seed": 0, "output_dir": "y", "data_seed": 3, "logging_steps": 7}
    assert training_changes(tmp_path, json.dumps(now), {"loss_type": "ipo"}) == []
    now.update(learning_rate=0.002, seed=1)
    assert training_changes(tmp_path, json.dumps(now), {}) == ["learning_rate: 0.001 -> 0.002", "seed: 0 -> 1"]
    (tmp_path / STATE_JSON).write_text(json.dumps({"training_settings": {"loss_type": ["sigmoid"], "beta": 0.1}}))
    assert training_changes(tmp_path, json.dumps({}), {"loss_type": ("sigmoid",), "beta": 0.1, "new": 1}) == []
    assert training_changes(tmp_path, json.dumps({}), {"loss_type": ("ipo",), "beta": 0.1}) == [
        "loss_type: ['sigmoid'] -> ['ipo']"]
