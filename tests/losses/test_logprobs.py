"""Chunked / selective log-probs against the naive full-logits log_softmax(...).gather."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.logprobs import (TokenLogprobs, chunked_lm_logprobs, entropy_from_logits,
                                      selective_log_softmax, sequence_logps)


def naive(h, W, b, y, logit_scale=1.0, softcap=None, temperature=1.0):
    z = h @ W.T
    if b is not None:
        z = z + b
    z = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    lse = torch.logsumexp(z, -1)
    return logp, ent, lse


def make(N=13, d=8, V=37, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = torch.randn(V, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, b, y


def test_hand_computed_uniform_logits():
    # all-zero hidden -> all logits 0 -> log p = -log V for every token, entropy log V
    V = 5
    h = torch.zeros(3, 4, dtype=torch.float64)
    W = torch.randn(V, 4, dtype=torch.float64)
    out = chunked_lm_logprobs(h, W, None, torch.tensor([0, 3, 4]), chunk_size=2, return_stats=True)
    assert isinstance(out, TokenLogprobs)
    assert torch.allclose(out.logps, torch.full((3,), -math.log(V), dtype=torch.float64))
    assert torch.allclose(out.entropy, torch.full((3,), math.log(V), dtype=torch.float64))
    assert torch.allclose(out.logsumexp, torch.full((3,), math.log(V), dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opts", [{}, {"logit_scale": 0.7, "softcap": 3.0, "temperature": 1.3}])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_values_and_gradients_float64(bias, opts, chunk):
    h, W, b, y = make(bias=bias)
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent, w_lse = (torch.randn(h.shape[0], generator=g, dtype=torch.float64) for _ in range(3))

    out = chunked_lm_logprobs(h, W, b, y, chunk_size=chunk, return_stats=True, **opts)
    params = [h, W] + ([b] if bias else [])
    loss = (out.logps * w_logp).sum() + (out.entropy * w_ent).sum() + (out.logsumexp * w_lse).sum()
    grads = torch.autograd.grad(loss, params)

    ref = naive(h, W, b, y, **opts)
    ref_loss = (ref[0] * w_logp).sum() + (ref[1] * w_ent).sum() + (ref[2] * w_lse).sum()
    ref_grads = torch.autograd.grad(ref_loss, params)
    for got, want in zip(out, ref):
        assert torch.allclose(got, want, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-9)


def test_values_and_gradients_float32():
    h, W, b, y = make(N=40, d=16, V=101, dtype=torch.float32)
    out = chunked_lm_logprobs(h, W, b, y, chunk_size=7)
    assert out.dtype == torch.float32
    gh, gW, gb = torch.autograd.grad(out.sum(), [h, W, b])
    ref = naive(h, W, b, y)[0]
    rh, rW, rb = torch.autograd.grad(ref.sum(), [h, W, b])
    assert torch.allclose(out, ref, atol=1e-5)
    for a, c in [(gh, rh), (gW, rW), (gb, rb)]:
        assert torch.allclose(a, c, atol=1e-4)


def test_bf16_input_works_and_is_close():
    h64, W64, _, y = make(N=20, d=16, V=50, bias=False)
    h = h64.detach().to(torch.bfloat16).requires_grad_()
    W = W64.detach().to(torch.bfloat16).requires_grad_()
    out = chunked_lm_logprobs(h, W, None, y, chunk_size=6)
    assert out.dtype == torch.float32  # log-probs are accumulated in float32
    out.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and W.grad.dtype == torch.bfloat16
    ref = naive(h.detach().double(), W.detach().double(), None, y)[0]
    assert torch.allclose(out.double(), ref, atol=0.1)  # bf16 logits: ~1e-2 relative error
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(W.grad.float()).all()


def test_frozen_head_gets_no_gradient_and_ignore_index():
    h, W, b, y = make(bias=False)
    W = W.detach()  # a frozen LM head (LoRA / ReFT)
    y = y.clone()
    y[[2, 5]] = -100
    out = chunked_lm_logprobs(h, W, None, y, chunk_size=3)
    assert out[2] == 0 and out[5] == 0
    out.sum().backward()
    assert torch.all(h.grad[[2, 5]] == 0)
    keep = y != -100
    ref = naive(h.detach(), W, None, y.clamp(min=0))[0]
    assert torch.allclose(out.detach()[keep], ref[keep])


def test_saved_tensors_never_hold_n_by_v():
    """Structural memory check: what autograd keeps for backward is hidden, weight, targets, lse."""
    N, d, V = 64, 8, 512
    h, W, b, y = make(N=N, d=d, V=V, dtype=torch.float32, bias=False)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_lm_logprobs(h, W, None, y, chunk_size=8).sum()
    assert saved and all(math.prod(s) < N * V for s in saved), saved
    # hidden, weight, targets, logsumexp (+ the ignore_index mask of the output masked_fill)
    assert sorted(saved) == sorted([(N, d), (V, d), (N,), (N,), (N,)]), saved

    # selective_log_softmax keeps only the logits it was given (no float32 copy), index and lse
    logits = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_log_softmax(logits, y, chunk_size=8)
    assert sorted(saved) == sorted([(N, V), (N,), (N,), (N,)]), saved

    # the naive path does keep an (N, V) tensor: the check above can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive(h, W, None, y)[0].sum()
    assert any(math.prod(s) >= N * V for s in saved)


def test_matches_tiny_model_logits(tiny_lm):
    model = tiny_lm("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1].reshape(-1, model.config.hidden_size)  # final-normed states
    targets = ids[:, 1:].reshape(-1)
    got = chunked_lm_logprobs(hidden, model.lm_head.weight, None, targets, chunk_size=5)
    want = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).reshape(-1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_selective_log_softmax_and_entropy(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    idx = torch.randint(0, 11, (3, 5), generator=g)
    idx[0, 0] = -100
    got = selective_log_softmax(logits, idx, chunk_size=4)
    ref_all = torch.log_softmax(logits.double(), -1)
    want = ref_all.gather(-1, idx.clamp(min=0)[..., None]).squeeze(-1)
    want[0, 0] = 0.0
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # bf16 input is exact in float32
    assert torch.allclose(got.double(), want, atol=tol)
    ent = entropy_from_logits(logits, chunk_size=4)
    assert torch.allclose(ent.double(), -(ref_all.exp() * ref_all).sum(-1), atol=tol)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    (got.double() * w).sum().backward()
    assert torch.all(logits.grad[0, 0] == 0)
    lg = logits.detach().double().requires_grad_()
    want_all = torch.log_softmax(lg, -1).gather(-1, idx.clamp(min=0)[..., None]).squeeze(-1)
    ((want_all * w)[idx != -100]).sum().backward()
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.double(), lg.grad, atol=1e-12 if dtype == torch.float64 else 1e-2)


def test_sequence_logps_sum_and_mean():
    tl = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    m = torch.tensor([[1, 1, 0], [0, 1, 0]])
    assert torch.allclose(sequence_logps(tl, m), torch.tensor([-3.0, -0.5]))
    assert torch.allclose(sequence_logps(tl, m, average=True), torch.tensor([-1.5, -0.5]))
    assert sequence_logps(tl, torch.zeros_like(m), average=True).eq(0).all()


def test_shape_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="hidden size"):
        chunked_lm_logprobs(torch.zeros(2, 3), torch.zeros(5, 4), None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target ids must lie"):
        chunked_lm_logprobs(torch.zeros(2, 4), torch.zeros(5, 4), None, torch.tensor([0, 9]))


def test_accuracy_counts_a_tie_as_the_first_index_only():
    """`correct` is TRL's `argmax == label`: with tied logits only the first maximal index counts. A model
    collapsed to constant logits must read 0 accuracy (it read 1.0 when ties counted for every tied token)."""
    from alignkit.losses.logprobs import chunked_lm_logprobs

    # identity head: the logits are the hidden states themselves
    hidden = torch.tensor([[2.0, 2.0, 1.0], [2.0, 2.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 3.0]])
    targets = torch.tensor([0, 1, 0, 2, 2])
    out = chunked_lm_logprobs(hidden, torch.eye(3), None, targets, with_accuracy=True)
    assert out.correct.tolist() == [True, False, True, False, False]


def test_one_chunk_keeps_its_logits_and_gradients_stay_exact():
    """N <= chunk_size (no softcap): the chunk's logits are kept for backward (one (N, V) block, no recompute);
    gradients still equal plain autograd's, with logit_scale and temperature; with a frozen input nothing is kept."""
    h, W, b, y = make(N=13, V=37)
    g = torch.Generator().manual_seed(3)
    w_logp, w_ent = (torch.randn(13, generator=g, dtype=torch.float64) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    opts = {"logit_scale": 0.7, "temperature": 1.3}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_lm_logprobs(h, W, b, y, chunk_size=64, return_stats=True, **opts)
    assert (13, 37) in saved  # the kept logits
    grads = torch.autograd.grad((out.logps * w_logp).sum() + (out.entropy * w_ent).sum(), [h, W, b])
    ref = naive(h, W, b, y, **opts)
    want = torch.autograd.grad((ref[0] * w_logp).sum() + (ref[1] * w_ent).sum(), [h, W, b])
    for got, exp in zip(grads, want):
        assert torch.allclose(got, exp, atol=1e-9)
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_lm_logprobs(h.detach(), W.detach(), None, y, chunk_size=64)
    assert (13, 37) not in saved
