"""An EMA of the policy (`train.ema_decay`; DeepSpeed-Chat step 3's --enable_ema): ema = d ema + (1 - d) theta after
every optimizer step, from the initial weights, over the trainable parameters; kept in checkpoints; saved as
model_ema/ in the saved model's format. Before, alignkit had none. The averages are written out by hand from the
weights each optimizer step left."""

from __future__ import annotations

import pytest
import torch

from alignkit.adapters import load_adapter
from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.run_commit import COMPLETE_MARKER

from .toy import HEAD_SCALE, PROMPTS, killed_at, predating, toy_policy


def varied(prompt, response: str) -> float:
    return sum(ord(c) * (i + 1) for i, c in enumerate(response)) % 997 / 997


def ppo(tiny_dir, tokenizer, out=None, **kw) -> PPOTrainer:
    cfg = PPOConfig(**{"steps": 1, "prompts_per_step": 2, "learning_rate": 5e-2, "epochs_per_step": 3,
                       "optimizer": "sgd", "sampling": SamplingConfig(num_samples=2, max_new_tokens=3), **kw})
    return PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, {"type": "function", "fn": varied},
                      cfg, output_dir=out)


def trained_with_snapshots(trainer) -> list[dict]:
    """Train; the trainable weights before training and after each optimizer step."""
    snaps = [{n: p.detach().clone() for n, p in trainer.policy_trainable().items()}]
    step = trainer.optimizer.step

    def recorded(*a, **k):
        out = step(*a, **k)
        snaps.append({n: p.detach().clone() for n, p in trainer.policy_trainable().items()})
        return out

    trainer.optimizer.step = recorded
    trainer.train()
    return snaps


def test_the_ema_after_three_updates_is_the_weighted_sum_by_hand(tiny_dir, tokenizer):
    """d = 0.5, three optimizer steps: e1 = .5 t0 + .5 t1, e2 = .5 e1 + .5 t2, e3 = .5 e2 + .5 t3
    = .125 t0 + .125 t1 + .25 t2 + .5 t3."""
    trainer = ppo(tiny_dir, tokenizer, ema_decay=0.5)
    snaps = trained_with_snapshots(trainer)
    assert len(snaps) == 4
    names = list(snaps[0])
    assert names and all("lora" in n for n in names)  # the adapter's weights only: the frozen base is not averaged
    assert any(not torch.equal(snaps[3][n], snaps[0][n]) for n in names)  # the weights moved
    for n in names:
        want = 0.125 * snaps[0][n] + 0.125 * snaps[1][n] + 0.25 * snaps[2][n] + 0.5 * snaps[3][n]
        assert torch.allclose(trainer.ema.shadow[n], want, atol=1e-7), n


@pytest.mark.parametrize("accumulation,mini_batch,steps", [(2, None, 3), (2, 2, 6), (4, None, 3)],
                         ids=["2-micro-batches", "2-minibatches-x-2-micro", "4-micro-batches-of-1"])
def test_the_ema_moves_once_per_optimizer_step(tiny_dir, tokenizer, accumulation, mini_batch, steps):
    """Gradient accumulation (micro-batches) and minibatches under 3 epochs (method.epochs_per_step): the EMA moves
    once per optimizer step (3 epochs x the minibatches), never per micro-batch; by hand, d = 0.7:
    e_0 = t_0, e_k = 0.7 e_(k-1) + 0.3 t_k over the weights each optimizer step left."""
    trainer = ppo(tiny_dir, tokenizer, ema_decay=0.7, gradient_accumulation_steps=accumulation,
                  mini_batch_size=mini_batch)
    snaps = trained_with_snapshots(trainer)
    assert len(snaps) == 1 + steps  # 4 samples: 3 epochs x (4 / mini_batch) optimizer steps
    want = dict(snaps[0])
    for snap in snaps[1:]:
        want = {n: 0.7 * want[n] + 0.3 * snap[n] for n in want}
    assert any(not torch.equal(snaps[-1][n], snaps[0][n]) for n in want)
    for n, t in want.items():
        assert torch.allclose(trainer.ema.shadow[n], t, atol=1e-7), n


def test_model_ema_is_saved_in_the_models_format_and_loads(tiny_dir, tokenizer, tmp_path):
    trainer = ppo(tiny_dir, tokenizer, tmp_path, ema_decay=0.9)
    trainer.train()
    folder = tmp_path / "model_ema"
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "online_config.json").is_file()
    assert not (folder / "value_head.safetensors").exists()  # the policy's average, not the value head's
    base = load_model(tiny_dir("llama"))
    with torch.no_grad():
        base.lm_head.weight.mul_(HEAD_SCALE)
    loaded = load_adapter(base, folder)
    got = {n: p for n, p in loaded.named_parameters() if "lora" in n}
    assert set(got) == set(trainer.ema.shadow)
    for n, t in trainer.ema.shadow.items():
        assert torch.equal(got[n].detach(), t), n
    # the trained weights are back in the policy after the save, and differ from the average
    assert any(not torch.equal(p.detach(), trainer.ema.shadow[n]) for n, p in trainer.policy_trainable().items())


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5])
def test_a_decay_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match="ema_decay must be in \\(0, 1\\)"):
        PPOConfig(ema_decay=value)



def test_a_resumed_run_continues_the_ema(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """Killed at step 3, resumed from checkpoint-2: the final EMA equals the uninterrupted run's (CPU, fp32)."""
    def run(out):
        return ppo(tiny_dir, tokenizer, out, steps=4, save_steps=2, ema_decay=0.8, epochs_per_step=2)

    whole = run(tmp_path / "whole")
    whole.train()
    killed_at(monkeypatch, run(tmp_path / "cut").train)
    resumed = run(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=tmp_path / "cut" / "checkpoints" / "checkpoint-2")
    for n, t in whole.ema.shadow.items():
        assert torch.allclose(resumed.ema.shadow[n], t, rtol=1e-6, atol=1e-9), n


def test_a_bf16_policy_keeps_its_ema_in_float32():
    """bf16 weights drifting by 0.02-0.08 a step: (1 - d)(theta - ema) rounds to 0 in bf16 (the EMA stayed at theta_0);
    the shadow is float32 and equals d^k theta_0 + sum (1 - d) d^(k-i) theta_i written out in float64; saving casts it
    back to bf16 once."""
    from alignkit.online.ema import ActorEMA

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16))
    d, thetas = 0.992, [p.detach().double().clone()]
    ema = ActorEMA({"w": p}, d)
    for _ in range(5):
        with torch.no_grad():
            p.add_(0.03 * torch.sign(torch.randn_like(p)) + 0.05)
        thetas.append(p.detach().double().clone())
        ema.update({"w": p})
    k = len(thetas) - 1
    want = d ** k * thetas[0] + sum((1 - d) * d ** (k - i) * thetas[i] for i in range(1, k + 1))
    assert ema.shadow["w"].dtype == torch.float32
    assert torch.allclose(ema.shadow["w"].double(), want, rtol=0, atol=1e-6)
    assert (ema.shadow["w"].double() != thetas[0]).float().mean() > 0.99  # it moved off theta_0 nearly everywhere
    with ema.swapped({"w": p}):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), want.to(torch.bfloat16))


def test_a_checkpoint_without_an_ema_is_refused_by_check_resume(tiny_dir, tokenizer, tmp_path):
    """Written before train.ema_decay existed, resumed with it: refused by check_resume (which the CLI runs before it
    writes the run folder); before, only load_checkpoint refused it, after the run folder was written."""
    from alignkit.run_commit import CheckpointError

    ppo(tiny_dir, tokenizer, tmp_path / "a", steps=2, save_steps=1).train()
    checkpoint = predating(tmp_path / "a" / "checkpoints" / "checkpoint-1", "ema_decay")
    assert not (checkpoint / "ema.safetensors").exists()
    with pytest.raises(CheckpointError, match="holds no EMA of the policy") as e:
        ppo(tiny_dir, tokenizer, tmp_path / "b", steps=2, ema_decay=0.9).check_resume(checkpoint)
    assert "\n" not in str(e.value)
