"""Padding-free packing: a packed batch gives the same loss and gradients as the same examples padded (SFT, DPO,
full / LoRA / ReFT), the trainers' `padding_free` switch swaps the collator, and the attention really is
block-diagonal (a token never sees the previous sequence)."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.data import PreferenceCollator, SFTCollator
from alignkit.data.collators import PackedPreferenceCollator, PackedSFTCollator
from alignkit.trainers import PreferenceTrainer, SFTTrainer
from alignkit.trainers.logps import batch_locations, completion_logps

from tests.adapters.table import perturb

from .conftest import fast_args


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.eval()  # no dropout (tiny GPT-2 has some): both runs must see the same network
    model.zero_grad()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=trainer.count_items(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


ROWS = [None, "longest"]  # one packed row; first-fit-decreasing rows of the longest sequence


@pytest.mark.parametrize("row_length", ROWS)
@pytest.mark.parametrize("kind", ["full", "lora", "reft"])
def test_sft_packed_equals_padded(kind, row_length, make_model, features, tokenizer, tmp_path):
    feats = features["sft"][:6]
    model = make_model(kind)
    perturb(model, 0.05)
    trainer = SFTTrainer(model, fast_args(tmp_path), train_dataset=feats, data_collator=SFTCollator(0))
    padded = _loss_and_grads(trainer, SFTCollator(tokenizer.pad_token_id)(feats))
    pk = PackedSFTCollator(row_length)(feats)
    rows = pk["input_ids"].shape[0]
    assert rows == (1 if row_length is None else max(2, rows)) and rows <= len(feats)
    packed = _loss_and_grads(trainer, pk)
    _same(padded, packed)
    # and the loss is the plain mean token NLL, recomputed here one example at a time (no batching at all)
    total, n = 0.0, 0
    with torch.no_grad():
        for f in feats:
            ids = torch.tensor([f["input_ids"]])
            out = completion_logps(model, {"input_ids": ids, "completion_mask": torch.tensor([f["completion_mask"]])})
            total, n = total - float(out[0]), n + int(out[1])
    assert float(packed[0]) == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("row_length", ROWS)
@pytest.mark.parametrize("kind", ["full", "lora", "reft+lora"])
def test_dpo_packed_equals_padded(kind, row_length, make_model, features, tokenizer, tmp_path):
    feats = features["preference"][:4]
    model = make_model(kind)
    trainer = PreferenceTrainer(model, fast_args(tmp_path), beta=0.5, train_dataset=feats,
                                data_collator=PreferenceCollator(tokenizer.pad_token_id))
    perturb(model, 0.05)
    padded = _loss_and_grads(trainer, PreferenceCollator(tokenizer.pad_token_id)(feats))
    packed = _loss_and_grads(trainer, PackedPreferenceCollator(row_length)(feats))
    _same(padded, packed)
    assert abs(float(packed[0]) - math.log(2)) > 1e-4  # the policy moved: a real comparison, not log 2 twice


def test_packed_reft_locations_shift_by_sequence_start(make_model, features, tokenizer):
    """f1+l1 on the prompt: packed locations are the padded ones plus each sequence's start in the row."""
    feats = features["preference"][:3]
    model = make_model("reft")
    padded = PreferenceCollator(tokenizer.pad_token_id)(feats)
    packed = PackedPreferenceCollator()(feats)
    loc_pad = batch_locations(model, padded)  # (6, I, P)
    loc_pack = batch_locations(model, packed)  # (1, I, 6 * P)
    R, I, P = loc_pad.shape
    starts = packed["sequence_start"]
    expect = torch.where(loc_pad >= 0, loc_pad + starts[:, None, None], -1).permute(1, 0, 2).reshape(1, I, R * P)
    assert torch.equal(loc_pack, expect)
    # chosen i and rejected i edit the same prompt positions relative to their own start
    assert torch.equal(loc_pad[:3], loc_pad[3:])


def test_multirow_layout_and_locations(make_model):
    """Lengths 5, 3, 2, 4 into rows of the longest (5), first-fit decreasing: [0], [3 (4 tok)], [1 (3), 2 (2)]
    -> L = 5; filler pads row 1; locations of each row list its own sequences, within the row."""
    lens = [5, 3, 2, 4]
    feats = [{"input_ids": list(range(10, 10 + n)), "completion_mask": [0, 0] + [1] * (n - 2)} for n in lens]
    b = PackedSFTCollator("longest", pad_token_id=0)(feats)
    assert b["input_ids"].shape == (3, 5) and "cu_seq_lens" not in b
    assert b["sequence_index"].tolist() == [[0, 0, 0, 0, 0], [3, 3, 3, 3, -1], [1, 1, 1, 2, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert b["sequence_start"].tolist() == [0, 10, 13, 5]
    assert b["completion_mask"][1, 4] == 0 and b["input_ids"][1, 4] == 0
    model = make_model("reft")  # positions f1+l1, two interventions: prompt = first 2 tokens of each sequence
    loc = batch_locations(model, b)  # (rows, I, K * P) with K = 2 sequences at most per row, P = 2
    assert loc.shape == (3, 2, 4)
    assert loc[0, 0].tolist() == [0, 1, -1, -1]  # sequence 0: first and last prompt token
    assert loc[1, 0].tolist() == [0, 1, -1, -1]  # sequence 3 at the start of row 1
    assert loc[2, 0].tolist() == [0, 1, 3, 4]  # sequences 1 (start 0) and 2 (start 3) in row 2


def test_attention_is_block_diagonal(tiny_lm):
    """Changing sequence 1's tokens leaves sequence 2's outputs unchanged in a packed row. (transformers reads
    packing from position_ids only without a KV cache: `use_cache=False`, as `completion_logps` passes.)"""
    model = tiny_lm("llama")
    a = {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}
    b = {"input_ids": [9, 10, 11], "completion_mask": [0, 1, 1]}
    a2 = {"input_ids": [15, 16, 17, 18], "completion_mask": [0, 0, 1, 1]}
    outs = []
    for first in (a, a2):
        batch = PackedSFTCollator()([first, b])
        with torch.no_grad():
            outs.append(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits[0, 4:])
    torch.testing.assert_close(outs[0], outs[1])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    torch.testing.assert_close(outs[0], alone, rtol=1e-5, atol=1e-5)


def test_padding_free_switch_swaps_collators(make_model, features, tokenizer, tmp_path):
    sft = SFTTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["sft"],
                     data_collator=SFTCollator(tokenizer.pad_token_id), padding_free=True)
    assert isinstance(sft.data_collator, PackedSFTCollator) and sft.data_collator.row_length is None  # sdpa: varlen
    ckpt = SFTTrainer(make_model("lora"), fast_args(tmp_path, activation_checkpointing=True),
                      train_dataset=features["sft"], data_collator=SFTCollator(tokenizer.pad_token_id), padding_free=True)
    assert ckpt.data_collator.row_length == "longest"  # checkpointed sdpa: block-diagonal rows of the longest
    dpo = PreferenceTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["preference"],
                            padding_free=True)
    assert isinstance(dpo.data_collator, PackedPreferenceCollator)
    out = dpo.train()  # a whole (2-step) run through the Trainer, packed
    assert math.isfinite(out.training_loss)
    with pytest.raises(ValueError, match="no padding-free version of"):
        SFTTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["sft"],
                   data_collator=lambda fs: fs, padding_free=True)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox"])
def test_sft_packed_equals_padded_other_archs(arch, make_model, features, tokenizer, tmp_path):
    """transformers' position_ids packing detection must hold for every architecture we ship tiny models of."""
    feats = features["sft"][:4]
    model = make_model("full", arch=arch)
    trainer = SFTTrainer(model, fast_args(tmp_path), train_dataset=feats, data_collator=SFTCollator(0))
    _same(_loss_and_grads(trainer, SFTCollator(tokenizer.pad_token_id)(feats)),
          _loss_and_grads(trainer, PackedSFTCollator()(feats)))
