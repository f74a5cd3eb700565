"""Non-finite guard of the online loop (issue 12, finding 1): a NaN loss stops the run at that step, names
the step's prompt records, logs the row with NaN (not null), and saves no model."""

from __future__ import annotations

import json
import math
import re

import pytest

from alignkit.guards import NonFiniteError
from alignkit.online.annotators import Annotator
from alignkit.online.generation import SamplingConfig
from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.online.trainer import METRICS_FILE

from .toy import PROMPTS, digit_fraction, toy_policy


def distinct(prompt, response: str) -> float:
    """A reward that ties two responses only when they are equal (online DPO then forms a pair per prompt)."""
    return sum(ord(c) * (i + 1) for i, c in enumerate(response)) % 997 / 997


# (trainer, config class, config keys, its loss method, the loss scale its non-finite advice names; None: none).
# Written out by hand from what each loss reads (docs in each module): GRPO's loss adds kl_coef x KL (none with a
# fixed 0) and entropy_coef x H; RLOO's leave-one-out advantages (and GRPO's without scale_by_std) keep the rewards'
# scale; PPO adds vf_coef x its value loss on returns of the rewards' scale and the KL through the rewards; online
# DPO's preference loss reads beta, except orpo / slic / sft. The advice named "method.beta and similar" for all.
REWARDS = "the rewards' scale (method.reward_normalization, method.reward_clip)"
NON_FINITE = [
    (GRPOTrainer, GRPOConfig, {}, "policy_loss", "method.kl_coef"),
    (GRPOTrainer, GRPOConfig, {"kl_coef": 0.0, "entropy_coef": 0.01, "scale_by_std": False}, "policy_loss",
     f"method.entropy_coef, {REWARDS}"),
    (GRPOTrainer, GRPOConfig, {"kl_coef": 0.0}, "policy_loss", None),
    (RLOOTrainer, RLOOConfig, {}, "policy_loss", f"method.kl_coef, {REWARDS}"),
    (PPOTrainer, PPOConfig, {"epochs_per_step": 1}, "ppo_loss", f"method.vf_coef, method.kl_coef, {REWARDS}"),
    (OnlineDPOTrainer, OnlineDPOConfig, {}, "pair_loss", "method.beta"),
    (OnlineDPOTrainer, OnlineDPOConfig, {"loss_type": "orpo"}, "pair_loss", None),
]


@pytest.mark.parametrize("cls, config, keys, loss_fn, scale", NON_FINITE)
def test_online_nan_loss_stops_and_logs_nan(tiny_dir, tokenizer, tmp_path, cls, config, keys, loss_fn, scale,
                                            monkeypatch):
    """A NaN loss stops the run at its step, names the step's records and the method's own loss scale (the advice
    named method.beta for every online method, also those that read none), logs NaN and saves nothing."""
    model = toy_policy(tiny_dir("llama"), "lora")
    cfg = config(steps=3, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2),
                 learning_rate=1e-2, **keys)
    real = getattr(cls, loss_fn)
    monkeypatch.setattr(cls, loss_fn, lambda self, *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(
        real(self, *a, **k)))
    trainer = cls(model, tokenizer, PROMPTS, {"type": "function", "fn": distinct}, cfg, output_dir=tmp_path)
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    assert err.value.step == 1 and err.value.what == "the training loss"
    assert err.value.record_ids and set(err.value.record_ids) <= {f"prompt[{i}]" for i in range(4)}
    said = str(err.value)
    if scale is None:
        assert "loss scale" not in said and "method." not in said.replace("(train.learning_rate)", ""), said
    else:
        assert f"a loss scale too large ({scale}), extreme" in said, said
    text = (tmp_path / METRICS_FILE).read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 1 and math.isnan(rows[0]["loss"]) and "null" not in text
    assert not (tmp_path / "adapter_model.safetensors").exists()  # nothing saved
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_a_non_finite_kl_coef_stops_the_run(tiny_dir, tokenizer, tmp_path):
    model = toy_policy(tiny_dir("llama"), "lora")
    cfg = GRPOConfig(steps=3, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2),
                     learning_rate=1e-2)
    cfg.kl_coef = float("nan")  # after construction: GRPOConfig refuses a non-finite kl_coef when built
    trainer = GRPOTrainer(model, tokenizer, PROMPTS, {"type": "function", "fn": digit_fraction}, cfg,
                          output_dir=tmp_path)
    with pytest.raises(NonFiniteError, match=r"the training loss is nan at optimizer step 1 .*\(method.kl_coef\)"):
        trainer.train()


def test_zero_spread_fraction_by_hand():
    import torch

    from alignkit.online.trainer import zero_spread_fraction

    nan = float("nan")
    groups = torch.tensor([[1.0, 1.0, 1.0],     # flat
                           [0.0, 1.0, 0.0],     # spread
                           [2.0, nan, 2.0],     # flat among the scored
                           [nan, nan, 5.0]])    # one scored: flat
    assert zero_spread_fraction(groups) == 0.75


def _grpo(tiny_dir, tokenizer, tmp_path, fn, steps=2):
    model = toy_policy(tiny_dir("llama"), "lora")
    cfg = GRPOConfig(steps=steps, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2),
                     learning_rate=1e-2)
    return GRPOTrainer(model, tokenizer, PROMPTS, {"type": "function", "fn": fn}, cfg, output_dir=tmp_path)


def test_every_response_unscored_stops_the_run(tiny_dir, tokenizer, tmp_path):
    from alignkit.online.annotators import AnnotatorError

    trainer = _grpo(tiny_dir, tokenizer, tmp_path, lambda prompt, response: None)
    with pytest.raises(AnnotatorError, match="step 1: the annotator scored none of the 4 response"):
        trainer.train()
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_constant_reward_is_reported_not_silent(tiny_dir, tokenizer, tmp_path, caplog):
    trainer = _grpo(tiny_dir, tokenizer, tmp_path, lambda prompt, response: 1.0)
    with caplog.at_level("WARNING"):
        history = trainer.train()
    assert [h["frac_reward_zero_std"] for h in history] == [1.0, 1.0]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "step 1: every prompt's 2 samples got the same reward" in text
    assert "no step of this run had a reward spread" in text


def test_prompts_per_step_above_the_data_is_warned(tiny_dir, tokenizer, tmp_path, caplog):
    """prompts_per_step=8 with 4 prompts ran 4 a step without a word: the step's batch was half the one asked."""
    import logging

    model = toy_policy(tiny_dir("llama"), "lora")
    cfg = GRPOConfig(steps=1, prompts_per_step=8, sampling=SamplingConfig(num_samples=2, max_new_tokens=2))
    with caplog.at_level(logging.WARNING, logger="alignkit.online.trainer"):
        GRPOTrainer(model, tokenizer, PROMPTS, {"type": "function", "fn": digit_fraction}, cfg, output_dir=tmp_path)
    said = [r.getMessage() for r in caplog.records if "prompts_per_step" in r.getMessage()]
    assert said == ["prompts_per_step (method.prompts_per_step on the command line) is 8, and the data holds 4 "
                    "prompt(s): each step samples 4, so its batch is 8 sample(s), not 16; add prompts or lower "
                    "method.prompts_per_step"]


class _Judge(Annotator):
    """A pairwise judge (no pointwise scores) that prefers the longer response, or decides nothing."""

    def __init__(self, decides: bool) -> None:
        self.decides = decides

    def annotate(self, prompts, responses, metas=None):
        raise AssertionError("judge_pairs mode must not ask for pointwise scores")

    def prefer_batch(self, prompts, a, b):
        return [0 if self.decides and len(x) >= len(y) else (1 if self.decides else None) for x, y in zip(a, b)]


@pytest.mark.parametrize("feedback, annotator, kwargs, said", [
    # judge pairs have no pointwise rewards (NaN): they were taken for flat groups, and a run that trained on
    # every step's pairs warned "every prompt's samples got the same reward ... did not move the policy"
    ("judge_pairs", _Judge(True), {"pairs_per_prompt": 2}, None),
    ("judge_pairs", _Judge(False), {"pairs_per_prompt": 2}, "the judge decided none of its comparisons"),
    # a margin no pair passes: every step trained nothing, without a word (the rewards did spread)
    ("best_worst", {"type": "function", "fn": digit_fraction}, {"min_margin": 5.0},
     "no prompt's samples differ in reward by more than method.feedback_kwargs.min_margin (5.0)"),
])
def test_online_dpo_steps_without_pairs_are_reported(tiny_dir, tokenizer, feedback, annotator, kwargs, said, caplog):
    from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer

    model = toy_policy(tiny_dir("llama"), "lora")
    cfg = OnlineDPOConfig(steps=2, prompts_per_step=2, sampling=SamplingConfig(num_samples=3, max_new_tokens=3),
                          feedback=feedback, feedback_kwargs=kwargs)
    with caplog.at_level("WARNING", logger="alignkit.online.trainer"):
        history = OnlineDPOTrainer(model, tokenizer, PROMPTS, annotator, cfg).train()
    said_lines = [r.getMessage() for r in caplog.records  # (3 tokens: every response is cut off, said apart)
                  if "reached sampling.max_new_tokens" not in r.getMessage()]
    if said is None:
        assert all(h["pairs"] > 0 for h in history) and said_lines == []
    else:
        assert [h["pairs"] for h in history] == [0.0, 0.0]
        assert said_lines[0].startswith("step 1: no preference pair was formed: ") and said in said_lines[0]
        assert said_lines[1:] == ["no step of this run formed a preference pair (pairs = 0 at all 2 step(s)): the "
                                  "feedback did not move the policy"]


def test_resume_refuses_other_prompts_and_settings_the_checkpoint_would_override(tiny_dir, tokenizer, tmp_path,
                                                                                  caplog):
    """A checkpoint's prompt order indexes its run's prompts: resumed over fewer prompts it died at the next step
    with "IndexError: list index out of range", over others it ran them under the old order without a word; and a
    changed learning_rate / kl_coef / seed was silently replaced by the checkpoint's optimizer / KL / RNG state.
    Now one CheckpointError naming what differs; the same prompts and settings still resume."""
    from alignkit.run_commit import CheckpointError

    def trainer(prompts, steps=1, **kw):
        cfg = GRPOConfig(steps=steps, prompts_per_step=2, save_steps=1, learning_rate=kw.pop("learning_rate", 1e-2),
                         sampling=SamplingConfig(num_samples=2, max_new_tokens=2), **kw)
        return GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, prompts,
                           {"type": "function", "fn": digit_fraction}, cfg, output_dir=tmp_path)

    trainer(PROMPTS).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    with pytest.raises(CheckpointError, match=r"written by a run over 4 prompt\(s\), this run has 2; "):
        trainer(PROMPTS[:2], steps=2).train(resume_from_checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"over 4 other prompt\(s\) \(or the same in another order\)"):
        trainer(PROMPTS[::-1], steps=2).train(resume_from_checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"\(kl_coef: 0.05 -> 0.1; learning_rate: 0.01 -> 0.02\): the resumed "
                                              "run would keep the checkpoint's optimizer"):
        trainer(PROMPTS, steps=2, learning_rate=2e-2, kl_coef=0.1).train(resume_from_checkpoint=ckpt)
    # fewer steps than the checkpoint has done: nothing would run, and the saved model had trained longer than asked
    with pytest.raises(CheckpointError, match=r"has done 1 step\(s\), more than steps=0 \(train.max_steps\)"):
        trainer(PROMPTS, steps=0).train(resume_from_checkpoint=ckpt)
    # the killed run's rows after the checkpoint (here: step 1 of the first resume) stayed beside the resumed run's
    # rows of the same step; a resume now keeps the rows up to its checkpoint; a run from step 0 into the folder is
    # refused
    assert len(trainer(PROMPTS, steps=2).train(resume_from_checkpoint=ckpt)) == 1  # the same run: step 2 runs
    assert len(trainer(PROMPTS, steps=2).train(resume_from_checkpoint=ckpt)) == 1  # again, as after a kill
    rows = [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rows == [0.0, 1.0], rows  # was [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"metrics.jsonl already holds 2 row\(s\) of an earlier run, and this run "
                                         r"starts at step 0, so its rows would be appended to that run's; pass "
                                         r"resume_from_checkpoint= to continue that run, or another output_dir"):
        trainer(PROMPTS).train()
    # another number of processes: the prompt order and global batches are the same, the per-process sampling seeds
    # are not; resumed with a warning that says so (it resumed without a word, and the number was not recorded)
    text = (ckpt / "trainer_state.json").read_text()
    assert json.loads(text)["world_size"] == 1
    (ckpt / "trainer_state.json").write_text(text.replace('"world_size": 1', '"world_size": 2'))  # same size
    with caplog.at_level("WARNING", logger="alignkit.online.checkpoint"):
        assert len(trainer(PROMPTS, steps=2).train(resume_from_checkpoint=ckpt)) == 1
    said = [r.getMessage() for r in caplog.records if "process(es)" in r.getMessage()]
    assert len(said) == 1 and "written by a run of 2 process(es), this one has 1" in said[0]
    assert "sampling seeds" in said[0]


def test_a_run_from_step_0_into_an_earlier_runs_checkpoints_is_refused(tiny_dir, tokenizer, tmp_path):
    """An output_dir holding an earlier run's checkpoints/ but no metrics.jsonl (removed, as the metrics refusal's
    advice said): a new GRPOTrainer(...).train() from step 0 replaced that run's checkpoint-1 / checkpoint-2 with
    its own, without a word. Now a CheckpointError naming the folder and the fix, before anything is written; the
    earlier run's files are as they were, and resuming from its checkpoint still runs."""
    from alignkit.run_commit import CheckpointError

    def trainer(steps=2, learning_rate=1e-2):
        cfg = GRPOConfig(steps=steps, prompts_per_step=2, save_steps=1, learning_rate=learning_rate,
                         sampling=SamplingConfig(num_samples=2, max_new_tokens=2))
        return GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                           {"type": "function", "fn": digit_fraction}, cfg, output_dir=tmp_path)

    trainer().train()
    (tmp_path / METRICS_FILE).unlink()
    before = {p: p.read_bytes() for p in sorted((tmp_path / "checkpoints").rglob("*")) if p.is_file()}
    assert {p.parent.name for p in before} == {"checkpoint-1", "checkpoint-2"}
    with pytest.raises(CheckpointError) as e:
        trainer(learning_rate=5e-2).train()
    assert str(e.value) == (
        f"GRPOTrainer: {tmp_path / 'checkpoints'} already holds 2 checkpoint(s) of an earlier run (checkpoint-1, "
        "checkpoint-2), and this run starts at step 0, so its checkpoints would replace that run's of the same step; "
        f"pass resume_from_checkpoint= (e.g. {tmp_path / 'checkpoints' / 'checkpoint-2'}) to continue that run, or "
        "another output_dir (or remove that run's files)")
    assert {p: p.read_bytes() for p in sorted((tmp_path / "checkpoints").rglob("*")) if p.is_file()} == before
    assert not (tmp_path / METRICS_FILE).exists()
    assert len(trainer(steps=3).train(resume_from_checkpoint=tmp_path / "checkpoints" / "checkpoint-2")) == 1


@pytest.mark.parametrize("kwargs, says", [
    ({"kl_coef": 0.5}, "kl_coef=0.5 sets the KL penalty of GRPO / RLOO / PPO, and online DPO's preference loss has none"),
    ({"kl_target": 6.0}, "kl_target=6.0 sets the KL penalty of GRPO / RLOO / PPO"),
])
def test_online_dpo_refuses_the_kl_penalty_it_never_reads(kwargs, says):
    """OnlineDPOConfig inherits OnlineConfig's kl_coef / kl_target (the KL penalty GRPO, RLOO and PPO add to their
    loss); online DPO's preference loss never reads them (an adaptive kl_target even moved the logged kl_coef), so
    OnlineDPOConfig(kl_coef=0.5) trained exactly as without it. Now a ValueError naming the key; GRPO still takes it."""
    from alignkit.online import OnlineDPOConfig

    with pytest.raises(ValueError, match=re.escape(says)):
        OnlineDPOConfig(**kwargs)
    assert GRPOConfig(**kwargs).kl_coef == kwargs.get("kl_coef", 0.05)
    assert OnlineDPOConfig(kl_coef=0.0).kl_coef == 0.0  # no KL penalty: what online DPO does anyway


def test_adaptive_kl_from_a_zero_coefficient_is_refused():
    """The adaptive KL controller multiplies its coefficient (Ziegler et al. 2019), so kl_coef=0 with a kl_target
    stayed 0 at every step (checked by hand below) while the config said the KL was controlled. Now refused, in the
    library config and the controller; kl_coef=0 alone (no KL penalty) and a positive start still build."""
    from alignkit.losses import AdaptiveKLController

    c = AdaptiveKLController(0.1, target=1.0, horizon=10)
    assert c.update(2.0, 5) == pytest.approx(0.1 * (1 + 0.2 * 5 / 10))  # e = clip(2/1 - 1) = 0.2
    with pytest.raises(ValueError, match=re.escape("kl_target=6.0 adapts kl_coef by multiplying it")):
        GRPOConfig(kl_coef=0.0, kl_target=6.0)
    with pytest.raises(ValueError, match=r"init_kl_coef \(0.0; the updates multiply it, so 0 stays 0\)"):
        AdaptiveKLController(0.0, target=6.0, horizon=10)
    assert GRPOConfig(kl_coef=0.0).kl_target is None and GRPOConfig(kl_coef=0.01, kl_target=6.0).kl_target == 6.0

