"""What `alignkit serve --output-dir DIR` leaves behind, as every other command does: metrics, TensorBoard, plots.

A `ServeLog` thread samples the engine's counters every `every` seconds and writes one row per sample:

    DIR/metrics.jsonl                   one JSON object per sample, appended (a restart adds rows, never truncates);
                                        the first row of each start has "event": "start"
    DIR/tensorboard/serve/              the same numbers as scalars, step = seconds since the folder's first start
                                        (its first row's `time`), so a restart continues the curves; a row in the
                                        same whole second as the one before (the stop right after a sample) takes
                                        the next step, so each step holds one value
    DIR/plots/serve-*.png               drawn when the server stops, from every row of metrics.jsonl (every start):
                                        tokens/s, requests, latency against `elapsed_s`, seconds since the first start

A row holds the totals since this start (`requests`, `generated_tokens`, per model under `requests/<name>` and
`tokens/<name>`, failures by reason, `short_reft_prompts`: prompts shorter than their ReFT adapter's positions need,
per model under `short_reft_prompts/<name>` once one came) and what happened in the interval since the previous row:
`tokens_per_second`, `requests_per_second`, `mean_latency_s` and `mean_ttft_s` of the requests finished in it
(absent when none did), plus the engine's `queue_depth` and `running_rows` at sampling time. The engine thread alone
updates the counters; this thread only reads them (a counter dict that changes while it is copied is read again).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from alignkit.runs import plot_metrics
from alignkit.serve.engine import Engine
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

SERVE_PLOTS: dict[str, tuple[str, ...]] = {
    "serve-throughput": ("tokens_per_second", "requests_per_second"),
    "serve-latency": ("mean_latency_s", "mean_ttft_s"),
    "serve-load": ("queue_depth", "running_rows"),
}
_FAILURES = ("errors", "timeouts", "cancelled", "rejected")


def _copy(counter: Any) -> dict[str, int]:
    for _ in range(10):  # the engine thread may add a key while we copy
        try:
            return dict(counter)
        except RuntimeError:
            continue
    return dict(counter)


def check_log_file(path: Path) -> None:
    """ConfigError when `path` (the serve log's metrics.jsonl) already holds rows that are not the serve log's (its
    first row has no `uptime_s`): another command's, e.g. a training run's when --output-dir names the run folder.
    The server appended its rows to them, so that run's metrics.jsonl held two runs' rows, read back as one (final
    metrics, plots, a --resume's cut). The serve log's own file is appended to, as before."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is not None and not first.endswith("\n") and first.startswith('{"time": '):
        return  # the serve log's first row, cut by a kill while it was written (`ServeLog.start` drops it)
    try:
        row = json.loads(first) if first is not None else {}
    except ValueError:
        row = None
    if not isinstance(row, dict) or (first is not None and "uptime_s" not in row):
        raise ConfigError(f"output_dir: {path} holds rows that are not the serve log's (another run's metrics, e.g. "
                          "a training run's folder); the server would append its rows to them; choose another "
                          f"--output-dir (e.g. {path.parent / 'serve'})")


class ServeLog:
    """Samples `engine.stats` every `every` seconds into `folder` (see the module docstring)."""

    def __init__(self, engine: Engine, folder: str | Path, every: float = 30.0) -> None:
        if every <= 0:
            raise ValueError(f"log_every: must be > 0 seconds, got {every}")
        self.engine, self.folder, self.every = engine, Path(folder), float(every)
        self.path = self.folder / "metrics.jsonl"
        check_log_file(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: Any = None
        self._rows: list[dict[str, Any]] = []
        self._t0 = self._last_t = 0.0
        self._origin = 0.0  # time.time() of the folder's first row: TensorBoard steps and plots count from it
        self._step = -1  # the TensorBoard step of the folder's last row
        self._last: dict[str, float] = {}
        self._stopped = False
        self._plots: list[Path] = []  # what `stop` drew

    def _totals(self) -> dict[str, float]:
        s = self.engine.stats
        requests, tokens, short = _copy(s.requests), _copy(s.tokens), _copy(s.short_prompts)
        return {"requests": sum(requests.values()), "generated_tokens": sum(tokens.values()),
                "short_reft_prompts": sum(short.values()), **{f"short_reft_prompts/{k}": v for k, v in short.items()},
                "latency_count": sum(s.latency), "latency_sum": s.latency_sum, "ttft_sum": s.ttft_sum,
                **{f"requests/{k}": v for k, v in requests.items()}, **{f"tokens/{k}": v for k, v in tokens.items()},
                **{k: getattr(s, k) for k in _FAILURES}}

    def sample(self, event: str | None = None) -> dict[str, Any]:
        """Take one row now, write it (JSONL + TensorBoard) and return it."""
        now = time.monotonic()
        totals = self._totals()
        dt = max(now - self._last_t, 1e-9)
        done = totals["latency_count"] - self._last.get("latency_count", 0)
        row: dict[str, Any] = {"time": time.time(), "uptime_s": round(now - self._t0, 6),
                               **({"event": event} if event else {}),
                               **{k: v for k, v in totals.items() if k not in ("latency_count", "latency_sum",
                                                                              "ttft_sum")},
                               "queue_depth": self.engine.queue_depth, "running_rows": self.engine.running_rows}
        if self._last:  # rates over the interval since the previous row
            row["tokens_per_second"] = (totals["generated_tokens"] - self._last["generated_tokens"]) / dt
            row["requests_per_second"] = (totals["requests"] - self._last["requests"]) / dt
            if done:
                row["mean_latency_s"] = (totals["latency_sum"] - self._last["latency_sum"]) / done
                row["mean_ttft_s"] = (totals["ttft_sum"] - self._last["ttft_sum"]) / done
        self._last, self._last_t = totals, now
        self._append(json.dumps(row) + "\n")
        if self._writer is not None:
            # rows in one second: one step each
            self._step = max(int(round(row["time"] - self._origin)), self._step + 1)
            for k, v in row.items():
                if k not in ("time", "uptime_s", "event") and isinstance(v, (int, float)):
                    self._writer.add_scalar(f"serve/{k}", v, self._step)
            self._writer.flush()
        self._rows.append(row)
        return row

    def _append(self, line: str) -> None:
        """Append one row (a previous start's rows stay). A write that fails part-way (a full disk) is cut back to
        the rows before it, so the next row does not run on from half of this one (both unreadable)."""
        size = self.path.stat().st_size if self.path.is_file() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            try:
                os.truncate(self.path, size)
            except OSError:
                pass
            raise

    def _cut_tail(self) -> None:
        """A row cut by a kill (or a full disk) while it was written is the file's last line without its newline:
        the next start's first row ran on from it, so both were unreadable. Dropped, with one warning."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError:
            return
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        os.truncate(self.path, keep)
        logger.warning("serve metrics: %s ended in a row cut part-way (%d byte(s) without a newline: a kill or a full "
                       "disk while it was written); that row was dropped, the %d byte(s) before it are kept",
                       self.path, len(data) - keep, keep)

    def start(self) -> "ServeLog":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cut_tail()
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard" / "serve"))
        self._t0 = self._last_t = time.monotonic()
        previous = self._read_rows()  # a restart: steps go on from the first start's, not from 0 again
        self._origin = float(previous[0]["time"]) if previous else time.time()
        self._step = -1
        for r in previous:  # the steps the previous starts' rows took
            self._step = max(int(round(float(r["time"]) - self._origin)), self._step + 1)
        self._last = {}
        self._stopped, self._plots = False, []
        self._stop.clear()  # a second start on this object: the first stop's event ended its loop at once
        self.sample("start")
        self._thread = threading.Thread(target=self._loop, name="alignkit-serve-log", daemon=True)
        self._thread.start()
        logger.info("serve metrics every %gs to %s", self.every, self.path)
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except OSError as e:  # a full disk must not take the server down: say it once per failure
                logger.warning("serve metrics: could not write %s: %s", self.path, e)

    def stop(self) -> list[Path]:
        """Last row, TensorBoard closed, plots drawn from every start's rows. Returns the plot files. Once only: a
        second call (the server's `finally` after its shutdown hook) returns them again and writes nothing."""
        if self._stopped:
            return self._plots
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.every + 5)
            self._thread = None
        self.sample("stop")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        rows = [{**r, "elapsed_s": r["time"] - self._origin} for r in self._read_rows() or self._rows]
        self._plots = plot_metrics(rows, self.folder / "plots", plots=SERVE_PLOTS, x="elapsed_s")
        return self._plots

    def _read_rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl that carry a numeric `time` (every start's; a damaged line is skipped)."""
        rows: list[dict[str, Any]] = []
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("time"), (int, float)):
                        rows.append(row)
        except OSError:
            pass
        return rows


__all__ = ["SERVE_PLOTS", "ServeLog"]
