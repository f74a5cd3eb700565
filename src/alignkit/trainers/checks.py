"""The checks `AlignTrainer` runs on its arguments and checkpoints before anything is written: settings the Trainer
would accept and then not apply (`refuse_ignored_arguments`, `refuse_metric_functions`, `check_optimizer`,
`check_scheduler`, `refuse_deepspeed_mismatches` (with a DeepSpeed config's own optimizer / schedule:
`deepspeed_replacements`); fields of a TrainingArguments subclass such as TRL's configs: `refuse_unread_fields`; batches
`dataloader_drop_last` would all drop: `refuse_empty_batches`; examples' weights: `alignkit.trainers.weights`), a
`metric_for_best_model` the objective's evaluation does not log, or one better when lower taken as better when higher
(`check_best_model_metric`), and a checkpoint a resumed run would not truly continue (`check_resumable`, with
`data_digest` of the training examples and the checkpoint's `STATE_JSON`). Each refusal is one ConfigError /
CheckpointError line naming the setting and how to fix it; the CLI runs the same checks when it loads a config."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, get_scheduler
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.training_args import ParallelMode

from alignkit.distributed import deepspeed_cannot_start, requested_engine
from alignkit.losses import PreferenceParams
from alignkit.naming import stable_name
from alignkit.run_commit import CheckpointError
from alignkit.settings import ConfigError
from alignkit.settings.trl_names import TRL_NAMES
from alignkit.trainers.zero_checks import offload_device, refuse_unapplied_offload

logger = logging.getLogger(__name__)

# logged metrics whose smaller values are the better ones besides the losses (names ending in "loss", and loss/<name>)
LOWER_IS_BETTER = ("runtime", "nll/token", "hinge")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the logged metric `metric` (without `eval_`) is the better one."""
    return metric.endswith("loss") or metric.startswith("loss/") or metric in LOWER_IS_BETTER


def check_best_metric_name(name: str | None, logged: tuple[str, ...], who: str, where: str = "") -> None:
    """A ConfigError when `name` (metric_for_best_model: `eval_x` or `x`, as transformers reads it) is not one of
    `logged` (an objective's `eval_metrics`): transformers would stop the run with a KeyError at its first
    evaluation. `who` names the objective, `where` prefixes the key (the CLI's "train.")."""
    if name is None or str(name).removeprefix("eval_") in logged:
        return
    spelled = [f"eval_{m}" for m in logged] if str(name).startswith("eval_") else list(logged)
    close = difflib.get_close_matches(str(name), spelled, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where}metric_for_best_model: {name!r} is not logged by {who}'s evaluation{hint}, so the "
                      f"first evaluation would stop the run (transformers' KeyError); use one of: {', '.join(spelled)}")


def check_best_model_metric(name: str | None, greater_is_better: bool | None, logged: tuple[str, ...], who: str,
                            where: str = "") -> None:
    """`check_best_metric_name`, then a ConfigError when `name` is better when lower (`lower_is_better`) and
    `greater_is_better` is True, or None where transformers makes it True (a name that does not end in 'loss'):
    the Trainer would keep (and load at the end) the checkpoint where the metric is highest, the worst one, without
    a word. TrainingArguments fills None in itself, so a Python-built trainer sees True whoever set it."""
    check_best_metric_name(name, logged, who, where)
    if name is None or not lower_is_better(metric := str(name).removeprefix("eval_")):
        return
    if greater_is_better is None and not metric.endswith("loss"):
        said = ("is not set: transformers then takes a metric whose name does not end in 'loss' as better when "
                "higher")
    elif greater_is_better:  # a Python caller's TrainingArguments hold True when it was not given: say so
        said = "is true" + ("" if where else " (TrainingArguments' default when it is not given, for a metric whose "
                                             "name does not end in 'loss')")
    else:
        return
    raise ConfigError(f"{where}metric_for_best_model: {name!r} is better when lower, and {where}greater_is_better "
                      f"{said}, so the 'best' checkpoint would be the worst one; set {where}greater_is_better=false")


STATE_JSON = "alignkit_state.json"  # in each checkpoint: what the Trainer's trainer_state.json does not keep
#   (num_tokens; world_size, the processes that wrote it)


def data_digest(dataset: Any) -> str | None:
    """SHA-256 of the training examples in their order (every field but the record `id`: token ids, masks, weights,
    ...), recorded in each checkpoint (`STATE_JSON`). None for data without a length (an iterable dataset: reading it
    here would consume it)."""
    if dataset is None or not hasattr(dataset, "__len__"):
        return None
    h = hashlib.sha256()
    for ex in dataset:
        h.update(json.dumps({k: v for k, v in dict(ex).items() if k != "id"}, sort_keys=True, default=repr).encode())
    return h.hexdigest()


# TrainingArguments that define the training a checkpoint continues. Resumed with another value, the Trainer takes
# the checkpoint's optimizer and scheduler states (the scheduler restores the old learning rate) and skips the batches
# seen, counted in batches of the new size and order: no longer the same training, and nothing says so. (How long the
# run goes, what it logs, evaluates and saves may change: the CLI's RESUMABLE_CHANGES; so may precision.)
TRAINING_FIELDS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "seed", "data_seed", "dataloader_drop_last", "train_sampling_strategy",
    "length_column_name", "average_tokens_across_devices", "neftune_noise_alpha")


def training_changes(checkpoint: str | os.PathLike, args_json: str, settings: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each of `TRAINING_FIELDS` that differs between the checkpoint's `training_args.json` and
    this run's arguments (`args_json`: `TrainingArguments.to_json_string()`), and each objective setting that differs
    from the `settings` recorded in its `STATE_JSON` (the trainer's `training_settings()`). A field either side does
    not record (another transformers version, an older alignkit) is not compared."""
    folder = Path(checkpoint)
    old_args = (json.loads((folder / "training_args.json").read_text())
                if (folder / "training_args.json").is_file() else {})
    new_args = json.loads(args_json)
    changes = [f"{k}: {old_args[k]!r} -> {new_args[k]!r}" for k in TRAINING_FIELDS
               if k in old_args and k in new_args and old_args[k] != new_args[k]]
    return changes + settings_changes(saved_state(folder).get("training_settings"), settings)


def settings_changes(old: Any, now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each setting that a checkpoint recorded (`old`, as read back from its JSON) and that
    differs in this run's `now` (a trainer's `training_settings()`: offline here, the online trainers'
    `OnlineTrainer.training_settings`), compared as JSON records them (tuples as lists). A key one side does not
    record (an older alignkit) is not compared; `old` that is not a mapping (none recorded): nothing is."""
    if not isinstance(old, dict):
        return []
    now = json.loads(json.dumps(now, default=stable_name))  # as checkpoints record them: no memory address
    return [f"{k}: {old[k]!r} -> {now[k]!r}" for k in sorted(set(old) & set(now)) if old[k] != now[k]]


def check_resumable(checkpoint: str | os.PathLike, world_size: int, label: str, digest: str | None,
                    args_json: str | None = None, settings: dict[str, Any] | None = None) -> None:
    """Refuse (CheckpointError, one line naming `label` and the folder) a complete checkpoint that the Trainer would
    resume without continuing the same training: one without the optimizer / scheduler states (saved with
    `save_only_model`, or under DeepSpeed; the Trainer then restarts Adam's moments and the learning-rate schedule
    from zero without a word), or one written by another number of processes (the batch of an optimizer step and
    which records count as already seen depend on it), or one trained on other data than this run's `digest`
    (`data_digest` of its training examples: the Trainer skips the batches the checkpoint had seen, counted in the
    new data: an edited or regenerated data file, another data.max_records or max_length). A checkpoint that does
    not record its world size (older alignkit) is not compared on it; data that cannot be compared (this run's
    has no length, so `digest` is None, or the checkpoint records no digest) is said in one warning: only the user
    can make sure the resumed run reads the same examples in the same order."""
    folder = Path(checkpoint)
    missing = [n for n in (OPTIMIZER_NAME, SCHEDULER_NAME) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{label}: {folder} holds no {' / '.join(missing)} (a checkpoint saved with "
                              "train.save_only_model=true, or under DeepSpeed): the resumed run would restart the "
                              "optimizer and the learning-rate schedule from zero, not continue them; start a new "
                              "run from its weights in another output_dir, or resume from a checkpoint saved "
                              "without train.save_only_model")
    state = saved_state(folder)
    saved = state.get("world_size")
    if isinstance(saved, int) and saved != world_size:
        raise CheckpointError(f"{label}: {folder} was written by a run of {saved} process(es), this one has "
                              f"{world_size}: the batch of an optimizer step (per_device_train_batch_size x "
                              "gradient_accumulation_steps x processes) and which records count as already seen "
                              f"depend on it, so the run would not continue the same training; launch {saved} "
                              "process(es), or start a new run from its weights in another output_dir")
    changes = training_changes(folder, args_json, settings or {}) if args_json is not None else []
    if changes:
        raise CheckpointError(f"{label}: {folder} was trained with other settings than this run's "
                              f"({'; '.join(changes)}): the resumed run would take its optimizer and scheduler states "
                              "(the old learning rate schedule) and skip the batches it had seen, so it would neither "
                              "continue that training nor run the new one; resume with the checkpoint's settings, or "
                              "start a new run from its weights in another output_dir")
    trained = state.get("data_sha256")
    if digest is None or not isinstance(trained, str):
        why = ("this run's training data has no length (an IterableDataset or a streaming dataset, which reading "
               "here would consume)" if digest is None else "it records no digest of its training examples (an "
               "older alignkit wrote it)")
        logger.warning("%s: the training examples could not be compared with the ones %s was trained on: %s. The "
                       "resumed run skips the batches the checkpoint had seen, counted in this run's data: resume on "
                       "the same data in the same order, or the run silently trains on other examples",
                       label, folder, why)
    elif trained != digest:
        raise CheckpointError(f"{label}: {folder} was trained on other training examples than this run's (SHA-256 "
                              f"of the tokenized examples {trained[:12]}... there, {digest[:12]}... here: the data "
                              "file changed, or data.max_records / max_length / the formatter / the tokenizer did), "
                              "so the resumed run would skip the batches it had seen counted in other data; resume "
                              "with the data it was trained on, or start a new run from its weights in another "
                              "output_dir")


def refuse_ignored_arguments(args: TrainingArguments, train_dataset: Any = None, group_by_length: bool = False) -> None:
    """TrainingArguments that alignkit's trainers would accept and silently not apply: one ConfigError each.
    `group_by_length`: the trainer's own length grouping (`BatchSampling`) is on."""
    # several GPUs, one process: the Trainer's DataParallel
    if getattr(args, "parallel_mode", None) == ParallelMode.NOT_DISTRIBUTED:
        raise ConfigError(f"this process sees {args.n_gpu} GPUs and was started without a launcher, so the Trainer "
                          "would wrap the model in torch.nn.DataParallel: per_device_train_batch_size on each GPU "
                          f"({args.n_gpu}x the batch this config asks for), a path alignkit does not run; launch one "
                          f"process per GPU (`accelerate launch --multi_gpu --num_processes {args.n_gpu} -m alignkit "
                          "...` or `torchrun --nproc_per_node "
                          f"{args.n_gpu} -m alignkit ...`), or train on one GPU (CUDA_VISIBLE_DEVICES=0)")
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ConfigError(f"train.label_smoothing_factor={args.label_smoothing_factor}: the Trainer applies it in "
                          "its own loss, which alignkit's objectives replace, so it would be ignored; remove it "
                          "(preference losses take method.label_smoothing: cDPO / robust / exo_pair)")
    if getattr(args, "average_tokens_across_devices", True) is False and getattr(args, "world_size", 1) > 1:
        raise ConfigError("train.average_tokens_across_devices=false: alignkit's objectives always divide by the "
                          "count summed over all processes (the exact mean of the optimizer step's batch), so it "
                          "would be ignored; remove it")
    if getattr(args, "use_liger_kernel", False) and importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.use_liger_kernel: liger-kernel is not installed (pip install liger-kernel; its "
                          "kernels need CUDA); the Trainer would fail only when training starts, after the run "
                          "folder was written")
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance" and train_dataset is not None \
            and hasattr(train_dataset, "__len__") and len(train_dataset) and "input_ids" not in train_dataset[0]:
        raise ConfigError("train.train_sampling_strategy='batch_rebalance' reads an input_ids column, which "
                          "preference / ranked features do not have; use 'group_by_length' (train.group_by_length)")
    column = getattr(args, "length_column_name", "length")
    if column != "length" and (group_by_length or getattr(args, "train_sampling_strategy", None) != "batch_rebalance"):
        raise ConfigError(f"train.length_column_name={column!r}: alignkit's length grouping (group_by_length) measures "
                          "each tokenized example itself, and only train_sampling_strategy='batch_rebalance' (the "
                          "Trainer's sampler) reads a length column, so it would be ignored; remove it")
    if getattr(args, "deepspeed", None) and deepspeed_cannot_start():
        raise ConfigError("train.deepspeed: DeepSpeed starts only under a launcher (torchrun, accelerate launch, "
                          "deepspeed), even for one process; without one it looks for MPI (mpi4py, not installed) and "
                          "failed once training began, after the run folder was written; launch with `torchrun "
                          "--nproc_per_node N -m alignkit ...`, or use an accelerate DeepSpeed config "
                          "(configs/accelerate/zero2-cpu.yaml, zero2.yaml) instead of train.deepspeed")
    if getattr(args, "fsdp", None) and not args.fsdp_config.get("xla", False):
        if args.parallel_mode != ParallelMode.DISTRIBUTED:  # the Trainer's own refusal, as a config error
            raise ConfigError("train.fsdp: FSDP shards the model over several processes and this run "
                              "has one; remove train.fsdp, or launch several processes (torchrun / accelerate launch)")
        refuse_trainer_fsdp_on_cpu(args.fsdp)


def refuse_empty_batches(args: TrainingArguments, train_dataset: Any = None, eval_dataset: Any = None) -> None:
    """`dataloader_drop_last` with a batch larger than the data: every batch is dropped. Training ended at step 0 with
    the untrained model saved as the run's, exit 0; an evaluation logged rows without eval_loss (a runtime and a
    rate of samples it never scored). One ConfigError naming the batch size, before anything is written."""
    if not getattr(args, "dataloader_drop_last", False):
        return
    evals = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
    sets = [("training", train_dataset, "per_device_train_batch_size", args.per_device_train_batch_size)]
    sets += [(f"evaluation{f' ({k})' if k else ''}", v, "per_device_eval_batch_size", args.per_device_eval_batch_size)
             for k, v in evals.items()]
    for what, data, key, batch in sets:
        n = len(data) if hasattr(data, "__len__") else 0
        if 0 < n < batch:
            lost = ("trained (the run ends at step 0, its model the untrained one)" if key.endswith("train_batch_size")
                    else "evaluated (rows without eval_loss)")
            raise ConfigError(f"train.dataloader_drop_last: the {n} {what} example(s) make no full batch of "
                              f"train.{key}={batch}, so every batch would be dropped and nothing {lost}; set "
                              f"train.{key} to at most {n}, or train.dataloader_drop_last=false")


def refuse_trainer_fsdp_on_cpu(fsdp: Any) -> None:
    """ConfigError when `train.fsdp` (the Trainer's FSDP, from the training arguments) is set on a machine without
    CUDA and the launcher asked for no FSDP of its own. The CLI calls it before building the TrainingArguments, so
    that every rank refuses on its own before any collective (a rank refusing later, after the process group
    formed, left its peer failing in gloo's connect with an "unexpected error")."""
    if fsdp and not torch.cuda.is_available() and requested_engine() != "fsdp":
        raise ConfigError("train.fsdp: the Trainer's FSDP from the training arguments does not run on CPU "
                          "processes (it failed once training began, after the run folder was written); remove "
                          "train.fsdp and launch with `accelerate launch --config_file "
                          "configs/accelerate/fsdp2.yaml` (FSDP2, which alignkit runs on CPU processes)")


def refuse_metric_functions(kwargs: dict[str, Any], owner: str) -> None:
    """`compute_metrics` / `preprocess_logits_for_metrics` given to an alignkit trainer: the Trainer calls them only
    with an evaluation's logits and labels, which alignkit's `prediction_step` does not return (its losses and
    metrics are the objective's), so they were never called, without a word. One ConfigError naming the argument."""
    for name in ("compute_metrics", "preprocess_logits_for_metrics"):
        if kwargs.get(name) is not None:
            raise ConfigError(f"{owner}: {name} would never be called: alignkit's evaluation returns the objective's "
                              f"loss and metrics (logged as eval_<name>, listed by {owner}.eval_metrics()), no logits "
                              "or labels; remove it (a reward model's accuracy on pairs: "
                              "alignkit.trainers.evaluation.evaluate_reward_model)")


# the loss parameters a preference trainer takes in `params` (a PreferenceParams), not as keywords of its own
PREFERENCE_PARAMS = frozenset(f.name for f in dataclasses.fields(PreferenceParams)) - {"bco_delta"}


def refuse_unread_fields(args: Any, owner: type) -> None:
    """`args` of a TrainingArguments subclass with fields of its own (a TRL user's habit: TRL's SFTConfig, DPOConfig,
    ... carry max_length, packing, beta, ...): alignkit's trainers read only TrainingArguments' fields from `args`, so
    those were ignored without a word (SFTConfig(max_length=256) trained at the trainer's max_length=1024). A field
    set to other than its default is refused when the trainer takes a keyword of that name (pass it there), takes it
    in `params` (a preference loss parameter: DPOConfig's label_smoothing, discopop_tau) or TRL has a setting of that
    name (`alignkit.settings.trl_names`); any other (a script's own field) is warned about."""
    if not dataclasses.is_dataclass(args) or type(args) is TrainingArguments:
        return
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    keywords = {name for k in owner.__mro__[:owner.__mro__.index(Trainer)] if "__init__" in vars(k)
                for name in inspect.signature(vars(k)["__init__"]).parameters} - {"self", "model", "args", "kwargs"}
    try:  # the class's own defaults as its __post_init__ leaves them (e.g. a loss_type "sigmoid" made ["sigmoid"])
        fresh = type(args)(output_dir=args.output_dir)
    except Exception:  # a class that needs more to be built: its fields' declared defaults only  # noqa: BLE001
        fresh = None
    unread = []
    for f in dataclasses.fields(args):
        if f.name in known or not f.init:
            continue
        value = getattr(args, f.name, None)
        defaults = [f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else object()]
        if fresh is not None:
            defaults.append(getattr(fresh, f.name, None))
        try:
            same = any(bool(value == d) for d in defaults)
        except Exception:  # values that do not compare (arrays, tensors): count as set  # noqa: BLE001
            same = False
        if same:
            continue
        where = (f"{owner.__name__}: args.{f.name}={value!r} is a field of {type(args).__name__}, which alignkit "
                 "never reads (its trainers take only transformers.TrainingArguments' fields from args), so it would "
                 "be ignored")
        if f.name in keywords:
            raise ConfigError(f"{where}; pass it to the trainer: {owner.__name__}(..., {f.name}={value!r})")
        if "params" in keywords and f.name in PREFERENCE_PARAMS:  # TRL's DPOConfig label_smoothing, discopop_tau
            raise ConfigError(f"{where}; pass it in the trainer's loss parameters: {owner.__name__}(..., "
                              f"params=PreferenceParams({f.name}={value!r}, ...)) (alignkit.losses.PreferenceParams)")
        if f.name in TRL_NAMES:
            raise ConfigError(f"{where}; alignkit's equivalent (the CLI's config key): {TRL_NAMES[f.name]}")
        unread.append(f.name)
    if unread:
        logger.warning("%s: %s of %s %s not read by alignkit (only transformers.TrainingArguments' fields are)",
                       owner.__name__, ", ".join(unread), type(args).__name__, "is" if len(unread) == 1 else "are")


def check_optimizer(args: TrainingArguments, kwargs: dict[str, Any]) -> None:
    """`optim` / `optim_args` the Trainer would not apply as written, found before anything is written (the Trainer
    builds its optimizer only in `train()`, after the CLI wrote the run folder); one ConfigError each:
    a package `optim` needs that is not installed (bitsandbytes for adamw_bnb_8bit, ...); `optim_args` that is not
    `key=value,...`; an `optim_args` key the optimizer never reads (transformers passes optim_args to a few optimizers
    only, by the names each knows: adamw_torch and adafactor read none, sgd only its own, so the setting vanished).
    Skipped when the caller passes its own optimizer. Asked without the model (no side effects: GaLore's layerwise
    hooks are made only with one); what needs the model is left to the Trainer."""
    if (kwargs.get("optimizers") or (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
        return
    optim = str(getattr(args.optim, "value", args.optim))
    pairs = [m for m in str(args.optim_args or "").replace(" ", "").split(",") if m]
    bad = [m for m in pairs if m.count("=") != 1]
    if bad:
        raise ConfigError(f"train.optim_args={args.optim_args!r}: {bad[0]!r} is not key=value; write it as "
                          "'key=value,key2=value2'")
    try:
        built = _optimizer_kwargs(args, args.optim_args)
    except ImportError as e:
        missing = str(e).split("\n")[0]
    except ValueError as e:  # some optimizers say "Please install ..." as a ValueError; others need the model
        if "install" not in str(e).lower():
            return
        missing = str(e).split("\n")[0]
    else:
        unread = [key for key, _ in (m.split("=") for m in pairs) if _ignores(args, pairs, key, built)]
        if unread:
            raise ConfigError(f"train.optim_args: {', '.join(unread)} is not read by optim={optim!r} (transformers "
                              "passes optim_args only to some optimizers, by the names each knows), so it would be "
                              "ignored; remove it, or use the train key for it (adam_beta1, adam_beta2, adam_epsilon, "
                              "weight_decay)")
        return
    raise ConfigError(f"train.optim={optim!r}: the Trainer cannot build it: {missing.rstrip('.')}; install that "
                      "package, or choose another train.optim (the default adamw_torch needs nothing)")


def check_scheduler(args: TrainingArguments, kwargs: dict[str, Any]) -> None:
    """`lr_scheduler_type` + `lr_scheduler_kwargs` the Trainer would not apply as written, found before anything is
    written (it builds the schedule in `train()`, after the CLI wrote the run folder): kwargs the schedule does not take
    (TypeError), a schedule missing its kwargs (cosine_with_min_lr without min_lr), or kwargs given to `constant` /
    `constant_with_warmup`, which transformers builds without them (dropped without a word). One ConfigError each,
    from a trial schedule over a one-parameter optimizer. Skipped when the caller passes its own scheduler."""
    if (kwargs.get("optimizers") or (None, None))[1] is not None:
        return
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    given = args.lr_scheduler_kwargs or {}
    if given and name in ("constant", "constant_with_warmup"):
        raise ConfigError(f"train.lr_scheduler_kwargs={given}: lr_scheduler_type={name!r} takes no arguments "
                          "(transformers builds it without them), so they would be ignored; remove them, or choose "
                          "the schedule that reads them (e.g. cosine_with_min_lr for min_lr)")
    check_warmup(args, name, kwargs.get("train_dataset"))
    steps = args.max_steps if args.max_steps and args.max_steps > 0 else 100
    trial = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(name, trial, num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps,
                      scheduler_specific_kwargs=given)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.lr_scheduler_type={name!r} with train.lr_scheduler_kwargs={given}: transformers "
                          f"cannot build the schedule: {str(e).splitlines()[0].rstrip('.')}; give "
                          f"train.lr_scheduler_kwargs the arguments of its {name} schedule") from None


# schedules transformers' get_scheduler builds without num_warmup_steps: a warm-up given with them is dropped
NO_WARMUP_SCHEDULES = ("constant", "reduce_lr_on_plateau", "greedy")


def planned_steps(args: TrainingArguments, train_dataset: Any = None) -> int | None:
    """The optimizer steps the Trainer will run: `max_steps`, or for an epoch-based run (max_steps -1) its own
    formula (`Trainer.set_initial_training_values`) over one process's dataloader of `train_dataset`: with several
    processes, accelerate's share of the batches (`BatchSamplerShard`: ceil(batches / processes) under its default
    even_batches, floor with drop_last); None where that length is not known here (no dataset length, a parallelism
    config, or accelerator_config split_batches / dispatch_batches / even_batches=False)."""
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    acc = getattr(args, "accelerator_config", None)
    sharding = (getattr(acc, "split_batches", False), getattr(acc, "dispatch_batches", None),
                getattr(acc, "even_batches", True))
    if not hasattr(train_dataset, "__len__") or getattr(args, "parallelism_config", None) or (
            args.world_size > 1 and sharding != (False, None, True)):
        return None
    rows, batch = len(train_dataset), args.train_batch_size
    batches = rows // batch if args.dataloader_drop_last else math.ceil(rows / batch)
    if args.world_size > 1:  # each process's share, as BatchSamplerShard.__len__ counts it
        batches = batches // args.world_size if args.dataloader_drop_last else math.ceil(batches / args.world_size)
    accumulate = args.gradient_accumulation_steps
    per_epoch = max(batches // accumulate + int(batches % accumulate > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def check_warmup(args: TrainingArguments, name: str, train_dataset: Any = None) -> None:
    """`warmup_steps` the schedule would not apply as written: given to a schedule built without it (constant: the
    run trained at the full rate from its first step, without a word), or as long as the run or longer, in steps or
    as a fraction (the Trainer's ceil(steps * fraction)), of `max_steps` or of an epoch-based run's steps (the rate
    never reached `learning_rate`)."""
    warmup = args.warmup_steps or 0
    if warmup > 0 and name in NO_WARMUP_SCHEDULES:
        instead = "constant_with_warmup" if name == "constant" else "a schedule with warm-up (e.g. linear)"
        raise ConfigError(f"train.warmup_steps={warmup:g}: lr_scheduler_type={name!r} has no warm-up (transformers "
                          f"builds it without warmup_steps), so it would be ignored and the run would start at the "
                          f"full learning rate; use lr_scheduler_type={instead}, or remove train.warmup_steps")
    steps = planned_steps(args, train_dataset) if warmup > 0 else None
    given = args.get_warmup_steps(steps) if steps else 0
    if not steps or given < steps:
        return
    run = (f"train.max_steps={steps}" if args.max_steps and args.max_steps > 0
           else f"{steps} optimizer steps from train.num_train_epochs={args.num_train_epochs:g}")
    what = f"{int(warmup)}" if warmup >= 1 else f"{warmup:g} ({given} steps, the Trainer's ceil({steps} x {warmup:g}))"
    raise ConfigError(f"train.warmup_steps={what}: as long as the whole run ({run}), so the learning rate would "
                      f"never reach train.learning_rate (its last step uses {(steps - 1) / given:.0%} of it); give "
                      "fewer warm-up steps (or a smaller fraction, e.g. 0.1) or a longer run")


def _optimizer_kwargs(args: TrainingArguments, optim_args: str | None) -> Any:
    """The Trainer's optimizer (class, keyword arguments) for `args` with `optim_args` in place of its own."""
    probe = copy.copy(args)  # a plain copy: no __post_init__ again
    probe.optim_args = optim_args
    return Trainer.get_optimizer_cls_and_kwargs(probe)


def _ignores(args: TrainingArguments, pairs: list[str], key: str, built: Any) -> bool:
    """Whether the optimizer's kwargs stay `built` whatever `key` says in optim_args (two other values, one numeric,
    one boolean; a value it fails to parse means it is read)."""
    for value in ("2", "true"):
        changed = ",".join(f"{key}={value}" if m.split("=")[0] == key else m for m in pairs)
        try:
            if _optimizer_kwargs(args, changed) != built:
                return False
        except Exception:  # noqa: BLE001 -- it tried to read the value
            return False
    return True


def refuse_deepspeed_mismatches(trainer: Any) -> None:
    """A DeepSpeed config value (accelerate's `deepspeed_config`, or a DeepSpeed JSON) that disagrees with
    the training arguments (gradient_accumulation_steps, batch size, learning rate, clipping, ...): one line
    naming both at construction, instead of transformers' multi-line ValueError when training starts. Then the
    config's own `optimizer` / `scheduler` sections, which replace the Trainer's without any check
    (`deepspeed_replacements`): one line naming the config and what they replace; then its offload settings
    (`refuse_optimizer_offload`, `zero_checks.refuse_unapplied_offload`)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    ds = getattr(plugin, "hf_ds_config", None)  # where the Trainer's check at train() reads them
    found = [m.strip().removeprefix("- ").replace(" vs hf ", " vs train.")
             for m in getattr(ds, "mismatches", None) or []]
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    fix = ""
    if mixed != "no" and any(m.startswith(("ds bf16.enabled", "ds fp16.enabled")) for m in found):
        # accelerate writes {"enabled": true} for its mixed_precision into a config that names none: no value to set
        found = [f"{m} (accelerate's mixed_precision: {mixed} turned it on)"
                 if m.startswith(("ds bf16.enabled", "ds fp16.enabled")) else m for m in found]
        fix = (f"; for the precision: set train.{'fp16' if mixed == 'fp16' else 'bf16'}=true, or mixed_precision: "
               "'no' in the accelerate config (or --mixed_precision no)")
    if found:
        raise ConfigError(f"the DeepSpeed config disagrees with the training settings: {'; '.join(found)}; set "
                          f"those DeepSpeed values to 'auto' (the train.* keys then decide) or give the train.* "
                          f"keys the same values{fix}")
    replaced = deepspeed_replacements(getattr(ds, "config", None) or {}, trainer.args)
    if replaced:
        raise ConfigError(f"{deepspeed_config_source(trainer.args)}: {'; '.join(replaced)}; remove the section(s) "
                          "(under DeepSpeed too, train.optim, learning_rate, weight_decay, adam_*, lr_scheduler_type "
                          "and warmup_* then decide)")
    config = getattr(ds, "config", None) or getattr(plugin, "deepspeed_config", None) or {}
    refuse_optimizer_offload(config, trainer.args, torch.cuda.is_available())
    refuse_unapplied_offload(config, deepspeed_config_source(trainer.args))  # offload DeepSpeed ignores or cannot do


# what accelerate maps each Trainer optimizer to when the optimizer state is offloaded
# (`map_pytorch_optim_to_deepspeed`: torch's AdamW -> DeepSpeedCPUAdam in AdamW mode, Adagrad ->
# DeepSpeedCPUAdagrad, ANY other -> DeepSpeedCPUAdam, Adam)
OFFLOAD_KEEPS = ("adamw_torch", "adamw_torch_fused", "adagrad")


def refuse_optimizer_offload(config: dict[str, Any], args: Any, cuda: bool) -> None:
    """ConfigError, when the trainer is built, for a DeepSpeed config's `zero_optimization.offload_optimizer` (device
    cpu / nvme) that accelerate answers by swapping the Trainer's optimizer for DeepSpeed's CPU optimizer (unless
    `zero_force_ds_cpu_optimizer: false`): on CPU processes (`cuda` False) offloading to the CPU moves nothing (the
    state is in CPU memory already) and the swap compiles DeepSpeedCPUAdam with a C++ build when training starts
    (minutes, after the run folder is written; a build killed midway leaves a lock under ~/.cache/torch_extensions
    on which the next run waits for ever); on any device, a train.optim outside `OFFLOAD_KEEPS` (sgd, adafactor,
    8-bit AdamW, ...) would silently become Adam."""
    device = offload_device(config.get("zero_optimization") or {}, "offload_optimizer")  # null in a JSON: none
    if device in ("none", "auto") or config.get("zero_force_ds_cpu_optimizer", True) is False:
        return
    where = f"{deepspeed_config_source(args)}: zero_optimization.offload_optimizer.device is {device}"
    if not cuda and device == "cpu":
        raise ConfigError(f"{where} on CPU processes, where the optimizer state already is: accelerate would swap "
                          "the optimizer for DeepSpeedCPUAdam, compiled with a C++ build when training starts "
                          "(minutes, after the run folder is written); set it to none (accelerate config: "
                          "offload_optimizer_device: none, as configs/accelerate/zero3-cpu.yaml)")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in OFFLOAD_KEEPS:
        raise ConfigError(f"{where}, so accelerate would replace train.optim={optim} with DeepSpeedCPUAdam (Adam): "
                          f"use train.optim {' or '.join(OFFLOAD_KEEPS)}, set the offload device to none, or set "
                          "zero_force_ds_cpu_optimizer: false in the DeepSpeed config")


def deepspeed_config_source(args: Any) -> str:
    """Where a run's DeepSpeed config comes from, as an error names it."""
    if isinstance(getattr(args, "deepspeed", None), str):
        return f"train.deepspeed ({args.deepspeed})"
    if getattr(args, "deepspeed", None):
        return "train.deepspeed"
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        return f"the accelerate config's deepspeed_config_file ({path})"
    # an accelerate config's deepspeed_config keys (zero_stage, offload_*_device), which accelerate makes the config of
    return "the accelerate config's deepspeed_config" if requested_engine() == "deepspeed" else "the DeepSpeed config"


def deepspeed_replacements(config: dict[str, Any], args: Any) -> list[str]:
    """What a DeepSpeed config's own `optimizer` / `scheduler` section would silently put in place of the training
    arguments' (transformers then hands the engine a `DummyOptim` / `DummyScheduler` and never builds the Trainer's
    optimizer or schedule; it compares only lr, betas, eps, weight_decay and the warmup / total steps, not what kind
    of optimizer or schedule): one phrase per section, [] when there is none."""
    out = []
    section = config.get("optimizer")
    if isinstance(section, dict):
        optim = str(getattr(args.optim, "value", args.optim))
        out.append(f"its \"optimizer\" section (type {section.get('type', '?')}) would replace the trainer's "
                   f"optimizer: train.optim={optim} and alignkit's weight-decay groups (no decay on biases, norms and "
                   "ReFT rotations) would not apply")
    section = config.get("scheduler")
    if isinstance(section, dict):
        kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        out.append(f"its \"scheduler\" section (type {section.get('type', '?')}) would replace "
                   f"train.lr_scheduler_type={kind}")
    return out


def saved_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's `STATE_JSON` ({} when it has none: a checkpoint of an older alignkit)."""
    path = Path(checkpoint, STATE_JSON)
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = ["LOWER_IS_BETTER", "STATE_JSON", "check_best_metric_name", "check_best_model_metric", "check_optimizer",
           "check_resumable", "check_scheduler", "check_warmup", "planned_steps", "TRAINING_FIELDS", "settings_changes",
           "training_changes",
           "data_digest", "lower_is_better", "refuse_deepspeed_mismatches", "deepspeed_config_source",
           "deepspeed_replacements", "OFFLOAD_KEEPS", "refuse_optimizer_offload",
           "refuse_empty_batches", "refuse_ignored_arguments", "refuse_metric_functions", "refuse_trainer_fsdp_on_cpu",
           "refuse_unread_fields", "saved_state"]
