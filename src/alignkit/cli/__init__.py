"""Command line: `alignkit <command> --config file.yaml key.sub=value ...` (also `python -m alignkit`).

    alignkit sft      --config configs/sft-tiny.yaml train.max_steps=10
    alignkit rm | dpo | kto ...         train a reward model / preference-optimise (same layout)
    alignkit eval     --config configs/eval-rm-tiny.yaml   reward-model or DPO reward accuracy on a dataset
    alignkit generate --config configs/generate-tiny.yaml  generations for a prompts file, as JSONL
    alignkit online-dpo | grpo | rloo | ppo --config configs/grpo-tiny.yaml   online alignment (cli/online.py)
    alignkit sample | annotate --config ...   an offline round as two jobs, through files (cli/rounds.py)
    alignkit augment  --config configs/augment-code-bugs.yaml   new training data from old (cli/augment.py)
    alignkit serve    --base DIR --adapter NAME=DIR ...   OpenAI-compatible server + chat page (cli/serve.py)
    alignkit vllm-serve --model DIR [--enable-lora]   a vLLM engine for online training (cli/vllm_serve.py)
    alignkit demo                        the bundled end-to-end pipeline (`--reft`: the ReFT demo)
    alignkit ls [section]                every registry: losses, interventions, readers, formatters, ...

One module per command (`alignkit.cli.<name>`, each with `add_parser(sub)`; a config command registers with
`runfolder.add_config_command`, which reads the config and answers --dry-run before its `run(cfg, args) -> int`).
Configs are typed (`alignkit.settings`); the run folder layout is in `alignkit.runs`. Under
`accelerate launch -m alignkit ...` only the main process writes the config, plots and model card.
Only this package prints (results tables); the library logs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

# command -> (module under alignkit.cli that defines it, its one-line help). `alignkit --help` is built
# from this table alone, so it imports no torch and answers at once; `alignkit <command> --help` builds the
# command's parser from `alignkit.cli.helptext` (settings only, no torch: every key with type and default);
# `alignkit <command> ...` imports only that command's module. tests/cli/test_startup.py checks the table against what
# the modules register.
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("train", "supervised finetuning"),
    "rm": ("train", "train a reward model (pairwise Bradley-Terry or K-wise ranking)"),
    "dpo": ("train", "offline preference optimisation (DPO family, IPO, SimPO, ORPO, ...)"),
    "kto": ("train", "KTO on unpaired (desirable / undesirable) completions"),
    "online-dpo": ("online", "online DPO: pairs from the policy's own samples each step (any preference loss)"),
    "grpo": ("online", "GRPO: group-relative advantages, clipped policy gradient, KL to the reference"),
    "rloo": ("online", "RLOO: GRPO's loop with the leave-one-out baseline"),
    "ppo": ("online", "PPO with a value head and GAE (RLHF step 3)"),
    "sample": ("rounds", "offline round, job 1: the policy's responses to prompts -> samples.jsonl"),
    "annotate": ("rounds", "offline round, job 2: score samples.jsonl, build records -> records.jsonl (pairs, "
                           "labels, or best-of-n SFT data)"),
    "eval": ("evaluate", "reward-model accuracy, or DPO implicit-reward accuracy, on preference data"),
    "generate": ("generate", "generations from a model (+ adapter) for a prompts file, as JSONL"),
    "augment": ("augment", "augment data: code bugs, paraphrases, self-instruct, summaries, entities"),
    "serve": ("serve", "serve a base model + adapters (OpenAI-compatible API, chat page at /)"),
    "vllm-serve": ("vllm_serve", "a vLLM engine that online training samples from and pushes weights to "
                                 "(method.vllm_mode=server)"),
    "demo": ("demo", "the whole pipeline on a bundled tiny model and data (CPU, minutes); --reft: the ReFT demo"),
    "ls": ("listing", "list every registry: losses, interventions, readers, formatters, annotators, ..."),
}


def _wanted(argv: list[str]) -> str | None:
    """The command named in `argv` (the first token that is one), or None."""
    return next((a for a in argv if a in COMMANDS), None)


def _asks_help(argv: list[str], command: str) -> bool:
    return any(a in ("-h", "--help") for a in argv[argv.index(command) + 1:])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. With `argv`, only the module of the command it names is imported (the
    others get a stub that carries their help line); without, every command's module registers fully."""
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models: ReFT, LoRA, full finetuning "
                                     "with SFT, reward modeling, DPO-family and KTO objectives.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks on errors)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    if argv is None:
        modules = list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    else:
        wanted = _wanted(argv)
        modules = [COMMANDS[wanted][0]] if wanted else []
        if wanted and _asks_help(argv, wanted):
            from alignkit.cli.helptext import CONFIG_COMMANDS, add_command_parser

            if wanted in CONFIG_COMMANDS:  # its help alone: the parser from settings, the module not imported
                add_command_parser(sub, wanted, COMMANDS[wanted][1])
                modules = []
    for name in modules:
        importlib.import_module(f"alignkit.cli.{name}").add_parser(sub)
    for command, (_, text) in COMMANDS.items():  # stubs, in the table's order, for the commands not loaded
        if command not in sub.choices:
            sub.add_parser(command, help=text)
    return parser


def expected_errors() -> tuple[type, ...]:
    """The failures a user can cause and fix (bad config, data, paths, checkpoints, a diverging run, an optional
    package a setting needs that is not installed: ImportError)."""
    from alignkit.data.records import DataError
    from alignkit.guards import NonFiniteError, NonFiniteLogitsError, RewardStallError, StalledTrainingError
    from alignkit.run_commit import CheckpointError
    from alignkit.settings import ConfigError

    return (ConfigError, DataError, FileNotFoundError, NonFiniteError, NonFiniteLogitsError, StalledTrainingError,
            RewardStallError, CheckpointError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """The command line. As the process's entry point (`argv` None: the console script, `python -m alignkit`,
    torchrun, `accelerate launch`), a process of a multi-process run ends through
    `alignkit.distributed.exit_after_distributed_run` (see there: interpreter teardown can abort a rank
    after a successful run)."""
    code = _main(argv)
    if argv is None and "torch.distributed" in sys.modules:
        from alignkit.distributed import exit_after_distributed_run

        exit_after_distributed_run(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    if _wanted(argv) is None:  # no command: the top-level help or usage error, without importing torch
        parser.parse_args(argv)  # exits for --help and for an unknown command
        parser.print_help()
        return 2

    from alignkit.settings import ConfigError

    try:
        from alignkit.cli.flags import translate_argv

        notes: list[str] = []  # what the flags call for a warning about, logged once logging is set up
        parsed_argv = translate_argv(parser, argv, notes)  # TRL-style --flags -> key=value overrides
    except ConfigError as e:
        print(f"alignkit: error: {one_line(e)}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(parsed_argv)  # exits for --help (before any heavy import)
    # key=value overrides after an option (`... a=1 --resume b=2`): argparse fills a `nargs="*"` positional
    # once, so the later ones come back unparsed; they are overrides in their order, anything else an error
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.parse_args(parsed_argv)  # the usual "unrecognized arguments" usage error (exits 2)
    if extra:
        args.overrides = list(args.overrides) + extra
    expected = expected_errors()
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for note in notes:
        logging.getLogger("alignkit.cli.flags").warning("%s", note)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_deepspeed_cpu_notice()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with quiet_progress(args.quiet):
            return args.func(args)
    except expected as e:
        if args.verbose or args.debug:
            raise
        print(f"alignkit {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(interrupted_line(args), file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a failure alignkit does not know yet: still one line, the traceback on ask
        if args.verbose or args.debug:
            raise
        if isinstance(e, outside_errors()):  # a server down or erring, the user's annotator: not an alignkit bug
            print(f"alignkit {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"alignkit {args.command}: unexpected error: {type(e).__name__}: {one_line(e)} (run again with --debug "
              "for the traceback, and please report it)", file=sys.stderr)
        return 1


def interrupted_line(args: argparse.Namespace) -> str:
    """What Ctrl-C says: a command with a run folder (it takes --resume) names its checkpoints; the others (serve,
    eval, generate, ...) only that they stopped (serve: its log was written as it stopped)."""
    if hasattr(args, "resume"):
        return (f"alignkit {args.command}: interrupted; the checkpoints it finished are complete (continue with "
                "--resume if it wrote any)")
    return f"alignkit {args.command}: interrupted"


def outside_errors() -> tuple[type[BaseException], ...]:
    """Failures of something outside alignkit, each with its own message and fix: vLLM server mode's server (down,
    an error, another model), the user's annotator, an LLM endpoint of `augment` after its retries. Read from the
    modules only when a command loaded them (importing them here would slow every command's start)."""
    found = []
    for module, name in (("alignkit.online.vllm_client", "VllmServerError"),
                         ("alignkit.online.annotators", "AnnotatorError"), ("alignkit.augment.llm", "LLMError")):
        mod = sys.modules.get(module)
        if mod is not None:
            found.append(getattr(mod, name))
    return tuple(found)


@contextlib.contextmanager
def quiet_progress(quiet: bool):
    """--quiet: no progress bar from transformers / huggingface_hub / datasets either ("Writing model shards",
    "Loading weights", map bars) for the command, their process-wide switches restored when it returns (an
    in-process caller keeps its own)."""
    if not quiet:
        yield
        return
    # read only under --quiet, when the command is about to load them anyway (the entry point stays light)
    tf_logging = importlib.import_module("transformers.utils.logging")
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (utils.tqdm is its class)
    ds_tqdm = importlib.import_module("datasets.utils.tqdm")
    hub_states, tf_on, ds_off = dict(hub_tqdm.progress_bar_states), tf_logging.is_progress_bar_enabled(), \
        ds_tqdm.are_progress_bars_disabled()
    tf_logging.disable_progress_bar()  # also huggingface_hub's (and so datasets', which are a group of them)
    ds_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        if tf_on:
            tf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_states)
        if not ds_off and ds_tqdm.are_progress_bars_disabled():
            ds_tqdm.enable_progress_bars()


DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


def quiet_deepspeed_cpu_notice() -> None:
    """DeepSpeed, when installed, is imported by transformers / accelerate in every command and prints
    "Setting accelerator to CPU. If you have GPU ... we were unable to detect it." to stdout on a machine without
    CUDA (its own "DeepSpeed" logger and handler), interleaved with alignkit's output. That one notice is dropped
    (a filter on that logger, which DeepSpeed keeps when it adds its handler); its other messages pass."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: DEEPSPEED_CPU_NOTICE not in record.getMessage())


def one_line(e: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes its str() adds; a message that ends
    in a quoted word keeps its quote)."""
    raw = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    text = " ".join(part.strip() for part in raw.strip().splitlines() if part.strip())
    return text or type(e).__name__


__all__ = ["build_parser", "main"]
