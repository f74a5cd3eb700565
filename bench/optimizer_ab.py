"""AdamW kernels on the suite's "small" tiny Llama (full finetuning: every parameter trainable), CPU ms per
optimizer step: torch's per-tensor loop (the online trainer's optimizer before 2026-12-03; `train.optim
adamw_torch`), its foreach form, and its fused kernel (`train.optim adamw_torch_fused`, the online default now, as
transformers' TrainingArguments default that TRL's trainers inherit). Interleaved rounds, one thread,
`time.process_time`; each variant's parameters are checked equal to the loop's after the timed steps.

    .venv/bin/python bench/optimizer_ab.py --rounds 5 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**common.SCENARIOS["small"]["model"]))
    grads = [torch.randn_like(p) for p in base.parameters()]
    models, opts = {}, {}
    for name, kw in VARIANTS.items():
        models[name] = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
        for p, g in zip(models[name], grads):
            p.grad = g.clone()
        opts[name] = torch.optim.AdamW(models[name], lr=1e-4, weight_decay=0.01, **kw)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
            t = time.process_time()
            for _ in range(args.steps):
                opts[name].step()
            times[name].append((time.process_time() - t) / args.steps * 1e3)
    for name in VARIANTS:  # the same number of steps on the same gradients: the same parameters
        gap = max((a - b).abs().max().item() for a, b in zip(models[name], models["loop"]))
        assert gap < 1e-5, f"{name}: parameters differ from the loop's by {gap}"
    n = sum(p.numel() for p in base.parameters())
    print(f"{len(grads)} tensors, {n} parameters, {args.rounds} rounds x {args.steps} steps, CPU ms a step")
    loop = times["loop"]
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(loop, ts)]
        print(f"{name:8s} {statistics.median(ts):6.2f} ({min(ts):.2f}-{max(ts):.2f})   loop / {name}: "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
