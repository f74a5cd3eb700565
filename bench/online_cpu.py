"""The online side-by-side suite: alignkit's GRPO / online DPO vs TRL 1.16's GRPOTrainer / OnlineDPOTrainer.

    .venv/bin/python bench/online_cpu.py                       # both methods, 3 interleaved repeats
    .venv/bin/python bench/online_cpu.py --methods grpo --repeats 5 --steps 6
    .venv/bin/python bench/online_cpu.py --sides alignkit-default trl-fastest alignkit-multinomial   # skip a side

Same saved tiny Llama ("small" scenario of bench/common.py: hidden 128, 4 layers, vocab 1024, word-level
tokenizer), the same 256 prompts (8-48 tokens), the same reward (`common.even_fraction`, TRL's signature),
prompts_per_step x num_samples completions of up to max_new_tokens (temperature 1, no top-k / top-p), one
optimizer update per step, full finetuning with a frozen reference copy (GRPO beta 0.04, online DPO beta
0.1). TRL runs twice: at its defaults (gradient checkpointing on, bf16 autocast on) and at its fastest
knobs here (both off); alignkit runs in float32 without checkpointing (its defaults); its "multinomial" side
is the default with `sampling.sampler=multinomial` (generate's own draws), an A/B of the default inverse-CDF sampler. Each run is a fresh
subprocess in its library's venv (the TRL env: bench/setup_peers.sh), 1 torch thread; the order rotates per
repeat. Reported per run: steps/s and generated tokens/s over the timed steps (after warmup), and the CPU
seconds of the run's process over those steps (steadier than wall time on a shared machine). Ratios are
paired within a repeat (alignkit run vs the TRL run of the same repeat). Writes
bench/results/online-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

METHODS = {"grpo": ["--num-samples", "4", "--beta", "0.04", "--lr", "1e-6"],
           "online_dpo": ["--num-samples", "2", "--beta", "0.1", "--lr", "5e-7"]}
SIDES = {("alignkit", "default"): [], ("trl", "default"): [],
         ("trl", "fastest"): ["--grad-ckpt", "off", "--precision", "fp32"],
         ("alignkit", "fastest"): ["--share-prompt"],  # share_prompt=True (the CPU default resolves to it too)
         ("alignkit", "multinomial"): ["--sampler", "multinomial"]}  # the default but generate's own draws
# (alignkit setting, TRL setting) of each table row
ROWS = [("default", "default"), ("default", "fastest"), ("fastest", "fastest"), ("multinomial", "fastest")]


def run_side(lib: str, variant: str, method: str, spec: Path, run_dir: Path, shared: list[str], threads: int,
             tag: str, timeout: int) -> dict:
    py = Path(sys.executable) if lib == "alignkit" else BENCH / ".envs" / "trl" / "bin" / "python"
    if not py.exists():
        return {"status": "skipped", "reason": f"no env at {py.parent.parent}: run bench/setup_peers.sh"}
    script = BENCH / ("online_alignkit.py" if lib == "alignkit" else "peers/trl_online.py")
    out = run_dir / "results" / f"{tag}.json"
    cmd = [str(py), str(script), "--spec", str(spec), "--run-dir", str(run_dir), "--method", method, "--out", str(out),
           "--threads", str(threads), *METHODS[method], *shared, *SIDES[(lib, variant)]]
    log = run_dir / "logs" / f"{tag}.log"
    res, reason, _ = common.run_logged(cmd, out, log, threads, timeout)
    if res is None:
        res = {"status": "error", "reason": reason}
    res.update(command=" ".join(cmd), log=str(log))
    return res


def same_work(a: dict, t: dict, method: str) -> list[str]:
    """`common.work_mismatches` of an online pair: the same steps, prompts, samples and token budget, generated
    tokens within 10 % (sampled, so not equal), finite losses, and equal ones for online DPO only (GRPO's losses are
    different normalisations on the two sides, both ~0)."""
    return common.work_mismatches(a, t, settings=("prompts_per_step", "num_samples", "max_new_tokens"),
                                  tokens="generated_tokens", tokens_rtol=0.10, compare_loss=method == "online_dpo",
                                  prompt_once_counts_less=False)


def spread(xs: list[float]) -> str:
    return common.paired_summary(xs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--sides", nargs="*", choices=[f"{lib}-{v}" for lib, v in SIDES], default=None,
                    help="run only these sides (default: all); rows need both of their sides")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--results", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    order = [side for side in SIDES if args.sides is None or f"{side[0]}-{side[1]}" in args.sides]
    if not args.methods or not order or args.repeats < 1:  # before the run folder is written
        raise SystemExit(f"online_cpu.py: nothing to run (--methods {' '.join(args.methods) or '(none)'}, --sides "
                         f"{' '.join(args.sides) if args.sides is not None else '(all)'} "
                         f"{'(none)' if not order else ''}, --repeats {args.repeats}); give at least one method, "
                         "one side and one repeat")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.results) / f"online-{stamp}"
    spec = common.prepare_scenario(common.SCENARIOS["small"], run_dir)
    shared = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts-per-step", str(args.prompts_per_step),
              "--max-new-tokens", str(args.max_new_tokens)]
    load_start = os.getloadavg()
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for method in args.methods:
            for lib, variant in order[rep % len(order):] + order[:rep % len(order)]:
                tag = f"{method}-{lib}-{variant}-r{rep}"
                res = run_side(lib, variant, method, spec, run_dir, shared, args.threads, tag, args.timeout)
                runs.setdefault((method, lib, variant), []).append(res)
                got = (f"{res['steps_per_s']:.3f} steps/s, {res['generated_tokens_per_s']:.0f} gen tok/s, "
                       f"{res['cpu_seconds']:.2f} CPU s, loss {res['final_loss']}" if res.get("status") == "ok"
                       else f"{res['status']}: {res.get('reason', '')}")
                print(f"[online_cpu] {tag}: {got}", flush=True)
    lines = [f"{'method':<11} {'ak / trl setting':<17} | {'steps/s ak':>10} {'trl':>7} | {'paired x (wall)':>20} | "
             f"{'paired x (CPU s/step)':>22} | {'gen tok/s ak':>12} {'trl':>7}", "-" * 114]
    rows = []
    for method in args.methods:
        for ak_variant, variant in ROWS:
            ak = runs.get((method, "alignkit", ak_variant), [])
            tr = runs.get((method, "trl", variant), [])
            # repeat i of each side; failed runs and pairs that did not do the same work are named, not dropped
            pairs, excluded, failed = common.pair_repeats(ak, tr, lambda a, t, m=method: same_work(a, t, m))
            wall = [a["steps_per_s"] / t["steps_per_s"] for a, t in pairs]
            cpu = [t["cpu_seconds"] / a["cpu_seconds"] for a, t in pairs]
            med = lambda rs, k: statistics.median(r[k] for r in rs if r.get("status") == "ok") if any(  # noqa: E731
                r.get("status") == "ok" for r in rs) else float("nan")
            row = {"method": method, "alignkit_setting": ak_variant, "trl_setting": variant, "wall_ratios": wall,
                   "cpu_ratios": cpu,
                   "alignkit_steps_per_s": med(ak, "steps_per_s"), "trl_steps_per_s": med(tr, "steps_per_s"),
                   "alignkit_gen_tok_s": med(ak, "generated_tokens_per_s"), "trl_gen_tok_s": med(tr, "generated_tokens_per_s"),
                   "alignkit_final_loss": [a.get("final_loss") for a in ak], "trl_final_loss": [t.get("final_loss") for t in tr],
                   "not_comparable": excluded, "failed_runs": failed}
            rows.append(row)
            f = lambda k, fmt: "—" if row[k] != row[k] else format(row[k], fmt)  # noqa: E731  (nan: no ok run)
            lines.append(f"{method:<11} {ak_variant + ' / ' + variant:<17} | {f('alignkit_steps_per_s', '.3f'):>10} "
                         f"{f('trl_steps_per_s', '.3f'):>7} | {spread(wall):>20} | {spread(cpu):>22} | "
                         f"{f('alignkit_gen_tok_s', '.0f'):>12} {f('trl_gen_tok_s', '.0f'):>7}"
                         f"{common.repeats_note(len(pairs), min(len(ak), len(tr)), excluded, failed)}")
    lines.append("x = alignkit / TRL (> 1: alignkit faster), median (min-max; the median's distribution-free CI) over the paired repeats; CPU ratio = "
                 "TRL CPU s / alignkit CPU s over the same timed steps.")
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(args.results) / f"online-{stamp}.json"
    out.write_text(json.dumps({"timestamp": stamp, "args": vars(args), "load_avg_start": load_start,
                               "load_avg_end": os.getloadavg(), "cpu_count": os.cpu_count(), "rows": rows,
                               "runs": {"/".join(k): v for k, v in runs.items()}, "table": report}, indent=2, default=str))
    print(f"[online_cpu] wrote {out}; load average {load_start} -> {os.getloadavg()}")


if __name__ == "__main__":
    main()
