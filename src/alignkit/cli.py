"""Command line: `alignkit <command> ...`. For now one command, `alignkit demo` (the ReFT demo).

Kept small on purpose: each command is a function `cmd_<name>(args) -> int` registered in `build_parser`;
the library logs through `logging`, and only this module prints (the final table).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models: ReFT, LoRA, full finetuning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    demo = sub.add_parser("demo", help="ReFT demo: a tiny random model learns a dozen answers (CPU, < 1 minute)")
    demo.add_argument("--output-dir", default="runs/demo", help="where base/, reft/ and run/ go (default: runs/demo)")
    demo.add_argument("--max-steps", type=int, default=300, help="training steps at most (default: 300)")
    demo.add_argument("--target-loss", type=float, default=0.05, help="stop once the loss is below this (default: 0.05)")
    demo.add_argument("--learning-rate", type=float, default=2e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--pairs", default=None, help="JSONL of {prompt, response} (default: the bundled pairs)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from alignkit.demos.reft import run_reft_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_reft_demo(args.output_dir, max_steps=args.max_steps, target_loss=args.target_loss,
                        learning_rate=args.learning_rate, seed=args.seed, pairs_file=args.pairs,
                        progress=not args.quiet)
    width = max(len(p) for p in res.prompts)
    print(f"\nReFT demo: {res.steps} steps, final loss {res.losses[-1]:.4f}" if res.losses else "\nReFT demo")
    print(f"{'prompt':<{width}} | {'before (base model)':<24} | after (base + ReFT)")
    print("-" * (width + 52))
    for p, b, a, want in zip(res.prompts, res.before, res.after, res.answers):
        b = "".join(c if c.isprintable() else "?" for c in b)[:24]
        mark = "ok" if a.strip() == want.strip() else f"expected {want!r}"
        print(f"{p:<{width}} | {b:<24} | {a.strip()}  [{mark}]")
    print(f"\n{res.num_correct}/{len(res.answers)} answers reproduced. ReFT saved to {res.output_dir}/reft "
          f"(load it with alignkit.interventions.io.load_reft).")
    return 0 if res.num_correct == len(res.answers) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)
