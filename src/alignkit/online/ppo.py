"""PPO with a value head and GAE: the classic RLHF step 3 (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), on the shared online loop.

Rollout (no gradient), per sample with response tokens t = 0..L-1:

    r_t    = -beta KL_t(pi_old || pi_ref) + [t = L-1] score     (`per_token_rewards`, k1 by default: the
                                                                 log-ratio log pi_old - log pi_ref)
    V_t    = value_head(h_t)                                     (old values)
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}  (V_L = 0)   (`gae`)
    R_t    = A_t + V_t                                           (value targets)
    A      <- whiten(A) over the batch's response tokens         (`whiten_advantages`; a failed annotation's
                                                                 tokens are left out and get A = 0)

Update (`epochs_per_step` passes, minibatches of samples):

    loss_i = mean_t [ -min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t) - entropy_coef H_t ]
             + vf_coef * mean_t 0.5 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)
    loss   = sum_i w_i loss_i / sum_i w_i

The KL enters through the rewards (not the loss), with the controller's beta (fixed or adaptive).
With `ptx_coef` > 0 and `ptx_data`, each update also adds ptx_coef x the NLL of a batch of SFT records (PPO-ptx,
`alignkit.online.ptx`).
Metrics: clip_ratio/region_mean, value_loss, vf_clip_fraction, explained_variance, returns/mean, advantages/std;
with PPO-ptx ptx_loss and ptx/epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from alignkit.losses import clipped_policy_loss, gae, masked_whiten, per_token_rewards, reduce_loss, value_loss
from alignkit.adapters import unwrap_lm
from alignkit.online.ptx import (PtxData, as_ptx_features, check_ptx_tokens, ptx_batch, ptx_nll_sum,
                                trainable_tokens)
from alignkit.online.rollout import select
from alignkit.online.trainer import REWARD_SCALE, OnlineConfig, OnlineTrainer, Rollout
from alignkit.online.value_head import ValueHead
from alignkit.run_commit import CheckpointError
from alignkit.settings.online import PPOObjective
from alignkit.settings.sections import check_ptx


@dataclass
class PPOConfig(PPOObjective, OnlineConfig):
    """The online loop's config plus PPO's keys (`alignkit.settings.online.PPOObjective`, shared with `alignkit
    ppo`)."""

    learning_rate: float = 3e-6  # TRL's PPOConfig


@dataclass
class PPOBatch:
    rollout: Rollout
    advantages: Tensor  # (B, T-1), 0 off the response
    returns: Tensor  # (B, T-1)
    old_values: Tensor  # (B, T-1)


def ppo_advantages(scores: Tensor, old_logps: Tensor, ref_logps: Tensor | None, values: Tensor, mask: Tensor, *,
                   kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                   whiten: bool = True, sum_fn=None, scored: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(advantages, returns, token rewards), all (B, T), from scores (B,) and per-token tensors (B, T).
    `sum_fn` (e.g. a sum over processes) makes the whitening statistics global. `scored` (B,) bool marks the
    samples the annotator scored: a failed one (False; weight 0, its score a filled-in value) is left out of the
    whitening statistics, which would otherwise move every other sample's advantages, and gets advantage 0."""
    rewards, _ = per_token_rewards(scores, old_logps, ref_logps, mask, kl_coef, kl_estimator)
    adv, returns = gae(rewards, values, mask, gamma, lam)
    keep = mask if scored is None else mask * scored.to(mask.dtype)[:, None]
    if whiten:
        adv = masked_whiten(adv, keep, sum_fn=sum_fn)
    return adv * keep, returns, rewards


class PPOTrainer(OnlineTrainer):
    """PPO with a value head (`value_head.ValueHead`) for every adapter kind; see the module docstring."""

    config_class = PPOConfig
    needs_hidden = True

    def __init__(self, model: nn.Module, tokenizer: Any, prompts: Any, annotator: Any, config: PPOConfig | None = None,
                 *, ptx_data: Any = None, **kwargs: Any) -> None:
        """As `OnlineTrainer`, plus `ptx_data` (PPO-ptx with `config.ptx_coef` > 0): SFT records, strings or token
        features (`alignkit.online.ptx.as_ptx_features`); refused before anything is written when half set or
        when no record has a trainable token."""
        check_ptx(config if config is not None else self.config_class(), ptx_data, "ptx_data", "PPOConfig.")
        self.ptx: PtxData | None = None
        if ptx_data is not None:
            features = check_ptx_tokens(as_ptx_features(ptx_data, tokenizer), "ptx_data")
            self.ptx = PtxData(features, (config or self.config_class()).seed)
        super().__init__(model, tokenizer, prompts, annotator, config, **kwargs)

    def build_extra_modules(self) -> list[nn.Module]:
        cfg = unwrap_lm(self.model).config
        hidden = cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size
        return [ValueHead(hidden).to(self.accelerator.device)]

    def flat_scores(self, everyone: Tensor) -> bool:
        """PPO's advantages come from the value head (GAE), not from groups: a reward that differs between prompts
        but not between one prompt's samples still gives advantages (until the value head has learned it), so
        the step counts as flat only when every scored response of it (>= 2, over all processes) got the same
        score: a reward that is constant (which the value head learns, leaving only the KL penalty)."""
        scored = everyone[~torch.isnan(everyone)]
        return scored.numel() > 1 and bool((scored == scored[0]).all())

    def no_signal(self, metrics: dict[str, float]) -> tuple[str, str] | None:
        if not getattr(self, "_step_flat", False):
            return None
        return (f"every response of this step got the same reward{self.clipped_alike()}, so the reward tells no "
                "response from another (the value head learns the constant; only the KL penalty moves the policy); "
                + self.clip_advice("a reward that never varies is usually a bug in the annotator"),
                "had responses with different rewards (every response scored alike at all {steps} step(s)): the "
                "rewards did not move the policy")

    def stall_cause(self, seen: str) -> tuple[str, str]:
        return (f"every response got the same reward from {self.annotator.source()} ({seen}){self.clipped_alike()}: "
                "the value head learns that constant and the advantages then carry only the KL penalty, nothing from "
                "the reward", self.clip_advice(self.check_annotator_advice()))

    @property
    def value_head(self) -> nn.Module:
        """The value head as prepared by the accelerator (DDP-wrapped when distributed)."""
        return self.extra_modules[0]

    @classmethod
    def loss_scale(cls, config: PPOConfig) -> str | None:
        """method.vf_coef (the value loss, whose returns are on the rewards' scale), the KL and entropy coefficients
        where they act (the KL through the rewards), and the rewards' scale."""
        ptx = ["method.ptx_coef (the pretraining mix)"] if config.ptx_coef > 0 else []
        return ", ".join(["method.vf_coef", *ptx, *cls.penalty_scales(config), REWARD_SCALE])

    @torch.no_grad()
    def build_batch(self, r: Rollout) -> PPOBatch:
        c: PPOConfig = self.config
        m = r.mask.float()
        old_values = self.value_head(r.hidden) * m  # (B, T-1)
        adv, returns, _ = ppo_advantages(r.rewards, r.old_logps, r.ref_logps, old_values, m,
                                         kl_coef=self.kl_ctl.value, kl_estimator=c.kl_estimator, gamma=c.gamma,
                                         lam=c.lam, whiten=c.whiten_advantages,
                                         sum_fn=self.reduce_sum if self.world > 1 else None,
                                         scored=~torch.isnan(r.scores))
        r.hidden = None  # not needed any more
        return PPOBatch(r, adv, returns, old_values)

    def ppo_loss(self, pb: PPOBatch, idx: Tensor, normalizer: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        c: PPOConfig = self.config
        r = pb.rollout
        stats = self.token_stats(select(r.batch, idx), entropy=c.entropy_coef > 0, hidden=True)
        w = stats.logps.shape[1]
        values = self.value_head(stats.hidden)  # (M, w)
        pg = clipped_policy_loss(stats.logps, r.old_logps[idx, :w], pb.advantages[idx, :w], stats.mask,
                                 clip_eps=c.clip_eps, entropy=stats.entropy, entropy_coef=c.entropy_coef)
        vl = value_loss(values, pb.old_values[idx, :w], pb.returns[idx, :w], stats.mask, clip_range=c.cliprange_value)
        loss = reduce_loss(pg.losses + c.vf_coef * vl.losses, r.weights[idx], normalizer)
        # weights for `run_minibatches`' means: token means by tokens, the weighted losses by the weight sum
        tokens, weight = float(stats.mask.sum()), float(r.weights[idx].sum())
        metrics: dict[str, Any] = {k: (float(v.float().mean()), tokens)
                                   for k, v in {**pg.metrics, **vl.metrics}.items() if k != "entropy"}
        metrics["policy_loss"] = (float(reduce_loss(pg.losses.detach(), r.weights[idx])), weight)
        metrics["value_loss"] = (float(reduce_loss(vl.losses.detach(), r.weights[idx])), weight)
        return loss, metrics

    def optimise(self, pb: PPOBatch) -> dict[str, float]:
        m = pb.rollout.mask.float() * (~torch.isnan(pb.rollout.scores)).float()[:, None]  # scored samples' tokens
        n = m.sum().clamp(min=1)
        out = self.run_minibatches(len(pb.rollout.samples), lambda idx, norm: self.ppo_loss(pb, idx, norm),
                                   lambda idx: pb.rollout.weights[idx].sum())
        out["returns/mean"] = float((pb.returns * m).sum() / n)
        out["advantages/std"] = float(((pb.advantages * m) ** 2).sum().div(n).sqrt())
        if self.ptx is not None:
            out["ptx/epochs"] = self.ptx.epochs
        return out

    def extra_update_losses(self, micro_rows: int) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """PPO-ptx: ptx_coef x the NLL of the next ptx batch (ptx_batch_size records, default the update's samples;
        this process's contiguous share), in micro-batches of at most `micro_rows` records (the update's
        micro-batch size: gradient_accumulation_steps bounds the ptx forward too), each divided by the batch's
        token count over every process (its gradients sum to one forward's over the batch). Every process runs
        as many as the largest share needs; a process with fewer records takes zero-weight passes."""
        if self.ptx is None:
            return
        c: PPOConfig = self.config
        n = c.ptx_batch_size or c.mini_batch_size or c.prompts_per_step * c.sampling.num_samples
        records = self.ptx.take(n)  # the whole batch, on every process: its token count needs no collective
        mine = records[self.rank * n // self.world:(self.rank + 1) * n // self.world]
        scale = c.ptx_coef * self.world / max(sum(trainable_tokens(f) for f in records), 1)  # DDP averages
        largest = -(-n // self.world)  # the largest process share
        for k in range(-(-largest // micro_rows)):
            part = mine[k * micro_rows:(k + 1) * micro_rows]
            batch = ptx_batch(part or records[:1], self.tokenizer.pad_token_id, self.accelerator.device)
            nll, tokens = ptx_nll_sum(self.model, batch, c.chunk_size)
            if not part:  # a zero-weight pass keeps DDP's / FSDP's collectives matched
                yield nll * 0.0, {}
                continue
            yield scale * nll, {"ptx_loss": (float(nll.detach()) / max(float(tokens), 1.0), float(tokens))}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {} if self.ptx is None else {"ptx": {"position": self.ptx.position, **self.ptx.fingerprint()}}

    def check_resume_extras(self, folder: Path, state: dict[str, Any]) -> None:
        saved = state.get("ptx")
        now = None if self.ptx is None else self.ptx.fingerprint()
        if saved is None and now is not None:
            raise CheckpointError(f"resume: {folder} was written without the pretraining mix (its state has no ptx "
                                  "position), and this run has method.ptx_coef > 0: its ptx stream would restart at "
                                  "record 0; resume with the config that wrote it, or start a new run in another "
                                  "output_dir")
        if saved is not None and now is not None and {k: saved[k] for k in now} != now:
            raise CheckpointError(f"resume: {folder} was written by a run over other ptx data ({saved['count']} "
                                  f"record(s), this run has {now['count']}, or other tokens); its ptx position "
                                  "indexes that data. Resume with the same data.ptx_path (and tokenization), or "
                                  "start a new run")

    def restore_extras(self, state: dict[str, Any]) -> None:
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.position = int(state["ptx"]["position"])

    def save(self, folder: str | Path) -> Path:
        folder = super().save(folder)
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.value_head).save(folder)
        return folder


__all__ = ["PPOBatch", "PPOConfig", "PPOTrainer", "ppo_advantages"]
