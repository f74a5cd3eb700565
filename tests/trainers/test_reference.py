"""Reference models: DPO starts at log 2 where the policy equals its reference, the chunked path equals a naive
full-logits DPO, and the precomputed cache is reused when its key matches and recomputed when stale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.adapters import reference_off
from alignkit.trainers import PreferenceTrainer, load_or_compute
from alignkit.trainers.logps import batch_locations

from .conftest import fast_args


def _dpo_loss(trainer, batch):
    trainer.model.train()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dpo_starts_at_log2(kind, make_model, features, collators, tmp_path):
    trainer = PreferenceTrainer(make_model(kind), fast_args(tmp_path), train_dataset=features["preference"],
                                data_collator=collators["preference"])
    assert trainer.reference_mode == ("copy" if kind == "full" else "adapter_off")
    batch = collators["preference"](features["preference"][:4])
    assert _dpo_loss(trainer, batch) == pytest.approx(math.log(2), abs=1e-6)


def test_reft_init_is_not_identity_unless_w_equals_r(make_model, features, collators, tmp_path):
    """LoReFT h + R^T(Wh + b - Rh) moves the policy off its base at init; with W = R, b = 0 it is the identity."""
    model = make_model("reft")
    trainer = PreferenceTrainer(model, fast_args(tmp_path), train_dataset=features["preference"],
                                data_collator=collators["preference"])
    batch = collators["preference"](features["preference"][:4])
    assert abs(_dpo_loss(trainer, batch) - math.log(2)) > 1e-4
    with torch.no_grad():
        for iv in model.interventions["default"]:
            iv.learned_source.weight.copy_(iv.rotate_layer.weight.T)
            iv.learned_source.bias.zero_()
    assert _dpo_loss(trainer, batch) == pytest.approx(math.log(2), abs=1e-5)


def _naive_logps(model, batch, locations=None):
    """Sum of completion log-probs from the FULL (B, T, V) logits: log_softmax, gather, mask."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if locations is not None:
        kw["intervention_locations"] = locations
    logits = model(**kw).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


@pytest.mark.parametrize("kind", ["full", "reft+lora"])
def test_chunked_dpo_equals_naive_full_logits(kind, make_model, features, collators, tmp_path):
    model = make_model(kind)
    trainer = PreferenceTrainer(model, fast_args(tmp_path), train_dataset=features["preference"],
                                data_collator=collators["preference"], beta=0.5)
    with torch.no_grad():  # move the policy away from its reference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.train()
    batch = collators["preference"](features["preference"][:4])
    B = 4

    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    loc = batch_locations(model, batch)
    pi = _naive_logps(model, batch, loc)
    with torch.no_grad():
        if kind == "full":
            ref = _naive_logps(trainer.ref_model, batch)
        else:
            with reference_off(model):
                ref = _naive_logps(model, batch, loc)
    d = (pi[:B] - ref[:B]) - (pi[B:] - ref[B:])
    naive = -F.logsigmoid(0.5 * d).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_precomputed_cache_reuse_and_stale(make_model, features, collators, tokenizer, tmp_path):
    feats, col = features["preference"], collators["preference"]
    cache = tmp_path / "refcache"
    model = make_model("lora")
    kw = dict(tokenizer=tokenizer, batch_size=3, paired=True)
    first, reused = load_or_compute(model, feats, col, cache, "train", **kw)
    assert not reused and (cache / "train.safetensors").is_file() and (cache / "train.json").is_file()
    batch = col(feats)
    with torch.no_grad(), reference_off(model):  # adapter off, from the full logits
        expected = _naive_logps(model, batch)
    torch.testing.assert_close(first["chosen"], expected[:8], rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(first["rejected"], expected[8:], rtol=1e-5, atol=2e-4)

    again, reused = load_or_compute(make_model("lora", seed=1), feats, col, cache, "train", **kw)  # other LoRA init
    assert reused and torch.equal(again["chosen"], first["chosen"])

    changed = make_model("lora")
    with torch.no_grad():
        changed.get_base_model().lm_head.weight[0, 0] += 0.5  # one base weight differs: stale
    recomputed, reused = load_or_compute(changed, feats, col, cache, "train", **kw)
    assert not reused
    with torch.no_grad(), reference_off(changed):
        fresh = _naive_logps(changed, batch)
    torch.testing.assert_close(recomputed["chosen"], fresh[:8], rtol=1e-5, atol=2e-4)
    assert not torch.equal(recomputed["chosen"], first["chosen"])

    _, reused = load_or_compute(changed, feats[:6], col, cache, "train", **kw)  # other data: stale
    assert not reused


def test_trainer_with_precomputed_reference(make_model, features, collators, tokenizer, tmp_path):
    trainer = PreferenceTrainer(make_model("lora"), fast_args(tmp_path, max_steps=1), train_dataset=features["preference"],
                                data_collator=collators["preference"], processing_class=tokenizer,
                                reference_cache_dir=str(tmp_path / "cache"))
    assert trainer.reference_mode == "precomputed"
    assert "reference_chosen_logps" in trainer.train_dataset[0]
    batch = trainer.data_collator(trainer.train_dataset[:4])
    assert _dpo_loss(trainer, batch) == pytest.approx(math.log(2), abs=1e-6)  # LoRA at init = its reference
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
