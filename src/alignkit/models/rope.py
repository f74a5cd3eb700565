"""RoPE scaling from a run config (`model.rope_scaling`): extend a model's context past its training length.

    model:
      path: my-llama
      rope_scaling: {type: linear, factor: 2.0}      # or dynamic, yarn, llama3, longrope (what transformers has)

transformers 5 keeps RoPE settings in `config.rope_parameters` (`rope_type`, `rope_theta`, and the type's own
keys; `rope_scaling` is the old name) and computes the inverse frequencies with
`modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]`. This module merges the run config's `rope_scaling`
into the loaded config's `rope_parameters` (keeping its `rope_theta` / `partial_rotary_factor`), fills what a
type needs from the model (`original_max_position_embeddings` = the model's current context length), and
validates the result against the architecture, so every problem is one `ConfigError` naming the key:

- an architecture without RoPE (GPT-2: learned positions), or whose modeling code only knows plain RoPE;
- a type transformers does not implement (the valid ones are listed);
- a missing or non-numeric `factor` (< 1 would shrink the context), a key the type does not read, or a value
  transformers only warns about or ignores (`rope_checks.py`: yarn's whole-number context, beta / mscale /
  attention_factor, llama3 and longrope bounds); transformers' own validation then runs as a backstop.

Context length after scaling: `max_position_embeddings` becomes `original * factor` for linear, yarn, llama3 and
longrope (or the `max_position_embeddings` the config gives, refused below the original). Dynamic NTK keeps the
original: its formula reads `max_position_embeddings` as the *original* length and rescales once a sequence grows past
it (so another `max_position_embeddings` is refused, and replacing a saved scaling sets it back to the original).
Applying the same scaling twice (a finetuned model whose saved config already has it) changes nothing. A model whose
saved config has another scaling (a YaRN model asked for linear, or the same type with another factor) is refused,
naming both: scalings do not stack, and replacing the saved one quietly would change every position the model was
trained on. `replace: true` in `model.rope_scaling` replaces it on purpose; the new factor then counts from the original
context (`original_context`: the saved `original_max_position_embeddings`, or `max_position_embeddings` / the saved
linear factor).
"""

from __future__ import annotations

import copy
import importlib
import math
import json
import logging
from typing import Any

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from alignkit.models.rope_checks import check_keys, check_values, yarn_length
from alignkit.settings.typed import ConfigError

logger = logging.getLogger(__name__)

WHERE = "model.rope_scaling"
NEEDS_FACTOR = ("linear", "dynamic", "yarn", "llama3", "longrope")  # longrope: its attention scale derives from it
NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")  # types that read original_max_position_embeddings
KEEPS_LENGTH = ("dynamic",)  # max_position_embeddings stays the original length
# ROPE_INIT_FUNCTIONS types that are an architecture's rotary layout, not a scaling (row T24): "proportional" leaves
# 1 - partial_rotary_factor of each head unrotated, and transformers' validation takes no factor for it
LAYOUTS = ("proportional",)


def has_rope(config: Any) -> bool:
    """Whether the architecture of `config` uses rotary position embeddings at all."""
    params = getattr(config, "rope_parameters", None)
    return isinstance(params, dict) and bool(params)


def supported_rope_types(config: Any) -> list[str]:
    """RoPE types the architecture's modeling code computes: "default", plus every `ROPE_INIT_FUNCTIONS`
    type if its rotary embedding looks the type up there (the standard generated rotary class does)."""
    if not has_rope(config):
        return []

    mt = config.model_type
    try:
        module = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    except ImportError:  # a module named differently from its model_type: assume the standard rotary class
        return ["default", *sorted(ROPE_INIT_FUNCTIONS)]
    if not hasattr(module, "ROPE_INIT_FUNCTIONS"):
        return ["default"]
    return ["default", *sorted(ROPE_INIT_FUNCTIONS)]


def context_length(config: Any) -> int | None:
    """The positions `config`'s model was built for (`max_position_embeddings`, GPT-2's `n_positions`; after
    any RoPE scaling applied here), or None when the config names none."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def trained_context(config: Any) -> int | None:
    """`context_length(config)`, or None when positions past it are fine by design (dynamic NTK scaling rescales
    once a sequence grows past it) or the config names no length: what generation, training and serving check."""
    if config is None:
        return None
    params = getattr(config, "rope_parameters", None)
    return None if isinstance(params, dict) and params.get("rope_type") in KEEPS_LENGTH else context_length(config)


_warned_context: set[tuple[str, int, int]] = set()


def learned_positions(config: Any) -> bool:
    """Whether `config`'s model reads its positions from a learned table of `context_length(config)` rows (GPT-2's
    `wpe`): no rotary embedding, no ALiBi, and a named length. A position past that table has no row."""
    return config is not None and not has_rope(config) and not getattr(config, "alibi", False) \
        and context_length(config) is not None


def check_context(config: Any, longest: int, what: str, fix: str) -> bool:
    """`longest` tokens against the model's context. Past a learned position table (`learned_positions`): a
    ConfigError (the forward would stop with "IndexError: index out of range in self" at the first such row, after the
    run folder is written). Past a RoPE model's positions: one warning (once per model type, context and length): the
    model keeps producing tokens, just not ones it was trained to, so the result is quietly worse. Dynamic NTK scaling
    rescales past its length by design, but transformers encodes such a sequence with the frequencies of the longest one
    run since a shorter-than-original one (and batched with it): one warning says so (`dynamic_note`), and it is not
    counted as past. Returns whether it is past."""
    dynamic_note(config, longest, what, fix)
    ctx = trained_context(config)
    if ctx is None or longest <= ctx:
        return False
    if learned_positions(config):
        raise ConfigError(f"{what} reaches {longest} tokens, past the model's {ctx} learned positions "
                          f"({getattr(config, 'model_type', 'model')} has no position {ctx} or later: its forward "
                          f"would stop with an IndexError); {fix}")
    key = (str(getattr(config, "model_type", "")), ctx, longest)
    if key not in _warned_context:
        _warned_context.add(key)
        logger.warning("%s reaches %d tokens, past the model's context of %d positions (max_position_embeddings): "
                       "the positions beyond it were never trained; %s, or extend the context (model.rope_scaling)",
                       what, longest, ctx, fix)
    return True


def dynamic_note(config: Any, longest: int, what: str, fix: str) -> None:
    """One warning (once per model type, context and length) when `longest` tokens pass the threshold of `config`'s
    dynamic NTK scaling: transformers rescales the frequencies for max(position_ids) + 1 of a call when it grows past
    what it has cached, keeps them for later, shorter calls and resets them only below the original length (row T22),
    so such a sequence is encoded by what ran before and beside it, not by itself alone."""
    params = getattr(config, "rope_parameters", None)
    ctx = context_length(config) if isinstance(params, dict) and params.get("rope_type") in KEEPS_LENGTH else None
    key = ("dynamic", str(getattr(config, "model_type", "")), ctx or 0, longest)
    if ctx is None or longest <= ctx or key in _warned_context:
        return
    _warned_context.add(key)
    logger.warning("%s reaches %d tokens, past the %d positions where dynamic RoPE scaling starts: transformers then "
                   "encodes positions with frequencies rescaled for the longest sequence run since a shorter one (and "
                   "batched with it), so the same sequence is encoded differently by the order and batches it runs in; "
                   "use model.rope_scaling type yarn or linear for one fixed encoding, or %s", what, longest, ctx, fix)


def original_context(config: Any) -> int:
    """The context length `config`'s model had before its saved RoPE scaling: `original_max_position_embeddings`
    when the config records it, else `max_position_embeddings` divided by the saved factor for the types that
    multiply it (linear), else `max_position_embeddings` (no scaling, or dynamic NTK, which keeps it)."""
    old = dict(getattr(config, "rope_parameters", None) or {})
    if old.get("original_max_position_embeddings"):
        return int(old["original_max_position_embeddings"])
    factor = old.get("factor")
    if old.get("rope_type", "default") not in ("default", *KEEPS_LENGTH) and _number(factor) and factor >= 1:
        return int(round(config.max_position_embeddings / factor))
    return config.max_position_embeddings


def _show(kind: str, keys: dict[str, Any]) -> str:
    """A scaling as a run config writes it: {type: yarn, factor: 2.0, ...}."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in {"type": kind, **keys}.items()) + "}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scaled_rope_parameters(config: Any, scaling: dict[str, Any], where: str = WHERE) -> tuple[dict[str, Any], int]:
    """(new `rope_parameters`, new `max_position_embeddings`) for `config` with `scaling` applied.

    `scaling`: `type` (or `rope_type`) plus the type's keys (`factor`, `beta_fast`, `low_freq_factor`, ...),
    and optionally `max_position_embeddings` (the context length to record) and `replace` (true: replace a different
    scaling the config already has; without it that is a ConfigError naming both). `config` is not changed."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{type: linear, factor: 2.0}}, got {scaling!r}")
    scaling = dict(scaling)
    arch = getattr(config, "model_type", type(config).__name__)
    if not has_rope(config):
        raise ConfigError(f"{where}: the {arch} architecture has no rotary position embeddings (RoPE), so it cannot be "
                          "scaled; remove model.rope_scaling or use a RoPE model (llama, qwen2, gpt_neox, mistral, "
                          "...)")
    if "type" in scaling and "rope_type" in scaling and scaling["type"] != scaling["rope_type"]:
        raise ConfigError(f"{where}: both type={scaling['type']!r} and rope_type={scaling['rope_type']!r}; keep one")
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None)
    valid = supported_rope_types(config)
    if kind is None:
        raise ConfigError(f"{where}.type: required; one of "
                          f"{', '.join(t for t in valid if t not in ('default', *LAYOUTS))}")
    if kind in LAYOUTS:
        raise ConfigError(f"{where}.type: {kind!r} is a rotary layout some architectures are built with (Gemma 4: "
                          "part of each head left unrotated, partial_rotary_factor), not a context scaling "
                          f"(transformers takes no factor for it); set on this {arch} model it would rotate its heads "
                          "otherwise than in training, a different model; use one of "
                          f"{', '.join(t for t in valid if t not in ('default', *LAYOUTS))}")
    if kind not in valid:
        raise ConfigError(f"{where}.type: {kind!r} is not a RoPE type the {arch} architecture supports in this "
                          f"transformers; valid: {', '.join(valid)}")
    replace = scaling.pop("replace", False)
    if not isinstance(replace, bool):
        raise ConfigError(f"{where}.replace: expected true or false, got {replace!r}")
    new_length = scaling.pop("max_position_embeddings", None)
    if new_length is not None and (not isinstance(new_length, int) or isinstance(new_length, bool) or new_length < 1):
        raise ConfigError(f"{where}.max_position_embeddings: expected a positive integer, got {new_length!r}")
    check_keys(kind, scaling, where)
    factor = scaling.get("factor")
    if kind in NEEDS_FACTOR and factor is None:
        raise ConfigError(f"{where}.factor: required for type {kind!r} (the context multiplier, e.g. factor: 2.0)")
    if factor is not None and (not _number(factor) or not math.isfinite(factor) or factor < 1):
        raise ConfigError(f"{where}.factor: expected a number >= 1 (the context multiplier), got {factor!r}")

    old = dict(config.rope_parameters)
    old_kind = old.get("rope_type", "default")
    if old_kind == kind and all(old.get(k) == v for k, v in scaling.items()):
        return old, config.max_position_embeddings  # already applied (e.g. a saved finetuned model)
    original = original_context(config)
    if old_kind != "default" and not replace:
        saved = {k: v for k, v in old.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}
        raise ConfigError(f"{where}: the model's config already has {old_kind} RoPE scaling "
                          f"({_show(old_kind, saved)}), and {_show(kind, scaling)} would replace it, not add to it "
                          "(one scaling applies): remove model.rope_scaling to keep the saved one, or add replace: "
                          f"true to it to use yours instead (its factor then counts from the original {original} "
                          "positions)")
    params = {k: old[k] for k in ("rope_theta", "partial_rotary_factor") if k in old}
    params.update(scaling, rope_type=kind)
    if _number(params.get("attention_factor")) and params["attention_factor"] > 0:  # yarn's validation warns of
        # an int (not a float), though it is the same value
        params["attention_factor"] = float(params["attention_factor"])
    if factor is not None:  # a float as transformers' own configs write it: vLLM's linear RoPE fails on an int (V16)
        params["factor"] = float(factor)
    if kind in NEEDS_ORIGINAL:
        params.setdefault("original_max_position_embeddings", original)
    new_length = _context_after(config, kind, params, new_length, original, where)
    check_values(config, kind, params, new_length, where)
    _validate(config, params, new_length, where)
    return params, new_length


def _context_after(config: Any, kind: str, params: dict[str, Any], new_length: int | None, original: int,
                   where: str) -> int:
    """The `max_position_embeddings` to record for `params` (`new_length`: the one model.rope_scaling gives, or
    None)."""
    given = new_length
    if kind in KEEPS_LENGTH:  # its formula reads max_position_embeddings as the original length: scaling starts past it
        if new_length is not None and new_length != original:
            raise ConfigError(f"{where}.max_position_embeddings: type {kind!r} reads max_position_embeddings as the "
                              f"model's original context and rescales only past it, so {new_length} would move where "
                              f"scaling starts from the model's {original} positions to {new_length} (positions in "
                              f"between run unscaled or scaled inside the trained context); remove it: {kind} extends "
                              f"past {original} positions by itself")
        new_length = original
    elif new_length is not None and new_length < original:  # transformers reads it as the new context (yarn /
        # longrope derive their attention factor from new / original), and no type shrinks the context
        raise ConfigError(f"{where}.max_position_embeddings: {new_length} is below the model's original context of "
                          f"{original} positions, so type {kind!r} would record a shorter context than the model "
                          f"has; remove it (then {original} x factor) or give at least {original}")
    elif new_length is None:
        new_length = config.max_position_embeddings if params.get("factor") is None \
            else int(params.get("original_max_position_embeddings", original) * params["factor"])
    if kind == "yarn":  # original x factor must be whole: transformers compares the ratio with the factor
        return yarn_length(params["original_max_position_embeddings"], params["factor"], given, where)
    return new_length


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _validate(config: Any, params: dict[str, Any], length: int, where: str) -> None:
    """transformers' own validation of `params` on a copy of `config`; its warnings become errors (it only
    warns about unknown keys and bad values, which would otherwise be silently ignored or misused)."""
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(params)
    trial.max_position_embeddings = length
    rope_log = logging.getLogger("transformers.modeling_rope_utils")
    capture = _Capture()
    rope_log.addHandler(capture)
    try:
        trial.validate_rope()
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {str(e).strip(chr(34) + chr(39))}") from None
    finally:
        rope_log.removeHandler(capture)
    if capture.messages:
        raise ConfigError(f"{where}: {capture.messages[0]}")


_BASE_KEYS = ("rope_theta", "partial_rotary_factor")  # the architecture's own RoPE, not a scaling


def rope_record(config: Any) -> dict[str, Any] | None:
    """`config`'s RoPE settings as JSON data (what an adapter folder records about the base it was trained on, so
    that a reload can tell whether the positions are encoded as in training); None for a model without RoPE."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return json.loads(json.dumps(dict(cfg.rope_parameters), default=str)) if has_rope(cfg) else None


def rope_change(trained: dict[str, Any] | None, here: dict[str, Any] | None,
                where: str = WHERE) -> tuple[str, str] | None:
    """How the RoPE of a model (`here`, a `rope_record`) differs from the one an adapter was trained with
    (`trained`), as ("error" | "warning", text naming the key `where` that sets it); None when they agree or either
    is unknown. A scaling added on top of an unscaled training base is a warning (extending an adapter's context at
    inference is legitimate); a training scaling that is missing or different here is an error (every position
    would be encoded otherwise than in training, and the outputs change without a word)."""
    if not isinstance(trained, dict) or not isinstance(here, dict) or trained == here:
        return None
    kind = lambda p: p.get("rope_type", "default")  # noqa: E731
    show = lambda p: _show(kind(p), {k: v for k, v in p.items() if k not in ("rope_type", *_BASE_KEYS)})  # noqa: E731
    if kind(trained) == "default" and all(trained.get(k) == here.get(k) for k in _BASE_KEYS):
        return "warning", (f"RoPE scaling {show(here)} here, none when trained: the adapter meets positions "
                           f"encoded otherwise than in training (fine to extend its context; remove "
                           f"{where} to run it as trained)")
    if kind(trained) == "default":
        return "error", (f"RoPE {here} here, {trained} when trained (another rope_theta: another base model); "
                         "load the adapter on the base it was trained with")
    return "error", (f"RoPE {show(here)} here, {show(trained)} when trained: set {where}: {show(trained)} "
                     "(what training used), or every position is encoded otherwise than in training")


def apply_rope_scaling(config: Any, scaling: dict[str, Any] | None, where: str = WHERE) -> Any:
    """Set `config.rope_parameters` / `max_position_embeddings` for `scaling` (None: unchanged). Returns config."""
    if scaling is None:
        return config
    params, length = scaled_rope_parameters(config, scaling, where)
    if params != config.rope_parameters or length != config.max_position_embeddings:
        logger.info("RoPE scaling: %s -> %s, max_position_embeddings %d -> %d", config.rope_parameters, params,
                    config.max_position_embeddings, length)
    config.rope_parameters = params
    config.max_position_embeddings = length
    return config


__all__ = ["apply_rope_scaling", "check_context", "has_rope", "learned_positions", "original_context", "rope_change",
           "rope_record", "scaled_rope_parameters", "supported_rope_types"]
