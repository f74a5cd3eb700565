"""An online run's metrics across processes and out: `gather` / `reduce_sum` (tensors over processes),
`reduce_metrics` (one row for all processes), and `log` (logging, `<output_dir>/metrics.jsonl` from the main
process, and the accelerate trackers: TensorBoard events in `<output_dir>/tensorboard` by default).

`ProcessMetrics` is a part of `alignkit.online.trainer.OnlineTrainer` (a mixin): it reads the trainer's
`config`, `accelerator`, `world`, `output_dir`, `trackers` and `history`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Sequence

import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker
from torch import Tensor

from alignkit.distributed import gather_objects
from alignkit.run_commit import truncate_metrics
from alignkit.runs import figure, trackers

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def moment_stats(moments: dict[str, Sequence[float]]) -> dict[str, float]:
    """`<key>/mean` and `<key>/std` (Bessel-corrected; NaN below 2 items) from each key's (count, sum, sum of
    squares)."""
    out: dict[str, float] = {}
    for key, (n, s, ss) in moments.items():
        mean = s / n if n else float("nan")
        out[f"{key}/mean"] = mean
        out[f"{key}/std"] = math.sqrt(max(ss - n * mean * mean, 0.0) / (n - 1)) if n > 1 else float("nan")
    return out


def recompute_rates(metrics: dict[str, float], rates: dict[str, tuple[tuple[str, ...], str]]) -> None:
    """Each rate of `rates` (rate -> (its numerator counts, its denominator count)) from the summed counts of
    `metrics`, in place, where they are all there."""
    for rate, (parts, total) in rates.items():
        if rate in metrics and total in metrics and all(p in metrics for p in parts):
            metrics[rate] = sum(metrics[p] for p in parts) / max(metrics[total], 1.0)


class ProcessMetrics:
    """Metrics over processes, and their output (see the module's docstring); a part of `OnlineTrainer`."""

    def gather(self, t: Tensor) -> Tensor:
        """Concatenation over processes (rank order) of equally shaped tensors; `t` itself in one process."""
        if self.world == 1:
            return t
        return self.accelerator.gather(t.to(self.accelerator.device)).cpu()

    def reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over processes (float64 kept)."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device).clone(), reduction="sum")

    # counts: summed over processes (averaging them logged a count 1/world of the step's). The annotators' counts
    # too (judge/parse_failures, ...); a rate among them is recomputed from the summed counts (`RATE_METRICS`)
    SUMMED_METRICS = ("reward/failed", "pairs", "judge/pair_parse_failures", "judge/pair_first_wins",
                      "judge/parse_failures", "judge/out_of_range", "judge/answers", "function/failures",
                      "reward_model/truncated", "reward_model/response_truncated")
    # rate -> (its summed numerator counts, its summed denominator count)
    RATE_METRICS = {"judge/failure_rate": (("judge/parse_failures", "judge/out_of_range"), "judge/answers")}
    # the figures of each step's log line, 4 significant digits (`runs.figure`: 4 decimals showed a KL of 6e-06 as 0)
    SHOWN_METRICS = ("reward", "kl", "loss", "completions/mean_length", "entropy")
    GLOBAL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                      "completions/mean_length", "completions/min_length", "completions/max_length",
                      "completions/clipped_ratio", "num_tokens")

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """One row for all processes: counts (`SUMMED_METRICS`) summed and rates (`RATE_METRICS`) recomputed from
        them, the rest averaged over the processes that report them; the metrics `rollout_metrics` computes over all
        processes are the same on every rank."""
        if self.world == 1:
            return metrics
        rows: list[dict[str, float]] = gather_objects(metrics, self.world)
        out: dict[str, float] = {}
        for k in dict.fromkeys(k for r in rows for k in r):
            vals = [float(r[k]) for r in rows if k in r]
            if k in self.SUMMED_METRICS:
                out[k] = sum(vals)
            elif k in ("step", *self.GLOBAL_METRICS) or all(v == vals[0] for v in vals):  # equal on every rank
                out[k] = vals[0]
            else:
                out[k] = sum(vals) / len(vals)
        recompute_rates(out, self.RATE_METRICS)
        return out

    def reward_moments(self, moments: dict[str, tuple[float, float, float]]) -> dict[str, float]:
        """`<key>/mean` and `<key>/std` (Bessel-corrected) over every process, from each process's (count, sum, sum
        of squares) per key (`Scores.moments`; a collective: call it on every rank with the same keys). The
        per-process means and stds were averaged, exact only when every process scored as many items."""
        keys = sorted(moments)
        if not keys:
            return {}
        total = self.reduce_sum(torch.tensor([list(moments[k]) for k in keys], dtype=torch.float64))  # (K, 3)
        return moment_stats(dict(zip(keys, total.tolist())))

    def _trackers(self) -> list[str]:
        """The accelerate trackers of `report_to`; "all": every installed one accelerate has (TensorBoard among
        them, then opened by `start_trackers` into <output_dir>/tensorboard)."""
        names = trackers(self.config.report_to, expand_all=True)
        every = "all" in ([self.config.report_to] if isinstance(self.config.report_to, str) else
                          list(self.config.report_to or []))
        return [n for n in names if n in LOGGER_TYPE_TO_CLASS] if every else names

    def start_trackers(self, start: int = 0) -> None:
        """Open the trackers (`self.trackers`, the Accelerator made with those other than TensorBoard), their project
        named after the run folder (`output_dir`'s name): accelerate names a tracker's project (W&B, Comet, MLflow's
        experiment, ...) by `init_trackers`' project_name, which was "tensorboard", so every W&B run landed in a
        project called "tensorboard". TensorBoard's events stay in <output_dir>/tensorboard (accelerate's own
        TensorBoard tracker writes into <project_dir>/<project_name>); a run resumed at step `start` purges the
        killed run's events from that step on (else both runs' values showed)."""
        self.accelerator.init_trackers(self.output_dir.name)
        if "tensorboard" in self.trackers:
            tensorboard = TensorBoardTracker("tensorboard", str(self.output_dir),
                                             **({"purge_step": start} if start else {}))
            tensorboard.start()
            self.accelerator.trackers.append(tensorboard)  # `accelerator.log` writes to every tracker of this list

    def prepare_metrics_file(self, start: int) -> None:
        """Before a `train` call writes anything: resumed after `start` steps, keep `<output_dir>/metrics.jsonl`'s rows
        up to its checkpoint (rows "step" 0 .. start - 1; the killed run's later rows stayed beside the resumed run's
        rows of the same steps; `alignkit <command> --resume` truncated, a library resume did not). From step 0, a
        metrics.jsonl that already holds rows (an earlier run into this output_dir) is refused: the new rows were
        appended to it, two runs in one file, without a word."""
        path = self.output_dir / METRICS_FILE if self.output_dir is not None else None
        if path is None or not path.is_file():
            return
        if start == 0:
            rows = sum(1 for line in path.read_text().splitlines() if line.strip())
            if rows:
                raise ValueError(f"{type(self).__name__}: {path} already holds {rows} row(s) of an earlier run, and "
                                 "this run starts at step 0, so its rows would be appended to that run's; pass "
                                 "resume_from_checkpoint= to continue that run, or another output_dir (or remove that "
                                 "run's files)")
        elif self.accelerator.is_main_process:
            truncate_metrics(path, start - 1)

    def log(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        shown = ", ".join(f"{k} {figure(metrics[k])}" for k in self.SHOWN_METRICS if k in metrics)
        logger.info("online step %s: %s", int(metrics["step"]) if "step" in metrics else "?", shown)
        if self.output_dir is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")  # NaN stays NaN (json writes `NaN`), never null
        if self.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))


__all__ = ["METRICS_FILE", "ProcessMetrics", "moment_stats", "recompute_rates"]
