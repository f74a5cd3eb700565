"""Token sampler A/B: `torch.multinomial` (what `generate` uses) vs `online.decode.inverse_cdf_sample` (alignkit's
default in its decode loop and in `serve`), CPU microseconds per call on softmax rows of realistic shapes.

    .venv/bin/python bench/sampler_ab.py --repeats 5

Each repeat times both samplers, interleaved, on the same (rows, vocab) probabilities (1 thread, CPU time);
prints the median per sampler and the paired ratio multinomial / inverse-CDF (median, min-max). Checks first that
both draw the same distribution: over 200 000 draws from one 8-token row each frequency is within 5 standard errors.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=["16x1024", "32x1024", "16x32000", "16x151936"])
    args = ap.parse_args()
    import torch

    from alignkit.online.decode import inverse_cdf_sample

    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(8) * 2, -1)
    n = 200_000
    se = (p * (1 - p) / n).sqrt()
    for name, draw in (("multinomial", lambda x: torch.multinomial(x, 1).squeeze(1)), ("inverse_cdf", inverse_cdf_sample)):
        freq = torch.bincount(draw(p.repeat(n, 1)), minlength=8).float() / n
        assert ((freq - p).abs() <= 5 * se).all(), (name, freq, p)
    print(f"{'rows x vocab':<14} {'multinomial us':>15} {'inverse cdf us':>15} {'paired ratio':>22}")
    for shape in args.shapes:
        rows, vocab = map(int, shape.split("x"))
        probs = torch.softmax(torch.randn(rows, vocab) * 3, -1)
        calls = max(10, int(2e7 / (rows * vocab)))
        times: dict[str, list[float]] = {"multinomial": [], "inverse_cdf": []}
        for r in range(args.repeats):
            for name in (["multinomial", "inverse_cdf"] if r % 2 == 0 else ["inverse_cdf", "multinomial"]):
                fn = (lambda: torch.multinomial(probs, 1)) if name == "multinomial" else (lambda: inverse_cdf_sample(probs))
                t = time.process_time()
                for _ in range(calls):
                    fn()
                times[name].append((time.process_time() - t) / calls * 1e6)
        ratios = [m / c for m, c in zip(times["multinomial"], times["inverse_cdf"])]
        print(f"{shape:<14} {statistics.median(times['multinomial']):>15.0f} {statistics.median(times['inverse_cdf']):>15.0f} "
              f"{statistics.median(ratios):>8.1f} ({min(ratios):.1f}-{max(ratios):.1f})")


if __name__ == "__main__":
    main()
