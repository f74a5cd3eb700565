"""Typed config of `alignkit serve` (no torch import; the engine reads it in `alignkit.cli.serve`).

    command: serve
    base: runs/sft/model              # a model folder, or tiny:<arch> (a random tiny model built locally)
    adapters: {polite: runs/dpo-reft/model, terse: runs/dpo-lora/model}
    port: 8000
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from alignkit.settings.sections import DType
from alignkit.settings.tiny import tiny_arch
from alignkit.settings.typed import ConfigError


@dataclass
class ServeConfig:
    base: str  # the base model's folder (or tiny:<arch>)
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> adapter folder (save_adapter's)
    base_name: str | None = None  # the base's served name; default: its folder's name ("tiny-<arch>" for tiny:)
    # "vllm": vLLM's OpenAI server (LoRA adapters and full models; alignkit.serve.vllm_server)
    engine: Literal["alignkit", "vllm"] = "alignkit"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # or the ALIGNKIT_API_KEY environment variable (keeps the key out of files)
    dtype: DType = "float32"
    # the base's RoPE scaling, as model.rope_scaling in training (alignkit.models.rope): an adapter trained with one
    # is refused on a base without it
    rope_scaling: dict[str, Any] | None = None
    device: str | None = None  # default: cuda if available, else cpu
    max_batch_rows: int = 32
    max_queue: int = 256
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    # max_tokens of a request that sets none; null: the context left after its prompt, capped by max_new_tokens (as
    # vLLM's server and OpenAI's API default to the context left); a number set is capped by the context left too
    default_max_tokens: int | None = None
    request_timeout: float = 120.0
    output_dir: str | None = None  # metrics.jsonl, tensorboard/serve/ and plots/ of this server (null: none written)
    log_every: float = 30.0  # seconds between two metrics rows (with output_dir)

    def __post_init__(self) -> None:
        tiny_arch(self.base, "base")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not a TCP port (0-65535)")
        for key in ("max_batch_rows", "max_queue", "max_prompt_tokens", "max_new_tokens", "default_max_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not self.log_every >= 1:  # TensorBoard's steps are whole seconds (serve/log.py): closer rows shared them
            raise ConfigError(f"log_every: must be >= 1 second (the TensorBoard steps of the serve log are whole "
                              f"seconds since its first start), got {self.log_every}")
        if self.request_timeout <= 0:
            raise ConfigError(f"request_timeout: must be > 0 seconds, got {self.request_timeout}")
        if self.engine == "vllm":
            self._refuse_engine_keys()
        elif self.default_max_tokens is not None and self.default_max_tokens > self.max_new_tokens:
            # a value set above it would be capped without a word
            raise ConfigError(f"default_max_tokens: {self.default_max_tokens} exceeds max_new_tokens "
                              f"({self.max_new_tokens}), the most a request may ask for: a request without "
                              f"max_tokens would get {self.max_new_tokens}; lower default_max_tokens or raise "
                              f"max_new_tokens")

    # read by alignkit's own engine alone; `engine: vllm` starts vLLM's server with host, port, dtype, the API key and
    # a max model length (max_prompt_tokens + max_new_tokens), and vLLM schedules, batches and places by itself
    ENGINE_ONLY = ("output_dir", "log_every", "device", "max_batch_rows", "max_queue", "default_max_tokens",
                   "request_timeout", "rope_scaling")

    def _refuse_engine_keys(self) -> None:
        """ConfigError naming the first ENGINE_ONLY key set away from its default with engine=vllm."""
        if self.output_dir is not None:
            raise ConfigError("output_dir: the serve log (metrics.jsonl, TensorBoard, plots) is written by alignkit's "
                              "engine; with engine=vllm read vLLM's own /metrics instead, or drop output_dir")
        defaults = {f.name: f.default for f in fields(ServeConfig)}
        for key in self.ENGINE_ONLY:
            if getattr(self, key) != defaults[key]:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is read only by alignkit's engine, and engine=vllm "
                                  "runs vLLM's own server (it schedules, batches and places the model itself), so it "
                                  f"would be ignored; remove {key} (set vLLM's own options when you start it "
                                  "yourself) or use engine=alignkit")


__all__ = ["ServeConfig"]
