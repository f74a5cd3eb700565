"""TR-DPO reference syncing for the online commands (online-dpo, grpo, rloo, ppo; `OnlineConfig.ref_sync`, the CLI's
`method.ref_sync: {alpha, steps}`): after every `steps`-th optimizer update the frozen reference copy becomes

    pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref        (each parameter, matched by name)

An update is one optimizer step: an online step makes `epochs_per_step` x minibatches of them (gradient accumulation's
micro-batches do not count), as TRL's `SyncRefModelCallback` counts the Trainer's optimizer steps. The count runs over
the whole run (not per online step), so a sync can fall inside an online step: the later minibatches' KL (and
online DPO's loss) then read the synced reference; the step's rollout reference log-probs were computed before it.

Only a separate reference can move: the frozen copy of a fully finetuned policy. Refused before training, in one
line: no reference built (kl_coef 0 fixed / a reference-free loss), an adapter (the reference is the base with the
adapter switched off), a `ref_model` of another architecture, FSDP2 (the reference is sharded like the policy; the
mix on the shards is not built). The vLLM engine holds the policy, not the reference: nothing to do there.

After a sync the reference is no longer the initial model, so every checkpoint holds it (`reference.safetensors`, with
the update count and the syncs so far) and a resume loads it; a checkpoint without it is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from alignkit.run_commit import CheckpointError
from alignkit.settings.sections import RefSync
from alignkit.settings.typed import ConfigError
from alignkit.trainers.ref_sync import (REFERENCE_FILE, check_ref_sync, load_reference, mix_into_reference,
                                       save_reference)

logger = logging.getLogger(__name__)


class OnlineRefSync:
    """The syncing state of one run: `updates` (optimizer updates so far) and `syncs` (mixes done)."""

    def __init__(self, ref_sync: RefSync, reference: nn.Module) -> None:
        self.ref_sync, self.reference = ref_sync, reference
        self.updates = self.syncs = 0

    def after_update(self, policy: nn.Module) -> None:
        """Count one optimizer update; every `steps`-th, mix the policy into the reference."""
        self.updates += 1
        if self.updates % self.ref_sync.steps == 0:
            mix_into_reference(policy, self.reference, self.ref_sync.alpha)
            self.syncs += 1
            logger.info("reference synced after optimizer update %d (alpha %g; %d sync(s) so far)", self.updates,
                        self.ref_sync.alpha, self.syncs)

    def save(self, folder: Path) -> None:
        """The reference's weights and the counts, into a (staged) checkpoint folder."""
        save_reference(self.reference, folder, {"updates": self.updates, "ref_syncs": self.syncs})

    def check(self, folder: Path) -> None:
        """A CheckpointError (one line) when `folder` holds no reference (written without ref_sync)."""
        if not (folder / REFERENCE_FILE).is_file():
            raise CheckpointError(f"resume: {folder} holds no {REFERENCE_FILE}, and this run syncs its reference "
                                  "(method.ref_sync): after a sync the reference is no longer the initial model, so "
                                  "the resumed run would score against the wrong one; resume from a checkpoint written "
                                  "with method.ref_sync, or start a new run in another output_dir")

    def load(self, folder: Path) -> None:
        """Put back `save`'s reference and counts (after `check`); a CheckpointError when it was written for
        another reference."""
        self.check(folder)
        counts = load_reference(self.reference, folder)
        self.updates, self.syncs = counts.get("updates", 0), counts.get("ref_syncs", 0)
        logger.info("reference loaded from %s (%d update(s), %d sync(s) so far)", folder, self.updates, self.syncs)


def build_online_ref_sync(trainer: Any, model: nn.Module, ref_model: nn.Module | None,
                          fsdp2: bool) -> OnlineRefSync | None:
    """`trainer.config.ref_sync` checked against the trainer's reference (after `prepare_model`); None without it."""
    ref_sync = trainer.config.ref_sync
    if ref_sync is None:
        return None
    owner = type(trainer).__name__
    mode = trainer.reference.mode
    if mode == "none":
        raise ConfigError(f"method.ref_sync: {owner} builds no reference ({trainer.why_no_reference()}), so there is "
                          "nothing to sync; set method.reference=copy (full finetuning), or remove method.ref_sync")
    if fsdp2:
        raise ConfigError(f"method.ref_sync: {owner} under FSDP2 shards the reference like the policy, and the mix "
                          "on the shards is not built; train under DDP or one process, or remove method.ref_sync")
    check_ref_sync(ref_sync, mode, model, ref_model, owner)
    return OnlineRefSync(ref_sync, trainer.reference.model)


__all__ = ["OnlineRefSync", "build_online_ref_sync"]
