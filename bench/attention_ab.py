"""Attention layouts for a packed training row on CPU: what `alignkit.models.varlen` does against the alternatives.

    .venv/bin/python bench/attention_ab.py --rounds 7      # ~1 min, 1 thread

The SFT "small" case of bench/run_cpu.py: batches of 8 sequences of 16-96 tokens (prompt 8-48 + completion 8-48)
packed in one row, 4 query heads over 2 key/value heads of 32 dimensions (the tiny Llama's GQA). Each variant runs
forward + backward of causal attention over every sequence alone and returns (1, H, S, D):

- `per_seq_flash`: one `scaled_dot_product_attention(is_causal=True)` per sequence on its `split` of the row
  (what `varlen_sdpa_attention` does; CPU sdpa picks its flash kernel);
- `padded_masked`: the sequences gathered into a padded (R, H, T, D) batch, one sdpa call with a causal + padding
  mask, the real rows gathered back;
- `padded_math`: the same padded batch through explicit matmul / masked softmax / matmul;
- `per_seq_math`: per sequence, explicit matmul / softmax with an additive causal mask / matmul;
- `per_seq_sdpa_math`: `per_seq_flash` under sdpa's MATH backend.

Before timing, every variant's output and input gradients are compared with `per_seq_flash`'s (max |difference|
<= 1e-5, else the script stops: a faster variant that computes something else is no result). Timing: CPU ms per
batch (forward + backward), the variants interleaved round by round on the same 16 batches; printed as the median
(min-max) and the paired ratio variant / per_seq_flash per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, KV, D = 4, 2, 32


def make_batches(n: int, seed: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = (torch.randint(8, 49, (8,), generator=g) + torch.randint(8, 49, (8,), generator=g)).tolist()
        s = sum(lens)
        out.append((lens, torch.randn(1, H, s, D, generator=g), torch.randn(1, KV, s, D, generator=g),
                    torch.randn(1, KV, s, D, generator=g)))
    return out


def per_seq_flash(lens, q, k, v):
    return torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
                      for a, b, c in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))], 2)


def per_seq_sdpa_math(lens, q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return per_seq_flash(lens, q, k, v)


def _padding(lens):
    t, r = max(lens), len(lens)
    idx, valid, s = torch.zeros(r, t, dtype=torch.long), torch.zeros(r, t, dtype=torch.bool), 0
    for i, n in enumerate(lens):
        idx[i, :n], valid[i, :n], s = torch.arange(s, s + n), True, s + n
    mask = (torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :]) | ~valid[:, :, None]  # pads see all
    return idx, valid, mask[:, None]


def padded_masked(lens, q, k, v):
    idx, valid, mask = _padding(lens)
    o = F.scaled_dot_product_attention(*(x[0][:, idx].transpose(0, 1) for x in (q, k, v)), attn_mask=mask,
                                       enable_gqa=True)  # (R, H, T, D)
    return o.transpose(0, 1)[:, valid][None]


def padded_math(lens, q, k, v):
    idx, valid, mask = _padding(lens)
    qq, kk, vv = (x[0][:, idx].transpose(0, 1) for x in (q, k, v))
    r, _, t, _ = qq.shape
    s = (qq.view(r, KV, H // KV, t, D) * D ** -0.5) @ kk[:, :, None].transpose(-1, -2)
    p = s.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    return (p @ vv[:, :, None]).view(r, H, t, D).transpose(0, 1)[:, valid][None]


_CAUSAL: dict[int, torch.Tensor] = {}


def per_seq_math(lens, q, k, v):
    outs = []
    for a, b, c, n in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2), lens):
        if n not in _CAUSAL:
            _CAUSAL[n] = torch.zeros(n, n).masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        s = (a.view(KV, H // KV, n, D) * D ** -0.5) @ b.view(KV, 1, n, D).transpose(-1, -2)
        outs.append(((s + _CAUSAL[n]).softmax(-1) @ c.view(KV, 1, n, D)).view(1, H, n, D))
    return torch.cat(outs, 2)


VARIANTS = {f.__name__: f for f in (per_seq_flash, padded_masked, padded_math, per_seq_math, per_seq_sdpa_math)}


def outputs_and_grads(fn, lens, q, k, v):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fn(lens, *leaves)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [x.grad for x in leaves]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = make_batches(args.batches, args.seed)
    for name, fn in VARIANTS.items():  # the same work, checked before anything is timed
        for lens, q, k, v in batches[:3]:
            want, got = outputs_and_grads(per_seq_flash, lens, q, k, v), outputs_and_grads(fn, lens, q, k, v)
            worst = max(float((a - b).abs().max()) for a, b in zip(want, got))
            if worst > 1e-5:
                sys.exit(f"attention_ab: {name} differs from per_seq_flash by {worst:.2e} (outputs or gradients): "
                         "not the same attention, no timing")
    ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            t = time.process_time()
            for lens, q, k, v in batches:
                outputs_and_grads(VARIANTS[name], lens, q, k, v)
            ms[name].append((time.process_time() - t) / len(batches) * 1000)
    base = ms["per_seq_flash"]
    print(f"CPU ms per batch of 8 sequences (forward + backward), {args.rounds} rounds, {args.threads} thread(s)")
    for name, xs in ms.items():
        ratios = sorted(x / b for x, b in zip(xs, base))
        print(f"  {name:18s} {statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})   / per_seq_flash "
              f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
