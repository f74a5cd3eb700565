"""The `train:` section: one vocabulary of optimisation keys for every training command, offline and online.

    train: {learning_rate: 1e-5, max_steps: 100, seed: 0, save_steps: 50, report_to: tensorboard}

`TRAIN_KEYS` names the keys every training command understands (sft, rm, dpo, kto, online-dpo, grpo, rloo,
ppo), with their types. Offline commands pass `train` to `transformers.TrainingArguments`, so they also take
any other of its fields (checked against its dataclass when the config is loaded); the online commands run
their own loop and take exactly `ONLINE_TRAIN_KEYS`, which the CLI maps onto the online trainer's config at
use time (`max_steps` -> steps, `optim` -> optimizer, `disable_tqdm` -> not progress_bar, `max_grad_norm` 0 ->
no clipping). `method:` holds only the objective's parameters.

Defaults: `TRAIN_DEFAULTS[command]` are filled into `train` when the config leaves them out (per objective, as
TRL's configs do); the others are TrainingArguments' (`OFFLINE_DEFAULTS`, checked by a test against the
installed transformers) or the online trainer's (`ONLINE_DEFAULTS`, checked against its config class).

Old spellings are refused with one line naming the new key (`RENAMED`): e.g. `method.steps` ->
`train.max_steps`, `method.params.beta` -> `method.beta`, `data.padding_free` -> `train.padding_free`.
No torch here: `alignkit <command> --help` lists these keys without importing it.
"""

from __future__ import annotations

from typing import Any

from alignkit.settings.typed import ConfigError, coerce, unknown_key_error

# key -> (type, what it is). Offline: also any transformers.TrainingArguments field.
TRAIN_KEYS: dict[str, tuple[Any, str]] = {
    "learning_rate": (float, "peak learning rate"),
    "max_steps": (int, "optimizer steps (offline: -1 trains num_train_epochs epochs)"),
    "seed": (int, "random seed (adapter initialisation, data order, sampling)"),
    "optim": (str, "optimizer (online: adamw_torch or sgd)"),
    "weight_decay": (float, "AdamW weight decay"),
    "max_grad_norm": (float, "gradient clipping norm (0: no clipping)"),
    "gradient_accumulation_steps": (int, "micro-batches per optimizer step"),
    "save_steps": (int | float | None, "checkpoint every N steps (online: null = no checkpoints)"),
    "report_to": (str | list[str] | None, "trackers (tensorboard, wandb, ...); null: tensorboard when installed; "
                  "none: no tracker"),
    "disable_tqdm": (bool | None, "no progress bar"),
    "push_to_hub": (bool, "upload the final model/ folder and its card to the Hub (never checkpoints)"),
    "hub_model_id": (str | None, "the Hub repo (default: the run folder's name)"),
    "hub_private_repo": (bool | None, "create the Hub repo private"),
    "ema_decay": (float | None, "online: keep an EMA of the policy's trainable weights, ema = d ema + (1 - d) "
                  "theta after every optimizer step (DeepSpeed-Chat's --enable_ema: 0.992), saved as model_ema/; "
                  "null: none"),
    # offline only (transformers.TrainingArguments fields, listed for --help)
    "per_device_train_batch_size": (int, "batch size per process"),
    "num_train_epochs": (float, "epochs when max_steps is -1"),
    "lr_scheduler_type": (str, "learning-rate schedule (transformers' SchedulerType)"),
    "warmup_steps": (int | float, "warm-up steps (a float < 1: a fraction of the run)"),
    "logging_steps": (int | float, "log metrics every N steps"),
    "eval_strategy": (str, "no | steps | epoch"),
    "eval_steps": (int | float | None, "evaluate every N steps (offline: with eval_strategy steps; online: on the "
                   "held-out prompts of data.eval_path / eval_fraction, which are also evaluated after the last step)"),
    "save_total_limit": (int | None, "checkpoints kept"),
    "gradient_checkpointing": (bool | None, "recompute activations in backward (less memory)"),
    "bf16": (bool, "bf16 mixed precision"),
    "fp16": (bool, "fp16 mixed precision (GPU)"),
    # alignkit's own (not TrainingArguments fields), offline only
    "padding_free": (bool | None, "pack each batch's sequences in rows without padding (TRL's padding_free; sft, "
                                  "dpo, rm); null: on CPU runs where it is faster (sdpa attention, no checkpointing)"),
    "group_by_length": (bool, "batches of similar lengths (LengthGroupedSampler)"),
    "share_prompt": (bool | None, "one row per preference pair, the prompt run once (rm, dpo; sdpa/eager, no ReFT); "
                                  "null: on CPU runs where it is faster (sdpa attention, no checkpointing, no ReFT)"),
    "compile": (bool | dict[str, Any], "true or torch.compile options: compile each decoder layer (regional)"),
    "reft_prefix_cache": (bool | None, "ReFT: run the frozen layers below the interventions once per example and read "
                                       "their output back in later epochs; null: on when the run passes over its "
                                       "examples more than once and those layers are frozen and dropout-free"),
}

# alignkit's own train keys (not TrainingArguments fields): the CLI takes them out before building TrainingArguments
ALIGNKIT_TRAIN_KEYS: dict[str, Any] = {k: TRAIN_KEYS[k][0] for k in ("padding_free", "group_by_length", "share_prompt",
                                                                       "compile", "reft_prefix_cache")}

ONLINE_TRAIN_KEYS = ("learning_rate", "max_steps", "seed", "optim", "weight_decay", "max_grad_norm",
                     "gradient_accumulation_steps", "eval_steps", "save_steps", "report_to", "disable_tqdm",
                     "push_to_hub", "hub_model_id", "hub_private_repo", "ema_decay")
# TrainingArguments' Hub keys: read only by the upload (push_to_hub); alignkit's upload reads hub_model_id,
# hub_private_repo, hub_token and hub_revision, and refuses a hub_strategy / hub_always_push it does not follow
HUB_KEYS = ("hub_model_id", "hub_private_repo", "hub_token", "hub_revision", "hub_strategy", "hub_always_push")
# train.optim -> the online trainer's optimizer
ONLINE_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw_fused", "sgd": "sgd"}

TRAIN_COMMANDS = ("sft", "rm", "dpo", "kto")
ONLINE_COMMANDS = ("online-dpo", "grpo", "rloo", "ppo")

# Filled into `train` when a config leaves them out, as TRL's configs do (TRL 1.9 source: SFTConfig 2e-5,
# DPOConfig / KTOConfig 1e-6, RewardConfig 1e-4; logging_steps 10 instead of transformers' 500).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 2e-5, "logging_steps": 10},
    "rm": {"learning_rate": 1e-4, "logging_steps": 10},
    "dpo": {"learning_rate": 1e-6, "logging_steps": 10},
    "kto": {"learning_rate": 1e-6, "logging_steps": 10},
}

# transformers.TrainingArguments' defaults of the TRAIN_KEYS it has (shown by --help; tests/cli/test_settings_vocabulary
# checks them against the installed transformers), and alignkit's own (report_to null: alignkit's TensorBoard).
OFFLINE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5, "max_steps": -1, "seed": 42, "optim": "adamw_torch_fused", "weight_decay": 0.0,
    "max_grad_norm": 1.0, "gradient_accumulation_steps": 1, "save_steps": 500, "report_to": None,
    "disable_tqdm": None, "push_to_hub": False, "hub_model_id": None, "hub_private_repo": None,
    "per_device_train_batch_size": 8, "num_train_epochs": 3.0, "lr_scheduler_type": "linear",
    "warmup_steps": 0, "logging_steps": 500, "eval_strategy": "no", "eval_steps": None, "save_total_limit": None,
    "gradient_checkpointing": None, "bf16": False, "fp16": False,
    "padding_free": None, "group_by_length": False, "share_prompt": None, "compile": False, "reft_prefix_cache": None,
}

# The online trainers' defaults, in train's vocabulary (checked against alignkit.online's config classes by a test).
ONLINE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6, "max_steps": 100, "seed": 0, "optim": "adamw_torch_fused", "weight_decay": 0.0,
    "max_grad_norm": 1.0, "gradient_accumulation_steps": 1, "eval_steps": None, "save_steps": None,
    "report_to": None, "disable_tqdm": False, "push_to_hub": False, "hub_model_id": None, "hub_private_repo": False,
    "ema_decay": None,
}
ONLINE_LEARNING_RATES = {"online-dpo": 5e-7, "grpo": 1e-6, "rloo": 1e-6, "ppo": 3e-6}  # TRL's per-objective values


def train_defaults(command: str) -> dict[str, Any]:
    """Every train key's default for `command` (what --help shows)."""
    if command in ONLINE_COMMANDS:
        return {**ONLINE_DEFAULTS, "learning_rate": ONLINE_LEARNING_RATES[command]}
    return {**OFFLINE_DEFAULTS, **TRAIN_DEFAULTS.get(command, {})}


# Old spellings -> the one key of today. Refused with one line naming the new key (no silent aliases: two names
# for one setting is how `method.params.beta` came to override `method.beta` without a word).
_ONLINE_MOVED = {"steps": "train.max_steps", "learning_rate": "train.learning_rate", "seed": "train.seed",
                 "optimizer": "train.optim", "weight_decay": "train.weight_decay",
                 "max_grad_norm": "train.max_grad_norm",
                 "gradient_accumulation_steps": "train.gradient_accumulation_steps",
                 "save_steps": "train.save_steps", "report_to": "train.report_to",
                 "progress_bar": "train.disable_tqdm (inverted)", "push_to_hub": "train.push_to_hub",
                 "hub_model_id": "train.hub_model_id", "hub_private_repo": "train.hub_private_repo"}
RENAMED: dict[str, dict[str, str | None]] = {
    # section -> old key -> new dotted key; "*" commands: every command that has the section
    "online:method": {**_ONLINE_MOVED, "params": "method.<key> (write each preference parameter directly under "
                      "method: method.beta, method.label_smoothing, ...)",
                      "advantage": "the command (alignkit grpo or alignkit rloo)",
                      "save_at_end": None},  # removed: the run always writes model/
    "*:data": {"padding_free": "train.padding_free", "group_by_length": "train.group_by_length"},
}  # TRL's own names (f_divergence_type, num_generations, ...): alignkit.settings.trl_names


def check_renamed(data: dict[str, Any], command: str) -> None:
    """A ConfigError for the first old spelling in the raw config mapping `data`."""
    for scope, table in RENAMED.items():
        which, section = scope.split(":")
        if which == "online" and command not in ONLINE_COMMANDS:
            continue
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        for old, new in table.items():
            if old in node and new is None:
                raise ConfigError(f"{section}.{old}: removed (the run always writes its model/ folder); delete it")
            if old in node:
                raise ConfigError(f"{section}.{old}: renamed; use {new} (one vocabulary for every command: "
                                  f"train: optimisation, method: the objective; see docs/architecture.md)")


def check_train(train: dict[str, Any], command: str, where: str = "train") -> dict[str, Any]:
    """Types of the shared keys; for online commands, only `ONLINE_TRAIN_KEYS` (offline: the rest is checked
    against TrainingArguments by `alignkit.settings.load.check_training_args`). For every command: the Hub keys
    read only by the upload (`HUB_KEYS`) without `push_to_hub` are refused, and the fields no one reads
    (`refuse_unread_train_keys`)."""
    if command not in ONLINE_COMMANDS and train.get("ema_decay") is not None:
        raise ConfigError(f"{where}.ema_decay: the EMA of the policy (model_ema/) is kept by the online commands "
                          f"(online-dpo, grpo, rloo, ppo) only, so alignkit {command} would ignore it; remove it")
    for key, value in train.items():
        if command in ONLINE_COMMANDS and key not in ONLINE_TRAIN_KEYS:
            raise unknown_key_error(where, str(key), list(ONLINE_TRAIN_KEYS), value)
        if key in TRAIN_KEYS:
            train[key] = coerce(value, TRAIN_KEYS[key][0], f"{where}.{key}")
    if command in ONLINE_COMMANDS and train.get("optim") is not None and train["optim"] not in ONLINE_OPTIMIZERS:
        raise ConfigError(f"{where}.optim: {train['optim']!r} is not available for {command}; choose one of: "
                          f"{', '.join(ONLINE_OPTIMIZERS)}")
    for key in ("save_steps", "eval_steps"):  # online loops test (step + 1) % N == 0: whole steps only
        value = train.get(key)
        if command in ONLINE_COMMANDS and isinstance(value, float) and not value.is_integer():
            steps = train.get("max_steps") or ONLINE_DEFAULTS["max_steps"]
            hint = f" ({value:g} of {steps} steps: {max(1, round(value * steps))})" if 0 < value < 1 else ""
            raise ConfigError(f"{where}.{key}: {value:g} is not a whole number of steps; {command} counts whole steps "
                              "and does not read a fraction as a share of the run (as TrainingArguments does: every "
                              f"step was then a {key[:4]} step); give a step count{hint}")
        if command in ONLINE_COMMANDS and isinstance(value, float):
            train[key] = int(value)
    if command in ONLINE_COMMANDS and isinstance(train.get("max_steps"), int) and train["max_steps"] < 1:
        raise ConfigError(f"{where}.max_steps: {train['max_steps']} is out of range; it must be >= 1 for {command} "
                          "(online runs count steps, not epochs)")
    for key in HUB_KEYS:  # read only by the upload, which the run makes only then
        if train.get(key) not in (None, False) and not train.get("push_to_hub"):
            raise ConfigError(f"{where}.{key}: {train[key]!r} is read only when the run uploads its model "
                              f"({where}.push_to_hub: true, or --push_to_hub), which is not set, so it would be "
                              f"ignored; set {where}.push_to_hub=true, or remove {where}.{key}")
    refuse_unread_train_keys(train, command, where)
    if train.get("padding_free") and command not in ("sft", "dpo", "rm"):
        raise ConfigError(f"{where}.padding_free: not available for {command} (only sft, dpo and rm); remove it")
    if train.get("share_prompt") and command not in ("rm", "dpo"):
        raise ConfigError(f"{where}.share_prompt: not available for {command} (only rm and dpo); remove it")
    return train


def refuse_unread_train_keys(train: dict[str, Any], command: str, where: str = "train") -> None:
    """TrainingArguments fields an offline run accepts and nobody reads, at a value that asks for something the run
    does not do: the Hub upload's schedule (alignkit pushes the final model/ folder once, after the last step, with
    the Trainer's own push switched off) and the script flags transformers' Trainer leaves to scripts (`do_train`,
    `do_predict`; `do_eval` is checked against the data by `TrainConfig`). Each was accepted and ignored."""
    strategy = train.get("hub_strategy")
    strategy = None if strategy is None else str(getattr(strategy, "value", strategy))
    if strategy not in (None, "end"):
        raise ConfigError(f"{where}.hub_strategy: {strategy!r} is not read: alignkit uploads only the final model/ "
                          "folder, once, after the last step (no checkpoint and no upload at each save), so it would "
                          f"be ignored; remove {where}.hub_strategy (or set it to end, what the upload does)")
    if train.get("hub_always_push"):
        raise ConfigError(f"{where}.hub_always_push: true is not read: alignkit makes one upload, after the last step, "
                          f"so no push is ever skipped for an unfinished one, and it would be ignored; remove "
                          f"{where}.hub_always_push")
    if train.get("do_train") is False:
        raise ConfigError(f"{where}.do_train: false is not read (transformers' Trainer leaves it to scripts) and "
                          f"alignkit {command} always trains, so it would be ignored; to score a model without "
                          f"training it use alignkit eval; remove {where}.do_train")
    if train.get("do_predict"):
        raise ConfigError(f"{where}.do_predict: true is not read (transformers' Trainer leaves it to scripts) and "
                          f"alignkit {command} predicts on no test set, so it would be ignored; write a model's "
                          f"responses with alignkit generate after training; remove {where}.do_predict")
    refuse_full_eval(train, where)


def refuse_full_eval(train: dict[str, Any], where: str = "train") -> None:
    """`fp16_full_eval` / `bf16_full_eval` on a training run: the Trainer reads them only in an evaluation outside
    `train()`, by casting the model itself in place (compat row M21). The evaluations during the run ignored them, and
    the one after the last step (eval_strategy no, held-out data) cast the trained weights, so model/ was saved in
    float16 / bfloat16 after fp32 training, without a word."""
    for key, dtype in (("fp16_full_eval", "float16"), ("bf16_full_eval", "bfloat16")):
        if train.get(key):
            raise ConfigError(f"{where}.{key}: true is not applied to a training run: the evaluations during it "
                              f"keep the training precision, and the one after the last step would cast the trained "
                              f"model to {dtype} in place, so model/ would be saved in {dtype}; remove {where}.{key} "
                              f"(to score a model in {dtype}: alignkit eval with model.dtype={dtype})")


# step-count key -> (its strategy key, the strategies that never read it: what each does instead)
STEP_COUNTS = {
    "save_steps": ("save_strategy", {"no": "writes no checkpoint", "epoch": "saves after each epoch",
                                     "best": "saves when the best metric improves"}),
    # eval_strategy no: the off switch the examples set over a config that evaluates every N steps (kept)
    "eval_steps": ("eval_strategy", {"epoch": "evaluates after each epoch"}),
    "logging_steps": ("logging_strategy", {"no": "logs nothing during training", "epoch": "logs after each epoch"}),
}


def refuse_unread_step_counts(train: dict[str, Any], chosen: set[str], command: str) -> None:
    """ConfigError for a step count the user set (`chosen`: the keys of the config's own train section, from the
    file or a --set override) beside a strategy the user set that never reads it (save_strategy no / epoch / best
    with save_steps, eval_strategy epoch with eval_steps, logging_strategy no / epoch with logging_steps): the run
    went ahead and the count was ignored (no checkpoint every N steps). A count equal to the default alignkit fills
    in (`TRAIN_DEFAULTS`: logging_steps), which every run's config.yaml records, is read as that default."""
    for steps, (strategy_key, unread) in STEP_COUNTS.items():
        if steps not in chosen or strategy_key not in chosen or train.get(steps) is None:
            continue
        strategy = str(getattr(train[strategy_key], "value", train[strategy_key]))
        if strategy not in unread or train[steps] == TRAIN_DEFAULTS.get(command, {}).get(steps, object()):
            continue
        raise ConfigError(f"train.{steps}: {train[steps]} is read only with train.{strategy_key}=steps, and "
                          f"train.{strategy_key} is {strategy!r} (it {unread[strategy]}), so it would be ignored; "
                          f"set train.{strategy_key}=steps to use the step count, or remove train.{steps}")


def online_trainer_kwargs(train: dict[str, Any]) -> dict[str, Any]:
    """`train` (online) as keyword arguments of the online trainer's config (alignkit.online.OnlineConfig)."""
    out: dict[str, Any] = {}
    names = {"max_steps": "steps", "optim": "optimizer"}
    for key, value in train.items():
        if key == "disable_tqdm":
            out["progress_bar"] = not value
        elif key == "optim":
            out["optimizer"] = ONLINE_OPTIMIZERS[value]
        elif key == "hub_private_repo":
            out[key] = bool(value)
        elif key == "max_grad_norm":
            out["max_grad_norm"] = value if value else None  # 0: no clipping (as TrainingArguments)
        else:
            out[names.get(key, key)] = value
    return out


__all__ = ["ALIGNKIT_TRAIN_KEYS", "HUB_KEYS", "OFFLINE_DEFAULTS", "ONLINE_COMMANDS", "ONLINE_DEFAULTS",
           "ONLINE_TRAIN_KEYS", "RENAMED", "TRAIN_COMMANDS", "TRAIN_DEFAULTS", "TRAIN_KEYS", "check_renamed",
           "STEP_COUNTS", "check_train", "online_trainer_kwargs", "refuse_unread_step_counts",
           "refuse_full_eval", "refuse_unread_train_keys", "train_defaults"]
