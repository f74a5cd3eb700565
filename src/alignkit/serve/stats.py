"""`EngineStats`: the serving engine's counters (requests, tokens, failures, forward passes, latency histograms),
updated by the engine thread only and read by the /metrics endpoint (`serve.api`) and the run folder's sampler
(`serve.log.ServeLog`)."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignkit.serve.request import Request


class EngineStats:
    """Counters the /metrics endpoint reads (updated by the engine thread only)."""

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    RATE_WINDOW_S = 10.0  # tokens_per_second's window: the tokens of the last RATE_WINDOW_S seconds are kept

    def __init__(self) -> None:
        self.requests: dict[str, int] = collections.Counter()  # finished OK, per model
        self.tokens: dict[str, int] = collections.Counter()  # generated tokens, per model
        # prompts shorter than their ReFT adapter's positions need (edited at fewer positions), per model
        self.short_prompts: dict[str, int] = collections.Counter()
        self.errors = self.timeouts = self.cancelled = self.rejected = 0
        self.forwards = 0
        self.forward_seconds = 0.0
        self.prefill_tokens = 0
        self.decode_rows = 0
        self.latency = [0] * (len(self.LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.ttft = [0] * (len(self.LATENCY_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def add_forward(self, seconds: float, prefill_tokens: int = 0, decode_rows: int = 0) -> None:
        self.forwards += 1
        self.forward_seconds += seconds
        self.prefill_tokens += prefill_tokens
        self.decode_rows += decode_rows

    def add_tokens(self, model: str, n: int) -> None:
        self.tokens[model] += n
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - self.RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Tokens generated in the last RATE_WINDOW_S seconds, per second."""
        now = time.monotonic()
        recent = list(self._recent)
        return sum(n for t, n in recent if t >= now - self.RATE_WINDOW_S) / self.RATE_WINDOW_S

    def finish(self, req: Request) -> None:
        self.requests[req.route.name] += 1
        lat = req.finished_at - req.created
        ttft = (req.first_token_at or req.finished_at) - req.created
        for hist, value in ((self.latency, lat), (self.ttft, ttft)):
            i = next((k for k, b in enumerate(self.LATENCY_BUCKETS) if value <= b), len(self.LATENCY_BUCKETS))
            hist[i] += 1
        self.latency_sum += lat
        self.ttft_sum += ttft


__all__ = ["EngineStats"]
