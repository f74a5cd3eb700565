"""Unpaired preference objectives (split from preference.py): KTO and APO-zero on unpaired data.

Each example is one completion y for a prompt x with a binary label: desirable or undesirable.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7),
as TRL's KTOTrainer:

    rho   = log pi_theta(y|x) - log pi_ref(y|x)
    z_ref = max(0, mean_j [log pi_theta(y'_j|x_j) - log pi_ref(y'_j|x_j)])   (detached)
    L(x, y) = lambda_D * (1 - sigma(beta (rho - z_ref)))    if y is desirable
              lambda_U * (1 - sigma(beta (z_ref - rho)))    if y is undesirable

z_ref (the "KL" term) is estimated from MISMATCHED pairs (x_j with a completion y'_j of another
prompt in the batch): compute it with `kto_kl_estimate` (the trainer gathers it across processes
first if it wants the global mean, as TRL does) and pass it in.

Metrics follow TRL's KTOTrainer: sums and counts, so a trainer can aggregate across micro-batches
and processes before dividing: rewards/chosen_sum, rewards/rejected_sum, logps/chosen_sum,
logps/rejected_sum, count/chosen, count/rejected, and kl.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import UNPAIRED_LOSSES, LossOutput

# the unpaired losses that read z_ref (`kl`): a trainer computes the mismatched pairs' KL estimate only for these (TRL's
# KTOTrainer `calculate_KL`, off for apo_zero_unpaired)
KL_LOSSES = frozenset({"kto"})


def kto_kl_estimate(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """z_ref = max(0, mean(policy_kl_logps - reference_kl_logps)), detached, scalar.

    Both `(M,)`: sequence log-probs of mismatched (prompt, completion) pairs. Under DDP, gather the
    unclamped mean across processes, average, then clamp (TRL's order).
    """
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def _check(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, where: str) -> None:
    if policy_logps.dim() != 1 or policy_logps.shape != reference_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(f"{where}: policy_logps, reference_logps and desirable must all be (B,), got "
                         f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(desirable.shape)}")


def _output(losses: Tensor, rewards: Tensor, policy_logps: Tensor, desirable: Tensor, kl: Tensor) -> LossOutput:
    d = desirable.to(rewards.dtype)
    u = 1.0 - d
    r, lp = rewards.detach(), policy_logps.detach()
    metrics = {
        "rewards/chosen_sum": (r * d).sum(),
        "rewards/rejected_sum": (r * u).sum(),
        "logps/chosen_sum": (lp * d).sum(),
        "logps/rejected_sum": (lp * u).sum(),
        "count/chosen": d.sum(),
        "count/rejected": u.sum(),
        "kl": torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().reshape(()),
    }
    return LossOutput(losses=losses, metrics=metrics)


@UNPAIRED_LOSSES.register("kto")
def kto_loss(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, kl: Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024): lambda_D (1 - sigma(beta(rho - z_ref))) or lambda_U (1 - sigma(beta(z_ref - rho))).

    Args:
        policy_logps, reference_logps: `(B,)` sequence log-probs of each example's completion.
        desirable: `(B,)` bool, True for desirable ("chosen") examples.
        kl: z_ref from `kto_kl_estimate` (scalar, treated as a constant).
        beta, desirable_weight (lambda_D), undesirable_weight (lambda_U): as TRL's KTOConfig.

    Returns per-example losses `(B,)` in input order (TRL concatenates chosen then rejected; the
    mean over the batch is the same). Rewards are beta * rho.
    """
    _check(policy_logps, reference_logps, desirable, "kto_loss")
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    rho = policy_logps - reference_logps  # (B,)
    des = desirable.bool()
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (rho - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rho)))
    losses = torch.where(des, chosen, rejected)
    return _output(losses, beta * rho, policy_logps, des, kl)


@UNPAIRED_LOSSES.register("apo_zero_unpaired")
def apo_zero_unpaired_loss(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor,
                           kl: Tensor | float = 0.0, beta: float = 0.1, desirable_weight: float = 1.0,
                           undesirable_weight: float = 1.0) -> LossOutput:
    """Unpaired APO-zero (D'Oosterlinck et al. 2024, Eq. 7; TRL KTO's `apo_zero_unpaired`).

        L = lambda_D (1 - sigma(beta rho)) if desirable,  lambda_U sigma(beta rho) if undesirable

    `kl` is not used by the loss (not in KL_LOSSES: KTOTrainer passes 0 and does not log it; TRL logs the 0).
    """
    _check(policy_logps, reference_logps, desirable, "apo_zero_unpaired_loss")
    rho = policy_logps - reference_logps
    des = desirable.bool()
    losses = torch.where(des, desirable_weight * (1 - torch.sigmoid(beta * rho)),
                         undesirable_weight * torch.sigmoid(beta * rho))
    return _output(losses, beta * rho, policy_logps, des, torch.as_tensor(kl))
