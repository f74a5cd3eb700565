"""The one reduction: gradient accumulation invariance, sample weights, metrics across micro-batches."""

from __future__ import annotations

import pytest
import torch

from alignkit.trainers import PreferenceTrainer, SFTTrainer

from .conftest import fast_args


def _one_step(make_model, kind, cls, feats, collator, tmp_path, bs, ga, **kw):
    model = make_model(kind)
    args = fast_args(tmp_path / f"b{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                     optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0)
    trainer = cls(model, args, train_dataset=feats, data_collator=collator, **kw)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


@pytest.mark.parametrize("kind", ["full", "reft"])
def test_sft_accumulation_invariant(kind, make_model, features, collators, tmp_path):
    feats = features["sft"]
    lengths = {sum(f["completion_mask"]) for f in feats}
    assert len(lengths) > 3, "the test needs completions of different lengths"
    a, _ = _one_step(make_model, kind, SFTTrainer, feats, collators["sft"], tmp_path, bs=8, ga=1)
    b, _ = _one_step(make_model, kind, SFTTrainer, feats, collators["sft"], tmp_path, bs=1, ga=8)
    init = {n: p.detach() for n, p in make_model(kind).named_parameters() if p.requires_grad}
    assert any(not torch.equal(a[n], init[n]) for n in a)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=2e-6, msg=n)


def test_naive_per_microbatch_mean_would_differ(features):
    """Guard: with these lengths, a mean of per-micro-batch token means is NOT the token mean of the step."""
    n = torch.tensor([float(sum(f["completion_mask"])) for f in features["sft"]])
    nll = torch.arange(1.0, 9.0)  # any per-example NLL sums
    assert not torch.isclose((nll / n).mean(), nll.sum() / n.sum())


def test_dpo_accumulation_invariant_lora(make_model, features, collators, tmp_path):
    feats = features["preference"]
    a, _ = _one_step(make_model, "lora", PreferenceTrainer, feats, collators["preference"], tmp_path, bs=4, ga=1)
    b, _ = _one_step(make_model, "lora", PreferenceTrainer, feats, collators["preference"], tmp_path, bs=2, ga=2)
    # 8 pairs, max_steps=1: batch 4 x 1 sees 4 pairs, batch 2 x 2 sees 4 pairs: same sampler order (same seed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=2e-6, msg=n)


def _weighted(feats, weights):
    return [{**f, "weight": w} for f, w in zip(feats, weights)]


@pytest.mark.parametrize("norm", ["count", "weighted"])
def test_sample_weights_reach_the_loss(norm, make_model, features, collators, tmp_path):
    """Weight-0 pairs contribute nothing: compare with dropping them (and with the per-pair losses by hand)."""
    model = make_model("lora")
    trainer = PreferenceTrainer(model, fast_args(tmp_path), train_dataset=features["preference"],
                                data_collator=collators["preference"], weight_normalization=norm)
    with torch.no_grad():  # move the policy away from its reference so losses differ per pair
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.train()
    feats, col = features["preference"][:4], collators["preference"]
    weights = [1.0, 0.0, 2.0, 0.0]

    def loss_and_grads(batch_feats):
        model.zero_grad()
        loss = trainer.compute_loss(model, col(batch_feats))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    lw, gw = loss_and_grads(_weighted(feats, weights))
    ld, gd = loss_and_grads(_weighted([feats[0], feats[2]], [1.0, 2.0]))
    single = [loss_and_grads([f])[0] for f in feats]
    if norm == "count":  # mean over ALL examples of w * loss: dropped rows change only the count (4 vs 2)
        torch.testing.assert_close(lw, (single[0] + 2 * single[2]) / 4)
        scale = 2 / 4
    else:  # weighted mean: sum w L / sum w
        torch.testing.assert_close(lw, (single[0] + 2 * single[2]) / 3)
        scale = 1.0
    torch.testing.assert_close(lw, ld * scale)
    for n in gw:
        torch.testing.assert_close(gw[n], gd[n] * scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", [["sigmoid", "sft"], "orpo", "cpo"])
def test_weighted_chosen_nll_drops_weight_0_pairs(loss_type, make_model, features, collators, tmp_path):
    """Under weight_normalization="weighted" a weight-0 pair is exactly as if dropped, in every term of the loss: the
    chosen NLL of sft / orpo / cpo too (before, its tokens still counted in the NLL's token mean)."""
    feats, col = features["preference"][:4], collators["preference"]
    model = make_model("lora")
    trainer = PreferenceTrainer(model, fast_args(tmp_path), train_dataset=features["preference"], data_collator=col,
                                weight_normalization="weighted", loss_type=loss_type)
    model.train()
    with torch.no_grad():
        lw = trainer.compute_loss(model, col(_weighted(feats, [1.0, 0.0, 2.0, 0.0])))
        ld = trainer.compute_loss(model, col(_weighted([feats[0], feats[2]], [1.0, 2.0])))
    torch.testing.assert_close(lw, ld)
