"""What an online run writes to keep: resumable checkpoints (`save_checkpoint` / `load_checkpoint`: trainable
weights, optimizer state, RNGs, prompt order, KL controller and reward moments, written atomically), the final
model or adapter (`save`), and its upload (`push_to_hub`).

`Checkpoints` is a part of `alignkit.online.trainer.OnlineTrainer` (a mixin): it reads the trainer's `config`,
`model` / `policy`, `extra_modules`, `optimizer`, `accelerator`, `tokenizer`, `output_dir`, `steps_done`, the
RNGs, the KL controller and the reward moments.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from alignkit.adapters import adapter_of, save_adapter
from alignkit.distributed import (
    copy_full_into, full_optimizer_state, full_parameters, is_fsdp2, load_full_optimizer_state, storage_key,
)
from alignkit.guards import NonFiniteError
from alignkit.naming import CODE_DIGEST_VERSION, stable_name
from alignkit.online.digests import WEIGHTS_PREFIX, annotator_model_digest
from alignkit.online.generation import prompts_fingerprint
from alignkit.online.metrics import METRICS_FILE
from alignkit.run_commit import CheckpointError, checkpoint_step, incomplete_reason, staged
from alignkit.runs import push_folder
from alignkit.trainers.checks import settings_changes

logger = logging.getLogger(__name__)


def recorded(value: Any) -> Any:
    """How a checkpoint records a setting JSON cannot write: by `alignkit.naming.stable_name` (a path as its text, a
    function or class by `module:qualname`, a partial with its arguments, another object by its type and its public
    attributes), never by a repr holding a memory address (it differs in every process: every resume was refused)."""
    return stable_name(value)


def dotted(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys (`sampling.temperature`); an empty mapping stays a value."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def one_sided(old: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for the dotted keys one side has and the other lacks, under a setting both record (a
    `vllm` / `feedback_kwargs` / annotator kwargs / adapter key added or removed); a setting only one side records at
    all (another alignkit version's) is not compared."""
    roots = {k.split(".")[0] for k in old} & {k.split(".")[0] for k in now}
    return [f"{k}: {old[k]!r} -> (not set)" if k in old else f"{k}: (not set) -> {now[k]!r}"
            for k in sorted(set(old) ^ set(now)) if k.split(".")[0] in roots]


# how torch's optimizers compute, not what: this run's train.optim, not the checkpoint's
KERNEL_KEYS = ("fused", "foreach")


def keep_kernels(optimizer: torch.optim.Optimizer, kernels: list[dict[str, Any]]) -> None:
    """Put back this run's kernel choice after `load_state_dict`, which takes every group key from the checkpoint
    (a checkpoint of train.optim adamw_torch resumed under adamw_torch_fused ran torch's per-tensor loop without a
    word, and the other way round). The fused kernel keeps its step counts as float32 on the parameter's device."""
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)
        if group.get("fused"):
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def annotator_code(annotator: Any, version: int = CODE_DIGEST_VERSION) -> str | None:
    """The annotator's `code_digest()` (a function annotator's: its functions' code and the helpers they call), None
    for one without; of an older `version` (`naming.code_digest`'s) to compare with a checkpoint that recorded it.
    A user annotator's own `code_digest` that takes no version is called without one: its value never followed
    naming's version (an old checkpoint's was not compared at all, None)."""
    digest = getattr(annotator, "code_digest", None)
    if not callable(digest):
        return None
    if version == CODE_DIGEST_VERSION:
        return digest()
    try:
        return digest(version=version)
    except TypeError:
        return digest()


class Checkpoints:
    """Checkpoints, the saved model and its upload (see the module's docstring); a part of `OnlineTrainer`."""

    # config fields a resumed run may change: how long it runs, what it logs, evaluates, saves and uploads, where the
    # vLLM server answers, the reward-stall watchdog (the CLI's RESUMABLE_CHANGES). Every other field is recorded in
    # each checkpoint (`training_settings`), and a resume with another value is refused
    RESUMABLE_FIELDS = frozenset({"steps", "eval_steps", "save_steps", "save_at_end", "report_to", "progress_bar",
                                  "push_to_hub", "hub_model_id", "hub_private_repo", "vllm_server_url",
                                  "vllm_server_timeout", "stall_steps"})

    def training_settings(self) -> dict[str, Any]:
        """What a resumed run must keep, recorded in each checkpoint and compared by `check_resume` (`key: old -> new`,
        `alignkit.trainers.checks.settings_changes`, as the offline trainers' `training_settings`): the method (the
        trainer class), every config field but `RESUMABLE_FIELDS` (nested ones dotted: sampling.temperature,
        params.beta, vllm.<argument>), the annotator's `describe()` under annotator.* (not its path: a reward model or
        judge built from a model object has none, the CLI's tiny ones a temporary folder; `alignkit <command>
        --resume` compares annotator.path in config.yaml) and the adapter's under adapter.* (kind, lora.*, reft.*)."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in self.RESUMABLE_FIELDS}
        if config.get("optimizer") == "adamw_fused":  # the same update as torch's per-tensor AdamW (the maths is
            config["optimizer"] = "adamw"  # what must stay: a run may resume with either kernel)
        annotator = {k: v for k, v in self.annotator.describe().items() if k != "path"}
        out = {"method": type(self).__name__, **dotted(config), **dotted(annotator, "annotator."),
               **dotted(adapter_of(self.policy).describe(), "adapter.")}
        return json.loads(json.dumps(out, default=recorded))

    def _trainable(self) -> dict[str, Tensor]:
        """Every trainable tensor by name (policy, then extra modules such as PPO's value head), shared storage once."""
        out: dict[str, Tensor] = {}
        seen: set[int] = set()
        named = [(f"policy.{n}", p) for n, p in self.policy.named_parameters() if p.requires_grad]
        for i, m in enumerate(self.extra_modules):
            named += [(f"extra{i}.{n}", p) for n, p in self.accelerator.unwrap_model(m).named_parameters()]
        for name, p in named:
            key = storage_key(p)  # a DTensor's data_ptr is not its own
            if key not in seen:
                seen.add(key)
                out[name] = p
        return out

    def save_checkpoint(self, folder: str | Path, step: int) -> Path:
        """Everything a resume needs, written to a staging folder and renamed into place with
        `alignkit_complete.json`: trainable weights (safetensors), optimizer state (`torch.save` of tensors
        only, read back with `weights_only=True`), the sampling RNG, prompt order, KL controller and reward
        moments (JSON). Several processes: every rank holds the same state (DDP), or its shards are gathered
        (FSDP2: full weights, and the full optimizer state keyed by parameter names); the main one writes, and
        every rank restores from the same folder."""
        folder = Path(folder)
        if is_fsdp2(self.accelerator):  # collectives: every process gathers; the main one writes full tensors

            with full_parameters(self.model):
                weights = {k: v.detach().cpu().contiguous().clone() for k, v in self._trainable().items()}
            optim = full_optimizer_state(self.model, self.optimizer)
        else:
            weights = {k: v.detach().cpu().contiguous() for k, v in self._trainable().items()}
            optim = self.optimizer.state_dict()
        if self.accelerator.is_main_process:
            with staged(folder, step=step) as tmp:
                save_file(weights, str(tmp / "trainable.safetensors"))
                save_file({"rng": self.rng.get_state()}, str(tmp / "rng.safetensors"))
                for part in self.checkpoint_parts():
                    part.save(tmp)
                torch.save(optim, tmp / "optimizer.pt")
                version, internal, gauss = self._py_rng.getstate()
                state = {"step": step, "order": self._order, "py_rng": [version, list(internal), gauss],
                         "kl_coef": float(self.kl_ctl.value), "num_tokens": self._num_tokens,
                         "moments": [self.moments.count, self.moments.mean, self.moments.m2],
                         "prompts": prompts_fingerprint(self.prompts), "world_size": self.world,
                         "stall": list(stall) if (stall := getattr(self, "_stall", None)) else None,
                         "run_counts": {"flat_steps": getattr(self, "_flat_steps", 0),
                                        "clipped_steps": getattr(self, "_clipped_steps", 0)},
                         "training_settings": self.training_settings(),
                         "annotator_code": annotator_code(self.annotator),
                         "annotator_code_version": CODE_DIGEST_VERSION,
                         "annotator_model_files": annotator_model_digest(self.annotator),
                         **self.checkpoint_extras()}
                (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
            logger.info("online checkpoint: %s", folder)
        self.accelerator.wait_for_everyone()
        return folder

    def checkpoint_parts(self) -> list[Any]:
        """The optional state kept in its own checkpoint file, each with save / check / load (folder): the synced
        reference (method.ref_sync, `online/ref_sync.py`) and the EMA of the policy (train.ema_decay,
        `online/ema.py`)."""
        return [p for p in (getattr(self, "ref_syncer", None), getattr(self, "ema", None)) if p is not None]

    def checkpoint_extras(self) -> dict[str, Any]:
        """A subclass's own resumable state, JSON, added to trainer_state.json (PPO: the ptx data's position)."""
        return {}

    def check_resume_extras(self, folder: Path, state: dict[str, Any]) -> None:
        """A subclass's refusal (`CheckpointError`) of a checkpoint its own state cannot continue (`check_resume`)."""

    def restore_extras(self, state: dict[str, Any]) -> None:
        """Put back what `checkpoint_extras` recorded (`load_checkpoint`)."""

    def check_fresh_checkpoints(self, start: int) -> None:
        """Before a `train` call writes anything: from step 0 (no resume), an output_dir whose `checkpoints/` holds
        `checkpoint-N` folders of an earlier run is refused (`CheckpointError`, one line naming the folder): this
        run's checkpoint-N replaced that run's of the same step, and its model and metrics sat beside the other
        run's checkpoints (a later resume continued the earlier run), without a word. metrics.jsonl of such a run
        is refused by `prepare_metrics_file`; this covers the folder without it (removed, or never written)."""
        folder = self.output_dir / "checkpoints" if self.output_dir is not None and start == 0 else None
        if folder is None or not folder.is_dir():
            return
        found = sorted((step, p.name) for p in folder.iterdir()
                       if p.is_dir() and (step := checkpoint_step(p)) is not None)
        if found:
            names = ", ".join(name for _, name in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise CheckpointError(f"{type(self).__name__}: {folder} already holds {len(found)} checkpoint(s) of an "
                                  f"earlier run ({names}), and this run starts at step 0, so its checkpoints would "
                                  "replace that run's of the same step; pass resume_from_checkpoint= (e.g. "
                                  f"{folder / found[-1][1]}) to continue that run, or another output_dir (or "
                                  "remove that run's files)")

    def check_resume(self, folder: str | Path) -> None:
        """Refuse (`CheckpointError`, one line) to resume from `folder` when it is incomplete, or when this trainer's
        prompts or `training_settings()` differ from the run that wrote it: the saved prompt order indexes the old
        prompts (fewer now: IndexError at the first step; others: other prompts under the old order), the saved
        optimizer / KL / RNG state would silently keep the old learning rate, KL and seed, and the rest (another
        method, annotator, adapter, num_samples, temperature, beta, loss_type, ...) would continue the checkpoint's
        training under settings that did not make it. Writes nothing; the CLI calls it before the run folder is
        touched. What a checkpoint does not record (an older alignkit: only learning_rate, weight_decay, optimizer,
        kl_coef, kl_target and seed, or none) is not compared."""
        folder = Path(folder)
        reason = incomplete_reason(folder)
        if reason is not None:
            raise CheckpointError(f"resume: cannot resume from {folder}: {reason}")
        state = json.loads((folder / "trainer_state.json").read_text())
        if int(state["step"]) > self.config.steps:  # equal: only the final save is left (a run that died saving)
            raise CheckpointError(f"resume: {folder} has done {state['step']} step(s), more than steps="
                                  f"{self.config.steps} (train.max_steps): nothing is left to run, and its model would "
                                  f"be saved as this run's after more steps than asked; raise the steps to "
                                  f"{state['step']} or more, or resume from an earlier checkpoint")
        saved, now = state.get("prompts"), prompts_fingerprint(self.prompts)
        if saved is not None and saved != now:
            what = (f"{saved['count']} prompt(s), this run has {now['count']}" if saved["count"] != now["count"]
                    else f"{now['count']} other prompt(s) (or the same in another order)")
            raise CheckpointError(f"resume: {folder} was written by a run over {what}; the checkpoint's prompt order "
                                  "indexes its prompts. Resume with the same prompts (data.path, its contents, "
                                  "data.max_records, data.eval_fraction / eval_path), or start a new run")
        self.check_resume_extras(folder, state)
        for part in self.checkpoint_parts():  # each must be there (a checkpoint written without the feature)
            part.check(folder)
        old, now = state.get("training_settings", state.get("settings")), self.training_settings()
        changed = settings_changes(old, now) + (one_sided(old, now) if isinstance(old, dict) else [])
        if changed:
            raise CheckpointError(f"resume: {folder} was trained with other settings than this run's "
                                  f"({'; '.join(changed)}): the resumed run would keep the checkpoint's optimizer, KL "
                                  "controller and random state (the old values) and continue its training under "
                                  "settings that did not make it; resume with the checkpoint's settings, or start a "
                                  "new run (another output_dir)")

    def load_checkpoint(self, folder: str | Path) -> int:
        """Restore a `save_checkpoint` folder in place (after `check_resume`); returns the number of steps it had
        done."""
        folder = Path(folder)
        self.check_resume(folder)
        saved = load_file(str(folder / "trainable.safetensors"))
        live = self._trainable()
        if set(saved) != set(live):
            missing = sorted(set(live) - set(saved))[:3] or sorted(set(saved) - set(live))[:3]
            raise CheckpointError(f"resume: {folder} was written for another model or adapter (parameters differ, "
                                  f"e.g. {missing}); resume with the config that wrote it")
        for k, p in live.items():  # FSDP2: each process keeps its shard (a collective, the same order everywhere)
            copy_full_into(p, saved[k])
        for part in self.checkpoint_parts():  # their settings are compared as every setting
            part.load(folder)
        # map_location "cpu", not the accelerator's device: on CPU processes that is "cpu:0", and state saved from
        # it is tagged "cpu:0", which torch.load cannot map back; load_state_dict moves the state to the parameters
        optim = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        kernels = [{k: g.get(k) for k in KERNEL_KEYS} for g in self.optimizer.param_groups]
        if is_fsdp2(self.accelerator):  # full (unsharded) optimizer state, keyed by parameter names: sharded here
            load_full_optimizer_state(self.model, self.optimizer, optim)
        else:
            self.optimizer.load_state_dict(optim)
        keep_kernels(self.optimizer, kernels)
        self.rng.set_state(load_file(str(folder / "rng.safetensors"))["rng"])
        state = json.loads((folder / "trainer_state.json").read_text())
        version, internal, gauss = state["py_rng"]
        self._py_rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])
        self.kl_ctl.value = float(state["kl_coef"])
        self._num_tokens = int(state.get("num_tokens", 0))  # older checkpoints: counted from 0 again
        self.moments.count, self.moments.mean, self.moments.m2 = state["moments"]
        self.restore_stall(folder, state)
        self.restore_run_counts(state, int(state["step"]))
        self.restore_extras(state)
        logger.info("resumed from %s (step %d)", folder, state["step"])
        self.warn_changed_annotator(folder, state)
        saved_world = state.get("world_size")  # not recorded before: not compared
        if isinstance(saved_world, int) and saved_world != self.world:
            # the prompt order, prompts_per_step and mini_batch_size are global and every reduction is over all
            # processes, so the steps are the same training; only the per-process random streams differ
            logger.warning("resume: %s was written by a run of %d process(es), this one has %d: the run continues with "
                           "the same prompt order and global batches (prompts_per_step, mini_batch_size), but the "
                           "sampling seeds ((seed * 100003 + step) * processes + rank) and minibatch shuffles differ "
                           "from those of an uninterrupted run, so its samples will not be the ones that run would "
                           "have drawn", folder, saved_world, self.world)
        return int(state["step"])

    def warn_changed_annotator(self, folder: Path, state: dict[str, Any]) -> None:
        """Resumed from `folder` (its trainer_state.json `state`): warn, one line each, when the annotator's reward
        functions' code and the helpers they call (`code_digest`) or its model (`annotator_model_digest`: a reward
        model or judge retrained or replaced at the same path, which the path alone compared equal, or a model object
        with other weights) differ from those that scored the run up to the checkpoint. Checkpoints of an older
        alignkit record neither: not compared; one without annotator_code_version recorded version 1 of
        `code_digest` (no helpers): compared with this code's version 1 (the current digest would differ for
        unchanged code)."""
        saved_code = state.get("annotator_code")
        code = annotator_code(self.annotator, int(state.get("annotator_code_version", 1)))
        if saved_code is not None and code is not None and saved_code != code:
            logger.warning("resume: the code of %s differs from the code that scored the run up to %s (the same name, "
                           "edited since): the resumed steps are scored by the new code, and the checkpoint's training "
                           "and reward statistics come from the old one; start a new run if the reward is not meant "
                           "to change", self.annotator.source(), folder)
        self.warn_changed_annotator_model(folder, state)

    def warn_changed_annotator_model(self, folder: Path, state: dict[str, Any]) -> None:
        """The annotator's model against the checkpoint's `annotator_model_files` (`annotator_model_digest`): a
        warning when its files (loaded from a path) or its weights / tokenizer (a model object) differ; one kind
        recorded and the other given now (a path then, an object now) is not compared (said at INFO). The main process
        alone compares (and, for a model object, reads every weight: seconds per 1B parameters); the others skip it,
        as only the main one writes checkpoints (`save_checkpoint`)."""
        if not self.accelerator.is_main_process:
            return
        saved, now = state.get("annotator_model_files"), annotator_model_digest(self.annotator)
        if saved is None or now is None or saved == now:
            return
        if saved.startswith(WEIGHTS_PREFIX) != now.startswith(WEIGHTS_PREFIX):
            logger.info("resume: %s recorded the %s of %s, and this run gives it as %s: not compared", folder,
                        "weights" if saved.startswith(WEIGHTS_PREFIX) else "model files", self.annotator.source(),
                        "a model object" if now.startswith(WEIGHTS_PREFIX) else "a folder")
        elif now.startswith(WEIGHTS_PREFIX):
            logger.warning("resume: the model object of %s has other weights, tokenizer or generation options than "
                           "the one that scored the run up to %s: the resumed steps are scored by this model, and the "
                           "checkpoint's training and reward statistics come from the old one; start a new run if the "
                           "reward is not meant to change", self.annotator.source(), folder)
        else:
            logger.warning("resume: the model files at %s of %s differ from those that scored the run up to %s "
                           "(retrained or replaced at the same path since: another weight file size, modification "
                           "time or safetensors header, or another config / tokenizer): the resumed steps are scored "
                           "by the new model, and the checkpoint's training and reward statistics come from the old "
                           "one; start a new run if the reward is not meant to change",
                           getattr(self.annotator, "path", None), self.annotator.source(), folder)

    def restore_stall(self, folder: Path, state: dict[str, Any]) -> None:
        """The steps in a row without reward signal up to the checkpoint (`check_stall`'s first step, lowest and
        highest score), so that `stall_steps` counts across the resume (a stall that began before a resume was
        counted again from 0: stopped stall_steps steps after the resume, or never if the runs were shorter). A
        checkpoint of an older alignkit, which did not record it: counted from the resume, with a warning."""
        if "stall" in state:
            self._stall = tuple(state["stall"]) if state["stall"] else None
            return
        self._stall = None
        if self.config.stall_steps:
            logger.warning("resume: %s records no count of steps without reward signal (an older alignkit wrote it): "
                           "method.stall_steps=%d counts them from this resume, so a stall that began before it stops "
                           "the run up to %d step(s) "
                           "late", folder, self.config.stall_steps, self.config.stall_steps - 1)

    def restore_run_counts(self, state: dict[str, Any], step: int) -> None:
        """The steps up to the checkpoint without a reward spread and with every response cut at max_new_tokens, so
        that the end-of-run warnings judge the whole run (`counted_from` 0), not only the steps since the resume. A
        checkpoint of an older alignkit, which did not record them: counted from the resume (`counted_from` = its
        step; the warnings say so)."""
        counts = state.get("run_counts")
        if isinstance(counts, dict):
            self._flat_steps, self._clipped_steps = int(counts["flat_steps"]), int(counts["clipped_steps"])
            self._counted_from = 0
        else:
            self._flat_steps = self._clipped_steps = 0
            self._counted_from = step

    def policy_trainable(self) -> dict[str, Tensor]:
        """The policy's trainable parameters by name (what `train.ema_decay` averages)."""
        return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}

    def save_ema(self, folder: str | Path, then: Callable[[Path], None] | None = None) -> Path:
        """The EMA of the policy (`alignkit.online.ema`) as `Checkpoints.save` writes the policy (adapter or full model,
        tokenizer, online_config.json; no value head), staged and renamed into place with its marker (`then(tmp)`
        adds files first: the card); the trained weights are back in the policy afterwards. Main process only."""
        folder = Path(folder)
        if self.accelerator.is_main_process:
            with staged(folder, step=self.steps_done) as tmp, self.ema.swapped(self.policy_trainable()):
                Checkpoints.save(self, tmp)
                if then is not None:
                    then(tmp)
        return folder

    def save(self, folder: str | Path) -> Path:
        """The trainable state (adapter, or the full model), the tokenizer and the config as JSON."""
        folder = Path(folder)
        with full_parameters(self.model):  # FSDP2: every process gathers its shards; plain files are written
            bad = [n for n, p in self.policy.named_parameters()
                   if p.requires_grad and not bool(p.detach().isfinite().all())]
            if bad:
                raise NonFiniteError(f"trainable weight {bad[0]!r}", float("nan"), self.steps_done,
                                     causes=f"an earlier update diverged; nothing was saved to {folder}")
            if self.accelerator.is_main_process:
                save_adapter(self.policy, folder, tokenizer=self.tokenizer)
                (folder / "online_config.json").write_text(json.dumps(self.config.to_dict(), indent=2,
                                                                      default=str) + "\n")
        return folder

    # what `push_to_hub` leaves out of output_dir: the run's by-products (model_ema/: the EMA of train.ema_decay,
    # a second model), not the model
    PUSH_IGNORE = ["checkpoints/*", "tensorboard/*", "model_ema/*", METRICS_FILE, "*.staging/*", ".*"]

    def push_to_hub(self, repo_id: str | None = None, folder: str | Path | None = None) -> str:
        """Upload the saved model / adapter of `folder` (default `output_dir`) to the Hub model repo `repo_id`
        (default `config.hub_model_id`, else the folder's name): the files `save` wrote and a README.md if there
        is one; checkpoints, TensorBoard events, metrics.jsonl and model_ema/ stay local. Returns the repo id."""
        folder = Path(folder if folder is not None else self.output_dir)
        return push_folder(folder, repo_id or self.config.hub_model_id or folder.resolve().name,
                           private=self.config.hub_private_repo, ignore_patterns=self.PUSH_IGNORE)


__all__ = ["Checkpoints"]
