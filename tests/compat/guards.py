"""Helpers for the compatibility tests: every failure names the library, its installed version, what moved
and where alignkit relies on it (the row of docs/architecture.md's table), instead of a bare assert."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import pytest

from alignkit.compat import moved_message


def fail(dep: str, what: str, where: str, detail: str = "") -> None:
    pytest.fail(moved_message(dep, what, where) + (f"\n  detail: {detail}" if detail else ""), pytrace=False)


def check(ok: Any, dep: str, what: str, where: str, detail: str = "") -> None:
    """`fail(...)` unless `ok`."""
    if not ok:
        fail(dep, what, where, detail)


@contextlib.contextmanager
def guard(dep: str, what: str, where: str) -> Iterator[None]:
    """Any exception inside the block (an AttributeError, a TypeError from a changed signature, an
    assertion) becomes one loud failure naming the dependency."""
    try:
        yield
    except pytest.fail.Exception:
        raise
    except Exception as e:  # noqa: BLE001 -- the point is to re-word whatever broke
        fail(dep, what, where, f"{type(e).__name__}: {e}")


def params(fn: Any) -> list[str]:
    """Parameter names of `fn` without self, *args, **kwargs."""
    return [n for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def accepts(fn: Any, name: str) -> bool:
    """`fn` names parameter `name` (a **kwargs catch-all does not count: it would swallow it silently)."""
    return name in params(fn)
