"""One weight-decay rule for every trainer: ReFT's Householder reflectors are never decayed, the rest is the
Trainer's split (weights decayed, biases not). Checked on the update itself, against the AdamW formula."""

from __future__ import annotations

import torch

from alignkit.interventions.training import ReftTrainer
from alignkit.trainers import SFTTrainer

from .conftest import fast_args, snapshot

REFLECTORS = "parametrizations.weight.original"


def _one_step(make_model, features, collators, tmp_path, weight_decay, trainer_cls=SFTTrainer):
    model = make_model("reft", seed=0)
    start = snapshot(model)
    trainer = trainer_cls(model, fast_args(tmp_path / f"{trainer_cls.__name__}-{weight_decay}", max_steps=1,
                                           learning_rate=1e-2, weight_decay=weight_decay,
                                           lr_scheduler_type="constant", optim="adamw_torch"),
                          train_dataset=features["sft"][:4], data_collator=collators["sft"])
    trainer.train()
    return start, snapshot(model), trainer


def test_reflectors_not_decayed_weights_decayed_by_the_adamw_formula(make_model, features, collators, tmp_path):
    lr, wd = 1e-2, 0.5
    p0, plain, _ = _one_step(make_model, features, collators, tmp_path, 0.0)
    _, decayed, trainer = _one_step(make_model, features, collators, tmp_path, wd)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    reflectors = [n for n in names if n.endswith(REFLECTORS)]
    weights = [n for n in names if n.endswith("learned_source.weight")]
    assert len(reflectors) == 2 and len(weights) == 2  # LoReFT on layers 0 and 1
    for n in names:
        assert not torch.equal(plain[n], p0[n]), n  # every trainable tensor moved in the step
    # AdamW (decoupled): p1 = p0 (1 - lr wd) - lr u, with the same Adam update u in both runs (same gradients),
    # so the two runs differ by exactly -lr wd p0 on decayed tensors and not at all elsewhere.
    for n in names:
        want = -lr * wd * p0[n] if n in weights else torch.zeros_like(p0[n])
        torch.testing.assert_close(decayed[n] - plain[n], want, rtol=0, atol=1e-7, msg=n)


def test_pyreft_style_trainer_decays_the_same_tensors(make_model, features, collators, tmp_path):
    _, _, sft = _one_step(make_model, features, collators, tmp_path, 0.1)
    _, _, reft = _one_step(make_model, features, collators, tmp_path, 0.1, trainer_cls=ReftTrainer)
    want = sft.get_decay_parameter_names(sft.model)
    assert reft.get_decay_parameter_names(reft.model) == want
    assert not any(n.endswith(REFLECTORS) for n in want) and any(n.endswith("learned_source.weight") for n in want)
