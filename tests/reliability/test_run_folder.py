"""Issue 12, finding 4: an existing run folder is never damaged by a later run. A non-empty output_dir is refused
unless --resume or --overwrite; --overwrite replaces the folder as a whole (never mixing two runs' files) and only
once the new run has finished; a run that fails its checks writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ONE = ["train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0", "data.max_records=4"]


def sft(out, *args):
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    return main(["-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), *flags, f"output_dir={out}", *ONE,
                 *overrides])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert sft(out, "adapter.kind=lora") == 0
    return out


def test_existing_run_is_refused_and_left_byte_identical(finished, capsys):
    before = snapshot(finished)
    assert sft(finished) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert snapshot(finished) == before


def test_failed_checks_touch_nothing(finished, tmp_path, capsys):
    before = snapshot(finished)
    # a bad model path with --overwrite: the old run is untouched, no staging folder is left behind
    assert sft(finished, "--overwrite", f"model.path={tmp_path / 'no-such-model'}") == 2
    assert "no-such-model" in capsys.readouterr().err
    assert snapshot(finished) == before
    assert not any(p.name.endswith(".staging") for p in finished.parent.iterdir())
    # into a new folder: the folder is not even created
    assert sft(tmp_path / "new", f"model.path={tmp_path / 'no-such-model'}") == 2
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_the_folder_as_a_whole(tmp_path):
    out = tmp_path / "run"
    assert sft(out, "adapter.kind=lora") == 0
    assert (out / "model" / "adapter_model.safetensors").is_file()
    (out / "notes.txt").write_text("a file of the old run")
    assert sft(out, "--overwrite") == 0  # full finetuning now
    names = set(os.listdir(out / "model"))
    assert "model.safetensors" in names and "adapter_model.safetensors" not in names and "adapter_config.json" not in names
    assert not (out / "notes.txt").exists()  # the old run's files are gone, not mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging / old folder left


def test_overwrite_that_fails_keeps_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert sft(out) == 0
    before = snapshot(out)
    assert sft(out, "--overwrite", "train.learning_rate=1e38", "train.max_steps=3", "train.max_grad_norm=0") == 2
    assert snapshot(out) == before


def test_eval_into_a_training_run_keeps_its_config(finished, capsys):
    """`alignkit eval` with output_dir = the run it evaluates: the run's config.yaml stays, eval's goes beside it."""
    before = snapshot(finished)
    rc = main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"output_dir={finished}",
               f"model.path={finished / 'base_model'}", f"model.adapter_path={finished / 'model'}", "data.max_records=2"])
    assert rc == 0
    after = snapshot(finished)
    assert all(after[k] == v for k, v in before.items())  # nothing of the run changed or went missing
    new = set(after) - set(before)  # eval's own files, its TensorBoard events and plots namespaced by the command
    assert {"eval.yaml", "metrics.json", "alignkit_eval_outputs.json", "plots/eval-loss.png"} <= new
    assert all(k in ("eval.yaml", "metrics.json", "alignkit_eval_outputs.json")
               or k.startswith(("plots/eval-", "tensorboard/eval/")) for k in new)
    listed = json.loads((finished / "alignkit_eval_outputs.json").read_text())  # the set eval wrote, each file
    assert listed["complete"] and set(listed["files"]) == new - {"alignkit_eval_outputs.json"}


def test_output_dir_under_a_file_is_refused_before_loading(tmp_path, capsys):
    """output_dir=notes.txt/run loaded the model and data, then died making the folder: 'unexpected error:
    NotADirectoryError' (exit 1). Now the config check says which path is a file."""
    (tmp_path / "notes.txt").write_text("mine")
    assert sft(tmp_path / "notes.txt" / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"lies under {tmp_path / 'notes.txt'}, which is a file, not a folder" in err[0], err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command, config", [("eval", "eval-rm-tiny.yaml"), ("generate", "generate-tiny.yaml"),
                                             ("sample", "sample-tiny.yaml"), ("annotate", "annotate-tiny.yaml")])
@pytest.mark.parametrize("under", [False, True])
def test_a_one_shot_command_into_a_file_is_refused_before_its_work(tmp_path, capsys, command, config, under):
    """The same for eval / generate / sample / annotate: they did all their work (generating, scoring), then
    stopped with 'unexpected error: FileExistsError' (output_dir a file) or NotADirectoryError (under one), exit 1."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "run" if under else tmp_path / "notes.txt"
    model = [] if command == "annotate" else ["model.path=tiny:llama", "model.adapter_path=null"]
    assert main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", *model]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert len(err) == 1 and err[0].startswith(f"alignkit {command}: error: output_dir: {out} "), err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_optimizer_that_cannot_be_built_writes_nothing(tmp_path, capsys):
    """train.optim=adamw_bnb_8bit without bitsandbytes stopped at train() with the run folder (config.yaml,
    base_model/, tensorboard/) already written; now one line before anything is created."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    assert sft(tmp_path / "new", "train.optim=adamw_bnb_8bit") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the tiny model's progress
    assert len(err) == 1 and "train.optim='adamw_bnb_8bit': the Trainer cannot build it" in err[0]
    assert not (tmp_path / "new").exists()


def test_a_schedule_that_cannot_be_built_writes_nothing(tmp_path, capsys):
    """train.lr_scheduler_type=cosine_with_min_lr without lr_scheduler_kwargs.min_lr stopped at train() with
    'unexpected error: ValueError' and the run folder already written; now one line before anything is created."""
    assert sft(tmp_path / "new", "train.lr_scheduler_type=cosine_with_min_lr") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the tiny model's progress
    assert len(err) == 1 and "train.lr_scheduler_type='cosine_with_min_lr' with train.lr_scheduler_kwargs={}" in err[0]
    assert "unexpected" not in err[0]
    assert not (tmp_path / "new").exists()


def half_swapped(tmp_path, new_finished: bool) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    """The disk as `commit_staging` leaves it when killed between its two renames: `run` absent, `.run.old` (the
    previous run, marked as alignkit's to remove) and `.run.staging` (the new run: unmarked once finished)."""
    final = tmp_path / "run"
    old, staging = tmp_path / ".run.old", tmp_path / ".run.staging"
    for folder, text in ((old, "previous run"), (staging, "new run")):
        (folder / "model").mkdir(parents=True)
        (folder / "config.yaml").write_text(f"# {text}\n")
        (folder / "model" / "weights.bin").write_bytes(text.encode())
    (old / ".alignkit-staging").touch()
    if not new_finished:
        (staging / ".alignkit-staging").touch()
    return final, snapshot(old), snapshot(staging)


@pytest.mark.parametrize("new_finished", [True, False])
def test_a_replacement_killed_between_its_renames_is_recovered_by_the_next_run(tmp_path, capsys, caplog, new_finished):
    final, previous, new = half_swapped(tmp_path, new_finished)
    # the next run (no --overwrite) finds the run again instead of starting afresh beside two hidden folders
    assert sft(final) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0], err
    expected = {k: v for k, v in (new if new_finished else previous).items() if k != ".alignkit-staging"}
    assert snapshot(final) == expected
    assert not (tmp_path / ".run.old").exists()
    assert (tmp_path / ".run.staging").exists() == (not new_finished)  # an unfinished new run: the next --overwrite
    said = [r.getMessage() for r in caplog.records if "interrupted replacement" in r.getMessage()]
    assert len(said) == 1 and str(final) in said[0]
    assert ("renamed into place" if new_finished else "restored") in said[0]


def test_a_model_save_killed_between_its_renames_is_completed_by_the_next_save(tmp_path, caplog):
    from alignkit.run_commit import staged

    final = half_swapped(tmp_path, new_finished=True)[0]
    with staged(final) as tmp:
        (tmp / "config.yaml").write_text("# newest\n")
    assert set(snapshot(final)) == {"config.yaml", "alignkit_complete.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert any("renamed into place" in r.getMessage() for r in caplog.records)


class Killed(BaseException):
    """A kill -9 at one file-system step: nothing after it runs (no except / finally of alignkit's catches it)."""


def killed_at(monkeypatch, step: int | None) -> list[str]:
    """Count every rename / unlink / rmdir (shutil.rmtree's too); raise `Killed` at the `step`-th (None: never)."""
    done: list[str] = []
    for name in ("rename", "unlink", "rmdir"):
        real = getattr(os, name)

        def op(*args, _real=real, _name=name, **kwargs):
            if step is not None and len(done) == step:
                raise Killed(_name)
            done.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, op)
    return done


def two_runs(tmp_path: Path, marker: bool) -> tuple[Path, Path, dict[str, bytes], dict[str, bytes]]:
    """`run` (the previous one, eight files in two folders) and its finished replacement in a staging folder."""
    from alignkit.run_commit import new_staging, write_marker

    final = tmp_path / "run"
    for i in range(4):
        for sub in ("", "model/"):
            (final / sub).mkdir(parents=True, exist_ok=True)
            (final / f"{sub}previous-{i}.bin").write_bytes(b"previous %d" % i)
    if marker:
        write_marker(final)
    staging = new_staging(final)
    for i in range(3):
        (staging / f"new-{i}.bin").write_bytes(b"new %d" % i)
    return final, staging, snapshot(final), {k: v for k, v in snapshot(staging).items() if k != ".alignkit-staging"}


@pytest.mark.parametrize("marker", [True, False])  # a saved model / checkpoint; a whole run folder (--overwrite)
def test_a_replacement_killed_at_any_step_never_loses_the_previous_folder_nor_blocks_the_next(tmp_path, monkeypatch,
                                                                                                marker):
    """commit_staging removed `.run.old` with shutil.rmtree, which may take the mark first: a kill there left it
    unmarked, and every later replacement stopped with '.run.old is in the way and was not made by alignkit'.
    Killed at each of its steps in turn, the next save now finds the previous or the new folder in place, completes
    or undoes what was left, and leaves only `run`."""
    from alignkit.run_commit import commit_staging, staged

    final, staging, _, _ = two_runs(tmp_path / "count", marker)
    steps = killed_at(monkeypatch, None)
    commit_staging(staging, final, marker=marker)
    monkeypatch.undo()
    assert len(steps) >= 10, steps  # the two renames and the removal of the eight files, two folders and the mark
    for step in range(len(steps)):
        root = tmp_path / f"kill-{step}"
        final, staging, previous, new = two_runs(root, marker)
        killed_at(monkeypatch, step)
        with pytest.raises(Killed):
            commit_staging(staging, final, marker=marker)
        monkeypatch.undo()
        with staged(final, enabled=True) as tmp:  # the next save (new_staging recovers what the kill left)
            there = {k: v for k, v in snapshot(final).items() if k not in (".alignkit-staging", "alignkit_complete.json")}
            assert there in ({k: v for k, v in previous.items() if k != "alignkit_complete.json"},
                             {k: v for k, v in new.items() if k != "alignkit_complete.json"}), (step, sorted(there))
            (tmp / "newest.bin").write_bytes(b"newest")
        assert sorted(p.name for p in root.iterdir()) == ["run"], (step, sorted(p.name for p in root.iterdir()))
        assert set(snapshot(final)) == {"newest.bin", "alignkit_complete.json"}, step


def test_quiet_shows_no_library_progress_bar_and_restores_the_switches(tmp_path, capfd):
    import importlib

    import transformers.utils.logging as tf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    before = (tf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states))
    assert sft(tmp_path / "run") == 0  # full finetuning: transformers writes model.safetensors under a bar
    err = capfd.readouterr().err
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "Writing model shards" not in err and "it/s]" not in err, err[-500:]
    assert (tf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states)) == before
