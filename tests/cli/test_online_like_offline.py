"""Online runs look like offline runs: TensorBoard events in <run>/tensorboard, a progress bar, the same run-folder
layout; and a TRL-style reward function with a dataset column goes through `alignkit grpo` unchanged."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OFFLINE_LAYOUT = {"config.yaml", "metrics.jsonl", "tensorboard", "plots", "README.md", "model"}

REWARD = textwrap.dedent('''
    CALLS = []

    def matches_answer(prompts, completions, answer, **kwargs):
        CALLS.append(list(answer))
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]
''')


def test_grpo_run_with_trl_reward_function(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "ak_trl_grpo_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    out = tmp_path / "grpo"
    rc = main(["grpo", "--allow-code", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={out}",
               f"data.path={data}",
               "annotator.function=ak_trl_grpo_reward:matches_answer", "train.max_steps=2",
               "sampling.max_new_tokens=4"])
    assert rc == 0
    import ak_trl_grpo_reward

    # each call got the `answer` column of the sampled prompts' rows (4 samples per prompt, 2 prompts per step)
    assert len(ak_trl_grpo_reward.CALLS) == 2 and all(len(c) == 8 for c in ak_trl_grpo_reward.CALLS)
    assert all(set(c) <= {"0", "2", "4", "6"} for c in ak_trl_grpo_reward.CALLS)
    assert OFFLINE_LAYOUT <= {p.name for p in out.iterdir()}
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("reward")]
    assert steps == [0, 1] and "kl" in acc.Tags()["scalars"]
    assert "2/2" in capsys.readouterr().err  # the progress bar reached the last step
