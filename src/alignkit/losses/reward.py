"""Reward-model objectives: pairwise Bradley-Terry and K-wise ranking, plus Kendall's tau.

Pairwise (Bradley & Terry, 1952; as used by Ouyang et al. 2022 "InstructGPT" and TRL's RewardTrainer):

    L_i = -log sigma(r_c - r_r - m_i) + c * (r_c + r_r)^2

with an optional margin m_i (Llama-2 style) and reward centering c (Eisenstein et al. 2023,
"Helping or Herding?"; TRL's `center_rewards_coefficient`, there added as c * mean((r_c + r_r)^2),
which equals the mean over i of our per-pair term).

K-wise ranking (Open-Assistant reward model, `RMLoss`): for a prompt with K replies in rank order
(best first) every pair (i < j) of different rank is a comparison (tied replies are not), and

    L_prompt = mean_{i<j, rank_i < rank_j} [ -log sigma(r_i - r_j) + l2 * 0.5 * (r_i^2 + r_j^2) ]

(Open-Assistant's optional l2 term is `l2_coefficient`, 0 by default). K may differ per prompt:
pad the `(P, K_max)` rewards and pass a `(P, K_max)` mask (valid replies first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import REWARD_LOSSES, LossOutput


def _check_pair(chosen: Tensor, rejected: Tensor, where: str) -> None:
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"{where}: chosen and rejected rewards must both be (B,), got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}; squeeze the reward head's last dim")


@REWARD_LOSSES.register("bradley_terry", metrics=("accuracy", "rewards/chosen", "rewards/rejected", "margin"))
def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None,
                       center_rewards_coefficient: float | None = None) -> LossOutput:
    """Bradley-Terry pairwise loss: -log sigma(r_c - r_r - margin) + c * (r_c + r_r)^2, per pair `(B,)`.

    Metrics (per pair, detached): `accuracy` (r_c > r_r), `rewards/chosen`, `rewards/rejected`,
    `margin` (r_c - r_r).
    """
    _check_pair(chosen_rewards, rejected_rewards, "bradley_terry_loss")
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff - margin if margin is not None else diff
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    d = diff.detach()
    metrics = {
        "accuracy": (d > 0).to(d.dtype),
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "margin": d,
    }
    return LossOutput(losses=losses, metrics=metrics)


def _pairs(K: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All index pairs (i, j) with i < j for K items: two `(K(K-1)/2,)` tensors."""
    ij = torch.triu_indices(K, K, offset=1, device=device)
    return ij[0], ij[1]


@REWARD_LOSSES.register("ranking", metrics=("accuracy", "kendall_tau", "num_pairs", "rewards/best",
                                                 "rewards/worst"))
def ranking_loss(rewards: Tensor, mask: Tensor | None = None, l2_coefficient: float = 0.0,
                 ranks: Tensor | None = None, exclude: Tensor | None = None) -> LossOutput:
    """Open-Assistant K-wise ranking loss: mean over all pairs i<j of -log sigma(r_i - r_j), per prompt.

    Args:
        rewards: `(P, K)` rewards of the K replies of each prompt, best first.
        mask: `(P, K)` bool, True for real replies; must be a prefix (valid replies first).
            None means all K replies are valid.
        l2_coefficient: Open-Assistant's `beta * 0.5 * (r_i^2 + r_j^2)` regulariser, per pair.
        ranks: `(P, K)` the replies' ranks (non-decreasing along a row, equal = tied): tied pairs are not
            comparisons (neither is better). None means strictly ordered (every pair i<j counts).
        exclude: `(P, K, K)` bool, pairs (i, j) that are no comparison either (replies with the same tokens, cut to
            one text by the length limits: `trainers.reward.same_tokens`; their scores are equal whatever the model).

    Returns per-prompt losses `(P,)` (0 for prompts with fewer than 2 ordered replies) and metrics
    `accuracy` (fraction of correctly ordered pairs), `kendall_tau`, `num_pairs`,
    `rewards/best`, `rewards/worst` (per prompt).
    """
    if rewards.dim() != 2:
        raise ValueError(f"ranking_loss: rewards must be (P, K) in rank order, got {tuple(rewards.shape)}")
    P, K = rewards.shape
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.bool()
    if mask.shape != rewards.shape:
        raise ValueError(f"ranking_loss: mask {tuple(mask.shape)} != rewards {tuple(rewards.shape)}")
    if K > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("ranking_loss: each mask row must be a prefix (valid replies first, padding last)")
    i, j = _pairs(K, rewards.device)  # (M,), (M,)
    valid = mask[:, i] & mask[:, j]  # (P, M)
    if ranks is not None:
        if ranks.shape != rewards.shape:
            raise ValueError(f"ranking_loss: ranks {tuple(ranks.shape)} != rewards {tuple(rewards.shape)}")
        valid = valid & (ranks[:, i] < ranks[:, j])  # a tied pair is no comparison
    if exclude is not None:
        valid = valid & ~exclude[:, i, j]
    valid = valid.to(rewards.dtype)
    ri, rj = rewards[:, i], rewards[:, j]  # (P, M)
    per_pair = -F.logsigmoid(ri - rj)
    if l2_coefficient:
        per_pair = per_pair + l2_coefficient * 0.5 * (ri ** 2 + rj ** 2)
    n_pairs = valid.sum(-1)  # (P,)
    losses = (per_pair * valid).sum(-1) / n_pairs.clamp(min=1.0)  # (P,)
    with torch.no_grad():
        correct = ((ri > rj).to(rewards.dtype) * valid).sum(-1) / n_pairs.clamp(min=1.0)
        n_valid = mask.sum(-1)
        last = (n_valid - 1).clamp(min=0)
        metrics = {
            "accuracy": correct,
            "kendall_tau": kendall_tau(rewards, mask, ranks, exclude=exclude),
            "num_pairs": n_pairs,
            "rewards/best": rewards[:, 0].detach(),
            "rewards/worst": rewards.detach().gather(1, last[:, None]).squeeze(1),
        }
    return LossOutput(losses=losses, metrics=metrics)


def kendall_tau(scores: Tensor, mask: Tensor | None = None, ranks: Tensor | None = None,
                exclude: Tensor | None = None) -> Tensor:
    """Kendall's tau-a between predicted scores and the true ranking, per row -> `(P,)`.

        tau = (concordant - discordant) / (number of pairs)

    The true order is the column order (column 0 is best) unless `ranks (P, K)` is given
    (smaller rank = better; tied true ranks are not counted as pairs). A pair (i better than j) is
    concordant if score_i > score_j, discordant if score_i < score_j; tied scores count as neither.
    Rows with fewer than 2 valid items give 0. `exclude (P, K, K)` (bool): pairs (i, j) that are no pair either
    (replies with the same tokens: `trainers.reward.same_tokens`).
    """
    if scores.dim() == 1:
        return kendall_tau(scores[None], None if mask is None else mask[None],
                           None if ranks is None else ranks[None], None if exclude is None else exclude[None])[0]
    P, K = scores.shape
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    if ranks is None:
        ranks = torch.arange(K, device=scores.device).expand(P, K)
    i, j = _pairs(K, scores.device)
    valid = mask[:, i].bool() & mask[:, j].bool()
    true_sign = torch.sign(ranks[:, j] - ranks[:, i]).to(scores.dtype)  # +1 when i is better than j
    pred_sign = torch.sign(scores[:, i] - scores[:, j]).to(scores.dtype)
    valid = valid & (true_sign != 0)
    if exclude is not None:
        valid = valid & ~exclude[:, i, j]
    v = valid.to(scores.dtype)
    n = v.sum(-1)
    return ((true_sign * pred_sign * v).sum(-1) / n.clamp(min=1.0)).detach()
