"""The run folder pieces on synthetic metrics: JSONL callback (main process only), plots, final metrics, model card."""

from __future__ import annotations

import math
from types import SimpleNamespace

import alignkit.runs
from alignkit.runs import MetricsJsonl, ModelCard, final_metrics, plot_metrics, plot_series, read_metrics, trackers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_metrics_callback_writes_rows_on_main_process_only(tmp_path):
    cb = MetricsJsonl(tmp_path / "m.jsonl")
    main = SimpleNamespace(global_step=3, epoch=0.5, is_world_process_zero=True)
    other = SimpleNamespace(global_step=3, epoch=0.5, is_world_process_zero=False)
    cb.on_log(None, main, None, logs={"loss": 1.25, "rewards/margins": float("nan")})
    cb.on_log(None, other, None, logs={"loss": 9.0})
    cb.on_log(None, main, None, logs={})
    rows = read_metrics(tmp_path / "m.jsonl")
    assert len(rows) == 1 and rows[0]["loss"] == 1.25 and rows[0]["step"] == 3
    assert math.isnan(rows[0]["rewards/margins"])  # NaN stays NaN (issue 12): never null, never 0
    assert '"rewards/margins": NaN' in (tmp_path / "m.jsonl").read_text()


def test_plots_only_for_metrics_present(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s} for s in (1, 2, 3)]
    rows.append({"step": 3, "eval_loss": 0.5, "eval_rewards/accuracies": 1.0})
    written = plot_metrics(rows, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["accuracy.png", "loss.png", "rewards.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written)
    assert [p.name for p in plot_metrics([{"step": 1, "loss": 2.0}], tmp_path / "sft")] == ["loss.png"]
    assert plot_metrics([{"step": 1, "grad_norm": 2.0}], tmp_path / "none") == []


def test_plots_draw_each_evaluation_set(tmp_path):
    """With several evaluation sets the rows carry eval_<set>_<name> (transformers' metric_key_prefix); the plots
    read only eval_<name>, so no evaluation was drawn and a figure only evaluated (rm's accuracy here) had no plot."""
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6},
            {"step": 2, "eval_a_loss": 0.65, "eval_a_accuracy": 0.5, "eval_a_runtime": 0.1},
            {"step": 2, "eval_b_loss": 0.68, "eval_b_accuracy": 1.0, "eval_b_runtime": 0.1}]
    assert [(label, style, pts) for label, style, pts in plot_series(rows, ("loss",))] == [
        ("loss", "-", [(1, 0.7), (2, 0.6)]), ("eval_a_loss", "--", [(2, 0.65)]), ("eval_b_loss", "--", [(2, 0.68)])]
    assert [p.name for p in plot_metrics(rows, tmp_path / "plots")] == ["loss.png", "accuracy.png"]


def test_final_metrics_are_last_values_without_bookkeeping():
    rows = [{"step": 1, "loss": 3.0, "learning_rate": 0.1}, {"step": 2, "loss": 2.0, "grad_norm": 1.0},
            {"step": 2, "eval_loss": 2.5, "eval_runtime": 0.1}, {"step": 2, "train_loss": 2.5, "epoch": 1.0}]
    assert final_metrics(rows) == {"loss": 2.0, "eval_loss": 2.5, "train_loss": 2.5}


def test_summary_shows_each_evaluation_set():
    """An eval_dataset dict logs eval_<set>_<name> (the Trainer's metric_key_prefix): the last line showed no
    evaluation figure at all (it looked for eval_loss only). Each set's figures now follow the training one, in the
    sets' order; the sets' speed figures stay out of the card's metrics."""
    from alignkit.cli.train import summary_figures

    rows = [{"step": 2, "loss": 0.5, "rewards/accuracies": 0.75},
            {"step": 2, "eval_hh_loss": 0.6, "eval_hh_rewards/accuracies": 1.0, "eval_hh_runtime": 0.2,
             "eval_hh_samples_per_second": 10.0, "eval_hh_steps_per_second": 5.0},
            {"step": 2, "eval_oa_loss": 0.7, "eval_oa_rewards/accuracies": 0.5, "eval_oa_runtime": 0.3}]
    metrics = final_metrics(rows)
    assert metrics == {"loss": 0.5, "rewards/accuracies": 0.75, "eval_hh_loss": 0.6,
                       "eval_hh_rewards/accuracies": 1.0, "eval_oa_loss": 0.7, "eval_oa_rewards/accuracies": 0.5}
    assert summary_figures(metrics, ["oa", "hh"]) == [
        ("loss", 0.5), ("eval_oa_loss", 0.7), ("eval_hh_loss", 0.6), ("rewards/accuracies", 0.75),
        ("eval_oa_rewards/accuracies", 0.5), ("eval_hh_rewards/accuracies", 1.0)]
    one = {"loss": 0.5, "eval_loss": 0.6, "accuracy": 0.25, "eval_accuracy": 1.0}  # one set: as before
    assert summary_figures(one) == [("loss", 0.5), ("eval_loss", 0.6), ("accuracy", 0.25), ("eval_accuracy", 1.0)]


def test_model_card_says_how_the_model_was_made(tmp_path):
    card = ModelCard(title="dpo of base", base_model="org/base-1b", adapter={"kind": "lora", "lora.r": 8},
                     objective={"objective": "preference optimisation (loss sigmoid)", "beta": 0.1},
                     data={"path": "pairs.jsonl", "training records": 10}, hyperparameters={"learning_rate": 1e-4},
                     metrics={"eval_rewards/accuracies": 0.75}, command_line="alignkit dpo --config x.yaml",
                     versions={"alignkit": "9.9"}, how_to_load="load_adapter(...)")
    card.write(tmp_path / "a" / "README.md", tmp_path / "b" / "README.md")
    text = (tmp_path / "a" / "README.md").read_text()
    assert text == (tmp_path / "b" / "README.md").read_text()
    for needle in ("org/base-1b", "**lora** adapter", "preference optimisation (loss sigmoid)", "pairs.jsonl",
                   "| `learning_rate` | 0.0001 |", "| `eval_rewards/accuracies` | 0.75 |", "alignkit dpo --config x.yaml",
                   "alignkit 9.9", "| `lora.r` | 8 |"):
        assert needle in text, needle


def test_trackers_reads_the_installed_integrations_once(monkeypatch):
    """`trackers` asked transformers for the installed integrations (a probe of every tracker package) once per
    named integration and again for "all"; now once per call, with the same answer."""
    calls = []

    def available():
        calls.append(1)
        return ["tensorboard", "mlflow", "comet_ml"]

    monkeypatch.setattr(alignkit.runs, "get_available_reporting_integrations", available)
    assert trackers(["mlflow", "comet_ml", "all"], expand_all=True) == ["mlflow", "comet_ml", "tensorboard"]
    assert len(calls) == 1


def test_ctrl_c_names_checkpoints_only_for_commands_that_write_them():
    """Ctrl-C on `alignkit serve` (or eval, generate) said "the checkpoints it finished are complete (continue with
    --resume ...)": serve has no checkpoint and no --resume. Now only commands with a run folder (they take --resume)
    say it. Fails without the fix: yes (interrupted_line did not exist; the line was the same for every command)."""
    from alignkit.cli import build_parser, interrupted_line

    for argv, resumable in ((["serve"], False), (["eval"], False), (["generate"], False), (["sft"], True),
                            (["dpo"], True), (["grpo"], True)):
        line = interrupted_line(build_parser(argv).parse_args(argv))
        assert line.startswith(f"alignkit {argv[0]}: interrupted") and ("--resume" in line) == resumable, line
