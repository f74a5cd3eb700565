"""The side-by-side CPU suite: alignkit vs TRL (SFT, reward modeling, DPO) and vs pyreft (ReFT).

    .venv/bin/python bench/run_cpu.py                 # full suite (~6-10 min on 2 busy cores)
    .venv/bin/python bench/run_cpu.py --quick         # fewer steps, smoke check
    .venv/bin/python bench/run_cpu.py --tasks dpo --threads 2

Every run is a fresh subprocess (its own venv: alignkit's .venv, bench/.envs/trl, bench/.envs/pyreft;
make the peer envs with bench/setup_peers.sh, absent envs are skipped with a message) on the same
saved tiny Llama, the same JSONL data, batch size, steps and learning rate. Each library runs at its
defaults AND at its fastest settings (VARIANTS). Prints one table, writes
bench/results/cpu-<timestamp>.json and a PNG chart of the alignkit/peer ratios beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

ENVS = BENCH / ".envs"
SCRIPTS = {("trl", "sft"): "peers/trl_sft.py", ("trl", "rm"): "peers/trl_rm.py", ("trl", "dpo"): "peers/trl_dpo.py",
           ("pyreft", "reft"): "peers/pyreft_train.py"}

# The settings each library runs at. "default": speed knobs left alone (TRL 1.16's own defaults are
# gradient checkpointing ON and bf16 autocast ON, even on CPU; alignkit's are checkpointing off, float32,
# batches in random order, reference model run every step, and since 2026-12-01 the layout defaults
# `padding_free=None` / `share_prompt=None`: on sdpa each batch's sequences (SFT, ReFT) or shared-prompt pairs
# (RM, DPO) run as one packed row through alignkit.models.varlen: the same examples per batch, values equal to
# the padded batch up to float rounding). "fastest": each library's best knobs
# for the task: TRL checkpointing off + float32 (bf16 autocast on a CPU this small costs casts and buys
# nothing), padding-free for SFT (TRL 1.16 switches it off for DPO), precomputed reference for DPO;
# alignkit: SFT and ReFT at their defaults (packed varlen rows leave no padding for length grouping to remove,
# and random batches are TRL's batches; grouped batches measured no faster per token, and their timed window held
# 8 % fewer tokens: the sampler puts the batch holding the longest example first, inside the warm-up steps), RM
# and DPO length-grouped batches + the shared-prompt layout (one row per pair, the prompt run once;
# `share_prompt=True`) + precomputed reference (DPO). pyreft has no knobs: one run serves its rows.
FAST = ["--grad-ckpt", "off", "--precision", "fp32"]
VARIANTS = {
    "sft": {"trl": {"default": [], "fastest": FAST + ["--padding-free"]},
            "alignkit": {"default": [], "fastest": []}},
    "rm": {"trl": {"default": [], "fastest": FAST},
           "alignkit": {"default": [], "fastest": ["--group-by-length", "--share-prompt"]}},
    "dpo": {"trl": {"default": [], "fastest": FAST + ["--precompute-ref"]},
            "alignkit": {"default": [], "fastest": ["--group-by-length", "--precompute-ref", "--share-prompt"]}},
    "reft": {"pyreft": {"default": []}, "alignkit": {"default": [], "fastest": []}},
}


@dataclass
class Case:
    """One comparison: a task on a scenario, run by alignkit and one peer with shared settings."""
    task: str
    scenario: str
    peer: str
    shared: list[str]          # batch size, steps, warmup, lr, positions ...
    label: str = ""
    runs: dict = field(default_factory=dict)  # (library, variant) -> result dict
    reps: dict = field(default_factory=dict)  # (library, variant) -> every repeat's result, in order


def cases(quick: bool) -> list[Case]:
    s = ["--steps", "5", "--warmup", "1"] if quick else ["--steps", "20", "--warmup", "3"]
    mem = ["--batch-size", "4", "--steps", "1" if quick else "2", "--warmup", "1"]
    return [
        Case("sft", "small", "trl", ["--batch-size", "8", *s]),
        Case("rm", "small", "trl", ["--batch-size", "8", *s]),
        Case("dpo", "small", "trl", ["--batch-size", "8", *s]),
        Case("dpo", "dpo_memory", "trl", mem, label="32k vocab, 512 tok"),
        Case("reft", "small", "pyreft", ["--batch-size", "8", *s, "--lr", "4e-3", "--position", "l1"], label="l1"),
        Case("reft", "small", "pyreft", ["--batch-size", "8", *s, "--lr", "4e-3", "--position", "f1+l1"],
             label="f1+l1"),
        # several epochs over 64 examples (8 batches each), as pyreft's recipes train: the warm-up is the first
        # epoch, the timed steps epochs 2-4 (alignkit's defaults cache the frozen layers below the intervention)
        *[Case("reft", "epochs", "pyreft", ["--batch-size", "8", "--steps", "8" if quick else "24", "--warmup", "8",
                                            "--lr", "4e-3", "--position", pos], label=f"{pos}, epochs 2-4")
          for pos in ("l1", "f1+l1")],
    ]


def python_of(library: str) -> Path | None:
    if library == "alignkit":
        return Path(sys.executable)
    py = ENVS / library / "bin" / "python"
    return py if py.exists() else None


def run_one(library: str, task: str, variant_args: list[str], case: Case, spec_path: Path, run_dir: Path,
            threads: int, timeout: int, tag: str) -> dict:
    py = python_of(library)
    if py is None:
        return {"library": library, "status": "skipped",
                "reason": f"no env at {ENVS / library}: run bench/setup_peers.sh"}
    script = BENCH / ("alignkit_side.py" if library == "alignkit" else SCRIPTS[(library, task)])
    out = run_dir / "results" / f"{tag}.json"
    cmd = [str(py), str(script), "--spec", str(spec_path), "--run-dir", str(run_dir), "--task", task,
           "--out", str(out), "--threads", str(threads), *case.shared, *variant_args]
    log = run_dir / "logs" / f"{tag}.log"
    res, reason, wall = common.run_logged(cmd, out, log, threads, timeout)
    if res is None:
        res = {"library": library, "status": "error", "reason": reason}
    res.update(command=" ".join(cmd), wall_s=wall, log=str(log))
    return res


# ----------------------------------------------------------------------------- report
def median_result(results: list[dict]) -> dict:
    """One result from repeats: the run with the median samples/s, its speed fields replaced by the medians
    over the successful repeats, plus `repeats` (all samples/s and peak MB) and `spread` ((max-min)/median)."""
    ok = [r for r in results if _ok(r)]
    if not ok:
        return results[-1]
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    sps = sorted(ok, key=lambda r: r["samples_per_s"])
    out = dict(sps[len(sps) // 2])
    out.update(samples_per_s=med("samples_per_s"), tokens_per_s=med("tokens_per_s"), peak_rss_mb=med("peak_rss_mb"),
               repeats={"samples_per_s": [r["samples_per_s"] for r in ok], "peak_rss_mb": [r["peak_rss_mb"] for r in ok],
                        "failed": len(results) - len(ok)},
               spread=(sps[-1]["samples_per_s"] - sps[0]["samples_per_s"]) / out["samples_per_s"] if len(ok) > 1 else 0.0)
    return out


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def comparisons(all_cases: list[Case], settings: tuple[str, ...] = ("default", "fastest")) -> list[dict]:
    rows = []
    for c in all_cases:
        for variant in settings:
            a = c.runs.get(("alignkit", variant)) or c.runs.get(("alignkit", "default"))
            p = c.runs.get((c.peer, variant)) or c.runs.get((c.peer, "default"))
            if variant == "fastest" and (c.peer, "fastest") not in c.runs and ("alignkit", "fastest") not in c.runs:
                continue  # both sides have one setting: the default row says it all
            row = {"task": c.task, "scenario": c.scenario, "label": c.label, "setting": variant, "peer": c.peer,
                   "alignkit": a, "peer_result": p}
            ra = c.reps.get(("alignkit", variant)) or c.reps.get(("alignkit", "default"), [])
            rp = c.reps.get((c.peer, variant)) or c.reps.get((c.peer, "default"), [])
            # repeat i of each side ran together; pairs that did not do the same work, and runs that failed, are
            # left out of the ratios and named (row["not_comparable"], row["failed_runs"])
            pairs, excluded, failed = common.pair_repeats(ra, rp)
            row["paired_wall"] = [x["samples_per_s"] / y["samples_per_s"] for x, y in pairs]
            row["paired_cpu"] = [x["samples_per_cpu_s"] / y["samples_per_cpu_s"] for x, y in pairs
                                 if x.get("samples_per_cpu_s") and y.get("samples_per_cpu_s")]
            row["repeats_note"] = common.repeats_note(len(pairs), min(len(ra), len(rp)), excluded, failed)
            row["failed_runs"] = failed
            if _ok(a) and _ok(p):
                row["not_comparable"] = common.work_mismatches(a, p)
                if not row["not_comparable"]:  # else no ratio: the two sides did not do the same work
                    row["speed_ratio"] = a["samples_per_s"] / p["samples_per_s"]
                    row["tokens_ratio"] = a["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None
                    row["memory_ratio"] = a["peak_rss_mb"] / p["peak_rss_mb"]
            rows.append(row)
    return rows


def _cell(r: dict | None, key: str, fmt: str) -> str:
    if not _ok(r):
        return "—"
    return format(r[key], fmt)


def table(rows: list[dict]) -> str:
    head = (f"{'task':<5} {'scenario':<22} {'setting':<8} {'peer':<7} | {'samples/s ak':>12} {'peer':>8} {'x':>6} | "
            f"{'tokens/s ak':>11} {'peer':>8} {'x':>6} | {'peak MB ak':>10} {'peer':>7} {'x':>6}")
    lines = [head, "-" * len(head)]
    notes = []
    for r in rows:
        a, p = r["alignkit"], r["peer_result"]
        sc = r["scenario"] + (f" {r['label']}" if r["label"] else "")
        fx = lambda k: format(r[k], ".2f") if r.get(k) is not None else ("n/c" if r.get("not_comparable") else "—")  # noqa: E731
        lines.append(f"{r['task']:<5} {sc[:22]:<22} {r['setting']:<8} {r['peer']:<7} | "
                     f"{_cell(a, 'samples_per_s', '.1f'):>12} {_cell(p, 'samples_per_s', '.1f'):>8} "
                     f"{fx('speed_ratio'):>6} | {_cell(a, 'tokens_per_s', '.0f'):>11} {_cell(p, 'tokens_per_s', '.0f'):>8} "
                     f"{fx('tokens_ratio'):>6} | {_cell(a, 'peak_rss_mb', '.0f'):>10} {_cell(p, 'peak_rss_mb', '.0f'):>7} "
                     f"{fx('memory_ratio'):>6}")
        for side in (a, p):
            if side and not _ok(side):
                notes.append(f"  {r['task']}/{sc}/{r['setting']}: {side['library']} {side['status']}: {side['reason']}")
        if r.get("not_comparable"):
            notes.append(f"  NOT COMPARABLE {r['task']}/{sc}/{r['setting']} (n/c: no ratio): "
                         + "; ".join(r["not_comparable"]))
    spreads = [f"{r['task']}/{r['scenario']}/{r['setting']}: ak {side_spread(r['alignkit'])}, "
               f"{r['peer']} {side_spread(r['peer_result'])}" for r in rows]
    lines.append("x = alignkit / peer (speed: > 1 is alignkit faster; memory: < 1 is alignkit leaner). "
                 "ak = alignkit. Peak MB = ru_maxrss of the run's process.")
    lines.append("paired ratios, repeat by repeat (median (min-max; the median's distribution-free CI, bench/common.median_ci)): samples/s on the wall clock | samples per "
                 "CPU second of the run's process (steadier on a shared machine):")
    for r in rows:
        sc = r["scenario"] + (f" {r['label']}" if r["label"] else "")
        lines.append(f"  {r['task']:<5} {sc[:22]:<22} {r['setting']:<8} wall {_paired(r.get('paired_wall'))}  "
                     f"CPU {_paired(r.get('paired_cpu'))}  final loss ak {_loss(r['alignkit'])} / peer "
                     f"{_loss(r['peer_result'])}{r.get('repeats_note', '')}")
    return "\n".join(lines + ["noise, (max - min) / median of samples/s over repeats:"] + ["  " + x for x in spreads]
                     + sorted(set(notes)))


def _paired(xs: list[float] | None) -> str:
    return common.paired_summary(xs)


def _loss(r: dict | None) -> str:
    return f"{r['final_loss']:.4f}" if _ok(r) and r.get("final_loss") is not None else "—"


def side_spread(r: dict | None) -> str:
    if not _ok(r) or "repeats" not in r:
        return "—"
    failed = r["repeats"].get("failed")
    return f"{100 * r['spread']:.0f}% (n={len(r['repeats']['samples_per_s'])}" + (f", {failed} FAILED)" if failed else ")")


def chart(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return None
    names = [f"{r['task']} {r['label'] or r['scenario']}\n{r['setting']} vs {r['peer']}"
             + ("\nNOT COMPARABLE" if r.get("not_comparable") else "") for r in rows]
    series = [("samples/s (alignkit ÷ peer)", "speed_ratio"), ("tokens/s (alignkit ÷ peer)", "tokens_ratio"),
              ("leaner: peak RSS (peer ÷ alignkit)", "memory_ratio")]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.8))
    w = 0.27
    for k, (lab, key) in enumerate(series):
        vals = [(1 / r[key] if key == "memory_ratio" else r[key]) if r.get(key) else 0.0 for r in rows]
        ax.bar([i + (k - 1) * w for i in range(len(rows))], vals, w, label=lab)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel("ratio (> 1: alignkit better)")
    if not any(r.get("speed_ratio") for r in rows):
        ax.text(0.5, 0.5, "no alignkit/peer pairs completed", transform=ax.transAxes, ha="center")
    ax.set_title("alignkit vs TRL / pyreft on CPU, same tiny Llama, data, batch and steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps: a smoke check, not a measurement")
    ap.add_argument("--tasks", nargs="*", choices=common.TASKS, default=list(common.TASKS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1: stable on a shared machine; 2 on a quiet one)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="keep the comparisons whose 'task/scenario/label' contains one of these, e.g. small/f1+l1")
    ap.add_argument("--skip-alignkit", action="store_true")
    ap.add_argument("--settings", nargs="*", choices=["default", "fastest"], default=["default", "fastest"],
                    help="which settings to run (e.g. --settings fastest for more repeats of the fastest rows only)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every (library, variant) this many times, interleaved; the table shows medians")
    ap.add_argument("--results", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    every = cases(args.quick)
    todo = [c for c in every if c.task in args.tasks and (
        not args.only or any(o in f"{c.task}/{c.scenario}/{c.label}" for o in args.only))]
    if args.repeats < 1:
        raise SystemExit(f"run_cpu.py: --repeats {args.repeats} runs nothing; give 1 or more")
    if not todo:  # before anything is written: an empty table and a results file would look like a run
        names = sorted({f"{c.task}/{c.scenario}/{c.label}" for c in every})
        raise SystemExit(f"run_cpu.py: --tasks {' '.join(args.tasks) or '(none)'} --only {' '.join(args.only or [])} "
                         f"select no comparison; --only matches part of one of: {', '.join(names)}")

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.results)
    run_dir = out_dir / f"cpu-{stamp}"
    specs = {}
    for name in sorted({c.scenario for c in todo}):
        specs[name] = common.prepare_scenario(common.SCENARIOS[name], run_dir)
    print(f"[run_cpu] run folder {run_dir}; threads {args.threads}; {len(todo)} comparisons")
    for c in todo:
        libs = ([] if args.skip_alignkit else ["alignkit"]) + [c.peer]
        reps: dict[tuple[str, str], list[dict]] = {}
        # interleave libraries variant by variant, repeat by repeat, so machine noise hits both sides alike
        for rep in range(args.repeats):
            for wanted in args.settings:
                for lib in libs:
                    variant, extra = wanted, VARIANTS[c.task][lib].get(wanted)
                    if extra is None and "default" not in args.settings:  # one setting serves both rows (pyreft)
                        variant, extra = "default", VARIANTS[c.task][lib].get("default")
                    if extra is None:
                        continue
                    tag = f"{c.task}-{c.scenario}-{c.label or 'base'}-{lib}-{variant}-r{rep}".replace("+", "_")
                    res = run_one(lib, c.task, extra, c, specs[c.scenario], run_dir, args.threads, args.timeout, tag)
                    reps.setdefault((lib, variant), []).append(res)
                    got = (f"{res['samples_per_s']:.1f} samples/s, {res['tokens_per_s']:.0f} tok/s, "
                           f"{res['peak_rss_mb']:.0f} MB" if _ok(res) else f"{res['status']}: {res.get('reason', '')}")
                    print(f"[run_cpu] {tag}: {got} ({res.get('wall_s', 0):.0f} s)", flush=True)
        c.runs = {key: median_result(rs) for key, rs in reps.items()}
        c.reps = reps

    rows = comparisons(todo, tuple(args.settings))
    report = table(rows)
    print("\n" + report)
    out_dir.mkdir(parents=True, exist_ok=True)
    dur = time.perf_counter() - t_start
    payload = {"timestamp": stamp, "threads": args.threads, "repeats": args.repeats, "quick": args.quick, "duration_s": dur,
               "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "run_dir": str(run_dir),
               "scenarios": {n: common.SCENARIOS[n] for n in specs},
               "runs": [{"task": c.task, "scenario": c.scenario, "label": c.label, "variant": v, **r}
                        for c in todo for (lib, v), r in c.runs.items()],
               "comparisons": [{k: v for k, v in r.items() if k not in ("alignkit", "peer_result")} for r in rows],
               "table": report}
    jpath = out_dir / f"cpu-{stamp}.json"
    jpath.write_text(json.dumps(payload, indent=2, default=str))
    png = chart(rows, out_dir / f"cpu-{stamp}.png")
    print(f"\n[run_cpu] wrote {jpath}" + (f" and {png}" if png else "") + f"; suite took {dur:.0f} s")


if __name__ == "__main__":
    main()
