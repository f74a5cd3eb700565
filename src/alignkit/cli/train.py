"""`alignkit sft | rm | dpo | kto`: one training run from a config (model + adapter + data + method + train).

    config -> run folder (config.yaml) -> base model (+ adapter) -> records -> features -> Trainer
           -> train (metrics.jsonl, tensorboard/) -> model/ -> final evaluation -> plots/*.png, README.md

`train` goes straight to `transformers.TrainingArguments`; alignkit sets only `output_dir`
(<run>/checkpoints), `report_to` (TensorBoard into <run>/tensorboard when installed, unless the config
names its own reporters), `disable_tqdm` under `--quiet`, and, for several processes without a GPU
(`torchrun` / `accelerate launch` on CPUs), `use_cpu=True` with the gloo backend unless `train` says otherwise.
Distributed runs need nothing else: `accelerate launch -m alignkit dpo --config ...`; only the main process
writes the config, metrics, plots and model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback

from alignkit.adapters import adapter_of, reft_settings, unwrap_lm
from alignkit.cli.data import load_data, record_kind, tokenize, warn_unread_margins
from alignkit.cli.models import (adopt_tiny, apply_configured_adapter, check_formats, check_model_settings, load_base,
                                 rename_base)
from alignkit.cli.runfolder import (abandon_run, add_config_command, begin_run, command_line, finish_run,
                                   moved_reference, plan_run)
from alignkit.data import PreferenceCollator, RankedCollator, SFTCollator
from alignkit.interventions.positions import check_prompt_lengths, check_truncated_prompts
from alignkit.distributed import refuse_fsdp1_on_cpu, requested_engine
from alignkit.losses import PreferenceParams
from alignkit.models.efficiency import check_fullgraph, compile_layers
from alignkit.models.rope import check_context
from alignkit.run_commit import resumed_step, saved_step, staged
from alignkit.runs import (
    MetricsJsonl, ModelCard, RunFolder, figure, final_metrics, plot_metrics, push_folder, read_metrics, trackers,
    versions, write_prompt_formats,
)
from alignkit.settings import ConfigError
from alignkit.settings.bounds import check_precision
from alignkit.settings.train import ALIGNKIT_TRAIN_KEYS, HUB_KEYS
from alignkit.trainers import TRAINERS
from alignkit.trainers.checks import refuse_trainer_fsdp_on_cpu
from alignkit.trainers.precision import weight_dtypes

logger = logging.getLogger(__name__)

HELP = {"sft": "supervised finetuning", "rm": "train a reward model (pairwise Bradley-Terry or K-wise ranking)",
        "dpo": "offline preference optimisation (DPO family, IPO, SimPO, ORPO, ...)",
        "kto": "KTO on unpaired (desirable / undesirable) completions"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, text in HELP.items():
        add_config_command(sub, name, text, run, dry=dry_checks)


def dry_checks(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of a training command (after the output folder and data): the model section's
    folders, as `load_base` checks them before loading (train.bf16 / fp16 are not checked against this machine's
    hardware: a GPU config dry-runs on a CPU machine)."""
    return [check_model_settings(cfg.model)]


def run(cfg: Any, args: argparse.Namespace) -> int:
    return train(cfg, args.command, quiet=args.quiet, command_line=command_line(args),
                 resume=args.resume, overwrite=args.overwrite)


def trainer_class_and_kwargs(command: str, method: Any) -> tuple[type, dict[str, Any]]:
    kw = dataclasses.asdict(method)
    if command == "dpo":
        names = {f.name for f in dataclasses.fields(PreferenceParams)}
        kw["params"] = PreferenceParams(**{k: kw.pop(k) for k in list(kw) if k in names})
    if command == "rm":
        kw.pop("ranked")
    return TRAINERS[command], kw


def batching_kwargs(command: str, train: dict[str, Any]) -> dict[str, Any]:
    """`train.padding_free` / `train.group_by_length` / `train.share_prompt` as trainer arguments (padding-free: SFT,
    DPO and RM trainers, None leaving the trainer's default; shared prompt: RM and DPO trainers)."""
    out: dict[str, Any] = {}
    if train.get("padding_free") is not None and command in ("sft", "dpo", "rm"):  # the config refused True for kto
        out["padding_free"] = bool(train["padding_free"])  # None: the trainer's default (on where faster)
    if train.get("group_by_length"):
        out["group_by_length"] = True
    if train.get("share_prompt") is not None and command in ("rm", "dpo"):  # the config refused True elsewhere
        out["share_prompt"] = bool(train["share_prompt"])  # None: the trainer's default (on where faster)
    if train.get("reft_prefix_cache") is not None:
        # None: the trainer's default (on for several epochs)
        out["reft_prefix_cache"] = bool(train["reft_prefix_cache"])
    return out


def collator_for(kind: str, pad_id: int):
    return {"sft": SFTCollator, "unpaired": SFTCollator, "preference": PreferenceCollator,
            "ranked": RankedCollator}[kind](pad_id)


def log_last_step() -> Any:
    """A callback that logs the last optimizer step too, so a run shorter than `logging_steps` still writes
    its training metrics (and plots)."""
    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep()


def training_arguments(train: dict[str, Any], run: RunFolder, quiet: bool) -> tuple[Any, list]:
    """TrainingArguments from the `train` section, and the callbacks alignkit adds (metrics; TensorBoard when
    `args.alignkit_tensorboard`, added by `tensorboard_callback` once the run folder exists)."""
    kw = dict(train)
    kw.pop("resume_from_checkpoint", None)  # passed to trainer.train (plan_run checks it), not a setting
    # alignkit's own keys (compile_model, batching_kwargs), not TrainingArguments fields
    for key in ALIGNKIT_TRAIN_KEYS:
        kw.pop(key, None)
    kw["output_dir"] = str(run.checkpoints)
    refuse_trainer_fsdp_on_cpu(kw.get("fsdp"))  # every rank on its own, before any collective

    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            and requested_engine() == "deepspeed"):
        # DeepSpeed on CPU processes (accelerate launch with a DEEPSPEED config): use_cpu would make accelerate
        # skip DeepSpeed; gloo is what DeepSpeed's CPU accelerator talks over (alignkit.distributed)
        kw.setdefault("ddp_backend", "gloo")
        logger.info("%s CPU processes: DeepSpeed over %s", os.environ["WORLD_SIZE"], kw["ddp_backend"])
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "use_cpu" not in kw:
        # several CPU processes (torchrun / accelerate launch): without use_cpu each would train alone
        kw.update(use_cpu=True, ddp_backend=kw.get("ddp_backend") or "gloo")
        logger.info("%s CPU processes: DDP with use_cpu=True, "
                    "ddp_backend=%s", os.environ["WORLD_SIZE"], kw["ddp_backend"])
    if not torch.cuda.is_available() and "dataloader_pin_memory" not in kw:
        kw["dataloader_pin_memory"] = False  # nothing to pin to on a CPU-only machine (and torch warns)
    report = trackers(kw.get("report_to"), expand_all=True)
    callbacks: list = [MetricsJsonl(run.metrics), log_last_step()]
    tensorboard = "tensorboard" in report  # our own writer, so the events land in <run>/tensorboard
    if tensorboard:
        report.remove("tensorboard")
    kw["report_to"] = report or "none"
    if quiet:
        kw["disable_tqdm"] = True
    push = {k: kw.pop(k) for k in ("push_to_hub", *HUB_KEYS) if k in kw}  # checked by check_train (settings/train.py)
    try:
        args = TrainingArguments(**kw)  # without push_to_hub: the Trainer would push checkpoints/, not model/
    except ValueError as e:  # transformers' own checks of combinations (e.g. load_best_model_at_end's strategies)
        raise ConfigError(f"train: transformers refuses these training arguments: {' '.join(str(e).split())}; "
                          "fix the train section") from None
    args.alignkit_tensorboard = tensorboard
    args.alignkit_push = push if push.get("push_to_hub") else None
    return args, callbacks


def push_model(push: dict[str, Any], model_dir: Any, run_root: Any, api: Any = None) -> str:
    """Upload the final model / adapter folder (with its model card) to the Hub repo `hub_model_id` (default: the
    run folder's name), creating the repo, on the branch `hub_revision` (default: main); checkpoints are not pushed.
    Returns the repo id."""
    return push_folder(model_dir, push.get("hub_model_id") or Path(run_root).name,
                       private=bool(push.get("hub_private_repo")), token=push.get("hub_token"),
                       revision=push.get("hub_revision"), api=api)


def tensorboard_callback(args: Any, run: RunFolder, resumed_at: int | None = None) -> Any:
    """Our TensorBoard writer into <run>/tensorboard (it creates the folder, so only once the run has begun).
    `resumed_at`: the step of the checkpoint a resumed run continues from; the killed run's events after it are
    purged (`purge_step`), else TensorBoard showed both runs' values for those steps."""
    if not getattr(args, "alignkit_tensorboard", False) or not run.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    purge = None if resumed_at is None else resumed_at + 1  # the checkpoint's own step was logged before it was saved
    cb = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.tensorboard), purge_step=purge))
    cb.logging_dir = str(run.tensorboard)  # a writer re-opened after training (final evaluate) stays in the run
    return cb


def compile_model(model: Any, option: bool | dict[str, Any] | None) -> None:
    """`train.compile`: true, or a mapping of torch.compile options (`{}`: its defaults, as true; it used to be read
    as false, so nothing was compiled without a word) -> each decoder layer compiled in place."""
    if option is None or option is False:
        return

    compile_layers(model, **(option if isinstance(option, dict) else {}))


OBJECTIVES = {"sft": "SFT", "rm": "reward modeling", "dpo": "preference optimisation", "kto": "KTO-style unpaired "
              "preference optimisation"}


def objective_name(command: str, method: Any) -> str:
    if command == "rm":
        return "reward modeling (" + ("K-wise ranking" if method.ranked else "Bradley-Terry pairs") + ")"
    loss = getattr(method, "loss_type", None)
    loss = "+".join(loss) if isinstance(loss, list) else loss
    return f"{OBJECTIVES[command]} (loss {loss})"


HYPER = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
         "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "bf16", "seed")


def train(cfg: Any, command: str, *, quiet: bool = False, command_line: str = "", resume: bool = False,
          overwrite: bool = False) -> int:
    """Run one training command end to end (see the module docstring). Returns an exit code.

    Everything that can be checked (output folder, data, model, adapter, tokenization, training arguments, the
    Trainer) is checked before the run folder is written; `model/` and checkpoints are written atomically."""
    plan = plan_run(cfg, resume=resume, overwrite=overwrite, checkpoint=cfg.train.get("resume_from_checkpoint"))
    try:
        return _train(cfg, command, plan, quiet=quiet, command_line=command_line)
    except BaseException:
        abandon_run(plan)
        raise


@dataclasses.dataclass
class _Inputs:
    """What a run trains on, built and checked before anything is written (`_inputs`)."""

    kind: str  # record kind
    task: str  # "classifier" (rm) or "causal_lm"
    train_records: list
    eval_records: list
    formats: Any  # the prompt formats (check_formats), recorded in model/
    model: Any
    tok: Any
    base_path: str
    base_desc: Any
    train_feats: list
    train_stats: Any
    eval_feats: list
    eval_stats: Any


def _inputs(cfg: Any, command: str) -> _Inputs:
    """Data, base model + adapter and features, each checked: data errors come before any model is built."""
    check_precision(cfg.train)
    refuse_fsdp1_on_cpu()  # each process alone, before any waits on the others (the trainer checks it again)
    kind = record_kind(command, cfg.method)
    train_records, eval_records = load_data(cfg.data, kind)
    warn_unread_margins(train_records + eval_records, command)
    # training on from a trained model: warned when its format changes; the formats are recorded in model/
    formats = check_formats(cfg.model, (r.prompt for r in train_records), cfg.data.formatter)
    set_seed(int(cfg.train.get("seed", 42)))  # the adapter's initialisation follows the run's seed
    task = "classifier" if command == "rm" else "causal_lm"
    model, tok, base_path, base_desc = load_base(cfg.model, None, task)
    model = apply_configured_adapter(model, cfg.adapter)
    compile_model(model, cfg.train.get("compile"))
    train_feats, train_stats = tokenize(train_records, tok, cfg.data, "data.path")
    eval_feats, eval_stats = tokenize(eval_records, tok, cfg.data, "evaluation data") if eval_records else ([], None)
    longest = max((len(v) for f in (*train_feats, *eval_feats) for k, v in f.items()
                   if k.endswith("input_ids") and hasattr(v, "__len__")), default=0)
    check_context(unwrap_lm(model).config, longest, f"the longest tokenized row (data.max_length="
                  f"{cfg.data.max_length})", "set data.max_length to the model's context")
    check_reft_prompts(model, cfg.data, ((train_feats, train_stats, "data.path"),
                                         (eval_feats, eval_stats, "evaluation data")))
    return _Inputs(kind, task, train_records, eval_records, formats, model, tok, base_path, base_desc, train_feats,
                   train_stats, eval_feats, eval_stats)


def check_reft_prompts(model: Any, data: Any, sets: Any) -> None:
    """For a ReFT model, before anything is written: an empty prompt stops, short ones are said once, and prompts cut
    at their start ("first" positions land mid-prompt) are said. `sets`: (features, stats, where) of each data set."""
    reft = reft_settings(model)
    if reft is None:
        return
    for feats, stats, where in sets:
        check_prompt_lengths(reft.positions, reft.share_weights, [f["prompt_length"] for f in feats],
                             [f.get("id", i) for i, f in enumerate(feats)], where)
        if stats is not None:
            check_truncated_prompts(reft.positions, stats.prompt_truncated, len(feats), stats.prompt_truncated_ids,
                                    data.max_prompt_length, where)


def _trainer(cfg: Any, command: str, plan: Any, inp: _Inputs, quiet: bool) -> tuple[Any, Any, RunFolder]:
    """(trainer, its TrainingArguments, the run folder's paths): nothing is created before begin_run."""
    run = RunFolder(plan.root, main=False)
    args, callbacks = training_arguments(cfg.train, run, quiet)
    cls, kwargs = trainer_class_and_kwargs(command, cfg.method)
    kwargs.update(batching_kwargs(command, cfg.train))
    trainer = cls(inp.model, args, train_dataset=inp.train_feats, eval_dataset=inp.eval_feats or None,
                  data_collator=collator_for(inp.kind, inp.tok.pad_token_id), processing_class=inp.tok,
                  callbacks=callbacks, **kwargs)
    if plan.checkpoint is not None:  # the one check of the checkpoint (train() does not repeat it): before writing
        trainer.check_resume(plan.checkpoint, plan.label)
    check_fullgraph(cfg.train.get("compile"), bool(getattr(trainer, "padding_free", False)))
    # with tqdm off (-q, or train.disable_tqdm), transformers' PrinterCallback printed every log dict to stdout; the
    # metrics go to metrics.jsonl / TensorBoard, and stdout keeps only alignkit's own lines
    trainer.remove_callback(PrinterCallback)
    return trainer, args, run


def _train(cfg: Any, command: str, plan: Any, *, quiet: bool, command_line: str) -> int:
    inp = _inputs(cfg, command)
    trainer, args, run = _trainer(cfg, command, plan, inp, quiet)
    done = nothing_to_do(trainer, plan, run)
    if done is not None:
        if trainer.is_world_process_zero():  # one line per run, as the closing "done" line (torchrun: N processes)
            print(f"alignkit {command}: {done}")
        return 0
    run = begin_run(plan, cfg)  # -------------------------------- from here on the run folder is written
    base_path = _fit(plan, inp, trainer, args, run)
    named = plan.named()
    card, best, rows = _save_model(cfg, command, inp, trainer, args, run, named, base_path, command_line)
    if trainer.is_world_process_zero():
        plot_metrics(rows, run.plots)  # none, with a warning, without matplotlib
    finish_run(plan)
    if trainer.is_world_process_zero() and args.alignkit_push:
        push_model(args.alignkit_push, named.model, named.root)
    if trainer.is_world_process_zero():
        sets = list(trainer.eval_dataset) if isinstance(trainer.eval_dataset, dict) else None
        shown = ", ".join(f"{k} {figure(v)}" for k, v in summary_figures(card.metrics, sets))
        kept = "" if best is None else (f"\n  model/ is the best checkpoint, step {best} of "
                                        f"{trainer.state.global_step} (train.load_best_model_at_end); the evaluation "
                                        "figures are that step's")
        print(f"alignkit {command}: done. {shown}{kept}\n  run folder: {named.root} (model/, README.md, metrics.jsonl, "
              "plots/)")
    return 0


def _fit(plan: Any, inp: _Inputs, trainer: Any, args: Any, run: RunFolder) -> str:
    """Train (from the checkpoint on a resume) and evaluate at the end when no evaluation ran; the base model's path
    as the run folder names it (a tiny model is adopted into <run>/base_model)."""
    loaded_from, base_path = inp.base_path, adopt_tiny(inp.base_path, run.root / "base_model", main=run.main)
    if base_path != loaded_from:  # a tiny model, now in <run>/base_model: name it where it will stay
        base_path = str(plan.named().root / "base_model")
        rename_base(inp.model, loaded_from, base_path)
    tb = tensorboard_callback(args, run, None if plan.checkpoint is None else resumed_step(plan.checkpoint))
    if tb is not None:
        trainer.add_callback(tb)
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint is not None else None)
    if inp.eval_feats and args.eval_strategy == "no" and not evaluated_at(read_metrics(run.metrics),
                                                                          trainer.state.global_step):
        trainer.evaluate()  # (a resume killed after it, with every step done, has its row already)
    return base_path


def _save_model(cfg: Any, command: str, inp: _Inputs, trainer: Any, args: Any, run: RunFolder, named: RunFolder,
                base_path: str, command_line: str) -> tuple[Any, int | None, list]:
    """model/ (staged), its prompt formats and model card (main process): (card, best step, metrics rows); (None,
    None, []) on the other processes. `named`: the run folder as the card names it (plan.named())."""
    card, best, rows = None, None, []
    with staged(run.model, enabled=trainer.is_world_process_zero(), step=trainer.state.global_step) as model_dir:
        trainer.save_model(str(model_dir))
        if trainer.is_world_process_zero():
            write_prompt_formats(model_dir, inp.formats, cfg.data.formatter)
            rows = read_metrics(run.metrics)
            best = best_step(args, trainer.state)
            how_to_load = adapter_of(inp.model).how_to_load(str(named.model), base_path,
                                                             inp.task == "classifier", cfg.model.rope_scaling)
            card = ModelCard(title=f"{command}: {objective_name(command, cfg.method)} of {cfg.model.path}",
                             base_model=inp.base_desc, adapter=adapter_of(inp.model).describe(inp.model),
                             objective={"objective": objective_name(command, cfg.method), "command": command,
                                        **{k: v for k, v in dataclasses.asdict(cfg.method).items() if v is not None}},
                             data=data_info(cfg.data, inp), hyperparameters=hyperparameters(args, trainer, best),
                             metrics=final_metrics(rows, best), command_line=command_line or f"alignkit {command}",
                             versions=versions(), base_model_id=cfg.model.path, how_to_load=how_to_load)
            card.write(run.card, model_dir / "README.md")
    return card, best, rows


def data_info(data: Any, inp: _Inputs) -> dict[str, Any]:
    """The model card's data section."""
    info = {"path": data.path, "reader": data.reader or "detected", "formatter": data.formatter,
            **({"loss_on": data.loss_on} if inp.kind == "sft" else {}), "record kind": inp.kind,
            "training records": len(inp.train_records), "training examples (tokenized)": len(inp.train_feats),
            "evaluation records": len(inp.eval_records), "max_length": data.max_length,
            "max_prompt_length": data.max_prompt_length, "tokenization": inp.train_stats.summary()}
    if data.eval_path is not None:
        info["eval_path"] = data.eval_path
    return info


def hyperparameters(args: Any, trainer: Any, best: int | None) -> dict[str, Any]:
    """The model card's hyperparameters: the arguments of HYPER and what really ran."""
    hyper = {k: getattr(args, k) for k in HYPER}
    state = trainer.accelerator.state  # what really ran: an accelerate config's engine and mixed precision
    #   (ACCELERATE_MIXED_PRECISION) apply even when train.bf16 / train.fp16 are False
    hyper.update({"world size": args.world_size, "engine": str(state.distributed_type).split(".")[-1],
                  "mixed precision": str(state.mixed_precision), **weight_dtypes(trainer.model),
                  "optimizer steps done": trainer.state.global_step})
    if getattr(trainer, "ref_sync", None) is not None:  # TR-DPO: the reference is no longer model.path
        hyper["reference syncs"] = moved_reference(trainer.ref_syncs)
    if best is not None:  # model/ is that checkpoint: the card's evaluation figures are its own
        hyper["model/ holds"] = (f"the best checkpoint: step {best} ({args.metric_for_best_model} "
                                 f"{trainer.state.best_metric:.6g}), not the last step's weights")
    return hyper


def nothing_to_do(trainer: Any, plan: Any, run: RunFolder) -> str | None:
    """Why a resume has nothing to do (None: it has): every optimizer step of the run is done at the checkpoint and
    model/ was saved at that step. Such a --resume rewrote config.yaml, model/, README.md and plots/ and logged a
    second training summary at the last step (two in metrics.jsonl and on the plots); now the folder is left as it
    was. A run killed after its last checkpoint but before model/ was saved still saves it (and logs nothing)."""
    if plan.mode != "resume" or plan.checkpoint is None:
        return None
    step, planned = resumed_step(plan.checkpoint), trainer.planned_steps()
    if step is None or step < planned or saved_step(run.model) != step:
        return None
    return (f"nothing to do: all {planned} optimizer steps are done ({Path(plan.checkpoint).name}) and model/ holds "
            f"step {step}; {plan.final} is left as it was (raise train.max_steps or train.num_train_epochs to train "
            "on)")


def evaluated_at(rows: list[dict[str, Any]], step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation row (`eval_runtime`, or `eval_<set>_runtime`) at `step`."""
    return any(r.get("step") == step and any(k.startswith("eval_") and k.endswith("_runtime") for k in r) for r in rows)


def best_step(args: Any, state: Any) -> int | None:
    """The step of the best checkpoint the Trainer loaded at the end (train.load_best_model_at_end), which model/
    then holds; None when it loaded none or the best is the last step."""
    if not args.load_best_model_at_end or state.best_model_checkpoint is None or state.best_global_step is None:
        return None
    return None if state.best_global_step == state.global_step else int(state.best_global_step)


SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "accuracy")  # what the last line shows


def summary_figures(metrics: dict[str, float], eval_sets: list[str] | None = None) -> list[tuple[str, float]]:
    """The figures of a run's last line: each of SUMMARY_METRICS as last logged in training, then as evaluated:
    `eval_<name>`, or with several evaluation sets (an eval_dataset dict: `eval_sets`, its names) `eval_<set>_<name>`
    for each set, in the sets' order (the Trainer's metric_key_prefix). Names not logged are left out."""
    prefixes = [f"eval_{name}_" for name in eval_sets] if eval_sets else ["eval_"]
    keys = [key for name in SUMMARY_METRICS for key in (name, *(p + name for p in prefixes))]
    return [(k, metrics[k]) for k in keys if k in metrics]


__all__ = ["SUMMARY_METRICS", "add_parser", "best_step", "evaluated_at", "nothing_to_do", "run", "summary_figures",
           "train"]
