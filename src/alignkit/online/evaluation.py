"""Held-out evaluation of an online run: the current policy samples responses for prompts it never trains on
(`eval_prompts`), the run's annotator scores them, and the step's metrics row gets

    eval/reward          mean score over the scored held-out responses (all processes)
    eval/reward_std      their standard deviation (Bessel-corrected)
    eval/failed          responses the annotator could not score (summed over processes)
    eval/mean_length     mean response length in tokens
    eval/clipped_ratio   share of responses cut at max_new_tokens
    eval/prompts         held-out prompts evaluated

every `eval_steps` steps and after the last step (TRL's GRPOTrainer evaluates its `eval_dataset` the same way,
on the training generation settings). Sampling uses the run's `sampling` settings with ONE fixed seed for every
evaluation (a stream of its own, never a training step's), so two evaluations of the same policy give the same
responses and the change between evaluations is the policy's; the training steps' samples, and so the training,
are the same with or without evaluation.

Several processes: each process evaluates a contiguous equal share of the held-out prompts (a remainder that
does not divide is left out, with a warning), and the sums are reduced over processes.

`HeldOutEvaluation` is a part of `alignkit.online.trainer.OnlineTrainer` (a mixin): it reads the trainer's
`config`, `eval_prompts`, `world` / `rank`, `sample_prompts`, `annotate` / `pointwise_scores` and `reduce_sum`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from alignkit.online.generation import as_prompt_records

logger = logging.getLogger(__name__)

EVAL_STREAM = 100_002  # the evaluation's sampling seed: seed * 100_003 + EVAL_STREAM (a training step's is + step)


class HeldOutEvaluation:
    """Evaluation on held-out prompts (see the module's docstring); a part of `OnlineTrainer`."""

    def set_eval_prompts(self, eval_prompts: Sequence[Any] | None) -> None:
        """Keep this process's share of the held-out prompts; refuse what cannot be evaluated."""
        records = as_prompt_records(eval_prompts) if eval_prompts is not None else []
        self.eval_prompts_total = len(records)
        if self.config.eval_steps is not None and not records:
            raise ValueError(f"online config: eval_steps ({self.config.eval_steps}, train.eval_steps) evaluates on "
                             "held-out prompts, and none were given: set data.eval_path or data.eval_fraction, or "
                             "remove train.eval_steps")
        if records and not self.pointwise_scores:
            raise ValueError("held-out evaluation scores each response on its own, and feedback 'judge_pairs' gives no "
                             "pointwise score: use a reward model or function annotator (or feedback 'scores'), or "
                             "remove data.eval_path / data.eval_fraction")
        if records and len(records) < self.world:
            raise ValueError(f"held-out evaluation: {len(records)} held-out prompt(s) for {self.world} processes; "
                             "every process needs one: give at least as many held-out prompts as processes")
        n = len(records) // self.world
        if records and n * self.world != len(records):
            logger.warning("held-out evaluation: %d held-out prompts do not divide over %d processes: %d of them are "
                           "evaluated (the last %d are left out)", len(records), self.world, n * self.world,
                           len(records) - n * self.world)
        self.eval_prompts = records[self.rank * n:(self.rank + 1) * n]

    def eval_due(self, step: int) -> bool:
        """Whether step `step` (0-based) ends with an evaluation: every `eval_steps` steps and after the last."""
        if not self.eval_prompts:
            return False
        every = self.config.eval_steps
        return step + 1 == self.config.steps or (every is not None and (step + 1) % every == 0)

    def eval_seed(self) -> int:
        s = self.config.sampling
        base = s.seed if s.seed is not None else self.config.seed
        return (base * 100_003 + EVAL_STREAM) * self.world + self.rank

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Sample and score the held-out prompts with the current policy (a collective with several processes);
        the `eval/*` metrics of the module's docstring."""
        samples = self.sample_prompts(self.eval_prompts, self.eval_seed())
        scores = self.annotate(samples)
        values = scores.values.double()
        ok = ~torch.isnan(values)
        v = torch.where(ok, values, 0.0)
        lengths = torch.tensor([float(len(s.response_ids)) for s in samples], dtype=torch.float64)
        clipped = torch.tensor([float(s.finish_reason == "length") for s in samples], dtype=torch.float64)
        sums = self.reduce_sum(torch.stack([v.sum(), (v * v).sum(), ok.double().sum(), scores.failed.double().sum(),
                                            lengths.sum(), clipped.sum(), torch.tensor(float(len(samples)),
                                                                                       dtype=torch.float64)]))
        total, total_sq, n_ok, failed, length, n_clipped, n = (float(x) for x in sums)
        mean = total / n_ok if n_ok else float("nan")
        var = (total_sq - n_ok * mean * mean) / (n_ok - 1) if n_ok > 1 else float("nan")
        metrics = {"eval/reward": mean, "eval/reward_std": max(var, 0.0) ** 0.5 if n_ok > 1 else float("nan"),
                   "eval/failed": failed, "eval/mean_length": length / n if n else float("nan"),
                   "eval/clipped_ratio": n_clipped / n if n else float("nan"),
                   "eval/prompts": float(len(self.eval_prompts) * self.world)}
        if n and not n_ok:
            logger.warning("held-out evaluation: the annotator scored none of the %d held-out response(s): "
                           "eval/reward is NaN", int(n))
        return metrics


__all__ = ["EVAL_STREAM", "HeldOutEvaluation"]
