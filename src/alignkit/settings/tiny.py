"""`tiny:<arch>` model specs: a random tiny model built locally (`alignkit.models.tiny`), for smoke tests and
examples. Every key that takes a model (model.path, annotator.path, llm.path, serve's base) accepts one; this
module is the one place that reads and checks the spec. No torch import (settings use it)."""

from __future__ import annotations

import difflib

from alignkit.settings.typed import ConfigError

TINY_PREFIX = "tiny:"
ARCHITECTURES = ("llama", "qwen2", "gpt2", "gpt_neox")  # what alignkit.models.tiny builds


def is_tiny(spec: str | None) -> bool:
    """Whether `spec` is a `tiny:<arch>` spec (valid or not)."""
    return isinstance(spec, str) and spec.startswith(TINY_PREFIX)


def tiny_arch(spec: str | None, key: str) -> str | None:
    """The architecture of the `tiny:<arch>` spec `spec` given under config key `key`; None when `spec` is not a
    tiny spec. An unknown architecture is a `ConfigError`, one line naming the key, the closest spec and the
    valid ones."""
    if not is_tiny(spec):
        return None
    arch = spec[len(TINY_PREFIX):]
    if arch not in ARCHITECTURES:
        valid = [TINY_PREFIX + a for a in ARCHITECTURES]
        close = difflib.get_close_matches(arch, ARCHITECTURES, n=1)
        hint = f" (did you mean {TINY_PREFIX + close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: {spec!r}: unknown tiny architecture {arch!r}{hint}; valid: {', '.join(valid)}")
    return arch


__all__ = ["ARCHITECTURES", "TINY_PREFIX", "is_tiny", "tiny_arch"]
