"""The serving engine: iteration-level (continuous) batching of many adapters over one base model.

    engine = Engine(load_stack("base/", {"polite": "adapters/polite"}), EngineConfig(max_batch_rows=32))
    engine.start()
    result = engine.generate("polite", prompt_ids, SamplingParams(max_tokens=32))   # blocking helper
    engine.stop()

One thread owns the model (a `ReftModel` is not thread-safe; see docs/architecture.md). It loops:

1. **admit**: waiting requests join while the batch has room (`max_batch_rows`; a request with `n`
   choices takes n rows). The newcomers are prefilled together in one left-padded forward with a fresh
   KV cache; each row carries its own adapter (ReFT: its adapter's prompt positions in
   `intervention_locations`, -1 for the others; LoRA: per-row stacked LoRA, `serve/lora.py`). Their first token is
   sampled from that prefill.
2. **merge**: the newcomers' KV cache is joined to the running batch's cache along the batch axis,
   both left-padded to the longer length (attention mask 0 over the padding).
3. **decode**: one forward of every running row (its last token, explicit `position_ids` = the row's own
   token count, so padding never shifts RoPE positions), then per-row sampling.
4. **leave**: finished, cancelled or timed-out rows are dropped from the cache at once (batch index
   select), and cache columns that are padding in every remaining row are cut off the left.

So a request joins at the next step and leaves when done; a long request never holds back a short one,
and rows of different adapters (and of the bare base) share every forward. This is continuous batching
over transformers' `DynamicCache`, not a paged cache: merging and leaving copy the cache (O(batch x
length) per join/leave, not per step), and padding to the longest row costs attention work over padded
columns. Positions are passed explicitly: the prefill is a plain `ReftModel.forward` with locations
absolute in its own padded tensor and an empty cache; decode steps carry no locations (ReFT adapters
edit prompt positions only, as they are trained), so nothing depends on how `generate` tracks offsets.

Sampling is per row: greedy (temperature 0) is argmax; otherwise temperature, then top-p, then a draw
(`online.decode.inverse_cdf_sample`: 1-2 uniforms, not torch.multinomial's exponential per vocabulary entry)
from the row's own `torch.Generator` (seeded from the request's `seed` and the choice index), so a seeded
request gives the same tokens whatever else is in the batch. Greedy rows equal the same request run
alone, token for token (tested with 32 concurrent requests over four adapters). A row whose logits are NaN / inf
ends its own request with an error naming its model (greedy would emit argmax over NaN, a draw would raise and fail
the whole batch); the other rows go on.

What a request is and what refuses it (`SamplingParams`, `EngineConfig`, `Request`, `Event`, the errors,
`check_prompt`) lives in `serve/request.py`; its names are importable from here too.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache, GenerationConfig

from alignkit.adapters.base import unwrap_lm
from alignkit.compat import cache_keyword
from alignkit.interventions.positions import needed_length
from alignkit.models.rope import trained_context
from alignkit.online.decode import generation_options, inverse_cdf_sample
from alignkit.online.generation import HOW_IT_RUNS, end_token_ids, generation_config_source, listed
from alignkit.settings.sampling import SamplingConfig
from alignkit.serve.request import (FINISH_LENGTH, FINISH_STOP, SEED_MAX, SEED_MIN, SHUTTING_DOWN, EngineConfig,
                                    EngineStopped, Event, ModelChanged, QueueFullError, Request, RequestError,
                                    SamplingParams, check_prompt, non_finite_message, special_stop_ids)
from alignkit.serve.stack import Route, Stack
from alignkit.serve.stats import EngineStats

logger = logging.getLogger(__name__)

@dataclass
class _Row:
    request: Request
    index: int  # choice index
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already sent
    done: bool = False


class Engine:
    """Continuous-batching generation over a `Stack` (module docstring)."""

    def __init__(self, stack: Stack, config: EngineConfig | None = None, end_token_ids: Sequence[int] | None = None):
        self.stack = stack
        self.config = config or EngineConfig()
        self.tokenizer = stack.tokenizer
        # a chat prompt's ends (EOS and the template's turn end) and a plain-text prompt's (EOS alone, as vLLM's
        # completions: the turn-end token means nothing outside the template); `end_token_ids` given: both
        self.end_ids = set(end_token_ids if end_token_ids is not None else default_end_ids(stack))
        self.text_end_ids = set(end_token_ids if end_token_ids is not None else default_end_ids(stack, chat=False))
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._cache_kw = cache_keyword(stack.model)  # `cache` or `past_key_values`, as transformers names it
        self._context = trained_context(unwrap_lm(stack.model).config)  # positions past it are refused
        self._vocab = unwrap_lm(stack.model).get_input_embeddings().num_embeddings  # token ids past it are refused
        self._waiting: collections.deque[Request] = collections.deque()
        self._changed: set[str] = set()  # `ModelChanged` messages already logged
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = 0
        # the running batch
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, L) long
        self._next_pos: torch.Tensor | None = None  # (B,) position id of each row's pending token
        self._last: torch.Tensor | None = None  # (B,) each row's pending (sampled, not yet cached) token
        self.stats = EngineStats()
        unapplied = generation_defaults(stack.model)
        if unapplied:
            logger.warning("serve: the base's generation config sets the sampling defaults %s, which alignkit's engine "
                           "does not apply (a request without temperature / top_p samples at 1.0, as OpenAI's API "
                           "does; top_k, min_p and repetition_penalty are not implemented) where vLLM's server "
                           "(--engine vllm) applies them to requests that leave them out; send temperature / top_p "
                           "with each request", ", ".join(f"{k}={v}" for k, v in unapplied.items()))
        beyond = generation_options_unapplied(stack.model)
        if beyond:
            src = generation_config_source(stack.model)
            logger.warning("serve: %s sets %s, which neither alignkit's engine nor vLLM's server (it reads the "
                           "sampling defaults alone) applies: responses are generated without it; remove it from %s "
                           "to say so (`alignkit generate` applies it)", src, listed(beyond), src)

    # -- public ------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="alignkit-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    def submit(self, model: str, prompt_ids: Sequence[int], params: SamplingParams,
               sink: Callable[[Event], None], chat: bool = True) -> Request:
        """Queue a request; `sink` receives its events from the engine thread (keep it cheap and thread-safe).
        `chat`: the prompt was formatted by the chat template, so the template's turn-end token ends it too
        (`end_ids`); False for plain text (`text_end_ids`: EOS only, as vLLM's completions).
        Raises KeyError (unknown model), ModelChanged (its files changed on disk since they were loaded: the answer
        would come from the old weights), RequestError (limits, bad values), QueueFullError, EngineStopped."""
        route = self.stack.route(model)
        changed = self.stack.changed(model)
        if changed is not None:
            if changed not in self._changed:  # the server's log says it once, every request for it is refused
                self._changed.add(changed)
                logger.warning("serve: %s", changed)
            raise ModelChanged(changed)
        params.check(self.config)
        stop_ids = special_stop_ids(self.tokenizer, params.stop)
        prompt_ids = check_prompt(prompt_ids, params, self.config, self._context, self._vocab)
        with self._lock:
            if self._stop:  # queued, it would wait for a loop that has ended (no answer, no timeout)
                raise EngineStopped(f"{SHUTTING_DOWN}; retry the request")
            if len(self._waiting) >= self.config.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"the queue is full ({self.config.max_queue} waiting requests); retry later")
            self._ids += 1
            req = Request(f"req-{self._ids}", route, prompt_ids, params, sink, stop_ids=stop_ids,
                          end_ids=frozenset(self.end_ids if chat else self.text_end_ids))
            req.deadline = req.created + self.config.request_timeout
            req.rows_left = params.n
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    def generate(self, model: str, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 timeout: float | None = None, chat: bool = True) -> dict[str, Any]:
        """Blocking helper: submit and wait. Returns {"choices": [{"token_ids", "text", "finish_reason"}], ...}."""
        params = params or SamplingParams()
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(model, prompt_ids, params, events.put, chat=chat)
        choices = [{"token_ids": [], "text": "", "finish_reason": None} for _ in range(params.n)]
        while True:
            ev = events.get(timeout=timeout)
            if ev.kind == "token":
                choices[ev.index]["token_ids"].append(ev.token_id)
                choices[ev.index]["text"] += ev.text
            elif ev.kind == "done":
                choices[ev.index]["finish_reason"] = ev.finish_reason
            elif ev.kind == "error":
                raise RuntimeError(ev.message)
            elif ev.kind == "end":
                return {"choices": choices, "prompt_tokens": len(req.prompt_ids),
                        "completion_tokens": req.completion_tokens,
                        "ttft": (req.first_token_at or req.finished_at) - req.created,
                        "latency": req.finished_at - req.created}

    # -- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._rows:
                    self._lock.wait(timeout=0.5)
                if self._stop:
                    break
                new = self._admit()
            try:
                with torch.inference_mode():
                    if new:
                        self._prefill(new)
                    if self._rows:
                        self._decode()
            except Exception as e:  # the engine must survive: fail the batch's requests, keep serving
                logger.exception("serve engine step failed")
                for r in {id(x.request): x.request for x in self._rows + new}.values():
                    self._fail(r, f"internal error: {type(e).__name__}: {e}")
                self._reset_batch()
        for r in list(self._waiting):
            self._fail(r, SHUTTING_DOWN)
        self._waiting.clear()
        for r in {id(x.request): x.request for x in self._rows}.values():
            self._fail(r, SHUTTING_DOWN)
        self._reset_batch()

    def _admit(self) -> list[_Row]:
        """Take waiting requests while rows and the prefill token budget allow (called under the lock)."""
        now = time.monotonic()
        new: list[_Row] = []
        room = self.config.max_batch_rows - len(self._rows)
        longest = 0
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled or now > req.deadline:
                self._waiting.popleft()
                self._fail(req, "cancelled" if req.cancelled else "timed out in the queue", cancelled=req.cancelled)
                continue
            n = req.params.n
            longest2 = max(longest, len(req.prompt_ids))
            if n > room or (new and longest2 * (len(new) + n) > self.config.max_prefill_tokens):
                break
            self._waiting.popleft()
            try:
                rows = [_Row(req, i, self._generator(req, i)) for i in range(n)]
            except Exception as e:  # noqa: BLE001 - admission runs outside the step's handling: fail this request
                logger.exception("serve engine could not admit a request")  # alone, or the engine thread would die
                self._fail(req, f"internal error: {type(e).__name__}: {e}")  # and every later request would hang
                continue
            longest = longest2
            room -= n
            new.extend(rows)
        return new

    def _generator(self, req: Any, i: int) -> torch.Generator | None:
        """Choice i's random generator (seed + i), None for greedy decoding."""
        if req.params.temperature <= 0:
            return None
        seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(7), "little")
        return torch.Generator(device="cpu").manual_seed(int(seed) + i)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: Any,
                 routes: list[Route], locations: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        dev = self.stack.device
        routing, kwargs = self.stack.lora_routing(routes)
        with routing:
            out = self.stack.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                                   position_ids=position_ids.to(dev), use_cache=True,
                                   intervention_locations=locations, logits_to_keep=1,
                                   **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1, :].float(), getattr(out, self._cache_kw)  # (B, V)

    def _prefill(self, new: list[_Row]) -> None:
        lengths = torch.tensor([len(r.request.prompt_ids) for r in new])  # (N,)
        T = int(lengths.max())
        pad = T - lengths  # (N,) left padding of each row
        ids = torch.full((len(new), T), self._pad, dtype=torch.long)
        for b, r in enumerate(new):
            ids[b, T - len(r.request.prompt_ids):] = torch.tensor(r.request.prompt_ids)
        cols = torch.arange(T)[None, :]  # (1, T)
        mask = (cols >= pad[:, None]).long()  # (N, T)
        pos = (cols - pad[:, None]).clamp(min=0)  # (N, T) each row counts from its first real token
        routes = [r.request.route for r in new]
        self.note_short_prompts(new)
        locations = self.stack.locations(routes, pad, lengths)
        t0 = time.perf_counter()
        logits, cache = self._forward(ids, mask, pos, DynamicCache(config=self.stack.lm_config), routes, locations)
        self.stats.add_forward(time.perf_counter() - t0, prefill_tokens=int(lengths.sum()))
        tokens = self._sample(logits, new)
        self._merge(new, cache, mask, lengths, tokens)
        self._emit(new, tokens)

    def note_short_prompts(self, new: list[_Row]) -> None:
        """Count (`stats.short_prompts`, /metrics, the serve log) and log each request whose prompt is shorter than its
        ReFT adapter's positions need (`needed_length`): it is edited at fewer positions, as training edits such
        prompts (interventions/positions.py), so it is answered; this used to be one warning per process, after
        which every later short request was edited at fewer positions without a trace."""
        for r in new:
            req, route = r.request, r.request.route
            if r.index or route.reft is None or route.positions is None:
                continue
            need = needed_length(route.positions, route.share_weights)
            if len(req.prompt_ids) < need:
                self.stats.short_prompts[route.name] += 1
                logger.warning("serve: %s for model %r has a prompt of %d token(s), and its ReFT positions %r need at "
                               "least %d: edited at fewer positions than it was trained with (as training edits such "
                               "prompts); send a longer prompt", req.id, route.name, len(req.prompt_ids),
                               str(route.positions), need)

    def _merge(self, new: list[_Row], cache: Any, mask: torch.Tensor, lengths: torch.Tensor,
               tokens: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = list(new), cache, mask
            self._next_pos, self._last = lengths.clone(), tokens.clone()
            return
        La, Lb = self._mask.shape[1], mask.shape[1]
        L = max(La, Lb)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)  # (B, H, L*, D)
                setattr(old_layer, attr, torch.cat([_left_pad(a, L - La, 2), _left_pad(b, L - Lb, 2)], dim=0))
        self._mask = torch.cat([_left_pad(self._mask, L - La, 1), _left_pad(mask, L - Lb, 1)], dim=0)
        self._rows += new
        self._next_pos = torch.cat([self._next_pos, lengths])
        self._last = torch.cat([self._last, tokens])

    def _decode(self) -> None:
        B = len(self._rows)
        mask = torch.cat([self._mask, torch.ones(B, 1, dtype=torch.long)], dim=1)  # (B, L + 1)
        routes = [r.request.route for r in self._rows]
        t0 = time.perf_counter()
        logits, self._cache = self._forward(self._last[:, None], mask, self._next_pos[:, None], self._cache, routes,
                                            None)
        self.stats.add_forward(time.perf_counter() - t0, decode_rows=B)
        self._mask = mask
        self._next_pos = self._next_pos + 1
        tokens = self._sample(logits, self._rows)
        self._last = tokens
        self._emit(self._rows, tokens)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """(B, V) float logits -> (B,) tokens, per row (module docstring). A row whose logits are not finite (NaN or
        +inf anywhere, or all -inf) draws nothing: its request gets `error` (`non_finite_message`) and ends at
        `_emit`, alone: argmax would be the first NaN's index (garbage as an answer) and a draw would raise, failing
        every request of the batch."""
        logits = logits.cpu()
        bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)  # (B,)
        out = logits.argmax(dim=-1)  # (B,) greedy
        for b, r in enumerate(rows):
            p = r.request.params
            if bad[b]:
                r.request.error = r.request.error or non_finite_message(r)
                continue
            if p.temperature <= 0:
                continue
            # shifted by the row's largest logit and in float64: a tiny temperature (1e-40, 5e-324) gives -inf for
            # the others and 0 for the largest (one-hot, greedy's limit), never inf - inf = NaN
            z = logits[b].double()
            probs = torch.softmax((z - z.max()) / p.temperature, dim=-1)  # (V,)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = (sorted_p.cumsum(0) - sorted_p) < p.top_p  # the smallest prefix reaching top_p
                sorted_p = torch.where(keep, sorted_p, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            out[b] = inverse_cdf_sample(probs[None], r.generator)[0]
        return out

    def _emit(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """Append each row's new token, send text deltas, finish rows, and drop finished rows from the batch."""
        now = time.monotonic()
        for r, t in zip(rows, tokens.tolist()):
            req = r.request
            if r.done:
                continue
            if req.error is not None:  # non-finite logits in one of its rows (`_sample`): every choice ends
                self._end_row(r, None)
                continue
            if req.cancelled or now > req.deadline:
                r.done = True
                self._end_row(r, None)
                continue
            if req.first_token_at is None:
                req.first_token_at = now
            req.completion_tokens += 1
            self.stats.add_tokens(req.route.name, 1)
            r.tokens.append(t)
            is_end = t in req.end_ids or t in req.stop_ids
            final = is_end or len(r.tokens) >= req.params.max_tokens
            stopped = self._flush(r, final)
            if is_end or stopped or final:
                self._end_row(r, FINISH_STOP if is_end or stopped else FINISH_LENGTH)
        self._drop_finished()

    def _flush(self, r: _Row, final: bool) -> bool:
        """Send one token event with the text that is safe to send now; True if a stop string ended the row."""
        body = r.tokens[:-1] if r.tokens[-1] in r.request.end_ids or r.tokens[-1] in r.request.stop_ids else r.tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        stops = r.request.params.stop
        hits = [i for i in (text.find(s, max(0, r.emitted - len(s) + 1)) for s in stops) if i >= 0]
        if hits:
            end = max(min(hits), r.emitted)
            self._send(r, text[r.emitted:end], r.tokens[-1])
            r.emitted = end
            return True
        safe = len(text)
        if not final:
            # an incomplete UTF-8 sequence at the end (a character split over byte tokens) waits for its next bytes,
            # and the stop strings' prefixes are looked for before it: a stop string whose later character is
            # still incomplete ("a" of "a€" before the last byte of "€") must not be sent
            whole = safe = len(text.rstrip("\ufffd"))
            for s in stops:  # hold back a tail that could start a stop string
                for k in range(min(len(s) - 1, whole), 0, -1):
                    if text.startswith(s[:k], whole - k):
                        safe = min(safe, whole - k)
                        break
        safe = max(safe, r.emitted)
        self._send(r, text[r.emitted:safe], r.tokens[-1])
        r.emitted = safe
        return False

    def _send(self, r: _Row, text: str, token_id: int | None) -> None:
        try:
            r.request.sink(Event("token", r.index, text, token_id))
        except Exception:  # a consumer that went away must not stop the engine
            r.request.cancelled = True

    def _end_row(self, r: _Row, reason: str | None) -> None:
        r.done = True
        req = r.request
        if reason is not None:
            self._safe_sink(req, Event("done", r.index, finish_reason=reason))
        req.rows_left -= 1
        if req.rows_left == 0:
            req.finished_at = time.monotonic()
            if req.cancelled:
                self.stats.cancelled += 1
                self._safe_sink(req, Event("error", message="cancelled"))
            elif req.error is not None:
                self.stats.errors += 1
                self._safe_sink(req, Event("error", message=req.error))
            elif reason is None:
                self.stats.timeouts += 1
                self._safe_sink(req, Event("error", message=f"timed out after {self.config.request_timeout:g} s"))
            else:
                self.stats.finish(req)
            self._safe_sink(req, Event("end"))

    def _fail(self, req: Request, message: str, cancelled: bool = False) -> None:
        req.finished_at = time.monotonic()
        req.rows_left = 0
        if cancelled:
            self.stats.cancelled += 1
        elif "timed out" in message:
            self.stats.timeouts += 1
        else:
            self.stats.errors += 1
        self._safe_sink(req, Event("error", message=message))
        self._safe_sink(req, Event("end"))

    @staticmethod
    def _safe_sink(req: Request, ev: Event) -> None:
        try:
            req.sink(ev)
        except Exception:
            pass

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        idx = torch.tensor(keep)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))
            layer.values = layer.values.index_select(0, idx.to(layer.values.device))
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next_pos, self._last = self._mask[idx], self._next_pos[idx], self._last[idx]
        cut = int((self._mask.sum(0) > 0).long().argmax())  # leading columns that are padding in every row
        if cut > 0:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
            self._mask = self._mask[:, cut:]

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._next_pos, self._last = [], None, None, None, None


def _left_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


# the generation config's sampling keys vLLM's server takes as request defaults (`--generation-config auto`,
# ModelConfig.get_diff_sampling_param), at the value that changes nothing here
NEUTRAL_SAMPLING = {"temperature": (1.0,), "top_p": (1.0,), "top_k": (0, -1), "min_p": (0.0,),
                    "repetition_penalty": (1.0,)}


def generation_defaults(model: Any) -> dict[str, Any]:
    """The sampling defaults `model`'s generation config sets away from `NEUTRAL_SAMPLING` (its `to_diff_dict`, as
    vLLM reads them): vLLM's server samples a request that leaves them out with them, alignkit's engine does not."""
    gen = getattr(unwrap_lm(model), "generation_config", None)
    diff = gen.to_diff_dict() if gen is not None else {}
    return {k: diff[k] for k, neutral in NEUTRAL_SAMPLING.items() if diff.get(k) is not None and diff[k] not in neutral}


def generation_options_unapplied(model: Any) -> list[tuple[str, Any]]:
    """(field, value) the model's generation config sets beyond the sampling defaults (`generation_defaults`) that
    change what `model.generate` draws (no_repeat_ngram_size, min_new_tokens, suppress_tokens, bad_words_ids, ...;
    `decode.generation_options`): the engine implements none of them."""
    return [(k, v) for k, v in generation_options(model, GenerationConfig())
            if k not in NEUTRAL_SAMPLING and k not in HOW_IT_RUNS]


def default_end_ids(stack: Stack, chat: bool = True) -> list[int]:
    """EOS of the tokenizer and the generation config, plus (`chat`) the chat template's turn-end token: the same
    ends as training-time generation (`online.generation.end_token_ids`)."""
    return sorted(set(end_token_ids(unwrap_lm(stack.model), stack.tokenizer, SamplingConfig(), chat=chat)))


__all__ = ["SEED_MAX", "SEED_MIN", "SHUTTING_DOWN", "Engine", "EngineConfig", "EngineStopped", "Event", "ModelChanged",
           "QueueFullError", "Request", "RequestError", "SamplingParams", "default_end_ids", "generation_defaults",
           "generation_options_unapplied",
           "special_stop_ids"]
