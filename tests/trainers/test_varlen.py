"""Padding-free rows on sdpa through `alignkit.models.varlen` (one packed row, linear layers on real tokens, the
attention kernel on the padded sequences), and the SFT / DPO trainers' `padding_free=None` default that uses it.

Every value is checked against the padded batch run through transformers' own sdpa attention (the independent
computation), with a bound on the float-rounding difference."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import PreferenceCollator, SFTCollator
from alignkit.data.collators import PackedPreferenceCollator, PackedSFTCollator, SharedPromptCollator
from alignkit.models import varlen
from alignkit.trainers import PreferenceTrainer, SFTTrainer
from alignkit.trainers.logps import completion_token_logps, forward_kwargs

from .conftest import fast_args

# Float rounding only: a packed row changes matmul shapes and uses the causal kernel instead of a masked one.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def count_varlen(monkeypatch):
    """Counts calls of the varlen attention function (through the real one), in every layer: the last layer runs in
    full (`alignkit.models.last_layer` off; tests/models/test_last_layer.py checks it)."""
    from transformers import AttentionInterface

    from alignkit.models import last_layer

    monkeypatch.setattr(last_layer, "ENABLED", False)
    varlen.register()
    calls = []

    def counting(module, query, key, value, attention_mask, **kw):
        calls.append(attention_mask is None and isinstance(kw.get(varlen.LAYOUT_KEY), varlen.VarlenLayout))
        return varlen.varlen_sdpa_attention(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, varlen.VARLEN_SDPA, counting)
    return calls


def test_layout_by_hand():
    """Lengths 3, 1, 2 packed back to back: columns [0, 3), [3, 4), [4, 6)."""
    lay = varlen.varlen_layout(torch.tensor([3, 1, 2]))
    assert lay.calls == ((((0, 3),), 0), (((3, 4),), 0), (((4, 6),), 0)) and lay.length == 6
    # groups (prefix 2, members of 3 and 1 own tokens), (prefix 1, one member of 2): member 1 of group 0 attends
    # over the prefix columns [0, 2) and its own [5, 6), keeping the outputs from its 3rd query on
    shared = varlen.shared_varlen_layout([(2, [3, 1]), (1, [2])])
    assert shared.calls == ((((0, 5),), 0), (((0, 2), (5, 6)), 2), (((6, 9),), 0)) and shared.length == 9


def test_attention_by_hand():
    """Two sequences in one row: each token's output is softmax attention over its own sequence's earlier tokens,
    written out here with explicit matmuls (one head, no GQA)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=g) for _ in range(3))
    out, _ = varlen.varlen_sdpa_attention(None, q, k, v, None, scaling=0.5,
                                          alignkit_varlen=varlen.varlen_layout([2, 3]))  # (1, 5, 1, 4)
    for a, b in ((0, 2), (2, 5)):
        for t in range(a, b):
            w = torch.softmax((q[0, 0, t] @ k[0, 0, a:t + 1].T) * 0.5, -1)
            torch.testing.assert_close(out[0, t, 0], w @ v[0, 0, a:t + 1], rtol=1e-5, atol=1e-6)


def test_segments_by_hand():
    """The row cut at every call's range ends, and per call its key and query segments: the shared layout above
    (cuts 0, 2, 5, 6, 9) gives segments of 2, 3, 1, 3 columns; member 1 of group 0 keys on segments 0 and 2 and
    queries segment 2 only (the outputs it keeps)."""
    shared = varlen.shared_varlen_layout([(2, [3, 1]), (1, [2])])
    assert shared.segments == ([2, 3, 1, 3], (((0, 1), (0, 1)), ((0, 2), (2,)), ((3,), (3,))))
    assert varlen.varlen_layout([3, 1, 2]).segments == ([3, 1, 2], (((0,), (0,)), ((1,), (1,)), ((2,), (2,))))
    m = shared.suffix_mask(2, 3, torch.device("cpu"))  # 2 queries after 3 earlier keys: j <= 3 + i
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError, match="keeps its outputs from query 1"):
        varlen.VarlenLayout(((((0, 2), (3, 4)), 1),), 4).segments


def test_shared_attention_by_hand():
    """A shared-prompt row (prefix 2, members of 2 and 3 own tokens; then a plain sequence of 2) with GQA (4 query
    heads over 2 key/value heads): member 1's tokens attend over the prefix and their own earlier tokens, never
    over member 0's; written out with explicit matmuls per head."""
    g = torch.Generator().manual_seed(1)
    lay = varlen.shared_varlen_layout([(2, [2, 3]), (0, [2])])  # columns: prefix 0-1, member 0 2-3, member 1 4-6, 7-8
    q = torch.randn(1, 4, 9, 4, generator=g)
    k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(2))
    out, _ = varlen.varlen_sdpa_attention(None, q, k, v, None, scaling=0.5, alignkit_varlen=lay)  # (1, 9, 4, 4)
    seen = {t: list(range(0, t + 1)) for t in range(4)}  # prefix + member 0: causal over columns 0..t
    seen.update({t: [0, 1] + list(range(4, t + 1)) for t in range(4, 7)})  # member 1: prefix, then its own
    seen.update({t: list(range(7, t + 1)) for t in range(7, 9)})
    for t, cols in seen.items():
        for h in range(4):
            kv = h // 2
            w = torch.softmax((q[0, h, t] @ k[0, kv, cols].T) * 0.5, -1)
            torch.testing.assert_close(out[0, t, h], w @ v[0, kv, cols], rtol=1e-5, atol=1e-6)


def _logps_and_grads(model, batch):
    model.zero_grad()
    token, mask = completion_token_logps(model, batch)
    (-(token * mask).sum()).backward()
    return token.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_varlen_row_equals_padded(arch, make_model, features, tokenizer, count_varlen):
    """Token log-probs and gradients of a packed row (varlen attention, one call per layer) vs the padded batch."""
    feats = features["sft"][:5]
    model = make_model("full", arch=arch)
    model.eval()
    padded = _logps_and_grads(model, SFTCollator(tokenizer.pad_token_id)(feats))
    assert not count_varlen
    packed_batch = PackedSFTCollator(None)(feats)
    assert varlen.LAYOUT_KEY in forward_kwargs(model, packed_batch)
    packed = _logps_and_grads(model, packed_batch)
    n_layers = model.config.num_hidden_layers
    assert count_varlen == [True] * n_layers  # the varlen function ran in every layer, with the layout, no mask
    assert torch.equal(padded[1], packed[1])
    torch.testing.assert_close(packed[0], padded[0], rtol=RTOL, atol=ATOL)
    assert padded[2].keys() == packed[2].keys() and padded[2]
    for n in padded[2]:
        torch.testing.assert_close(packed[2][n], padded[2][n], rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_falls_back_to_the_block_diagonal_mask(make_model, features, tokenizer, count_varlen):
    """Under activation checkpointing the recomputation runs after the forward, so no varlen layout is passed;
    transformers' own block-diagonal mask gives the same values."""
    feats = features["sft"][:4]
    model = make_model("full")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = PackedSFTCollator(None)(feats)
    assert not varlen.usable(model) and varlen.LAYOUT_KEY not in forward_kwargs(model, batch)
    packed = _logps_and_grads(model, batch)
    assert not count_varlen
    padded = _logps_and_grads(model, SFTCollator(tokenizer.pad_token_id)(feats))
    torch.testing.assert_close(packed[0], padded[0], rtol=RTOL, atol=ATOL)


def test_attention_without_layout_refuses(tiny_lm):
    model = tiny_lm("llama")
    ids = torch.tensor([[5, 6, 7]])
    with varlen.varlen_attention(model), pytest.raises(RuntimeError, match="no `alignkit_varlen` layout"):
        model(input_ids=ids, use_cache=False)
    assert model.config._attn_implementation == "sdpa"  # restored


def _losses(trainer):
    logged = []
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            logged.append(row["loss"])
    return logged


def test_sft_default_is_padding_free_and_trains_as_padded(make_model, features, tokenizer, tmp_path):
    """SFTTrainer's default packs (sdpa, alignkit's collator); a 3-step run gives the padded run's losses and
    weights up to rounding. Explicit False, activation checkpointing and a foreign collator keep padded batches."""
    feats = features["sft"]
    runs = {}
    for pf in (None, False):
        model = make_model("lora")
        t = SFTTrainer(model, fast_args(tmp_path / str(pf), max_steps=3), train_dataset=feats,
                       data_collator=SFTCollator(tokenizer.pad_token_id), padding_free=pf)
        assert t.padding_free is (pf is None)
        assert isinstance(t.data_collator, PackedSFTCollator if pf is None else SFTCollator)
        runs[pf] = (_losses(t), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(runs[None][0]) == 3
    for a, b in zip(runs[None][0], runs[False][0]):
        assert a == pytest.approx(b, rel=1e-5)
    for n, p in runs[False][1].items():
        torch.testing.assert_close(runs[None][1][n], p, rtol=1e-4, atol=1e-6, msg=n)
    ckpt = SFTTrainer(make_model("lora"), fast_args(tmp_path / "c", activation_checkpointing=True), train_dataset=feats,
                      data_collator=SFTCollator(tokenizer.pad_token_id))
    assert not ckpt.padding_free and isinstance(ckpt.data_collator, SFTCollator)
    other = SFTTrainer(make_model("lora"), fast_args(tmp_path / "o"), train_dataset=feats,
                       data_collator=lambda fs: SFTCollator(tokenizer.pad_token_id)(fs))
    assert not other.padding_free


# (share_prompt, padding_free) -> the collator a DPO / RM trainer ends up with
LAYOUTS = {(None, None): SharedPromptCollator, (None, True): PackedPreferenceCollator,
           (False, None): PackedPreferenceCollator, (False, False): PreferenceCollator}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dpo_default_shares_the_prompt_and_trains_as_padded(kind, make_model, features, tokenizer, tmp_path,
                                                             count_varlen):
    """DPO's default layout is shared-prompt rows through varlen attention; every layout's 2-step run gives the
    padded run's losses."""
    feats = features["preference"]
    runs = {}
    for (sp, pf), cls in LAYOUTS.items():
        model = make_model(kind)
        t = PreferenceTrainer(model, fast_args(tmp_path / f"{sp}{pf}", max_steps=2), beta=0.5, train_dataset=feats,
                              data_collator=PreferenceCollator(tokenizer.pad_token_id), padding_free=pf,
                              share_prompt=sp)
        assert type(t.data_collator) is cls
        runs[(sp, pf)] = _losses(t)
        if cls is SharedPromptCollator:
            assert count_varlen and all(count_varlen)  # the shared rows ran through varlen attention
    for key in LAYOUTS:
        for a, b in zip(runs[key], runs[(False, False)], strict=True):
            assert a == pytest.approx(b, rel=1e-5)
    reft = PreferenceTrainer(make_model("reft+lora"), fast_args(tmp_path / "r"), train_dataset=feats,
                             data_collator=PreferenceCollator(tokenizer.pad_token_id))
    assert not reft.share_prompt and reft.padding_free  # ReFT: packed sequences, not shared rows


def test_packed_rewards_equal_the_padded_classifier(make_model, features, tokenizer):
    """Each packed sequence's reward = the classifier's own output on the padded batch (its pooling at the rightmost
    non-pad token), also for a sequence that ends in pad tokens; gradients too."""
    from alignkit.trainers.reward import sequence_rewards

    model = make_model("full", classifier=True)
    model.eval()
    pad = model.config.pad_token_id
    assert pad is not None
    feats = [dict(f) for f in features["preference"][:3]]
    feats[1]["rejected_input_ids"] = feats[1]["rejected_input_ids"] + [pad, pad]  # pools before its own pads
    feats[1]["rejected_completion_mask"] = feats[1]["rejected_completion_mask"] + [1, 1]
    out = []
    for batch in (PreferenceCollator(pad)(feats), PackedPreferenceCollator(None, pad)(feats)):
        model.zero_grad()
        r = sequence_rewards(model, batch)
        r.sum().backward()
        out.append((r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=RTOL, atol=ATOL)
    for n in out[0][1]:
        torch.testing.assert_close(out[1][1][n], out[0][1][n], rtol=1e-4, atol=1e-6, msg=n)
    # by hand for the padded sequence: the classifier on that sequence alone without its trailing pads
    ids = torch.tensor([feats[1]["rejected_input_ids"][:-2]])
    with torch.no_grad():
        alone = model(input_ids=ids).logits[0, 0]
    assert float(out[1][0][4]) == pytest.approx(float(alone), rel=1e-5, abs=1e-6)


def test_rm_default_shares_the_prompt_and_trains_as_padded(make_model, features, tokenizer, tmp_path):
    from alignkit.trainers import RewardTrainer

    feats = features["preference"]
    runs = {}
    for (sp, pf), cls in LAYOUTS.items():
        model = make_model("lora", classifier=True)
        t = RewardTrainer(model, fast_args(tmp_path / f"{sp}{pf}", max_steps=2), train_dataset=feats,
                          data_collator=PreferenceCollator(tokenizer.pad_token_id), padding_free=pf, share_prompt=sp)
        assert type(t.data_collator) is cls
        runs[(sp, pf)] = _losses(t)
    for key in LAYOUTS:
        for a, b in zip(runs[key], runs[(False, False)], strict=True):
            assert a == pytest.approx(b, rel=1e-5)
    reft = RewardTrainer(make_model("reft", classifier=True), fast_args(tmp_path / "r"), train_dataset=feats,
                         data_collator=PreferenceCollator(tokenizer.pad_token_id))
    assert not reft.padding_free and not reft.share_prompt  # ReFT classifiers keep padded rows


def test_shared_rows_pick_varlen_only_when_padded(make_model, count_varlen):
    """Shared rows with more than SHARED_VARLEN_MIN_PADDING padding run through varlen attention, rows of equal
    length as padded rows with their 4D mask; both give each sequence's log-probs run alone."""
    from alignkit.data.collators import SharedPromptCollator
    from alignkit.trainers.logps import SHARED_VARLEN_MIN_PADDING, completion_logps, shared_padding

    model = make_model("full")
    model.eval()

    def pair(n_prompt, n_chosen, n_rejected, base):
        p = list(range(base, base + n_prompt))
        c, r = list(range(40, 40 + n_chosen)), list(range(60, 60 + n_rejected))
        return {"chosen_input_ids": p + c, "chosen_completion_mask": [0] * n_prompt + [1] * n_chosen,
                "rejected_input_ids": p + r, "rejected_completion_mask": [0] * n_prompt + [1] * n_rejected}

    collate = SharedPromptCollator(PreferenceCollator(0), 0)
    even = collate([pair(4, 3, 3, 5), pair(4, 3, 3, 15)])
    ragged = collate([pair(2, 1, 1, 5), pair(9, 8, 7, 15)])
    assert shared_padding(even) == 0.0 and shared_padding(ragged) > SHARED_VARLEN_MIN_PADDING
    for batch, via_varlen in ((even, False), (ragged, True)):
        count_varlen.clear()
        with torch.no_grad():
            got, _ = completion_logps(model, batch)
            alone = torch.stack([completion_logps(model, {"input_ids": batch["input_ids"][i:i + 1, :int(n)],
                                                          "completion_mask": batch["completion_mask"][i:i + 1, :int(n)]})[0][0]
                                 for i, n in enumerate(batch["attention_mask"].sum(-1))])
        assert bool(count_varlen) is via_varlen
        torch.testing.assert_close(got, alone, rtol=RTOL, atol=ATOL)


def test_layout_defaults_are_cpu_only(make_model):
    """padding_free=None / share_prompt=None pack only when training on CPU (measured there); explicit values win."""
    from types import SimpleNamespace

    from alignkit.trainers.packing import resolve_padding_free, resolve_share_prompt

    model = make_model("full")
    cpu = SimpleNamespace(device=torch.device("cpu"), activation_checkpointing=False)
    gpu = SimpleNamespace(device=torch.device("cuda", 0), activation_checkpointing=False)
    assert resolve_padding_free(None, model, cpu, None, paired=False)
    assert resolve_share_prompt(None, None, model, cpu, None)
    assert not resolve_padding_free(None, model, gpu, None, paired=False)
    assert not resolve_share_prompt(None, None, model, gpu, None)
    assert resolve_padding_free(True, model, gpu, None, paired=False) and resolve_share_prompt(True, None, model, gpu, None)


def test_neftune_keeps_padded_batches_and_refuses_the_longer_rows(make_model, features, tokenizer, tmp_path):
    """NEFTune's noise is uniform in +-alpha / sqrt(row length x width) (transformers' hook, compat row T34): a packed
    row of B sequences (or a pair's shared-prompt row) is longer than the padded batch's rows, so the CPU default
    layouts gave the embeddings about sqrt(B) times less noise than neftune_noise_alpha asks for, without a word.
    Now the defaults keep padded batches under NEFTune (SFT, DPO), and an explicit padding_free / share_prompt true
    is refused when the trainer is built, naming both keys."""
    from alignkit.settings import ConfigError

    pad = tokenizer.pad_token_id
    args = fast_args(tmp_path, neftune_noise_alpha=5.0)
    sft = SFTTrainer(make_model("lora"), args, train_dataset=features["sft"], data_collator=SFTCollator(pad))
    assert not sft.padding_free and type(sft.data_collator) is SFTCollator
    dpo = PreferenceTrainer(make_model("lora"), args, train_dataset=features["preference"],
                            data_collator=PreferenceCollator(pad))
    assert not dpo.padding_free and not dpo.share_prompt and type(dpo.data_collator) is PreferenceCollator
    noise = r"neftune_noise_alpha=5 scales its noise by 1/sqrt\(row length x width\)"
    with pytest.raises(ConfigError, match=rf"^train.padding_free: true puts .*{noise}"):
        SFTTrainer(make_model("lora"), args, train_dataset=features["sft"], data_collator=SFTCollator(pad),
                   padding_free=True)
    for key in ("padding_free", "share_prompt"):
        with pytest.raises(ConfigError, match=rf"^train.{key}: true puts .*{noise}"):
            PreferenceTrainer(make_model("lora"), args, train_dataset=features["preference"],
                              data_collator=PreferenceCollator(pad), **{key: True})
    plain = SFTTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["sft"],
                       data_collator=SFTCollator(pad))
    assert plain.padding_free  # without NEFTune the CPU default still packs
