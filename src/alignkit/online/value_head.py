"""A value head for PPO: a linear map from the policy's final hidden state to a scalar, V(s_t) = w . h_t + b.

It reads the hidden state of the SAME forward that scores the policy's tokens (h_t after the final norm, at
the position whose next token is the action a_t), so the backbone is shared, as in the classic RLHF step 3
(Ouyang et al. 2022; Stiennon et al. 2020). For LoRA / ReFT the value loss also trains the adapter; the base
weights stay frozen. Zero-initialised: V = 0 before training, so the first advantages are the returns.

Saved next to the adapter as `value_head.safetensors` + `value_head.json` (never a pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_NAME, CONFIG_NAME = "value_head.safetensors", "value_head.json"


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"ValueHead: hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (...) values, computed in the head's dtype."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS_NAME), metadata={"format": "alignkit-value-head"})
        (folder / CONFIG_NAME).write_text(json.dumps({"hidden_size": self.hidden_size,
                                                      "dtype": str(self.linear.weight.dtype)}) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ValueHead":
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing; a value head folder is written by ValueHead.save "
                                        "(PPOTrainer saves it next to the adapter)")
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        head = cls(int(cfg["hidden_size"]), getattr(torch, cfg.get("dtype", "torch.float32").split(".")[-1]))
        head.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        return head


__all__ = ["ValueHead", "WEIGHTS_NAME", "CONFIG_NAME"]
