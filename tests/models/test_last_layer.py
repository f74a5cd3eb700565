"""The last decoder layer on the read positions only (`alignkit.models.last_layer`).

Reference throughout: the same forward with the layer in full (the model's own code, `ENABLED` off). Checked for
every layout the trainers hand the model (padded rows, rows without padding, a custom 4D mask, one packed varlen
row, shared-prompt varlen rows), Llama and Qwen2: the states at the read positions and the gradients of a loss
on them agree to float rounding; the unread positions are zero (so the partial layer really ran); the losses
and rewards of the trainers' own paths (SFT / DPO log-probs, reward models' padded, packed and shared paths)
agree; where something else sees the last layer (a hook, hidden states asked for, a KV cache, another layer
class) the layer runs in full."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import PreferenceCollator, PreferenceRecord, SFTCollator, SFTRecord, tokenize_records
from alignkit.data.collators import PackedPreferenceCollator, PackedSFTCollator, SharedPromptCollator
from alignkit.models import last_layer, varlen
from alignkit.models.loading import load_model
from alignkit.trainers.logps import backbone_output, completion_token_logps, shared_attention_mask
from alignkit.trainers.reward import sequence_rewards
from tests.trainers.conftest import BAD, GOOD, PROMPTS

RTOL, ATOL = 1e-5, 1e-6


def close_grads(got, want, what):
    """Gradients agree to float rounding of their largest entry (sums over other matmul shapes)."""
    scale = max(float(want.abs().max()), 1e-6)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5 * scale, f"{what}: max |difference| {diff:.3g} vs max |gradient| {scale:.3g}"


@pytest.fixture(params=["llama", "qwen2"])
def lm(request, tiny_dir):
    torch.manual_seed(0)
    return load_model(tiny_dir(request.param, num_layers=3)).train()


def _layouts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 200, (3, 9), generator=g)
    padded = ids.clone()
    padded[1, 6:] = 0
    padded[2, 4:] = 0
    lengths = [5, 3, 6]
    packed = torch.randint(5, 200, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    # shared rows: prefix of 3, members of 2 and 3 own tokens; then prefix 2, one member of 2
    seg = torch.tensor([[-1, -1, -1, 0, 0, 1, 1, 1], [-1, -1, 0, 0, -2, -2, -2, -2]])
    spos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 0, 0, 0, 0]])
    sids = torch.randint(5, 200, (2, 8), generator=g)
    groups = [(3, [2, 3]), (2, [2])]
    flat_ids = sids[seg != -2][None]
    flat_pos = spos[seg != -2][None]
    return {
        "padded": ({"input_ids": padded, "attention_mask": (padded != 0).long()}, [1, 8, 9, 14, 18, 21]),
        "unpadded": ({"input_ids": ids}, [0, 4, 8, 13, 26]),
        "custom 4D": ({"input_ids": sids, "position_ids": spos,
                       "attention_mask": shared_attention_mask(seg, "sdpa", torch.float32)}, [2, 4, 7, 9, 11]),
        "varlen": ({"input_ids": packed, "position_ids": pos, varlen.LAYOUT_KEY: varlen.varlen_layout(lengths)},
                   [0, 4, 5, 7, 9, 13]),
        "shared varlen": ({"input_ids": flat_ids, "position_ids": flat_pos,
                           varlen.LAYOUT_KEY: varlen.shared_varlen_layout(groups)}, [1, 3, 4, 6, 7, 9, 11]),
    }


LAYOUTS = list(_layouts())


def _states_and_grads(lm, kw, read, partial, monkeypatch):
    monkeypatch.setattr(last_layer, "ENABLED", partial)
    if varlen.LAYOUT_KEY in kw:
        varlen.register()
    lm.zero_grad()
    h, _ = backbone_output(lm, {**kw, "use_cache": False}, read=read)
    flat = h.reshape(-1, h.shape[-1])
    w = torch.linspace(-1, 1, flat.shape[-1])
    (flat[read] * w).sum().backward()
    return flat.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_positions_and_gradients_equal_the_full_layer(lm, layout, monkeypatch):
    kw, read = _layouts()[layout]
    read = torch.tensor(read)
    full, gfull = _states_and_grads(lm, kw, read, False, monkeypatch)
    part, gpart = _states_and_grads(lm, kw, read, True, monkeypatch)
    torch.testing.assert_close(part[read], full[read], rtol=RTOL, atol=ATOL)
    T = kw["input_ids"].shape[1]
    cols = set((read % T).tolist())
    unread = [i for i in range(full.shape[0]) if i % T not in cols]
    assert unread and bool((part[unread] == 0).all()), "the partial layer did not run (unread positions not zero)"
    assert gfull.keys() == gpart.keys()
    last = type(lm.base_model.layers[-1])
    for n in gfull:
        close_grads(gpart[n], gfull[n], n)
    assert any(n.startswith("model.layers.2.mlp") and gfull[n].abs().sum() > 0 for n in gfull), last


@pytest.fixture
def features(tokenizer):
    sft = [SFTRecord(p, c) for p, c in zip(PROMPTS, GOOD)]
    pref = [PreferenceRecord(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)]
    return {"sft": tokenize_records(sft, tokenizer, max_length=32, max_prompt_length=16)[0],
            "preference": tokenize_records(pref, tokenizer, max_length=32, max_prompt_length=16)[0]}


def test_losses_and_rewards_of_the_trainers_paths(tiny_dir, features, tokenizer, monkeypatch):
    """SFT log-probs (padded and packed rows), DPO (shared-prompt rows), reward models (padded, packed, shared)."""
    varlen.register()
    pid = tokenizer.pad_token_id
    lm = load_model(tiny_dir("llama")).train()
    rm = load_model(tiny_dir("llama", classifier=True, num_labels=1), task="classifier", num_labels=1).train()
    sft, pref = features["sft"][:5], features["preference"][:4]
    cases = {
        "sft padded": (lm, SFTCollator(pid)(sft), "logps"),
        "sft packed": (lm, PackedSFTCollator(None)(sft), "logps"),
        "dpo shared": (lm, SharedPromptCollator(PreferenceCollator(pid), pid)(pref), "logps"),
        "rm padded": (rm, PreferenceCollator(pid)(pref), "rewards"),
        "rm packed": (rm, PackedPreferenceCollator(None, pid)(pref), "rewards"),
        "rm shared": (rm, SharedPromptCollator(PreferenceCollator(pid), pid)(pref), "rewards"),
    }
    calls = []
    real = last_layer._forward
    monkeypatch.setattr(last_layer, "_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name, (model, batch, what) in cases.items():
        out = {}
        for on in (False, True):
            monkeypatch.setattr(last_layer, "ENABLED", on)
            model.zero_grad()
            n = len(calls)
            if what == "logps":
                token, mask = completion_token_logps(model, batch)
                value = (token * mask).sum(-1)
            else:
                value = sequence_rewards(model, batch)
            value.sum().backward()
            out[on] = value.detach(), [p.grad.clone() for p in model.parameters()], len(calls) - n
        assert out[False][2] == 0 and out[True][2] == 1, (name, out[False][2], out[True][2])
        torch.testing.assert_close(out[True][0], out[False][0], rtol=RTOL, atol=ATOL, msg=name)
        for i, (a, b) in enumerate(zip(out[True][1], out[False][1])):
            close_grads(a, b, f"{name}, parameter {i}")


@pytest.mark.parametrize("what,change,reason", [
    ("a hook on the last layer", lambda lm, kw: lm.base_model.layers[-1].mlp.register_forward_hook(lambda *a: None),
     "a hook"),
    ("hidden states asked for", lambda lm, kw: kw.update(output_hidden_states=True), "hidden states"),
    ("a KV cache", lambda lm, kw: kw.update(use_cache=True), "KV cache"),
    ("a global module hook", lambda lm, kw: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
     "global module hook"),
    ("attention dropout in training", lambda lm, kw: setattr(lm.base_model.layers[-1].self_attn, "attention_dropout",
                                                             0.1), "dropout"),
])
def test_the_layer_runs_in_full_where_something_else_sees_it(what, change, reason, tiny_dir):
    lm = load_model(tiny_dir("llama")).train()
    kw = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "use_cache": False}
    assert last_layer.unusable_reason(lm, kw) is None
    handle = change(lm, kw)
    try:
        assert reason in last_layer.unusable_reason(lm, kw), what
        h, _ = backbone_output(lm, kw, read=torch.tensor([3]))
        assert bool((h[0, :3] != 0).all()), what  # unread positions computed: the full layer ran
    finally:
        if hasattr(handle, "remove"):
            handle.remove()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_other_layer_classes_run_in_full(arch, tiny_dir):
    lm = load_model(tiny_dir(arch))
    assert last_layer.unusable_reason(lm, {"use_cache": False}) is not None


def test_nothing_read_runs_the_full_layer(tiny_dir):
    """A batch with no scored position (read empty): the layer runs in full rather than on zero columns."""
    lm = load_model(tiny_dir("llama")).train()
    h, _ = backbone_output(lm, {"input_ids": torch.tensor([[5, 6, 7, 8]]), "use_cache": False},
                           read=torch.empty(0, dtype=torch.long))
    assert bool((h != 0).all())
