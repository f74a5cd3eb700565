"""The optimisation half of an online step: `run_minibatches` runs a subclass's loss over the step's items in
epochs x shuffled minibatches x micro-batches, one optimizer step per minibatch, with the loss normaliser
reduced over processes (so DDP's gradient average is the one-process gradient of the global batch), the same
number of forwards on every process, and a stop before the optimizer step on a non-finite loss or gradient norm.

`MinibatchUpdates` is a part of `alignkit.online.trainer.OnlineTrainer` (a mixin): it reads the trainer's
`config`, `model`, `extra_modules`, `optimizer`, `accelerator`, `world`, `rng` and `log`.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

import torch
from torch import Tensor

from alignkit.guards import NonFiniteError, as_float, is_finite


class MinibatchUpdates:
    """Minibatch updates of an online step (see the module's docstring); a part of `OnlineTrainer`."""

    def run_minibatches(self, n_items: int, loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]],
                        normalizer_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """`epochs_per_step` passes over this process's `n_items` items in shuffled minibatches; one optimizer
        step each (`gradient_accumulation_steps` backward passes).

        `normalizer_fn(idx (M,)) -> scalar`: what the items' weighted loss sum is divided by (their weight sum,
        or token count), summed here over the minibatch's micro-batches and every process, divided by the
        number of processes (DDP averages gradients). `loss_fn(idx, normalizer) -> (scalar loss, metrics)`
        must return sum_i w_i loss_i / normalizer (`reduce_loss(..., normalizer=normalizer)`). Every process
        runs the same number of minibatches (the largest share decides); a process whose share is exhausted
        runs a zero-weighted pass over its item 0 so that DDP's collectives still match. Returns the metrics
        averaged over the updates ("loss": the minibatch loss)."""
        c = self.config
        counts = self.gather(torch.tensor([float(n_items)]))  # (W,)
        n_max = int(counts.max())
        if n_max == 0:
            return {}
        size = c.mini_batch_size // self.world if c.mini_batch_size is not None else n_max
        n_mini = -(-n_max // size)
        totals: dict[str, float] = {}
        updates = 0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        dev = self.accelerator.device
        self.model.train()
        for _ in range(c.epochs_per_step):
            perm = torch.randperm(n_items, generator=self.rng)
            for j in range(n_mini):
                idx = perm[j * size:(j + 1) * size].to(dev)
                dummy = idx.numel() == 0
                if dummy:
                    if n_items == 0:
                        raise RuntimeError("a process has no items to run a zero-weighted pass on; the subclass "
                                           "must give every process at least one (zero-weight) item")
                    idx = torch.zeros(1, dtype=torch.long, device=dev)
                local = normalizer_fn(idx).detach().to(torch.float64) * (0.0 if dummy else 1.0)
                normalizer = (self.reduce_sum(local.reshape(1)) / self.world).reshape(())
                # the same number of forwards on every process (FSDP gathers weights in each): an empty
                # micro-batch runs item 0 with weight zero
                micro = idx.tensor_split(c.gradient_accumulation_steps)
                real = [mb.numel() > 0 for mb in micro]
                step_loss, step_metrics = 0.0, {}
                for m_i, mb in enumerate(micro):
                    with ExitStack() as stack:
                        if m_i < len(micro) - 1:  # gradients are all-reduced once, on the last micro-batch
                            for module in [self.model, *self.extra_modules]:
                                stack.enter_context(self.accelerator.no_sync(module))
                        loss, metrics = loss_fn(mb if real[m_i] else idx[:1], normalizer)
                        if dummy or not real[m_i]:
                            loss = loss * 0.0
                        if not is_finite(loss):
                            self._stop_non_finite("the training loss", as_float(loss),
                                                  {**metrics, "loss": as_float(loss)})
                        self.accelerator.backward(loss)
                    step_loss += float(loss.detach())
                    if real[m_i]:
                        for k, v in metrics.items():
                            step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / sum(real)
                norm = self.accelerator.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm is not None
                                                        else float("inf"))
                if not is_finite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._stop_non_finite("the gradient norm", as_float(norm), {"loss": step_loss,
                                                                               "grad_norm": as_float(norm)})
                if c.max_grad_norm is not None:
                    step_metrics["grad_norm"] = float(norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if dummy:
                    continue
                step_metrics["loss"] = step_loss
                for k, v in step_metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                updates += 1
        return {k: v / max(updates, 1) for k, v in totals.items()}

    def _stop_non_finite(self, what: str, value: float, metrics: dict[str, Any]) -> None:
        """Log the step's row with the bad value (NaN stays NaN), then stop before the optimizer step."""
        step = getattr(self, "_step", 0)
        self.log({"step": float(step), **{k: as_float(v) for k, v in metrics.items()}})
        err = NonFiniteError(what, value, step + 1, getattr(self, "_step_ids", None))
        raise err


__all__ = ["MinibatchUpdates"]
