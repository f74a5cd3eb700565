"""One online step's data, before any update: which prompts (`next_prompts`, `local_prompts`), their samples
from the current policy (`generate`: transformers, or vLLM colocated / server), and the `Rollout` made of them
(`score`: annotate, normalise rewards, and without gradient the policy's and the reference's per-token
log-probs, entropy and the KL to the reference), with its metrics (`rollout_metrics`, and `pass_sums` /
`metrics_from_sums` when the training forward gives them instead).

`RolloutSteps` is a part of `alignkit.online.trainer.OnlineTrainer` (a mixin): it reads the trainer's `config`,
`prompts`, `tokenizer`, `annotator`, `model` / `policy`, `reference` (`alignkit.trainers.reference.Reference`),
`accelerator`, `world` / `rank`, the RNGs, reward moments and KL controller, and the cross-process reductions of
`alignkit.online.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.distributed import gathered_root
from alignkit.losses import KL_ESTIMATORS
from alignkit.online.annotators import AnnotatorError, Scores
from alignkit.online.generation import Sample, SamplingConfig, generate_responses, generation_metrics
from alignkit.online.normalize import normalize_rewards
from alignkit.online.rollout import TokenStats, samples_batch, sequence_sums, token_stats
from alignkit.online.vllm_client import VllmServerGenerator
from alignkit.online.vllm_generation import VllmGenerator


@dataclass
class Rollout:
    """One step's samples and what was computed on them without gradient (B samples, T-1 token positions)."""

    samples: list[Sample]
    batch: dict[str, Tensor]  # input_ids, attention_mask, completion_mask (B, T)
    scores: Tensor  # (B,) raw annotator scores, NaN = failed
    rewards: Tensor  # (B,) normalised + clipped; failed ones filled with their group's mean
    weights: Tensor  # (B,) the prompt records' weights, 0 for failed annotations
    old_logps: Tensor | None  # (B, T-1) log pi_old of the sampled tokens; None: the training forward's (below)
    ref_logps: Tensor | None  # (B, T-1) log pi_ref; None without a reference (a fixed kl_coef of 0)
    mask: Tensor  # (B, T-1) bool
    entropy: Tensor | None  # (B, T-1); None with old_logps
    hidden: Tensor | None = None  # (B, T-1, d), when the trainer asks (PPO's value head)
    metrics: dict[str, float] = field(default_factory=dict)
    per_function: Tensor | None = None  # (B, F) each reward function's own score, NaN = None (`Scores.per_function`)


def zero_spread_fraction(groups: Tensor) -> float:
    """(G, K) rewards, NaN = unscored -> share of groups whose scored rewards are all equal (a group with fewer
    than two scored rewards counts as flat)."""
    ok = ~torch.isnan(groups)
    hi = torch.where(ok, groups, -torch.inf).max(dim=-1).values
    lo = torch.where(ok, groups, torch.inf).min(dim=-1).values
    flat = (ok.sum(-1) < 2) | (hi == lo)
    return float(flat.float().mean()) if groups.shape[0] else 0.0


class RolloutSteps:
    """The sampling half of an online step (see the module's docstring); a part of `OnlineTrainer`."""

    def next_prompts(self) -> list:
        """The next `prompts_per_step` prompts of a seeded shuffle, reshuffled after each pass."""
        out = []
        while len(out) < min(self.config.prompts_per_step, len(self.prompts)):
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self._py_rng.shuffle(self._order)
            out.append(self.prompts[self._order.pop()])
        return out

    def local_prompts(self, prompts: list) -> list:
        """This process's contiguous share of the step's global prompt list (all of it in one process)."""
        n = len(prompts) // self.world
        return prompts[self.rank * n:(self.rank + 1) * n]

    def step_seed(self, base: int, step: int) -> int:
        """A seed derived from `base`, distinct per step and per rank; one process: base * 100003 + step."""
        return (int(base) * 100_003 + step) * self.world + self.rank

    def sampling_seed(self, step: int) -> int:
        """Distinct per step and per rank; one process: seed * 100003 + step."""
        s = self.config.sampling
        return self.step_seed(s.seed if s.seed is not None else self.config.seed, step)

    def generate(self, prompts: list, step: int) -> list[Sample]:
        """The step's samples: `sampling.num_samples` per prompt, from the current policy."""
        return self.sample_prompts(prompts, self.sampling_seed(step))

    def sample_prompts(self, prompts: list, seed: int) -> list[Sample]:
        """Samples of `prompts` from the current policy with the run's sampling settings and `seed`."""
        cfg = replace(self.config.sampling, seed=seed)
        if self.config.generation_backend == "vllm":
            return self.generate_vllm(prompts, cfg)
        # a ReFT policy places its own saved position spec (ReftModel.generate)
        with gathered_root(self.model):  # FSDP2: a wrapper's generate bypasses the root's forward hooks
            return generate_responses(self.policy, self.tokenizer, prompts, cfg,
                                      batch_size=self.config.generation_batch_size, formatter=self.config.formatter,
                                      max_prompt_length=self.config.max_prompt_length)

    def generate_vllm(self, prompts: list, cfg: SamplingConfig) -> list[Sample]:
        """Sample with vLLM (the colocated engine, or `alignkit vllm-serve` in server mode) after giving it the
        policy's current weights."""
        if self.vllm_generator is None and self.config.vllm_mode == "server":
            self.vllm_generator = VllmServerGenerator(self.policy, self.tokenizer, self.config.vllm_server_url,
                                                      timeout=self.config.vllm_server_timeout)
        elif self.vllm_generator is None:
            self.vllm_generator = VllmGenerator(self.policy, self.tokenizer,  # method.vllm.seed: the engine's own
                                                **{"seed": self.config.seed, **self.config.vllm})
        self.vllm_generator.sync(self.policy)  # the weights of the last optimizer step
        return self.vllm_generator.generate(prompts, cfg, formatter=self.config.formatter,
                                            max_prompt_length=self.config.max_prompt_length, eos_source=self.policy)

    def reference_token_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """(B, T-1) log-probs of the response tokens under `model` (the `Reference`'s model), at the sampling
        temperature: how the reference is scored (`Reference.logps`)."""
        return token_stats(model, batch, temperature=self.config.sampling.temperature,
                           chunk_size=self.config.chunk_size).logps

    def token_stats(self, batch: dict[str, Tensor], **kw: Any):
        return token_stats(self.model, batch, temperature=self.config.sampling.temperature,
                           chunk_size=self.config.chunk_size, **kw)

    @property
    def pointwise_scores(self) -> bool:
        """Whether `annotate` gives pointwise scores (False where a judge compares pairs itself)."""
        return True

    def annotate(self, samples: list[Sample]) -> Scores:
        """Pointwise scores of the samples (each prompt record's meta goes to the annotator)."""
        return self.annotator.annotate([s.prompt for s in samples], [s.response for s in samples],
                                       [s.meta for s in samples])

    @torch.no_grad()
    def score(self, samples: list[Sample], policy_pass: bool | None = None) -> Rollout:
        """Annotate, normalise rewards, and compute old / reference log-probs and entropy. `policy_pass=False`
        (see `reuses_training_pass`) leaves old_logps / entropy to the training forward: the rollout's "kl" and
        "entropy" metrics are then filled in by the loss (`pass_sums`, `metrics_from_sums`)."""
        if policy_pass is None:  # the loop's choice for this step; a direct call runs the pass
            policy_pass = getattr(self, "_policy_pass", True)
        c = self.config
        scores = self.annotate(samples)
        raw = scores.values.to(torch.float32)  # (B,)
        k = c.sampling.num_samples
        everyone = self.gather(raw)  # (W B,) every rank's raw scores, rank-major
        rewards = normalize_rewards(raw.clone(), c.reward_normalization, group_size=k, moments=self.moments,
                                    clip=c.reward_clip, update_with=everyone)
        normed = rewards  # NaN where unscored: what a clip may have made alike (`flat_scores` below)
        g = rewards.view(-1, k)  # (G, K): fill failures with their group's valid mean (0 if none)
        fill = torch.nan_to_num(torch.nanmean(g, dim=-1, keepdim=True), nan=0.0).expand_as(g)
        rewards = torch.where(torch.isnan(g), fill, g).reshape(-1)
        valid = ~torch.isnan(raw)
        weights = torch.tensor([s.weight for s in samples], dtype=torch.float32) * valid
        batch = samples_batch(samples, self.tokenizer.pad_token_id, self.accelerator.device)
        if self.share_prompt:  # every forward over these rows (or a selection of them) shares each group's prompt
            batch["share_groups"] = torch.tensor([s.group for s in samples], dtype=torch.long,
                                                 device=batch["input_ids"].device)
        ref = self.reference.logps(self.policy, batch, self.reference_token_logps)  # (B, T-1); None: no reference
        if policy_pass:
            stats = self.token_stats(batch, entropy=True, hidden=self.needs_hidden)
            kl_tok = None if ref is None else KL_ESTIMATORS[c.kl_estimator](stats.logps, ref)  # (B, T-1)
            kl = None if ref is None else sequence_sums(kl_tok, stats.mask)  # (B,)
        else:  # old log-probs, entropy and the kl / entropy metrics: from the training forward (`pass_sums`)
            mask = (batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:]).bool()  # (B, T-1)
            stats, kl_tok, kl = TokenStats(None, mask), None, None
        if not (~torch.isnan(everyone)).any() and self.pointwise_scores:
            raise AnnotatorError(f"step {getattr(self, '_step', 0) + 1}: the annotator scored none of the "
                                 f"{everyone.numel()} response(s) (every score failed or was None), so there is "
                                 "nothing to learn from; check the annotator (its function, model or judge) on a few "
                                 "of the responses")
        self._step_flat = self.flat_scores(everyone)  # read by `no_signal`
        # scores that differ can still be clipped alike (reward_clip below their spread): the objective then sees no
        # spread either; `everyone` is global, so every rank takes this branch (a collective) or none
        self._flat_by_clip = False
        if not self._step_flat and c.reward_clip is not None:
            self._flat_by_clip = self._step_flat = self.flat_scores(self.gather(normed))
        scored = everyone[~torch.isnan(everyone)]  # the scores a stall's message names (`check_stall`)
        self._step_range = (float(scored.min()), float(scored.max())) if scored.numel() else None
        metrics = self.rollout_metrics(samples, everyone, rewards, scores, kl_tok, kl, stats.entropy, stats.mask)
        dev = self.accelerator.device
        return Rollout(samples, batch, raw.to(dev), rewards.to(dev), weights.to(dev), stats.logps, ref, stats.mask,
                       stats.entropy, stats.hidden, metrics,
                       None if scores.per_function is None else scores.per_function.to(dev))

    def flat_scores(self, everyone: Tensor) -> bool:
        """Whether the step's raw scores (every process's, rank-major; NaN = unscored) give the objective no reward
        signal: every prompt's samples scored alike (a group with < 2 scores counts as flat, as in
        `frac_reward_zero_std`). PPO overrides it (its advantages come from a value head, not groups)."""
        k = self.config.sampling.num_samples
        return k > 1 and zero_spread_fraction(everyone.view(-1, k)) == 1.0

    def rollout_metrics(self, samples: list[Sample], everyone: Tensor, rewards: Tensor, scores: Scores, kl_tok: Tensor,
                        kl: Tensor, entropy: Tensor, mask: Tensor) -> dict[str, float]:
        """One step's sampling metrics, under TRL's names where the quantity is TRL's (docs/metrics.md):
        `reward`, `reward_std` (Bessel-corrected), `frac_reward_zero_std`, `kl` and `entropy` (means over every
        completion token of the step), `completions/*`, cumulative `num_tokens`; alignkit's own names otherwise
        (`kl/sequence_sum`: the mean over samples of each sequence's summed KL). Reward, KL, entropy and completion
        statistics are over all processes (every process gets the same values)."""
        k = self.config.sampling.num_samples
        v = everyone[~torch.isnan(everyone)].double()  # reward statistics over the global batch
        g = everyone.view(-1, k).double()  # (G, K) raw scores of each prompt's samples, NaN = failed
        ok = ~torch.isnan(g)
        n_ok = ok.sum(-1)  # (G,)
        g_mean = torch.where(ok, g, 0.0).sum(-1, keepdim=True) / n_ok.clamp(min=1)[:, None]
        g_std = (torch.where(ok, (g - g_mean) ** 2, 0.0).sum(-1) / (n_ok - 1).clamp(min=1)).sqrt()  # (G,) Bessel
        # a group with < 2 scores has no spread (its advantages are 0) and counts, as in `flat_scores`; with every
        # sample scored this is TRL's isclose(std, 0). One sample a prompt (PPO): no group, TRL's NaN std is not 0
        zero_std = ((n_ok < 2) | torch.isclose(g_std, torch.zeros_like(g_std))) & (k > 1)
        m = mask.float()
        if entropy is not None:  # else the policy pass was skipped: the training forward gives them (`pass_sums`)
            kl_sum = (kl_tok * m).sum() if kl_tok is not None else m.new_zeros(())  # no reference: no "kl"
            sums = self.reduce_sum(torch.stack([kl_sum, (entropy * m).sum(), m.sum()]).double())  # (3,)
        length = self.gather(torch.tensor([float(len(s.response_ids)) for s in samples]))  # (W B,)
        clipped = self.gather(torch.tensor([float(s.finish_reason == "length") for s in samples]))
        self._num_tokens += int(self.reduce_sum(torch.tensor(
            [float(sum(len(s.prompt_ids) + len(s.response_ids) for s in samples))], dtype=torch.float64))[0])
        metrics = {"reward": float(v.mean()) if v.numel() else float("nan"),
                   "reward_std": float(v.std()) if v.numel() > 1 else float("nan"),
                   "frac_reward_zero_std": float(zero_std.double().mean()),
                   "reward/failed": float(scores.failed.sum()),  # summed over ranks (SUMMED_METRICS)
                   "reward/normalized_mean": float(rewards.mean()),
                   "completions/mean_length": float(length.mean()), "completions/min_length": float(length.min()),
                   "completions/max_length": float(length.max()), "completions/clipped_ratio": float(clipped.mean()),
                   "num_tokens": float(self._num_tokens)}
        kl_coef = self.logged_kl_coef()
        if kl_coef is not None:  # None: the loss reads no such coefficient (online DPO's orpo, slic, sft)
            metrics["kl_coef"] = kl_coef
        if entropy is not None:
            metrics["entropy"] = float(sums[1] / sums[2].clamp(min=1))
        if kl_tok is not None:
            metrics.update({"kl": float(sums[0] / sums[2].clamp(min=1)), "kl/sequence_sum": float(kl.mean())})
        gen = generation_metrics(samples)
        gen.pop("generation/response_length")  # completions/mean_length, over all processes
        # rewards/<function>/mean, /std: exact over every process (the per-process values were averaged)
        return {**metrics, **gen, **{k_: float(v_) for k_, v_ in scores.metrics.items()},
                **self.reward_moments(scores.moments)}

    def logged_kl_coef(self) -> float | None:
        """The `kl_coef` metric: this step's KL coefficient, the KL controller's value (docs/metrics.md); None: not
        logged (the objective applies none)."""
        return float(self.kl_ctl.value)

    def pass_sums(self, logps: Tensor, ref_logps: Tensor | None, entropy: Tensor, mask: Tensor) -> Tensor:
        """(4,) float64 of one policy pass's (B, T-1) values: the summed KL estimator (`kl_estimator`; 0 without a
        reference) and entropy over response tokens, the response tokens, the sequences. See `metrics_from_sums`."""
        kl_tok = (torch.zeros_like(logps) if ref_logps is None
                  else KL_ESTIMATORS[self.config.kl_estimator](logps.detach(), ref_logps))
        m = mask.to(kl_tok.dtype)
        return torch.stack([(kl_tok * m).sum(), (entropy.detach() * m).sum(), m.sum(),
                            torch.tensor(float(mask.shape[0]), device=m.device)]).double().cpu()

    def metrics_from_sums(self, sums: Tensor) -> dict[str, float]:
        """The rollout's "kl", "entropy" (token means over every process: a collective, call it on every rank) and
        "kl/sequence_sum" (this process's mean over sequences) from this process's `pass_sums` total."""
        g = self.reduce_sum(sums[:3].clone())
        if self.reference.mode == "none":  # no reference (a fixed kl_coef of 0): no "kl" to log
            return {"entropy": float(g[1] / g[2].clamp(min=1))}
        return {"kl": float(g[0] / g[2].clamp(min=1)), "entropy": float(g[1] / g[2].clamp(min=1)),
                "kl/sequence_sum": float(sums[0] / sums[3].clamp(min=1))}


__all__ = ["Rollout", "RolloutSteps", "zero_spread_fraction"]
