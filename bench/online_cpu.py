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

    .venv/bin/python bench/online_cpu.py --vllm --methods grpo --sides alignkit-hd64 alignkit-vllm trl-hd64

`--vllm` adds the vLLM rows (bench/online_vllm.py): on the "small_hd64" model (2 heads of 64), alignkit with
transformers generation and with a colocated vLLM engine, both in vLLM's env (`--vllm-python`, default
.venv-vllm: `make vllm-env`), and TRL fastest; paired ratios vLLM / transformers generation and each / TRL. A pair
whose generations are not real (rows cut short without an end token, copies, a non-finite loss) gets no ratio.
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
import online_vllm  # noqa: E402

METHODS = {"grpo": ["--num-samples", "4", "--beta", "0.04", "--lr", "1e-6"],
           "online_dpo": ["--num-samples", "2", "--beta", "0.1", "--lr", "5e-7"]}
SIDES = {("alignkit", "default"): [], ("trl", "default"): [],
         ("trl", "fastest"): ["--grad-ckpt", "off", "--precision", "fp32"],
         ("alignkit", "fastest"): ["--share-prompt"],  # share_prompt=True (the CPU default resolves to it too)
         ("alignkit", "multinomial"): ["--sampler", "multinomial"]}  # the default but generate's own draws
# (side a, side b) of each table row: ratios a / b
ROWS = [(("alignkit", a), ("trl", t)) for a, t in (("default", "default"), ("default", "fastest"),
                                                   ("fastest", "fastest"), ("multinomial", "fastest"))]


def side_setup(lib: str, variant: str, args: argparse.Namespace, specs: dict) -> tuple[Path, Path, list[str], dict]:
    """(python, scenario spec, extra arguments, extra environment) of one side."""
    if (lib, variant) in online_vllm.SIDES:
        env, extra = online_vllm.SIDES[(lib, variant)]
        py = Path(args.vllm_python) if env == "vllm" else Path(args.trl_python)
        return py, specs[online_vllm.SCENARIO], extra, online_vllm.env_extra() if env == "vllm" else {}
    py = Path(sys.executable) if lib == "alignkit" else Path(args.trl_python)
    return py, specs["small"], SIDES[(lib, variant)], {}


def run_side(lib: str, variant: str, method: str, args: argparse.Namespace, specs: dict, run_dir: Path,
             shared: list[str], tag: str) -> dict:
    py, spec, extra, env = side_setup(lib, variant, args, specs)
    if not py.exists():
        fix = "make vllm-env, or give --vllm-python" if env else "run bench/setup_peers.sh, or give --trl-python"
        return {"status": "skipped", "reason": f"no env at {py.parent.parent}: {fix}"}
    script = BENCH / ("online_alignkit.py" if lib == "alignkit" else "peers/trl_online.py")
    out = run_dir / "results" / f"{tag}.json"
    cmd = [str(py), str(script), "--spec", str(spec), "--run-dir", str(run_dir), "--method", method, "--out", str(out),
           "--threads", str(args.threads), *METHODS[method], *shared, *extra]
    log = run_dir / "logs" / f"{tag}.log"
    res, reason, _ = common.run_logged(cmd, out, log, args.threads, args.timeout, env_extra=env)
    if res is None:
        res = {"status": "error", "reason": reason}
    res.update(command=" ".join(cmd), log=str(log))
    return res


def same_work(a: dict, t: dict, method: str) -> list[str]:
    """`common.work_mismatches` of an online pair: the same steps, prompts, samples and token budget, generated
    tokens within 10 % (sampled, so not equal), finite losses, and equal ones for online DPO only (GRPO's losses are
    different normalisations on the two sides, both ~0); and rows that are real generations on both sides
    (`online_vllm.tally_problems`: none cut short without an end token, none over the budget, not copies)."""
    return common.work_mismatches(a, t, settings=("prompts_per_step", "num_samples", "max_new_tokens"),
                                  tokens="generated_tokens", tokens_rtol=0.10, compare_loss=method == "online_dpo",
                                  prompt_once_counts_less=False) + online_vllm.tally_problems(a) + \
        online_vllm.tally_problems(t)


def spread(xs: list[float]) -> str:
    return common.paired_summary(xs)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """The arguments and the sides to run; a selection of nothing refused before the run folder is written."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = [f"{lib}-{v}" for lib, v in [*SIDES, *online_vllm.SIDES]]
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--sides", nargs="*", choices=every, default=None,
                    help="run only these sides (default: all; the hd64 / vllm ones with --vllm); rows need both sides")
    ap.add_argument("--vllm", action="store_true", help="add the vLLM rows (bench/online_vllm.py)")
    ap.add_argument("--vllm-python", default=str(online_vllm.default_python()))
    ap.add_argument("--trl-python", default=str(BENCH / ".envs" / "trl" / "bin" / "python"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--results", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    known = [*SIDES, *online_vllm.SIDES] if args.vllm else list(SIDES)
    order = [side for side in known if args.sides is None or f"{side[0]}-{side[1]}" in args.sides]
    needs_vllm = [s for s in args.sides or [] if tuple(s.split("-", 1)) in online_vllm.SIDES]
    if needs_vllm and not args.vllm:
        raise SystemExit(f"online_cpu.py: --sides {' '.join(needs_vllm)}: the vLLM rows' sides run with --vllm; add it")
    if args.vllm and args.warmup < 1:
        raise SystemExit(f"online_cpu.py: --vllm with --warmup {args.warmup}: the engine starts in the first "
                         "generation call, which would be timed; give --warmup 1 or more")
    if not args.methods or not order or args.repeats < 1:  # before the run folder is written
        raise SystemExit(f"online_cpu.py: nothing to run (--methods {' '.join(args.methods) or '(none)'}, --sides "
                         f"{' '.join(args.sides) if args.sides is not None else '(all)'} "
                         f"{'(none)' if not order else ''}, --repeats {args.repeats}); give at least one method, "
                         "one side and one repeat")
    return args, order


def run_all(args: argparse.Namespace, order: list, specs: dict, run_dir: Path) -> dict:
    shared = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts-per-step", str(args.prompts_per_step),
              "--max-new-tokens", str(args.max_new_tokens)]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for method in args.methods:
            for lib, variant in order[rep % len(order):] + order[:rep % len(order)]:
                tag = f"{method}-{lib}-{variant}-r{rep}"
                res = run_side(lib, variant, method, args, specs, run_dir, shared, tag)
                runs.setdefault((method, lib, variant), []).append(res)
                got = (f"{res['steps_per_s']:.3f} steps/s, {res['generated_tokens_per_s']:.0f} gen tok/s, "
                       f"{res['cpu_seconds']:.2f} CPU s, loss {res['final_loss']}" if res.get("status") == "ok"
                       else f"{res['status']}: {res.get('reason', '')}")
                print(f"[online_cpu] {tag}: {got}", flush=True)
    return runs


def median_of(rs: list[dict], key: str) -> float:
    ok = [r[key] for r in rs if r.get("status") == "ok"]
    return statistics.median(ok) if ok else float("nan")


def table_row(method: str, a_side: tuple, b_side: tuple, runs: dict) -> tuple[dict, str]:
    """One row: repeat i of side a with repeat i of side b; failed runs and pairs that did not do the same work are
    named, not dropped; generations that are not real named per run."""
    ra, rb = runs.get((method, *a_side), []), runs.get((method, *b_side), [])
    pairs, excluded, failed = common.pair_repeats(ra, rb, lambda a, t, m=method: same_work(a, t, m))
    wall = [a["steps_per_s"] / t["steps_per_s"] for a, t in pairs]
    cpu = [t["cpu_seconds"] / a["cpu_seconds"] for a, t in pairs]
    problems = [f"{'-'.join(side)} r{i}: {p}" for side, rs in ((a_side, ra), (b_side, rb)) for i, r in enumerate(rs)
                if r.get("status") == "ok" for p in online_vllm.generation_problems(r)]
    row = {"method": method, "a": "-".join(a_side), "b": "-".join(b_side), "wall_ratios": wall, "cpu_ratios": cpu,
           "generation_problems": problems, "not_comparable": excluded, "failed_runs": failed}
    for k, side in (("a", ra), ("b", rb)):
        row.update({f"{k}_steps_per_s": median_of(side, "steps_per_s"), f"{k}_cpu_s": median_of(side, "cpu_seconds"),
                    f"{k}_gen_tok_s": median_of(side, "generated_tokens_per_s"),
                    f"{k}_final_loss": [r.get("final_loss") for r in side]})
    f = lambda k, fmt: "—" if row[k] != row[k] else format(row[k], fmt)  # noqa: E731  (nan: no ok run)
    line = (f"{method:<11} {row['a'] + ' / ' + row['b']:<34} | {f('a_steps_per_s', '.3f'):>7} {f('b_steps_per_s', '.3f'):>7} | "
            f"{spread(wall):>20} | {spread(cpu):>22} | {f('a_cpu_s', '.2f'):>6} {f('b_cpu_s', '.2f'):>6} | "
            f"{f('a_gen_tok_s', '.0f'):>6} {f('b_gen_tok_s', '.0f'):>6}"
            f"{common.repeats_note(len(pairs), min(len(ra), len(rb)), excluded, failed)}")
    if problems:
        line += f"\n    GENERATIONS NOT REAL: {'; '.join(problems)}"
    return row, line


def main(argv: list[str] | None = None) -> None:
    args, order = parse(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.results) / f"online-{stamp}"
    specs = {"small": common.prepare_scenario(common.SCENARIOS["small"], run_dir)}
    if args.vllm:
        specs[online_vllm.SCENARIO] = common.prepare_scenario(common.SCENARIOS[online_vllm.SCENARIO], run_dir)
    load_start = os.getloadavg()
    runs = run_all(args, order, specs, run_dir)
    lines = [f"{'method':<11} {'a / b':<34} | {'steps/s a':>7} {'b':>7} | {'paired x (wall)':>20} | "
             f"{'paired x (CPU s/step)':>22} | {'CPU s a':>6} {'b':>6} | {'gen tok/s a':>6} {'b':>6}", "-" * 150]
    rows = []
    for method in args.methods:
        for a_side, b_side in ROWS + (online_vllm.ROWS if args.vllm else []):
            if a_side in order or b_side in order:
                row, line = table_row(method, a_side, b_side, runs)
                rows.append(row)
                lines.append(line)
    lines.append("x = a / b (> 1: a faster), median (min-max; the median's distribution-free CI) over the paired repeats; "
                 "CPU ratio = b's CPU s / a's CPU s over the same timed steps; CPU s, steps/s, gen tok/s: medians.")
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(args.results) / f"online-{stamp}.json"
    out.write_text(json.dumps({"timestamp": stamp, "args": vars(args), "load_avg_start": load_start,
                               "load_avg_end": os.getloadavg(), "cpu_count": os.cpu_count(), "rows": rows,
                               "runs": {"/".join(k): v for k, v in runs.items()}, "table": report}, indent=2, default=str))
    print(f"[online_cpu] wrote {out}; load average {load_start} -> {os.getloadavg()}")


if __name__ == "__main__":
    main()
