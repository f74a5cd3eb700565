"""An exponential moving average of the policy's trainable weights (DeepSpeed-Chat step 3's --enable_ema, its
`moving_average`, decay 0.992 there): after every optimizer step

    ema = decay * ema + (1 - decay) * theta        (torch.lerp(ema, theta, 1 - decay)), from ema = theta_0,

over the trainable parameters only (a LoRA / ReFT policy: its adapter's weights; the frozen base is the same in
both). DeepSpeed-Chat averages every actor weight after each PPO step; here the online loop's optimizer steps, for
every online method. Kept in checkpoints (`ema.safetensors`), so a resumed run continues it, and saved at the end as
`model_ema/` in the saved model's format (`swapped`: the EMA's values in the policy while it is written).

The shadow is kept in float32 whatever the policy's dtype: in bf16, (1 - decay) * (theta - ema) is below half a
unit in the last place for most entries and rounds to 0, so the average would stop moving; it is cast back to the
model's dtype only when copied into the policy (`swapped`, i.e. when model_ema/ is written).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from alignkit.run_commit import CheckpointError


class ActorEMA:
    """The EMA of `params` (name -> trainable tensor, the policy's), starting at their current values."""

    def __init__(self, params: dict[str, Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state(self) -> dict[str, Tensor]:
        """The averages as CPU tensors (a checkpoint's `ema.safetensors`)."""
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    # a checkpoint part (`Checkpoints.checkpoint_parts`, as `alignkit.online.ref_sync.OnlineRefSync`): save, check, load
    FILE = "ema.safetensors"

    def save(self, folder: Path) -> None:
        """The averages into a (staged) checkpoint folder."""
        save_file(self.state(), str(folder / self.FILE))

    def check(self, folder: Path) -> None:
        """A CheckpointError (one line) when `folder` holds no EMA (written without train.ema_decay)."""
        if not (folder / self.FILE).is_file():
            raise CheckpointError(f"resume: {folder} holds no EMA of the policy ({self.FILE}), and this run keeps one "
                                  "(train.ema_decay); resume from a checkpoint written with train.ema_decay, or start "
                                  "a new run in another output_dir")

    def load(self, folder: Path) -> None:
        """Put back `save`'s averages; a CheckpointError when they are of other parameters than this policy's (its
        ema_decay is in the checkpoint's training settings: a change is refused there)."""
        saved = load_file(str(folder / self.FILE))
        if set(saved) != set(self.shadow):
            diff = sorted(set(saved) ^ set(self.shadow))[:3]
            raise CheckpointError(f"resume: {folder}: its EMA holds other parameters than this policy's (e.g. "
                                  f"{diff}); resume with the config that wrote it")
        for n, t in saved.items():
            self.shadow[n].copy_(t.float())

    @contextmanager
    def swapped(self, params: dict[str, Tensor]) -> Iterator[None]:
        """The EMA's values in `params` for the block (e.g. to save them), the trained values back after it."""
        kept = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.shadow[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(kept[n])


__all__ = ["ActorEMA"]
