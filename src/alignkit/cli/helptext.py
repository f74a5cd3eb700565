"""The defaults a command fills in, written under its `--help` (so `alignkit dpo --help` shows the learning rate)."""

from __future__ import annotations

import dataclasses
from typing import Any


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _fields(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        v = _default(f)
        if f.name in skip or dataclasses.is_dataclass(v) or v in ({}, []):
            continue
        out.append(f"{prefix}{f.name}={v}")
    return out


def _wrap(items: list[str], width: int = 100, indent: str = "  ") -> str:
    lines, cur = [], indent
    for it in items:
        if len(cur) + len(it) + 2 > width and cur.strip():
            lines.append(cur.rstrip(", ").rstrip())
            cur = indent
        cur += it + ", "
    lines.append(cur.rstrip(", "))
    return "\n".join(lines)


def defaults_epilog(command: str) -> str:
    """Text listing `command`'s defaults: train (TrainingArguments), method, and the data keys most often set."""
    from alignkit.settings import CONFIG_CLASSES
    from alignkit.settings.sections import TRAIN_DEFAULTS, DataSettings

    parts = []
    if command in TRAIN_DEFAULTS:
        train = [f"train.{k}={v}" for k, v in TRAIN_DEFAULTS[command].items()]
        parts.append("defaults (override in the config, as train.KEY=VALUE or --KEY VALUE):\n" + _wrap(
            train + ["other train.* keys: transformers.TrainingArguments' defaults"]))
    else:
        parts.append("defaults (override in the config, as method.KEY=VALUE):")
    method = next(f for f in dataclasses.fields(CONFIG_CLASSES[command]) if f.name == "method")
    parts.append(_wrap(_fields(method.default_factory(), "method.")))  # type: ignore[misc]
    data = ["max_length", "max_prompt_length", "formatter"] + (["loss_on"] if command == "sft" else [])
    parts.append(_wrap([f"data.{k}={getattr(DataSettings(), k)}" for k in data]))
    return "\n".join(parts)


__all__ = ["defaults_epilog"]
