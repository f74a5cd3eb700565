"""Adapter layer: switched off = base model, save/load round trip of the trainable state only, resume in place,
activation checkpointing through LoRA and ReFT, and no silent dtype change under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from alignkit.adapters import (adapter_kind, load_adapter, load_adapter_weights, reference_off, save_adapter,
                                      trainable_state_dict, unwrap_lm)
from alignkit.models.loading import load_model
from alignkit.trainers import SFTTrainer, completion_logps

from tests.adapters.table import SWITCHABLE as ADAPTERS, perturb  # every kind with an adapter to switch off

from .conftest import adapter_config, fast_args


@pytest.mark.parametrize("kind", ADAPTERS)
def test_reference_off_is_the_base_model(kind, make_model, features, collators, tiny_dir):
    model = make_model(kind)
    perturb(model, 0.1)
    batch = collators["sft"](features["sft"][:4])
    base = load_model(tiny_dir("llama"))
    with torch.no_grad():
        want, _ = completion_logps(base, batch)
        on, _ = completion_logps(model, batch)
        with reference_off(model):
            off, _ = completion_logps(model, batch)
    torch.testing.assert_close(off, want, rtol=0, atol=1e-5)
    assert (on - want).abs().max() > 1e-3


def test_reference_off_refuses_full(make_model):
    with pytest.raises(ValueError, match="frozen"):
        with reference_off(make_model("full")):
            pass


@pytest.mark.parametrize("kind", ADAPTERS)
def test_save_load_round_trip(kind, make_model, features, collators, tiny_dir, tmp_path):
    model = make_model(kind)
    perturb(model, 0.1)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(load_model(tiny_dir("llama")), tmp_path / "a")
    assert adapter_kind(loaded) == kind
    batch = collators["sft"](features["sft"][:4])
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(loaded, batch)[0], completion_logps(model, batch)[0])
    size = sum(f.stat().st_size for f in (tmp_path / "a").glob("*.safetensors"))
    n_trainable = sum(v.numel() for v in trainable_state_dict(model).values())
    assert size < 4 * n_trainable + 20_000  # only the trainable state (float32) plus headers

    fresh = make_model(kind, seed=3)  # resume: copy the saved weights into a live wrapper, in place
    params = {n: p for n, p in fresh.named_parameters()}
    load_adapter_weights(fresh, tmp_path / "a")
    assert all(params[n] is p for n, p in fresh.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(fresh, batch)[0], completion_logps(model, batch)[0])


def test_reft_classifier_head_is_trained_and_saved(make_model, tiny_dir, tmp_path):
    model = make_model("reft", classifier=True)
    assert any(n.startswith("model.score") for n, p in model.named_parameters() if p.requires_grad)
    perturb(model, 0.1)
    save_adapter(model, tmp_path / "rm")
    base = load_model(tiny_dir("llama", classifier=True, num_labels=1), task="classifier", num_labels=1)
    loaded = load_adapter(base, tmp_path / "rm")
    torch.testing.assert_close(loaded.model.score.weight, model.model.score.weight)


@pytest.mark.parametrize("kind", ["lora", "reft"])
def test_gradient_checkpointing_same_gradients(kind, make_model, features, collators, tmp_path):
    batch = collators["sft"](features["sft"][:4])
    grads = []
    for ckpt in (False, True):
        model = make_model(kind)
        trainer = SFTTrainer(model, fast_args(tmp_path, activation_checkpointing=ckpt), train_dataset=features["sft"],
                             data_collator=collators["sft"])
        model.train()
        layers_ckpt = [m.gradient_checkpointing for m in unwrap_lm(model).modules() if hasattr(m, "gradient_checkpointing")]
        assert layers_ckpt and any(layers_ckpt) == ckpt
        trainer.compute_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[1][n].abs().sum() > 0 or grads[0][n].abs().sum() == 0, n
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast_keeps_weight_dtype(make_model, features, collators, tmp_path):
    model = make_model("lora")
    trainer = SFTTrainer(model, fast_args(tmp_path, bf16=True, max_steps=1), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    trainer.train()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


@pytest.mark.parametrize("kind", ["reft+lora", "full"])
def test_resume_reproduces_losses(kind, make_model, features, collators, tmp_path):
    """Stop after a checkpoint, resume from it: the later losses equal those of an uninterrupted run."""
    common = dict(max_steps=3, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    full = SFTTrainer(make_model(kind), fast_args(tmp_path / "a", **common), train_dataset=features["sft"],
                      data_collator=collators["sft"])
    full.train()
    want = [h["loss"] for h in full.state.log_history if "loss" in h]
    files = {p.name for p in (tmp_path / "a" / "out" / "checkpoint-2").iterdir()}
    assert ("interventions.safetensors" in files) == (kind != "full")
    resumed = SFTTrainer(make_model(kind, seed=7), fast_args(tmp_path / "a", **common), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    got = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert got[-1] == pytest.approx(want[-1], rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_reft_pairs_share_prompt_positions(side, make_model, features, tokenizer):
    """Chosen and rejected rows of a pair are edited at the same prompt positions ("f1+l1": first and last)."""
    from alignkit.data import PreferenceCollator
    from alignkit.trainers.logps import batch_locations

    feats = features["preference"][:3]
    batch = PreferenceCollator(tokenizer.pad_token_id, padding_side=side)(feats)
    loc = batch_locations(make_model("reft"), batch)  # (2B, I, P)
    start = batch["attention_mask"].argmax(1)  # (2B,) first real token
    for i, f in enumerate(feats):
        want = [0, f["prompt_length"] - 1]
        for row in (i, i + 3):
            assert (loc[row] - start[row]).tolist() == [want, want]
