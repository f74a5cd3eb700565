"""Micro-benchmark of the chunked LM-head log-probs (forward + backward), CPU or GPU.

    .venv/bin/python bench/lm_head_logprobs.py [--vocab 32000] [--tokens 2048] [--hidden 256] [--against OLD.py]

`--against` times another copy of `alignkit/losses/logprobs.py` (e.g. `git show REV:src/alignkit/losses/logprobs.py
> /tmp/old.py`) interleaved with the current one and prints both medians, and a naive full-logits
`log_softmax` reference for scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from alignkit.losses import logprobs as current


def load(path: str):
    spec = importlib.util.spec_from_file_location("other_logprobs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def step(fn, h, w, t) -> float:
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    t0 = time.perf_counter()
    fn(h, w, t).sum().backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.tokens, a.hidden, generator=g).to(a.device)
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(a.device)
    t = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(a.device)
    fns = {"alignkit": lambda h, w, t: current.chunked_lm_logprobs(h, w, None, t),
           "naive (full logits)": lambda h, w, t: torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None])}
    if a.against:
        old = load(a.against)
        fns["against"] = lambda h, w, t: old.chunked_lm_logprobs(h, w, None, t)
    times = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, fn in fns.items():
            times[k].append(step(fn, h, w, t))
    for k, v in times.items():
        print(f"{k:22s} median {1e3 * statistics.median(v):8.1f} ms  min {1e3 * min(v):8.1f} ms")


if __name__ == "__main__":
    main()
