"""`alignkit serve`'s HTTP API, driven by the official `openai` client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the openai client is needed (pip install 'alignkit[test]')")
pytest.importorskip("fastapi", reason="fastapi is needed (pip install 'alignkit[serve]')")

from alignkit.serve.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

from .conftest import NEAR_TIE, reference_greedy, reference_model, running_server  # noqa: E402

NAMES = ["base", "polite", "terse", "both"]


@pytest.fixture(scope="module")
def server(serve_stack):
    engine = Engine(serve_stack, EngineConfig(max_batch_rows=32, max_queue=64, max_prompt_tokens=48,
                                              max_new_tokens=64))
    with running_server(engine) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(url, path, body=None, method=None, headers=None):
    """(status, parsed JSON or text) of one HTTP request (body: bytes or a JSON-able object)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metric(text, name, labels=""):
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_models_completions_chat_and_usage(client, server):
    url, engine = server
    assert [m.id for m in client.models.list().data] == NAMES
    tok = engine.tokenizer
    prompt = "The quick brown fox"
    direct = engine.generate("polite", tok(prompt)["input_ids"], SamplingParams(max_tokens=9, temperature=0.0),
                             chat=False)
    r = client.completions.create(model="polite", prompt=prompt, max_tokens=9, temperature=0)
    assert r.object == "text_completion" and r.model == "polite"
    assert r.choices[0].text == direct["choices"][0]["text"]
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert r.usage.completion_tokens == direct["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # chat: the template's prompt, streamed deltas add up to the non-streamed message
    msgs = [{"role": "user", "content": "Hello! How can I help you today?"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    expect = engine.generate("both", ids, SamplingParams(max_tokens=12, temperature=0.0))
    c = client.chat.completions.create(model="both", messages=msgs, max_tokens=12, temperature=0)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == expect["choices"][0]["text"]
    assert c.usage.prompt_tokens == len(ids)
    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model="both", messages=msgs, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(parts) == c.choices[0].message.content
    assert finish == c.choices[0].finish_reason
    assert usage.completion_tokens == c.usage.completion_tokens
    # streamed completions, n=2 seeded, stop string
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model="terse", prompt=prompt, max_tokens=6, temperature=1.0, seed=3, n=2,
                                           stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    again = client.completions.create(model="terse", prompt=prompt, max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [ch.text for ch in again.choices] == [texts[0], texts[1]]
    assert again.usage.prompt_tokens == len(tok(prompt)["input_ids"])  # counted once, as OpenAI does, for n=2
    full = r.choices[0].text
    cut = client.completions.create(model="polite", prompt=prompt, max_tokens=9, temperature=0, stop=[full[2:4]])
    assert cut.choices[0].text == full[:full.find(full[2:4])] and cut.choices[0].finish_reason == "stop"


def test_completions_do_not_stop_on_the_chat_templates_turn_end(server, monkeypatch):
    """/v1/completions (plain text, no template) stopped on the template's turn-end token <|im_end|> as chat does;
    vLLM's completions stop on EOS alone (the generation config's and the tokenizer's), and the token means nothing
    outside the template. The model is made to write "Ok", "then", <|im_end|>, "more", ...: completions now go on
    past it (the special token not in the text, finish "length"); chat still ends there (finish "stop")."""
    url, engine = server
    tok = engine.tokenizer
    head, tail = (tok(t, add_special_tokens=False)["input_ids"] for t in ("Ok then", " more words"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end and tok.decode(head + tail) == "Ok then more words"
    forced = head + [im_end] + tail
    sample = engine._sample

    def forced_sample(logits, rows):
        out = sample(logits, rows)
        for b, r in enumerate(rows):
            out[b] = forced[min(len(r.tokens), len(forced) - 1)]
        return out

    monkeypatch.setattr(engine, "_sample", forced_sample)
    status, body = raw(url, "/v1/completions", {"model": "base", "prompt": "Hello", "max_tokens": len(forced),
                                                "temperature": 0})
    assert status == 200, body
    assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == ("Ok then more words", "length")
    assert body["usage"]["completion_tokens"] == len(forced)
    status, body = raw(url, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": len(forced), "temperature": 0})
    assert status == 200, body
    assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]) == ("Ok then", "stop")


def test_32_concurrent_clients_over_three_adapters_and_base(server, serve_dirs):
    """32 concurrent clients get what each request gets alone, token for token, except where the greedy
    choice is a near-tie (top-2 logits within 1e-4 in the independent reference: either token is greedy)."""
    url, engine = server
    prompts = ["Hello", "The quick brown fox jumps", "Question: what is the capital of", "0 1 2 3 4 5 6 7 8"]
    jobs = [(NAMES[k % 4], prompts[(k // 4) % 4], 5 + k % 7) for k in range(32)]

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as ac:
            async def one(m, p, n):
                r = await ac.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
                return r.choices[0].text, r.usage.completion_tokens
            alone = [await one(*j) for j in jobs]
            together = await asyncio.gather(*(one(*j) for j in jobs), return_exceptions=True)
            return alone, together

    alone, together = asyncio.run(main())
    assert [x for x in together if isinstance(x, BaseException)] == []
    models = {m: reference_model(serve_dirs, m) for m in NAMES}
    tok = engine.tokenizer
    tie = [any(gap < NEAR_TIE for _, _, gap in reference_greedy(*models[m], tok(p)["input_ids"], n,
                                                                  engine.text_end_ids))
           for m, p, n in jobs]
    assert sum(tie) <= 4
    assert [t for t, x in zip(together, tie) if not x] == [a for a, x in zip(alone, tie) if not x]
    assert len({a[0] for a in alone[:4]}) == 4  # the four models answer differently


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    url, engine = server
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    assert e.value.code == "model_not_found"
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "base", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),  # was a 500
        ({"model": "base"}, 400, "prompt"),
        ({"prompt": "Hi"}, 400, "model"),
        ({"model": "base", "prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": "base", "prompt": "Hi", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "base", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "base", "prompt": ""}, 400, "prompt"),
        ({"model": "base", "prompt": ["Hi", ""]}, 400, "prompt"),
        ({"model": "base", "prompt": "Hi", "max_tokens": 2.5}, 400, "max_tokens"),
        ({"model": "base", "prompt": "Hi", "stop": [1]}, 400, "stop"),
        ({"model": "base", "prompt": "Hi", "n": 0}, 400, "n"),
        ({"model": "base", "prompt": "Hi " * 60}, 400, "prompt"),
        ({"model": "base", "prompt": [99999]}, 400, "prompt"),
    ]
    for body, status, param in cases:
        got, err = raw(url, "/v1/completions", body)
        assert got == status, (body, got, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"], body
        assert err["error"]["param"] == param, body
    # JSON's NaN parses: a 400 with the API's own range (was the engine's 'temperature must be in [0, 100]'). A lone
    # UTF-16 surrogate escape (a JavaScript string cut inside an emoji) was a 500 'internal error: TypeError' from the
    # tokenizer (UnicodeEncodeError for the model name), and a stop string holding one never matched
    surrogate = "lone UTF-16 surrogate"
    for path, body, param, says in (
            ("completions", b'{"model": "base", "prompt": "Hi", "temperature": NaN}', "temperature", "[0.0, 2.0]"),
            ("completions", b'{"model": "base", "prompt": "Hi \\ud83d"}', "prompt", surrogate),
            ("completions", b'{"model": "base", "prompt": "Hi", "stop": ["x", "\\udc00"]}', "stop[1]", surrogate),
            ("completions", b'{"model": "base\\ud800", "prompt": "Hi"}', "model", surrogate),
            ("completions", b'{"model": "base", "prompt": "Hi", "user\\ud800": 1}', "user\\ud800", surrogate),
            ("chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "\\ud83d"}]}',
             "messages[0].content", surrogate)):
        got, err = raw(url, "/v1/" + path, body)
        assert (got, err["error"]["param"], err["error"]["type"]) == (400, param, "invalid_request_error"), (body, err)
        assert says in err["error"]["message"], err
    got, err = raw(url, "/v1/chat/completions", {"model": "base", "messages": [{"role": "bot", "content": "x"}]})
    assert got == 400 and "role" in err["error"]["message"]
    assert "system, developer, user or assistant" in err["error"]["message"], err  # every role taken (was: no developer)
    # the engine's limits name the field too (before: param null); a chat prompt's field is messages
    got, err = raw(url, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi " * 60}]})
    assert got == 400 and err["error"]["param"] == "messages" and "tokens" in err["error"]["message"], err
    got, err = raw(url, "/v1/completions", {"model": "base", "prompt": ["Hi", ""]})
    assert "'prompt'[1] is empty" in err["error"]["message"], err
    # a prompt of a list past a limit is named by its index (before: 'the prompt has N tokens', which of them unsaid)
    got, err = raw(url, "/v1/completions", {"model": "base", "prompt": ["Hi", "Ho", "Hi " * 60], "max_tokens": 2})
    assert got == 400 and err["error"]["param"] == "prompt", err
    assert re.fullmatch(r"'prompt'\[2\]: the prompt has \d+ tokens; this server takes at most 48",
                        err["error"]["message"]), err
    got, err = raw(url, "/v1/completions", {"model": "base", "prompt": [[1, 2], [1, 99999]], "max_tokens": 2})
    assert got == 400 and err["error"]["message"].startswith("'prompt'[1]: token ids must be in [0, "), err
    got, err = raw(url, "/v1/nothing-here")
    assert got == 404 and "error" in err
    # prompt and max_tokens limits say the limit
    got, err = raw(url, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 65})
    assert "limit of 64" in err["error"]["message"]
    # everyone else is still served
    assert client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None
    status, health = raw(url, "/health")
    assert status == 200 and health["status"] == "ok"


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                         ("logit_bias", {"5": 100}), ("suffix", " end"), ("top_k", 5),
                                         ("min_p", 0.1), ("repetition_penalty", 1.3),
                                         ("response_format", {"type": "json_object"}), ("logprobs", 0),
                                         ("echo", True), ("best_of", 2), ("min_tokens", 5), ("ignore_eos", True),
                                         ("stop_token_ids", [5]), ("include_stop_str_in_output", True),
                                         ("use_beam_search", True), ("guided_json", {"type": "object"}),
                                         ("guided_regex", "a+"), ("guided_choice", ["a"]), ("prompt_logprobs", 1),
                                         ("truncate_prompt_tokens", 8), ("skip_special_tokens", False),
                                         ("tool_choice", "required"), ("function_call", {"name": "f"}),
                                         ("bad_words", ["a"]), ("allowed_token_ids", [5]), ("length_penalty", 2.0),
                                         ("logits_processors", ["m.P"]), ("structured_outputs", {"json": {}}),
                                         ("return_tokens_as_token_ids", True), ("prompt_embeds", "AAAA"),
                                         ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy"}),
                                         ("web_search_options", {}), ("reasoning_effort", "high"),
                                         ("verbosity", "low"), ("add_generation_prompt", False),
                                         ("continue_final_message", True), ("chat_template", "{{ 'x' }}"),
                                         ("chat_template_kwargs", {"enable_thinking": False}),
                                         ("documents", [{"text": "x"}]), ("structural_tag", "{}"),
                                         ("return_token_ids", True),
                                         # vLLM 0.32's (accepted and ignored until session 17)
                                         ("repetition_detection", {"max_pattern_size": 4}),
                                         ("thinking_token_budget", 16), ("watermarking", True),
                                         ("logprob_token_ids", [5]), ("vllm_xargs", {"k": 1}),
                                         ("return_token_offsets", True), ("return_prompt_text", True)])
def test_sampling_fields_the_engine_does_not_implement_are_refused(client, server, field, value):
    """Before, these were accepted and the answer sampled without them (a 200 that looked like it honoured the
    request; tool_choice .. documents until the second audit). Now a 400 naming the field, on both endpoints; their
    neutral values and fields that do not change the answer (user) are still served."""
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="Hi", max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field and "not supported" in e.value.body["message"], e.value.body
    got, err = raw(server[0], "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 2, field: value})
    assert got == 400 and err["error"]["param"] == field, err
    out = client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0, presence_penalty=0,
                                    frequency_penalty=0, user="u1", extra_body={"top_k": -1, "repetition_penalty": 1,
                                                                                "tool_choice": "auto",
                                                                                "add_generation_prompt": True,
                                                                                "modalities": ["text"]})
    assert out.choices[0].finish_reason in ("length", "stop")


def test_fields_that_disagree_or_that_the_engine_cannot_take_name_the_field(client, server):
    """max_tokens and max_completion_tokens both given with different values: a 400 naming both (before: 200,
    max_completion_tokens used and max_tokens dropped without a word). A seed outside 64 bits and top_p 0 are
    400s naming the field (before: the seed killed the engine thread, every request then hung; top_p 0 was a
    400 with param null)."""
    url, engine = server
    hi = {"model": "base", "prompt": "Hi"}
    got, err = raw(url, "/v1/completions", {**hi, "max_tokens": 3, "max_completion_tokens": 5})
    assert got == 400 and err["error"]["param"] == "max_completion_tokens", err
    assert "max_tokens" in err["error"]["message"]
    got, err = raw(url, "/v1/completions", {**hi, "max_completion_tokens": 2.5})
    assert got == 400 and err["error"]["param"] == "max_completion_tokens", err
    for body, param in (({"seed": 2 ** 70, "temperature": 1.0}, "seed"), ({"top_p": 0}, "top_p")):
        got, err = raw(url, "/v1/completions", {**hi, "max_tokens": 2, **body})
        assert got == 400 and err["error"]["param"] == param, err
    got, out = raw(url, "/v1/completions", {**hi, "max_tokens": 1, "max_completion_tokens": None, "temperature": 0})
    assert got == 200 and out["usage"]["completion_tokens"] == 1, out  # before: null took the default (64)
    out = client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0,
                                    extra_body={"max_completion_tokens": 2})
    assert out.usage.completion_tokens <= 2
    assert engine.alive


def test_metrics_count_what_was_served(client, server):
    url, engine = server
    before = raw(url, "/metrics")[1]
    r1 = client.completions.create(model="terse", prompt="Hello", max_tokens=4, temperature=0)
    r2 = client.completions.create(model="terse", prompt="Hello there", max_tokens=3, temperature=0)
    after = raw(url, "/metrics")[1]
    lab = '{model="terse"}'
    assert metric(after, "alignkit_requests_total", lab) - metric(before, "alignkit_requests_total", lab) == 2
    assert (metric(after, "alignkit_generated_tokens_total", lab) - metric(before, "alignkit_generated_tokens_total", lab)
            == r1.usage.completion_tokens + r2.usage.completion_tokens)
    assert (metric(after, "alignkit_request_latency_seconds_count") -
            metric(before, "alignkit_request_latency_seconds_count")) == 2
    assert metric(after, "alignkit_queue_depth") == 0
    assert metric(after, "alignkit_running_rows") is not None
    assert metric(after, "alignkit_tokens_per_second") > 0
    assert "# TYPE alignkit_request_latency_seconds histogram" in after
    inf = metric(after, "alignkit_request_latency_seconds_bucket", '{le="+Inf"}')
    assert inf == metric(after, "alignkit_request_latency_seconds_count")


def test_client_disconnect_cancels_generation(server, monkeypatch):
    url, engine = server
    real = engine._forward

    def slow(*a, **k):  # 64 tokens then take >= 1.3 s: the disconnect surely comes first
        time.sleep(0.02)
        return real(*a, **k)

    monkeypatch.setattr(engine, "_forward", slow)
    cancelled = engine.stats.cancelled
    body = json.dumps({"model": "polite", "prompt": "Hello", "max_tokens": 64, "temperature": 0, "stream": True,
                       "stop": ["\u2603never"]}).encode()
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"200 OK" in s.recv(4096)  # headers (and maybe first chunks) arrived: it is generating
    s.close()
    deadline = time.monotonic() + 20
    # the engine counts the cancellation, then drops the row at the end of the same step: poll for both (the
    # engine thread may be between the two when this thread looks)
    while (engine.stats.cancelled == cancelled or engine.running_rows) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.cancelled == cancelled + 1
    assert engine.running_rows == 0


def test_queue_full_timeout_and_api_key(serve_stack):
    full = Engine(serve_stack, EngineConfig(max_queue=0))
    with running_server(full, api_key="s3cret") as url:
        status, err = raw(url, "/v1/models")
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in c.models.list().data] == NAMES
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="base", prompt="Hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert raw(url, "/health")[0] == 200  # health is open
    slow = Engine(serve_stack, EngineConfig(request_timeout=1e-6))
    with running_server(slow) as url:
        status, err = raw(url, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2})
        assert status == 504 and "timed out" in err["error"]["message"]


def test_a_server_shutting_down_answers_503(serve_stack):
    """OpenAI clients retry a 503; a request the stopping engine ended was a 500, and one sent after the engine had
    stopped was queued for a loop that had ended (no answer until the client's own timeout)."""
    from alignkit.serve.api import end_error

    err = end_error("the server is shutting down")
    assert (err.status, err.code, err.message) == (503, "unavailable", "the server is shutting down; retry the request")
    assert end_error("internal error: ValueError: x").status == 500 and end_error("timed out after 1 s").status == 504
    engine = Engine(serve_stack, EngineConfig())
    with running_server(engine) as url:
        engine.stop()  # what the server does first when it shuts down
        status, err = raw(url, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2})
        assert status == 503 and err["error"]["message"] == "the server is shutting down; retry the request", err


def test_messages_the_chat_template_refuses_are_a_400_with_its_reason(serve_stack):
    """A chat template that raises (e.g. 'Conversation roles must alternate', no system role) is a 400 naming
    messages with the template's own message. Before: a 500 'internal error: TemplateError'."""
    import copy

    from alignkit.serve.api import ApiError, chat_prompt

    tok = copy.deepcopy(serve_stack.tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ApiError) as e:
        chat_prompt({"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Hi"}]}, tok)
    assert e.value.status == 400 and e.value.param == "messages" and "System role not supported" in e.value.message
    assert chat_prompt({"messages": [{"role": "user", "content": "Hi"}]}, tok)


def test_stream_options_without_stream_is_a_400_naming_it(client, server):
    """OpenAI and vLLM refuse stream_options on a request that is not streamed; it was accepted and ignored. A
    malformed one (include_usage not a boolean) was read as truthy. Both are 400s naming stream_options now; with
    stream it still adds the usage chunk. Its other keys were accepted and ignored too (vLLM's continuous_usage_stats:
    every chunk got usage null; OpenAI's include_obfuscation: no padding field; a typo): a 400 naming the key, unless
    at their neutral false."""
    url, _ = server
    hi = {"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    for body in ({**hi, "stream_options": {"include_usage": True}},
                 {**hi, "stream": True, "stream_options": {"include_usage": "yes"}},
                 {**hi, "stream": True, "stream_options": ["include_usage"]},
                 {**hi, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                 {**hi, "stream": True, "stream_options": {"include_obfuscation": True}},
                 {**hi, "stream": True, "stream_options": {"include_usgae": True}}):
        chat = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "Hi"}]}
        for path, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
            got, err = raw(url, path, request)
            assert got == 400 and err["error"]["param"] == "stream_options", (path, body, err)
            key = next((k for k in body["stream_options"] if k != "include_usage"), None) \
                if isinstance(body["stream_options"], dict) else None
            assert key is None or f"stream_options.{key}" in err["error"]["message"], err
    chunks = list(client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2
    chunks = list(client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0, stream=True,
                                            extra_body={"stream_options": {"include_usage": True, "include_obfuscation":
                                                                           False, "continuous_usage_stats": False}}))
    assert chunks[-1].usage.completion_tokens == 2


def test_null_stream_and_include_usage_are_their_defaults_as_vllm_reads_them(client, server):
    """`"stream": null` and `"stream_options": {"include_usage": null}` are the defaults in OpenAI's API and in
    vLLM's server (`stream: bool | None = False`, `include_usage: bool | None = False`, row V18), which answers them;
    alignkit's engine refused both with a 400 ('stream' must be true or false / 'stream_options' must be an object),
    so one request failed on engine alignkit and was answered by --engine vllm. A wrong type is still a 400."""
    url, _ = server
    hi = {"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    got, body = raw(url, "/v1/completions", {**hi, "stream": None})
    assert got == 200 and body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 2, body
    got, body = raw(url, "/v1/chat/completions", {**{k: v for k, v in hi.items() if k != "prompt"}, "stream": None,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert got == 200 and body["object"] == "chat.completion", body
    got, text = raw(url, "/v1/completions", {**hi, "stream": True, "stream_options": {"include_usage": None}})
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert got == 200 and text.rstrip().endswith("data: [DONE]"), text
    assert events and events[-1]["choices"][0]["finish_reason"] == "length", events  # the last one ends the choice
    assert all("usage" not in e for e in events), events  # include_usage false: no usage key, no usage chunk
    for bad in ({"stream": 1}, {"stream": "true"}, {"stream": True, "stream_options": {"include_usage": 1}}):
        got, err = raw(url, "/v1/completions", {**hi, **bad})
        assert got == 400 and err["error"]["param"] in ("stream", "stream_options"), (bad, err)


def test_add_special_tokens_is_honoured(serve_stack):
    """vLLM's add_special_tokens was accepted and ignored: a completion prompt always got the tokenizer's special
    tokens (a second BOS for a prompt already formatted with one) and a chat prompt never did. Checked with a
    tokenizer that adds a BOS: completions default on, chat default off, each as the field says."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from alignkit.serve.api import ApiError, chat_prompt, completion_prompts

    tok = copy.deepcopy(serve_stack.tokenizer)
    bos = tok.convert_tokens_to_ids("<|bos|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    plain = tok("Hi there", add_special_tokens=False)["input_ids"]
    assert completion_prompts({"prompt": "Hi there"}, tok) == [[bos] + plain]
    assert completion_prompts({"prompt": "Hi there", "add_special_tokens": False}, tok) == [plain]
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    templated = tok(text, add_special_tokens=False)["input_ids"]
    assert chat_prompt({"messages": msgs}, tok) == templated
    assert chat_prompt({"messages": msgs, "add_special_tokens": True}, tok) == [bos] + templated
    with pytest.raises(ApiError) as e:
        completion_prompts({"prompt": "Hi", "add_special_tokens": "no"}, tok)
    assert e.value.param == "add_special_tokens"


def test_a_message_name_reaches_the_template_and_tool_calls_are_refused(serve_stack):
    """A message's `name` was dropped before the chat template saw it (a template that writes the speaker's name got
    none); it is passed on. An assistant message carrying tool_calls lost them without a word (tools are not
    served): a 400 naming the message."""
    import copy

    from alignkit.serve.api import ApiError, chat_prompt

    tok = copy.deepcopy(serve_stack.tokenizer)
    tok.chat_template = ("{% for m in messages %}[{{ m['name'] if 'name' in m else m['role'] }}] {{ m['content'] }}"
                         "{% endfor %}")
    got = chat_prompt({"messages": [{"role": "user", "content": "Hi", "name": "ada"},
                                    {"role": "user", "content": "Yo"}]}, tok)
    assert got == tok("[ada] Hi[user] Yo", add_special_tokens=False)["input_ids"]
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(ApiError) as e:
        chat_prompt({"messages": [{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "", "tool_calls": calls}]}, tok)
    assert e.value.status == 400 and e.value.param == "messages[1]" and "tool_calls" in e.value.message


def test_text_parts_of_a_message_are_joined_with_a_newline_as_vllm_joins_them(serve_stack):
    """Content given as text parts was joined with "" here and with "\n" by vLLM's OpenAI server (the template reads
    content as a string; pinned in tests/compat/test_vllm.py, row V13): one request, two prompts on the two engines.
    Now "\n" here too; a part that is not text is a 400 naming the message."""
    import copy

    from alignkit.serve.api import ApiError, chat_prompt

    tok = copy.deepcopy(serve_stack.tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    got = chat_prompt({"messages": [{"role": "user", "content": parts}]}, tok)
    assert got == tok("[user] Hi\nthere|", add_special_tokens=False)["input_ids"]
    with pytest.raises(ApiError) as e:
        chat_prompt({"messages": [{"role": "user", "content": [*parts, {"type": "image_url", "image_url": {}}]}]}, tok)
    assert e.value.status == 400 and e.value.param == "messages[0]" and "only text parts" in e.value.message


def test_developer_messages_reach_the_template_as_vllm_gives_them(serve_stack):
    """A developer message became a system message in place here; vLLM's OpenAI server (row V13) passes the role on
    to a template that names it, and for one that does not makes it a system message and merges every system
    message into one at the front (contents joined with a blank line): one request, two prompts on the two engines.
    Now as vLLM does; a lone system message first is left alone."""
    import copy

    from alignkit.serve.api import chat_prompt

    tok = copy.deepcopy(serve_stack.tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
    msgs = [{"role": "developer", "content": "A"}, {"role": "user", "content": "Hi"},
            {"role": "system", "content": "B"}, {"role": "developer", "content": ""}]

    def text(messages, template=None):
        if template:
            tok.chat_template = template
        return tok.decode(chat_prompt({"messages": messages}, tok))

    assert text(msgs) == "[system] A\n\nB|[user] Hi|"
    assert text([{"role": "developer", "content": "A"}, {"role": "user", "content": "Hi"}]) == "[system] A|[user] Hi|"
    assert text([{"role": "user", "content": "Hi"}, {"role": "system", "content": "B"}]) == "[user] Hi|[system] B|"
    named = "{% for m in messages %}{{ 'D' if m['role'] == 'developer' else m['role'] }}: {{ m['content'] }}|{% endfor %}"
    assert text(msgs, named) == "D: A|user: Hi|system: B|D: |"


def test_an_adapter_trained_with_another_chat_template_is_refused_on_the_chat_endpoint(serve_dirs, tmp_path, caplog):
    """A trainer saves its tokenizer with the adapter (`model.tokenizer` one included), and the server formats chat
    messages with the base's alone: an adapter trained through another chat template was served prompts in a format
    it never saw (200s, silently). Now a warning naming the folder at load and a 400 naming the model on the chat
    endpoint; /v1/completions serves it as before, and an adapter saved with the base's own tokenizer is unchanged.
    A saved tokenizer with another vocabulary is refused at load (every prompt's ids would be another text)."""
    import logging
    import shutil

    from alignkit.models.loading import load_tokenizer
    from alignkit.models.tiny import build_tiny_tokenizer
    from alignkit.serve.stack import load_stack

    base_tok = load_tokenizer(serve_dirs["base"])
    same, other = tmp_path / "same", tmp_path / "other"
    for folder in (same, other):
        shutil.copytree(serve_dirs["adapters"]["terse"], folder)
    base_tok.save_pretrained(same)
    base_tok.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "### assistant:")
    base_tok.save_pretrained(other)
    with caplog.at_level(logging.WARNING, logger="alignkit.serve.stack"):
        stack = load_stack(serve_dirs["base"], {"same": same, "other": other}, base_name="base")
    assert [r.getMessage() for r in caplog.records if str(other) in r.getMessage()], caplog.text
    msgs = [{"role": "user", "content": "Hi"}]
    with running_server(Engine(stack, EngineConfig(max_new_tokens=8))) as url:
        got, err = raw(url, "/v1/chat/completions", {"model": "other", "messages": msgs, "max_tokens": 2})
        assert got == 400 and err["error"]["param"] == "model" and "chat template" in err["error"]["message"], err
        for model in ("same", "base"):
            got, out = raw(url, "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 2})
            assert got == 200, out
        got, out = raw(url, "/v1/completions", {"model": "other", "prompt": "### user: Hi\n### assistant:",
                                                "max_tokens": 2})
        assert got == 200 and out["usage"]["prompt_tokens"] == len(stack.tokenizer("### user: Hi\n### assistant:")
                                                                   ["input_ids"]), out
    foreign = tmp_path / "foreign"
    shutil.copytree(serve_dirs["adapters"]["terse"], foreign)
    build_tiny_tokenizer(["a b c d e f g " * 20, "zz yy xx"]).save_pretrained(foreign)
    with pytest.raises(ValueError, match=r"adapter 'foreign': the tokenizer saved with it .* has another vocabulary"):
        load_stack(serve_dirs["base"], {"foreign": foreign}, base_name="base")


def test_a_model_whose_files_changed_on_disk_is_refused_by_name(serve_dirs, tmp_path):
    """A run saved over a served adapter's folder (or a file of it removed) while the server runs: the server still
    holds the weights it loaded, so it answered that name with the old adapter without a word; now 409 naming the
    file and the fix, the other names are served as before."""
    import shutil

    from alignkit.serve.request import ModelChanged
    from alignkit.serve.stack import load_stack

    from .conftest import make_adapter

    folders = {name: shutil.copytree(serve_dirs["adapters"][name], tmp_path / name) for name in ("polite", "terse")}
    engine = Engine(load_stack(serve_dirs["base"], folders, base_name="base"), EngineConfig())
    body = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}
    with running_server(engine) as url:
        before = {m: raw(url, "/v1/completions", {**body, "model": m}) for m in ("base", "polite", "terse")}
        assert all(status == 200 for status, _ in before.values()), before
        make_adapter(serve_dirs["base"], folders["terse"], "lora", seed=99)  # a new run's save over the folder
        status, err = raw(url, "/v1/completions", {**body, "model": "terse"})
        assert status == 409, (status, err)
        assert err["error"]["code"] == "model_changed" and err["error"]["param"] == "model"
        assert "adapter 'terse'" in err["error"]["message"] and str(folders["terse"]) in err["error"]["message"]
        assert "restart alignkit serve" in err["error"]["message"]
        with pytest.raises(ModelChanged, match="adapter 'terse'"):  # the engine's own entry refuses it too
            engine.generate("terse", [5, 6], SamplingParams(max_tokens=1))
        for m in ("base", "polite"):  # unchanged: served, the same answer
            status, again = raw(url, "/v1/completions", {**body, "model": m})
            assert status == 200 and again["choices"] == before[m][1]["choices"]
        (folders["polite"] / "interventions.safetensors").unlink()
        status, err = raw(url, "/v1/completions", {**body, "model": "polite"})
        assert status == 409 and "interventions.safetensors was removed" in err["error"]["message"], err
        assert raw(url, "/v1/completions", {**body, "model": "base"})[0] == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "terse", "prompt": "Hello", "max_tokens": 16, "temperature": 0, "stream": True}),
    ("/v1/chat/completions", {"model": "terse", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
                              "temperature": 0, "stream": True})])
def test_a_stream_that_fails_mid_way_ends_with_its_error_then_done(server, client, monkeypatch, path, body):
    """The engine's forward fails after the first tokens went out. Before: the error chunk was the last event (no
    `data: [DONE]`: a client reading to [DONE] waited on a stream that had ended). Now, as vLLM's stream generators
    (row V19): token chunks, the error's body, then `data: [DONE]`; the openai client raises the error's message."""
    url, engine = server
    real, calls = engine._forward, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 3:  # the prefill and two decode steps pass
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(engine, "_forward", failing)
    status, text = raw(url, path, body)
    events = [e[len("data: "):] for e in text.split("\n\n") if e.strip()]
    assert status == 200 and events[-1] == "[DONE]", text
    error = json.loads(events[-2])["error"]
    assert "injected failure" in error["message"] and error["type"] == "server_error", error
    assert any("choices" in json.loads(e) for e in events[:-2])  # tokens went out before the failure
    calls.clear()
    create = client.chat.completions.create if "chat" in path else client.completions.create
    with pytest.raises(openai.APIError, match="injected failure"):
        for _ in create(**body):
            pass


def test_a_request_field_the_server_does_not_read_is_named_once_in_its_log(server, monkeypatch, caplog):
    """`max_new_tokens` (transformers' name) instead of `max_tokens`: answered with the default length, as vLLM
    answers it (its requests ignore extra fields, logging them at debug level). Before: nothing said so anywhere.
    Now one warning per field name in the server's log; fields known to change nothing (user, metadata) and the
    fields it reads say nothing."""
    import logging

    from alignkit.serve import api

    monkeypatch.setattr(api, "_SAID_UNREAD", set())
    url, _ = server
    body = {"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "user": "u1", "metadata": {"a": "b"}}
    with caplog.at_level(logging.WARNING, logger="alignkit.serve.api"):
        assert raw(url, "/v1/completions", body)[0] == 200
        assert raw(url, "/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                                 "messages": [{"role": "user", "content": "Hi"}]})[0] == 200
        assert not [r for r in caplog.records if "not read by this server" in r.getMessage()]
        for _ in range(2):
            status, _ = raw(url, "/v1/completions", {**body, "max_new_tokens": 5, "frequency": 1})
            assert status == 200
        assert raw(url, "/v1/chat/completions", {"model": "base", "max_tokens": 2, "prompt": "Hi",
                                                 "messages": [{"role": "user", "content": "Hi"}]})[0] == 200
    said = [r.getMessage() for r in caplog.records if "not read by this server" in r.getMessage()]
    assert len(said) == 2 and "/v1/completions request field(s) frequency, max_new_tokens" in said[0], said
    assert "/v1/chat/completions request field(s) prompt are not read" in said[1], said
