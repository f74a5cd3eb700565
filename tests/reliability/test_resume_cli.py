"""Issue 12, finding 2 (and 5): `alignkit <cmd> --resume` and `train.resume_from_checkpoint=PATH` really resume.

A run is killed (an exception inside optimizer step 3, after checkpoint-2 was written); `--resume` continues it in
the same folder: metrics.jsonl keeps steps 1-2 and continues with 3-4, and those losses equal an uninterrupted
run's exactly (CPU, fp32), for sft and dpo with full / LoRA / ReFT adapters (three of them killed and resumed in
place, the other three resumed from the uninterrupted run's checkpoint-2 into a new folder)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.trainers.base import AlignTrainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = ["train.max_steps=4", "train.save_strategy=steps", "train.save_steps=2", "train.eval_strategy=no",
         "data.eval_fraction=0.0", "train.logging_steps=1", "data.max_records=8"]
CASES = {  # (command, config, extra overrides)
    "sft-full": ("sft", "sft-tiny.yaml", []),
    "sft-lora": ("sft", "sft-tiny.yaml", ["adapter.kind=lora", "adapter.lora={r: 2, alpha: 4.0}"]),
    "sft-reft": ("sft", "sft-reft-tiny.yaml", []),
    "dpo-full": ("dpo", "dpo-tiny.yaml", []),
    "dpo-lora": ("dpo", "dpo-lora-tiny.yaml", []),
    "dpo-reft": ("dpo", "dpo-reft-tiny.yaml", []),
    # TR-DPO: the reference moves after every step, so steps 3-4 score against the checkpoint's synced reference
    "dpo-full-ref-sync": ("dpo", "dpo-tiny.yaml", ["method.ref_sync={alpha: 0.5, steps: 1}"]),
}


class Killed(BaseException):
    """Stands for SIGKILL / Ctrl-C: not an Exception, so nothing catches it on the way out."""


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def cli(command, config, out, extra, *flags):
    return main(["-q", command, "--config", str(CONFIGS / config), *flags, f"output_dir={out}", *STEPS, *extra])


def killed_after(monkeypatch, steps: int, *run) -> None:
    """`cli(*run)` killed inside optimizer step `steps + 1`, after `steps` steps were logged."""
    real_step = AlignTrainer.training_step

    def dies(self, *a, **kw):
        if self.state.global_step == steps:
            raise Killed()
        return real_step(self, *a, **kw)

    monkeypatch.setattr(AlignTrainer, "training_step", dies)
    with pytest.raises(Killed):
        cli(*run)
    monkeypatch.setattr(AlignTrainer, "training_step", real_step)


KILLED = ("sft-full", "dpo-lora", "dpo-reft", "dpo-full-ref-sync")  # the others resume from the uninterrupted run's checkpoint-2 (cheaper)


@pytest.mark.parametrize("case", list(CASES))
def test_kill_then_resume_equals_uninterrupted(case, tmp_path, monkeypatch):
    command, config, extra = CASES[case]
    assert cli(command, config, tmp_path / "whole", extra) == 0
    want = losses(tmp_path / "whole")
    assert sorted(want) == [1, 2, 3, 4]
    if case not in KILLED:
        ckpt = tmp_path / "whole" / "checkpoints" / "checkpoint-2"
        assert cli(command, config, tmp_path / "again", [*extra, f"train.resume_from_checkpoint={ckpt}"]) == 0
        assert losses(tmp_path / "again") == {k: v for k, v in want.items() if k > 2}
        return

    killed_after(monkeypatch, 2, command, config, tmp_path / "cut", extra)
    assert sorted(losses(tmp_path / "cut")) == [1, 2] and not (tmp_path / "cut" / "model").exists()

    assert cli(command, config, tmp_path / "cut", extra, "--resume") == 0
    got = losses(tmp_path / "cut")
    assert got == want  # exact equality, steps 1-2 kept from before the kill, 3-4 from the resumed run
    assert (tmp_path / "cut" / "model" / "alignkit_complete.json").is_file()


def test_resume_from_checkpoint_path_and_errors(tmp_path, capsys):
    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, []) == 0
    want = losses(run)
    # an explicit checkpoint, into a fresh folder: the later steps equal the original run's
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert cli("sft", "sft-tiny.yaml", tmp_path / "b", [f"train.resume_from_checkpoint={ckpt}"]) == 0
    got = losses(tmp_path / "b")
    assert sorted(got) == [3, 4] and got == {k: v for k, v in want.items() if k > 2}
    capsys.readouterr()
    # a path that does not exist: one clear line, exit 2, nothing written
    assert cli("sft", "sft-tiny.yaml", tmp_path / "c", [f"train.resume_from_checkpoint={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert "train.resume_from_checkpoint:" in err and "does not exist" in err and not (tmp_path / "c").exists()
    # another learning rate than the checkpoint's run: before, the run went on at the checkpoint's rate (its
    # scheduler) while the new config.yaml recorded 0.05; now one line naming the key, nothing written
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert cli("sft", "sft-tiny.yaml", tmp_path / "d", [f"train.resume_from_checkpoint={ckpt}",
                                                         "train.learning_rate=0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("alignkit sft: error: train.resume_from_checkpoint: the settings differ from the run's "
                          f"{run.resolve() / 'config.yaml'}: train.learning_rate: 0.001 in the run, 0.05 now"), err
    assert not (tmp_path / "d").exists()
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_skips_incomplete_checkpoint_and_says_so(tmp_path, caplog):
    """A kill in the middle of writing checkpoint-4 (simulated: its marker missing, a file truncated) leaves it
    incomplete; --resume names it, skips it, and continues from checkpoint-2."""
    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, []) == 0
    want = losses(run)
    ck4 = run / "checkpoints" / "checkpoint-4"
    (ck4 / "alignkit_complete.json").unlink()
    weights = ck4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.rmtree(run / "model")
    with caplog.at_level("WARNING"):
        assert cli("sft", "sft-tiny.yaml", run, [], "--resume") == 0
    assert any("skipping incomplete checkpoint" in r.message and "checkpoint-4" in r.message for r in caplog.records)
    assert losses(run) == want


def test_checkpoint_with_truncated_file_is_incomplete(tmp_path, capsys):
    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=2"]) == 0
    ck = run / "checkpoints" / "checkpoint-2"
    (ck / "optimizer.pt").write_bytes(b"")  # truncated by a kill after the marker? the sizes disagree
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", tmp_path / "b", [f"train.resume_from_checkpoint={ck}"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt has 0 bytes" in err


def test_kill_while_writing_a_checkpoint_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A kill in the middle of writing checkpoint-4 (after the weights, before the RNG state): no `checkpoint-4`
    appears (it was being written in checkpoints/.staging); --resume continues from checkpoint-2 and equals the
    uninterrupted run; the leftover staging folder is cleaned up by the next save."""
    from transformers import Trainer

    assert cli("sft", "sft-tiny.yaml", tmp_path / "whole", []) == 0
    want = losses(tmp_path / "whole")
    real = Trainer._save_rng_state

    def dies_on_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed()
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_on_4)
    run = tmp_path / "cut"
    with pytest.raises(Killed):
        cli("sft", "sft-tiny.yaml", run, [])
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".staging", "checkpoint-2"]
    assert (run / "checkpoints" / ".staging" / "checkpoint-4" / "model.safetensors").is_file()  # the half-written one
    assert cli("sft", "sft-tiny.yaml", run, [], "--resume") == 0
    assert losses(run) == want
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_config_changes_flattens_and_names_defaults():
    from alignkit.cli.runfolder import config_changes

    old = {"command": "sft", "train": {"learning_rate": 0.001, "max_steps": 2}, "adapter": {"lora": {"r": 8}}}
    new = {"command": "sft", "train": {"max_steps": 4, "seed": 1}, "adapter": {"lora": {"r": 8}}}
    assert config_changes(old, new) == [("train.learning_rate", 0.001, None), ("train.max_steps", 2, 4),
                                        ("train.seed", None, 1)]


def test_resume_refuses_a_changed_setting_and_leaves_the_run_alone(tmp_path, capsys):
    """The checkpoint's scheduler restores the old learning rate: a --resume with another train.learning_rate
    used to run with the OLD rate while config.yaml recorded the new one. Now it stops before writing anything;
    a change of how long it runs (max_steps) and what it logs is accepted."""
    out = tmp_path / "run"
    steps = ["train.max_steps=2", "train.save_strategy=steps", "train.save_steps=2", "train.eval_strategy=no",
             "data.eval_fraction=0.0", "data.max_records=8"]
    base = ["-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml")]
    assert main([*base, f"output_dir={out}", *steps]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*base, "--resume", f"output_dir={out}", *steps, "train.learning_rate=0.05", "method.loss_type=nll"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume: the settings differ" in err and "train.learning_rate: 0.001 in the run, 0.05 now" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    longer = [s.replace("max_steps=2", "max_steps=3") for s in steps] + ["train.logging_steps=2"]
    assert main([*base, "--resume", f"output_dir={out}", *longer]) == 0
    assert sorted(losses(out)) == [1, 2, 3]


def test_resume_refuses_a_checkpoint_without_optimizer_state(tmp_path, capsys):
    """A checkpoint saved with train.save_only_model=true holds the weights but no optimizer.pt / scheduler.pt. The
    Trainer resumed from it without a word, with Adam's moments and the learning-rate schedule started again from
    zero (and exit 0). Now --resume and train.resume_from_checkpoint stop before anything is written."""
    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=2", "train.save_only_model=true"]) == 0
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert not (ckpt / "optimizer.pt").exists()
    shutil.rmtree(run / "model")  # as after a kill before the end
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", run, ["train.save_only_model=true"], "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: --resume: {ckpt} holds no optimizer.pt / "
                                               "scheduler.pt (a checkpoint saved with train.save_only_model=true"), err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert cli("sft", "sft-tiny.yaml", tmp_path / "b", ["train.save_only_model=true",
                                                         f"train.resume_from_checkpoint={ckpt}"]) == 2
    assert "train.resume_from_checkpoint: " in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_resume_refuses_another_number_of_processes(tmp_path, capsys):
    """Resuming a checkpoint with another number of processes than wrote it (torchrun / accelerate launch) changes
    the batch of an optimizer step and skips other records than the ones trained on; it was accepted without a word.
    Now the checkpoint records its world size and a resume with another one stops before anything is written. (The
    check runs on the trainer's processes, so the two-process side is the checkpoint's here: a one-process test
    cannot build a two-process trainer.)"""
    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=2"]) == 0
    ckpt = run / "checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "alignkit_state.json").read_text())
    assert state["world_size"] == 1
    (ckpt / "alignkit_state.json").write_text(json.dumps({**state, "world_size": 2}))  # as a 2-process run writes it
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", run, [], "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: --resume: {ckpt} was written by a run of 2 "
                                               "process(es), this one has 1"), err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_from_another_runs_checkpoint_never_mixes_two_runs(tmp_path, capsys):
    """train.resume_from_checkpoint=<run a's checkpoint> with output_dir = run b, a folder holding another run: b's
    metrics.jsonl was cut to b's own steps 1-2 and a's continuation appended after them, b's config.yaml and model/
    replaced, b's checkpoint-2 kept beside the new checkpoint-4: two runs mixed in one folder, exit 0 (--overwrite
    was accepted and ignored). Now without --overwrite it stops, b untouched; with --overwrite the resumed run
    replaces b as a whole; --overwrite of the folder the checkpoint lies in is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("sft", "sft-tiny.yaml", a, []) == 0
    want = losses(a)
    assert cli("sft", "sft-tiny.yaml", b, ["train.seed=7"]) == 0  # another run
    before = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    ckpt = a / "checkpoints" / "checkpoint-2"
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", b, [f"train.resume_from_checkpoint={ckpt}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: output_dir: {b} already holds files") \
        and f"train.resume_from_checkpoint={ckpt} is not one of its checkpoints; pass --overwrite" in err[0], err
    assert {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
    assert cli("sft", "sft-tiny.yaml", a, [f"train.resume_from_checkpoint={ckpt}"], "--overwrite") == 2
    assert "lies inside output_dir" in capsys.readouterr().err and losses(a) == want
    assert cli("sft", "sft-tiny.yaml", b, [f"train.resume_from_checkpoint={ckpt}"], "--overwrite") == 0
    assert losses(b) == {k: v for k, v in want.items() if k > 2}  # a's continuation alone, none of b's old rows
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["checkpoint-4"]


def test_resume_that_lengthens_a_decaying_schedule_warns(tmp_path, caplog):
    """Extending a run (--resume with a larger train.max_steps) under a linear schedule: the Trainer rebuilds the
    schedule for the new length, while the first resumed step still uses the rate the checkpoint's optimizer state
    holds. Each row logs the rate its update used, lr0 * (1 - (step - 1) / T): steps 1-2 on the 2-step line (1e-3,
    5e-4), step 3 that line's next value 1e-3 * (1 - 2/2) = 0 (an update that does nothing), step 4 the 8-step
    line's 1e-3 * (1 - 3/8): neither schedule. Allowed, as before, but no longer without a word."""
    out = tmp_path / "run"
    assert cli("sft", "sft-tiny.yaml", out, ["train.lr_scheduler_type=linear", "train.max_steps=2"]) == 0
    with caplog.at_level("WARNING"):
        assert cli("sft", "sft-tiny.yaml", out, ["train.lr_scheduler_type=linear", "train.max_steps=8"], "--resume") == 0
    warned = [r.getMessage() for r in caplog.records if "schedule is rebuilt" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("--resume: train.max_steps changes from 2 to 8 under "
                                                     "train.lr_scheduler_type=linear"), warned
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    assert [rate[2], rate[3], rate[4]] == pytest.approx([1e-3 * (1 - 1 / 2), 1e-3 * (1 - 2 / 2), 1e-3 * (1 - 3 / 8)])


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows the run folder's events (its own purge rules applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_purges_the_killed_runs_tensorboard_steps_after_the_checkpoint(tmp_path, monkeypatch, next_event_file_second):
    """Killed after logging step 3 (checkpoint-2 the newest): metrics.jsonl was trimmed to step 2 on resume, but the
    killed run's TensorBoard events for step 3 stayed beside the resumed run's, so TensorBoard showed two losses at
    step 3. The resumed writer purges them (`purge_step`): one value per step, the resumed run's."""
    killed_after(monkeypatch, 3, "sft", "sft-tiny.yaml", tmp_path / "cut", [])
    assert [s for s, _ in tensorboard_scalars(tmp_path / "cut" / "tensorboard", "train/loss")] == [1, 2, 3]
    next_event_file_second()
    assert cli("sft", "sft-tiny.yaml", tmp_path / "cut", [], "--resume") == 0
    shown = tensorboard_scalars(tmp_path / "cut" / "tensorboard", "train/loss")
    want = losses(tmp_path / "cut")
    assert [s for s, _ in shown] == [1, 2, 3, 4], shown
    assert shown == [(s, pytest.approx(want[s], rel=1e-6)) for s in (1, 2, 3, 4)]


def test_resume_refuses_a_checkpoint_trained_on_other_examples(tmp_path, capsys):
    """config.yaml names the data file, not its contents: a file edited (or regenerated) between the kill and
    --resume was accepted, and the Trainer skipped the checkpoint's batches counted in the new data (exit 0).
    Checkpoints now record the SHA-256 of the tokenized training examples; another one stops before anything is
    written. The same file resumes (the digest is reproducible)."""
    from importlib.resources import files

    data = tmp_path / "pairs.jsonl"
    data.write_text(files("alignkit").joinpath("resources/data/hh_rlhf_sample.jsonl").read_text())
    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, [f"data.path={data}"]) == 0
    shutil.rmtree(run / "model")  # as after a kill before the end
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # two records swapped: same config
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", run, [f"data.path={data}"], "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"--resume: {run / 'checkpoints' / 'checkpoint-4'} was trained on other training " \
                               "examples" in err[0], err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    data.write_text("\n".join(lines) + "\n")
    assert cli("sft", "sft-tiny.yaml", run, [f"data.path={data}"], "--resume") == 0


def test_a_cli_resume_checks_the_checkpoint_once_before_writing(tmp_path, monkeypatch):
    """The CLI checked a checkpoint up to three times (before loading without the data, with the data before the run
    folder, again in AlignTrainer.train) under a label written twice. Now one check, the trainer's, before the run
    folder is touched, naming what asked for the resume; train() does not repeat it."""
    import alignkit.trainers.checkpointing as checkpointing

    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=2"]) == 0
    shutil.rmtree(run / "model")  # as after a kill before the end
    calls, real = [], checkpointing.check_resumable
    monkeypatch.setattr(checkpointing, "check_resumable", lambda *a: (calls.append(a[2]), real(*a))[1])
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=3"], "--resume") == 0
    assert calls == ["--resume"]


def test_resume_under_deepspeed_is_refused_before_the_run_folder_is_touched(tmp_path, monkeypatch, capsys):
    """A resume under DeepSpeed (which alignkit cannot resume) was refused only in AlignTrainer.train, after the CLI
    had begun the run: metrics.jsonl already cut to the checkpoint's step (the killed run's step 3 lost) and a
    TensorBoard writer opened. Now the refusal is part of the one resume check, before anything is written."""
    import alignkit.trainers.checkpointing as checkpointing

    run = tmp_path / "cut"
    killed_after(monkeypatch, 3, "sft", "sft-tiny.yaml", run, [])
    assert sorted(losses(run)) == [1, 2, 3]
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setattr(checkpointing, "is_deepspeed", lambda accelerator: True)  # as under an accelerate DeepSpeed config
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", run, [], "--resume") == 2
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert len(err) == 1 and err[0].startswith("alignkit sft: error: --resume: resuming under DeepSpeed is not "
                                               "supported by alignkit"), err


def test_a_resume_whose_data_cannot_be_compared_says_so(tmp_path, caplog):
    """The training examples are compared with the checkpoint's by their digest; where one side has none (a
    checkpoint of an older alignkit, or this run's data without a length, whose digest is None) the resume went on
    without a word. Legitimate, so not refused: one warning naming why and that the data must be the same."""
    from alignkit.trainers.checks import check_resumable

    run = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=2"]) == 0
    shutil.rmtree(run / "model")  # as after a kill before the end
    ckpt = run / "checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "alignkit_state.json").read_text())
    with caplog.at_level("WARNING"):
        check_resumable(ckpt, 1, "resume_from_checkpoint", state["data_sha256"])  # comparable: nothing said
        assert not [r for r in caplog.records if "could not be compared" in r.getMessage()]
        check_resumable(ckpt, 1, "resume_from_checkpoint", None)
    said = [r.getMessage() for r in caplog.records if "could not be compared" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"resume_from_checkpoint: the training examples could not be "
                                                 f"compared with the ones {ckpt} was trained on: this run's training "
                                                 "data has no length"), said
    del state["data_sha256"]  # as an older alignkit wrote it (the completeness marker lists the new size)
    (ckpt / "alignkit_state.json").write_text(json.dumps(state))
    marker = json.loads((ckpt / "alignkit_complete.json").read_text())
    marker["files"]["alignkit_state.json"] = (ckpt / "alignkit_state.json").stat().st_size
    (ckpt / "alignkit_complete.json").write_text(json.dumps(marker))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cli("sft", "sft-tiny.yaml", run, ["train.max_steps=3"], "--resume") == 0
    said = [r.getMessage() for r in caplog.records if "could not be compared" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"--resume: the training examples could not be compared with the "
                                                 f"ones {ckpt} was trained on: it records no digest"), said
    assert "resume on the same data in the same order" in said[0]


def test_resume_from_a_renamed_checkpoint_of_the_run_keeps_one_row_per_step(tmp_path, monkeypatch):
    """A checkpoint folder copied under another name (`checkpoints/kept`) and resumed with
    train.resume_from_checkpoint in its own run: the step was read from the folder's name only, so metrics.jsonl was
    not cut (the killed run's step 3 stayed, the resumed run's 3 and 4 were appended after it: two rows for step 3)
    and TensorBoard kept both too. The step now comes from the checkpoint's trainer_state.json."""
    run = tmp_path / "cut"
    killed_after(monkeypatch, 3, "sft", "sft-tiny.yaml", run, [])
    assert sorted(losses(run)) == [1, 2, 3]
    kept = run / "checkpoints" / "kept"
    shutil.copytree(run / "checkpoints" / "checkpoint-2", kept)
    assert cli("sft", "sft-tiny.yaml", run, [f"train.resume_from_checkpoint={kept}"]) == 0
    assert cli("sft", "sft-tiny.yaml", tmp_path / "whole", []) == 0
    assert losses(run) == losses(tmp_path / "whole")  # one row per step, each the uninterrupted run's
    shown = tensorboard_scalars(run / "tensorboard", "train/loss")
    assert [s for s, _ in shown] == [1, 2, 3, 4], shown


def test_overwrite_refuses_inputs_inside_the_folder_it_replaces(tmp_path, capsys):
    """`--overwrite output_dir=a model.path=a/model` (train on from the run's own model, replacing the run): the new
    run read a/model, then the swap deleted it; a LoRA adapter records its base model by path, so the new adapter
    named a/model, which now held the adapter itself (exit 0, unusable). Now refused before anything is written,
    naming the key; the same model copied out of the folder trains."""
    a = tmp_path / "a"
    assert cli("sft", "sft-tiny.yaml", a, ["train.max_steps=1"]) == 0
    before = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    lora = ["adapter.kind=lora", "adapter.lora={r: 2, alpha: 4.0}", "train.max_steps=1"]
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", a, [f"model.path={a / 'model'}", *lora], "--overwrite") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: model.path: {a / 'model'} lies inside "
                                               f"output_dir {a}, which --overwrite replaces as a whole"), err
    assert {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()} == before
    shutil.copytree(a / "model", tmp_path / "base")
    assert cli("sft", "sft-tiny.yaml", a, [f"model.path={tmp_path / 'base'}", *lora], "--overwrite") == 0


def test_resume_from_a_checkpoint_of_another_base_is_refused_before_anything_is_written(tmp_path, tiny_dir, capsys):
    """train.resume_from_checkpoint=<a LoRA checkpoint copied out of its run> (so no config.yaml to compare) with
    model.path another base of the same shapes: refused only when the Trainer loaded the checkpoint, after the new
    run folder (config.yaml, base_model/, tensorboard/) was written. Now one line naming the key, the base the
    checkpoint was trained on and what differs, before the folder exists; the checkpoint's own base resumes."""
    lora = ["adapter.kind=lora", "adapter.lora={r: 2, alpha: 4.0}", "train.max_steps=2"]
    base, other = tiny_dir("llama"), tiny_dir("llama", seed=1)
    assert cli("sft", "sft-tiny.yaml", tmp_path / "a", [f"model.path={base}", *lora]) == 0
    ckpt = tmp_path / "kept" / "checkpoint-2"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", ckpt)
    capsys.readouterr()
    resume = [*lora, "train.max_steps=3", f"train.resume_from_checkpoint={ckpt}"]
    assert cli("sft", "sft-tiny.yaml", tmp_path / "b", [f"model.path={other}", *resume]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: train.resume_from_checkpoint: {ckpt}: this "
                                               "adapter was trained on a different base model (its input embedding "
                                               "weights differ (another model or revision with the same shapes); it "
                                               f"was trained on {base})"), err
    assert "check_base" not in err[0] and "start a new run from its weights" in err[0]  # no switch a resume reads
    assert not (tmp_path / "b").exists()
    assert cli("sft", "sft-tiny.yaml", tmp_path / "b", [f"model.path={base}", *resume]) == 0


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_with_every_step_done_is_not_resumed_past_max_steps(tmp_path, monkeypatch, capsys, finished):
    """Killed while saving model/ (after checkpoint-4, the last of max_steps=4), or resumed when it had finished:
    --resume trained a 5th optimizer step (checkpoint-4 ends inside an epoch, and the Trainer checks max_steps only
    after a step), wrote checkpoint-5 and saved that model as the run's ("optimizer steps done 5" in its card).
    Then it trained nothing but logged a second training summary and a second evaluation at step 4 (two of each in
    metrics.jsonl and on the plots), and a finished run's folder was rewritten. Now the killed run saves model/
    (checkpoint-4's weights) and logs no row; the finished one says in one line that there is nothing to do and
    leaves every file as it was."""
    from safetensors.torch import load_file

    import alignkit.cli.train as train_cli

    run, extra = tmp_path / "run", ["data.eval_fraction=0.25"]  # 6 training records, batch 2: 3 steps an epoch
    if finished:
        assert cli("sft", "sft-tiny.yaml", run, extra) == 0
    else:
        def killed(*a, **kw):
            raise Killed()

        monkeypatch.setattr(train_cli, "write_prompt_formats", killed)
        with pytest.raises(Killed):
            cli("sft", "sft-tiny.yaml", run, extra)
        monkeypatch.undo()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli("sft", "sft-tiny.yaml", run, extra, "--resume") == 0
    out = capsys.readouterr().out.splitlines()
    if finished:
        assert out == [f"alignkit sft: nothing to do: all 4 optimizer steps are done (checkpoint-4) and model/ holds "
                       f"step 4; {run} is left as it was (raise train.max_steps or train.num_train_epochs to train "
                       "on)"], out
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        # a process other than the main one (torchrun) says nothing: one line per run, as the closing "done" line
        from alignkit.trainers.base import AlignTrainer
        with monkeypatch.context() as m:
            m.setattr(AlignTrainer, "is_world_process_zero", lambda self: False)
            assert cli("sft", "sft-tiny.yaml", run, extra, "--resume") == 0
        assert capsys.readouterr().out == ""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "train_runtime" in r] == [4]  # the first run's summary, once
    assert [r["step"] for r in rows if "eval_runtime" in r] == [4]  # its final evaluation, once
    assert "| `optimizer steps done` | 4 |" in (run / "README.md").read_text()
    saved = load_file(str(run / "model" / "model.safetensors"))
    at_4 = load_file(str(run / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    assert saved.keys() == at_4.keys() and all(bool((saved[k] == at_4[k]).all()) for k in saved)
    assert cli("sft", "sft-tiny.yaml", run, [*extra, "train.max_steps=6"], "--resume") == 0  # training on: as before
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("extra", [[], ["adapter.kind=lora", "adapter.lora={r: 2, alpha: 4.0}"]],
                         ids=["full", "lora"])
def test_a_run_config_records_only_the_adapter_parts_its_kind_uses_and_an_older_one_still_resumes(extra, tmp_path):
    """A run's config.yaml held every adapter part section (a full run's: the default lora section and reft: null),
    so a section the kind does not use could not be refused at load without refusing the run's own config. Now
    config.yaml records the kind's parts only; it loads back to the same settings, and a run folder written before
    (its config.yaml given the old default sections back) still loads, and --resume continues it from it."""
    import yaml

    from alignkit.adapters.config import KINDS, PART_SETTINGS
    from alignkit.settings import load_config

    run = tmp_path / "run"
    assert cli("sft", "sft-tiny.yaml", run, [*extra, "train.max_steps=2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    kind = saved["adapter"]["kind"]
    assert set(saved["adapter"]) == {"kind", *KINDS[kind].parts}
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(CONFIGS / "sft-tiny.yaml", [*STEPS, *extra, "train.max_steps=2", f"output_dir={run}"])
    saved["adapter"] = dataclasses.asdict(cfg.adapter)  # as an earlier alignkit wrote it: every part's section
    assert set(saved["adapter"]) == {"kind", *PART_SETTINGS}
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert load_config(run / "config.yaml") == cfg
    assert main(["-q", "sft", "--config", str(run / "config.yaml"), "--resume", "train.max_steps=4"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4]
    again = yaml.safe_load((run / "config.yaml").read_text())
    assert set(again["adapter"]) == {"kind", *KINDS[kind].parts} and again["train"]["max_steps"] == 4
