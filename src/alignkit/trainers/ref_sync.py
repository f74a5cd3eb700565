"""TR-DPO reference syncing (Gorbatovski et al. 2024; TRL's `SyncRefModelCallback`): after every `steps`-th optimizer
step (counted as the Trainer's `global_step`, so gradient accumulation's micro-batches do not count) the frozen
reference copy becomes

    pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref        (each parameter, matched by name)

`SyncsReference` is a mixin of `PreferenceTrainer` and `KTOTrainer` (before `AlignTrainer`); `ref_sync=` takes
`alignkit.settings.sections.RefSync` or its dict ({"alpha": 0.6, "steps": 512}). Only a separate reference can move:
reference "copy" of a fully finetuned policy. Refused, before training, in one line: an adapter's reference (the
base with the adapter switched off), precomputed log-probs (stale after a sync), a reference-free loss, and
FSDP / DeepSpeed (the reference is sharded by the engine; the mix on the shards is not built).

After a sync the reference is no longer the initial model, so every checkpoint holds it (`reference.safetensors`,
written into the staged checkpoint before it is committed) and a resume loads it; a checkpoint without it is refused.

Without syncing, a resume builds its reference anew (a copy of the model it was given, or the `ref_model` passed):
every checkpoint of a trainer with a reference model records that model's `base_fingerprint` as it was before the
first step (`reference_base.json`), and a resume whose reference differs is refused (a full-finetuning DPO / KTO run
resumed from a checkpoint outside its run folder with another model.path scored its pairs against that other model
without a word).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from alignkit.adapters import base_fingerprint, base_mismatch, can_switch_off, unwrap_lm
from alignkit.distributed import requested_engine
from alignkit.run_commit import CheckpointError
from alignkit.settings.sections import RefSync
from alignkit.settings.typed import ConfigError

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference.safetensors"
REFERENCE_BASE_FILE = "reference_base.json"


def as_ref_sync(value: RefSync | dict[str, Any] | None) -> RefSync | None:
    """`ref_sync=` as a `RefSync` (a dict's keys are its fields; ranges checked there)."""
    if value is None or isinstance(value, RefSync):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"ref_sync: {value!r} is not a mapping; pass {{'alpha': 0.6, 'steps': 512}} or RefSync(...)")
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(RefSync)})
    if unknown:
        raise ConfigError(f"ref_sync: unknown key(s) {unknown}; valid: alpha, steps")
    return RefSync(**value)


def check_ref_sync(ref_sync: RefSync | None, mode: str, model: nn.Module, ref_model: nn.Module | None,
                   owner: str) -> None:
    """ConfigError when the reference of `mode` cannot be synced (see the module docstring)."""
    if ref_sync is None:
        return
    why = {"none": "the loss reads no reference (reference-free), so there is nothing to sync",
           "adapter_off": "the reference is the policy with its adapter switched off, which training never changes, "
                          "so there is no separate reference to move; use full finetuning (its reference is a "
                          "frozen copy)",
           "precomputed": "the reference log-probs are precomputed once, and they would be stale after the first "
                          "sync; use reference='copy'"}
    if mode in why:
        raise ConfigError(f"{owner}: ref_sync is set and {why[mode]}, or leave ref_sync out")
    if can_switch_off(model):
        raise ConfigError(f"{owner}: ref_sync mixes the policy's weights into the reference by parameter name, and "
                          "this policy has an adapter (its weights are the base's plus the adapter's); use full "
                          "finetuning, or leave ref_sync out")
    ours = {n: tuple(p.shape) for n, p in unwrap_lm(model).named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in ref_model.named_parameters()} if ref_model is not None else ours
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ConfigError(f"{owner}: ref_sync needs a reference of the policy's architecture (the same parameter "
                          f"names and shapes), and ref_model differs (e.g. {diff}); pass a ref_model like the policy")
    engine = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}.get(requested_engine() or "")
    if engine is not None:  # the launcher's engine, known before the Trainer writes its output_dir
        refuse_sharded_ref_sync(ref_sync, SimpleNamespace(distributed_type=engine), owner)


def refuse_sharded_ref_sync(ref_sync: RefSync | None, accelerator: Any, owner: str) -> None:
    """ConfigError for ref_sync under FSDP / DeepSpeed: the reference is sharded by the engine (ZeRO-3: outside a
    gather each parameter is an empty placeholder, so the in-place mix and `save_reference` would act on nothing;
    FSDP2: on each process's shard). `check_ref_sync` asks the same of the launcher's environment before the Trainer
    is built (an `accelerate launch` FSDP / DeepSpeed config); this, after, also covers train.deepspeed."""
    if ref_sync is not None and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"{owner}: ref_sync under {accelerator.distributed_type.value} is not supported: the "
                          "reference is sharded by the engine and the mix would have to act on the shards (TRL "
                          "gathers them under ZeRO-3), which alignkit does not do; train under DDP or one process, "
                          "or leave ref_sync out")


@torch.no_grad()
def mix_into_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter (by name), in place; mixed in
    float32 and rounded once to the reference's dtype (in bf16, scaling then adding rounds twice, and a mix
    smaller than half a unit in the last place would be lost)."""
    ref = dict(reference.named_parameters())
    for name, p in unwrap_lm(policy).named_parameters():
        target = ref[name]
        target.copy_(torch.lerp(target.float(), p.detach().to(target.device, torch.float32), alpha))


def save_reference(reference: nn.Module, folder: str | os.PathLike, counts: dict[str, int]) -> None:
    """`reference`'s weights into `folder`/REFERENCE_FILE (a staged checkpoint folder), `counts` as metadata."""
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in reference.named_parameters()}
    save_file(tensors, str(Path(folder, REFERENCE_FILE)), metadata={k: str(v) for k, v in counts.items()})


@torch.no_grad()
def load_reference(reference: nn.Module, folder: str | os.PathLike) -> dict[str, int]:
    """`save_reference`'s weights back into `reference`, in place (every name, same shapes), and its counts; a
    CheckpointError when the file was written for another reference."""
    path = Path(folder, REFERENCE_FILE)
    saved, params = load_file(str(path)), dict(reference.named_parameters())
    bad = sorted(set(saved) ^ set(params)) or sorted(n for n in saved if saved[n].shape != params[n].shape)
    if bad:
        raise CheckpointError(f"resume: {path} was written for another reference model (e.g. {bad[:3]}); resume "
                              "with the config that wrote it")
    for name, t in saved.items():
        params[name].copy_(t)
    with safe_open(str(path), "pt") as f:
        return {k: int(v) for k, v in (f.metadata() or {}).items()}


class RefSyncCallback(TrainerCallback):
    """Syncs `trainer`'s reference after every `steps`-th optimizer step (`on_step_end`: after the step, before the
    step's checkpoint is saved)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        t = self.trainer
        if state.global_step % t.ref_sync.steps == 0:
            mix_into_reference(t.accelerator.unwrap_model(t.model), t.reference.model, t.ref_sync.alpha)
            t.ref_syncs += 1
            logger.info("reference synced at optimizer step %d (alpha %g; %d sync(s) so far)", state.global_step,
                        t.ref_sync.alpha, t.ref_syncs)
        return control


class SyncsReference:
    """The trainers' side of ref_sync: set up (`setup_ref_sync`), the reference in checkpoints and resumes."""

    ref_sync: RefSync | None = None
    ref_syncs: int = 0
    reference_base: dict[str, Any] | None = None

    def setup_ref_sync(self, ref_sync: RefSync | None) -> None:
        """After `AlignTrainer.__init__` and `Reference.place`: the engine check and the callback."""
        refuse_sharded_ref_sync(ref_sync, self.accelerator, type(self).__name__)
        self.ref_sync, self.ref_syncs = ref_sync, 0
        model = self.reference.model  # its identity before any step moves it (recorded in each checkpoint)
        self.reference_base = base_fingerprint(model) if model is not None else None
        if ref_sync is not None:
            self.add_callback(RefSyncCallback(self))

    def training_settings(self) -> dict[str, Any]:
        sync = None if self.ref_sync is None else dataclasses.asdict(self.ref_sync)
        return {**super().training_settings(), "ref_sync": sync}

    def save_checkpoint_extras(self, folder: Path) -> None:
        """The reference's weights (main process), into the staged checkpoint before it is committed."""
        super().save_checkpoint_extras(folder)
        if self.reference_base is not None:
            Path(folder, REFERENCE_BASE_FILE).write_text(json.dumps(self.reference_base) + "\n")
        if self.ref_sync is None:
            return
        save_reference(self.reference.model, folder, {"ref_syncs": self.ref_syncs})

    def check_resume(self, checkpoint: str | os.PathLike, label: str = "resume_from_checkpoint") -> None:
        if self.ref_sync is not None and not Path(checkpoint, REFERENCE_FILE).is_file():
            raise CheckpointError(f"{label}: {checkpoint} holds no {REFERENCE_FILE}, and ref_sync is on: after a sync "
                                  "the reference is no longer the initial model, so the resumed run would score "
                                  "against the wrong one; resume from a checkpoint written with ref_sync, or start a "
                                  "new run in another output_dir")
        self.check_reference_base(checkpoint, label)
        super().check_resume(checkpoint, label)

    def check_reference_base(self, checkpoint: str | os.PathLike, label: str) -> None:
        """Refuse a checkpoint whose run scored against another reference model than this trainer's (its
        `REFERENCE_BASE_FILE`; not compared when either side has none, or when ref_sync loads the checkpoint's)."""
        path = Path(checkpoint, REFERENCE_BASE_FILE)
        if self.ref_sync is not None or self.reference_base is None or not path.is_file():
            return
        saved = json.loads(path.read_text())
        why = base_mismatch(saved, self.reference_base) if isinstance(saved, dict) else None
        if why is not None:
            was = f"; it was trained against {saved['name_or_path']}" if saved.get("name_or_path") else ""
            raise CheckpointError(f"{label}: {checkpoint} was trained against another reference model than this "
                                  f"run's ({why}{was}): the resumed run would score its pairs against this one, so it "
                                  "would continue neither run; resume with the model (model.path) the checkpoint's run "
                                  "started from, or start a new run from its weights in another output_dir")

    def resume_point(self, resume_from_checkpoint: str | bool | None) -> str | bool | None:
        point = super().resume_point(resume_from_checkpoint)
        if point and self.ref_sync is not None:
            self.load_reference(point)
        return point

    def load_reference(self, checkpoint: str | os.PathLike) -> None:
        """The checkpoint's reference weights into the reference copy, in place (every name, same shapes)."""
        self.ref_syncs = load_reference(self.reference.model, checkpoint).get("ref_syncs", 0)
        logger.info("reference weights loaded from %s (%d sync(s) so far)", checkpoint, self.ref_syncs)


__all__ = ["REFERENCE_BASE_FILE", "REFERENCE_FILE", "save_reference", "load_reference", "RefSyncCallback",
           "SyncsReference", "as_ref_sync", "check_ref_sync", "mix_into_reference", "refuse_sharded_ref_sync"]
