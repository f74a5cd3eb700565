"""`reft_prefix_cache` (train.reft_prefix_cache): the ReFT frozen-prefix cache around a training run.

`None` (the default): on for a ReFT model (adapter kind reft or reft+lora) on the CPU whose run passes over its examples
more than once (num_train_epochs > 1, or max_steps covering more than one epoch) where the layers below the
interventions are a fixed function of the tokens (`alignkit.interventions.prefix_cache.unusable_reason`); said once in
the log either way. Not on GPUs by default: not measured there yet. `True`: on, refused in one line where it cannot
apply. `False`: off. See `alignkit.interventions.prefix_cache` for what is cached and how it checks itself.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from torch import nn

from alignkit.adapters.base import unwrap_parallel
from alignkit.interventions.prefix_cache import unusable_reason
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)


def _reft(model: nn.Module) -> Any:
    inner = unwrap_parallel(model)
    return inner if hasattr(inner, "enable_prefix_cache") else None


def noise_reason(args: Any) -> str | None:
    """Why a run with TrainingArguments `args` feeds the frozen layers other states each time (None: it does not):
    NEFTune adds fresh noise to the input embeddings at every training forward, so the layers' output of an example
    is not the same twice (cached, the run stopped at its second epoch with `PrefixCacheMismatch`)."""
    alpha = getattr(args, "neftune_noise_alpha", None)
    if alpha:
        return f"train.neftune_noise_alpha={alpha:g} adds fresh noise to the input embeddings at every training forward"
    return None


def check_prefix_cache(model: nn.Module, setting: bool | None, args: Any = None) -> None:
    """Refuse `reft_prefix_cache=True` where it cannot apply (ConfigError, one line, before anything is written).
    `args`: the run's TrainingArguments (`noise_reason`)."""
    if setting is not None and not isinstance(setting, bool):
        raise ConfigError(f"reft_prefix_cache must be true, false or null, got {setting!r}")
    if setting is not True:
        return
    reft = _reft(model)
    if reft is None:
        raise ConfigError("train.reft_prefix_cache: true needs a ReFT adapter (adapter.kind reft or reft+lora); this "
                          "model "
                         "has none: leave train.reft_prefix_cache out")
    reason = unusable_reason(reft) or noise_reason(args)
    if reason is not None:
        raise ConfigError("train.reft_prefix_cache: true, but the layers below the interventions are not a fixed "
                          "function "
                         f"of the tokens: {reason}; set train.reft_prefix_cache: false")


def data_passes(args: Any, dataset: Any) -> float | None:
    """How many times a run with TrainingArguments `args` goes over `dataset` (None when it has no length)."""
    try:
        n = len(dataset)
    except TypeError:
        return None
    if args.max_steps is not None and args.max_steps > 0:
        return (args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                / max(n, 1))
    return float(args.num_train_epochs)


@contextlib.contextmanager
def prefix_cache(model: nn.Module, setting: bool | None, passes: float | None, args: Any = None) -> Iterator[None]:
    """The cache on `model`'s ReftModel for the duration of the block (see the module's docstring); `args`: the
    run's TrainingArguments (`noise_reason`)."""
    reft = _reft(model)
    if reft is None or setting is False:
        yield
        return
    if setting is None:
        reason = unusable_reason(reft) or noise_reason(args)
        if reason is None and (passes is None or passes <= 1):
            reason = "the run passes over its examples once" if passes is not None else "the dataset has no length"
        if reason is None and next(reft.parameters()).device.type != "cpu":
            reason = ("not measured on a GPU yet (each step copies the cached states from host memory): "
                      "train.reft_prefix_cache: true turns it on")
        if reason is not None:
            logger.info("ReFT prefix cache off: %s", reason)
            yield
            return
    cache = reft.enable_prefix_cache()
    logger.info("ReFT prefix cache on: layers 0-%d (below every intervention) run once per example, then their "
                "output is read back (train.reft_prefix_cache: false turns it off)", cache.frozen - 1)
    try:
        yield
    finally:
        logger.info("ReFT prefix cache: %d examples cached (%.1f MiB), %d forwards used it", len(cache.store),
                    cache.bytes / 1024 ** 2, cache.hits)
        reft.disable_prefix_cache()


__all__ = ["check_prefix_cache", "data_passes", "noise_reason", "prefix_cache"]
