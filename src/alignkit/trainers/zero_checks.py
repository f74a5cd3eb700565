"""DeepSpeed ZeRO offload settings (`zero_optimization.offload_param` / `offload_optimizer`, from a DeepSpeed JSON or an
accelerate config's `deepspeed_config`) that DeepSpeed would accept and then not apply, or that cannot work on this
machine: refused in one line when the trainer is built (`AlignTrainer.__init__`, through
`checks.refuse_deepspeed_mismatches`), before anything is written. What DeepSpeed 0.19 does with each (row A21):
- `offload_param` is read only by the ZeRO stage-3 engine; stages 0-2 keep every parameter where it is;
- `offload_optimizer` is read by no optimizer under stage 0 (ZeRO off; accelerate still swaps the optimizer for
  DeepSpeedCPUAdam); the stage 1/2 optimizer takes any device but none as CPU offload: `nvme` keeps the state in CPU
  memory and `nvme_path` is never read;
- device `nvme` under stage 3 swaps through `nvme_path/zero_stage_3/...` (created there when training starts) with
  DeepSpeed's async_io op (built on first use; it needs libaio): a missing or unwritable path, or an op that cannot be
  built, failed only when training began, after the run folder was written.
`refuse_invalid_zero_section` first runs DeepSpeed's own validation of the section (it runs in `deepspeed.initialize`,
when training starts): a misspelt key (`offload_parm`), an unknown device, partial offload below stage 3; and
`stage: "auto"`, which nothing fills: DeepSpeed drops "auto" values, so ZeRO would be off (stage 0)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable

from alignkit.settings import ConfigError

# the accelerate config keys that write each section (accelerate's DeepSpeedPlugin)
ACCELERATE_KEYS = {"offload_param": ("offload_param_device", "offload_param_nvme_path"),
                   "offload_optimizer": ("offload_optimizer_device", "offload_optimizer_nvme_path")}


def async_io_usable() -> bool:
    """Whether DeepSpeed's async_io op (its NVMe swapping) is prebuilt or can be built here (libaio found)."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    if installed_ops.get("async_io"):
        return True
    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    return builder is not None and bool(builder.is_compatible(verbose=False))


def offload_device(zero: dict[str, Any], section: str) -> str:
    """`zero_optimization.<section>.device`, lower case ("none" when not set)."""
    part = zero.get(section)
    return str((part if isinstance(part, dict) else {}).get("device") or "none").lower()


def refuse_unapplied_offload(config: dict[str, Any], where: str,
                             aio_usable: Callable[[], bool] = async_io_usable) -> None:
    """ConfigError (one line, starting with `where`: the config's source) for an offload setting of `config` that
    DeepSpeed would ignore under its ZeRO stage, or an NVMe offload that would fail when training starts (see the
    module docstring). `aio_usable` is asked only for an NVMe offload under stage 3."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    refuse_invalid_zero_section(zero, where)
    try:
        stage = int(zero.get("stage", 0))
    except (TypeError, ValueError):  # "auto" or a typo: DeepSpeed's own validation says so
        return
    for section in ("offload_param", "offload_optimizer"):
        device = offload_device(zero, section)
        if device in ("none", "auto"):
            continue
        key = f"zero_optimization.{section}"
        device_key, path_key = ACCELERATE_KEYS[section]
        if stage < 3:
            refuse_below_stage3(where, key, device, device_key, stage)
        else:
            refuse_unusable_nvme(where, key, device, zero[section].get("nvme_path"), path_key, aio_usable)


def refuse_invalid_zero_section(zero: dict[str, Any], where: str) -> None:
    """ConfigError (one line) for a `zero_optimization` section DeepSpeed's validation rejects (it runs only in
    `deepspeed.initialize`, once training starts), naming the key, DeepSpeed's reason and, for an unknown key, the
    closest one DeepSpeed knows; and for `stage: "auto"` (transformers fills no stage and DeepSpeed drops "auto"
    values: ZeRO off). Nothing when DeepSpeed is not installed."""
    if str(zero.get("stage", "")).lower() == "auto":
        raise ConfigError(f"{where}: zero_optimization.stage is \"auto\", which nothing fills (transformers fills "
                          "batch sizes, precision and bucket sizes, not the stage) and DeepSpeed drops, so ZeRO would "
                          "be off (stage 0); set zero_optimization.stage to 1, 2 or 3")
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except ValueError as e:  # pydantic's ValidationError (a ValueError), DeepSpeed's own validators' errors inside
        error = e.errors()[0] if callable(getattr(e, "errors", None)) else {"loc": (), "type": "", "msg": str(e)}
        loc = ".".join(str(part) for part in error["loc"])
        key = f"zero_optimization{'.' + loc if loc else ''}"
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(error["loc"][-1]), zero_key_names(DeepSpeedZeroConfig, error["loc"]),
                                              n=1)
            said = "is not a key DeepSpeed knows" + (f" (did you mean {close[0]!r}?)" if close else "")
        else:
            reason = error["msg"].splitlines()[0].removeprefix("Assertion failed, ").rstrip(".")
            said = f"is rejected by DeepSpeed: {reason}"
        raise ConfigError(f"{where}: {key} {said}; DeepSpeed would refuse it only once it starts (after the run "
                          "folder is written); fix or remove it") from None


def zero_key_names(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys (field names and aliases) of the DeepSpeed config model `model` holds at `loc[:-1]` (a nested section
    such as offload_param), for suggesting the one a misspelt key meant."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        inner = getattr(field, "annotation", None)
        args = [a for a in getattr(inner, "__args__", (inner,)) if hasattr(a, "model_fields")]
        if not args:
            return []
        model = args[0]
    return [n for name, f in model.model_fields.items() for n in (name, f.alias) if n]


def refuse_below_stage3(where: str, key: str, device: str, device_key: str, stage: int) -> None:
    """The refusal of an offload device under ZeRO stage 0-2 that DeepSpeed would not apply (nvme under 1/2 for the
    optimizer: CPU memory)."""
    at = f"{where}: {key}.device is {device} under zero_optimization.stage {stage}"
    if key.endswith("offload_param"):
        raise ConfigError(f"{at}, where DeepSpeed offloads no parameters (only the ZeRO stage-3 engine reads "
                          "offload_param), so it would be ignored; set zero_optimization.stage 3, or the device to "
                          f"none (accelerate config: {device_key}: none)")
    if stage == 0:
        raise ConfigError(f"{at} (ZeRO off), where no DeepSpeed optimizer reads offload_optimizer, so the optimizer "
                          "state would stay where it is (while accelerate swaps the optimizer for DeepSpeedCPUAdam); "
                          f"set zero_optimization.stage 1, 2 or 3, or the device to none (accelerate config: "
                          f"{device_key}: none)")
    if device == "nvme":
        raise ConfigError(f"{at}, whose optimizer has no NVMe swapping: DeepSpeed keeps the optimizer state in CPU "
                          "memory and never reads nvme_path; set the device to cpu (what stage "
                          f"{stage} does) or zero_optimization.stage 3 (accelerate config: {device_key})")


def refuse_unusable_nvme(where: str, key: str, device: str, path: Any, path_key: str,
                         aio_usable: Callable[[], bool]) -> None:
    """The refusal of an NVMe offload under ZeRO stage 3 that would fail when training starts: no nvme_path, one that
    is not a folder or cannot be written, or DeepSpeed's async_io op not buildable here."""
    if device != "nvme":
        return
    at = f"{where}: {key}.device is nvme"
    if path is None or str(path).strip().lower() in ("", "none"):
        raise ConfigError(f"{at} and {key}.nvme_path is not set, so DeepSpeed would fail when training starts (after "
                          f"the run folder is written); set {key}.nvme_path to a writable folder on the NVMe drive "
                          f"(accelerate config: {path_key})")
    folder = Path(str(path)).expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if folder.exists() and not folder.is_dir():
        why = "is not a folder"
    elif existing is None or not os.access(existing, os.W_OK | os.X_OK):
        why = f"cannot be written ({existing} is not writable)" if existing is not None else "cannot be created"
    elif not aio_usable():
        raise ConfigError(f"{at}: DeepSpeed swaps to NVMe with its async_io op, which cannot be built here (libaio "
                          "and its headers not found), so training would fail when it starts (after the run folder "
                          "is written); install libaio (apt install libaio-dev) or set the device to cpu / none")
    else:
        return
    raise ConfigError(f"{at} and {key}.nvme_path={str(path)!r} {why}: DeepSpeed creates its swap files there when "
                      f"training starts (after the run folder is written); set {key}.nvme_path to a writable folder "
                      f"on the NVMe drive (accelerate config: {path_key})")


__all__ = ["ACCELERATE_KEYS", "async_io_usable", "offload_device", "refuse_below_stage3", "refuse_invalid_zero_section",
           "refuse_unapplied_offload", "refuse_unusable_nvme", "zero_key_names"]
