"""Gradient clipping over the optimizer's parameters (AlignTrainer's fast path) equals transformers'
own path over every model parameter, and clipping really happens at the chosen max_grad_norm."""

from __future__ import annotations

import pytest
import torch

from alignkit.trainers import SFTTrainer

from .conftest import fast_args


def _step(make_model, kind, features, collators, tmp_path, max_grad_norm, force_trainer_path=False):
    model = make_model(kind)
    args = fast_args(tmp_path, per_device_train_batch_size=8, max_steps=1, optim="sgd", learning_rate=1.0,
                     max_grad_norm=max_grad_norm, lr_scheduler_type="constant", weight_decay=0.0)
    trainer = SFTTrainer(model, args, train_dataset=features["sft"], data_collator=collators["sft"])
    if force_trainer_path:
        trainer._clip_params_ok = False
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


@pytest.mark.parametrize("kind", ["lora", "reft"])
def test_fast_clipping_equals_trainer_clipping(kind, make_model, features, collators, tmp_path):
    init = {n: p.detach().clone() for n, p in make_model(kind).named_parameters() if p.requires_grad}
    fast, trainer = _step(make_model, kind, features, collators, tmp_path / "fast", 1e-3)
    assert trainer._clip_params_ok is True  # the fast path really ran
    slow, _ = _step(make_model, kind, features, collators, tmp_path / "slow", 1e-3, force_trainer_path=True)
    free, _ = _step(make_model, kind, features, collators, tmp_path / "free", 0.0)
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=0, atol=1e-7, msg=n)
    # with SGD at lr 1, the update is the (clipped) gradient: its global norm must be max_grad_norm
    update = torch.sqrt(sum(((fast[n] - init[n]) ** 2).sum() for n in fast))
    assert abs(update.item() - 1e-3) < 1e-6
    unclipped = torch.sqrt(sum(((free[n] - init[n]) ** 2).sum() for n in free))
    assert unclipped.item() > 1e-2  # so the clipping above was active


def test_max_grad_norm_none_means_no_clipping(make_model, features, collators, tmp_path):
    """max_grad_norm=None (no clipping, as the online trainers take it) stopped at the first optimizer step with the
    Trainer's TypeError ('>' between None and int); now the update is exactly the unclipped one (max_grad_norm=0)."""
    init = {n: p.detach().clone() for n, p in make_model("full").named_parameters() if p.requires_grad}
    none, _ = _step(make_model, "full", features, collators, tmp_path / "none", None)
    free, _ = _step(make_model, "full", features, collators, tmp_path / "free", 0.0)
    for n in free:
        torch.testing.assert_close(none[n], free[n], rtol=0, atol=0, msg=n)
    assert torch.sqrt(sum(((none[n] - init[n]) ** 2).sum() for n in none)).item() > 1.0  # not clipped at the default 1
