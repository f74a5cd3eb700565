"""`Checkpointing`: how `AlignTrainer` saves, commits checkpoints and resumes (a mixin of it, before `Trainer`).

Saving (`_save`, every `save_model` and checkpoint): only the trainable state (`alignkit.adapters.save_adapter`),
the tokenizer and `training_args.json`; trainable weights that are not finite are refused. Checkpoints are written
into `<output_dir>/.staging/checkpoint-N` and renamed into place with `alignkit_complete.json`
(`alignkit.run_commit`) and `alignkit_state.json` (num_tokens, processes, the training data's digest), then rotated.
FSDP2 checkpoints hold the full optimizer state by parameter names; DeepSpeed ones no optimizer state.

Resuming (`resume_point`, called by `AlignTrainer.train`): `True` is the newest complete checkpoint, a path must be
a complete one, and `check_resume` refuses one this trainer would not truly resume; loading goes through the
adapter's own files (`load_adapter_weights`) or the whole model's safetensors. A run that is not resumed into an
`output_dir` holding checkpoints says once that it replaces them (the Trainer writes over them silently).

A mixin, not a trainer: `alignkit.compat.check_trainer` checks these overrides with the trainer's own.

`removes_new_output_dir` (every `AlignTrainer` subclass's `__init__`, applied by `AlignTrainer.__init_subclass__`):
`Trainer.__init__` creates `output_dir` (compat T43), so a refusal raised after it left an empty folder behind; the
folder (and the parents that call made) is removed again when it is still empty, never a folder that was there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import rotate_checkpoints

from alignkit.adapters import (
    adapter_of, check_adapter_weights, load_adapter_weights, save_adapter, saves_whole_model,
)
from alignkit.distributed import (
    full_optimizer_state, full_parameters, is_deepspeed, is_fsdp2, load_full_optimizer_state,
)
from alignkit.guards import NonFiniteError
from alignkit.naming import stable_name
from alignkit.run_commit import (
    STAGING_MARK, CheckpointError, checkpoint_step, commit_staging, incomplete_reason, latest_complete_checkpoint,
    recover_swap, remove_own,
)
from alignkit.trainers.checks import STATE_JSON, check_resumable, data_digest, saved_state

logger = logging.getLogger(__name__)


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first ([] when `path` exists). `..` is resolved
    first (`os.path.abspath`): `a/../b` with `a` missing is the folder `b`, never `a/../b`, which names `b` once `a`
    exists (a user's existing empty `b` was removed)."""
    out, folder = [], Path(os.path.abspath(path))
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while each is an empty folder; stops at the first that is not."""
    for folder in folders:
        try:
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()
        except OSError:
            return


def saves(args: TrainingArguments) -> bool:
    """`args.should_save`, read only once the folder exists (reading it sets up the devices, which the trainer's
    own checks must precede); False when that fails."""
    try:
        return bool(args.should_save)
    except Exception:  # noqa: BLE001 - a refusal is on its way out: never replace it with another error
        return False


def removes_new_output_dir(init: Any) -> Any:
    """Wraps a trainer's `__init__`: when it raises, the TrainingArguments' `output_dir` that did not exist before the
    call (`Trainer.__init__` makes it on the processes that save: compat T43) is removed with the parents made with it,
    where still empty; an existing folder (a user's, or a previous run's) is never touched. Nested calls (a subclass's
    `__init__` calling its base's) each see the folder missing at entry, so removing is idempotent."""
    if getattr(init, "removes_new_output_dir", False):
        return init

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        targs = next((a for a in (*args, *kwargs.values()) if isinstance(a, TrainingArguments)), None)
        new = missing_folders(targs.output_dir) if targs is not None and targs.output_dir else []
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if new and new[0].is_dir() and saves(targs):  # a process that does not save leaves the main one's be
                remove_empty_folders(new)
            raise

    wrapper.removes_new_output_dir = True  # type: ignore[attr-defined]
    return wrapper

TRAINING_ARGS_JSON = "training_args.json"


class ResumedStepSettings(TrainerCallback):
    """A resume replaces the Trainer's state with the checkpoint's `trainer_state.json`, whose `logging_steps`,
    `eval_steps` and `save_steps` (what `DefaultFlowCallback` reads at each step) are the first run's, with a warning
    transformers' own logger gives: a resume with another train.logging_steps / eval_steps / save_steps (changes
    `alignkit <command> --resume` accepts and logs as made) logged, evaluated and saved at the old intervals while
    config.yaml showed the new ones (compat A32). At the start of training the state takes this run's again."""

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        state.compute_steps(args, state.max_steps)


class Checkpointing:
    """`AlignTrainer`'s saving, checkpoint and resume overrides; see the module docstring."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 and DeepSpeed every process gathers the shards (`alignkit.distributed.full_parameters`;
        ZeRO-3 partitions too) and the main one writes the usual folder (safetensors + JSON, adapters as
        adapters), not DeepSpeed's own checkpoint format; otherwise the Trainer's."""
        if not (is_fsdp2(self.accelerator) or is_deepspeed(self.accelerator)):
            return super().save_model(output_dir, _internal_call)
        with full_parameters(self.model):
            self._save(output_dir if output_dir is not None else self.args.output_dir)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(p.detach().isfinite().all())]
        if bad:
            raise NonFiniteError(f"trainable weight {bad[0]!r}" + (f" (and {len(bad) - 1} "
                                                                   "more)" if len(bad) > 1 else ""),
                                 float("nan"), self.state.global_step,
                                 causes="an earlier update diverged; nothing was saved to " + str(output_dir))
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(model, output_dir, tokenizer=self.processing_class, state_dict=state_dict)
        Path(output_dir, TRAINING_ARGS_JSON).write_text(self.args.to_json_string())
        logger.info("saved trainable state to %s", output_dir)

    def _get_output_dir(self, trial: Any) -> str:
        staging = getattr(self, "_staging_run_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written into `<output_dir>/.staging/checkpoint-N` and renamed into place with
        `alignkit_complete.json` (file names and sizes) once every process has written its part: a kill leaves
        either the previous checkpoints alone or a complete new one, never a half-written `checkpoint-N`."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = Path(run_dir) / ".staging"
        if self.args.should_save:
            recover_swap(Path(run_dir) / name, staging_root / name)  # a replacement killed half-way
            remove_own(staging_root / name)  # a leftover of an interrupted save
            (staging_root / name).mkdir(parents=True)
            (staging_root / name / STAGING_MARK).touch()
        self._flush_tokens()  # every process: the checkpoint's num_tokens includes steps not logged yet
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are in
        if self.args.should_save:
            self.save_checkpoint_extras(staging_root / name)
            self._commit_checkpoint(run_dir, staging_root, name)
        self.accelerator.wait_for_everyone()  # EVERY process (an early return here hung the next step's collective)

    def save_checkpoint_extras(self, folder: Path) -> None:
        """Files a trainer adds to the staged checkpoint `folder` (main process), committed with the rest of it
        (`alignkit.trainers.ref_sync`: the synced reference). None here."""

    def data_digest(self) -> str | None:
        """`data_digest` of this trainer's training examples (computed once)."""
        if "_data_digest" not in self.__dict__:
            self._data_digest = data_digest(self.train_dataset)
        return self._data_digest

    def training_settings(self) -> dict[str, Any]:
        """The objective's settings a resumed run must keep (recorded in each checkpoint's `STATE_JSON`, compared by
        `check_resume`): the trainer's keyword arguments that change the loss, and the adapter's settings as
        `adapter.<key>` (kind, lora.*, reft.*: a LoRA alpha or dropout, or ReFT positions, changed at a resume from a
        checkpoint outside its run folder, where no config.yaml is compared, went on silently or stopped with an
        unexpected error). Subclasses add theirs to these."""
        adapter = {f"adapter.{k}": v for k, v in adapter_of(self.model).describe().items()}
        return {"weight_normalization": self.weight_normalization, **adapter}

    def check_resume(self, checkpoint: str | os.PathLike, label: str = "resume_from_checkpoint") -> None:
        """Refuse (CheckpointError naming `label`) a checkpoint this trainer would not truly resume: any under DeepSpeed
        (it restores its engine from its own pickled files, which alignkit does not write or load), else
        `check_resumable` with this trainer's processes and training examples. Once per checkpoint: `train()` does
        not check again the one a caller (the CLI, before its run folder is written) has checked."""
        if is_deepspeed(self.accelerator):
            raise CheckpointError(f"{label}: resuming under DeepSpeed is not supported by alignkit (DeepSpeed reloads "
                                  "its optimizer state from torch pickles, which alignkit does not load); "
                                  f"{checkpoint}/ holds an ordinary model folder: start a new run from it, or resume "
                                  "under FSDP2 / DDP")
        check_resumable(checkpoint, self.args.world_size, label, self.data_digest(), self.args.to_json_string(),
                        self.training_settings())
        if not saves_whole_model(self.model):  # the Trainer's load refused a checkpoint of another base, too late
            try:
                check_adapter_weights(self.model, checkpoint)
            except (ValueError, FileNotFoundError) as e:
                raise CheckpointError(f"{label}: {e}") from None
        self._resume_checked = Path(checkpoint).resolve()

    def _commit_checkpoint(self, run_dir: str, staging_root: Path, name: str) -> None:
        final = Path(run_dir) / name
        Path(staging_root, name, STATE_JSON).write_text(json.dumps({"num_tokens": getattr(self, "_num_tokens", None),
                                                                    "world_size": self.args.world_size,
                                                                    "data_sha256": self.data_digest(),
                                                                    "training_settings": self.training_settings(),
                                                                    "loss_sum": self.loss_sum_so_far(),
                                                                    "loss_step": self.state.global_step},
                                                                   default=stable_name))
        commit_staging(staging_root / name, final, step=self.state.global_step)
        try:
            staging_root.rmdir()  # only when empty
        except OSError:
            pass
        best = self.state.best_global_step
        if best and (Path(run_dir) / f"checkpoint-{best}").is_dir():
            self.state.best_model_checkpoint = str(Path(run_dir) / f"checkpoint-{best}")
        elif self.state.best_model_checkpoint and str(staging_root) in str(self.state.best_model_checkpoint):
            self.state.best_model_checkpoint = str(final)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def loss_sum_so_far(self) -> float | None:
        """The summed training loss of every optimizer step so far: this call's (the Trainer's `_total_loss_scalar`,
        the logged steps', plus `_tr_loss`, those not logged yet: compat A33) and the resumed checkpoint's."""
        total, pending = getattr(self, "_total_loss_scalar", None), getattr(self, "_tr_loss", None)
        if not isinstance(total, float) or not isinstance(pending, Tensor):
            return None
        earlier = getattr(self, "_resumed_loss", None)
        return total + float(pending.item()) + (earlier[0] if earlier else 0.0)

    def run_train_loss(self, logs: dict[str, Any]) -> None:
        """The Trainer's summary `train_loss` is the mean over the steps of this `train()` call: after a resume, of
        the resumed steps only (a run killed after 2 of 4 steps and resumed reported the mean of steps 3-4 in
        metrics.jsonl's last row, TensorBoard and `TrainOutput.training_loss`). With the checkpoint's `loss_sum` it
        is the run's mean over every step; a checkpoint without it (older alignkit) leaves the Trainer's."""
        earlier = getattr(self, "_resumed_loss", None)
        new = self.state.global_step - earlier[1] if earlier else 0
        if "train_loss" in logs and earlier and new > 0:
            logs["train_loss"] = (earlier[0] + float(logs["train_loss"]) * new) / self.state.global_step

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """FSDP2: the full optimizer state by parameter names (`distributed.full_optimizer_state`) in
        `optimizer.pt` and the scheduler in `scheduler.pt`, beside the gathered safetensors `save_model`
        wrote; not accelerate's FSDP files (a pickled second copy of the model, `pytorch_model_fsdp.bin`).
        DeepSpeed: nothing (its `global_stepN/` files are pickles alignkit does not resume from; a DeepSpeed
        checkpoint is the model folder and the trainer state, logged once). Otherwise the Trainer's."""
        if is_deepspeed(self.accelerator):
            if not getattr(self, "_warned_ds_checkpoint", False):
                self._warned_ds_checkpoint = True
                logger.warning("DeepSpeed: checkpoints hold the model (safetensors) and trainer state, not the "
                               "optimizer state (DeepSpeed writes it as pickles alignkit does not load): a "
                               "checkpoint starts a new run, it is not resumed (resume under FSDP2 or DDP)")
            return
        if not is_fsdp2(self.accelerator):
            return super()._save_optimizer_and_scheduler(output_dir)
        state = full_optimizer_state(self.model, self.optimizer)  # every process: a collective
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_fsdp2(self.accelerator):
            return super()._load_optimizer_and_scheduler(checkpoint)
        # map_location "cpu": state saved on CPU processes is tagged "cpu:0", which torch.load cannot map back
        state = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        load_full_optimizer_state(self.model, self.optimizer, state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def resume_point(self, resume_from_checkpoint: str | bool | None) -> str | bool | None:
        """What `train(resume_from_checkpoint)` resumes from: `True` is the newest COMPLETE checkpoint of
        `output_dir` (incomplete ones are skipped with a warning), and a path must be a complete checkpoint that
        `check_resume` accepts; the cumulative `num_tokens` and the summed loss (`run_train_loss`) continue from it."""
        self._resumed_loss = None
        if resume_from_checkpoint is True:
            found = latest_complete_checkpoint(self.args.output_dir)
            if found is None:
                raise CheckpointError(f"resume: no complete checkpoint in {self.args.output_dir} (save some with "
                                      "save_strategy='steps' and save_steps=N)")
            resume_from_checkpoint = str(found)
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            reason = incomplete_reason(resume_from_checkpoint)
            if reason is not None:
                raise CheckpointError(f"resume_from_checkpoint: cannot resume from {resume_from_checkpoint}: {reason}; "
                                      "pick a complete checkpoint-N folder (or --resume for the newest complete one)")
        elif not resume_from_checkpoint and self.args.should_save and Path(self.args.output_dir).is_dir() \
                and getattr(self.args.save_strategy, "value", self.args.save_strategy) != "no":
            earlier = sorted((p for p in Path(self.args.output_dir).iterdir()
                              if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
            if earlier:  # the Trainer writes over them without a word (a checkpoint-N at a step this run saves too)
                logger.warning("%s holds %s of an earlier run, and this run is not resumed: it trains from step 0 and "
                               "replaces the checkpoint of each step it saves (and save_total_limit rotates the others "
                               "away); pass resume_from_checkpoint=True to continue that run, or use another "
                               "output_dir", self.args.output_dir, ", ".join(p.name for p in earlier))
        if resume_from_checkpoint:
            if getattr(self, "_resume_checked", None) != Path(resume_from_checkpoint).resolve():
                self.check_resume(resume_from_checkpoint)
            logger.info("resuming from %s", resume_from_checkpoint)
            if not any(isinstance(c, ResumedStepSettings) for c in self.callback_handler.callbacks):
                self.add_callback(ResumedStepSettings())
            self._num_tokens = _saved_num_tokens(resume_from_checkpoint)
            state = saved_state(resume_from_checkpoint)
            if isinstance(state.get("loss_sum"), float) and isinstance(state.get("loss_step"), int):
                self._resumed_loss = (state["loss_sum"], state["loss_step"])
            self._tokens_pending = None
        return resume_from_checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if is_fsdp2(self.accelerator):  # the checkpoint's plain files into full tensors, then into the shards
            with full_parameters(model, write_back=True):
                if saves_whole_model(model):
                    _load_whole_model(model, resume_from_checkpoint)
                else:
                    load_adapter_weights(model, resume_from_checkpoint)
            logger.info("loaded %s into the FSDP2 shards", resume_from_checkpoint)
            return
        if saves_whole_model(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading adapter weights from %s", resume_from_checkpoint)
        load_adapter_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if saves_whole_model(model):
            return super()._load_best_model()
        load_adapter_weights(model, self.state.best_model_checkpoint)


def _load_whole_model(model: nn.Module, folder: str | os.PathLike) -> None:
    """A whole model's safetensors (one file or shards) into `model`, in place; every saved tensor must
    name a parameter or buffer, and every one not saved must be tied to a saved one (save_pretrained drops
    the tied copies)."""
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"resume: {folder} has no model*.safetensors (not a full-model checkpoint)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise CheckpointError(f"resume: {folder} was written for another model (e.g. "
                              f"{(unexpected or untied)[:3]}); resume with the config that wrote it")


def _saved_num_tokens(checkpoint: str | os.PathLike) -> float | None:
    """The cumulative `num_tokens` a checkpoint was written at (None: a checkpoint without it, counted from 0)."""
    if not Path(checkpoint, STATE_JSON).is_file():
        logger.warning("%s has no %s: num_tokens counts from 0 again in this run", checkpoint, STATE_JSON)
        return None
    return saved_state(checkpoint).get("num_tokens")


__all__ = ["Checkpointing", "TRAINING_ARGS_JSON"]
