"""Command line: `alignkit <command> --config file.yaml key.sub=value ...` (also `python -m alignkit`).

    alignkit sft      --config configs/sft-tiny.yaml train.max_steps=10
    alignkit rm | dpo | kto ...         train a reward model / preference-optimise (same layout)
    alignkit eval     --config configs/eval-rm-tiny.yaml   reward-model or DPO reward accuracy on a dataset
    alignkit generate --config configs/generate-tiny.yaml  generations for a prompts file, as JSONL
    alignkit online-dpo | grpo | rloo | ppo --config configs/grpo-tiny.yaml   online alignment (cli/online.py)
    alignkit sample | annotate --config ...   an offline round as two jobs, through files (cli/rounds.py)
    alignkit serve    --base DIR --adapter NAME=DIR ...   OpenAI-compatible server + chat page (cli/serve.py)
    alignkit demo                        the bundled end-to-end pipeline (`--reft`: the ReFT demo)
    alignkit ls [section]                every registry: losses, interventions, readers, formatters, ...

One module per command (`alignkit.cli.<name>`, each with `add_parser(sub)` and `run(args) -> int`).
Configs are typed (`alignkit.settings`); the run folder layout is in `alignkit.runs`. Under
`accelerate launch -m alignkit ...` only the main process writes the config, plots and model card.
Only this package prints (results tables); the library logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from alignkit.cli import demo, evaluate, generate, listing, online, rounds, serve, train

COMMANDS = (train, online, rounds, evaluate, generate, serve, demo, listing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models: ReFT, LoRA, full finetuning "
                                     "with SFT, reward modeling, DPO-family and KTO objectives.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks on config errors)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignkit.data.records import DataError
    from alignkit.guards import NonFiniteError
    from alignkit.settings import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        from alignkit.cli.flags import translate_argv

        parsed_argv = translate_argv(parser, argv)  # TRL-style --flags -> key=value overrides
    except ConfigError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(parsed_argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, NonFiniteError) as e:
        if args.verbose:
            raise
        print(f"alignkit {args.command}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
