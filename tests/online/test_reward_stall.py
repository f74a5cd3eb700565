"""A run without reward signal stops (method.stall_steps): a reward function returning a constant, a judge that always
answers the same, a format that never matches gave GRPO / RLOO zero advantages (online DPO no pair) at every step,
and the run spent all its steps on updates the reward could not steer, with a warning at its first step only. Now
`stall_steps` such steps in a row (20 by default) stop it with one `RewardStallError` line naming the steps, the
annotator, the scores seen and the fix; a step with signal starts the count again; 0 never stops."""

from __future__ import annotations

import json

import pytest

from alignkit.guards import RewardStallError
from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.annotators import Annotator
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.online.trainer import METRICS_FILE

from .toy import PROMPTS, toy_policy


def zero(prompt, response: str) -> float:
    """A format reward whose format never matches."""
    return 0.0


SRC = repr(f"{zero.__module__}:zero")  # the module's name as pytest imported it
FIX = (f"Check the function annotator {SRC} on a few responses (e.g. a format they "
       "never match, a judge that always answers the same), or set method.stall_steps=0 to train on anyway")


def by_prompt(prompt, response: str) -> float:
    """Differs between prompts, never between one prompt's samples."""
    return float(len(prompt))


def _trainer(tiny_dir, tokenizer, tmp_path, cls, config, fn, steps, stall, num_samples=2, **keys):
    cfg = config(steps=steps, prompts_per_step=2, sampling=SamplingConfig(num_samples=num_samples, max_new_tokens=2),
                 learning_rate=1e-2, stall_steps=stall, **keys)
    return cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, {"type": "function", "fn": fn}, cfg,
               output_dir=tmp_path)


# (trainer, config, its keys, samples per prompt, what the line says after "steps 1-3 (3 in a row,
# method.stall_steps=3): "), written out from each objective's reason (GRPO / RLOO: group advantages; PPO: a value
# head; online DPO: no pair from tied scores)
STALLS = [
    (GRPOTrainer, GRPOConfig, {}, 2,
     "every prompt's 2 samples got the same reward from the function annotator "
     f"{SRC} (every score was 0), so every group advantage was 0 and the reward "
     "moved nothing (only the KL / entropy terms trained)"),
    (RLOOTrainer, RLOOConfig, {}, 2,
     "every prompt's 2 samples got the same reward from the function annotator "
     f"{SRC} (every score was 0), so every group advantage was 0"),
    (PPOTrainer, PPOConfig, {"epochs_per_step": 1}, 1,  # one sample a prompt: no group, the whole step is flat
     f"every response got the same reward from the function annotator {SRC} "
     "(every score was 0): the value head learns that constant and the advantages then carry only the KL penalty"),
    (OnlineDPOTrainer, OnlineDPOConfig, {}, 2,
     "no preference pair was formed (every prompt's samples got the same reward (the function annotator "
     f"{SRC}: every score was 0)), so nothing trained"),
]


@pytest.mark.parametrize("cls, config, keys, k, said", STALLS, ids=[s[0].__name__ for s in STALLS])
def test_a_run_without_reward_signal_stops_at_stall_steps(tiny_dir, tokenizer, tmp_path, cls, config, keys, k, said):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, cls, config, zero, steps=6, stall=3, num_samples=k, **keys)
    with pytest.raises(RewardStallError) as err:
        trainer.train()
    line = str(err.value)
    assert (err.value.first, err.value.last) == (1, 3) and "\n" not in line
    assert line.startswith(f"{cls.__name__}: no reward signal at steps 1-3 (3 in a row, method.stall_steps=3): "
                           f"{said}"), line
    assert "the run stopped before saving the model (its metrics.jsonl rows and earlier checkpoints are kept)" in line
    assert line.endswith(", or set method.stall_steps=0 to train on anyway")
    if cls is not OnlineDPOTrainer:
        assert line.endswith(FIX)
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and trainer.steps_done == 2  # stopped after step 3's row
    assert not (tmp_path / "adapter_model.safetensors").exists()  # nothing saved as if trained


def test_a_step_with_signal_restarts_the_count(tiny_dir, tokenizer, tmp_path):
    """Flat at steps 1-2 and 4-5, spread at step 3: never 3 flat steps in a row, so a 5-step run with
    stall_steps=3 ends normally."""
    calls = []

    def flat_but_step_3(prompts, completions, **kw):
        calls.append(1)
        return [float(i) if len(calls) == 3 else 1.0 for i in range(len(completions))]

    trainer = _trainer(tiny_dir, tokenizer, tmp_path, GRPOTrainer, GRPOConfig, flat_but_step_3, steps=5, stall=3)
    history = trainer.train()
    assert [h["frac_reward_zero_std"] for h in history] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_stall_steps_0_never_stops(tiny_dir, tokenizer, tmp_path, caplog):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, GRPOTrainer, GRPOConfig, zero, steps=3, stall=0)
    with caplog.at_level("WARNING"):
        assert len(trainer.train()) == 3
    assert "no step of this run had a reward spread" in caplog.text  # still warned


def test_ppo_counts_a_reward_that_varies_between_prompts_as_signal(tiny_dir, tokenizer, tmp_path):
    """PPO's advantages come from a value head, not from groups: a reward that differs between prompts (alike within
    each prompt's samples) is not a stall for PPO, while GRPO (group advantages all 0) stops on it."""
    ppo = _trainer(tiny_dir, tokenizer, tmp_path / "ppo", PPOTrainer, PPOConfig, by_prompt, steps=3, stall=2,
                   epochs_per_step=1)
    assert len(ppo.train()) == 3
    grpo = _trainer(tiny_dir, tokenizer, tmp_path / "grpo", GRPOTrainer, GRPOConfig, by_prompt, steps=3, stall=2)
    with pytest.raises(RewardStallError, match=r"^GRPOTrainer: no reward signal at steps 1-2 .*\(scores from \d+ to "
                                               r"\d+\), so every group advantage was 0"):
        grpo.train()


@pytest.mark.parametrize("cls, config, keys", [(GRPOTrainer, GRPOConfig, {}), (RLOOTrainer, RLOOConfig, {}),
                                               (PPOTrainer, PPOConfig, {"epochs_per_step": 1})])
def test_a_reward_clip_below_every_score_is_no_signal(tiny_dir, tokenizer, tmp_path, caplog, cls, config, keys):
    """method.reward_clip=1 clamps scores of 2 and more to 1: every reward alike, every advantage 0 (GRPO / RLOO) or
    a constant for PPO's value head, while the raw scores differed, so the step counted as having signal: the run
    trained on nothing but the KL term, without a word, exit 0. Now such a step is flat: warned about, and
    stall_steps of them stop the run naming the clip and its fix."""
    calls = []

    def differing(prompt, response: str) -> float:
        calls.append(1)
        return float(len(calls) % 2) + 2.0  # 3, 2, 3, 2, ...: each prompt's 2 samples differ

    trainer = _trainer(tiny_dir, tokenizer, tmp_path, cls, config, differing, steps=4, stall=2, reward_clip=1.0,
                       **keys)
    with caplog.at_level("WARNING"), pytest.raises(RewardStallError) as err:
        trainer.train()
    line = str(err.value)
    assert (err.value.first, err.value.last) == (1, 2), line
    assert "(scores from 2 to 3) after method.reward_clip=1.0 (the scores differed; the clip at +-1.0 made them alike)" \
        in line, line
    assert line.endswith("Raise method.reward_clip above the rewards' spread, or remove it, or set "
                         "method.stall_steps=0 to train on anyway"), line
    assert "got the same reward after method.reward_clip=1.0" in caplog.text
    # a clip above the scores leaves them apart: signal at every step, the run ends normally
    trainer = _trainer(tiny_dir, tokenizer, tmp_path / "wide", cls, config, differing, steps=2, stall=2,
                       reward_clip=5.0, **keys)
    assert len(trainer.train()) == 2


def test_the_cli_stops_a_run_without_reward_signal_in_one_line(tmp_path, capsys):
    """`alignkit grpo` with a keyword reward whose keyword never occurs: exit 2 and one line (the run's rows kept)."""
    from pathlib import Path

    from alignkit.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"
    rc = main(["-q", "grpo", "--config", str(config), f"output_dir={tmp_path / 'run'}",
               "annotator.function=alignkit.rewards:contains_keyword", "annotator.kwargs={keyword: xyzzyq}",
               "method.stall_steps=2", "train.max_steps=4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit ")]
    assert rc == 2 and err == [
        "alignkit grpo: error: GRPOTrainer: no reward signal at steps 1-2 (2 in a row, method.stall_steps=2): every "
        "prompt's 4 samples got the same reward from the function annotator 'alignkit.rewards:contains_keyword' "
        "(every score was 0), so every group advantage was 0 and the reward moved nothing (only the KL / entropy "
        "terms trained); the run stopped before saving the model (its metrics.jsonl rows and earlier checkpoints are "
        "kept). Check the function annotator 'alignkit.rewards:contains_keyword' on a few responses (e.g. a format "
        "they never match, a judge that always answers the same), or set method.stall_steps=0 to train on anyway"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "run" / "model").exists()


class _TieJudge(Annotator):
    """A pairwise judge that calls every comparison a tie (online DPO's judge_pairs: no pair is ever formed)."""

    def annotate(self, prompts, responses, metas=None):
        raise AssertionError("judge_pairs mode must not ask for pointwise scores")

    def prefer_batch(self, prompts, a, b):
        return [None] * len(a)


def test_online_dpo_stops_when_the_judge_always_ties(tiny_dir, tokenizer, tmp_path):
    cfg = OnlineDPOConfig(steps=4, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2),
                          feedback="judge_pairs", stall_steps=2)
    trainer = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, _TieJudge(), cfg,
                               output_dir=tmp_path)
    with pytest.raises(RewardStallError) as err:
        trainer.train()
    assert str(err.value) == (
        "OnlineDPOTrainer: no reward signal at steps 1-2 (2 in a row, method.stall_steps=2): no preference pair was "
        "formed (the judge (the annotator _TieJudge) decided none of its comparisons (every verdict was a tie or "
        "unparseable)), so nothing trained; the run stopped before saving the model (its metrics.jsonl rows and "
        "earlier checkpoints are kept). Check the judge (annotator) on a few pairs, or set method.stall_steps=0 to "
        "train on anyway")
