"""The lean loop's fast decode step (`online.fast_step`) in `lean_generate`: used where it applies, checked against
the model's own forward at run time (a wrong step stops the call with one line), and left out, with the model's
own forward instead, where it does not apply."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GenerationConfig

import alignkit.online.decode as decode
import alignkit.online.fast_step as fast_step
from alignkit.online.decode import CACHE_LAYERS, lean_generate, preallocated_cache
from alignkit.online.fast_step import FastStepMismatchError, fast_step_unsupported

ROWS = [[5, 6, 7, 8, 9], [11, 12, 13], [5, 6, 7, 8, 9], [21, 22, 23, 24]]
IDS = torch.tensor([[0] * (5 - len(r)) + r for r in ROWS])
MASK = (IDS != 0).long()


def _cfg(eos: int | None = None) -> GenerationConfig:
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, pad_token_id=0,
                            eos_token_id=[eos] if eos is not None else None, num_beams=1)


def _generate(model, fast: bool, monkeypatch, ids=IDS, mask=MASK, eos=None) -> torch.Tensor:
    monkeypatch.setattr(decode, "FAST_STEP", fast)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return lean_generate(model, ids, mask, _cfg(eos), sampler="inverse_cdf")


def _count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = fast_step.DecodeStep.__call__
    monkeypatch.setattr(fast_step.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_step_samples_what_the_models_own_forward_samples(tiny_lm, arch, monkeypatch):
    """Same seed, inverse-CDF sampler: the tokens with the fast step are the tokens with the model's own forward at
    every step (its logits are the model's, so the draws are too), on a left-padded batch whose rows end at an EOS,
    on an unpadded one, and for a LoRA model whose adapters are not zero (the adapted q/v projections apply)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_lm(arch)
    assert fast_step_unsupported(model, preallocated_cache(model, 8), CACHE_LAYERS) is None
    with torch.no_grad():
        eos = int(model(input_ids=IDS[:1], attention_mask=MASK[:1]).logits[0, -1].argmax())  # a likely token
    calls = _count_steps(monkeypatch)
    for ids, mask in ((IDS, MASK), (IDS[[0, 2]], MASK[[0, 2]])):
        want = _generate(model, False, monkeypatch, ids, mask, eos)
        assert not calls
        got = _generate(model, True, monkeypatch, ids, mask, eos)
        assert calls, "the fast step did not run"
        assert torch.equal(got, want), (got.tolist(), want.tolist())
        calls.clear()
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    want = _generate(lora, False, monkeypatch)
    got = _generate(lora, True, monkeypatch)
    assert calls and torch.equal(got, want)
    with lora.disable_adapter():
        base = _generate(lora, True, monkeypatch)
    assert not torch.equal(base, got)  # the adapters change the tokens: the fast step did apply them


def test_one_token_prompts_sample_with_the_fast_step_on(tiny_lm, monkeypatch):
    """A prompt of one token (data.max_prompt_length=1) has nothing cached before its first step: that step is
    the model's own forward (the fast step once crashed reading the empty cache: 'NoneType' object has no
    attribute 'shape'), the later ones the fast step, and the tokens are those of the model's own forward."""
    model = tiny_lm("llama")
    ids, mask = IDS[:, -1:], MASK[:, -1:]  # (4, 1): each row's last token
    calls = _count_steps(monkeypatch)
    want = _generate(model, False, monkeypatch, ids, mask)
    got = _generate(model, True, monkeypatch, ids, mask)
    assert len(calls) == 8 - 1  # 8 new tokens (no EOS): the first from the forward, the 7 others fast steps
    assert got.shape == (4, 9) and torch.equal(got, want), (got.tolist(), want.tolist())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-module"])
def test_a_wrong_fast_step_stops_the_call_with_one_line(tiny_lm, monkeypatch, fused):
    """A fast step whose logits are not the model's (here: the rotary applied to the queries only, in the fused
    form and in the per-module one) is caught on the call's first decode step, against the model's own forward:
    FastStepMismatchError naming the way out, instead of samples from another model."""
    monkeypatch.setattr(fast_step, "FUSE", fused)
    model = tiny_lm("llama")
    real = fast_step.DecodeStep.__init__

    def broken(self, m):
        real(self, m)
        assert all((x[11] is not None) == fused for x in self.layers)  # the form under test is the one that runs
        rope, rope_qk = self.rope, self.rope_qk
        self.rope = lambda q, k, cos, sin: (rope(q, k, cos, sin)[0], k)
        self.rope_qk = lambda qk, nq, cos, sin: torch.cat([rope_qk(qk, nq, cos, sin)[:, :nq], qk[:, nq:]], dim=1)

    monkeypatch.setattr(fast_step.DecodeStep, "__init__", broken)
    with pytest.raises(FastStepMismatchError, match=r"LlamaForCausalLM gives other logits .*FAST_STEP = False"):
        _generate(model, True, monkeypatch)
    with pytest.raises(FastStepMismatchError, match="unpadded batch"):  # the unpadded kind is checked on its own
        _generate(model, True, monkeypatch, IDS[[0, 2]], MASK[[0, 2]])
    _generate(model, False, monkeypatch)  # the way out works


def test_the_fused_step_reads_the_weights_of_its_call(tiny_lm, monkeypatch):
    """The fused form concatenates q/k/v and gate/up weights when a call starts; the optimizer then changes the
    parameters in place. The next call must sample from the changed model: same seed, the same tokens as the
    model's own forward after every in-place update (the run-time check only runs on a model's first call, so a
    concatenation kept across calls would go unnoticed there), and other tokens than before the update."""
    model = tiny_lm("llama")
    before = _generate(model, True, monkeypatch)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)  # an in-place update, as an optimizer step makes
        got = _generate(model, True, monkeypatch)
        assert torch.equal(got, _generate(model, False, monkeypatch))
        assert not torch.equal(got, before)
        before = got


def test_the_fused_form_stays_within_its_size_cap(tiny_lm, monkeypatch):
    """Fused where the q|k|v and gate|up copies fit `FUSE_MAX_BYTES`, per module (same tokens) where they do not."""
    model = tiny_lm("llama")
    n = sum(m.weight.numel() * 4 for x in model.model.layers for m in (x.self_attn.q_proj, x.self_attn.k_proj,
                                                                         x.self_attn.v_proj, x.mlp.gate_proj, x.mlp.up_proj))
    forms = []
    real = fast_step.DecodeStep.__init__
    monkeypatch.setattr(fast_step.DecodeStep, "__init__", lambda self, m: real(self, m) or forms.append(
        [x[11] is not None and x[13] is not None for x in self.layers]))
    monkeypatch.setattr(fast_step, "FUSE_MAX_BYTES", n)
    fused = _generate(model, True, monkeypatch)
    monkeypatch.setattr(fast_step, "FUSE_MAX_BYTES", n - 1)
    per_module = _generate(model, True, monkeypatch)
    assert forms == [[True] * len(model.model.layers), [False] * len(model.model.layers)]
    assert torch.equal(fused, per_module) and torch.equal(fused, _generate(model, False, monkeypatch))


def test_the_check_runs_once_per_model_and_mask_kind(tiny_lm, monkeypatch):
    model = tiny_lm("llama")
    checks: list[int] = []
    real = decode._checked_step
    monkeypatch.setattr(decode, "_checked_step", lambda *a: checks.append(1) or real(*a))
    for _ in range(2):
        _generate(model, True, monkeypatch)
    assert len(checks) == 1
    _generate(model, True, monkeypatch, IDS[[0, 2]], MASK[[0, 2]])
    assert len(checks) == 2
    _generate(tiny_lm("llama"), True, monkeypatch)  # another model object: checked again
    assert len(checks) == 3


def test_the_fast_step_stays_out_where_it_does_not_apply(tiny_lm, tiny_dir, monkeypatch, caplog):
    """Another model family, eager attention, training mode, a hook on a module the step would bypass, the
    multinomial sampler, greedy: the model's own forward at every step (the reason logged at debug level)."""
    from alignkit.models.loading import load_model

    calls = _count_steps(monkeypatch)
    eager = load_model(tiny_dir("llama"), attn_implementation="eager").eval()
    hooked = tiny_lm("llama")
    hooked.model.layers[0].register_forward_hook(lambda *a: None)
    cache = preallocated_cache(hooked, 8)
    assert "model_type 'gpt2'" in fast_step_unsupported(tiny_lm("gpt2"), preallocated_cache(tiny_lm("gpt2"), 8))
    assert "attention implementation 'eager'" in fast_step_unsupported(eager, cache, CACHE_LAYERS)
    assert "hook" in fast_step_unsupported(hooked, cache, CACHE_LAYERS)
    assert "training mode" in fast_step_unsupported(tiny_lm("llama").train(), cache)
    plain = tiny_lm("llama")  # a cache layer class the caller did not name (here PreallocatedLayer)
    assert "cache layer" in fast_step_unsupported(plain, preallocated_cache(plain, 8))
    with caplog.at_level(logging.DEBUG, logger="alignkit.online.decode"):
        for m in (tiny_lm("gpt2"), eager, hooked):
            _generate(m, True, monkeypatch)
    assert not calls
    assert "decode steps use the model's own forward: attention implementation 'eager'" in caplog.text
    model = tiny_lm("llama")
    monkeypatch.setattr(decode, "FAST_STEP", True)
    lean_generate(model, IDS, MASK, _cfg(), sampler="multinomial")
    lean_generate(model, IDS, MASK, GenerationConfig(do_sample=False, max_new_tokens=4, pad_token_id=0))
    assert not calls


def test_lean_generate_runs_without_autograd(tiny_lm):
    """lean_generate is a no-grad call wherever it is called from (generate_responses adds inference mode; a direct
    caller, a benchmark or a test, does not): every forward it makes sees grad mode off, so no graph is kept over
    the decode steps. A merge had moved its `torch.no_grad()` onto the sampling helper above it (`draw`): the
    model's forwards then built graphs, and each sampled token paid a grad-mode switch."""
    model = tiny_lm("llama")
    modes: list[bool] = []
    handle = model.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            lean_generate(model, IDS, MASK, _cfg(), sampler="multinomial")
            lean_generate(model, IDS, MASK, GenerationConfig(do_sample=False, max_new_tokens=4, pad_token_id=0))
    finally:
        handle.remove()
    assert modes and not any(modes), modes
