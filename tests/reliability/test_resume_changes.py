"""A resume from a checkpoint copied out of its run folder (`train.resume_from_checkpoint=kept/checkpoint-2`): no
config.yaml beside it to compare, so only what the checkpoint itself records guards the resume (the same guard a
Python caller of `trainer.train(resume_from_checkpoint=...)` has)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.reliability.test_resume_cli import cli, killed_after, losses

LORA = ["adapter.kind=lora", "adapter.lora={r: 2, alpha: 4.0}"]
CHANGES = {  # config, the first run's overrides, the resume's, what the one line names
    "lora-alpha": ("sft-tiny.yaml", LORA, ["adapter.lora={r: 2, alpha: 16.0}"], "adapter.lora.alpha: 4.0 -> 16.0"),
    "lora-dropout": ("sft-tiny.yaml", LORA, ["adapter.lora={r: 2, alpha: 4.0, dropout: 0.5}"],
                     "adapter.lora.dropout: 0.0 -> 0.5"),
    "reft-positions": ("sft-reft-tiny.yaml", [], ["adapter.reft.positions=f3+l3"],
                       "adapter.reft.positions: 'f1+l1' -> 'f3+l3'"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_copied_checkpoint_resumed_with_other_adapter_settings_is_refused(case, tmp_path, capsys):
    """LoRA's alpha or dropout changed: the resume went on without a word (exit 0), training the checkpoint's
    weights with another scaling / dropout under its optimizer state: neither run. ReFT's positions changed: exit 1,
    'unexpected error: ValueError ... please report it', from the Trainer's load. Now the adapter's settings are in
    each checkpoint's recorded training settings: one line naming `key: old -> new`, before the new folder exists."""
    config, first, changed, said = CHANGES[case]
    assert cli("sft", config, tmp_path / "a", [*first, "train.max_steps=2"]) == 0
    ckpt = tmp_path / "kept" / "checkpoint-2"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", ckpt)
    capsys.readouterr()
    resume = ["train.max_steps=3", f"train.resume_from_checkpoint={ckpt}"]
    assert cli("sft", config, tmp_path / "b", [*first, *changed, *resume]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: train.resume_from_checkpoint: {ckpt} was "
                                               f"trained with other settings than this run's ({said})"), err
    assert not (tmp_path / "b").exists()
    assert cli("sft", config, tmp_path / "b", [*first, *resume]) == 0  # the checkpoint's own settings resume


@pytest.mark.parametrize("command, config", [("dpo", "dpo-tiny.yaml"), ("kto", "kto-tiny.yaml")])
def test_a_copied_full_checkpoint_resumed_on_another_model_is_refused(command, config, tmp_path, tiny_dir, capsys):
    """Full finetuning with a reference copy of the starting model: a checkpoint resumed with another model.path of
    the same shapes went on (exit 0) with the checkpoint's policy scored against the other model as the reference
    (a LoRA / ReFT checkpoint is refused by its alignkit_base.json; a full one records none). Now each checkpoint
    records the reference's fingerprint: one line naming what differs and the model it was trained against."""
    full = ["adapter.kind=full", "adapter.lora=null", "train.max_steps=2"]
    base, other = tiny_dir("llama"), tiny_dir("llama", seed=1)
    assert cli(command, config, tmp_path / "a", [f"model.path={base}", *full]) == 0
    ckpt = tmp_path / "kept" / "checkpoint-2"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", ckpt)
    capsys.readouterr()
    resume = [*full, "train.max_steps=3", f"train.resume_from_checkpoint={ckpt}"]
    assert cli(command, config, tmp_path / "b", [f"model.path={other}", *resume]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(
        f"alignkit {command}: error: train.resume_from_checkpoint: {ckpt} was trained against another reference model "
        f"than this run's (its input embedding weights differ (another model or revision with the same shapes); it "
        f"was trained against {base})"), err
    assert not (tmp_path / "b").exists()
    assert cli(command, config, tmp_path / "b", [f"model.path={base}", *resume]) == 0


def test_a_resume_logs_and_saves_at_the_new_intervals(tmp_path):
    """--resume with train.save_steps 2 -> 3 and logging_steps 1 -> 2 (changes a resume accepts, logged as made):
    the Trainer took the intervals from the checkpoint's trainer_state.json, so the resumed run still saved at 6, 8
    and logged every step 5-10 while config.yaml said 3 and 2. Now it saves at 6 and 9 (and 10, the last step) and
    logs at 6, 8 and 10, as the new values say."""
    run = tmp_path / "run"
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=4"]) == 0
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=10", "train.save_steps=3", "train.logging_steps=2"],
               "--resume") == 0
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert saved == [2, 4, 6, 9, 10]
    assert sorted(losses(run)) == [1, 2, 3, 4, 6, 8, 10]
    assert "save_steps: 3" in (run / "config.yaml").read_text()


def test_a_resumed_runs_train_loss_is_the_mean_over_every_step(tmp_path, monkeypatch):
    """Killed in step 3 of 4 (checkpoint-2) and resumed: the summary row's train_loss (metrics.jsonl, TensorBoard,
    TrainOutput.training_loss) was the Trainer's mean over this call's steps, 3 and 4 only (rm: 0.418 against the
    uninterrupted run's 0.526). Now it is the mean of the four logged step losses, as the uninterrupted run's."""
    def summary(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    assert cli("rm", "rm-tiny.yaml", tmp_path / "whole", []) == 0
    killed_after(monkeypatch, 2, "rm", "rm-tiny.yaml", tmp_path / "cut", [])
    assert cli("rm", "rm-tiny.yaml", tmp_path / "cut", [], "--resume") == 0
    steps = losses(tmp_path / "cut")
    assert sorted(steps) == [1, 2, 3, 4] and steps == losses(tmp_path / "whole")
    want = sum(steps.values()) / 4  # by hand: logging_steps=1, so each row's loss is one step's
    assert summary(tmp_path / "whole") == [pytest.approx(want, rel=1e-6)]
    assert summary(tmp_path / "cut") == [pytest.approx(want, rel=1e-6)]
