"""Request bookkeeping of the serving engine (`serve/engine.py` runs the batching loop): what a request asks for
(`SamplingParams`, checked against the `EngineConfig` limits), what it holds while it runs (`Request`), what its
consumer is told (`Event`), and the errors that refuse it (`RequestError` 400, `QueueFullError` 429, `EngineStopped`
503, `ModelChanged` 409). `check_prompt` checks a prompt against the limits and the model's context before it is queued
(the default max_tokens shrinks to the context left after it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from alignkit.online.generation import special_token_in, special_tokens
from alignkit.serve.stack import Route

FINISH_STOP, FINISH_LENGTH = "stop", "length"
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # a signed 64-bit seed, as OpenAI's and vLLM's APIs take


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_queue`: try again later (HTTP 429)."""


SHUTTING_DOWN = "the server is shutting down"  # the message of a request it stopped or will not take: HTTP 503


class EngineStopped(RuntimeError):
    """The engine was stopped: no request is taken (HTTP 503, which OpenAI clients retry)."""


class ModelChanged(RuntimeError):
    """The files a served model was loaded from changed on disk since (`Stack.changed`): its answers would come from
    the weights loaded before, not from the folder the name stands for (HTTP 409)."""


class RequestError(ValueError):
    """A request the engine cannot take (prompt or max_tokens past the limits, bad sampling values): HTTP 400.
    `param`: the request field at fault ("prompt", "max_tokens", ...), the API error's `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class EngineConfig:
    max_batch_rows: int = 32  # rows decoded together (a request with n choices takes n)
    max_queue: int = 256  # waiting requests; more -> QueueFullError
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512  # the largest max_tokens a request may ask for
    # max_tokens of a request that sets none; None: the context left after its prompt, capped by max_new_tokens (as
    # vLLM's server and OpenAI's API default to the context left: a fixed 64 cut most answers short)
    default_max_tokens: int | None = None
    request_timeout: float = 120.0  # seconds from submission; past it the request ends with an error
    max_prefill_tokens: int = 8192  # padded prompt tokens per prefill forward (admission stops there)


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    n: int = 1

    def check(self, cfg: EngineConfig) -> None:
        """Refuse values no request may have (RequestError naming the field); `max_tokens` None is left for
        `Engine.submit`, which knows the prompt (the default shrinks to the context left after it)."""
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.max_tokens is not None and self.max_tokens > cfg.max_new_tokens:
            raise RequestError(f"max_tokens={self.max_tokens} exceeds this server's limit of {cfg.max_new_tokens}",
                               "max_tokens")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.n, int) or not 1 <= self.n <= cfg.max_batch_rows:
            raise RequestError(f"n must be an integer in [1, {cfg.max_batch_rows}], got {self.n!r}", "n")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be at most 4 non-empty strings", "stop")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed
                                          and self.seed + self.n - 1 <= SEED_MAX):
            # choice i draws from seed + i (a 64-bit torch.Generator seed)
            raise RequestError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX - self.n + 1}] "
                               f"(n={self.n} choices use seed .. seed + n - 1), got {self.seed!r}", "seed")


def special_stop_ids(tokenizer: Any, stop: Sequence[str]) -> frozenset:
    """The ids of the special tokens that stop strings name exactly (`<|im_start|>`): the engine decodes without
    special tokens, so such a stop string never matches the text; it ends the row when its token is drawn (finish
    reason "stop", the token not in the text, as an end token). A stop string holding a special token's text with
    other text around it (`"\\n<|im_end|>"`) could never match: a RequestError naming `stop`."""
    special = special_tokens(tokenizer)
    ids = set()
    for s in stop:
        if s in special:
            ids.add(int(special[s]))
            continue
        held = special_token_in(special, s)
        if held is not None:
            raise RequestError(f"stop: {s!r} holds the special token {held!r} with other text; generated text is "
                               f"decoded without special tokens, so it would never match: give {held!r} alone "
                               f"(it stops on that token) or the text without it", "stop")
    return frozenset(ids)


@dataclass
class Event:
    """What the engine tells a request's consumer. kind: "token" (text delta of choice `index`), "done"
    (choice `index` finished with `finish_reason`), "end" (the whole request is over), "error"."""

    kind: str
    index: int = 0
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    message: str | None = None


@dataclass
class Request:
    id: str
    route: Route
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    created: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    cancelled: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None
    rows_left: int = 0
    completion_tokens: int = 0
    error: str | None = None
    stop_ids: frozenset = frozenset()  # tokens a stop string names exactly (`special_stop_ids`): end the row as "stop"
    end_ids: frozenset = frozenset()  # the end tokens of this request (`Engine.end_ids` for chat, else `text_end_ids`)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (client went away)."""
        self.cancelled = True


def check_prompt(prompt_ids: Sequence[int], params: SamplingParams, cfg: EngineConfig, context: int | None,
                 vocab: int) -> list[int]:
    """`prompt_ids` as ints when a request may have them (RequestError naming `prompt` or `max_tokens`): not empty,
    every id below `vocab` (the model's embedding rows), at most `cfg.max_prompt_tokens`, and the prompt plus
    max_tokens within `context` (the model's trained context; None: not known). A `params.max_tokens` of None is set
    here to `cfg.default_max_tokens` (None: `cfg.max_new_tokens`), shrunk to the context left after the prompt (vLLM's
    and OpenAI's default is the context left; `max_new_tokens` is this server's cap on any request)."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise RequestError("the prompt has no tokens", "prompt")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:  # the embedding lookup would raise in the engine thread and fail the whole batch
        raise RequestError(f"the prompt holds token id {bad}; this model's token ids are 0 .. {vocab - 1}",
                           "prompt")
    if len(prompt_ids) > cfg.max_prompt_tokens:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                           f"{cfg.max_prompt_tokens}", "prompt")
    room = None if context is None else context - len(prompt_ids)
    if room is not None and room < 1:  # whatever max_tokens says (a 400 naming max_tokens told to lower it, in vain)
        raise RequestError(f"this model's context is {context} tokens and the prompt has "
                           f"{len(prompt_ids)}: no room for a new token; shorten the prompt to at most "
                           f"{context - 1} tokens", "prompt")
    if params.max_tokens is None:  # the context left after the prompt (vLLM / OpenAI), capped by the server's limit
        default = cfg.max_new_tokens if cfg.default_max_tokens is None else cfg.default_max_tokens
        params.max_tokens = min(default, cfg.max_new_tokens, *(() if room is None else (room,)))
    elif room is not None and params.max_tokens > room:
        raise RequestError(f"this model's context is {context} tokens; the prompt has {len(prompt_ids)} "
                           f"and max_tokens is {params.max_tokens}: lower max_tokens or shorten the prompt",
                           "max_tokens")
    return prompt_ids


def non_finite_message(row: Any) -> str:
    """The error a request gets when its row's next-token logits are not finite (`Engine._sample`)."""
    req = row.request
    return (f"the model's next-token logits for this request (model {req.route.name!r}, choice {row.index}, completion "
            f"token {len(row.tokens) + 1}) are NaN or inf, so no token drawn from them means anything; the request "
            "ended there (the other requests of its batch are served). Check the adapter's weights, or serve with "
            "--dtype float32 / bfloat16 if it ran in float16 (overflow)")


__all__ = ["FINISH_LENGTH", "FINISH_STOP", "SEED_MAX", "SEED_MIN", "SHUTTING_DOWN", "EngineConfig", "EngineStopped",
           "Event", "ModelChanged", "QueueFullError", "Request", "RequestError", "SamplingParams", "check_prompt",
           "non_finite_message", "special_stop_ids"]
