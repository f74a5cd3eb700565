"""Typed config of `alignkit augment` (no torch import).

    command: augment
    strategy: paraphrase                 # code_bugs | paraphrase | instructions | summarize | entities
    data: {path: prompts.jsonl}          # rows (JSONL/JSON/Parquet), .py files, or .txt/.md documents
    options: {n: 2}                      # the strategy's own options (alignkit.augment.strategies)
    llm:                                 # not needed by code_bugs
      kind: openai                       # any OpenAI-compatible endpoint: alignkit serve, vLLM, a hosted API
      base_url: http://127.0.0.1:8000/v1
      model: base
      api_key_env: OPENAI_API_KEY        # the key is read from this variable, never written in a config
      requests_per_minute: 60
      concurrency: 8                     # requests in flight at once (default 1); records still in input order
    filters: {min_chars: 8, max_chars: 4000, dedup: true}
    output_dir: runs/augment             # augmented.jsonl, summary.json, config.yaml, cache/
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.settings.sections import DataSettings, DType, refuse_ignored_data
from alignkit.settings.tiny import tiny_arch
from alignkit.settings.typed import ConfigError, build


@dataclass
class LLMSettings:
    kind: Literal["openai", "local"] = "openai"
    # openai: an OpenAI-compatible endpoint
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the model's name at the endpoint
    api_key_env: str | None = None  # environment variable holding the API key
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0  # seconds before the first retry, doubled each time (a Retry-After header wins if longer)
    requests_per_minute: float | None = None  # one limit for all concurrent requests
    concurrency: int = 1  # requests in flight at once (threads); the records are written in input order either way
    # local: a model in this process
    path: str | None = None  # a model folder, or tiny:<arch> (random: smoke tests only)
    dtype: DType = "float32"
    # both
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0
    cache: bool = True  # reuse answers to identical requests (on disk), so a rerun does not pay twice
    cache_dir: str | None = None  # default <output_dir>/cache

    def __post_init__(self) -> None:
        if self.kind == "openai":
            for key in ("base_url", "model"):
                if getattr(self, key) is None:
                    raise ConfigError(f"llm.{key}: required for kind 'openai' (e.g. base_url: http://127.0.0.1:8000/v1,"
                                      " model: the served model's name)")
            if self.path is not None:
                raise ConfigError("llm.path: only for kind 'local'; an openai endpoint is set by base_url and model")
            if self.dtype != LLM_DEFAULTS["dtype"]:
                raise ConfigError(f"llm.dtype: {self.dtype} is read only by kind 'local' (the model loaded in this "
                                  "process); an openai endpoint serves its model in its own dtype, so it would be "
                                  "ignored; remove llm.dtype")
        else:
            if self.path is None:
                raise ConfigError("llm.path: required for kind 'local' (a model folder, or tiny:llama to try it)")
            tiny_arch(self.path, "llm.path")
            for key in ("base_url", "api_key_env", "requests_per_minute"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"llm.{key}: only for kind 'openai'")
            for key in ("timeout", "retries", "backoff"):  # the HTTP client's: a local model sends no request
                if getattr(self, key) != LLM_DEFAULTS[key]:
                    raise ConfigError(f"llm.{key}: {getattr(self, key)} is read only by kind 'openai' (an HTTP "
                                      "endpoint's requests), and kind 'local' runs the model in this process, so it "
                                      f"would be ignored; remove llm.{key}")
            if self.concurrency > 1:
                raise ConfigError(f"llm.concurrency: {self.concurrency}; a local model answers one request at a "
                                  "time (concurrency is for kind 'openai': alignkit serve, vLLM, a hosted API); set "
                                  "llm.concurrency: 1 or remove it")
        if self.concurrency < 1:
            raise ConfigError(f"llm.concurrency: {self.concurrency}; the requests in flight at once, an integer >= 1 "
                              "(1: one at a time)")
        if self.max_tokens < 1 or self.temperature < 0 or self.retries < 0:
            raise ConfigError("llm: max_tokens must be >= 1, temperature >= 0, retries >= 0")
        if not self.cache and self.cache_dir is not None:
            raise ConfigError(f"llm.cache_dir: {self.cache_dir} is where answers are cached, and llm.cache is false, "
                              "so it would be ignored (nothing read or written there); remove llm.cache_dir or set "
                              "llm.cache: true")


LLM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LLMSettings)}


@dataclass
class FilterSettings:
    min_chars: int = 1
    max_chars: int | None = 20000
    dedup: bool = True
    printable: bool = True  # drop text holding control characters (other than newline, tab) or U+FFFD

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ConfigError(f"filters.min_chars: {self.min_chars}; a length, >= 0")
        if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
            raise ConfigError(f"filters.max_chars: {self.max_chars} is below filters.min_chars ({self.min_chars}) or "
                              "1, so every record would be dropped; raise max_chars (or null for no limit)")


AUGMENT_DATA_KEYS = ("path", "max_records")  # what augment reads of `data` (augment/pipeline.py:read_sources)


@dataclass
class AugmentConfig:
    strategy: str
    data: DataSettings = field(default_factory=DataSettings)  # path (file(s)) and max_records are used
    options: dict[str, Any] = field(default_factory=dict)
    llm: LLMSettings | None = None
    filters: FilterSettings = field(default_factory=FilterSettings)
    overwrite: bool = False  # replace an earlier augment's outputs of another config (--overwrite sets it)
    output_dir: str = "runs/augment"

    def __post_init__(self) -> None:
        from alignkit.augment.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r} is not registered; valid: {', '.join(STRATEGIES)}")
        if self.data.path is None:
            raise ConfigError("data.path: required; the rows, .py files or documents to augment")
        refuse_ignored_data(self.data, lambda name: name not in AUGMENT_DATA_KEYS,
                            "{key}: alignkit augment reads only the rows of data.path (the first data.max_records), "
                            "so it would ignore {key}; remove it")
        spec = STRATEGIES[self.strategy]
        if spec.needs_llm and self.llm is None:
            raise ConfigError(f"llm: strategy {self.strategy!r} prompts a language model; set llm.kind openai "
                              "(base_url, model) or local (path)")
        if not spec.needs_llm and self.llm is not None:
            raise ConfigError(f"llm: strategy {self.strategy!r} uses no language model; remove the llm section")
        self.strategy_options()  # check the options now

    def strategy_options(self) -> Any:
        """The strategy's options dataclass built from `options`, errors naming `options.<key>`."""
        from alignkit.augment.strategies import STRATEGIES

        cls = STRATEGIES[self.strategy].options
        try:
            return build(cls, dict(self.options), "options")
        except ConfigError as e:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            msg = str(e)
            raise ConfigError(msg if "Valid keys" in msg else f"{msg} (options of {self.strategy}: {valid})") from None


__all__ = ["AUGMENT_DATA_KEYS", "AugmentConfig", "FilterSettings", "LLMSettings"]
