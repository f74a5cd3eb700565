"""TR-DPO reference syncing for the online commands (`method.ref_sync`, alignkit.online.ref_sync): after every
`steps`-th optimizer update the reference copy becomes alpha * policy + (1 - alpha) * reference. Before, the online
commands refused the key. The mixes are written out by hand from the weights each optimizer update left."""

from __future__ import annotations

import pytest
import torch

from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.run_commit import CheckpointError
from alignkit.settings.typed import ConfigError
from alignkit.trainers.ref_sync import REFERENCE_FILE

from .toy import PROMPTS, killed_at, toy_policy

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer),
            "online-dpo": (OnlineDPOConfig, OnlineDPOTrainer), "ppo": (PPOConfig, PPOTrainer)}


def varied(prompt, response: str) -> float:
    return sum(ord(c) * (i + 1) for i, c in enumerate(response)) % 997 / 997


def build(tiny_dir, tokenizer, command="grpo", kind="full", out=None, **kw):
    config_class, trainer_class = TRAINERS[command]
    cfg = config_class(**{"steps": 1, "prompts_per_step": 2, "learning_rate": 5e-2, "optimizer": "sgd",
                          "sampling": SamplingConfig(num_samples=2, max_new_tokens=3), **kw})
    return trainer_class(toy_policy(tiny_dir("llama"), kind), tokenizer, PROMPTS, {"type": "function", "fn": varied},
                         cfg, output_dir=out)


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("command", ["grpo", "online-dpo", "ppo"])
def test_the_reference_after_eight_updates_is_the_mix_by_hand(tiny_dir, tokenizer, command):
    """2 online steps x 2 epochs x 2 minibatches = 8 optimizer updates; steps=3, alpha=0.5: syncs after updates 3
    and 6 (not at an online step's end): r = .5 t6 + .5 (.5 t3 + .5 t0) = .5 t6 + .25 t3 + .25 t0."""
    mb = {"online-dpo": 1, "grpo": 2, "ppo": 2}[command]  # online DPO: 2 pairs a step, its items
    trainer = build(tiny_dir, tokenizer, command, steps=2, epochs_per_step=2, mini_batch_size=mb,
                    ref_sync={"alpha": 0.5, "steps": 3}, **({"kl_coef": 0.05} if command != "online-dpo" else {}))
    reference = trainer.reference.model
    snaps = [weights(trainer.policy)]
    assert all(torch.equal(snaps[0][n], t) for n, t in weights(reference).items())  # the copy: the initial weights
    step = trainer.optimizer.step

    def recorded(*a, **k):
        out = step(*a, **k)
        snaps.append(weights(trainer.policy))
        return out

    trainer.optimizer.step = recorded
    trainer.train()
    assert len(snaps) == 9 and trainer.ref_syncer.updates == 8 and trainer.ref_syncer.syncs == 2
    got = weights(reference)
    assert any(not torch.equal(snaps[6][n], snaps[0][n]) for n in got)  # the policy moved
    for n, t in got.items():
        want = 0.5 * snaps[6][n] + 0.25 * snaps[3][n] + 0.25 * snaps[0][n]
        assert torch.allclose(t, want, atol=1e-6), n
    assert any(not torch.allclose(t, snaps[8][n]) for n, t in got.items())  # not the final policy



def test_a_killed_and_resumed_run_has_the_uninterrupted_runs_reference(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """Killed at step 3, resumed from checkpoint-2 (after the sync at update 3 of 8): the reference, the policy and
    the update count equal the uninterrupted run's (CPU, fp32); without loading the reference they would not."""
    def run(out):
        return build(tiny_dir, tokenizer, "rloo", out=out, steps=4, save_steps=2, epochs_per_step=2,
                     mini_batch_size=2, ref_sync={"alpha": 0.5, "steps": 3})

    whole = run(tmp_path / "whole")
    whole.train()
    killed_at(monkeypatch, run(tmp_path / "cut").train)
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / REFERENCE_FILE).is_file()
    resumed = run(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=checkpoint)
    assert (resumed.ref_syncer.updates, resumed.ref_syncer.syncs) == (whole.ref_syncer.updates, 16 // 3) == (16, 5)
    for module in ("reference", "policy"):
        a = weights(whole.reference.model if module == "reference" else whole.policy)
        b = weights(resumed.reference.model if module == "reference" else resumed.policy)
        for n, t in a.items():
            assert torch.allclose(b[n], t, rtol=1e-6, atol=1e-9), (module, n)


def test_a_checkpoint_without_the_reference_is_refused(tiny_dir, tokenizer, tmp_path):
    build(tiny_dir, tokenizer, out=tmp_path / "a", steps=2, save_steps=1).train()  # no ref_sync: no reference saved
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-1"
    assert not (checkpoint / REFERENCE_FILE).exists()
    trainer = build(tiny_dir, tokenizer, out=tmp_path / "b", steps=2, ref_sync={"alpha": 0.5, "steps": 1})
    with pytest.raises(CheckpointError, match=f"holds no {REFERENCE_FILE}, and this run syncs its reference"):
        trainer.check_resume(checkpoint)


@pytest.mark.parametrize("kind, kw, needle", [
    ("lora", {}, "no separate reference to move"),
    ("reft", {}, "no separate reference to move"),
    ("full", {"kl_coef": 0.0}, "builds no reference (a fixed method.kl_coef of 0"),
])
def test_a_reference_that_cannot_move_is_refused(tiny_dir, tokenizer, kind, kw, needle):
    with pytest.raises(ConfigError, match=r"ref_sync") as e:
        build(tiny_dir, tokenizer, kind=kind, ref_sync={"alpha": 0.5, "steps": 1}, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_config_takes_a_mapping_and_checks_it():
    assert GRPOConfig(ref_sync={"alpha": 0.25, "steps": 4}).ref_sync.steps == 4
    with pytest.raises(ConfigError, match="ref_sync.alpha"):
        PPOConfig(ref_sync={"alpha": 0.0, "steps": 4})
    with pytest.raises(ConfigError, match="unknown key"):
        OnlineDPOConfig(ref_sync={"alpha": 0.5, "tau": 4})


def test_ref_sync_under_fsdp2_is_refused_in_one_line():
    """Under FSDP2 the online reference is sharded like the policy; the mix on the shards is not built."""
    from types import SimpleNamespace

    from alignkit.online.ref_sync import build_online_ref_sync
    from alignkit.settings.sections import RefSync

    layer = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(config=SimpleNamespace(ref_sync=RefSync(0.5, 2)),
                              reference=SimpleNamespace(mode="copy", model=torch.nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="under FSDP2 shards the reference") as e:
        build_online_ref_sync(trainer, layer, None, fsdp2=True)
    assert "\n" not in str(e.value) and "train under DDP" in str(e.value)
    assert build_online_ref_sync(trainer, layer, None, fsdp2=False).updates == 0  # the same trainer, one process
