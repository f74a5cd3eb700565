"""The language model an augmentation strategy prompts: an OpenAI-compatible endpoint, or a local model in-process.

    llm = OpenAIChat("http://127.0.0.1:8000/v1", model="base")        # alignkit serve, vLLM, a hosted API
    llm = LocalChat.from_path("path/to/model")                         # transformers, in this process
    llm = Cached(llm, "runs/augment/cache")                            # a rerun does not pay twice
    text = llm.chat([{"role": "user", "content": "Paraphrase: ..."}], max_tokens=128, temperature=0.7)

`OpenAIChat` speaks `POST {base_url}/chat/completions` over plain HTTP (urllib, no extra dependency), with retries (HTTP
429 / 5xx / connection errors, exponential backoff honouring `Retry-After`), a rate limit (at most
`requests_per_minute`, spaced evenly) and a timeout. The API key is read from an environment variable (`api_key_env`),
never from a config file. `Cached` keys each request on (the client's `identity`: endpoint and model for
`OpenAIChat`; the model, its dtype (unless float32) and `online.digests.model_digest` (weights, tokenizer, the
generation options model.generate applies: computed once per client) for `LocalChat`; messages, sampling settings,
seed) -> a JSON file written atomically under the cache folder; a cache hit makes no request (an entry under
LocalChat's older key, name and dtype alone, is asked again, with one warning). Every client has a `name` (the model,
recorded in each output record's provenance).

Concurrency (`llm.concurrency`, the pipeline's `Context.map`): `OpenAIChat` and `Cached` may be called from
several threads at once. The rate limit is one limit for all of them (each call reserves the next free slot),
the request / hit counters are locked, and `Cached` lets one thread ask for a given request while another
asking the same waits for its answer (one request, then a cache hit: the counts of a sequential run).
`LocalChat` answers one request at a time (`max_concurrency = 1`: the pipeline refuses more).

An answer the model did not finish (the endpoint's `finish_reason` "length": cut at max_tokens; "content_filter":
stopped by the endpoint's filter; a local model that made max_tokens tokens without its end token) is not returned
as if whole: `chat` raises `AnswerCutOff` (its `reason`, its `content`), the strategies drop that candidate and the
pipeline counts it under the reason in summary.json, with a warning. `Cached` keeps such an answer with its reason,
so a rerun drops it again without asking (raise max_tokens: another cache key, a new request), and a finished one
with `finished: true`; an entry with neither (written before finish reasons were recorded: it may hold a cut
answer) is asked again, with a warning. A finish_reason that is missing (some servers send none) or anything else
("stop", "tool_calls") counts as finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from alignkit.files import atomic_write_text

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class LLMError(RuntimeError):
    """A request that failed for good (after retries), with the endpoint's own message."""


CUT_AT_MAX_TOKENS = "answer cut off at max_tokens"  # the drop reasons (summary.json) of an unfinished answer
CONTENT_FILTERED = "answer stopped by the endpoint's content filter"
UNFINISHED = {"length": CUT_AT_MAX_TOKENS, "content_filter": CONTENT_FILTERED}  # finish_reason -> drop reason


class AnswerCutOff(Exception):
    """An answer the model did not finish (`UNFINISHED`): `reason` is the drop reason, `content` what came back."""

    def __init__(self, reason: str, content: str = "") -> None:
        super().__init__(reason)
        self.reason, self.content = reason, content


class ChatModel(Protocol):
    name: str

    def chat(self, messages: Messages, *, max_tokens: int, temperature: float, seed: int | None = None) -> str: ...


class RateLimiter:
    """At most `per_minute` calls a minute, spaced evenly (None: no limit). Thread-safe."""

    def __init__(self, per_minute: float | None, clock=time.monotonic, sleep=time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Reserve the next free slot (under the lock, so threads share one limit), then sleep until it."""
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self.sleep(slot - now)


class OpenAIChat:
    """An OpenAI-compatible chat endpoint (`{base_url}/chat/completions`). Thread-safe: one rate limit for all
    threads, each request retried on its own."""

    RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
    max_concurrency: int | None = None  # any number of requests at once

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, requests_per_minute: float | None = None,
                 sleep=time.sleep, clock=time.monotonic) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = self.name = model
        # what answers: two servers may serve different models under one name (cache entries were shared)
        self.identity = {"endpoint": self.url, "model": model}
        self.api_key, self.timeout, self.retries, self.backoff = api_key, timeout, retries, backoff
        self.limiter = RateLimiter(requests_per_minute, clock=clock, sleep=sleep)
        self.sleep = sleep
        self.requests = 0  # HTTP requests sent (retries included)
        self._count_lock = threading.Lock()

    def chat(self, messages: Messages, *, max_tokens: int, temperature: float, seed: int | None = None) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            self.limiter.wait()
            with self._count_lock:
                self.requests += 1
            delay = self.backoff * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode())
                return _content(reply, self.url)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {_error_message(e)}"
                if e.code not in self.RETRY_STATUS:
                    raise LLMError(f"{self.url}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                logger.warning("%s: %s; retry %d/%d in %.1f s", self.url, last, attempt + 1, self.retries, delay)
                self.sleep(delay)
        raise LLMError(f"{self.url}: gave up after {self.retries + 1} attempts; last error: {last}. Check that the "
                       f"server (llm.base_url) is up and serves {self.model!r} (llm.model), or allow more tries "
                       "(llm.retries, llm.backoff); answers already received are cached and a rerun reuses them")


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read().decode())
        return str(body.get("error", {}).get("message") or body)
    except Exception:
        return str(e.reason)


def _content(reply: dict, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"{url}: reply is not a chat completion (no choices[0].message.content): "
                       f"{json.dumps(reply)[:200]}") from None
    content = content if isinstance(content, str) else ""
    finish = reply["choices"][0].get("finish_reason") if isinstance(reply["choices"][0], dict) else None
    if finish in UNFINISHED:  # not whole: a truncated training target if it were used
        raise AnswerCutOff(UNFINISHED[finish], content)
    return content


class LocalChat:
    """A causal LM in this process (transformers `generate`), prompted through its chat template (or the
    plain concatenated messages when it has none). One request at a time: `generate` runs one prompt, and a
    seed is set on torch's global generator. Sampled at `temperature` alone (top_p / top_k / repetition_penalty
    pinned off, as every alignkit generation path does); the model folder's generation_config.json values for them are
    not used, and its options beyond them (no_repeat_ngram_size, ...) are applied by model.generate: both are named in
    one warning each, on the first request."""

    max_concurrency: int | None = 1

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.requests = 0
        self._noted = False  # the folder's generation options were logged (`_note_folder_options`)
        # the cache key's model part before it held the answering model's digest (`Cached` warns on those entries);
        # a dtype other than float32 answers otherwise (llm.dtype: bfloat16 used to read back float32's answers)
        dtype = str(getattr(model, "dtype", "torch.float32")).removeprefix("torch.")
        self.legacy_identity = {"model": name} if dtype == "float32" else {"model": name, "dtype": dtype}
        self._identity: dict[str, Any] | None = None
        self._identity_lock = threading.Lock()

    @property
    def identity(self) -> dict[str, Any]:
        """The cache key's model part: the name (and dtype), and, computed once per client (one pass over the
        weights), `online.digests.model_digest`: the weights, the tokenizer and its chat template, and the generation
        options the folder's generation_config.json makes model.generate apply. The name alone let a model retrained or
        replaced in the same folder (or a no_repeat_ngram_size added) read back the old model's cached answers.
        A tokenizer without a chat template that appends its EOS to every text adds `prompt: without-appended-eos`:
        its prompts lost that EOS, and its answers cached before (generated after an end of text) are not read."""
        from alignkit.data.chat import appended_eos
        from alignkit.online.digests import model_digest

        with self._identity_lock:
            if self._identity is None:
                self._identity = {**self.legacy_identity, "answerer": model_digest(self.model, self.tokenizer)}
                if not getattr(self.tokenizer, "chat_template", None) and appended_eos(self.tokenizer):
                    # prompted without the EOS this tokenizer appends (session 25): answers cached before were
                    # generated after an end of text; only these keys change (every other entry still hits)
                    self._identity["prompt"] = "without-appended-eos"
            return self._identity

    @classmethod
    def from_path(cls, path: str, *, dtype: str = "float32", name: str | None = None) -> "LocalChat":
        from alignkit.models.loading import load_model, load_tokenizer

        return cls(load_model(path, dtype=dtype), load_tokenizer(path, padding_side="left"), name or str(path))

    def chat(self, messages: Messages, *, max_tokens: int, temperature: float, seed: int | None = None) -> str:
        import torch

        from alignkit.online.generation import SamplingConfig, end_token_ids

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:  # as training's and generation's prompts: without the EOS a GPT-NeoX-style tokenizer appends to every
            # text (before, kept: the answer was generated after an end of text); imported here: alignkit.data
            # imports torch, and the HTTP backends (augment.strategies, AugmentConfig's checks) stay torch-free
            from alignkit.data.chat import prompt_ids

            ids = prompt_ids(tok, "\n".join(m["content"] for m in messages) + "\n")
        self.requests += 1
        if seed is not None:
            torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(ids)], device=device)
        # every end token (the folder's EOS list, the tokenizer's, the template's turn end): generate alone stops at
        # the generation config's, and a chat answer ran past <|im_end|> to max_tokens (refused as cut off)
        ends = end_token_ids(self.model, tok, SamplingConfig(), chat=bool(getattr(tok, "chat_template", None)))
        sampling = SamplingConfig(max_new_tokens=max_tokens, do_sample=temperature > 0,
                                  temperature=temperature if temperature > 0 else 1.0)
        self._note_folder_options(sampling)
        # repetition_penalty / top_p / top_k pinned (as every generation path does): llm.temperature alone says how
        # answers are sampled, not the folder's generation_config.json (its values applied unseen before)
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": ends,
                                  "repetition_penalty": 1.0}
        kwargs.update({"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0
                      else {"do_sample": False})
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new = out[0, input_ids.shape[1]:].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        if len(new) >= max_tokens and new[-1] not in ends:  # stopped by max_new_tokens, not by its end token
            raise AnswerCutOff(CUT_AT_MAX_TOKENS, text)
        return text


    def _note_folder_options(self, sampling: Any) -> None:
        """Warns once (per client) about the model folder's generation_config.json: the sampling options it sets that
        are not used (`overridden_options`) and those model.generate applies to every answer
        (`model_generation_options`: no_repeat_ngram_size, min_new_tokens, ...)."""
        from alignkit.online.generation import (generation_config_source, listed, model_generation_options,
                                                overridden_options)

        if self._noted:
            return
        self._noted = True
        src = generation_config_source(self.model)
        over = overridden_options(self.model, self.tokenizer, sampling)
        extra = model_generation_options(self.model, self.tokenizer, sampling)
        if over:
            logger.warning("%s sets %s, which %s does not use: llm.temperature alone sets how answers are sampled "
                           "(top_p=1.0, top_k off, repetition_penalty=1.0)", src, listed(over), self.name)
        if extra:
            logger.warning("%s sets %s, which model.generate applies to every answer of %s; remove it from %s to "
                           "answer without it", src, listed(extra), self.name, src)


class Cached:
    """Wraps a client with an on-disk cache: one JSON file per distinct request, written atomically.
    Thread-safe: concurrent calls for one request send it once (the others wait, then read the entry)."""

    def __init__(self, inner: ChatModel, folder: str | Path) -> None:
        self.inner, self.folder = inner, Path(folder)
        self.name = inner.name
        self.max_concurrency = getattr(inner, "max_concurrency", None)
        self.hits = self.misses = self.unchecked = 0
        self.migrated = False  # an entry under the client's older key was found (`_older_key`: one warning)
        self._lock = threading.Lock()  # the counters and the table of requests in flight
        self._inflight: dict[str, list] = {}  # key -> [its lock, threads using it]

    def key(self, messages: Messages, max_tokens: int, temperature: float, seed: int | None) -> str:
        """The request's cache key: the client's `identity` (default: its name as the model), messages, settings."""
        identity = getattr(self.inner, "identity", None) or {"model": self.inner.name}
        blob = json.dumps({**identity, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature, "seed": seed}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def chat(self, messages: Messages, *, max_tokens: int, temperature: float, seed: int | None = None) -> str:
        key = self.key(messages, max_tokens, temperature, seed)
        with self._lock:
            entry = self._inflight.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:  # one thread per request: a second one asking the same reads the first one's answer
                return self._chat(key, messages, max_tokens, temperature, seed)
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._inflight[key]

    def _unchecked(self, path: Path) -> None:
        """An entry with neither `finished` nor `cut_off`: written before alignkit recorded whether an answer was
        finished, so it may hold one cut at max_tokens. Asked again (and rewritten), with one warning a client."""
        with self._lock:
            self.unchecked += 1
            first = self.unchecked == 1
        if first:
            logger.warning("%s: cache entries written before alignkit recorded whether an answer was finished (this "
                           "one: %s) are asked again: an answer cut at max_tokens would be kept as a record",
                           self.folder, path.name)

    def _older_key(self, messages: Messages, max_tokens: int, temperature: float, seed: int | None) -> None:
        """A miss whose request has an entry under the client's `legacy_identity` (LocalChat's key before it held the
        model's digest: it may be another model's answer under that name): asked again, with one warning a client."""
        legacy = getattr(self.inner, "legacy_identity", None)
        if legacy is None or self.migrated:
            return
        blob = json.dumps({**legacy, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                           "seed": seed}, sort_keys=True, ensure_ascii=False)
        old = hashlib.sha256(blob.encode()).hexdigest()
        if (self.folder / old[:2] / f"{old}.json").is_file():
            with self._lock:
                first, self.migrated = not self.migrated, True
            if first:
                logger.warning("%s: cache entries written before the key held the model's weights, tokenizer and "
                               "generation options (this one: %s.json) are asked again: the folder %s may have held "
                               "another model then", self.folder, old, self.name)

    def _count(self, hits: int = 0, misses: int = 0) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def _chat(self, key: str, messages: Messages, max_tokens: int, temperature: float, seed: int | None) -> str:
        path = self.folder / key[:2] / f"{key}.json"
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
                content, cut = cached["content"], cached.get("cut_off")
            except (json.JSONDecodeError, KeyError):
                logger.warning("%s: unreadable cache entry, asking again", path)
            else:
                if cut or cached.get("finished") is True:
                    self._count(hits=1)
                    if cut:
                        raise AnswerCutOff(cut, content)
                    return content
                self._unchecked(path)
        if not path.is_file():
            self._older_key(messages, max_tokens, temperature, seed)
        self._count(misses=1)
        unfinished = None
        try:
            content = self.inner.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
        except AnswerCutOff as e:  # kept with its reason: a rerun drops it again without asking
            content, unfinished = e.content, e
        entry = {**(getattr(self.inner, "identity", None) or {"model": self.inner.name}), "messages": messages,
                 "content": content, **({"cut_off": unfinished.reason} if unfinished else {"finished": True})}
        atomic_write_text(path, json.dumps(entry, ensure_ascii=False))  # the umask's mode, not 0600
        if unfinished is not None:
            raise unfinished
        return content


__all__ = ["AnswerCutOff", "CONTENT_FILTERED", "CUT_AT_MAX_TOKENS", "Cached", "ChatModel", "LLMError", "LocalChat",
           "OpenAIChat", "RateLimiter", "UNFINISHED"]
