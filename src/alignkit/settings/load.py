"""Entry points: `load_config(path, overrides, command=...)`, `save_config`, `config_to_dict`.

Besides types, loading checks the names that refer to registries (reader, formatter, loss types),
the ReFT config of a ReFT adapter, and `train` against `transformers.TrainingArguments`' fields, so
a typo fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from pathlib import Path
from typing import Any

import yaml

from alignkit.adapters.config import refuse_unused_parts, used_parts, without_null_parts
from alignkit.files import atomic_write_text
from alignkit.settings.bounds import check_bounds
from alignkit.settings.sections import (CONFIG_CLASSES, DataSettings, DPOMethod, KTOMethod, ModelSettings, SFTMethod,
                                       TrainConfig, check_model_reads, check_split_data, loss_names)
from alignkit.settings.tiny import is_tiny, tiny_arch
from alignkit.settings.train import ALIGNKIT_TRAIN_KEYS, check_renamed
from alignkit.settings.trl_names import trl_loss_type_message
from alignkit.settings.typed import (ConfigError, build, coerce, join_key, merge, parse_overrides, read_yaml,
                                     unknown_key_error)

logger = logging.getLogger(__name__)


def check_training_args(train: dict[str, Any], where: str = "train") -> dict[str, Any]:
    """Keys and simple value types of `train` against `transformers.TrainingArguments`' fields (plus alignkit's
    own `ALIGNKIT_TRAIN_KEYS`)."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    try:
        hints = typing.get_type_hints(TrainingArguments)
    except Exception:  # an annotation that does not resolve: check keys only
        hints = {}
    for key, value in train.items():
        if key in ALIGNKIT_TRAIN_KEYS:
            coerce(value, ALIGNKIT_TRAIN_KEYS[key], join_key(where, key))
            continue
        if key not in fields:
            raise unknown_key_error(where, str(key), [*fields, *ALIGNKIT_TRAIN_KEYS], value)
        if key == "output_dir":
            raise ConfigError(f"{where}.output_dir: set by alignkit (<output_dir>/checkpoints); set the top-level "
                              "output_dir instead")
        coerce(value, hints.get(key, Any), join_key(where, key))  # validation only: TrainingArguments converts
    check_report_to(train.get("report_to"), where)
    if train.get("compile") not in (None, False) and train.get("torch_compile"):  # {}: compile with torch's defaults
        raise ConfigError(f"{where}.compile and {where}.torch_compile: choose one (compile: each decoder layer, "
                          "regionally; torch_compile: the whole model, by the Trainer)")
    return train


def check_best_metric(cfg: Any, command: str) -> None:
    """`train.metric_for_best_model` (load_best_model_at_end, save_strategy best, plateau schedules) against what
    the objective's evaluation logs (`alignkit.trainers.TRAINERS[command].eval_metrics`, from the method's
    settings): a name it never logs passed, the run folder was written, and transformers stopped at the first
    evaluation with a KeyError. `eval_x` and `x` are the same metric, as transformers reads them. A metric better when
    lower (`alignkit.trainers.lower_is_better`) is refused too with train.greater_is_better true, or unset where
    transformers' default (higher is better unless the name ends in 'loss') would keep the worst checkpoint as the
    best (`alignkit.trainers.check_best_model_metric`, also run when a trainer is built in Python)."""
    name = cfg.train.get("metric_for_best_model")
    if name is None:
        return
    from alignkit.trainers import TRAINERS, check_best_model_metric

    logged = TRAINERS[command].eval_metrics(**dataclasses.asdict(cfg.method))
    check_best_model_metric(name, cfg.train.get("greater_is_better"), logged, f"alignkit {command}", "train.")


def check_report_to(report_to: Any, where: str = "train") -> None:
    """Each tracker named in `report_to` against transformers' integrations (plus none / all): an unknown one
    stopped the Trainer's construction with a ValueError ('unexpected error') instead of one line naming the key."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    valid = ["none", "all", *INTEGRATION_TO_CALLBACK]
    for name in names:
        if name not in valid:
            raise ConfigError(f"{where}.report_to: {name!r} is not a tracker{_suggest(str(name), valid)}; valid: "
                              f"{', '.join(valid)}")


def _check_names(cfg: Any) -> None:
    """Registry names (readers, formatters, losses) and the ReFT config, checked before any work starts."""
    from alignkit.data import FORMATTERS, READERS
    from alignkit.losses import PREFERENCE_LOSSES, SFT_LOSSES, UNPAIRED_LOSSES

    def check(name: str | None, valid: Any, where: str, extra: tuple[str, ...] = ()) -> None:
        trl = trl_loss_type_message(where, name) if where.startswith("method.loss_type") and name else None
        if name is not None and name not in valid and name not in extra and trl is not None:
            raise ConfigError(trl)
        if name is not None and name not in valid and name not in extra:
            names = [*extra, *sorted(valid)]
            raise ConfigError(f"{where}: {name!r} is not registered{_suggest(name, names)}; valid: {', '.join(names)}")

    if not hasattr(cfg, "data") or not hasattr(cfg, "model"):  # serve, augment: they check themselves (settings/)
        return
    if cfg.data.path is None:
        raise ConfigError("data.path: required; point it at a data file, e.g. bundled:data/hh_rlhf_sample.jsonl")
    tiny_arch(cfg.model.path, "model.path")
    check(cfg.data.reader, READERS, "data.reader")
    check(cfg.data.formatter, FORMATTERS, "data.formatter", ("auto",))
    method = getattr(cfg, "method", None)
    registry = {SFTMethod: SFT_LOSSES, DPOMethod: PREFERENCE_LOSSES, KTOMethod: UNPAIRED_LOSSES}.get(type(method))
    if registry is not None:
        for i, name in enumerate(loss_names(method.loss_type)):
            check(name, registry, "method.loss_type" + ("" if isinstance(method.loss_type, str) else f"[{i}]"))
    adapter = getattr(cfg, "adapter", None)
    if adapter is not None:
        try:
            adapter.check()
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(str(e).strip("'\"")) from None


def _check_model(cfg: Any) -> None:
    """`model.rope_scaling` against the model's own config, when that config can be read without loading
    weights (`tiny:<arch>` or a local folder); otherwise it is checked when the model loads."""
    ms = getattr(cfg, "model", None)
    if getattr(ms, "rope_scaling", None) is None:
        return
    if is_tiny(ms.path):
        from alignkit.models.tiny import tiny_config

        model_config = tiny_config(tiny_arch(ms.path, "model.path"), vocab_size=512)
    elif (Path(ms.path) / "config.json").is_file():
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(ms.path, trust_remote_code=ms.trust_remote_code)
    else:
        return
    from alignkit.models.rope import scaled_rope_parameters

    scaled_rope_parameters(model_config, ms.rope_scaling)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(data: dict[str, Any], command: str) -> Any:
    """The typed config of `command` from a plain mapping (a YAML file's content after overrides)."""
    if command not in CONFIG_CLASSES:
        raise ConfigError(f"unknown command {command!r}; valid: {', '.join(CONFIG_CLASSES)}")
    data = dict(data)
    declared = data.pop("command", command)
    if declared != command:
        raise ConfigError(f"command: this config is for `alignkit {declared}`, not `alignkit {command}`")
    check_renamed(data, command)
    if isinstance(data.get("adapter"), dict):  # adapter.lora=null drops a file's lora section (e.g. for kind=full)
        data["adapter"] = without_null_parts(data["adapter"])
        try:  # a part section the kind does not use, even at its defaults (the built settings cannot tell)
            refuse_unused_parts(data["adapter"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cfg = build(CONFIG_CLASSES[command], data)
    if isinstance(getattr(cfg, "data", None), DataSettings):  # every command's data section, offline and online
        check_split_data(cfg.data)
    if isinstance(getattr(cfg, "model", None), ModelSettings):  # the policy / trained model of every command
        check_model_reads(cfg.model, command)
    if isinstance(cfg, TrainConfig):
        check_training_args(cfg.train)
        check_best_metric(cfg, command)
    _check_names(cfg)
    _check_model(cfg)
    if not getattr(cfg, "checks_own_bounds", False):  # an online run config has checked them when it was built
        check_bounds(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, command: str | None = None) -> Any:
    """Read the YAML at `path` (None: empty), apply dotted `overrides`, build the typed config.

    `command` defaults to the file's `command:` key. Errors are `ConfigError`s prefixed with the file."""
    data = read_yaml(path) if path is not None else {}
    command = command or data.get("command")
    if command is None:
        raise ConfigError(f"{path}: no `command:` key; pass the command (alignkit <command> --config {path})")
    extra = parse_overrides(list(overrides or []))
    try:
        refuse_eval_steps_beside_no(data, extra, path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    data = merge(data, extra)
    try:
        return config_from_dict(data, command)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def refuse_eval_steps_beside_no(data: dict[str, Any], extra: dict[str, Any], path: Any = None) -> None:
    """train.eval_strategy no beside train.eval_steps N: 'no' evaluates only after the last step, eval_steps ignored.
    Refused when the overrides give eval_steps under a 'no' (theirs or the file's): the user asked for steps that
    would not run. An override eval_strategy=no over a file's eval_steps is the off switch (README's commands; the
    resolved config records eval_steps null, `TrainConfigBase`). Both in the file alone: a config.yaml saved before
    that null was recorded holds exactly this (README's commands wrote it), so it loads, with one warning naming the
    file; the run does what it did (no evaluation every N steps)."""
    file_train, over_train = data.get("train"), extra.get("train")
    file_train = file_train if isinstance(file_train, dict) else {}
    over_train = over_train if isinstance(over_train, dict) else {}
    strategy = over_train.get("eval_strategy", file_train.get("eval_strategy"))
    if strategy is None or str(getattr(strategy, "value", strategy)).lower() not in ("no", "false"):
        return
    where = "in the overrides" if "eval_strategy" in over_train else "in the config file"
    if over_train.get("eval_steps") is not None:
        raise ConfigError(f"train.eval_steps: {over_train['eval_steps']} beside train.eval_strategy=no {where}: 'no' "
                          "evaluates only after the last step, so eval_steps would be ignored; set "
                          "train.eval_strategy=steps to evaluate every N steps, or remove train.eval_steps")
    if not {"eval_strategy", "eval_steps"} & set(over_train) and file_train.get("eval_steps") is not None:
        logger.warning("%s: train.eval_steps: %s beside train.eval_strategy=no: 'no' evaluates only after the last "
                       "step, so eval_steps is ignored (a config.yaml saved before this was recorded as null holds "
                       "both); set train.eval_strategy=steps to evaluate every N steps, or remove train.eval_steps",
                       path or "the config", file_train["eval_steps"])


def command_of(cfg: Any) -> str:
    return next(name for name, cls in CONFIG_CLASSES.items() if type(cfg) is cls)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain mapping (command first) that `config_from_dict` turns back into an equal config. The adapter section
    holds only the parts its kind uses (`used_parts`): a part section under another kind is refused on load."""
    out = {"command": command_of(cfg), **dataclasses.asdict(cfg)}
    if isinstance(out.get("adapter"), dict):
        out["adapter"] = used_parts(out["adapter"])
    return out


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config to `path` atomically (a kill or a full disk leaves the previous file whole).
    `overwrite` (eval / generate / augment / sample / annotate: this invocation may replace earlier outputs) is
    written false: a rerun from the saved file (or a copy of it elsewhere) must ask again, not replace silently."""
    data = config_to_dict(cfg)
    if data.get("overwrite") is True:
        data["overwrite"] = False
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


__all__ = ["check_best_metric", "check_training_args", "command_of", "config_from_dict", "config_to_dict",
           "dump_config", "load_config", "refuse_eval_steps_beside_no", "save_config"]
