"""Reward normalisation and clipping for the online trainers.

Scores from an annotator come in arbitrary units; before advantages or margins are formed they can be

    "none":     r' = r
    "running":  r' = (r - mu) / sigma, mu and sigma^2 the mean and (unbiased) variance of EVERY score seen so
                far, this step's included (running moments, merged with Chan et al.'s parallel formula:
                delta = mu_b - mu_a, M2 = M2_a + M2_b + delta^2 n_a n_b / n; as TRL's `RunningMoments`)
    "group":    r' = (r - mean_g) / (std_g + eps) within each prompt's group of samples (unbiased std)

and then clipped to [-c, c] (`clip`, optional). NaN scores (annotation failures) stay NaN and are left out of
every statistic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORMALIZATIONS = ("none", "running", "group")


class RunningMoments:
    """Count, mean and unbiased variance of all values seen (float64, merged batch by batch)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Tensor) -> None:
        v = values.detach().to(torch.float64).flatten()
        v = v[~torch.isnan(v)]
        n_b = v.numel()
        if n_b == 0:
            return
        mean_b = float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta ** 2 * self.count * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


def group_normalize(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (group std + eps) over contiguous groups of `group_size`, NaNs ignored."""
    if rewards.numel() % group_size:
        raise ValueError(f"group normalisation: {rewards.numel()} rewards are not a multiple of the group size "
                         f"{group_size} (samples of one prompt must be contiguous)")
    g = rewards.view(-1, group_size).to(torch.float64)  # (G, K)
    ok = ~torch.isnan(g)
    n = ok.sum(-1, keepdim=True)
    mean = torch.where(ok, g, 0.0).sum(-1, keepdim=True) / n.clamp(min=1)
    var = torch.where(ok, (g - mean) ** 2, 0.0).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    return ((g - mean) / (var.sqrt() + eps)).reshape(-1).to(rewards.dtype)


def normalize_rewards(rewards: Tensor, mode: str, *, group_size: int = 1, moments: RunningMoments | None = None,
                      clip: float | None = None, eps: float = 1e-8, update_with: Tensor | None = None) -> Tensor:
    """Apply `mode` (one of NORMALIZATIONS) then clipping to `rewards (B,)`; see the module docstring.
    "running" updates `moments` with `update_with` first (default `rewards`; under several processes, every
    process's scores, so that all of them normalise with the same global moments)."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"reward normalisation {mode!r} is unknown; valid: {list(NORMALIZATIONS)}")
    if mode == "running":
        if moments is None:
            raise ValueError("reward normalisation 'running' needs a RunningMoments to keep the statistics in")
        moments.update(rewards if update_with is None else update_with)
        out = (rewards - moments.mean) / (moments.std + eps)
    elif mode == "group":
        out = group_normalize(rewards, group_size)
    else:
        out = rewards
    return out.clamp(-clip, clip) if clip is not None else out


__all__ = ["NORMALIZATIONS", "RunningMoments", "group_normalize", "normalize_rewards"]
