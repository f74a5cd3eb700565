"""The online optimizer: `train.optim` adamw_torch_fused (the default, as transformers' TrainingArguments with torch
>= 2.8, which TRL's online trainers inherit) builds torch's fused AdamW; adamw_torch its per-tensor loop; both make
AdamW's update, checked here against the update written out by hand. Before: both names built the per-tensor
loop (the fused one was accepted and not applied). A resume may switch between the two kernels (the same maths),
and parameters the fused kernel does not take are refused in one line, not moved to the loop without a word."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignkit.online.trainer import build_optimizer
from alignkit.settings import ConfigError

from .test_resume_state import grpo


def config(optimizer: str, lr: float = 0.1, weight_decay: float = 0.5) -> SimpleNamespace:
    return SimpleNamespace(optimizer=optimizer, learning_rate=lr, weight_decay=weight_decay)


@pytest.mark.parametrize("optimizer, fused", [("adamw_fused", True), ("adamw", None)])
def test_adamw_first_step_is_the_hand_written_update(optimizer, fused):
    """First AdamW step: the bias-corrected moments are g and g^2, so each element moves by
    -lr * (wd * p + g / (|g| + eps)) (decoupled weight decay, applied to the old value first)."""
    p0 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    g = torch.tensor([[0.3, -0.2, 4.0], [-1e-3, 2.0, 0.0]])
    p = torch.nn.Parameter(p0.clone())
    opt = build_optimizer([p], config(optimizer))
    assert opt.param_groups[0]["fused"] is fused
    p.grad = g.clone()
    opt.step()
    lr, wd, eps = 0.1, 0.5, 1e-8
    expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)


def test_parameters_the_fused_kernel_does_not_take_are_refused_in_one_line():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))  # the loop takes it, the fused kernel does not
    assert isinstance(build_optimizer([p], config("adamw")), torch.optim.AdamW)
    with pytest.raises(ConfigError, match=r"^train\.optim=adamw_torch_fused: torch's fused AdamW does not take these "
                                          r"parameters \(.+\); set train\.optim adamw_torch") as err:
        build_optimizer([p], config("adamw_fused"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("first, then, fused", [("adamw", "adamw_fused", True), ("adamw_fused", "adamw", None)])
def test_a_run_resumes_across_the_two_adamw_kernels_and_keeps_its_own(tiny_dir, tokenizer, tmp_path, first, then,
                                                                       fused):
    """A checkpoint written with the per-tensor loop (every checkpoint before the fused default) resumes under the
    fused kernel, and the other way round: the same optimizer maths, its state loads into either. The resumed run
    computes with its own train.optim (torch's load_state_dict took the checkpoint's kernel with its moments)."""
    grpo(tiny_dir, tokenizer, tmp_path, 1, save_steps=1, stall_steps=0, optimizer=first).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    trainer = grpo(tiny_dir, tokenizer, tmp_path, 2, save_steps=1, stall_steps=0, optimizer=then)
    rows = trainer.train(resume_from_checkpoint=ckpt)
    assert [r["step"] for r in rows] == [1]
    assert trainer.optimizer.param_groups[0]["fused"] is fused
    assert all(trainer.optimizer.state[p]["step"].item() == 2 for p in trainer.optimizer.state)
