"""`alignkit demo`: the bundled end-to-end pipeline (SFT -> reward model -> DPO with ReFT and LoRA -> held-out
evaluation, `alignkit.demos.pipeline`) on a CPU; `alignkit demo --reft`: the ReFT demo (a tiny random model
learns a dozen answers, `alignkit.demos.reft`). The ReFT demo's own options (--max-steps, --target-loss,
--learning-rate, --pairs) select it too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

# the smallest --scale whose run the reduced floors were measured at (alignkit.demos.pipeline_report.REDUCED_FLOORS)
MEASURED_SCALE = 0.4
# what each demo writes in its folder (tests check it): a folder holding anything else is refused
PIPELINE_WRITES = ("base", "sft", "reward_model", "dpo_reft", "dpo_lora", "results.json", "table.txt")
REFT_WRITES = ("base", "reft", "run")
REFT_DEFAULTS = {"max_steps": 300, "target_loss": 0.05, "learning_rate": 2e-2, "pairs": None}


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = "the whole pipeline on a bundled tiny model and data (CPU, minutes); --reft: the ReFT demo"
    demo = sub.add_parser("demo", help=text, description=f"alignkit demo: {text}. Each option: its type, then its "
                          "default.")
    demo.add_argument("--reft", action="store_true",
                      help="run the ReFT demo instead of the pipeline (flag, default off)")
    demo.add_argument("--output-dir", default=None, metavar="DIR",
                      help="run folder (str, default runs/demo, or runs/demo-reft)")
    demo.add_argument("--seed", type=int, default=0, metavar="INT", help="random seed (int, default 0)")
    demo.add_argument("--scale", type=float, default=None, metavar="FLOAT",
                      help="pipeline: multiply every stage's steps, e.g. 0.2 (float, default 1.0)")
    demo.add_argument("--threads", type=int, default=None, metavar="INT",
                      help="torch CPU threads (int, default 1 for the pipeline, which is fastest at this size; "
                           "torch's choice for --reft)")
    demo.add_argument("--dry-run", action="store_true",
                      help="check the options and --output-dir as the demo does before it writes (--reft: the "
                           "--pairs file too), print what it would run and exit; writes nothing, builds no model")
    reft = demo.add_argument_group("ReFT demo (--reft; any of these selects it)")
    reft.add_argument("--max-steps", type=int, default=None, metavar="INT",
                      help=f"steps at most (int, default {REFT_DEFAULTS['max_steps']})")
    reft.add_argument("--target-loss", type=float, default=None, metavar="FLOAT",
                      help=f"stop once the loss is below this (float, default {REFT_DEFAULTS['target_loss']})")
    reft.add_argument("--learning-rate", type=float, default=None, metavar="FLOAT",
                      help=f"learning rate (float, default {REFT_DEFAULTS['learning_rate']})")
    reft.add_argument("--pairs", default=None, metavar="PATH",
                      help="JSONL of {prompt, response} (str, default the bundled pairs)")
    demo.set_defaults(func=run)


def pipeline_available() -> bool:
    return importlib.util.find_spec("alignkit.demos.pipeline") is not None


def check_args(args: argparse.Namespace, wants_reft: bool) -> None:
    """Refuse, in one line naming the flag, a value the demo would fail on after writing its folder (a negative
    --threads or --learning-rate, --scale 0), or would take without it meaning anything (--threads 0 ran on the
    default; --target-loss nan never stops; --max-steps -1 is the Trainer's "use epochs")."""
    if wants_reft and args.scale is not None:
        raise ConfigError(f"--scale {args.scale:g}: the pipeline demo's option, which the ReFT demo does not read; "
                          "its length is --max-steps (and --target-loss)")
    checks = [("--threads", args.threads, lambda v: v >= 1, "an integer >= 1"),
              ("--scale", args.scale, lambda v: math.isfinite(v) and v > 0, "a finite number > 0, e.g. 0.4")]
    if wants_reft:
        checks += [("--max-steps", args.max_steps, lambda v: v >= 1, "an integer >= 1"),
                   ("--target-loss", args.target_loss, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
                   ("--learning-rate", args.learning_rate, lambda v: math.isfinite(v) and v > 0,
                    "a finite number > 0, e.g. 0.02")]
    for flag, value, ok, want in checks:
        if value is not None and not ok(value):
            raise ConfigError(f"{flag} {value}: must be {want}")
    if args.pairs is not None and not Path(args.pairs).is_file():
        raise ConfigError(f"--pairs {args.pairs}: no such file (a JSONL of {{\"prompt\": ..., \"response\": ...}} "
                          f"lines; relative paths are read from {Path.cwd()})")
    out = Path(args.output_dir or ("runs/demo-reft" if wants_reft else "runs/demo"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: is a file, not a folder; name a folder (created if missing)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (REFT_WRITES if wants_reft else PIPELINE_WRITES)) \
        if out.is_dir() else []
    if foreign:
        raise ConfigError(f"--output-dir {out}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                          f"which the demo does not write: its folders would be mixed into another run's; choose a "
                          f"new or empty folder (or an earlier demo's, which it writes over)")
    if not wants_reft and args.scale is not None and args.scale < MEASURED_SCALE:
        logger.warning("--scale %g is below %g, the smallest scale the demo's reduced floors were measured at: "
                       "a healthy run this short can fall below them", args.scale, MEASURED_SCALE)


def run(args: argparse.Namespace) -> int:
    import torch

    wants_reft = args.reft or any(getattr(args, k) is not None for k in REFT_DEFAULTS)
    check_args(args, wants_reft)
    if getattr(args, "dry_run", False):
        return dry_run(args, wants_reft)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not wants_reft and pipeline_available():
        return run_pipeline(args)
    if not wants_reft:
        logger.warning("the pipeline demo (alignkit.demos.pipeline) is not available; running the ReFT demo")
    return run_reft(args)


def dry_run(args: argparse.Namespace, wants_reft: bool) -> int:
    """`alignkit demo --dry-run`: the checks the demo makes before it writes (`check_args`: the options, --output-dir;
    --reft: the --pairs file read and parsed as the demo reads it), then what it would run, printed by the shared
    dry-run printer (`print_dry_run`); nothing is written, no model built, no torch thread count changed."""
    from alignkit.cli.runfolder import print_dry_run

    pipeline = not wants_reft and pipeline_available()
    out = Path(args.output_dir or ("runs/demo" if pipeline else "runs/demo-reft"))
    if not pipeline and not wants_reft:
        logger.warning("the pipeline demo (alignkit.demos.pipeline) is not available; the run would be the ReFT demo")
    plan: dict[str, Any] = {"command": "demo", "demo": "pipeline" if pipeline else "reft", "output_dir": str(out),
                            "seed": args.seed, "threads": args.threads}
    checked = [f"output_dir {out}: " + ("a folder of an earlier demo, written over" if out.is_dir()
                                        else "created when the demo starts"),
               "the options' values (--threads, --scale" + ("" if pipeline else ", --max-steps, --target-loss, "
                                                               "--learning-rate") + ")"]
    if pipeline:
        plan["scale"] = 1.0 if args.scale is None else args.scale
    else:
        from alignkit.demos.reft import load_demo_pairs

        plan.update({k: getattr(args, k) if getattr(args, k) is not None else v for k, v in REFT_DEFAULTS.items()})
        pairs = load_demo_pairs(args.pairs)  # a DataError naming the file and line, as the run gives it
        checked.append(f"pairs: {args.pairs or 'the bundled pairs'}, {len(pairs)} (prompt, response) record(s)")
    print_dry_run(plan, checked, "; nothing was written, no model built")
    return 0


INTRO = """alignkit demo: the whole alignment pipeline on a tiny model built here, on bundled data.
  1. SFT of a random tiny Llama on questions about coloured animals (about 30% of the answers in the
     house style: they start with 'Sure!' and end with 'Hope this helps!');
  2. a reward model trained on preference pairs (house style preferred);
  3. DPO from the SFT model, once with a LoReFT adapter and once with LoRA;
  4. evaluation on held-out prompts and pairs (colour/animal pairs no training file contains).
"""


def run_pipeline(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from alignkit.demos.pipeline import run_pipeline_demo

    if not args.verbose:  # the reward model's "LOAD REPORT" (new score head) is expected: keep stderr readable
        hf_logging.set_verbosity_error()
    if not args.quiet:
        print(INTRO, flush=True)
    extra = {"threads": args.threads} if args.threads else {}
    scale = 1.0 if args.scale is None else args.scale
    res = run_pipeline_demo(args.output_dir or "runs/demo", scale=scale, seed=args.seed,
                            progress=not args.quiet, **extra)
    print(res.table())
    print(examples(res.output_dir))
    floors = res.floors()
    short = res.shortfalls()
    print(f"\nexpected on held-out data{'' if res.scale >= 1 else ' (scaled-down run: reduced floors)'}: SFT loss "
          f"<= {floors['sft_loss_ratio']:g}x its start, reward-model accuracy >= {floors['rm_accuracy']:g}, for DPO "
          f"with each adapter reward accuracy >= {floors['dpo_reward_accuracy']:g}, greedy style score >= "
          f"{floors['rule_greedy']:g} and on-topic rate >= {floors['on_topic_greedy']:g}")
    if short:
        why = (f"--scale {res.scale:g} is below {MEASURED_SCALE:g}, where the reduced floors were measured: a run "
               f"this short can fall below them; run with --scale {MEASURED_SCALE:g} or more to check the stack"
               if res.scale < MEASURED_SCALE else "a healthy run of this demo never falls below these floors, so "
               "something in the stack is wrong: check the versions with `pip list` against constraints.txt")
        print("alignkit demo: FAILED: " + "; ".join(short) + f" (outputs kept in {res.output_dir}; {why})",
              file=sys.stderr)
        return 1
    print("all held-out figures at or above their floors")
    return 0


def examples(root: Any, count: int = 3) -> str:
    """A few held-out prompts with the greedy answers of the SFT model and of both DPO adapters."""
    columns = [("SFT", "sft"), ("DPO+ReFT", "dpo_reft"), ("DPO+LoRA", "dpo_lora")]
    rows: dict[str, list[dict]] = {}
    for label, folder in columns:
        path = Path(root) / folder / "generations_greedy.jsonl"
        if not path.exists():
            return ""
        with path.open(encoding="utf-8") as f:
            rows[label] = [json.loads(line) for line in f if line.strip()]
    step = max(len(rows["SFT"]) // count, 1)
    lines = ["", "held-out examples (greedy):"]
    for i in range(0, min(len(rows["SFT"]), step * count), step):
        prompt = rows["SFT"][i]["prompt"].replace("\n", " | ")
        lines.append(f"  {prompt}")
        for label, _ in columns:
            r = rows[label][i]
            mark = "follows the rule" if r.get("follows_rule") else "does not"
            lines.append(f"    {label:<9} {r['response'].strip()}   [{mark}]")
    return "\n".join(lines)


def run_reft(args: argparse.Namespace) -> int:
    from alignkit.demos.reft import run_reft_demo

    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in REFT_DEFAULTS.items()}
    res = run_reft_demo(args.output_dir or "runs/demo-reft", max_steps=opts["max_steps"],
                        target_loss=opts["target_loss"], learning_rate=opts["learning_rate"], seed=args.seed,
                        pairs_file=opts["pairs"], progress=not args.quiet)
    width = max(len(p) for p in res.prompts)
    print(f"\nReFT demo: {res.steps} steps, final loss {res.losses[-1]:.4g}" if res.losses else "\nReFT demo")
    print(f"{'prompt':<{width}} | {'before (base model)':<24} | after (base + ReFT)")
    print("-" * (width + 52))
    for p, b, a, want in zip(res.prompts, res.before, res.after, res.answers):
        b = "".join(c if c.isprintable() else "?" for c in b)[:24]
        mark = "ok" if a.strip() == want.strip() else f"expected {want!r}"
        print(f"{p:<{width}} | {b:<24} | {a.strip()}  [{mark}]")
    print(f"\n{res.num_correct}/{len(res.answers)} answers reproduced. ReFT saved to {res.output_dir}/reft "
          f"(load it with alignkit.adapters.load_adapter).")
    return 0 if res.num_correct == len(res.answers) else 1


__all__ = ["add_parser", "pipeline_available", "run", "run_pipeline", "run_reft"]
