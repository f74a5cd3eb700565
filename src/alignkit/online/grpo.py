"""GRPO and RLOO: group-relative advantages, a clipped policy-gradient loss, KL to the reference.

Shao et al. 2024 ("DeepSeekMath", GRPO) and Ahmadian et al. 2024 ("Back to Basics", RLOO). For each prompt,
K samples y_1..y_K with rewards r_1..r_K (normalised / clipped by the base loop):

    GRPO:  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)          (`scale_by_std=False`: Dr. GRPO)
           `std_scope="batch"`: std over the whole step's rewards, every process's (TRL's scale_rewards="batch")
    RLOO:  A_i = r_i - 1/(K-1) sum_{j != i} r_j
    GDPO:  `multi_objective_aggregation="normalize_then_sum"` (TRL's, arXiv 2601.05242), GRPO only: with scores s_if
           of several functions f (weights w_f), r_i = sum_f w_f (s_if - mean_group s_f) / (std_group s_f + eps),
           then A_i = (r_i - mean_step r) / (std_step r + eps), over every process's items (`decoupled_rewards`)

Every token of y_i gets A_i. With ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t) (pi_old: the policy that
sampled, frozen for the step's `epochs_per_step` passes over it):

    loss_t = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps_high) A) + beta KL_t(pi_theta || pi_ref)
    loss_i = mean_t loss_t over y_i's tokens ("sequence_mean", GRPO), then sum_i w_i loss_i / sum_i w_i
    minus entropy_coef x the mean entropy over the loss tokens (weighted by w_i) whatever the aggregation, as TRL 1.16's
    entropy bonus (`entropy_bonus`; over the tokens top_entropy_quantile keeps, when it does; with several forwards an
    update, each forward's mean by its share of the items, TRL's 1 / accumulation steps)
    "token_sum" (DAPO): sum_i w_i sum_t loss_t / sum_i w_i |y_i|
    "max_length_mean" (Dr. GRPO, TRL's dr_grpo): sum_i w_i sum_t loss_t / (sum_i w_i x sampling.max_new_tokens), the
    constant of TRL's per_token_loss.size(0) x max_completion_length (the local micro-batch's sequences: under DDP
    the gradient average makes it the global batch's, as here)
    "sequence_sum" (LUSPO, TRL's luspo): sum_i w_i sum_t loss_t / sum_i w_i: with the sequence ratio, each sequence's
    GSPO term times its length |y_i| (TRL: (per_token_loss x mask).sum(-1).mean())

`importance_sampling="sequence"` (GSPO, TRL's importance_sampling_level): one ratio per sequence,
s_i = exp(mean_t (log pi_theta - log pi_old) over y_i's loss tokens), clipped as ratio_t, for each of its tokens; the
gradient flows through the mean (pi_old detached), so with one update (s_i = 1) it gives token's update exactly
(refused then: `alignkit.settings.online_checks.check_clip_acts`). TRL's `delta` (min(ratio, delta) before the min) is
`dual_clip`: for delta > 1 + eps_high both bound negative advantages' loss at delta x A, with the same gradient.
`cispo_max` (CISPO, MiniMax-M1; TRL's loss_type cispo with epsilon_high = cispo_max): loss_t = -sg(min(ratio_t,
cispo_max)) A log pi_theta(a_t), no clip (clip_eps, clip_eps_high, dual_clip refused beside it); TRL normalises it
as dapo ("token_sum"); with one update and cispo_max >= 1 its gradient is the clipped loss's (refused then).
`top_entropy_quantile` rho < 1 (TRL's, "Beyond the 80/20 Rule"): the policy and entropy terms keep only the loss
tokens whose entropy is >= the (1 - rho) quantile of the forward's loss-token entropies over every process (KL and
the normaliser keep all); entropies are computed for it only then.

`mask_truncated_completions` (TRL's, DAPO's): a sample cut at sampling.max_new_tokens (finish reason "length")
gets no loss term (no policy, KL or entropy tokens) but keeps its reward in its group's statistics, as TRL 1.16
does; with "sequence_mean" it still counts in the normaliser (sum_i w_i, TRL's grpo: a zero-loss sequence), with
"token_sum" its tokens do not (TRL's dapo / bnpo).

`kl_in_reward` (TRL 1.16's RLOO, Ahmadian et al.): the KL is a reward penalty instead of a loss term,
r_i <- r_i - beta sum_t KL_t(pi_old || pi_ref) over y_i's tokens before the advantage (TRL's: k1, summed over the
loss tokens), and the loss has no KL term.

KL_t is the k2 or k3 estimator (`config.kl_estimator`, k3 by default as in GRPO; k1 with kl_coef > 0 is refused:
as a loss term its gradient beta grad log pi has mean 0 over the policy's samples); beta is the KL
controller's value (fixed, or adaptive towards `kl_target`). The maths lives in
`alignkit.losses.policy` (`group_advantages`, `rloo_advantages`, `clipped_policy_loss`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.losses import (ADVANTAGES, KL_ESTIMATORS, batch_standardized, clipped_policy_loss, decoupled_rewards,
                             high_entropy_mask, nan_std, reduce_loss)
from alignkit.online.rollout import select, sequence_sums
from alignkit.online.trainer import REWARD_SCALE, OnlineConfig, OnlineTrainer, Rollout

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig(OnlineConfig):
    advantage: str = "grpo"  # "grpo" | "rloo"
    scale_by_std: bool = True  # GRPO only
    std_scope: str = "group"  # what scale_by_std divides by: each group's std, or the whole step's ("batch")
    mask_truncated_completions: bool = False  # samples cut at max_new_tokens get no loss (TRL's, DAPO's)
    kl_in_reward: bool = False  # the KL as a reward penalty (r - kl_coef x summed KL), not a loss term (TRL's RLOO)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    aggregation: str = "sequence_mean"  # or "token_sum" (weighted tokens), "max_length_mean" (Dr. GRPO), "sequence_sum"
    importance_sampling: str = "token"  # or "sequence" (GSPO: one ratio per sequence)
    top_entropy_quantile: float = 1.0  # < 1: only the loss tokens of the top quantile by entropy have policy terms
    cispo_max: float | None = None  # set: CISPO's loss, sg(min(ratio, cispo_max)) A log pi (TRL's cispo)
    multi_objective_aggregation: str = "sum_then_normalize"  # or "normalize_then_sum" (GDPO: `decoupled_advantages`)

    @property
    def compares_samples(self) -> str:  # group advantages: >= 2 sampled responses per prompt (OnlineConfig)
        return "RLOO (a leave-one-out baseline per prompt)" if self.advantage == "rloo" else "GRPO"

    def __post_init__(self, bounds_checked: bool = False) -> None:
        if self.importance_sampling not in ("token", "sequence"):
            raise ValueError(f"importance_sampling must be 'token' (a ratio per token) or 'sequence' (GSPO: one per "
                             f"sequence, TRL's importance_sampling_level), got {self.importance_sampling!r}")
        if self.aggregation not in ("sequence_mean", "token_sum", "max_length_mean", "sequence_sum"):
            raise ValueError(f"aggregation must be 'sequence_mean' (TRL's grpo), 'token_sum' (dapo / bnpo), "
                             f"'max_length_mean' (dr_grpo) or 'sequence_sum' (luspo), got {self.aggregation!r}")
        unread = [k for k, off in (("clip_eps", 0.2), ("clip_eps_high", None), ("dual_clip", None))
                  if getattr(self, k) != off]
        if self.cispo_max is not None and unread:
            raise ValueError(f"{unread[0]}={getattr(self, unread[0])!r} shapes the clipped loss, and cispo_max="
                             f"{self.cispo_max!r} replaces it with CISPO's (the weight min(ratio, cispo_max), no "
                             f"clip), so it would be ignored; remove {unread[0]} or cispo_max (TRL's epsilon_high with "
                             "loss_type cispo is cispo_max)")
        super().__post_init__(bounds_checked)  # after the names: its clip check reads importance_sampling
        self.check_multi_objective()
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"GRPO advantage must be 'grpo' or 'rloo', got {self.advantage!r}")
        if self.advantage == "rloo" and not self.scale_by_std:
            raise ValueError("scale_by_std=False (Dr. GRPO) is read only by GRPO's advantage; RLOO's leave-one-out "
                             "baseline never divides by the std, so it would be ignored; remove it")
        if self.std_scope not in ("group", "batch"):
            raise ValueError(f"std_scope must be 'group' (each prompt's reward std, TRL's scale_rewards=group) or "
                             f"'batch' (the whole step's, TRL's scale_rewards=batch), got {self.std_scope!r}")
        if self.std_scope != "group" and (self.advantage == "rloo" or not self.scale_by_std):
            why = ("RLOO's leave-one-out baseline never divides by a std" if self.advantage == "rloo" else
                   "scale_by_std=False (Dr. GRPO) divides by no std")
            raise ValueError(f"std_scope={self.std_scope!r} says which std GRPO's advantage divides by, and {why}, "
                             "so it would be ignored; remove std_scope" + ("" if self.advantage == "rloo" else
                                                                           " or set scale_by_std=True"))
        if self.kl_in_reward and self.kl_coef == 0:
            raise ValueError("kl_in_reward=True subtracts kl_coef x each sample's summed KL from its reward, and "
                             "kl_coef is 0, so it would be ignored; set kl_coef > 0 (TRL's beta) or remove "
                             "kl_in_reward")
        if self.kl_estimator == "k1" and (self.kl_coef != 0 or self.kl_target is not None) and not self.kl_in_reward:
            raise ValueError("kl_estimator='k1' as a loss term does not pull the policy toward the reference: its "
                             "gradient is kl_coef x grad log pi(sampled token), whose mean over the policy's own "
                             "samples is 0, so kl_coef would act only as noise (and, with sequence_mean, as a length "
                             "bonus); use k3 (GRPO's, TRL's) or k2, or kl_coef 0, or kl_in_reward=True (k1 in the "
                             "rewards, as PPO and TRL's RLOO)")
        if self.advantage == "grpo" and self.scale_by_std and self.reward_normalization != "none" \
                and self.reward_clip is None and not self.kl_in_reward \
                and not (self.std_scope == "batch" and self.reward_normalization == "group"):
            how = ("standardises each prompt's rewards again ((r - group mean) / group std, scale_by_std=True): a "
                   "shift and scale of the rewards, per group or per step," if self.std_scope == "group" else
                   "centres each prompt's rewards and divides them by the step's std ((r - group mean) / batch std, "
                   "std_scope='batch'): a shift and scale of the rewards per step")
            raise ValueError(f"reward_normalization={self.reward_normalization!r} is undone by GRPO's advantage, which "
                             f"{how} cancels there, so it would be ignored; remove it, or set reward_clip (clipping "
                             "the normalised rewards acts), or scale_by_std=False")


    def check_multi_objective(self) -> None:
        """normalize_then_sum (GDPO) is GRPO's advantage of its own (`GRPOTrainer.decoupled_advantages`): it reads
        the raw scores of each function and ends with the step-wide standardisation, so a key that acts on the
        combined reward or on GRPO's usual std would be ignored."""
        if self.multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError(f"multi_objective_aggregation must be 'sum_then_normalize' (the weighted sum of the "
                             f"functions' scores, then the advantage) or 'normalize_then_sum' (GDPO), got "
                             f"{self.multi_objective_aggregation!r}")
        if self.multi_objective_aggregation == "sum_then_normalize":
            return
        if self.advantage == "rloo":
            raise ValueError("multi_objective_aggregation='normalize_then_sum' is GRPO's advantage (GDPO), and RLOO's "
                             "leave-one-out advantage normalises no function's scores (TRL's RLOO has no such key), "
                             "so it would be ignored; use the grpo command or remove it")
        ignored = {"scale_by_std": (not self.scale_by_std, "False: normalize_then_sum always divides by the stds"),
                   "std_scope": (self.std_scope != "group", f"{self.std_scope!r}: normalize_then_sum always ends "
                                 "with the step's std (TRL ignores scale_rewards there too)"),
                   "reward_normalization": (self.reward_normalization != "none", f"{self.reward_normalization!r}: "
                                            "normalize_then_sum reads each function's raw scores"),
                   "reward_clip": (self.reward_clip is not None, f"{self.reward_clip!r}: normalize_then_sum reads "
                                   "each function's raw scores"),
                   "kl_in_reward": (self.kl_in_reward, "True: normalize_then_sum sums normalised scores, with no "
                                    "reward for the KL penalty to act on")}
        for key, (bad, why) in ignored.items():
            if bad:
                raise ValueError(f"{key}={why}, so it would be ignored with multi_objective_aggregation="
                                 "'normalize_then_sum'; remove one of them")


def warn_sequence_ratio_sums(config: GRPOConfig) -> None:
    """GSPO's objective is a mean of sequence terms (one ratio per sequence); a token-sum normaliser (token_sum,
    max_length_mean: TRL's dapo / bnpo / cispo, dr_grpo) counts each sequence's term once per token, weighting it by its
    length. TRL 1.16 warns at its trainer's start; so does this (once a run: `GRPOTrainer.check_inputs`)."""
    if config.aggregation == "sequence_sum" and config.importance_sampling != "sequence":
        logger.warning("method.aggregation='sequence_sum' (LUSPO) scales GSPO's sequence terms by their lengths, and "
                       "method.importance_sampling is 'token', so each sequence's token terms are summed without a "
                       "normaliser; set method.importance_sampling=sequence for the LUSPO paper's objective (TRL 1.16 "
                       "warns the same for its loss_type luspo)")
    if config.importance_sampling == "sequence" and config.aggregation in ("token_sum", "max_length_mean"):
        logger.warning("method.importance_sampling='sequence' (GSPO: one ratio per sequence) with method.aggregation="
                       "%r sums per-token terms, so each sequence's term is weighted by its length instead of GSPO's "
                       "mean over sequences; set method.aggregation=sequence_mean for the GSPO paper's objective (TRL "
                       "1.16 warns the same for its loss_type dapo / bnpo / dr_grpo / cispo)", config.aggregation)


@dataclass
class RLOOConfig(GRPOConfig):
    advantage: str = "rloo"


@dataclass
class PolicyBatch:
    rollout: Rollout
    advantages: Tensor  # (B,) or (B, T-1)
    keep: Tensor | None = None  # (B,) bool: samples with a loss term (mask_truncated_completions); None: all


class GRPOTrainer(OnlineTrainer):
    """GRPO / RLOO for every adapter kind; see the module docstring."""

    config_class = GRPOConfig

    def reuses_training_pass(self) -> bool:
        """One update per step over all of it (one epoch, one minibatch, one micro-batch): pi_old IS the policy
        of the training forward, so the rollout's separate no-grad pass is skipped."""
        c: GRPOConfig = self.config
        return (c.epochs_per_step == 1 and c.mini_batch_size is None and c.gradient_accumulation_steps == 1
                and not self.needs_hidden and not c.kl_in_reward)  # kl_in_reward: the advantages read pi_old

    def advantages(self, rollout: Rollout) -> Tensor:
        """Group advantages over each prompt's scored samples: a failed annotation (NaN score; weight 0) is left out
        of its group's statistics (its filled-in reward, the group's mean, would shrink GRPO's std and put each
        sample's own reward into RLOO's leave-one-out baseline) and gets advantage 0."""
        c: GRPOConfig = self.config
        k = c.sampling.num_samples
        if c.multi_objective_aggregation == "normalize_then_sum":
            return self.decoupled_advantages(rollout)
        rewards = torch.where(torch.isnan(rollout.scores), float("nan"), rollout.rewards)
        if c.kl_in_reward and rollout.ref_logps is not None:  # r - beta sum_t KL_t(pi_old || pi_ref), TRL's RLOO
            rewards = rewards - self.kl_ctl.value * self.reward_kl(rollout)
        if c.advantage == "grpo":  # std_scope "batch": the std of every process's scored rewards (TRL's, gathered)
            std = nan_std(self.gather(rewards)).to(rewards.device) if c.std_scope == "batch" else None
            return ADVANTAGES["grpo"](rewards, k, scale_by_std=c.scale_by_std, std=std)
        return ADVANTAGES["rloo"](rewards, k)

    def decoupled_advantages(self, rollout: Rollout) -> Tensor:
        """GDPO (TRL's normalize_then_sum): `decoupled_rewards` of each function's own scores (a reward model or
        judge: its one score), standardised over every process's scored items of the step (`batch_standardized`);
        an item no function scored gets 0. Records which functions ever varied within a group (`warn_whole_run`)."""
        scores, rewards = self.decoupled(rollout)
        k = self.config.sampling.num_samples
        g = scores.reshape(-1, k, scores.shape[1])
        ok = ~torch.isnan(g)
        varied = (torch.where(ok, g, -torch.inf).amax(1) > torch.where(ok, g, torch.inf).amin(1)).any(0)  # (F,)
        seen = self.gather(varied.float().cpu()).view(-1, scores.shape[1]).amax(0) > 0  # every process's groups
        self._varied = seen if getattr(self, "_varied", None) is None else self._varied | seen
        return batch_standardized(rewards, self.gather(rewards.cpu()))

    def decoupled(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """((B, F) each function's scores (a reward model or judge: its one score), (B,) `decoupled_rewards`)."""
        r = rollout
        scores = r.per_function if r.per_function is not None else r.scores[:, None]
        weights = torch.tensor(getattr(self.annotator, "weights", None) or [1.0], dtype=scores.dtype)
        return scores, decoupled_rewards(scores, weights.to(scores.device), self.config.sampling.num_samples)

    def score(self, samples: list, policy_pass: bool | None = None) -> Rollout:
        """The base rollout; under normalize_then_sum a step has no reward signal when every process's
        `decoupled_rewards` are 0 (no function of nonzero weight varied within a group, or they cancelled), not
        when the weighted sums are flat: those can be flat while the normalised functions are not (a stall stopped
        such a run), or vary while they cancel (`no_signal`)."""
        rollout = super().score(samples, policy_pass)
        if self.config.multi_objective_aggregation == "normalize_then_sum":
            self._step_flat = self.decoupled_flat(rollout)
        return rollout

    def decoupled_flat(self, rollout: Rollout) -> bool:
        """Whether every process's `decoupled_rewards` of the step are 0 against the size of their weighted parts
        (a residue of 1e-3 of it or less: what the eps of the stds leaves of functions that cancel, which the
        step-wide standardisation would blow up to advantages of order 1, as TRL's); NaN, unscored: left out."""
        scores, r = self.decoupled(rollout)
        weights = getattr(self.annotator, "weights", None) or [1.0]
        one = torch.ones(1, dtype=scores.dtype, device=scores.device)
        k = self.config.sampling.num_samples
        parts = sum(abs(w) * torch.nan_to_num(decoupled_rewards(scores[:, f:f + 1], one, k), nan=0.0).abs()
                    for f, w in enumerate(weights))
        both = torch.nan_to_num(self.gather(torch.stack([r, parts]).T.cpu()), nan=0.0)  # (W B, 2)
        return bool((both[:, 0].abs() <= 1e-3 * both[:, 1] + 1e-8).all())

    def check_inputs(self, *args: Any, **kwargs: Any) -> None:
        """The base checks, and normalize_then_sum with a failure policy that fills a combined default score (it
        has no per-function part to normalise) is a ValueError before anything is written."""
        super().check_inputs(*args, **kwargs)
        warn_sequence_ratio_sums(self.config)
        if self.config.multi_objective_aggregation == "normalize_then_sum" and \
                getattr(self.annotator, "on_failure", "skip") != "skip":
            raise ValueError(f"annotator.on_failure={self.annotator.on_failure!r} fills one combined default_score "
                             "for an unscored item, and method.multi_objective_aggregation='normalize_then_sum' "
                             "normalises each function's own scores, so it would be ignored; use on_failure 'skip' "
                             "(an item no function scored gets advantage 0, as in TRL)")

    def reward_kl(self, rollout: Rollout) -> Tensor:
        """(B,) each sample's KL to the reference summed over its loss tokens (`kl_in_reward`): the estimator of
        pi_old's sampled tokens (TRL's RLOO: k1); a sample masked by mask_truncated_completions has none (TRL's)."""
        mask = rollout.mask
        if self.config.mask_truncated_completions:
            ended = torch.tensor([s.finish_reason != "length" for s in rollout.samples], device=mask.device)
            mask = mask & ended[:, None]
        return sequence_sums(KL_ESTIMATORS[self.config.kl_estimator](rollout.old_logps, rollout.ref_logps), mask)

    @classmethod
    def loss_scale(cls, config: GRPOConfig) -> str | None:
        """The KL and entropy coefficients where they act, and the rewards' scale where the advantages keep it (RLOO's
        leave-one-out differences, GRPO with scale_by_std=False: not divided by the group's std)."""
        scales = cls.penalty_scales(config)
        if config.advantage == "rloo" or not config.scale_by_std:
            scales.append(REWARD_SCALE)
        return ", ".join(scales) or None

    def build_batch(self, rollout: Rollout) -> PolicyBatch:
        keep = None
        if self.config.mask_truncated_completions:  # cut at max_new_tokens: no loss term (`policy_loss`)
            keep = torch.tensor([s.finish_reason != "length" for s in rollout.samples], device=rollout.mask.device)
            if rollout.metrics.get("completions/clipped_ratio") == 1.0 and not getattr(self, "_warned_masked", False):
                self._warned_masked = True  # every process's samples (the metric is global); the count: at the end
                logger.warning("step %d: every one of the step's completions reached sampling.max_new_tokens (%d) "
                               "without an end token, and method.mask_truncated_completions gives those no loss: "
                               "this step's loss is 0 and its update has no gradient (the end of the run counts such "
                               "steps); raise sampling.max_new_tokens", getattr(self, "_step", 0) + 1,
                               self.config.sampling.max_new_tokens)
        return PolicyBatch(rollout, self.advantages(rollout), keep)

    def warn_whole_run(self, start: int) -> None:
        """The base class's end-of-run warnings, and with mask_truncated_completions how many steps had every
        completion cut (no loss at all: `build_batch`)."""
        super().warn_whole_run(start)
        ran = self.config.steps - self._counted_from
        varied = getattr(self, "_varied", None)
        if varied is not None and not bool(varied.all()):
            names = getattr(self.annotator, "metric_names", None) or [self.annotator.source()]
            flat = [n for n, v in zip(names, varied.tolist()) if not v]
            logger.warning("reward function(s) %s scored every prompt's samples alike at every step of this run "
                           "(since its start or resume): under method.multi_objective_aggregation=normalize_then_sum "
                           "their normalised contribution was 0 throughout; check them on a few responses, or remove "
                           "them", ", ".join(flat))
        if self.config.mask_truncated_completions and self._clipped_steps > 0 and self.config.steps - start > 0:
            logger.warning("%d of this run's %d step(s)%s had every completion cut at sampling.max_new_tokens (%d), "
                           "and method.mask_truncated_completions gave those no loss: their updates had no gradient; "
                           "raise sampling.max_new_tokens", self._clipped_steps, ran,
                           "" if self._counted_from == 0 else f" since its resume after step {self._counted_from}",
                           self.config.sampling.max_new_tokens)

    def normalizer(self, pb: PolicyBatch, idx: Tensor) -> Tensor:
        """What samples `idx` add to their minibatch's normaliser: weights ("sequence_mean"), or each sample's tokens
        times its weight ("token_sum"): both are weighted means (sum w loss / sum w, of sequences or of tokens), as
        PPO's and online DPO's, so a weight scales a sample against the others and uniform weights change nothing."""
        w = pb.rollout.weights[idx]
        if self.config.aggregation == "max_length_mean":  # every sample, masked ones too: TRL's size(0) x max length
            return w.sum() * self.config.sampling.max_new_tokens
        if self.config.aggregation == "token_sum":  # a masked truncated sample's tokens are not counted (TRL's dapo)
            tokens = pb.rollout.mask[idx].sum(-1) if pb.keep is None else pb.rollout.mask[idx].sum(-1) * pb.keep[idx]
            return (tokens * w).sum()
        return w.sum()  # a masked truncated sample counts as a zero-loss sequence (TRL's grpo)

    def normalizers(self, pb: PolicyBatch, idx: Tensor) -> Tensor:
        """(2,) what samples `idx` add to their minibatch's loss normaliser (`normalizer`) and to its sample-weight
        sum, which the entropy bonus's shares divide (`policy_loss`)."""
        return torch.stack([self.normalizer(pb, idx).to(torch.float64),
                            pb.rollout.weights[idx].sum().to(torch.float64)])

    def entropy_keep(self, entropy: Tensor, mask: Tensor) -> Tensor:
        """The loss tokens of this forward in the top `top_entropy_quantile` by entropy, the quantile over every
        process's loss tokens of its forward (TRL 1.16's `get_high_entropy_mask`: padded, gathered, pads dropped); a
        zero-weight filler pass (`filler_pass`: this process's share exhausted) adds none of its tokens."""
        values = entropy.detach()[mask].float()
        if getattr(self, "filler_pass", False):  # `run_minibatches`' zero-weight pass: its tokens carry no weight
            values = values[:0]
        if self.world > 1:
            padded = self.accelerator.pad_across_processes(values, dim=0, pad_index=-1e9)  # entropies are >= 0
            values = self.accelerator.gather(padded)
            values = values[values != -1e9]
        return high_entropy_mask(entropy.detach(), mask, self.config.top_entropy_quantile, values)

    @staticmethod
    def entropy_bonus(entropy: Tensor, tokens: Tensor, weights: Tensor, share: Tensor) -> Tensor:
        """What entropy_coef multiplies, as TRL 1.16's GRPO: the mean entropy over the forward's loss tokens (those
        `top_entropy_quantile` keeps), whatever the aggregation (TRL: "the same meaning for every loss type"), each
        token weighted by its sample's weight, times the forward's `share` of its minibatch's items (sample weights,
        whatever the aggregation: one forward: 1; equal micro-batches: 1 / accumulation steps, TRL 1.16's
        entropy_loss / accumulation_factor, and 1 / (W x accumulation steps) per process after DDP's average)."""
        w = tokens.to(entropy.dtype) * weights.to(entropy.dtype)[:, None]
        return (entropy * w).sum() / w.sum().clamp(min=1e-12) * torch.nan_to_num(share.to(entropy.dtype), nan=0.0)

    def policy_loss(self, pb: PolicyBatch, idx: Tensor, normalizer: Tensor | None = None,
                    weight_total: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Clipped policy-gradient loss of samples `idx (M,)`, reduced with their weights (divided by
        `normalizer`, default: this selection's own, `self.normalizer`); the entropy bonus counts by the selection's
        share of `weight_total`, its minibatch's sample-weight sum (`normalizers`; default: its own)."""
        c: GRPOConfig = self.config
        r = pb.rollout
        on_policy = r.old_logps is None  # `reuses_training_pass`: this forward is pi_old
        stats = self.token_stats(select(r.batch, idx), entropy=c.entropy_coef > 0 or on_policy
                                 or c.top_entropy_quantile < 1)
        w = stats.logps.shape[1]  # the selected rows' width (T'-1)
        old = stats.logps.detach() if on_policy else r.old_logps[idx, :w]
        ref = None if r.ref_logps is None else r.ref_logps[idx, :w]  # None: no reference (a fixed kl_coef of 0)
        mask = stats.mask if pb.keep is None else stats.mask & pb.keep[idx, None]  # the tokens with a loss
        keep = None if c.top_entropy_quantile == 1 else self.entropy_keep(stats.entropy, mask)
        out = clipped_policy_loss(stats.logps, old, pb.advantages[idx], mask,
                                  clip_eps=c.clip_eps, clip_eps_high=c.clip_eps_high, dual_clip=c.dual_clip,
                                  ref_logps=ref, kl_coef=0.0 if c.kl_in_reward else self.kl_ctl.value,
                                  kl_estimator=c.kl_estimator, entropy=stats.entropy if c.entropy_coef > 0 else None,
                                  aggregation=c.aggregation, importance_sampling=c.importance_sampling,
                                  cispo_max=c.cispo_max, token_keep=keep)  # the entropy bonus: `entropy_bonus`
        local = self.normalizer(pb, idx)
        norm = local if normalizer is None else normalizer
        w_sum = r.weights[idx].sum().to(torch.float64)
        share = w_sum / (w_sum if weight_total is None else weight_total)  # TRL's 1 / accumulation steps
        if getattr(self, "filler_pass", False):  # `run_minibatches` multiplies it by 0: it must be finite whatever
            norm, share = norm.clamp(min=1.0), local.new_zeros(())  # the normaliser (0: the minibatch all masked)
        loss = reduce_loss(out.losses, r.weights[idx], norm)
        if c.entropy_coef > 0:
            loss = loss - c.entropy_coef * self.entropy_bonus(stats.entropy, mask if keep is None else keep,
                                                              r.weights[idx], share)
        tokens = float(mask.sum())  # the metrics are token means: `run_minibatches` weights them by tokens
        metrics: dict[str, Any] = {k: (float(v.float().mean()), tokens) for k, v in out.metrics.items()
                                   if k not in ("kl", "entropy")}
        if "kl" in out.metrics:
            metrics["kl/token"] = (float(out.metrics["kl"]), tokens)
        if on_policy:  # the rollout's "kl" / "entropy", from this pass (its rows are the whole step's)
            self._pass_total = getattr(self, "_pass_total", 0) + self.pass_sums(stats.logps, ref, stats.entropy,
                                                                                 stats.mask)
        return loss, metrics

    def optimise(self, pb: PolicyBatch) -> dict[str, float]:
        self._pass_total = torch.zeros(4, dtype=torch.float64)  # `pass_sums` of this step's training forwards
        metrics = self.run_minibatches(len(pb.rollout.samples),
                                       lambda idx, norm: self.policy_loss(pb, idx, norm[0], norm[1]),
                                       lambda idx: self.normalizers(pb, idx))
        if pb.rollout.old_logps is None:  # every rank skipped the rollout pass (a collective follows)
            metrics.update(self.metrics_from_sums(self._pass_total))
        return metrics


class RLOOTrainer(GRPOTrainer):
    """GRPO's loop with the RLOO leave-one-out advantage (`RLOOConfig`)."""

    config_class = RLOOConfig


__all__ = ["GRPOConfig", "GRPOTrainer", "PolicyBatch", "RLOOConfig", "RLOOTrainer", "warn_sequence_ratio_sums"]
