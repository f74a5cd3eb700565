"""Reweighters: mean-one factors computed by hand; the weights reach the loss through the per-sample weight path
(offline: record -> tokenized feature -> collator `weight` -> AlignTrainer's reduction; online: OnlineDPOTrainer)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from alignkit.data import PreferenceCollator, PreferenceRecord, SFTRecord, tokenize_records
from alignkit.data.records import DataError
from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
from alignkit.models.loading import load_model
from alignkit.online.reweighting import build_reweighter, reweight


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pairs(margins, weights=None, prompts=None) -> list[PreferenceRecord]:
    n = len(margins)
    weights = weights or [1.0] * n
    prompts = prompts or [f"prompt {i}" for i in range(n)]
    return [PreferenceRecord(p, f"good {i}", f"bad {i}", weight=w, margin=m, id=f"r{i}")
            for i, (p, m, w) in enumerate(zip(prompts, margins, weights))]


def test_margin_sigmoid_by_hand():
    recs = reweight(pairs([0.0, 2.0, -1.0]), [{"type": "margin_sigmoid", "tau": 2.0}])
    raw = [0.5, sig(1.0), sig(-0.5)]
    want = [r * 3 / sum(raw) for r in raw]
    assert [r.weight for r in recs] == pytest.approx(want)
    assert [r.meta["reweight"] for r in recs] == pytest.approx(want)
    assert sum(r.weight for r in recs) / 3 == pytest.approx(1.0)


def test_margin_linear_multiplies_existing_weights():
    recs = reweight(pairs([1.0, -3.0], weights=[2.0, 1.0]), ["margin_linear"])
    assert [r.weight for r in recs] == pytest.approx([2.0 * 0.5, 1.0 * 1.5])  # |m| / mean |m| = 1/2, 3/2


def test_inverse_prompt_frequency_and_stacking():
    recs = pairs([1.0, 1.0, 4.0], prompts=["A", "A", "B"])
    one = reweight(recs, ["inverse_prompt_frequency"])
    assert [r.weight for r in one] == pytest.approx([0.75, 0.75, 1.5])  # r = 1/2, 1/2, 1 -> x 3 / 2
    both = reweight(recs, ["inverse_prompt_frequency", "margin_linear"])
    lin = [1 / 2, 1 / 2, 2.0]  # |m| / mean |m| with mean 2
    assert [r.weight for r in both] == pytest.approx([a * b for a, b in zip([0.75, 0.75, 1.5], lin)])
    assert [r.meta["reweight"] for r in both] == pytest.approx([r.weight for r in both])


def test_confidence_and_errors():
    recs = [SFTRecord("p", f"c{i}", id=f"s{i}", meta={"confidence": c}) for i, c in enumerate([0.2, 0.6])]
    assert [r.weight for r in reweight(recs, ["confidence"])] == pytest.approx([0.5, 1.5])
    with pytest.raises(DataError, match=r"s0: confidence reweighting needs meta\['confidence'\]"):
        reweight([SFTRecord("p", "c", id="s0")], ["confidence"])
    with pytest.raises(DataError, match="x9: margin reweighting needs a margin"):
        reweight([SFTRecord("p", "c", id="x9")], ["margin_linear"])
    with pytest.raises(ValueError, match="every raw weight is 0"):
        reweight(pairs([0.0, 0.0]), ["margin_linear"])
    with pytest.raises(ValueError, match="tau must be > 0"):
        build_reweighter({"type": "margin_sigmoid", "tau": 0})
    with pytest.raises(KeyError, match="unknown reweighter 'nope'"):
        build_reweighter("nope")


def test_weights_reach_the_offline_trainer_loss(tiny_dir, tokenizer, tmp_path):
    from alignkit.trainers.preference import PreferenceTrainer

    recs = reweight(pairs([1.0, 3.0, 0.5, 2.5]), ["margin_linear"])  # factors |m| / 1.75
    want_w = [m / 1.75 for m in (1.0, 3.0, 0.5, 2.5)]
    feats, _ = tokenize_records(recs, tokenizer, max_length=32)
    batch = PreferenceCollator(tokenizer.pad_token_id)(feats)
    assert batch["weight"].tolist() == pytest.approx(want_w)  # record weight -> feature -> batch
    torch.manual_seed(0)
    model = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    with torch.no_grad():  # move LoRA B off zero so the pairs' losses differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = PreferenceTrainer(model, args, beta=0.5)
    with torch.no_grad():
        per_pair = trainer.objective(model, batch).losses  # (4,)
        loss = trainer.compute_loss(model, batch)
    assert per_pair.std() > 1e-3
    # the base's "count" normalisation: sum_i w_i l_i / number of pairs
    assert float(loss) == pytest.approx(sum(w * float(l) for w, l in zip(want_w, per_pair)) / 4, rel=1e-5)
    unweighted = {k: v for k, v in batch.items() if k != "weight"}
    with torch.no_grad():
        assert float(trainer.compute_loss(model, unweighted)) == pytest.approx(float(per_pair.mean()), rel=1e-5)
