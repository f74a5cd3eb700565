"""How to sample responses (`SamplingConfig`): the `sampling:` / `generation:` sections of a config.

A plain dataclass, no torch: `alignkit.online.generation.generate_responses` uses it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from alignkit.settings.typed import ConfigError

logger = logging.getLogger("alignkit.online.generation")


SAMPLERS = (None, "inverse_cdf", "multinomial")


@dataclass
class SamplingConfig:
    """How to sample responses. `top_k=None` and `top_p=1.0` disable those filters."""

    max_new_tokens: int = 64
    num_samples: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    seed: int | None = None
    # how the transformers backend draws a sampled token: None = "inverse_cdf" in alignkit's decode loop and
    # `generate`'s own multinomial where the call falls back to `model.generate`; "inverse_cdf" = one uniform per
    # row against the running sum of the probabilities (the same distribution, ~10-60x less CPU than
    # torch.multinomial, other draws than `generate` under one seed); "multinomial" = `generate`'s exact draws
    sampler: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"SamplingConfig.num_samples must be >= 1, got {self.num_samples}")
        if self.do_sample and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig.temperature must be > 0 when sampling, got {self.temperature} "
                             f"(use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 or None, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingConfig.stop must be a list of non-empty strings, got {self.stop!r}")
        if self.include_stop_str_in_output and not self.stop:  # read only where a stop string cuts the response
            raise ValueError("SamplingConfig.include_stop_str_in_output=True keeps the stop string that ended a "
                             "response in its text, and SamplingConfig.stop is empty, so it would be ignored; set stop "
                             "(the strings to end at) or remove include_stop_str_in_output")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"SamplingConfig.sampler must be one of {', '.join(map(str, SAMPLERS))}, got "
                             f"{self.sampler!r}")
        if self.sampler == "inverse_cdf" and self.stop:
            raise ValueError("SamplingConfig.sampler='inverse_cdf' with stop strings: calls with stop strings sample "
                             "with model.generate, which draws with torch.multinomial; remove sampler (or stop)")
        if self.num_samples > 1 and self.one_answer() is not None:
            logger.warning("%s with num_samples=%d gives identical samples", self.one_answer(), self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def one_answer(self) -> str | None:
        """Why every sample of a prompt is the same answer, or None when samples can differ: greedy decoding
        (do_sample=False), or top_k=1, which keeps only the most likely token at every step, so sampling with it is
        greedy decoding whatever the temperature (transformers' and vLLM's top-k both)."""
        if not self.do_sample:
            return "greedy decoding (do_sample=False)"
        if self.top_k == 1:
            return "top_k=1 (only the most likely token is kept at each step: greedy decoding)"
        return None

    def greedy_ignored(self) -> list[tuple[str, Any]]:
        """(key, value) of the settings only sampling reads that are set away from "no effect" while `do_sample` is
        false: greedy decoding ignores them (temperature, top_p, top_k, sampler; a seed changes nothing either,
        harmlessly). Online trainers may read `temperature` for their log-probs, so only the generation commands
        refuse these (`refuse_greedy_ignored`)."""
        if self.do_sample:
            return []
        return [(k, v) for k, v, none in (("temperature", self.temperature, 1.0), ("top_p", self.top_p, 1.0),
                                          ("top_k", self.top_k, None), ("sampler", self.sampler, None))
                if v != none and not (k == "top_k" and v == 0)]


def refuse_greedy_ignored(cfg: SamplingConfig, section: str, default_note: str = "") -> None:
    """ConfigError naming the first sampling-only setting greedy decoding would ignore (`greedy_ignored`): a user
    who sets a temperature expects samples and would get the greedy answer, exit 0. num_samples > 1 with greedy
    decoding (copies of one answer) is refused too."""
    ignored = cfg.greedy_ignored()
    if ignored:
        key, value = ignored[0]
        raise ConfigError(f"{section}.{key}={value!r} is read only when sampling, but {section}.do_sample is false "
                         f"(greedy decoding{default_note}), so it would be ignored; set {section}.do_sample: true to "
                         f"sample, or remove {section}.{key}")
    if cfg.one_answer() is None or cfg.num_samples < 2:  # (SamplingConfig.one_answer decides it, in one place)
        return
    n = cfg.num_samples
    if cfg.do_sample:
        raise ConfigError(f"{section}.num_samples={n} with {section}.top_k=1 (only the most likely token is kept at "
                          f"each step: greedy decoding) writes {n} identical responses per prompt; remove "
                          f"{section}.top_k (or set it above 1), or {section}.num_samples: 1")
    raise ConfigError(f"{section}.num_samples={n} with {section}.do_sample false (greedy decoding{default_note}) "
                      f"writes {n} identical responses per prompt; set {section}.do_sample: true to sample, or "
                      f"{section}.num_samples: 1")


__all__ = ["SamplingConfig", "SAMPLERS", "refuse_greedy_ignored"]
