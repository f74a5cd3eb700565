"""Shared-prompt layout (`share_prompt=True`): each preference pair runs as one row (chosen, then the rejected tokens
after the common prefix) with a mask hiding the chosen tokens from the rejected ones. Checked against the layout
derived by hand, and the log-probs / rewards and their gradients against each sequence run ALONE through the
transformers model (its own LM head / classifier pooling), not against alignkit's padded path."""

from __future__ import annotations

import pytest
import torch

from alignkit.adapters import unwrap_lm
from alignkit.data import PreferenceCollator, RankedCollator
from alignkit.data.collators import SharedPromptCollator, shared_prefix_layout, shared_prompt_layout
from alignkit.settings import ConfigError, load_config
from alignkit.trainers import PreferenceTrainer, RewardTrainer
from alignkit.trainers.logps import completion_logps, shared_attention_mask
from alignkit.trainers.reward import sequence_rewards

from tests.adapters.table import REFT_KINDS

from .conftest import fast_args


def test_layout_by_hand():
    # pair 0: chosen 5 6 7 8, rejected 5 6 9 (common prefix 2); pair 1: chosen 5 7 is a prefix of rejected 5 7 3 4
    ids = torch.tensor([[5, 6, 7, 8], [5, 7, 0, 0], [5, 6, 9, 0], [5, 7, 3, 4]])
    att = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    out = shared_prompt_layout(ids, att, pad_token_id=0)
    assert out["shared_input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 3, 4, 0]]
    assert out["shared_position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    # -1 prefix, 0 the chosen tokens after it, 1 the rejected ones, -2 padding
    assert out["shared_segment_ids"].tolist() == [[-1, -1, 0, 0, 1], [-1, -1, 1, 1, -2]]
    # chosen0 -> 0..3; chosen1 -> row 1 (offset 5), padding -> its first token; rejected0: 5 6 at 0 1, 9 at 4
    assert out["shared_index"].tolist() == [[0, 1, 2, 3], [5, 6, 5, 5], [0, 1, 4, 0], [5, 6, 7, 8]]
    m = shared_attention_mask(out["shared_segment_ids"], "sdpa", torch.float32)[:, 0].int()
    assert m[0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                             [1, 1, 0, 0, 1]]  # the rejected token 9 sees the prompt and itself, not 7 8
    assert m[1].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                             [1, 0, 0, 0, 0]]  # nothing to hide (chosen is the prefix); padding query -> token 0
    e = shared_attention_mask(out["shared_segment_ids"], "eager", torch.float32)
    assert bool(((e == 0) == m[:, None].bool()).all()) and float(e.min()) == torch.finfo(torch.float32).min


def test_groups_of_three_by_hand():
    # rows of two prompts, group-major as the online trainers order samples: 1 2 | 3, 1 2 | 4 5, 1 | 9 ; 7 | 8
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5], [1, 9, 0, 0], [7, 8, 0, 0]])
    att = (ids != 0).long()
    out = shared_prefix_layout(ids, att, torch.tensor([0, 0, 0, 1]))
    # group 0: common prefix "1" (P = 1), then 2 3 | 2 4 5 | 9; group 1: one member, all of it prefix
    assert out["shared_input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 9], [7, 8, 0, 0, 0, 0, 0]]
    assert out["shared_position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 1], [0, 1, 0, 0, 0, 0, 0]]
    assert out["shared_segment_ids"].tolist() == [[-1, 0, 0, 1, 1, 1, 2], [-1, -1, -2, -2, -2, -2, -2]]
    assert out["shared_index"].tolist() == [[0, 1, 2, 0], [0, 3, 4, 5], [0, 6, 0, 0], [7, 8, 7, 7]]
    m = shared_attention_mask(out["shared_segment_ids"], "sdpa", torch.float32)[0, 0].int()
    assert m[6].tolist() == [1, 0, 0, 0, 0, 0, 1]  # "9" (member 2) sees the prefix "1" and itself only
    assert m[5].tolist() == [1, 0, 0, 1, 1, 1, 0]  # "5" (member 1) sees "1" and its own 2 4 5


def test_left_padding_and_odd_rows_are_refused():
    ids, att = torch.tensor([[0, 5], [5, 6]]), torch.tensor([[0, 1], [1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        shared_prompt_layout(ids, att, 0)
    with pytest.raises(ValueError, match="2B preference layout"):
        shared_prompt_layout(ids[:1], att[:1], 0)


def _sequences(feats):
    """Every (input_ids, completion_mask) of the features, chosen then rejected, as the collator orders them."""
    return ([(f["chosen_input_ids"], f["chosen_completion_mask"]) for f in feats]
            + [(f["rejected_input_ids"], f["rejected_completion_mask"]) for f in feats])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_logps_and_grads_match_each_sequence_alone(kind, attn, make_model, features, tokenizer):
    feats = features["preference"][:5]
    model = make_model(kind)
    unwrap_lm(model).set_attn_implementation(attn)
    model.eval()
    batch = SharedPromptCollator(PreferenceCollator(tokenizer.pad_token_id))(feats)
    assert batch["shared_input_ids"].numel() < batch["input_ids"].numel()  # the prompts are shared
    model.zero_grad()
    logps, counts = completion_logps(model, batch)
    logps.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # reference: one sequence at a time, the model's own full logits, log_softmax by hand
    model.zero_grad()
    ref = []
    for ids, cm in _sequences(feats):
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()  # (n-1, V)
        lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
        ref.append((lp * torch.tensor(cm[1:], dtype=lp.dtype)).sum())
    torch.stack(ref).sum().backward()
    torch.testing.assert_close(logps, torch.stack(ref).detach(), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [sum(cm[1:]) for _, cm in _sequences(feats)]
    assert got and got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_rewards_match_each_sequence_alone(kind, make_model, features, tokenizer):
    feats = features["preference"][:5]
    model = make_model(kind, classifier=True)
    model.eval()
    batch = SharedPromptCollator(PreferenceCollator(tokenizer.pad_token_id))(feats)
    model.zero_grad()
    r = sequence_rewards(model, batch)  # (2B,)
    (r * torch.arange(1.0, r.numel() + 1)).sum().backward()  # distinct weights: a row mix-up changes the gradient
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = torch.stack([model(input_ids=torch.tensor([ids])).logits[0, 0].float() for ids, _ in _sequences(feats)])
    (ref * torch.arange(1.0, ref.numel() + 1)).sum().backward()
    torch.testing.assert_close(r, ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_trainers_swap_the_collator_and_refuse_other_layouts(make_model, features, tokenizer, tmp_path):
    feats = features["preference"][:4]
    pid = tokenizer.pad_token_id
    t = PreferenceTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=feats,
                          data_collator=PreferenceCollator(pid), share_prompt=True)
    assert isinstance(t.data_collator, SharedPromptCollator)
    t.train()  # reference = adapter off, through the same shared rows
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.state.log_history if "loss" in h)
    with pytest.raises(ValueError, match="two different layouts"):
        PreferenceTrainer(make_model("full"), fast_args(tmp_path), train_dataset=feats,
                          data_collator=PreferenceCollator(pid), share_prompt=True, padding_free=True)
    rm = RewardTrainer(make_model("full", classifier=True), fast_args(tmp_path), train_dataset=feats,
                       data_collator=PreferenceCollator(pid), share_prompt=True)
    assert isinstance(rm.data_collator, SharedPromptCollator)
    with pytest.raises(ValueError, match="not ranked ones"):
        SharedPromptCollator(RankedCollator(pid), pid)(features["ranked"][:2])
    reft = make_model("reft")
    with pytest.raises(ValueError, match="does not support ReFT"):
        completion_logps(reft, SharedPromptCollator(PreferenceCollator(pid))(feats))


@pytest.mark.parametrize("kind", REFT_KINDS)
@pytest.mark.parametrize("trainer, layout", [("dpo", "share_prompt"), ("rm", "share_prompt"), ("rm", "padding_free")])
def test_trainers_refuse_a_layout_reft_cannot_run_when_built(kind, trainer, layout, make_model, features, tokenizer,
                                                             tmp_path):
    """PreferenceTrainer / RewardTrainer built in Python with share_prompt=True (or a reward model with
    padding_free=True) and a ReFT adapter were built, and the run stopped at its first step with a ValueError; the
    CLI refused the same config when it was loaded. Now the trainer refuses when built, with the CLI's check and
    message (the key without `train.`)."""
    cls = PreferenceTrainer if trainer == "dpo" else RewardTrainer
    overrides = [f"adapter.kind={kind}", "adapter.reft.positions=f1+l1",
                 "adapter.reft.config.representations=[{layer: 0, low_rank_dimension: 2}]", f"train.{layout}=true"]
    with pytest.raises(ConfigError) as cli:
        load_config(None, ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", *overrides],
                    command=trainer)
    assert str(cli.value).startswith(f"train.{layout}: true does not run a ReFT"), cli.value
    with pytest.raises(ConfigError) as built:
        cls(make_model(kind, classifier=trainer == "rm"), fast_args(tmp_path), train_dataset=features["preference"][:4],
            data_collator=PreferenceCollator(tokenizer.pad_token_id), **{layout: True})
    assert str(built.value) == str(cli.value)[len("train."):]


@pytest.mark.parametrize("layout", ["share_prompt", "padding_free"])
@pytest.mark.parametrize("data", ["collator", "features", "records"])
def test_reward_trainer_refuses_a_pair_layout_for_ranked_data_when_built(layout, data, make_model, features, collators,
                                                                        tokenizer, tmp_path):
    """RewardTrainer built in Python on ranked data (a RankedCollator, tokenized ranked examples, or raw
    RankedRecords) with share_prompt=True / padding_free=True was built, and the run stopped at its first step
    (share_prompt: the collator's ValueError; padding_free: PackedPreferenceCollator on K-reply examples); the CLI
    refused method.ranked with the layout when loaded. Now the trainer refuses when built, with the CLI's check."""
    from tests.trainers.conftest import GOOD, BAD, PROMPTS
    from alignkit.data import RankedRecord
    kw = {"collator": {"train_dataset": features["ranked"], "data_collator": collators["ranked"]},
          "features": {"train_dataset": features["ranked"]},
          "records": {"train_dataset": [RankedRecord(p, [g, b], id=f"r{i}")
                                        for i, (p, g, b) in enumerate(zip(PROMPTS, GOOD, BAD))],
                      "processing_class": tokenizer}}[data]
    with pytest.raises(ConfigError) as cli:
        load_config(None, ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl",
                           "method.ranked=true", f"train.{layout}=true"], command="rm")
    assert str(cli.value).startswith(f"train.{layout}: true lays out chosen / rejected pairs, and method.ranked")
    with pytest.raises(ConfigError, match=f"^{layout}: true lays out chosen / rejected pairs, and the data"):
        RewardTrainer(make_model("full", classifier=True), fast_args(tmp_path), **kw, **{layout: True})
