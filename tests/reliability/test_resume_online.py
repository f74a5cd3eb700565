"""Issue 12, finding 2 for the online loop: `train.save_steps` writes complete checkpoints (weights, optimizer,
RNG, prompt order, KL controller, reward moments); a run killed in step 3 and resumed with `--resume` logs exactly
the rows of an uninterrupted run (CPU, fp32), and metrics.jsonl continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from tests.online.toy import killed_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = ["train.max_steps=4", "train.save_steps=2", "method.prompts_per_step=2", "sampling.num_samples=2",
         "sampling.max_new_tokens=3", "data.max_records=6"]
CASES = {"grpo-lora": ("grpo", "grpo-tiny.yaml", []),
         "grpo-full": ("grpo", "grpo-tiny.yaml", ["adapter.kind=full", "adapter.lora=null",
                                                       "train.learning_rate=1e-4"]),
         "online-dpo-lora": ("online-dpo", "online-dpo-tiny.yaml", ["adapter.kind=lora", "adapter.reft=null",
                                                                 "adapter.lora={r: 2}"])}
SKIP = {"time/step_s"}


def rows(run: Path) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in SKIP} for r in out]


@pytest.mark.parametrize("case", list(CASES))
def test_online_kill_then_resume_equals_uninterrupted(case, tmp_path, monkeypatch):
    command, config, extra = CASES[case]

    def cli(out, *flags):
        return main(["-q", command, "--config", str(CONFIGS / config), *flags, f"output_dir={out}", *SMALL, *extra])

    assert cli(tmp_path / "whole") == 0
    want = rows(tmp_path / "whole")
    assert [r["step"] for r in want] == [0, 1, 2, 3]

    killed_at(monkeypatch, lambda: cli(tmp_path / "cut"), step=2)
    assert [r["step"] for r in rows(tmp_path / "cut")] == [0, 1]
    assert cli(tmp_path / "cut", "--resume") == 0
    assert rows(tmp_path / "cut") == want
    assert (tmp_path / "cut" / "model" / "alignkit_complete.json").is_file()


def test_online_resume_purges_the_killed_runs_tensorboard_steps(tmp_path, monkeypatch, next_event_file_second):
    """Killed in step 4 (index 3) after logging step index 2, the newest checkpoint after 2 steps: the resumed run
    logs step 2 again; the killed run's event for it is purged, so TensorBoard shows one value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command, config, extra = CASES["grpo-lora"]

    def cli(out, *flags):
        return main(["-q", command, "--config", str(CONFIGS / config), *flags, f"output_dir={out}", *SMALL, *extra])

    def shown(run: Path) -> list[tuple[int, float]]:
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        tag = next(t for t in acc.Tags()["scalars"] if t.endswith("reward"))
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    killed_at(monkeypatch, lambda: cli(tmp_path / "cut"), step=3)
    assert [s for s, _ in shown(tmp_path / "cut")] == [0, 1, 2]
    next_event_file_second()
    assert cli(tmp_path / "cut", "--resume") == 0
    want = {r["step"]: r["reward"] for r in rows(tmp_path / "cut")}
    got = shown(tmp_path / "cut")
    assert [s for s, _ in got] == [0, 1, 2, 3], got
    assert got == [(s, pytest.approx(want[s], rel=1e-6, abs=1e-7)) for s in (0, 1, 2, 3)]


def test_a_stall_spans_a_cli_resume_and_stall_steps_may_change_on_resume(tmp_path, capsys):
    """A reward that never varies (a keyword no response holds), method.stall_steps=3: 2 such steps, checkpoint-2;
    `--resume` to 6 steps stops after 1 more, at steps 1-3 (the count restarted at the resume: it stopped at 3-5).
    The stop's advice, `--resume method.stall_steps=0`, was refused ("the settings differ from the run's"); it now
    continues to step 6."""
    flat = ["annotator.function=alignkit.rewards:contains_keyword", "annotator.kwargs={keyword: zqxjzqxj}"]
    run = tmp_path / "run"
    small = [s for s in SMALL if not s.startswith("train.max_steps=")]

    def cli(steps, *flags, stall=3):
        return main(["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), *flags, f"output_dir={run}",
                     *small, *flat, f"train.max_steps={steps}", f"method.stall_steps={stall}"])

    assert cli(2) == 0
    capsys.readouterr()
    assert cli(6, "--resume") == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "no reward signal at" in line]
    assert len(said) == 1 and "no reward signal at steps 1-3 (3 in a row, method.stall_steps=3)" in said[0], said
    assert [r["step"] for r in rows(run)] == [0, 1, 2]
    assert cli(6, "--resume", stall=0) == 0
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3, 4, 5]
