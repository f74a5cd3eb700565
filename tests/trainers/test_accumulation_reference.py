"""Gradient accumulation against an independent reference: one plain-torch backward over the optimizer step's
whole batch (the loss normalised over all of its completion tokens for SFT, all of its pairs for DPO, as
transformers >= 4.46 does with num_items_in_batch), then one SGD step, compared weight by weight with what the
trainer did over ragged micro-batches. Also the epoch whose micro-batches are not a multiple of the accumulation
steps: the last, partial accumulation is stepped (not dropped), normalised over its own items, and the logged
steps, losses and epoch say so."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.data import PreferenceCollator, PreferenceRecord, SFTCollator, SFTRecord, tokenize_records
from alignkit.trainers import PreferenceTrainer, SFTTrainer

from .conftest import PROMPTS, fast_args

LR = 0.5
# completions of very different token counts (1 to ~40 tokens), so that a per-micro-batch mean differs from the
# token mean of the step
COMPLETIONS = [" a", " Answer: Paris, the capital of France, on the Seine, since the year 508 or so.", " b c",
               " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", " yes", " no thanks", " x",
               " The quick brown fox jumps over the lazy dog, again and again and again.", " ok", " fine, thanks"]
REJECTED = [" no", " b", " Answer: 12 and 13 and 14 and 15.", " 9", " never, not at all, no way", " x y", " q",
            " the dog", " not ok at all, really not", " bad"]


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else " again") for i in range(n)]


@pytest.fixture(scope="module")
def sft_feats(tokenizer):
    recs = [SFTRecord(p, c, id=f"s{i}") for i, (p, c) in enumerate(zip(_prompts(10), COMPLETIONS))]
    feats, _ = tokenize_records(recs, tokenizer, max_length=64, max_prompt_length=16)
    counts = [sum(f["completion_mask"]) for f in feats]
    assert len(feats) == 10 and max(counts) >= 8 * min(counts), counts
    return feats


@pytest.fixture(scope="module")
def pref_feats(tokenizer):
    recs = [PreferenceRecord(p, c, r, id=f"p{i}") for i, (p, c, r) in enumerate(zip(_prompts(10), COMPLETIONS,
                                                                                      REJECTED))]
    feats, _ = tokenize_records(recs, tokenizer, max_length=64, max_prompt_length=16)
    assert len(feats) == 10
    return feats


def _args(tmp_path, bs, ga, **kw):
    return fast_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd",
                     learning_rate=LR, max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0,
                     train_sampling_strategy="sequential", **kw)


def _token_logps(model, ids: list[int], mask: list[int]) -> torch.Tensor:
    """log p of each completion token (mask 1) given the tokens before it: one unpadded row, plain torch."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return logps[torch.tensor(mask[1:], dtype=torch.bool)]


def _sgd(model, loss: torch.Tensor) -> float:
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    return float(loss.detach())


def _sft_reference_step(model, feats) -> float:
    """One SGD step on the token-mean NLL of `feats` (all their completion tokens); returns that loss."""
    nll = torch.cat([-_token_logps(model, f["input_ids"], f["completion_mask"]) for f in feats])
    return _sgd(model, nll.sum() / nll.numel())


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(trained, reference, init):
    assert trained.keys() == reference.keys()
    assert any(not torch.equal(trained[n], init[n]) for n in trained), "nothing trained"
    for n in trained:
        torch.testing.assert_close(trained[n], reference[n], rtol=0, atol=5e-6, msg=n)


def _train_sft(make_model, feats, tokenizer, tmp_path, ga):
    """(trained model, an untouched copy of it, its initial weights, trainer): one epoch of batch 4 x `ga`."""
    model = make_model("full")
    untouched, init = copy.deepcopy(model), _trainable(model)
    trainer = SFTTrainer(model, _args(tmp_path, 4, ga, num_train_epochs=1, max_steps=-1), train_dataset=feats,
                         data_collator=SFTCollator(tokenizer.pad_token_id))
    trainer.train()
    return model, untouched, init, trainer


def test_sft_ragged_micro_batches_give_the_one_batch_update(make_model, sft_feats, tokenizer, tmp_path):
    """10 examples, batch 4, accumulation 3: micro-batches of 4, 4 and 2 examples holding very different token
    counts, one optimizer step. It must equal one backward of the token mean over all 10 examples."""
    model, init_model, init, trainer = _train_sft(make_model, sft_feats, tokenizer, tmp_path, 3)
    assert trainer.state.global_step == 1
    ref_loss = _sft_reference_step(init_model, sft_feats)
    _assert_same(_trainable(model), _trainable(init_model), init)
    (row,) = [r for r in trainer.state.log_history if "loss" in r]
    assert row["loss"] == pytest.approx(ref_loss, rel=1e-5)
    # guard: averaging the three micro-batches' own token means (per-micro-batch normalisation) moves the weights
    # elsewhere, far beyond the tolerance
    naive = copy.deepcopy(init_model)
    for n, p in naive.named_parameters():
        p.data.copy_(init[n])
    parts = [torch.cat([-_token_logps(naive, f["input_ids"], f["completion_mask"]) for f in part]).mean()
             for part in (sft_feats[:4], sft_feats[4:8], sft_feats[8:])]
    _sgd(naive, sum(parts) / 3)
    assert max(float((_trainable(naive)[n] - _trainable(model)[n]).abs().max()) for n in init) > 1e-4


def test_sft_partial_last_accumulation_is_stepped_on_its_own_items(make_model, sft_feats, tokenizer, tmp_path):
    """10 examples, batch 4, accumulation 2, one epoch: 3 micro-batches, so the second optimizer step has one
    micro-batch (2 examples). It is stepped (not dropped), normalised over its own tokens, and the log says 2
    steps, epoch 1.0, and each step's own loss."""
    model, ref, init, trainer = _train_sft(make_model, sft_feats, tokenizer, tmp_path, 2)
    losses = [_sft_reference_step(ref, sft_feats[:8]), _sft_reference_step(ref, sft_feats[8:])]
    _assert_same(_trainable(model), _trainable(ref), init)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.global_step == 2 and [r["step"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-5)
    assert rows[-1]["epoch"] == pytest.approx(1.0)


BETA = 0.1


def _dpo_losses(policy, reference, feats) -> torch.Tensor:
    """Per-pair sigmoid DPO losses, -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), sequence log-probs
    summed over completion tokens, one unpadded row at a time (plain torch)."""
    def seq(model, f, side):
        return _token_logps(model, f[f"{side}_input_ids"], f[f"{side}_completion_mask"]).sum()

    out = []
    for f in feats:
        with torch.no_grad():
            ref_c, ref_r = seq(reference, f, "chosen"), seq(reference, f, "rejected")
        margin = (seq(policy, f, "chosen") - ref_c) - (seq(policy, f, "rejected") - ref_r)
        out.append(-torch.nn.functional.logsigmoid(BETA * margin))
    return torch.stack(out)


def _dpo_trainer(model, feats, tokenizer, tmp_path, bs, ga):
    return PreferenceTrainer(model, _args(tmp_path, bs, ga, num_train_epochs=1, max_steps=-1), beta=BETA,
                             train_dataset=feats, data_collator=PreferenceCollator(tokenizer.pad_token_id))


def test_dpo_ragged_micro_batches_give_the_per_pair_mean_update(make_model, pref_feats, tokenizer, tmp_path):
    """DPO: 10 pairs, batch 4, accumulation 3 (micro-batches of 4, 4, 2 pairs), one optimizer step: the mean over
    all 10 pairs' losses, one backward, one SGD step. Then the same pairs in one epoch of batch 4 x accumulation 2:
    two steps, the second (one micro-batch of 2 pairs, the partial accumulation) stepped on its own mean."""
    model = make_model("full")
    frozen = copy.deepcopy(model).eval()
    init = _trainable(model)
    ref = copy.deepcopy(model)
    trainer = _dpo_trainer(model, pref_feats, tokenizer, tmp_path / "a", 4, 3)
    trainer.train()
    assert trainer.state.global_step == 1
    loss = _sgd(ref, _dpo_losses(ref, frozen, pref_feats).mean())
    _assert_same(_trainable(model), _trainable(ref), init)
    (row,) = [r for r in trainer.state.log_history if "loss" in r]
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    # guard: the mean of the micro-batches' own means (4, 4, 2 pairs) is another update
    naive = copy.deepcopy(frozen).train()
    _sgd(naive, sum(_dpo_losses(naive, frozen, part).mean() for part in (pref_feats[:4], pref_feats[4:8],
                                                                           pref_feats[8:])) / 3)
    assert max(float((_trainable(naive)[n] - _trainable(model)[n]).abs().max()) for n in init) > 1e-4

    model = make_model("full")
    ref = copy.deepcopy(model)
    trainer = _dpo_trainer(model, pref_feats, tokenizer, tmp_path / "b", 4, 2)
    trainer.train()
    losses = [_sgd(ref, _dpo_losses(ref, frozen, pref_feats[:8]).mean()),
              _sgd(ref, _dpo_losses(ref, frozen, pref_feats[8:]).mean())]
    _assert_same(_trainable(model), _trainable(ref), init)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.global_step == 2 and [r["step"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-5)
    assert rows[-1]["epoch"] == pytest.approx(1.0)


def _chosen_nll_sum(policy, feats) -> tuple[torch.Tensor, int]:
    """(the chosen completions' summed NLL over `feats`, their token count): plain torch, one row at a time."""
    nll = torch.cat([-_token_logps(policy, f["chosen_input_ids"], f["chosen_completion_mask"]) for f in feats])
    return nll.sum(), nll.numel()


@pytest.mark.parametrize("padding_free", [False, True])
def test_dpo_plus_nll_is_the_step_token_mean_under_accumulation(padding_free, make_model, pref_feats, tokenizer,
                                                                 tmp_path):
    """["sigmoid", "sft"] (TRL's rpo_alpha mixture), 4 pairs as batch 2 x accumulation 2, one step: the update of
    mean_i DPO_i + sum_i NLL_i / sum_i |y_w,i| over all 4 pairs (the step's token mean, as batch 4 x 1 gives).
    Before, each micro-batch scaled its NLL by its own N / T, so the NLL term was the mean of the two micro-batches'
    token means (chosen completions of ~1 and ~20 tokens in the first, ~2 and ~20 in the second): another update."""
    feats = pref_feats[:4]
    model = make_model("full")
    frozen = copy.deepcopy(model).eval()
    init, ref = _trainable(model), copy.deepcopy(model)
    trainer = PreferenceTrainer(model, _args(tmp_path, 2, 2, num_train_epochs=1, max_steps=-1), beta=BETA,
                                loss_type=["sigmoid", "sft"], padding_free=padding_free, train_dataset=feats,
                                data_collator=PreferenceCollator(tokenizer.pad_token_id))
    trainer.train()
    assert trainer.state.global_step == 1
    nll, tokens = _chosen_nll_sum(ref, feats)
    loss = _sgd(ref, _dpo_losses(ref, frozen, feats).mean() + nll / tokens)
    _assert_same(_trainable(model), _trainable(ref), init)
    (row,) = [r for r in trainer.state.log_history if "loss" in r]
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    # guard: the mean of the two micro-batches' token means is another update, beyond the tolerance
    naive = copy.deepcopy(frozen).train()
    parts = [_chosen_nll_sum(naive, part) for part in (feats[:2], feats[2:])]
    _sgd(naive, _dpo_losses(naive, frozen, feats).mean() + sum(s / n for s, n in parts) / 2)
    assert max(float((_trainable(naive)[n] - _trainable(model)[n]).abs().max()) for n in init) > 1e-4
