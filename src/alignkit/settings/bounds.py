"""Value bounds of every numeric hyper-parameter, checked when a config is loaded (before anything is written).

One table, `BOUNDS`: (section, key, test, what is allowed). A key that a config class does not have is skipped,
so the table serves every command; `train` (TrainingArguments keywords) is checked only for keys the config sets
(TrainingArguments' defaults are valid), plus the scheduler / optimizer names against transformers' own lists.
Non-finite numbers are refused everywhere. Errors name the dotted key, the value, and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

from alignkit.loss_bounds import LOSS_BOUNDS, allowed as loss_allowed
from alignkit.settings.typed import ConfigError


def _pos(v: Any) -> bool:
    return v > 0


def _nonneg(v: Any) -> bool:
    return v >= 0


def _ge1(v: Any) -> bool:
    return v >= 1


BOUNDS: list[tuple[str, str, Callable[[Any], bool], str]] = [
    # method (offline and online; the optimisation keys are train's: TRAIN_BOUNDS)
    # the loss hyper-parameters: one table with the Python API's checks (alignkit.loss_bounds)
    *(("method", key, test, loss_allowed(key)) for key, (test, _, _) in LOSS_BOUNDS.items()),
    ("method", "chunk_size", _ge1, ">= 1"),
    ("method", "prompts_per_step", _ge1, ">= 1"),
    ("method", "epochs_per_step", _ge1, ">= 1"),
    ("method", "mini_batch_size", _ge1, ">= 1, or null for the whole batch"),
    ("method", "kl_coef", _nonneg, ">= 0"),
    ("method", "kl_target", _pos, "> 0, or null for a fixed KL coefficient"),
    ("method", "kl_horizon", _ge1, ">= 1"),
    ("method", "stall_steps", _nonneg, ">= 0 (0: never stop a run without reward signal, only warn)"),
    ("method", "generation_batch_size", _ge1, ">= 1"),
    ("method", "batch_size", _ge1, ">= 1"),
    ("method", "clip_eps", _pos, "> 0 (the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps])"),
    ("method", "clip_eps_high", _pos, "> 0, or null for clip_eps (the ratio's upper clip is 1 + clip_eps_high)"),
    ("method", "dual_clip", lambda v: v > 1, "> 1, or null for no dual clip (Ye et al. use 3)"),
    ("method", "cispo_max", _pos, "> 0, or null for the clipped loss (CISPO's cap of the weight pi / pi_old; TRL's "
     "epsilon_high with loss_type cispo, 5.0 recommended)"),
    ("method", "top_entropy_quantile", lambda v: 0 <= v <= 1, "in [0, 1] (the share of loss tokens, by entropy, "
     "with a policy term; 1: all, 0: the highest-entropy token)"),
    ("method", "reward_clip", _pos, "> 0, or null for no clipping (rewards are clipped to [-reward_clip, "
                                     "reward_clip])"),
    ("method", "vf_coef", _nonneg, ">= 0"),
    ("method", "ptx_coef", _nonneg, ">= 0 (0: no pretraining mix)"),
    ("method", "ptx_batch_size", _ge1, ">= 1, or null for the update's number of samples"),
    ("method", "cliprange_value", _pos, "> 0"),
    ("method", "gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("method", "lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
    # data
    ("data", "eval_fraction", lambda v: 0 <= v < 1, "in [0, 1) (0: no split)"),
    ("data", "max_length", _ge1, ">= 1, or null for no limit"),
    ("data", "max_prompt_length", _ge1, ">= 1, or null for no limit"),
    ("data", "max_records", _ge1, ">= 1, or null for all"),
    ("data", "max_dropped_fraction", lambda v: 0 <= v <= 1, "in [0, 1] (1: any share of the records may be dropped)"),
    # sampling (online) / generation
    ("sampling", "num_samples", _ge1, ">= 1"),
    ("sampling", "max_new_tokens", _ge1, ">= 1"),
    ("sampling", "temperature", _pos, "> 0"),
    ("sampling", "top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("generation", "max_new_tokens", _ge1, ">= 1"),
    ("generation", "temperature", _pos, "> 0"),
    ("generation", "top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("annotator", "batch_size", _ge1, ">= 1"),
    # adapter
    ("adapter.lora", "r", _ge1, ">= 1"),
    ("adapter.lora", "dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
]

# keys at the top of a config (generate, sample): (key, test, what is allowed)
TOP_BOUNDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("batch_size", _ge1, ">= 1"),
]

# train keys (TrainingArguments' and the online commands' alike): checked when the config sets them
TRAIN_BOUNDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("learning_rate", _pos, "> 0"),
    # transformers' set_seed seeds numpy too, which takes only these: -1 stopped the run as an 'unexpected error'
    ("seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32 - 1] (numpy's seed range; transformers' set_seed seeds it)"),
    ("ema_decay", lambda v: 0 < v < 1, "in (0, 1) (DeepSpeed-Chat's 0.992), or null for no EMA"),
    ("max_steps", lambda v: v >= 1 or v == -1, ">= 1, or -1 to train num_train_epochs epochs"),
    ("num_train_epochs", _pos, "> 0"),
    ("gradient_accumulation_steps", _ge1, ">= 1"),
    ("per_device_train_batch_size", _ge1, ">= 1"),
    ("per_device_eval_batch_size", _ge1, ">= 1"),
    ("warmup_steps", _nonneg, ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("weight_decay", _nonneg, ">= 0"),
    ("max_grad_norm", _nonneg, ">= 0 (0: no clipping)"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", _pos, "> 0"),
    ("logging_steps", _pos, "> 0"),
    ("save_steps", _pos, "> 0"),
    ("eval_steps", _pos, "> 0"),
    ("save_total_limit", _ge1, ">= 1, or null to keep every checkpoint"),
]


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None) if not isinstance(node, dict) else node.get(part)
        if node is None:
            return None
    return node


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(where: str, value: Any, test: Callable[[Any], bool], allowed: str) -> None:
    if not _number(value):
        return  # types are checked elsewhere
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number; it must be {allowed}")
    if not test(value):
        raise ConfigError(f"{where}: {value!r} is out of range; it must be {allowed}")


def _names(values: Any) -> list[str]:
    return [getattr(v, "value", v) for v in values]


def check_section(parent: Any, section: str, where: str | None = None) -> None:
    """Raise a ConfigError naming the first value of `parent` (a section's object or mapping) outside `section`'s
    BOUNDS, as `<where>.<key>` (default: the section's name). Library configs call it on themselves (e.g.
    `alignkit.online.GRPOConfig` with section "method"), so they check what the CLI checks, when they are built."""
    for sec, key, test, allowed in BOUNDS:
        if sec != section:
            continue
        value = parent.get(key) if isinstance(parent, dict) else getattr(parent, key, None)
        values = value if isinstance(value, list) else [value]
        for v in values:
            _check(f"{where or section}.{key}", v, test, allowed)


def check_bounds(cfg: Any) -> None:
    """Raise a ConfigError naming the first out-of-range value of `cfg` (any command's config)."""
    for section in dict.fromkeys(sec for sec, _, _, _ in BOUNDS):  # BOUNDS' order of sections
        parent = _get(cfg, section)
        if parent is not None:
            check_section(parent, section)
    for key, test, allowed in TOP_BOUNDS:
        _check(key, getattr(cfg, key, None), test, allowed)
    train = getattr(cfg, "train", None)
    if isinstance(train, dict):
        for key, test, allowed in TRAIN_BOUNDS:
            if key in train and train[key] is not None:
                _check(f"train.{key}", train[key], test, allowed)
        _check_choice(train, "lr_scheduler_type", "transformers.trainer_utils", "SchedulerType")
        _check_choice(train, "optim", "transformers.training_args", "OptimizerNames")


def _check_choice(train: dict, key: str, module: str, enum_name: str) -> None:
    if key not in train or train[key] is None:
        return
    import importlib

    valid = _names(getattr(importlib.import_module(module), enum_name))
    value = getattr(train[key], "value", train[key])
    if value not in valid:
        close = [v for v in valid if v.startswith(str(value))][:1] or difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"train.{key}: {value!r} is not a known name{hint}; valid: {', '.join(valid)}")


def check_precision(train: dict) -> None:
    """bf16 / fp16 need hardware that has them: checked by a command before it loads a model (not when a config
    is loaded, so a GPU config still loads and dry-runs on a CPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    if train.get("fp16"):
        raise ConfigError("train.fp16: fp16 mixed precision needs a GPU and none is available; set train.fp16=false "
                          "(fp32), or train.bf16=true with train.use_cpu=true")
    if train.get("bf16") and not train.get("use_cpu"):
        raise ConfigError("train.bf16: there is no GPU here, so bf16 can only run on the CPU; set train.use_cpu=true "
                          "to train in bf16 on the CPU, or train.bf16=false (fp32)")


__all__ = ["BOUNDS", "TOP_BOUNDS", "TRAIN_BOUNDS", "check_bounds", "check_precision", "check_section"]
