"""An online run killed and resumed continues the SAME run, or is refused in one line.

Before: the reward-stall count (`method.stall_steps`) was not in the checkpoint, so a stall that began before a
resume was counted again from 0 after it (stopped stall_steps steps after the resume, or never); and
`train(resume_from_checkpoint=...)` compared only learning_rate, weight_decay, optimizer, kl_coef, kl_target and
seed, so a GRPO checkpoint resumed by RLOO, or with another temperature, num_samples, max_new_tokens, clip_eps,
reward function or LoRA alpha, continued without a word. Now the checkpoint records the stall and every setting
but how long the run goes and what it logs / saves (`OnlineTrainer.training_settings`), and a resume that changes
one is refused naming `key: old -> new`. PPO (value head, adaptive KL, running reward moments) resumed after a
kill logs the uninterrupted run's rows (the reference: that run itself)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from alignkit.adapters import apply_adapter
from alignkit.guards import RewardStallError
from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.online.trainer import METRICS_FILE
from alignkit.run_commit import COMPLETE_MARKER, CheckpointError
from tests.adapters.table import ROWS

from .toy import HEAD_SCALE, PROMPTS, killed_at, toy_policy

SIGNAL = {"on": False}  # switched by the tests: one reward function (one spec) with and without signal


def switch(prompt, response: str) -> float:
    """0 for every response (no reward signal), or, switched on, a score that ties two responses only when equal."""
    if not SIGNAL["on"]:
        return 0.0
    return sum(ord(c) * (i + 1) for i, c in enumerate(response)) % 997 / 997


def other(prompt, response: str) -> float:
    return float(len(response))


def grpo(tiny_dir, tokenizer, out, steps, *, cls=GRPOTrainer, config=GRPOConfig, fn=switch, policy=None, **keys):
    sampling = keys.pop("sampling", {})
    cfg = config(steps=steps, prompts_per_step=2, save_steps=keys.pop("save_steps", 2),
                 learning_rate=keys.pop("learning_rate", 1e-2),
                 sampling=SamplingConfig(**{"num_samples": 2, "max_new_tokens": 2, **sampling}), **keys)
    return cls(policy if policy is not None else toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
               {"type": "function", "fn": fn}, cfg, output_dir=out)


def steps_logged(out) -> list[float]:
    return [json.loads(x)["step"] for x in (out / METRICS_FILE).read_text().splitlines()]


def test_a_stall_that_spans_a_resume_stops_at_stall_steps(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """stall_steps=3: 2 steps without signal before checkpoint-2, so the resumed run stops after 3 - 2 = 1 more step,
    at steps 1-3 (it stopped at steps 3-5: the count restarted at the resume)."""
    monkeypatch.setitem(SIGNAL, "on", False)
    grpo(tiny_dir, tokenizer, tmp_path, 2, stall_steps=3).train()  # 2 steps without signal: under 3, no stop
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["stall"] == [0, 0.0, 0.0]  # from step 0, every score 0
    with pytest.raises(RewardStallError) as err:
        grpo(tiny_dir, tokenizer, tmp_path, 6, stall_steps=3).train(resume_from_checkpoint=ckpt)
    assert (err.value.first, err.value.last) == (1, 3)
    assert str(err.value).startswith("GRPOTrainer: no reward signal at steps 1-3 (3 in a row, method.stall_steps=3): "
                                     "every prompt's 2 samples got the same reward")
    assert steps_logged(tmp_path) == [0, 1, 2]  # the checkpoint's 2 rows and the one resumed step
    # resumed with a lower stall_steps (2, reached by the checkpoint's steps): stops at its first step without signal,
    # and the line counts the steps in a row (3), where it said stall_steps (2) whatever the count
    with pytest.raises(RewardStallError) as err:
        grpo(tiny_dir, tokenizer, tmp_path, 6, stall_steps=2).train(resume_from_checkpoint=ckpt)
    assert str(err.value).startswith("GRPOTrainer: no reward signal at steps 1-3 (3 in a row, method.stall_steps=2): ")


def test_a_resume_after_a_step_with_signal_counts_the_stall_from_there(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """The checkpoint's last step had signal (no stall recorded): the resumed run needs stall_steps steps of its own,
    steps 3-5; stall_steps may change on resume (a watchdog, not a training setting)."""
    monkeypatch.setitem(SIGNAL, "on", True)
    grpo(tiny_dir, tokenizer, tmp_path, 2, stall_steps=2).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["stall"] is None
    monkeypatch.setitem(SIGNAL, "on", False)
    with pytest.raises(RewardStallError) as err:
        grpo(tiny_dir, tokenizer, tmp_path, 8, stall_steps=3).train(resume_from_checkpoint=ckpt)
    assert (err.value.first, err.value.last) == (3, 5)


def lora_policy(tiny_dir, alpha: float):
    """toy_policy's LoRA (r=4, seeded init) with another alpha."""
    import torch

    model = load_model(tiny_dir("llama"))
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    torch.manual_seed(0)
    return apply_adapter(model, ROWS["lora"].config(lora_r=4, lora_alpha=alpha))


# (what the resumed run changes, what the refusal names): each `key: old -> new` written out from the first run's
# settings (GRPO, LoRA r=4 alpha=8, 2 samples of 2 tokens at temperature 1.0, the k3 KL estimator, entropy_coef 0, switch)
CHANGED = [
    ({"cls": RLOOTrainer, "config": RLOOConfig}, "advantage: 'grpo' -> 'rloo'; method: 'GRPOTrainer' -> 'RLOOTrainer'"),
    ({"sampling": {"temperature": 0.7}}, "sampling.temperature: 1.0 -> 0.7"),
    ({"sampling": {"num_samples": 4}}, "sampling.num_samples: 2 -> 4"),
    ({"sampling": {"max_new_tokens": 3}}, "sampling.max_new_tokens: 2 -> 3"),
    ({"kl_estimator": "k2"}, "kl_estimator: 'k3' -> 'k2'"),
    ({"entropy_coef": 0.01}, "entropy_coef: 0.0 -> 0.01"),
    ({"kl_coef": 0.1, "learning_rate": 2e-2}, "kl_coef: 0.05 -> 0.1; learning_rate: 0.01 -> 0.02"),
    ({"fn": other}, f"annotator.fn: '{switch.__module__}:switch' -> '{other.__module__}:other'"),
    ({"alpha": 16.0}, "adapter.lora.alpha: 8.0 -> 16.0"),
]


@pytest.mark.parametrize("change, said", CHANGED, ids=[s.split(":")[0] for _, s in CHANGED])
def test_a_resume_with_other_settings_is_refused_naming_them(tiny_dir, tokenizer, tmp_path, change, said):
    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1, stall_steps=0).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    before = (tmp_path / METRICS_FILE).read_text()
    change = dict(change)
    alpha = change.pop("alpha", None)
    policy = lora_policy(tiny_dir, alpha) if alpha is not None else None
    trainer = grpo(tiny_dir, tokenizer, tmp_path, 2, save_steps=1, stall_steps=0, policy=policy, **change)
    with pytest.raises(CheckpointError) as err:
        trainer.train(resume_from_checkpoint=ckpt)
    assert str(err.value) == (
        f"resume: {ckpt} was trained with other settings than this run's ({said}): the resumed run would keep the "
        "checkpoint's optimizer, KL controller and random state (the old values) and continue its training under "
        "settings that did not make it; resume with the checkpoint's settings, or start a new run (another "
        "output_dir)")
    assert (tmp_path / METRICS_FILE).read_text() == before  # refused before anything was written


def test_how_long_and_what_is_logged_or_saved_may_change(tiny_dir, tokenizer, tmp_path, caplog, monkeypatch):
    """steps, save_steps, stall_steps, progress_bar are not training settings: the resume runs. Its run-level
    warnings judge the whole run: the checkpoint's step had no signal and was cut too, so all 3 steps count (they
    said "no step of this run" of 2 of its 3 steps, then "since its resume" of the last 2)."""
    monkeypatch.setitem(SIGNAL, "on", False)
    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1).train()
    with caplog.at_level("WARNING", logger="alignkit.online.trainer"):
        rows = grpo(tiny_dir, tokenizer, tmp_path, 3, save_steps=2, stall_steps=7, progress_bar=False).train(
            resume_from_checkpoint=tmp_path / "checkpoints" / "checkpoint-1")
    assert [r["step"] for r in rows] == [1, 2]
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("no step of this run had a reward spread inside any prompt's group "
                            "(frac_reward_zero_std = 1 at all 3 step(s))") for m in said), said
    assert any(m.startswith("every response of this run's 3 step(s) reached sampling.max_new_tokens (2)")
               for m in said), said


def test_a_step_with_signal_before_the_resume_keeps_the_no_signal_warning_away(tiny_dir, tokenizer, tmp_path, caplog,
                                                                                monkeypatch):
    """Step 1 had a reward spread, steps 2-3 (after the resume) had none: the run as a whole had signal, so no
    "no step of this run" warning (it was given for the 2 steps since the resume, as if the run had none)."""
    monkeypatch.setitem(SIGNAL, "on", True)
    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1, stall_steps=0).train()
    monkeypatch.setitem(SIGNAL, "on", False)
    with caplog.at_level("WARNING", logger="alignkit.online.trainer"):
        grpo(tiny_dir, tokenizer, tmp_path, 3, save_steps=2, stall_steps=0).train(
            resume_from_checkpoint=tmp_path / "checkpoints" / "checkpoint-1")
    said = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("no step of this run") for m in said), said
    assert any(m.startswith("step 2: ") for m in said), said  # the first step without signal is still said


def test_an_older_checkpoint_compares_what_it_recorded_and_says_the_stall_restarts(tiny_dir, tokenizer, tmp_path,
                                                                                   caplog):
    """A checkpoint of the previous format (its six restored settings under "settings", no stall): those six are
    still compared; the stall count it never recorded is said to start again at the resume, in one warning."""
    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["training_settings"], state["stall"], state["run_counts"]
    state["settings"] = {"learning_rate": 0.01, "weight_decay": 0.0, "optimizer": "adamw", "kl_coef": 0.05,
                         "kl_target": None, "seed": 0}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())  # the file's new size, as that version wrote it
    marker["files"]["trainer_state.json"] = (ckpt / "trainer_state.json").stat().st_size
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"\(kl_coef: 0.05 -> 0.2\)"):
        grpo(tiny_dir, tokenizer, tmp_path, 2, kl_coef=0.2, sampling={"temperature": 0.5}).train(
            resume_from_checkpoint=ckpt)  # the temperature was not recorded: not compared
    with caplog.at_level("WARNING"):
        assert len(grpo(tiny_dir, tokenizer, tmp_path, 2).train(resume_from_checkpoint=ckpt)) == 1
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("every response of this run")]
    assert ends and ends[-1].startswith("every response of this run's 1 step(s) since its resume after step 1 reached")
    said = [r.getMessage() for r in caplog.records if "records no count" in r.getMessage()]
    assert said == [f"resume: {ckpt} records no count of steps without reward signal (an older alignkit wrote it): "
                    "method.stall_steps=20 counts them from this resume, so a stall that began before it stops the run "
                    "up to 19 step(s) late"]



def test_ppo_killed_and_resumed_logs_the_uninterrupted_runs_rows(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """PPO keeps more state than the policy: the value head (its weights and Adam moments), the adaptive KL
    controller's coefficient and the running reward moments. Killed at step 3 and resumed from checkpoint-2, its rows
    (loss, value loss, kl_coef, rewards) equal those of the run that was never killed (CPU, fp32)."""
    monkeypatch.setitem(SIGNAL, "on", True)

    def ppo(out, steps=4):
        cfg = PPOConfig(steps=steps, prompts_per_step=2, save_steps=2, learning_rate=1e-2, kl_target=0.5,
                        kl_horizon=4, reward_normalization="running", epochs_per_step=2, mini_batch_size=2,
                        sampling=SamplingConfig(num_samples=2, max_new_tokens=3))
        return PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, {"type": "function", "fn": switch},
                          cfg, output_dir=out)

    whole = ppo(tmp_path / "whole").train()
    assert {"loss", "value_loss", "kl_coef", "reward", "reward/normalized_mean"} <= set(whole[2])
    assert len({r["kl_coef"] for r in whole}) > 1 and whole[2]["loss"] != whole[3]["loss"]  # the state moves

    killed_at(monkeypatch, ppo(tmp_path / "cut").train)
    resumed = ppo(tmp_path / "cut").train(resume_from_checkpoint=tmp_path / "cut" / "checkpoints" / "checkpoint-2")
    assert [r["step"] for r in resumed] == [2, 3]
    for got, want in zip(resumed, whole[2:]):
        for key in ("loss", "value_loss", "kl_coef", "reward", "reward/normalized_mean", "kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def scaled(prompt, response: str, scale: float = 1.0) -> float:
    return scale * len(response)


def test_a_partial_reward_function_resumes_and_its_arguments_are_compared(tiny_dir, tokenizer, tmp_path):
    """A `functools.partial` reward function was recorded by its repr, which holds a memory address: the same
    partial, built again in the resuming process, was refused as another function. It is recorded by its function's
    name and its arguments now: the same arguments resume, another `scale` is refused naming both."""
    import functools

    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1, stall_steps=0, fn=functools.partial(scaled, scale=2.0)).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    name = f"{scaled.__module__}:scaled"
    with pytest.raises(CheckpointError, match=re.escape(
            f"annotator.fn: '{name}(scale=2.0)' -> '{name}(scale=3.0)'")):
        grpo(tiny_dir, tokenizer, tmp_path, 2, save_steps=1, stall_steps=0,
             fn=functools.partial(scaled, scale=3.0)).train(resume_from_checkpoint=ckpt)
    rows = grpo(tiny_dir, tokenizer, tmp_path, 2, save_steps=1, stall_steps=0,
                fn=functools.partial(scaled, scale=2.0)).train(resume_from_checkpoint=ckpt)
    assert [r["step"] for r in rows] == [1]
    assert "rewards/scaled(scale=2.0)/mean" in rows[0], sorted(rows[0])


def edited(prompt, response: str) -> float:
    """`switch` edited under its own name (another reward): the resumed steps are scored by this code."""
    return 100.0 * len(response)


edited.__name__ = edited.__qualname__ = "switch"


@pytest.mark.parametrize("fn, warned", [(switch, False), (edited, True)], ids=["same", "edited"])
def test_a_reward_function_edited_under_its_name_is_said_at_resume(tiny_dir, tokenizer, tmp_path, caplog, fn, warned):
    """The checkpoint compares the function by name (annotator.fn), so an edited function (a new reward scale, a
    fixed bug) resumed without a word. Now its source's digest is recorded and a difference is one warning naming
    the function; the same code is not said."""
    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1, stall_steps=0).train()
    with caplog.at_level("WARNING", logger="alignkit.online.checkpoint"):
        rows = grpo(tiny_dir, tokenizer, tmp_path, 2, save_steps=2, stall_steps=0, fn=fn).train(
            resume_from_checkpoint=tmp_path / "checkpoints" / "checkpoint-1")
    assert [r["step"] for r in rows] == [1]
    said = [r.getMessage() for r in caplog.records if "differs from the code that scored" in r.getMessage()]
    name = repr(f"{__name__}:switch")
    assert said == ([f"resume: the code of the function annotator {name} differs from the code that scored the run up to "
                     f"{tmp_path / 'checkpoints' / 'checkpoint-1'} (the same name, edited since): the resumed steps "
                     "are scored by the new code, and the checkpoint's training and reward statistics come from the "
                     "old one; start a new run if the reward is not meant to change"] if warned else []), said


def _rm_grpo(tiny_dir, tokenizer, out, steps, rm_folder, kind):
    cfg = GRPOConfig(steps=steps, prompts_per_step=2, save_steps=1, learning_rate=1e-2, stall_steps=0,
                     sampling=SamplingConfig(num_samples=2, max_new_tokens=2))
    return GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                       {"type": kind, "model": str(rm_folder), "device": "cpu",  # a tiny judge's answers: unparsed
                        **({"on_failure": "default", "default_score": 0.0} if kind == "judge" else {})},
                       cfg, output_dir=out)


@pytest.mark.parametrize("kind", ["reward_model", "judge"])
@pytest.mark.parametrize("retrained", [False, True], ids=["same", "retrained"])
def test_a_reward_model_retrained_at_its_path_is_said_at_resume(tiny_dir, tokenizer, tmp_path, caplog, retrained,
                                                                kind):
    """The checkpoint compares a reward model (or judge) by its path, so one retrained at the same path resumed
    without a word, its new scores mixed with the old run's statistics. Now the digest of its files (sizes,
    modification times, safetensors headers, config / tokenizer bytes; no weight read) taken when it was loaded is
    recorded, and a difference is one warning naming the annotator, its path and the checkpoint; the same files are
    not said."""
    import shutil

    source = tiny_dir("llama", classifier=True, num_labels=1) if kind == "reward_model" else tiny_dir("llama")
    rm = shutil.copytree(source, tmp_path / "rm")
    _rm_grpo(tiny_dir, tokenizer, tmp_path / "run", 1, rm, kind).train()
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert len(json.loads((ckpt / "trainer_state.json").read_text()).get("annotator_model_files") or "") == 64
    if retrained:  # another training run writes its model into the same folder
        model = load_model(rm, task="classifier" if kind == "reward_model" else "causal_lm")
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        model.save_pretrained(rm)
    with caplog.at_level("WARNING", logger="alignkit.online.checkpoint"):
        rows = _rm_grpo(tiny_dir, tokenizer, tmp_path / "run", 2, rm, kind).train(resume_from_checkpoint=ckpt)
    assert [r["step"] for r in rows] == [1]
    said = [r.getMessage() for r in caplog.records if "model files" in r.getMessage()]
    assert said == ([f"resume: the model files at {rm} of the {kind} annotator {str(rm)!r} differ from those "
                     f"that scored the run up to {ckpt} (retrained or replaced at the same path since: another weight "
                     "file size, modification time or safetensors header, or another config / tokenizer): the resumed "
                     "steps are scored by the new model, and the checkpoint's training and reward statistics come "
                     "from the old one; start a new run if the reward is not meant to change"] if retrained else []), said


def test_model_files_digest_reads_headers_not_weights(tiny_dir, tmp_path):
    """The same files give the same digest; rewritten weights (another mtime) or another config another one; a
    Hub name not in the cache none."""
    import os
    import shutil

    from alignkit.online.digests import model_files_digest

    folder = shutil.copytree(tiny_dir("llama", classifier=True, num_labels=1), tmp_path / "rm")
    first = model_files_digest(folder)
    assert first is not None and model_files_digest(str(folder)) == first
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten a second later
    assert model_files_digest(folder) not in (None, first)
    config = folder / "config.json"
    again = model_files_digest(folder)
    config.write_text(config.read_text().replace("{", '{"note": 1, ', 1))
    assert model_files_digest(folder) not in (None, first, again)
    assert model_files_digest(tmp_path / "no-such-model") is None


def test_the_cli_annotator_records_its_model_files(tiny_dir, tmp_path):
    """The CLI builds a reward model / judge from a model object (`make_annotator`: base + adapter_path), so it
    recorded no files and a `--resume` after retraining it at annotator.path was silent. Now it records the digest
    of the folders it loaded; another file there (a retrain) gives another; a `tiny:<arch>` none (built from its spec)."""
    import shutil

    from alignkit.cli.online import make_annotator
    from alignkit.settings.online import AnnotatorSettings

    rm = shutil.copytree(tiny_dir("llama", classifier=True, num_labels=1), tmp_path / "rm")
    first = make_annotator(AnnotatorSettings(kind="reward_model", path=str(rm)), None).model_files
    assert first is not None and make_annotator(AnnotatorSettings(kind="reward_model", path=str(rm)),
                                                None).model_files == first
    model = load_model(rm, task="classifier")
    model.save_pretrained(rm)  # retrained there: its files rewritten
    assert make_annotator(AnnotatorSettings(kind="reward_model", path=str(rm)), None).model_files not in (None, first)
    assert make_annotator(AnnotatorSettings(kind="reward_model", path="tiny:llama"), None).model_files is None
