"""Plain mappings -> typed dataclasses, with errors naming the dotted key; YAML reading; dotted overrides.

YAML scalars follow YAML 1.2: `1e-4` is a float (PyYAML alone reads a string) and `no` / `on` stay
strings (only true / false are booleans). Override values are YAML
scalars or flow collections: `method.beta=0.05`, `data.path=[a.jsonl, b.jsonl]`, `model.dtype=bf16`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from alignkit.settings.trl_names import trl_key_message, trl_top_level_message


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and how to fix it."""



class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `1e-4` / `5E+3` are floats, and only true/false are booleans
    (YAML 1.1 would turn `eval_strategy: no` or `on` into a bool)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != _BOOL_TAG]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """An override value as a YAML scalar (or flow list/mapping): "0.05" -> 0.05, "true" -> True, "[a, b]"."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r} as YAML ({e}); quote strings with special characters") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["method.beta=0.05", "train.seed=1"] -> {"method": {"beta": 0.05}, "train": {"seed": 1}}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. method.beta=0.05")
        *parents, last = key.strip().split(".")
        node = out
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} was already set to a value")
        node[last] = parse_value(text)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `extra` replaces the value in `base`."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...), "
                          f"got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------
# Typed construction with errors that name the key
# ----------------------------------------------------------------------------------------------------

def unknown_key_error(where: str, key: str, valid: list[str], value: Any = None) -> ConfigError:
    """ConfigError for `key`, not one of `valid` under `where`: TRL's name for a setting (`value`: what it was set to)
    names alignkit's equivalent (alignkit.settings.trl_names), anything else the closest valid keys."""
    trl = trl_key_message(where, key, value) if where else trl_top_level_message(key)
    if trl is not None:
        return ConfigError(trl)
    if join_key(where, key) in STATE_NOT_SETTINGS:
        return ConfigError(f"{join_key(where, key)}: unknown key: {STATE_NOT_SETTINGS[join_key(where, key)]}")
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close and SAME_SECTION.get(key) in valid:  # a neighbouring command's name for this command's section
        close = [SAME_SECTION[key]]
        hint = f"; did you mean {close[0]!r}? (this command's name for the {key} section, with the same keys)"
    else:
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return ConfigError(f"{join_key(where, key)}: unknown key{hint} Valid keys: {', '.join(valid)}")


# the losses' running state under a setting's name (PreferenceParams.bco_delta): what a user writing one is told
STATE_NOT_SETTINGS = {"method.bco_delta": "BCO's running reward mean is trainer state, not a setting (alignkit's "
                                          "bco_pair keeps it at 0, as TRL's bco_pair does); remove it"}

# sections two commands spell otherwise with the same keys: `sample` and the online commands' sampling, `generate`'s
# generation (a reader copying a key from the neighbouring config)
SAME_SECTION = {"sampling": "generation", "generation": "sampling"}


def join_key(where: str, key: str) -> str:
    """The dotted name of `key` under `where` ("" at the top level)."""
    return f"{where}.{key}" if where else key


def type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against annotation `tp` (ints widen to floats; mappings become dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, (str, typing.TypeVar)):
        return value
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: {value!r} is not allowed{hint} Choose one of: {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
        else:
            errors = []
            for a in args:
                if a is type(None):
                    continue
                try:
                    return coerce(value, a, where)
                except ConfigError as e:
                    errors.append(e)
            if len(errors) == 1 and not str(errors[0]).startswith(f"{where}: expected "):
                raise errors[0]  # a deeper problem (a key inside a mapping, a list item): report that one
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_show(value)}")
    if value is None:
        raise ConfigError(f"{where}: expected {type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            vt = args[1] if len(args) == 2 else Any
            return {k: coerce(v, vt, join_key(where, str(k))) for k, v in value.items()}
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [e.value for e in tp]
        if isinstance(value, tp) or value in valid:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of: {', '.join(map(str, valid))}")
    else:
        return value  # a type we do not check (the consumer will)
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a section whose default is a configured instance (`default_factory=lambda:
    SamplingConfig(do_sample=False)`): the keys it sets over that instance's values, not over the class's own
    defaults (`generation.max_new_tokens=4` alone must keep generate's greedy default, as `--help` shows it)."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    own = {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}
    plain = type(default)
    configured = {}
    for g in dataclasses.fields(plain):
        if g.name not in own:
            continue
        if g.default is not dataclasses.MISSING:
            base = g.default
        elif g.default_factory is not dataclasses.MISSING:
            base = g.default_factory()
        else:
            base = dataclasses.MISSING
        if base is dataclasses.MISSING or own[g.name] != base:
            configured[g.name] = own[g.name]
    return {**configured, **value}


def build(cls: type, data: Any, where: str = "") -> Any:
    """An instance of dataclass `cls` from a mapping, every key and value checked (see `coerce`)."""
    if isinstance(data, cls):
        return data
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of {cls.__name__} keys, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise unknown_key_error(where, str(key), list(fields), data[key])
    kwargs = {k: coerce(_over_default(fields[k], v), hints[k], join_key(where, k)) for k, v in data.items()}
    missing = [k for k, f in fields.items() if k not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    for k in missing:
        if dataclasses.is_dataclass(hints[k]):  # a required section: name its first required key
            kwargs[k] = build(hints[k], {}, join_key(where, k))
    missing = [k for k in missing if k not in kwargs]
    if missing:
        raise ConfigError(f"{join_key(where, missing[0])}: required; set it in the config file or on the command line "
                          f"({join_key(where, missing[0])}=...)")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{label}: {e}") from None


__all__ = ["ConfigError", "build", "coerce", "join_key", "merge", "parse_overrides", "parse_value", "read_yaml",
           "type_name", "unknown_key_error"]
