"""Online RL pieces: advantages, GAE, KL estimators, clipped policy-gradient and value losses, KL control.

Shapes: B sequences, T completion positions, `mask (B, T)` 1 on generated tokens (a contiguous
block per row; positions after the last token are treated as terminal). Token log-probs come from
`logprobs.chunked_lm_logprobs` / `selective_log_softmax`.

KL direction (Schulman 2020, "Approximating KL Divergence"): samples x ~ q = pi_theta (the policy
that generated them), target KL[q || p] = KL(pi_theta || pi_ref), r = p(x)/q(x) = pi_ref/pi_theta:

    k1 = -log r = log pi_theta - log pi_ref          unbiased, high variance, can be negative
    k2 = 0.5 (log r)^2                               biased, low variance, >= 0
    k3 = (r - 1) - log r                             unbiased, low variance, >= 0 (GRPO's choice)

(Note the sign of k1: it is -log r with Schulman's r, i.e. the policy-minus-reference log-ratio.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .registry import ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, LossOutput


def _masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
                  sum_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance, as TRL's `masked_whiten`).
    `sum_fn` is applied to the partial sums (count, sum, squared deviations): a sum over processes makes the
    statistics those of every process's entries.

    `shift_mean=False` keeps the mean (only rescales), as used for PPO rewards. Masked-out entries
    come back unchanged-scaled (callers multiply by the mask).
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    m = mask.to(x.dtype)
    total = sum_fn or (lambda t: t)
    n, s = total(torch.stack([m.sum(), (x * m).sum()])).unbind()
    mean = s / n.clamp(min=1.0)
    var = total((((x - mean) ** 2) * m).sum().reshape(1)).reshape(()) / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def clip_rewards(rewards: Tensor, clip: float | None) -> Tensor:
    """Clip scores to [-clip, clip] (no-op when clip is None)."""
    return rewards if clip is None else rewards.clamp(-clip, clip)


# -- advantages ---------------------------------------------------------------------------------

def _groups(rewards: Tensor, group_size: int, where: str) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{where}: rewards must be (B,) with B a multiple of group_size={group_size} "
                         f"(completions of one prompt are contiguous), got {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)  # (G, K)


def _valid(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(G, K) rewards, NaN = unscored -> (mask of scored rewards, their count (G, 1), their sum (G, 1))."""
    ok = ~torch.isnan(g)
    return ok, ok.sum(-1, keepdim=True).to(g.dtype), torch.where(ok, g, 0.0).sum(-1, keepdim=True)


@ADVANTAGES.register("grpo")
def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4,
                     std: Tensor | None = None) -> Tensor:
    """GRPO (Shao et al. 2024, "DeepSeekMath"): A_i = (r_i - mean_group) / (std_group + eps).

    Groups are contiguous blocks of `group_size` completions of one prompt; std is the unbiased
    sample std (torch.std, as TRL). `scale_by_std=False` gives r_i - mean_group (Dr. GRPO,
    Liu et al. 2025). `std` (a scalar) divides every group instead of its own std: TRL's
    scale_rewards="batch" passes `nan_std` of the whole step's rewards. NaN rewards (failed
    annotations) are left out of their group's mean and std and get advantage 0. Returns `(B,)`.
    """
    g = _groups(rewards, group_size, "group_advantages")
    ok, n, total = _valid(g)
    adv = torch.where(ok, g - total / n.clamp(min=1.0), 0.0)
    if scale_by_std and std is not None:
        adv = adv / (std + eps)
    elif scale_by_std:
        adv = adv / (((adv ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1.0)).sqrt() + eps)
    return adv.reshape(-1)


def nan_std(values: Tensor) -> Tensor:
    """The unbiased (Bessel) std of the non-NaN entries of `values`, as TRL's `nanstd`; 0 with fewer than two (TRL:
    NaN, whose advantages it then sets to 0; here the centred advantages of such a batch are 0 already)."""
    ok = ~torch.isnan(values)
    n = ok.sum().to(values.dtype)
    mean = torch.where(ok, values, 0.0).sum() / n.clamp(min=1.0)
    return (torch.where(ok, values - mean, 0.0) ** 2).sum().div((n - 1).clamp(min=1.0)).sqrt()


def decoupled_rewards(scores: Tensor, weights: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GDPO's reward (Liu et al. 2026, arXiv 2601.05242; TRL's multi_objective_aggregation="normalize_then_sum"):
    each reward function's scores standardised within each prompt's group, then weighted and summed:

        r_i = sum_f w_f (s_if - mean_group s_f) / (std_group s_f + eps)

    `scores (B, F)`, NaN = the function returned None; `weights (F,)`. As TRL 1.16: mean and unbiased std over the
    function's scored items of the group (its nanmean / nanstd), an unscored item adds 0 to the sum (its nansum; a
    function with one scored item in a group adds 0 too), an item no function scored is NaN. Returns `(B,)`; the
    advantage standardises it over the whole step (`batch_standardized`)."""
    if scores.dim() != 2 or scores.shape[0] % group_size:
        raise ValueError(f"decoupled_rewards: scores must be (B, F) with B a multiple of group_size={group_size} "
                         f"(completions of one prompt are contiguous), got {tuple(scores.shape)}")
    b, f = scores.shape
    g = scores.reshape(-1, group_size, f)  # (G, K, F)
    ok = ~torch.isnan(g)
    n = ok.sum(1, keepdim=True).to(g.dtype)  # (G, 1, F)
    dev = torch.where(ok, g - torch.where(ok, g, 0.0).sum(1, keepdim=True) / n.clamp(min=1.0), 0.0)
    std = ((dev ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1.0)).sqrt()
    out = (dev / (std + eps) * weights.to(g.dtype)).sum(-1).reshape(b)
    return torch.where(ok.reshape(b, f).any(-1), out, float("nan"))


def batch_standardized(values: Tensor, population: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """(v - mean) / (std + eps) with the mean and unbiased std of `population`'s non-NaN entries (default `values`;
    every process's values for a step-wide statistic), as TRL's normalize_then_sum ends; NaN entries get 0."""
    pop = values if population is None else population
    ok = ~torch.isnan(pop)
    mean = torch.where(ok, pop, 0.0).sum() / ok.sum().clamp(min=1)
    out = (values - mean.to(values.device)) / (nan_std(pop).to(values.device) + eps)
    return torch.nan_to_num(out, nan=0.0)


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): A_i = r_i - 1/(K-1) sum_{j != i} r_j.

    Equivalently K/(K-1) (r_i - mean_group). Needs group_size >= 2. NaN rewards (failed
    annotations) are left out: the baseline is the mean of the group's OTHER scored rewards (K the
    scored count), and a NaN reward, or one without another scored reward, gets advantage 0.
    Returns `(B,)`.
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    g = _groups(rewards, group_size, "rloo_advantages")
    ok, n, total = _valid(g)
    baseline = (total - torch.where(ok, g, 0.0)) / (n - 1).clamp(min=1.0)
    return torch.where(ok & (n > 1), g - baseline, 0.0).reshape(-1)


@ADVANTAGES.register("gae")
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

        delta_t = r_t + gamma V_{t+1} - V_t          (V_{t+1} = 0 after the last valid token)
        A_t     = delta_t + gamma lam A_{t+1}
        returns = A + V

    All `(B, T)`; returns (advantages, returns), zero where mask is 0. Not whitened (see
    `masked_whiten`). Computed without gradient.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(f"gae: rewards, values, mask must all be (B, T), got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    with torch.no_grad():
        m = mask.to(values.dtype)
        v = values * m
        r = rewards * m
        T = rewards.shape[1]
        adv = torch.zeros_like(v)
        last = torch.zeros_like(v[:, 0])
        for t in reversed(range(T)):
            next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
            next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
            delta = r[:, t] + gamma * next_v - v[:, t]
            last = (delta + gamma * lam * last * next_m) * m[:, t]
            adv[:, t] = last
        return adv, (adv + v) * m


# -- KL estimators ------------------------------------------------------------------------------

@KL_ESTIMATORS.register("k1")
def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = -log r = log pi_theta - log pi_ref (Schulman 2020), per token."""
    return logps - ref_logps


@KL_ESTIMATORS.register("k2")
def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = 0.5 (log r)^2 = 0.5 (log pi_ref - log pi_theta)^2 (Schulman 2020), per token."""
    return 0.5 * (ref_logps - logps) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (r - 1) - log r, r = pi_ref / pi_theta (Schulman 2020; GRPO's per-token KL)."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


def per_token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor | None, mask: Tensor,
                      kl_coef: float, kl_estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """PPO-RLHF token rewards (Ziegler et al. 2019): -kl_coef * KL_t, plus the score on the last token.

    scores `(B,)`; logps, ref_logps, mask `(B, T)`; ref_logps None (no reference) only with kl_coef 0, the KL
    then 0. Returns (rewards (B, T), kl (B, T)), detached.
    """
    if ref_logps is None and kl_coef:
        raise ValueError("per_token_rewards: kl_coef > 0 needs ref_logps (reference token log-probs)")
    with torch.no_grad():
        kl = (torch.zeros_like(logps) if ref_logps is None else KL_ESTIMATORS[kl_estimator](logps, ref_logps)) * mask
        rewards = -kl_coef * kl
        last = (mask.long().cumsum(-1).argmax(-1))  # index of the last valid token, (B,)
        has = mask.bool().any(-1)
        rewards[torch.arange(rewards.shape[0], device=rewards.device)[has], last[has]] += scores[has]
        return rewards, kl


# -- losses -------------------------------------------------------------------------------------

def _aggregate(per_token: Tensor, mask: Tensor, aggregation: str) -> tuple[Tensor, Tensor]:
    m = mask.to(per_token.dtype)
    n = m.sum(-1)
    if aggregation == "sequence_mean":
        return (per_token * m).sum(-1) / n.clamp(min=1.0), n
    if aggregation in ("token_sum", "max_length_mean", "sequence_sum"):
        return (per_token * m).sum(-1), n
    raise ValueError(f"unknown aggregation {aggregation!r}; use 'sequence_mean' (GRPO: mean over each "
                     "sequence's tokens), 'token_sum' (DAPO: reduce_loss(..., normalizer=total tokens)) or "
                     "'max_length_mean' (Dr. GRPO: reduce_loss(..., normalizer=sequences x max_new_tokens)) or "
                     "'sequence_sum' (LUSPO: reduce_loss(..., normalizer=sequences))")


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float, values: Tensor | None = None) -> Tensor:
    """(B, T) bool: the loss tokens whose entropy is at least the (1 - quantile) quantile (torch.quantile's linear
    interpolation) of `values`, by default the entropies of `mask`'s tokens (TRL 1.16's `get_high_entropy_mask`,
    "Beyond the 80/20 Rule": `values` is every process's loss-token entropies of the forward). No values: none."""
    with torch.no_grad():
        values = entropy[mask.bool()] if values is None else values
        if values.numel() == 0:
            return torch.zeros_like(mask, dtype=torch.bool)
        # compared in float32, as the quantile is taken: a float64 / bf16 entropy equal to it is kept, not rounded off
        return (entropy.float() >= torch.quantile(values.float(), 1.0 - quantile)) & mask.bool()


def _importance_ratio(log_ratio: Tensor, mask: Tensor, importance_sampling: str) -> Tensor:
    """exp(log pi - log pi_old) per token (B, T), or per sequence (B, 1): exp of the mean over its loss tokens
    (GSPO, Zheng et al. 2025; TRL's importance_sampling_level="sequence"; the gradient flows through the mean)."""
    if importance_sampling == "token":
        return torch.exp(log_ratio)
    if importance_sampling == "sequence":
        m = mask.to(log_ratio.dtype)
        return torch.exp((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
    raise ValueError(f"unknown importance_sampling {importance_sampling!r}; use 'token' (one ratio per token, PPO / "
                     "GRPO) or 'sequence' (GSPO: one ratio per sequence)")


def _surrogate(ratio: Tensor, adv: Tensor, logps: Tensor, clip_eps: float, eps_high: float, dual_clip: float | None,
               cispo_max: float | None) -> Tensor:
    """The policy objective per token (to maximise): PPO's clipped min (with the dual clip), or CISPO's
    sg(min(ratio, cispo_max)) A log pi (MiniMax-M1; TRL 1.16's loss_type cispo, its epsilon_high the cap)."""
    if cispo_max is not None:
        return ratio.clamp(max=cispo_max).detach() * adv * logps
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + eps_high) * adv)
    if dual_clip is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    return obj


@POLICY_LOSSES.register("clipped_pg")
def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                        clip_eps: float = 0.2, clip_eps_high: float | None = None,
                        dual_clip: float | None = None, ref_logps: Tensor | None = None,
                        kl_coef: float = 0.0, kl_estimator: str = "k3", entropy: Tensor | None = None,
                        entropy_coef: float = 0.0, aggregation: str = "sequence_mean",
                        importance_sampling: str = "token", token_keep: Tensor | None = None,
                        cispo_max: float | None = None) -> LossOutput:
    """PPO clipped surrogate (Schulman et al. 2017), optional dual clip (Ye et al. 2020), KL and entropy.

        ratio_t = exp(log pi_theta - log pi_old)
                  importance_sampling "sequence" (GSPO): exp(mean over the sequence's mask tokens of that log-ratio)
        obj_t   = min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps_high) A_t)
        obj_t   = max(obj_t, c A_t)      if dual_clip c (> 1) and A_t < 0
        obj_t   = sg(min(ratio_t, cispo_max)) A_t log pi_theta      if cispo_max (CISPO: no clip, dual clip)
        loss_t  = -obj_t + kl_coef * KL_t(pi_theta || pi_ref) - entropy_coef * H_t

    Args: logps, old_logps, mask `(B, T)`; advantages `(B, T)` or `(B,)` (broadcast over tokens, as
    GRPO/RLOO); ref_logps `(B, T)` when kl_coef > 0; entropy `(B, T)` when entropy_coef > 0.
    aggregation: 'sequence_mean' -> losses_i = mean over the sequence's tokens (GRPO);
    'token_sum' -> per-sequence sums with `num_tokens` (divide by the step's total tokens, DAPO);
    'max_length_mean' -> per-sequence sums (divide by sequences x max_new_tokens, Dr. GRPO);
    'sequence_sum' -> per-sequence sums (divide by sequences: LUSPO, TRL's luspo, with the sequence ratio).
    token_keep `(B, T)` bool: the tokens whose policy and entropy terms count (`high_entropy_mask`); the KL term
    and the sequence ratio's mean keep `mask`'s tokens (TRL 1.16's top_entropy_quantile).
    Metrics (scalars over valid tokens): clip_ratio/region_mean (TRL GRPO's name: the share of tokens whose
    ratio is clipped in the direction of their advantage; CISPO: ratio > cispo_max with A > 0, TRL's
    cispo_clip_ratio), approx_kl (0.5 E[(log ratio)^2]),
    ratio/mean, kl (when ref_logps given), entropy (when given).
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape or logps.dim() != 2:
        raise ValueError(f"clipped_policy_loss: logps, old_logps, mask must be (B, T), got {tuple(logps.shape)}, "
                         f"{tuple(old_logps.shape)}, {tuple(mask.shape)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"clipped_policy_loss: dual_clip must be > 1 (Ye et al. use 3), got {dual_clip}")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, T) or (B, 1)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logps - old_logps.detach()
    ratio = _importance_ratio(log_ratio, mask, importance_sampling)  # (B, T), or (B, 1) per sequence
    obj = _surrogate(ratio, adv, logps, clip_eps, eps_high, dual_clip, cispo_max)
    per_token = -obj.expand_as(logps) if token_keep is None else torch.where(token_keep, -obj, 0.0)
    metrics: dict[str, Tensor] = {}
    if ref_logps is not None:
        kl = KL_ESTIMATORS[kl_estimator](logps, ref_logps.detach())
        if kl_coef:
            per_token = per_token + kl_coef * kl
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    elif kl_coef:
        raise ValueError("clipped_policy_loss: kl_coef > 0 needs ref_logps (reference token log-probs)")
    if entropy is not None:
        if entropy_coef:
            per_token = per_token - entropy_coef * (entropy if token_keep is None else entropy * token_keep)
        metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    elif entropy_coef:
        raise ValueError("clipped_policy_loss: entropy_coef > 0 needs entropy (B, T), e.g. from "
                         "chunked_lm_logprobs(..., return_stats=True)")
    losses, n = _aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        ratio = ratio.expand_as(logps)
        a = adv.expand_as(ratio)
        clipped = ((ratio > cispo_max) & (a > 0) if cispo_max is not None else  # TRL's cispo_clip_ratio
                   ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0)))
        metrics["clip_ratio/region_mean"] = _masked_mean(clipped.to(ratio.dtype), mask)
        metrics["approx_kl"] = _masked_mean(0.5 * log_ratio ** 2, mask)
        metrics["ratio/mean"] = _masked_mean(ratio, mask)
    return LossOutput(losses=losses, metrics=metrics, num_tokens=n if aggregation == "token_sum" else None)


@POLICY_LOSSES.register("value")
def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range: float | None = 0.2, aggregation: str = "sequence_mean") -> LossOutput:
    """Clipped value loss (PPO, as OpenAI baselines / TRL): 0.5 max((V - R)^2, (V_clip - R)^2).

        V_clip = old_V + clip(V - old_V, -c, c)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)       (0.5 (V - R)^2 without clipping)

    All `(B, T)`. Metrics: vf_clip_fraction, value/mean, explained_variance.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError("value_loss: values, old_values, returns, mask must share one (B, T) shape")
    returns = returns.detach()
    l1 = (values - returns) ** 2
    if clip_range is not None:
        v_clip = old_values.detach() + (values - old_values.detach()).clamp(-clip_range, clip_range)
        l2 = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(l1, l2)
    else:
        l2, per_token = l1, 0.5 * l1
    losses, n = _aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        m = mask.to(values.dtype)
        nn_ = m.sum().clamp(min=1.0)
        mean_r = (returns * m).sum() / nn_
        var_ret = (((returns - mean_r) ** 2) * m).sum() / nn_
        res = returns - values
        mean_res = (res * m).sum() / nn_
        var_res = (((res - mean_res) ** 2) * m).sum() / nn_
        metrics = {
            "vf_clip_fraction": _masked_mean((l2 > l1).to(values.dtype), mask),
            "value/mean": _masked_mean(values.detach(), mask),
            "explained_variance": 1 - var_res / var_ret.clamp(min=1e-8),
        }
    return LossOutput(losses=losses, metrics=metrics, num_tokens=n if aggregation == "token_sum" else None)


# -- KL coefficient control (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences") --------

class FixedKLController:
    """Constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive beta (Ziegler et al. 2019, Sec. 2.2):

        e = clip(KL / KL_target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0 or init_kl_coef <= 0:
            raise ValueError(f"AdaptiveKLController: init_kl_coef ({init_kl_coef}; the updates multiply it, so 0 stays "
                             f"0), target ({target}) and horizon ({horizon}) must be > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value
