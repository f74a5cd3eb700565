"""The parsers of the config-driven commands and their `--help` text: every settable key with its type and default.

Imports only `alignkit.settings` (no torch), so `alignkit dpo --help` answers at once: `alignkit.cli.build_parser`
registers a command's parser from here when only its help is asked for, and the command modules register the
same parser (`add_command_parser`) before attaching their `run` function.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from alignkit.settings import CONFIG_CLASSES
from alignkit.settings.train import ONLINE_COMMANDS, ONLINE_TRAIN_KEYS, TRAIN_COMMANDS, TRAIN_KEYS, train_defaults
from alignkit.settings.typed import type_name

# command -> (writes a run folder: --resume / --overwrite, may run a config's code: --allow-code)
CONFIG_COMMANDS: dict[str, tuple[bool, bool]] = {
    "sft": (True, False), "rm": (True, False), "dpo": (True, False), "kto": (True, False),
    "online-dpo": (True, True), "grpo": (True, True), "rloo": (True, True), "ppo": (True, True),
    "eval": (False, False), "generate": (False, False), "sample": (False, False), "annotate": (False, True),
    "augment": (False, False),
}
# commands that add their files to output_dir as one set (`run_commit.output_set`): an earlier set there is
# refused unless --overwrite (`runfolder.check_earlier_outputs`)
REPLACE_COMMANDS = ("eval", "generate", "augment")
# commands whose config has the key `overwrite`: their --overwrite flag sets it (`runfolder.config_from_args`), so
# `--overwrite` and `overwrite=true` (or `overwrite: true` in the YAML) are one setting
OVERWRITE_KEY_COMMANDS = (*REPLACE_COMMANDS, "sample", "annotate")
# what --overwrite (the key `overwrite`) does for each of them
OVERWRITE_HELP = {"sample": "sample again even when output_dir holds a complete samples.jsonl",
                  "annotate": "annotate again even when output_dir holds a complete records.jsonl"}


# example overrides for `key=value`'s help, the first two that `command` takes (`override_example`)
EXAMPLE_OVERRIDES = ("method.beta=0.05", "method.kl_coef=0.05", "train.learning_rate=1e-4",
                     "generation.max_new_tokens=32",
                     "sampling.max_new_tokens=32", "annotator.batch_size=8", "port=8080", "data.max_records=100",
                     "output_dir=runs/x")


def override_example(command: str) -> str:
    """Two `key=value` overrides `command`'s config takes (the help showed method.beta to eval and serve)."""
    keys = {k for k, _, _ in settable_keys(command)}
    return " ".join([e for e in EXAMPLE_OVERRIDES if e.split("=")[0] in keys][:2])


def add_config_arguments(parser: argparse.ArgumentParser, command: str, run_folder: bool = False) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="check what the run checks before it writes "
                        "(config, output_dir, each data path and its first row, model / adapter / annotator folders; "
                        "serve: the base's chat template), print the resolved config and what was checked, and exit; "
                        "writes nothing, loads no model, imports no code named in the config")
    if run_folder:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in output_dir from its newest complete checkpoint "
                                 "(metrics.jsonl continues; incomplete checkpoints are skipped)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing output_dir as a whole: the new run is written beside it and "
                                 "swapped in when it finishes (the old run stays untouched if the new one fails)")
    elif command in OVERWRITE_KEY_COMMANDS:
        what = OVERWRITE_HELP.get(command, f"replace the outputs of an earlier `alignkit {command}` in output_dir "
                                           "(refused without it; its files are replaced only once the new ones are "
                                           "written)")
        parser.add_argument("--overwrite", action="store_true",
                            help=f"{what}; the same as the key overwrite=true (or `overwrite: true` in the YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"dotted overrides parsed as YAML scalars, e.g. {override_example(command)}")


def add_allow_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-code", action="store_true",
                        help="let annotator.function name code outside alignkit.rewards (it is imported and called on "
                             "every sample; only for code you have read)")


def add_command_parser(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    """The parser of config command `name` (`CONFIG_COMMANDS`), its epilog listing every key."""
    run_folder, allow_code = CONFIG_COMMANDS[name]
    description = f"alignkit {name}: {text}." + (" Strategies: alignkit ls augment." if name == "augment" else "")
    p = sub.add_parser(name, help=text, description=description, epilog=keys_epilog(name),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, name, run_folder=run_folder)
    if allow_code:
        add_allow_code(p)
    return p


# ---------------------------------------------------------------------------------------------- the key listing

def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _section_class(tp: Any) -> tuple[type | None, str]:
    """The dataclass of a section annotation (`X`, `X | None`, or `list[X]`: its items, key suffix "[]"), else
    (None, "")."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], "[]" if typing.get_origin(tp) is list else ""
    return None, ""


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def settable_keys(command: str) -> list[tuple[str, str, str]]:
    """(dotted key, type, default) of every key `command`'s config takes, in the config class's order."""
    out: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str, instance: Any) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            key, tp = prefix + f.name, hints[f.name]
            if prefix == "" and f.name == "train":
                keys = ONLINE_TRAIN_KEYS if command in ONLINE_COMMANDS else TRAIN_KEYS
                defaults = train_defaults(command)
                out.extend((f"train.{k}", type_name(TRAIN_KEYS[k][0]), _show(defaults.get(k))) for k in keys)
                continue
            default = getattr(instance, f.name) if instance is not None else _default(f)
            section, items = _section_class(tp)
            if section is not None:
                walk(section, key + items + ".", default if dataclasses.is_dataclass(default) else None)
            else:
                out.append((key, type_name(tp), _show(default)))

    walk(CONFIG_CLASSES[command], "", None)
    return out


def keys_epilog(command: str) -> str:
    """`--help` text: every key with its type and default, then where the train vocabulary comes from."""
    rows = settable_keys(command)
    width = max(len(k) for k, _, _ in rows)
    lines = ["keys (set in the YAML config, as key=value, or as TRL-style --flags; default after '='):"]
    lines += [f"  {k.ljust(width)}  {t} = {d}" for k, t, d in rows]
    if command in TRAIN_COMMANDS:
        lines.append("  train.*: also any other transformers.TrainingArguments field (its default)")
    elif command in ONLINE_COMMANDS:
        lines.append("  train.*: the same keys as the offline commands (alignkit.settings.train); method: the "
                     "objective")
    return "\n".join(lines)


__all__ = ["CONFIG_COMMANDS", "OVERWRITE_HELP", "OVERWRITE_KEY_COMMANDS", "REPLACE_COMMANDS", "add_allow_code",
           "add_command_parser", "add_config_arguments", "keys_epilog", "override_example", "settable_keys"]
