"""Names of Python objects that are the same in every process: what a checkpoint records for a setting JSON cannot
write (a reward function, a callable object, a `functools.partial`) and what messages and metric names call it.

`repr` is not such a name: a function's, a partial's or a plain object's repr holds a memory address, which differs
in every process (a resume comparing it refused every run), and a type's name alone leaves out the arguments that
make two settings differ (`partial(score, scale=1)` and `partial(score, scale=2)` were the same setting).
"""

from __future__ import annotations

import dis
import functools
import hashlib
import inspect
import re
import sys
import types
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # what CPython's default reprs of functions and objects hold


def stable_repr(value: Any) -> str:
    """`repr(value)` where it holds no memory address (numbers, strings, containers of them, dataclasses), else
    `stable_name(value)`; containers are written item by item so a function inside a list is named too, and a set's
    items sorted (its repr's order changes with the process's hash seed)."""
    if isinstance(value, (list, tuple)):
        items = ", ".join(stable_repr(v) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{stable_repr(k)}: {stable_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (set, frozenset)):  # repr's order follows PYTHONHASHSEED: sorted, the same in every process
        return type(value).__name__ + "({" + ", ".join(sorted(stable_repr(v) for v in value)) + "})"
    text = repr(value)
    return text if ADDRESS.search(text) is None else stable_name(value)


def stable_name(value: Any) -> str:
    """A name for `value` that is the same in every process and differs where the settings differ: a string or path
    as its text, a function or class as `module:qualname`, a `functools.partial` as its function's name with its
    arguments (`pkg.mod:score(scale=2)`), an object with a repr free of addresses by its type and that repr, any other
    object by its type and its public attributes and the private ones named after a parameter of its __init__
    (`pkg.mod:Scorer(_scale=2, threshold=0.5)`: two objects configured otherwise through `self._scale` had one name,
    so a resume with another scale was not refused) when they hold a plain value (`is_plain`): `self._tokenizer =
    tokenizer` put the tokenizer's long repr, with its absolute folder, into the name (a moved folder refused a valid
    resume). A setting kept under another private name, or holding an object, is not seen."""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, functools.partial):
        args = [stable_repr(a) for a in value.args] + [f"{k}={stable_repr(v)}" for k, v in value.keywords.items()]
        return f"{stable_name(value.func)}({', '.join(args)})"
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str):
        return f"{getattr(value, '__module__', None) or '?'}:{name}"
    kind = f"{type(value).__module__}:{type(value).__qualname__}"
    text = repr(value)
    if ADDRESS.search(text) is None:
        return f"{kind} {text}" if not text.startswith(type(value).__qualname__) else f"{type(value).__module__}:{text}"
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        params = init_parameters(type(value))
        attrs = [f"{k}={stable_repr(v)}" for k, v in sorted(state.items())
                 if not k.startswith("_") or (k.lstrip("_") in params and is_plain(v))]
        return f"{kind}({', '.join(attrs)})"
    return f"<{kind}>"


def is_plain(value: Any) -> bool:
    """A number, string, bool or None, or a list / tuple / dict of them (nested): a value whose repr is short and
    the same wherever it runs (no folder path, no address), which a private setting must be to enter a name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(is_plain(k) and is_plain(v) for k, v in value.items())
    return False


def init_parameters(cls: type) -> frozenset[str]:
    """The parameter names of `cls.__init__` (none where it has no readable signature): a private attribute named
    after one (`self._threshold = threshold`) is a setting, and `stable_name` names it; other private attributes
    (caches, counters, locks) are state that changes as the object is used, and are left out."""
    try:
        return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}
    except (TypeError, ValueError):
        return frozenset()


CODE_DIGEST_VERSION = 2  # 1: before helpers and builtins were digested (checkpoints without a version hold 1)

# the C callables: a builtin function or method, a slot wrapper, a method descriptor (no code, no source)
BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                     types.MethodWrapperType, types.MethodDescriptorType, types.ClassMethodDescriptorType)
GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})  # how code reads a module-level name
GLOBAL_STORES = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})  # how a function writes one (`global x; x = ...`)


def source_digest(fns: Iterable[Callable], version: int = CODE_DIGEST_VERSION) -> str:
    """16 hex digits of sha256 over each callable's `code_digest`: what a name (`stable_name`) does not show, a
    function edited under the same name. Online checkpoints record it for a reward function, so that a resume can say
    it changed (`version`: as `code_digest`'s, to compare with a checkpoint that recorded an older one)."""
    h = hashlib.sha256()
    for fn in fns:
        h.update(code_digest(fn, version).encode())
    return h.hexdigest()[:16]


def code_digest(fn: Any, version: int = CODE_DIGEST_VERSION) -> str:
    """sha256 (hex) of what a callable computes, the same in every process: a function's source (its compiled code
    where Python has none, e.g. exec'd: nested code objects by their own digest, never a repr holding an address),
    its defaults and its closure's values (a function among them by its digest), and the module-level names its code
    reads (`global_parts`: a helper function of its own module by its digest, recursively, a plain constant by its
    value, another module's function or class by its name); a bound method's function; a `functools.partial`'s
    function with its arguments; a callable object's class source (else its `__call__`), with the names its methods
    read; a builtin / C function by its qualified name (they all had one digest). `version` 1 is the digest before
    the module-level names and the builtins' names, which a resume compares with a checkpoint that recorded it.
    Both the online checkpoints (`source_digest`) and the tokenization cache (`data/tokenize_cache.py`) use it."""
    h = hashlib.sha256()
    for part in _digest_parts(fn, 0, _Walk(version)):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


class _Walk:
    """One digest's walk: its version and the functions already entered (by id: a helper met twice, or helpers that
    call each other, are written as "seen" the second time, so the walk ends)."""

    def __init__(self, version: int) -> None:
        self.version, self.seen = version, set()


def _digest_parts(fn: Any, depth: int, walk: _Walk) -> list[str]:
    if depth > 8:  # a closure that holds itself through a chain: stop rather than recurse forever
        return ["..."]
    if isinstance(fn, functools.partial):
        args = [stable_repr(a) for a in fn.args] + [f"{k}={stable_repr(v)}" for k, v in sorted(fn.keywords.items())]
        return ["partial", *_digest_parts(fn.func, depth + 1, walk), *args]
    if inspect.ismethod(fn):
        return ["method", *_digest_parts(fn.__func__, depth + 1, walk)]
    code = getattr(fn, "__code__", None)
    if walk.version >= 2 and isinstance(fn, BUILTIN_CALLABLES):
        return ["builtin", stable_name(fn)]
    if not isinstance(code, types.CodeType):  # a class, or an object with __call__: its class's source
        return _class_parts(fn, walk)
    walk.seen.add(id(fn))
    text = _source(fn)
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet filled
            value = None
        cells.append("self" if value is fn else "|".join(_digest_parts(value, depth + 1, walk)) if callable(value)
                     else stable_repr(value))
    helpers = global_parts(fn, walk) if walk.version >= 2 else []
    return ["function", text if text is not None else _code_text(code), stable_repr(getattr(fn, "__defaults__", None)),
            stable_repr(getattr(fn, "__kwdefaults__", None)), *cells, *helpers]


def _class_parts(fn: Any, walk: _Walk) -> list[str]:
    cls = fn if isinstance(fn, type) else type(fn)
    text = _source(cls)
    call = getattr(cls, "__call__", None)
    call_code = getattr(call, "__code__", None) if call is not None else None
    if walk.version >= 2 and text is None and call_code is None:  # a C type, or an object of one (a ufunc)
        return ["builtin", stable_name(fn)]
    out = ["class", cls.__qualname__, text if text is not None else _code_text(call_code) if call is not None else "?"]
    if walk.version >= 2:
        for name, method in sorted(vars(cls).items()):
            if isinstance(method, types.FunctionType) and id(method) not in walk.seen:
                walk.seen.add(id(method))
                out += [f"{name}:{part}" for part in global_parts(method, walk)]
    return out


def global_names(code: types.CodeType) -> set[str]:
    """The module-level (global) names `code` reads, nested code objects (lambdas, comprehensions) included; not
    co_names, which holds attribute names too (`x.score` would have pulled in an unrelated global `score`)."""
    return code_global_names(code, GLOBAL_LOADS)


def code_global_names(code: types.CodeType, opnames: frozenset[str]) -> set[str]:
    """The names of `code`'s instructions among `opnames` (`GLOBAL_LOADS`, `GLOBAL_STORES`), nested code included."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in opnames}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_global_names(const, opnames)
    return names


_WRITTEN: "weakref.WeakKeyDictionary[types.ModuleType, tuple[int, frozenset[str]]]" = weakref.WeakKeyDictionary()


def written_globals(space: dict) -> frozenset[str]:
    """The module-level names that a function of the module whose globals are `space` writes (`global N; N += 1`,
    `global _clf; _clf = load()`, `del`): state that changes as a run goes, not code. Every function of the module
    is scanned (the writer need not be one the digest walks: a `setup()` filling what `reward` reads), its nested
    code included, and the methods of its classes; memoized per imported module (scanned again when it gains or
    loses a name)."""
    module = sys.modules.get(space.get("__name__"))  # type: ignore[arg-type]
    if module is None or getattr(module, "__dict__", None) is not space:  # exec'd into a dict: scanned each time
        return _scan_written(space)
    seen = _WRITTEN.get(module)
    if seen is None or seen[0] != len(space):
        seen = _WRITTEN[module] = (len(space), _scan_written(space))
    return seen[1]


def _scan_written(space: dict) -> frozenset[str]:
    codes = []
    for value in list(space.values()):
        for fn in (_functions_in(value) if isinstance(value, type) else [_unwrapped(value)]):
            if isinstance(fn, types.FunctionType) and fn.__globals__ is space:
                codes.append(fn.__code__)
    names: set[str] = set()
    for code in codes:
        names |= code_global_names(code, GLOBAL_STORES)
    return frozenset(names)


def _functions_in(cls: type) -> list[Any]:
    """The functions a class's own namespace holds: methods, static and class methods, properties' accessors."""
    out: list[Any] = []
    for member in vars(cls).values():
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        out += [member.fget, member.fset, member.fdel] if isinstance(member, property) else [_unwrapped(member)]
    return out


def _unwrapped(value: Any) -> Any:
    """A decorated function's own function (`__wrapped__`, one level, as `global_parts` reads it)."""
    if not callable(value):
        return value
    try:
        return getattr(value, "__wrapped__", value)
    except Exception:  # noqa: BLE001 - an object whose attribute lookup fails: not a function of the module
        return value


def global_parts(fn: Any, walk: Any) -> list[str]:
    """`name=<digest part>` for each module-level name `fn`'s code reads that its module defines (builtins are not
    there), sorted: a function of the same module (the same globals) by its digest parts, recursively (one already
    walked by its name), a class of the same module by its source, a constant (`is_constant`) by `stable_repr`, a
    module by nothing, another module's function or class by its name (`stable_name`). Other objects (mutable
    containers, instances) are left out, and so is every name a function of the module writes (`written_globals`:
    a counter or a lazily loaded model changed the digest during a run, and a resume warned "edited")."""
    space = getattr(fn, "__globals__", None)
    if not isinstance(space, dict):
        return []
    out = []
    written = written_globals(space) | code_global_names(fn.__code__, GLOBAL_STORES)
    for name in sorted(global_names(fn.__code__)):
        if name not in space or name in written:  # a name a function writes: state (a counter, a lazy model)
            continue
        value = space[name]
        target = getattr(value, "__wrapped__", value)  # a decorated helper: the function it wraps
        if isinstance(target, types.FunctionType) and target.__globals__ is space:
            inner = "seen" if id(target) in walk.seen else "|".join(_digest_parts(target, 0, walk))
            out.append(f"{name}=def:{inner}")  # by its name here, not its module's (a file loaded by path)
        elif isinstance(value, type) and any(getattr(m, "__globals__", None) is space for m in vars(value).values()):
            out.append(f"{name}=class:{'|'.join(_class_parts(value, walk))}")
        elif isinstance(value, types.ModuleType):
            continue
        elif callable(value) and getattr(value, "__qualname__", None) is not None:
            out.append(f"{name}=name:{stable_name(value)}")
        elif is_constant(value):
            out.append(f"{name}=value:{stable_repr(value)}")
    return out


def is_constant(value: Any) -> bool:
    """A value that cannot change as a run goes: a number, string, bool or None, a tuple or frozenset of them, a
    compiled regex. Not a list, dict or set: a module-level cache or counter a reward function fills would have
    changed the digest as it ran (a resume warned "edited" of unchanged code)."""
    if isinstance(value, (tuple, frozenset)):
        return all(is_constant(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, re.Pattern))


def _source(obj: Any) -> str | None:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # no file (exec'd, the REPL), or a built-in
        return None


def _code_text(code: Any) -> str:
    """A code object's bytecode, names and constants, nested code objects by their own text (their repr holds an
    address) and a frozenset's items sorted (its order follows the process's string hash seed)."""
    if not isinstance(code, types.CodeType):
        return repr(type(code))
    consts = [_code_text(c) if isinstance(c, types.CodeType) else
              "frozenset(" + repr(sorted(map(repr, c))) + ")" if isinstance(c, frozenset) else repr(c)
              for c in code.co_consts]
    return repr((code.co_code.hex(), code.co_names, code.co_varnames, code.co_freevars, consts))
