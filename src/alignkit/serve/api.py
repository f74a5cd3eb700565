"""The HTTP side of `alignkit serve`: an OpenAI-compatible API, health, metrics and the chat page (FastAPI).

    GET  /v1/models              the base (under its own name) and every adapter
    POST /v1/completions         prompt (string, list of strings, or token ids) -> text; `model` picks the adapter;
                                 ends on EOS alone (the generation config's and the tokenizer's, as vLLM's)
    POST /v1/chat/completions    messages through the tokenizer's chat template (content: a string or a list of
                                 text parts, joined with a newline as vLLM's OpenAI server joins them; developer
                                 messages as vLLM gives them to the template: `developer_as_system`); ends on
                                 EOS and on the template's turn-end token (`<|im_end|>`), as training-time generation
    GET  /health                 {"status": "ok", ...}; 503 when the engine thread is gone
    GET  /metrics                Prometheus text: queue depth, running rows, tokens/s, per-model counts, latency
    GET  /                       the chat page (static files in serve/static, no build step)

Request fields: model, max_tokens (or max_completion_tokens; both given must agree), temperature, top_p, stop
(string or list), seed (signed 64-bit), n, stream (server-sent events, `data: [DONE]` last, after an error chunk
too, as vLLM; null: false, as vLLM),
stream_options.include_usage (with stream only; null: false; its other keys, e.g. vLLM's continuous_usage_stats,
are a 400 unless false: `STREAM_OPTIONS_NEUTRAL`), vLLM's add_special_tokens. Fields that would change the
answer but are not
implemented (logprobs, 0 included, best_of, echo: `NOT_SUPPORTED`; presence/frequency penalties, logit_bias, suffix,
response_format, tools / tool_choice, reasoning_effort, vLLM's top_k / min_p / repetition_penalty / min_tokens /
ignore_eos / stop_token_ids / bad_words / guided_* / chat_template / add_generation_prompt / ...:
`IGNORED_UNLESS_NEUTRAL`, both in serve/parsing.py) are a 400 naming the field unless at their neutral value; other
fields are ignored, as vLLM ignores them: those known to change nothing (user, metadata, store, ...:
`parsing.NO_EFFECT_FIELDS`) silently, any other (a typo such as max_new_tokens) with one warning per field name in
the server's log. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 malformed
JSON, wrong types, limits, a string that is not Unicode (a lone surrogate escape), a chat request to an adapter trained
with another chat template than the base's (`Stack.other_template`); 401 bad/missing bearer token (with --api-key); 404
unknown model; 409 a model whose files changed on disk since the server loaded them (a run saved over the adapter
or base folder: the server would answer with the weights it loaded; `Stack.changed`); 413 a body over 1 MiB; 429
queue full; 503 the server is shutting down (a request it stopped or will not take); 504 request timeout; 500 an
internal error (the server keeps serving).
A client that disconnects cancels its generation at the engine's next step.
"""


import asyncio
import contextlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from alignkit.serve.engine import Engine
from alignkit.serve.log import ServeLog
from alignkit.serve.parsing import (PART_SEPARATOR, STREAM_OPTIONS_NEUTRAL, ApiError, chat_prompt, completion_prompts,
                                    content_text, developer_as_system, not_unicode, request_model, sampling_params,
                                    unread_fields)
from alignkit.serve.request import (SHUTTING_DOWN, EngineStopped, Event, ModelChanged, QueueFullError, RequestError,
                                    SamplingParams)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20


def end_error(message: str) -> ApiError:
    """The API error of a request the engine ended with `message`: 504 a timeout, 503 a server shutting down (OpenAI
    clients retry it; it was a 500), 500 anything else."""
    if message.startswith("timed out"):
        return ApiError(504, f"the request {message}", "timeout", code="timeout")
    if message.startswith(SHUTTING_DOWN):
        return ApiError(503, f"{message}; retry the request", "server_error", code="unavailable")
    return ApiError(500, message, "server_error")


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------

def submission_error(e: Exception, submitted: int, n_prompts: int, chat: bool) -> ApiError:
    """The API's answer to an error of `Engine.submit` on the prompt after the `submitted` first of `n_prompts`."""
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), "server_error", code="unavailable")
    if isinstance(e, ModelChanged):
        return ApiError(409, str(e), param="model", code="model_changed")
    if e.param != "prompt":
        return ApiError(400, str(e), param=e.param)
    field = "messages" if chat else "prompt"
    which = f"'{field}'[{submitted}]: " if n_prompts > 1 else ""  # the prompt of a list at fault
    return ApiError(400, which + str(e), param=field)


def submit_all(engine: Engine, model: str, prompts: list[list[int]], params: SamplingParams, loop,
               q: asyncio.Queue, chat: bool) -> list:
    """Submit each prompt of a request to `engine`, its events put on `q` as (index, event); an error cancels the
    ones already submitted and is the API's answer (`submission_error`)."""
    if model not in engine.stack.routes:
        raise ApiError(404, f"the model '{model}' does not exist; served: {engine.stack.names}",
                       param="model", code="model_not_found")
    reqs = []
    try:
        for j, ids in enumerate(prompts):
            sink = (lambda ev, j=j: loop.call_soon_threadsafe(q.put_nowait, (j, ev)))
            reqs.append(engine.submit(model, ids, SamplingParams(**vars(params)), sink, chat=chat))
    except (QueueFullError, EngineStopped, ModelChanged, RequestError) as e:
        for r in reqs:
            r.cancel()
        raise submission_error(e, len(reqs), len(prompts), chat) from None
    return reqs


def error_response(e: ApiError, http_errors: dict[int, int]):
    """The JSON response of an API error (OpenAI's shape), counted in `http_errors` (by status, for /metrics)."""
    from fastapi.responses import JSONResponse

    http_errors[e.status] = http_errors.get(e.status, 0) + 1
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def add_error_handlers(app, http_errors: dict[int, int]) -> None:
    """API errors, unknown routes (404), wrong methods (405) and any other exception (500) as OpenAI-shaped JSON."""
    from fastapi import Request

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e, http_errors)

    @app.exception_handler(404)
    async def _not_found(request: Request, e: Exception):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"),
                              http_errors)

    @app.exception_handler(405)
    async def _bad_method(request: Request, e: Exception):
        return error_response(ApiError(405, f"method {request.method} not allowed on {request.url.path}"),
                              http_errors)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logger.exception("serve: unhandled error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"), http_errors)


def check_key(request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (nothing checked without an api_key)."""
    if api_key is None:
        return
    got = request.headers.get("authorization", "")
    if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), api_key.encode())):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", code="invalid_api_key")


async def read_body(request, api_key: str | None) -> dict:
    """The request's JSON object, after its key (`check_key`) and size (413 over MAX_BODY); 400 for a body that is
    not JSON, not an object, or holds a string that is not Unicode."""
    check_key(request, api_key)
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # json's own limit on nesting (was a 500 'internal error: RecursionError')
        raise ApiError(400, "the body is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    where = not_unicode(body)  # else the tokenizer (or the model-name lookup) would raise: a 500 naming nothing
    if where is not None:
        where = where.encode("utf-8", "backslashreplace").decode()  # a key of the path may hold the surrogate
        raise ApiError(400, f"'{where}' is not valid Unicode: it holds a lone UTF-16 surrogate escape (\\ud800 .. "
                            "\\udfff alone: a string cut inside a character); send whole characters", param=where)
    return body


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage) of a request body (null: false, row V18); a 400 naming the field for
    a wrong type, for stream_options without stream, and for a stream option other than include_usage not at its
    neutral value."""
    stream = body.get("stream")
    if stream is None:  # null: the default, false, as OpenAI's API and vLLM's server read it (row V18)
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not stream:  # as OpenAI and vLLM answer: it would be ignored
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true (a response that is not "
                            "streamed always carries usage); remove it or set stream", param="stream_options")
    opts = opts or {}
    usage = opts.get("include_usage") if isinstance(opts, dict) else None
    if not isinstance(opts, dict) or not (usage is None or isinstance(usage, bool)):  # null: false (row V18)
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options")
    for key, value in opts.items():  # what else would be accepted and ignored: a 400 naming it
        if key != "include_usage" and value not in STREAM_OPTIONS_NEUTRAL.get(key, ()):
            raise ApiError(400, f"'stream_options.{key}' is not supported by this server (the stream would "
                                f"silently go without it); stream_options takes include_usage only",
                           param="stream_options")
    return stream, bool(opts.get("include_usage"))


class Completion:
    """One completion request once submitted (`submit_all`): its rows' events, cancellation, and its response, whole
    (`respond`) or streamed (`sse`). Choice `j * n + i` is choice i of prompt j."""

    def __init__(self, engine: Engine, model: str, prompts: list[list[int]], params: SamplingParams, chat: bool,
                 include_usage: bool):
        self.q: asyncio.Queue = asyncio.Queue()
        self.reqs = submit_all(engine, model, prompts, params, asyncio.get_running_loop(), self.q, chat)
        self.model, self.prompts, self.chat, self.include_usage = model, prompts, chat, include_usage
        self.n = params.n
        self.rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.now = int(time.time())

    def usage(self) -> dict[str, int]:
        p = sum(len(x) for x in self.prompts)  # as OpenAI counts: each prompt once, whatever n
        c = sum(r.completion_tokens for r in self.reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def cancel_all(self) -> None:
        for r in self.reqs:
            r.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(prompt index, event) until every submitted row has ended ("end" events are not yielded)."""
        ended = 0
        while ended < len(self.reqs):
            j, ev = await self.q.get()
            if ev.kind == "end":
                ended += 1
                continue
            yield j, ev

    async def collect(self, texts: list[str], reasons: list[str | None]) -> None:
        """Each choice's text and finish reason into `texts` / `reasons`; an error event cancels the rest and raises
        its API error (`end_error`)."""
        async for j, ev in self.events():
            if ev.kind == "token":
                texts[j * self.n + ev.index] += ev.text
            elif ev.kind == "done":
                reasons[j * self.n + ev.index] = ev.finish_reason
            elif ev.kind == "error":
                self.cancel_all()
                raise end_error(ev.message or "error")

    async def respond(self, request, poll_disconnect: float):
        """The whole response (JSON), or 499 with the rows cancelled once the client has gone (checked every
        `poll_disconnect` seconds)."""
        from fastapi.responses import JSONResponse, PlainTextResponse

        texts = [""] * (len(self.prompts) * self.n)
        reasons: list[str | None] = [None] * len(texts)
        task = asyncio.ensure_future(self.collect(texts, reasons))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=poll_disconnect)
                if not task.done() and await request.is_disconnected():
                    self.cancel_all()
                    task.cancel()
                    return PlainTextResponse("", status_code=499)
            task.result()
        finally:
            if not task.done():
                task.cancel()
                self.cancel_all()
        return JSONResponse(self.body(texts, reasons))

    def body(self, texts: list[str], reasons: list[str | None]) -> dict:
        """The non-streamed response: a chat.completion or a text_completion."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": reasons[i]} for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": reasons[i]}
                       for i, t in enumerate(texts)]
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.now,
                "model": self.model, "choices": choices, "usage": self.usage(), "system_fingerprint": None}

    def chunk(self, choices: list, with_usage: dict | None = None) -> str:
        """One server-sent event of the stream (usage: null on each but the last with include_usage)."""
        d = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
             "created": self.now, "model": self.model, "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            d["usage"] = with_usage
        return f"data: {json.dumps(d)}\n\n"

    def delta(self, i: int, text: str, finish_reason: str | None) -> list:
        """The choices of a chunk carrying choice i's `text` (a done event: "" and its finish reason)."""
        if self.chat:
            return [{"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                     "finish_reason": finish_reason}]
        return [{"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}]

    async def sse(self, http_errors: dict[int, int]) -> AsyncIterator[str]:
        """The streamed response: (chat: a role chunk first) a chunk per token and per finished choice, usage with
        include_usage, `data: [DONE]` last; an error event ends it with the error's body (counted in
        `http_errors`) and then `data: [DONE]`, as vLLM's chat and completion stream generators do (a client that
        reads to [DONE] sees the stream end; the openai client raises on the error chunk). The rows are cancelled
        when it ends, so a client that went away stops them."""
        try:
            if self.chat:
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None} for i in range(len(self.prompts) * self.n)])
            async for j, ev in self.events():
                i = j * self.n + ev.index
                if ev.kind == "token" and ev.text:
                    yield self.chunk(self.delta(i, ev.text, None))
                elif ev.kind == "done":
                    yield self.chunk(self.delta(i, "", ev.finish_reason))
                elif ev.kind == "error":
                    self.cancel_all()
                    e = end_error(ev.message or "error")
                    http_errors[e.status] = http_errors.get(e.status, 0) + 1
                    yield f"data: {json.dumps(e.body())}\n\n"
                    yield "data: [DONE]\n\n"  # as vLLM's stream generators end a failed stream (row V19)
                    return
            if self.include_usage:
                yield self.chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.cancel_all()  # a no-op for finished requests; stops the rows of a client that went away


_SAID_UNREAD: set[str] = set()  # the unread field names already warned of (once each per server process)


def warn_unread(body: dict, path: str) -> None:
    """One warning per field name, the first time a request carries a field this server does not read
    (`parsing.unread_fields`): answered without it, as vLLM answers (its log says so at debug level only), so a
    client's typo (`max_new_tokens`) or another server's extension is at least named in the server's log."""
    new = [k for k in unread_fields(body, chat=path.endswith("chat/completions")) if k not in _SAID_UNREAD]
    if new:
        _SAID_UNREAD.update(new)
        logger.warning("serve: %s request field(s) %s are not read by this server and were ignored (as vLLM's "
                       "server ignores unknown fields); the answer is made without them: check their spelling "
                       "(e.g. max_tokens, not max_new_tokens)", path, ", ".join(new))


async def run_completion(engine: Engine, request, body: dict, prompts: list[list[int]], chat: bool,
                         http_errors: dict[int, int], poll_disconnect: float):
    """A completion request's response: its fields checked (model, sampling, stream), its prompts submitted, then
    the whole response or the stream."""
    from fastapi.responses import StreamingResponse

    model = request_model(body)
    params = sampling_params(body)
    stream, include_usage = stream_flags(body)
    warn_unread(body, "/v1/chat/completions" if chat else "/v1/completions")
    completion = Completion(engine, model, prompts, params, chat, include_usage)
    if not stream:
        return await completion.respond(request, poll_disconnect)
    return StreamingResponse(completion.sse(http_errors), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def add_routes(app, engine: Engine, api_key: str | None, http_errors: dict[int, int], poll_disconnect: float) -> None:
    """The endpoints (module docstring): models, completions, chat completions, /health, /metrics, the chat page."""
    from fastapi import Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, api_key)
        data = [{"id": name, "object": "model", "created": created, "owned_by": "alignkit",
                 "adapter_kind": r.kind} for name, r in engine.stack.routes.items()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request, api_key)
        if name not in engine.stack.routes:
            raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": created, "owned_by": "alignkit",
                "adapter_kind": engine.stack.routes[name].kind}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, api_key)
        return await run_completion(engine, request, body, completion_prompts(body, tokenizer), False, http_errors,
                                    poll_disconnect)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, api_key)
        model = request_model(body)
        if model in engine.stack.other_template:  # the server's template is not the one it was trained with
            raise ApiError(400, f"'{model}' was trained with another chat template than the one this server formats "
                                "messages with, so its answers here would follow prompts it never saw; send prompts "
                                "formatted as in training to /v1/completions (the server's log names the tokenizer)",
                           param="model")
        return await run_completion(engine, request, body, [chat_prompt(body, tokenizer)], True, http_errors,
                                    poll_disconnect)

    @app.get("/health")
    async def health():
        alive = engine.alive
        body = {"status": "ok" if alive else "engine stopped", "models": engine.stack.names,
                "queue_depth": engine.queue_depth, "running_rows": engine.running_rows}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request, api_key)
        return PlainTextResponse(prometheus_text(engine, http_errors), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")


def shutdown_lifespan(on_shutdown: Sequence[Callable[[], Any]]):
    """The app's lifespan: at shutdown, each of `on_shutdown` in turn (one that raises is logged, the next still runs).
    uvicorn runs it on Ctrl-C and on SIGTERM before it raises the signal again (row M20), which kills the process:
    code after `Server.run` (a `finally`) never runs on SIGTERM."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for step in on_shutdown:
            try:
                step()
            except Exception:  # noqa: BLE001 - the next steps (the log's close) still run
                logger.exception("serve: a shutdown step failed")

    return lifespan


def create_app(engine: Engine, api_key: str | None = None, *, poll_disconnect: float = 0.1,
               on_shutdown: Sequence[Callable[[], Any]] = ()):
    """The FastAPI application over a started (or to-be-started) `engine`: its error handlers, its routes, and the
    chat page's static files. `poll_disconnect`: seconds between two checks that a client waiting for a whole
    response is still there. `on_shutdown`: called when the server shuts down (`shutdown_lifespan`)."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=shutdown_lifespan(on_shutdown))
    http_errors: dict[int, int] = {}  # HTTP error responses by status, for /metrics
    add_error_handlers(app, http_errors)
    add_routes(app, engine, api_key, http_errors, poll_disconnect)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(engine: Engine, http_errors: dict[int, int] | None = None) -> str:
    """The /metrics page in Prometheus' text exposition format (version 0.0.4)."""
    s = engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                     for labels, value in samples)

    metric("alignkit_queue_depth", "gauge", "Requests waiting to join the running batch.", [("", engine.queue_depth)])
    metric("alignkit_running_rows", "gauge", "Rows (request choices) in the running batch.",
           [("", engine.running_rows)])
    metric("alignkit_tokens_per_second", "gauge", "Generated tokens per second over the last 10 seconds.",
           [("", float(round(s.tokens_per_second(), 3)))])
    names = engine.stack.names
    metric("alignkit_requests_total", "counter", "Requests completed, per served model.",
           [(f'{{model="{_esc(m)}"}}', s.requests.get(m, 0)) for m in names])
    metric("alignkit_generated_tokens_total", "counter", "Generated tokens, per served model.",
           [(f'{{model="{_esc(m)}"}}', s.tokens.get(m, 0)) for m in names])
    metric("alignkit_request_failures_total", "counter", "Requests that did not complete, by reason.",
           [('{reason="error"}', s.errors), ('{reason="timeout"}', s.timeouts), ('{reason="cancelled"}', s.cancelled),
            ('{reason="queue_full"}', s.rejected)])
    metric("alignkit_short_reft_prompts_total", "counter", "Prompts shorter than their ReFT adapter's positions "
           "need (edited at fewer positions), per served model.",
           [(f'{{model="{_esc(m)}"}}', s.short_prompts.get(m, 0)) for m in names])
    metric("alignkit_http_errors_total", "counter", "HTTP error responses, by status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted((http_errors or {}).items())])
    metric("alignkit_forwards_total", "counter", "Model forwards (prefills and decode steps).", [("", s.forwards)])
    metric("alignkit_forward_seconds_total", "counter", "Seconds spent in model forwards.",
           [("", float(round(s.forward_seconds, 6)))])
    for name, hist, total, help_ in (("alignkit_request_latency_seconds", s.latency, s.latency_sum,
                                      "Time from submission to the last token."),
                                     ("alignkit_time_to_first_token_seconds", s.ttft, s.ttft_sum,
                                      "Time from submission to the first token.")):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} histogram")
        acc = 0
        for b, c in zip(list(s.LATENCY_BUCKETS) + ["+Inf"], hist):
            acc += c
            lines.append(f'{name}_bucket{{le="{b}"}} {acc}')
        lines.append(f"{name}_sum {total:g}")
        lines.append(f"{name}_count {acc}")
    return "\n".join(lines) + "\n"


def serve_forever(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  log_level: str = "info", output_dir: str | None = None, log_every: float = 30.0,
                  sock: Any = None) -> None:
    """Start the engine and run uvicorn until interrupted; with `output_dir`, a `ServeLog` writes the server's
    metrics, TensorBoard scalars and (at the end) plots there. `sock`: a socket already bound to host:port (the CLI
    binds before loading the model, so a port in use stops it before anything is loaded or written). The log is
    stopped (its last row, TensorBoard closed, plots) in the app's shutdown hook: after a SIGTERM uvicorn raises the
    signal again once that hook has run (row M20), and the process ends before the `finally` below."""
    import uvicorn

    log = ServeLog(engine, output_dir, log_every) if output_dir is not None else None  # checks the folder first
    engine.start()
    if log is not None:
        log.start()
    try:
        app = create_app(engine, api_key, on_shutdown=(log.stop,) if log is not None else ())
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
    finally:
        if log is not None:
            log.stop()  # a no-op once the shutdown hook stopped it (an error before uvicorn's start: here)
        engine.stop()


__all__ = ["PART_SEPARATOR", "ApiError", "chat_prompt", "completion_prompts", "content_text", "create_app",
           "developer_as_system", "end_error", "prometheus_text", "serve_forever", "sampling_params"]
