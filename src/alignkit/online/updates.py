"""The optimisation half of an online step: `run_minibatches` runs a subclass's loss over the step's items in
epochs x shuffled minibatches x micro-batches, one optimizer step per minibatch, with the loss normaliser
reduced over processes (so DDP's gradient average is the one-process gradient of the global batch), the same
number of forwards on every process, and a stop before the optimizer step on a non-finite loss or gradient norm.

`MinibatchUpdates` is a part of `alignkit.online.trainer.OnlineTrainer` (a mixin): it reads the trainer's
`config`, `model`, `extra_modules`, `optimizer`, `accelerator`, `world`, `rng` and `log`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from alignkit.distributed import gather_objects
from alignkit.guards import NonFiniteError, as_float, is_finite, likely_causes

logger = logging.getLogger(__name__)


class MetricSums:
    """Weighted sums of metrics: `add(name, mean, weight)` for a mean over `weight` units (items, tokens, weight),
    `means()` the mean over all units of each metric. A metric whose weights summed to zero (e.g. every token of
    its micro-batches masked) is the plain mean of its values, as it was reported."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # name -> [sum of mean * weight, sum of weights, sum of means, count]

    def add(self, name: str, mean: float, weight: float) -> None:
        t = self.totals.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        if weight > 0:
            t[0] += float(mean) * weight
            t[1] += weight
        t[2] += float(mean)
        t[3] += 1

    def add_all(self, metrics: dict[str, Any], items: int) -> None:
        """`loss_fn`'s metrics: a float is a mean over the micro-batch's `items`; `(mean, weight)` over `weight`."""
        for k, v in metrics.items():
            mean, weight = v if isinstance(v, tuple) else (v, items)
            self.add(k, float(mean), float(weight))

    def merge(self, other: "MetricSums") -> None:
        for k, t in other.totals.items():
            mine = self.totals.setdefault(k, [0.0, 0.0, 0.0, 0.0])
            for i in range(4):
                mine[i] += t[i]

    @classmethod
    def combined(cls, rows: list[dict[str, list[float]]]) -> "MetricSums":
        out = cls()
        for row in rows:
            part = cls()
            part.totals = row
            out.merge(part)
        return out

    def means(self) -> dict[str, float]:
        return {k: (t[0] / t[1] if t[1] > 0 else t[2] / max(t[3], 1)) for k, t in self.totals.items()}


class MinibatchUpdates:
    """Minibatch updates of an online step (see the module's docstring); a part of `OnlineTrainer`."""

    def run_minibatches(self, n_items: int, loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]],
                        normalizer_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """`epochs_per_step` passes over this process's `n_items` items in shuffled minibatches; one optimizer
        step each (`gradient_accumulation_steps` backward passes).

        `normalizer_fn(idx (M,)) -> scalar`: what the items' weighted loss sum is divided by (their weight sum, or
        token count), summed here over the minibatch's micro-batches and every process, divided by the number of
        processes (DDP averages gradients); or a vector of such sums, the loss's first (GRPO's: and the weight sum
        its entropy bonus's shares divide), `loss_fn` then getting the vector. `loss_fn(idx, normalizer) -> (scalar
        loss, metrics)` must return sum_i w_i loss_i / normalizer (`reduce_loss(..., normalizer=normalizer)`). Every
        process runs the same number of minibatches (the largest share decides); a process whose share is exhausted
        runs a zero-weighted pass over its item 0 so that DDP's collectives still match.

        Returns the step's metrics as means over what each defines, however ragged the micro-batches,
        minibatches and process shares are (`MetricSums`): a metric `loss_fn` gives as a float is its
        micro-batch's mean over items, weighted by the micro-batch's item count; one given as `(mean, weight)`
        is weighted by `weight` (its tokens, or its sample-weight sum). "loss" (the minibatch loss) is weighted by
        its minibatch's normaliser: the step's weighted loss over every item; "grad_norm" is the mean over the
        updates. A plain average of micro-batch means would count the items of a short micro-batch more."""
        c = self.config
        counts = self.gather(torch.tensor([float(n_items)]))  # (W,)
        n_max = int(counts.max())
        if n_max == 0:
            return {}
        size = self._minibatch_size(n_max)
        micro_rows = -(-size // c.gradient_accumulation_steps)  # the update's micro-batch size (the largest)
        self.warn_whole_step_minibatch(int(counts.sum()))
        sums = MetricSums()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        dev = self.accelerator.device
        self.model.train()
        for _ in range(c.epochs_per_step):
            perm = torch.randperm(n_items, generator=self.rng)
            for j in range(-(-n_max // size)):
                idx = perm[j * size:(j + 1) * size].to(dev)
                dummy = idx.numel() == 0
                if dummy:
                    if n_items == 0:
                        raise RuntimeError("a process has no items to run a zero-weighted pass on; the subclass "
                                           "must give every process at least one (zero-weight) item")
                    idx = torch.zeros(1, dtype=torch.long, device=dev)
                step_metrics, step_loss, normalizer, norm = self._minibatch_step(idx, dummy, loss_fn, normalizer_fn,
                                                                                  params, micro_rows)
                if dummy:
                    continue
                sums.merge(step_metrics)
                sums.add("loss", step_loss, float(normalizer.reshape(-1)[0]))
                if c.max_grad_norm is not None:
                    sums.add("grad_norm", float(norm), 1.0)
        if self.world > 1:  # every process's sums: the means are over the global batch, not over processes
            sums = MetricSums.combined(gather_objects(sums.totals, self.world))
        return sums.means()

    def warn_whole_step_minibatch(self, items: int) -> None:
        """Once a run: a mini_batch_size above the step's `items` (every process's) makes one update, as if unset. The
        config refuses it where it can know (`settings.online_checks.check_accumulation`: the most items a step
        gives); here a step gave fewer (fewer prompts in the data than prompts_per_step, online DPO's pairs dropped by
        min_margin or a judge)."""
        size = self.config.mini_batch_size
        if size is None or size <= items or getattr(self, "_warned_mini_batch", False):
            return
        self._warned_mini_batch = True
        logger.warning("mini_batch_size (method.mini_batch_size) is %d, and this step has %d item(s) over all "
                       "processes: it makes one update over all of them, as if mini_batch_size were unset; lower it "
                       "for several updates a step", size, items)

    def _minibatch_size(self, n_max: int) -> int:
        """Items per minibatch on this process (its share of `mini_batch_size`; None: the largest share `n_max`),
        warning once when `gradient_accumulation_steps` exceeds it (empty micro-batches)."""
        c = self.config
        size = c.mini_batch_size // self.world if c.mini_batch_size is not None else n_max
        if c.gradient_accumulation_steps > min(size, n_max) and not getattr(self, "_warned_accumulation", False):
            self._warned_accumulation = True  # once: what OnlineConfig (online_checks.check_accumulation) could not
            #   refuse from the config: a process's share on several processes, fewer pairs than online DPO can form
            logger.warning("gradient_accumulation_steps (train.gradient_accumulation_steps) is %d, and this process's "
                           "minibatch holds %d item(s): %d micro-batch(es) are empty zero-weight passes on every "
                           "update (the gradient is the same); lower it to %d", c.gradient_accumulation_steps,
                           min(size, n_max), c.gradient_accumulation_steps - min(size, n_max), min(size, n_max))
        return size

    def _minibatch_step(self, idx: Tensor, dummy: bool,
                        loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Any]]],
                        normalizer_fn: Callable[[Tensor], Tensor],
                        params: list[Tensor], micro_rows: int) -> tuple[MetricSums, float, Tensor, Tensor]:
        """One optimizer step on the minibatch `idx` (`dummy`: a zero-weighted pass, this process's share being
        exhausted): `gradient_accumulation_steps` backward passes (and an extra loss's, in micro-batches of at most
        `micro_rows` rows), the gradient clipped, a stop before the step on a non-finite loss or norm. -> (its
        micro-batches' metrics, its loss, its normaliser, its gradient norm)."""
        c = self.config
        local = normalizer_fn(idx).detach().to(torch.float64) * (0.0 if dummy else 1.0)
        normalizer = (self.reduce_sum(local.reshape(-1)) / self.world).reshape(local.shape)
        # the same number of forwards on every process (FSDP gathers weights in each): an empty
        # micro-batch runs item 0 with weight zero
        micro = idx.tensor_split(c.gradient_accumulation_steps)
        real = [mb.numel() > 0 for mb in micro]
        step_loss, extra_metrics = self._extra_backward(micro_rows)
        step_metrics = MetricSums()
        for m_i, mb in enumerate(micro):
            with ExitStack() as stack:
                if m_i < len(micro) - 1:  # gradients are all-reduced once, on the last micro-batch
                    for module in [self.model, *self.extra_modules]:
                        stack.enter_context(self.accelerator.no_sync(module))
                self.filler_pass = dummy or not real[m_i]  # read by losses with batch-wide statistics (GRPO's)
                loss, metrics = loss_fn(mb if real[m_i] else idx[:1], normalizer)
                self.filler_pass = False
                if dummy or not real[m_i]:
                    loss = loss * 0.0
                if not is_finite(loss):
                    means = {k: v[0] if isinstance(v, tuple) else v for k, v in metrics.items()}
                    self._stop_non_finite("the training loss", as_float(loss), {**means, "loss": as_float(loss)})
                self.accelerator.backward(loss)
            step_loss += float(loss.detach())
            if real[m_i]:
                step_metrics.add_all(metrics, mb.numel())
        step_metrics.merge(extra_metrics)
        norm = self.accelerator.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm is not None
                                                else float("inf"))
        if not is_finite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._stop_non_finite("the gradient norm", as_float(norm), {"loss": step_loss,
                                                                       "grad_norm": as_float(norm)})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self, "ema", None) is not None:  # train.ema_decay: the policy's average (alignkit.online.ema)
            self.ema.update(self.policy_trainable())
        if getattr(self, "ref_syncer", None) is not None:  # method.ref_sync: counts updates (alignkit.online.ref_sync)
            self.ref_syncer.after_update(self.policy)
        return step_metrics, step_loss, normalizer, norm

    def extra_update_losses(self, micro_rows: int) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """Losses every optimizer step adds to the minibatch's (PPO-ptx: `alignkit.online.ptx`), one per micro-batch
        of at most `micro_rows` rows (the update's micro-batch size), each already divided so that their gradients
        sum to the whole batch's as DDP averages it, with its metrics (`MetricSums.add_all`'s); every process
        yields as many. None by default."""
        return iter(())

    def _extra_backward(self, micro_rows: int) -> tuple[float, MetricSums]:
        """Backward of each `extra_update_losses` part (before the minibatch's micro-batches, with the gradients'
        all-reduce left to the last of them); a non-finite one stops before the step. -> (their sum, metrics)."""
        value, sums = 0.0, MetricSums()
        with ExitStack() as stack:
            for module in [self.model, *self.extra_modules]:
                stack.enter_context(self.accelerator.no_sync(module))
            for loss, metrics in self.extra_update_losses(micro_rows):
                if not is_finite(loss):
                    means = {k: v[0] if isinstance(v, tuple) else v for k, v in metrics.items()}
                    self._stop_non_finite("the pretraining-mix (ptx) loss", as_float(loss),
                                          {**means, "loss": as_float(loss)})
                self.accelerator.backward(loss)
                value += float(loss.detach())
                sums.add_all(metrics, 1)
        return value, sums

    def _stop_non_finite(self, what: str, value: float, metrics: dict[str, Any]) -> None:
        """Log the step's row with the bad value (NaN stays NaN), then stop before the optimizer step; the advice names
        the method's own loss scale (`OnlineTrainer.loss_scale`)."""
        step = getattr(self, "_step", 0)
        self.log({"step": float(step), **{k: as_float(v) for k, v in metrics.items()}})
        raise NonFiniteError(what, value, step + 1, getattr(self, "_step_ids", None),
                             causes=likely_causes(self.loss_scale(self.config)))


__all__ = ["MetricSums", "MinibatchUpdates"]
