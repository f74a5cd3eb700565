"""TRL-style flags (`--learning_rate 1e-4`, `--per_device_train_batch_size=2`, `--gradient_checkpointing`) as
dotted overrides, so a TRL command line works beside `train.learning_rate=1e-4`.

A flag the command's own parser does not know becomes `<section>.<name>=<value>`, the section found in
this order: TRL's names for alignkit keys (`ALIASES`: `--model_name_or_path` -> model.path,
`--dataset_name` -> data.path, `--use_peft` -> adapter.kind=lora, `--lora_r` -> adapter.lora.r, ...);
a top-level key (`output_dir`); a key of the shared `train` vocabulary (`alignkit.settings.train`:
`--learning_rate`, `--max_steps`, `--seed`, ... for every training command, offline and online); a field of
`method`, `data`, `model`, `sampling` or `annotator`; for the offline training commands, any
`transformers.TrainingArguments` field (-> `train.<name>`). A flag without
a value (followed by another flag, a `key=value` override or nothing) means true. An unknown flag is a
ConfigError naming it and the closest valid names; a launcher's flag (`--num_processes 2`, `--multi_gpu`, torchrun's
`--nproc_per_node`: `LAUNCHER_FLAGS`) is one naming the launcher command line it belongs to.
`--lora_target_modules` takes module names as TRL's (several tokens or comma-separated: a list); `--use_peft` warns
about each LoRA default of TRL's not given as a flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from typing import Any, get_type_hints

from alignkit.settings import CONFIG_CLASSES, TRAIN_COMMANDS, ConfigError, LoraSettings
from alignkit.settings.train import ONLINE_COMMANDS, ONLINE_TRAIN_KEYS, TRAIN_KEYS
from alignkit.settings.trl_names import TRL_FLAG_KEYS, trl_equivalent
from alignkit.settings.typed import parse_value

logger = logging.getLogger(__name__)

ALIASES = TRL_FLAG_KEYS  # TRL's names for alignkit keys (alignkit.settings.trl_names)
SECTIONS = ("method", "data", "model", "sampling", "annotator")


def _section_fields(cfg_cls: type) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in dataclasses.fields(cfg_cls):
        t = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        cls = None
        if t is not None:
            v = t()
            cls = type(v) if dataclasses.is_dataclass(v) else None
        elif isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            cls = f.type
        if cls is None:
            hint = get_type_hints(cfg_cls).get(f.name)
            cls = hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None
        if cls is not None:
            out[f.name] = {g.name for g in dataclasses.fields(cls)}
    return out


def resolve_flag(name: str, command: str, value: str | None = None) -> str:
    """The dotted key a TRL-style flag `--name` sets for `command` (see the module docstring); TRL's name for a setting
    alignkit spells otherwise is a ConfigError naming alignkit's (`value`, the flag's, where the answer depends on
    it)."""
    if name in ALIASES:
        return ALIASES[name]
    cfg_cls = CONFIG_CLASSES[command]
    top = {f.name for f in dataclasses.fields(cfg_cls)}
    sections = _section_fields(cfg_cls)
    if name in top and name not in sections and name != "train":
        return name
    shared = ONLINE_TRAIN_KEYS if command in ONLINE_COMMANDS else TRAIN_KEYS if command in TRAIN_COMMANDS else ()
    if name in shared:  # the shared train vocabulary wins over a same-named key elsewhere (sampling.seed)
        return f"train.{name}"
    for s in SECTIONS:
        if name in sections.get(s, ()):
            return f"{s}.{name}"
    candidates = list(ALIASES) + list(shared) + [n for s in SECTIONS for n in sections.get(s, ())]
    if command in TRAIN_COMMANDS:
        from transformers import TrainingArguments

        targs = {f.name for f in dataclasses.fields(TrainingArguments)}
        if name in targs:
            return f"train.{name}"
        candidates += sorted(targs)
    launcher = launcher_flag(name, command, value)
    if launcher is not None:
        raise ConfigError(launcher)
    instead = trl_equivalent(name, None if value is None else parse_value(value))
    if instead is not None:
        raise ConfigError(f"--{name}: not a setting of alignkit {command} ({name} is TRL's name); alignkit: {instead}")
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    raise ConfigError(f"--{name}: not a setting of alignkit {command} (TRL-style flags name a key of train, method, "
                      f"data, model{', or transformers.TrainingArguments' if command in TRAIN_COMMANDS else ''}){hint}")


# flags of the launchers (`accelerate launch`, `torchrun`), which start the processes: alignkit starts none of its own
LAUNCHER_FLAGS = {"num_processes": "accelerate launch", "multi_gpu": "accelerate launch",
                  "num_machines": "accelerate launch", "machine_rank": "accelerate launch",
                  "main_process_port": "accelerate launch", "gpu_ids": "accelerate launch",
                  "use_fsdp": "accelerate launch", "use_deepspeed": "accelerate launch",
                  "mixed_precision": "accelerate launch", "nproc_per_node": "torchrun", "nnodes": "torchrun",
                  "node_rank": "torchrun", "master_port": "torchrun"}


def launcher_flag(name: str, command: str, value: str | None = None) -> str | None:
    """The line for a launcher's flag given to an alignkit command (`--num_processes 2`): where it goes instead."""
    if name not in LAUNCHER_FLAGS:
        return None
    switch = name in ("multi_gpu", "use_fsdp", "use_deepspeed")  # flags without a value (a bare flag reads "true")
    given = "" if value is None or switch else f" {value}"
    launch = f"`{LAUNCHER_FLAGS[name]} --{name}{given} -m alignkit {command} ...`"
    if name == "mixed_precision" and command in ONLINE_COMMANDS:  # refused by the online loop (OnlineTrainer)
        return (f"--{name}: accelerate launch's flag, not a setting of alignkit {command}, whose online loop runs no "
                "mixed precision; load the model in bf16 (model.dtype=bfloat16) for bf16 compute")
    if name == "mixed_precision":
        return (f"--{name}: accelerate launch's flag, not a setting of alignkit {command}; alignkit's mixed precision "
                f"is train.bf16=true (train.fp16=true on a GPU), or start the run with {launch}")
    return (f"--{name}: {LAUNCHER_FLAGS[name]}'s flag, not a setting of alignkit {command} (alignkit starts no "
            f"processes of its own); start the processes with the launcher: {launch}")


def translate(argv: list[str], command: str, known: set[str], notes: list[str] | None = None) -> list[str]:
    """`argv` with every unknown `--flag [value]` after the command replaced by a `key=value` override. What the
    flags call for a warning about goes to `notes` when given (the CLI logs them once logging is set up), else to
    the log now."""
    out: list[str] = []
    given: set[str] = set()
    peft = False
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--" or tok.split("=", 1)[0] in known:
            out.append(tok)
            i += 1
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") and not _is_number(nxt) or ("=" in nxt and not nxt.startswith("[")):
                value = "true"
            else:
                value = nxt
                i += 1
        key = resolve_flag(name, command, value)
        if name == "use_peft":
            peft = value.lower() in ("true", "1", "yes")
            value = "lora" if peft else "full"
        if name == "lora_target_modules":
            i, value = module_names(argv, i, value, eq)
        given.add(name)
        out.append(f"{key}={value}")
        i += 1
    said = lora_defaults_note(given) if peft else None
    if said is not None and notes is not None:
        notes.append(said)
    elif said is not None:
        logger.warning("%s", said)
    return out


# TRL's ModelConfig LoRA flags whose defaults differ from alignkit's adapter.lora ones:
# flag -> (alignkit's key, TRL's default, the flag's value that gives it)
TRL_LORA_DEFAULTS = {"lora_r": ("r", "16", "16"), "lora_alpha": ("alpha", "32", "32"),
                     "lora_dropout": ("dropout", "0.05", "0.05"),
                     "lora_target_modules": ("target_modules", "peft's default modules for the architecture, q_proj "
                                                               "and v_proj for Llama", "q_proj v_proj")}


def lora_defaults_note(given: set[str]) -> str | None:
    """The warning for `--use_peft` (None: nothing to say): each LoRA setting not given as a flag takes alignkit's
    default (or the config's), which is not TRL's ModelConfig default; a TRL user got another adapter without a
    word."""
    missing = [flag for flag in TRL_LORA_DEFAULTS if flag not in given]
    if missing:
        differ = "; ".join(f"adapter.lora.{TRL_LORA_DEFAULTS[f][0]} {getattr(LoraSettings, TRL_LORA_DEFAULTS[f][0])} "
                           f"(TRL's {f} {TRL_LORA_DEFAULTS[f][1]})" for f in missing)
        flags = " ".join(f"--{f} {TRL_LORA_DEFAULTS[f][2]}" for f in missing)
        return (f"--use_peft: the LoRA settings not given as flags take the config's values, else alignkit's "
                f"defaults, which are not TRL's ModelConfig ones: {differ}; pass {flags} for TRL's adapter")
    return None


def module_names(argv: list[str], i: int, value: str, eq: str) -> tuple[int, str]:
    """(index of the last token read, the value) of `--lora_target_modules`: TRL's flag takes module names (nargs,
    a list); given as one string, peft reads it as a regex over the full module path, so `q_proj` matched nothing.
    Names (several tokens, or comma-separated) become a YAML list; `all-linear` or a pattern stays as given."""
    names = [n for n in value.split(",") if n]
    if not eq:
        while i + 1 < len(argv) and re.fullmatch(r"[A-Za-z_][\w.]*", argv[i + 1]) and "=" not in argv[i + 1]:
            i += 1
            names.append(argv[i])
    if names and all(re.fullmatch(r"[A-Za-z_][\w.]*", n) for n in names):
        return i, f"[{', '.join(names)}]"
    return i, value


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def translate_argv(parser: Any, argv: list[str], notes: list[str] | None = None) -> list[str]:
    """Apply `translate` to the part after the command name, for config-driven commands (`notes`: `translate`'s)."""
    sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
    idx = next((i for i, t in enumerate(argv) if sub is not None and t in sub.choices), None)
    if idx is None or argv[idx] not in CONFIG_CLASSES:
        return argv
    command = argv[idx]
    known = set(sub.choices[command]._option_string_actions)
    return argv[:idx + 1] + translate(argv[idx + 1:], command, known, notes)


__all__ = ["ALIASES", "LAUNCHER_FLAGS", "TRL_LORA_DEFAULTS", "launcher_flag", "module_names", "resolve_flag",
           "translate", "translate_argv", "lora_defaults_note"]
