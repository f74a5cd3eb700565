"""Every command leaves metrics, TensorBoard events and plots, as training does (eval, generate, sample, annotate),
namespaced by the command so that running one in a training run's folder leaves that run's files untouched."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PNG = b"\x89PNG\r\n\x1a\n"


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}
    hists = {t: acc.Histograms(t)[-1].histogram_value for t in acc.Tags()["histograms"]}
    return scalars, hists


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_writes_metrics_tensorboard_and_a_length_histogram(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "g"
    assert main(["generate", "-c", str(CONFIGS / "generate-tiny.yaml"), "model.path=tiny:llama",
                 "model.adapter_path=null", f"output_dir={out}", "generation.max_new_tokens=5"]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "generation_metrics.json").read_text())
    assert metrics["responses"] == len(rows) > 0
    assert sum(metrics[f"generation/finish_{k}"] for k in ("eos", "stop", "length")) == pytest.approx(1.0)
    # greedy on a random model with max_new_tokens=5: 'length' rows have exactly 5 tokens
    n_length = sum(r["finish_reason"] == "length" for r in rows)
    assert metrics["generation/finish_length"] == pytest.approx(n_length / len(rows))
    scalars, hists = events(out / "tensorboard" / "generate")
    assert scalars["generate/responses"] == len(rows)
    assert scalars["generate/generation/response_length"] == pytest.approx(metrics["generation/response_length"])
    h = hists["generate/response_length"]
    assert h.num == len(rows) and h.max <= 5 and h.sum == pytest.approx(metrics["generation/tokens"])
    assert (out / "plots" / "generate-response_length.png").read_bytes()[:8] == PNG


def test_eval_in_a_training_run_folder_adds_its_own_outputs_and_changes_none_of_the_runs(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"  # stands for a finished training run: its metrics, events and plots must survive
    (run / "plots").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "plots" / "loss.png").write_bytes(PNG + b"train")
    (run / "tensorboard" / "events.out.tfevents.1.train").write_bytes(b"train events")
    before = digest(run)
    assert main(["eval", "-c", str(CONFIGS / "eval-rm-tiny.yaml"), "model.path=tiny:llama", "model.adapter_path=null",
                 f"output_dir={run}"]) == 0
    after = digest(run)
    assert {k: after[k] for k in before} == before
    metrics = json.loads((run / "metrics.json").read_text())
    scalars, hists = events(run / "tensorboard" / "eval")
    assert scalars["eval/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    margin = hists["eval/margin"]
    assert margin.num == metrics["pairs"] and margin.sum / margin.num == pytest.approx(metrics["margin"], abs=1e-5)
    chosen, rejected = hists["eval/rewards/chosen"], hists["eval/rewards/rejected"]
    assert (chosen.sum - rejected.sum) / chosen.num == pytest.approx(metrics["margin"], abs=1e-5)
    for name in ("margin", "rewards_chosen", "rewards_rejected"):
        assert (run / "plots" / f"eval-{name}.png").read_bytes()[:8] == PNG


def test_sample_and_annotate_write_their_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "round"
    assert main(["sample", "-c", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={out}", "sampling.max_new_tokens=6",
                 "data.max_records=2", "sampling.num_samples=3"]) == 0
    assert main(["annotate", "-c", str(CONFIGS / "annotate-tiny.yaml"), f"output_dir={out}"]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    _, hists = events(out / "tensorboard" / "sample")
    assert hists["sample/response_length"].num == len(samples) == 6
    assert hists["sample/response_length"].sum == sum(len(s["response_ids"]) for s in samples)
    scalars, hists = events(out / "tensorboard" / "annotate")
    manifest = json.loads((out / "manifest.json").read_text())["annotation"]
    assert hists["annotate/reward"].num == sum(x is not None for x in manifest["scores"])
    assert scalars["annotate/reward/mean"] == pytest.approx(manifest["metrics"]["reward/mean"], abs=1e-6)
    for name in ("sample-response_length", "annotate-reward"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG


def test_a_command_run_again_replaces_its_own_events_and_plots(tmp_path):
    """Each run added an events file to tensorboard/<command>/ (the old run's scalars stayed beside the new ones at
    step 0) and left the histograms it did not draw again (a dpo eval's plots beside a reward eval's metrics)."""
    pytest.importorskip("tensorboard")
    from alignkit.runs import write_command_outputs

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(PNG + b"train")  # a training run's plot: not the command's
    write_command_outputs(tmp_path, "eval", {"accuracy": 0.25}, {"margin": [1.0, 2.0], "rewards/chosen": [3.0]})
    write_command_outputs(tmp_path, "eval", {"accuracy": 0.75}, {"margin": [5.0, 6.0, 7.0]})
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["eval-margin.png", "loss.png"]
    assert len(list((tmp_path / "tensorboard" / "eval").iterdir())) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "eval"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(0, 0.75)]
    assert acc.Tags()["histograms"] == ["eval/margin"] and acc.Histograms("eval/margin")[0].histogram_value.num == 3


def test_without_matplotlib_a_command_writes_its_results_and_says_the_plots_are_left_out(tmp_path, monkeypatch,
                                                                                           caplog, capsys):
    """matplotlib is an optional extra (`alignkit[cli]`): training commands left the plots out with a warning, but
    `eval` (and generate, sample, annotate, augment, serve's shutdown) wrote its results, then failed on the
    ImportError ('alignkit eval: error: No module named matplotlib...', exit 2) as if they were not written. Now the
    training commands' warning, exit 0, the results and TensorBoard events written, no plots."""
    pytest.importorskip("tensorboard")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # as if not installed
    out = tmp_path / "e"
    with caplog.at_level("WARNING"):
        assert main(["-q", "eval", "-c", str(CONFIGS / "eval-rm-tiny.yaml"), "model.path=tiny:llama",
                     "model.adapter_path=null", f"output_dir={out}"]) == 0
    assert "error" not in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()] == [
        "matplotlib is not installed: no plots (pip install 'alignkit[cli]')"]
    assert json.loads((out / "metrics.json").read_text())["pairs"] > 0
    assert list((out / "tensorboard" / "eval").glob("events.out.tfevents.*")) and not (out / "plots").exists()


# ------------------------------------------------------------------------------------------------------------------
# Every training command, offline and online: one table, one generic test of what the run folder holds
# ------------------------------------------------------------------------------------------------------------------

OFFLINE = ["train.max_steps=2", "train.logging_steps=1", "train.gradient_accumulation_steps=2",
           "train.eval_strategy=no", "train.save_strategy=no"]
ONLINE = ["train.max_steps=2", "method.prompts_per_step=2", "sampling.num_samples=2", "sampling.max_new_tokens=3"]
OFFLINE_PLOTS = {"loss.png"}
# online: completion lengths, finish reasons, entropy, the policy ratio's, PPO's value and online DPO's pair figures
# were logged but on no plot (reward, kl and loss only)
ONLINE_PLOTS = {"reward.png", "kl.png", "loss.png", "completions.png", "finish.png", "entropy.png"}
CLIPPED_PLOTS = ONLINE_PLOTS | {"policy.png"}  # grpo, rloo, ppo
PAIRS_PLOTS = OFFLINE_PLOTS | {"rewards.png", "logps.png"}  # dpo, kto (its kl too): logps/* and kl were on no plot

# id -> (command, config, overrides, optimizer steps as metrics.jsonl / TensorBoard count them, the loss's
# TensorBoard tag, the plots drawn). Offline: 2 optimizer steps of 2 micro-batches each (steps 1, 2, not 1..4);
# online rows count steps from 0 (docs/metrics.md).
TRAINING_OUTPUTS = {
    "sft": ("sft", "sft-tiny.yaml", OFFLINE, [1, 2], "train/loss", OFFLINE_PLOTS | {"accuracy.png"}),
    "rm": ("rm", "rm-tiny.yaml", OFFLINE, [1, 2], "train/loss", OFFLINE_PLOTS | {"accuracy.png", "rewards.png"}),
    "dpo": ("dpo", "dpo-tiny.yaml", OFFLINE, [1, 2], "train/loss", PAIRS_PLOTS | {"accuracy.png"}),
    "kto": ("kto", "kto-tiny.yaml", OFFLINE, [1, 2], "train/loss", PAIRS_PLOTS | {"kl.png"}),
    "grpo": ("grpo", "grpo-tiny.yaml", ONLINE, [0, 1], "loss", CLIPPED_PLOTS),
    "rloo": ("rloo", "rloo-tiny.yaml", ONLINE, [0, 1], "loss", CLIPPED_PLOTS),
    "ppo": ("ppo", "ppo-tiny.yaml", ONLINE, [0, 1], "loss", CLIPPED_PLOTS | {"value.png"}),
    "online-dpo": ("online-dpo", "online-dpo-tiny.yaml", [*ONLINE, "sampling.num_samples=4"], [0, 1], "loss",
                   ONLINE_PLOTS | {"rewards.png", "accuracy.png", "logps.png"}),
    # report_to all: transformers' "every installed tracker" sent the TensorBoard events to
    # <run>/checkpoints/runs/<date>/ (its own logging_dir), none to <run>/tensorboard
    "sft report_to=all": ("sft", "sft-tiny.yaml", [*OFFLINE, "train.report_to=all"], [1, 2], "train/loss",
                          OFFLINE_PLOTS | {"accuracy.png"}),
    "grpo report_to=all": ("grpo", "grpo-tiny.yaml", [*ONLINE, "train.report_to=all"], [0, 1], "loss",
                           CLIPPED_PLOTS),
}


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows the folder's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not folder.is_dir():
        return []
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.parametrize("case", list(TRAINING_OUTPUTS))
def test_every_training_command_writes_metrics_tensorboard_and_plots_on_one_step_axis(case, tmp_path):
    """metrics.jsonl, <run>/tensorboard and plots/ of each training command: the rows' steps are the optimizer
    steps (gradient accumulation does not multiply them), TensorBoard holds the same loss at the same steps, once
    each, every value finite, and the plots are drawn; no events anywhere else in the run folder."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    command, config, overrides, steps, tag, plots = TRAINING_OUTPUTS[case]
    out = tmp_path / "run"
    assert main(["-q", command, "-c", str(CONFIGS / config), f"output_dir={out}", *overrides]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == steps
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    shown = scalars(out / "tensorboard", tag)
    assert [s for s, _ in shown] == steps  # one value per step, the rows' steps
    assert [v for _, v in shown] == pytest.approx([v for _, v in losses], rel=1e-6)  # float32 in the events
    assert {p.parent for p in out.rglob("events.out.tfevents.*")} == {out / "tensorboard"}
    assert {p.name for p in (out / "plots").iterdir()} == plots
    assert all(p.read_bytes()[:8] == PNG for p in (out / "plots").iterdir())


@pytest.mark.parametrize("case", ["sft", "grpo"])
def test_tensorboard_named_but_not_installed_is_refused_before_anything_is_written(case, tmp_path, monkeypatch,
                                                                                    capsys):
    """train.report_to=tensorboard without tensorboard installed: sft wrote the run folder (config.yaml,
    base_model/) and then stopped on the ImportError, a folder the next run refused to reuse; grpo ran to the end
    without TensorBoard events (accelerate dropped the tracker with a warning). Now one line naming the key and the
    fix, nothing written; report_to null (the default) still runs without TensorBoard, as documented."""
    import sys

    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    command, config, overrides, *_ = TRAINING_OUTPUTS[case]
    out = tmp_path / "run"
    args = ["-q", command, "-c", str(CONFIGS / config), f"output_dir={out}", *overrides]
    assert main([*args, "train.report_to=tensorboard"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert len(err) == 1 and "train.report_to: tensorboard is named but not installed" in err[0], err
    assert "pip install tensorboard" in err[0] and not out.exists()
    assert main(args) == 0 and not (out / "tensorboard").exists()


@pytest.mark.parametrize("case, tracker", [("sft", "wandb"), ("grpo", "wandb"), ("grpo", "aim")])
def test_tracker_named_but_not_installed_is_refused_before_anything_is_written(case, tracker, tmp_path, capsys):
    """train.report_to=wandb without wandb installed: sft wrote the run folder and then stopped with 'unexpected
    error: RuntimeError' (transformers' WandbCallback), grpo ran without the tracker (accelerate dropped it with a
    warning). A tracker only accelerate knows (aim; the online commands take it) was not checked at all: grpo ran to
    the end logging to no tracker, after accelerate's warning that none is installed. Now one line naming the key,
    the tracker and the fix, nothing written (as for tensorboard)."""
    from accelerate.tracking import get_available_trackers
    from transformers.integrations import get_available_reporting_integrations

    if tracker in {*get_available_reporting_integrations(), *(str(t.value) for t in get_available_trackers())}:
        pytest.skip(f"{tracker} is installed here")
    command, config, overrides, *_ = TRAINING_OUTPUTS[case]
    out = tmp_path / "run"
    assert main(["-q", command, "-c", str(CONFIGS / config), f"output_dir={out}", *overrides,
                 f"train.report_to={tracker}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert len(err) == 1 and f"train.report_to: {tracker} named but not installed" in err[0], err
    assert f"pip install {tracker}" in err[0] and "unexpected" not in err[0] and not out.exists()


@pytest.mark.parametrize("case", ["sft", "grpo"])
def test_a_run_without_progress_bar_prints_only_its_own_lines(case, tmp_path, capsys):
    """train.disable_tqdm=true without -q: the offline commands printed every Trainer log dict to stdout
    ({'loss': '2.345', 'grad_norm': ...}: transformers' PrinterCallback, added when tqdm is off; only -q removed
    it). Now stdout holds alignkit's own closing lines only, as under -q; the rows are in metrics.jsonl."""
    command, config, overrides, steps, *_ = TRAINING_OUTPUTS[case]
    out = tmp_path / "run"
    assert main([command, "-c", str(CONFIGS / config), f"output_dir={out}", *overrides, "train.disable_tqdm=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"alignkit {command}: done") and lines[1].startswith("  run folder:"), lines
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == steps


# command -> (config, overrides, its progress bar's label): the one-shot commands' long work
PROGRESS = {
    "sample": ("sample-tiny.yaml", ["sampling.max_new_tokens=2", "data.max_records=2", "sampling.num_samples=2"],
               "sampling: 100%"),
    "generate": ("generate-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null",
                                        "generation.max_new_tokens=2"], "generate: 100%"),
    "eval": ("eval-rm-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null"], "reward eval: 100%"),
    "augment": ("augment-code-bugs.yaml", [], "candidate/s]"),  # a count: the candidates are not known ahead
    # annotate scores the samples a quiet sample run (its 4th item) wrote first
    "annotate": ("annotate-tiny.yaml", [], "annotate: 100%",
                 ["sample", "-c", str(CONFIGS / "sample-tiny.yaml"), "sampling.max_new_tokens=2", "data.max_records=2",
                  "sampling.num_samples=2"]),
}


@pytest.mark.parametrize("command", list(PROGRESS))
def test_one_shot_commands_show_a_progress_bar_that_quiet_hides(command, tmp_path, capfd):
    """`sample` generated every prompt's responses and `augment` made its candidates (an LLM request each, for most
    strategies) and `annotate` scored them without a progress bar (generate and eval had one); now a bar over the
    batches / a count of the candidates, hidden by -q as the others'."""
    config, overrides, label, *before = PROGRESS[command]
    for quiet, out in ((False, tmp_path / "loud"), (True, tmp_path / "quiet")):
        if before:
            assert main(["-q", *before[0], f"output_dir={out}"]) == 0
            capfd.readouterr()
        args = [command, "-c", str(CONFIGS / config), f"output_dir={out}", *overrides]
        assert main(["-q", *args] if quiet else args) == 0
        err = capfd.readouterr().err
        assert (label not in err) if quiet else (label in err), err[-500:]


def test_a_command_killed_while_it_draws_keeps_the_previous_plots(tmp_path, monkeypatch):
    """write_command_outputs removed the previous run's events and plots first, then imported TensorBoard and drew
    the new ones (seconds): a kill (or a crash) in between left the folder with neither. Now the previous files go
    only after the new ones are written: killed while drawing, the previous plots are byte-equal."""
    import alignkit.runs as runs

    runs.write_command_outputs(tmp_path, "eval", {"accuracy": 0.25}, {"margin": [1.0, 2.0], "rewards/chosen": [3.0]})
    before = {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()}
    assert sorted(before) == ["eval-margin.png", "eval-rewards_chosen.png"]

    class Killed(BaseException):
        """Stands for SIGKILL: not an Exception."""

    def killed():
        raise Killed()

    monkeypatch.setattr(runs, "agg_figure", killed)
    with pytest.raises(Killed):
        runs.write_command_outputs(tmp_path, "eval", {"accuracy": 0.75}, {"margin": [5.0, 6.0, 7.0]})
    assert {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()} == before
