"""Checks of `model.rope_scaling`'s keys and values in alignkit's words, before transformers sees them.

transformers 5 (`modeling_rope_utils`, row T24) validates `rope_parameters` mostly by *warning*: an unknown key,
a yarn factor that does not match max_position_embeddings / original_max_position_embeddings (a `warning_once`:
said for the first model of a process only), beta_fast below beta_slow, llama3 with no longer context, short /
long factor lists of the wrong length. It then computes anyway, and its formulas quietly ignore some values: yarn
reads beta_fast / beta_slow of 0 as unset (32 / 1), uses mscale only together with mscale_all_dim and only without
attention_factor; an attention_factor of 0 zeroes every cos/sin. Each case here is one ConfigError naming
`model.rope_scaling.<key>`, the value, why, and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from alignkit.settings.typed import ConfigError

# the keys each type reads (besides type / rope_type / replace / max_position_embeddings), as transformers 5.24's
# `_validate_<type>_rope_parameters` accepts them (row T24)
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor", "attention_factor"),
}
REQUIRED: dict[str, tuple[str, ...]] = {"llama3": ("low_freq_factor", "high_freq_factor"),
                                        "longrope": ("short_factor", "long_factor")}


def number(value: Any) -> bool:
    """A real, finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_keys(kind: str, scaling: dict[str, Any], where: str) -> None:
    """Every key of `scaling` (type, replace, max_position_embeddings already taken out) is one `kind` reads, and
    the ones it requires are there. Types outside TYPE_KEYS are left to transformers' validation."""
    keys = TYPE_KEYS.get(kind)
    if keys is None:
        return
    for key in scaling:
        if key in ("rope_theta", "partial_rotary_factor"):
            raise ConfigError(f"{where}.{key}: the architecture's own RoPE setting (the model's config keeps it), not "
                              f"a scaling: alignkit scales the model as it was trained; remove it")
        if key not in keys:
            raise ConfigError(f"{where}.{key}: type {kind!r} does not read {key} (transformers would ignore it "
                              f"after a warning); remove it ({kind} reads: {', '.join(keys)})")
    for key in REQUIRED.get(kind, ()):
        if key not in scaling:
            raise ConfigError(f"{where}.{key}: required for type {kind!r}; add it")
    original = scaling.get("original_max_position_embeddings")
    if "original_max_position_embeddings" in scaling and (not isinstance(original, int) or isinstance(original, bool)
                                                          or original < 1):
        raise ConfigError(f"{where}.original_max_position_embeddings: expected a positive integer (the context the "
                          f"model was trained with), got {original!r}")


def yarn_length(original: int, factor: float, given: int | None, where: str) -> int:
    """The context YaRN records: original x factor, which must be a whole number of positions (transformers compares
    max_position_embeddings / original with factor and, when they differ, warns once and uses the factor)."""
    exact = original * factor
    length = round(exact)
    if given is not None:
        if given / original != factor:
            raise ConfigError(f"{where}.max_position_embeddings: {given} is not the original {original} positions x "
                              f"factor {factor} = {round(exact, 6)!r}, and yarn reads its factor as that ratio "
                              f"(transformers would warn and use the factor); remove it, or set factor: "
                              f"{given / original!r} for {given} positions")
        return given
    if length / original != factor:
        low, high = math.floor(exact), math.ceil(exact)
        raise ConfigError(f"{where}.factor: {factor} x the model's original {original} positions = "
                          f"{round(exact, 6)!r} positions, not a whole number (transformers would record {low} and "
                          f"warn that the factor no longer matches it); use factor {low / original!r} ({low} "
                          f"positions) or {high / original!r} ({high} positions)")
    return length


def check_values(config: Any, kind: str, params: dict[str, Any], length: int, where: str) -> None:
    """The values of `params` (the merged rope_parameters) for `kind`, given the new context `length`."""
    if kind == "yarn":
        _check_yarn(params, where)
    elif kind == "llama3":
        _check_llama3(params, length, where)
    elif kind == "longrope":
        _check_longrope(config, params, where)


def _positive(params: dict[str, Any], key: str, where: str, why: str) -> None:
    value = params.get(key)
    if key in params and (not number(value) or value <= 0):
        raise ConfigError(f"{where}.{key}: expected a number > 0 ({why}), got {value!r}")


def _check_yarn(params: dict[str, Any], where: str) -> None:
    _positive(params, "attention_factor", where, "the scale on every cos/sin; 0 would zero all positions")
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):
        _positive(params, key, where, f"rotations bounding YaRN's ramp; transformers reads 0 as unset and uses "
                                      f"{default}")
    fast, slow = params.get("beta_fast", 32), params.get("beta_slow", 1)
    if fast <= slow:
        raise ConfigError(f"{where}.beta_fast: {fast} is not above beta_slow {slow} (defaults 32 and 1): YaRN's ramp "
                          "runs from beta_fast rotations down to beta_slow; give beta_fast > beta_slow")
    for key in ("mscale", "mscale_all_dim"):
        _positive(params, key, where, "transformers ignores 0")
    if "attention_factor" in params:
        for key in ("mscale", "mscale_all_dim"):
            if key in params:
                raise ConfigError(f"{where}.{key}: transformers ignores it when attention_factor is given (mscale "
                                  "and mscale_all_dim only derive an attention factor); remove it or attention_factor")
    elif ("mscale" in params) != ("mscale_all_dim" in params):
        have, lack = ("mscale", "mscale_all_dim") if "mscale" in params else ("mscale_all_dim", "mscale")
        raise ConfigError(f"{where}.{have}: transformers uses it only together with {lack} (and ignores it alone); "
                          f"add {lack} or remove {have}")
    if "truncate" in params and not isinstance(params["truncate"], bool):
        raise ConfigError(f"{where}.truncate: expected true or false, got {params['truncate']!r}")


def _check_llama3(params: dict[str, Any], length: int, where: str) -> None:
    _positive(params, "low_freq_factor", where, "the original context / it is the longest wavelength kept unscaled")
    _positive(params, "high_freq_factor", where, "the original context / it is the shortest wavelength scaled")
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    if high <= low:
        raise ConfigError(f"{where}.high_freq_factor: {high} is not above low_freq_factor {low}: llama3 smooths "
                          "between the two (Llama 3.1: low 1.0, high 4.0); give high_freq_factor > low_freq_factor")
    original = params["original_max_position_embeddings"]
    if length <= original:
        raise ConfigError(f"{where}.factor: {params.get('factor')} gives {length} positions, not more than the "
                          f"original {original} (transformers warns that llama3 needs a longer context); give a "
                          "factor > 1")


def _check_longrope(config: Any, params: dict[str, Any], where: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
    for key in ("short_factor", "long_factor"):
        value = params[key]
        if not isinstance(value, list) or len(value) != half or not all(number(v) and v > 0 for v in value):
            raise ConfigError(f"{where}.{key}: expected a list of {half} numbers > 0 (one per rotary frequency of "
                              f"this model's {head_dim}-dim heads), got {value!r}")
    _positive(params, "attention_factor", where, "the scale on every cos/sin; 0 would zero all positions")


__all__ = ["REQUIRED", "TYPE_KEYS", "check_keys", "check_values", "number", "yarn_length"]
