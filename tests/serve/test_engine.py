"""The serving engine: mixed-adapter continuous batching equals each request run alone.

The reference is independent of the engine: each adapter loaded on its own with alignkit's ordinary
`load_adapter`, then greedy decoding by re-running the whole sequence every step (no KV cache, no
padding, no batching, no peft mixed batch), ReFT locations at the adapter's trained prompt positions.
Where the reference's top two logits are within 1e-4 (a near-tie on these random models; batching moves
logits by ~1e-6), either token is the greedy answer and later tokens may legitimately differ: comparisons
stop there (`conftest.greedy_matches`), and the tests check that this happens rarely."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from alignkit.models.loading import load_model
from alignkit.serve.engine import Engine, EngineConfig, QueueFullError, RequestError, SamplingParams
from alignkit.serve.stack import load_stack

from .conftest import greedy_matches, reference_greedy, reference_model

PROMPTS = ["Hello", "The quick brown fox jumps", "Question: what is the capital of", "0 1 2 3 4 5 6 7 8",
           "def add(a, b):"]


@pytest.fixture(scope="module")
def stack(serve_dirs):
    return load_stack(serve_dirs["base"], serve_dirs["adapters"], base_name="base")


@pytest.fixture(scope="module")
def engine(stack):
    eng = Engine(stack, EngineConfig(max_batch_rows=32, max_queue=64, max_prompt_tokens=64, max_new_tokens=32))
    eng.start()
    yield eng
    eng.stop()


def test_mixed_adapters_concurrent_equal_alone(engine, stack, serve_dirs):
    tok = stack.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    names = ["base", "polite", "terse", "both"]
    models = {m: reference_model(serve_dirs, m) for m in names}
    ref = {(m, i): reference_greedy(*models[m], p, 14, engine.end_ids) for m in names for i, p in enumerate(prompts)}
    # every adapter changes what the model says (else routing would be untested)
    for i in range(len(prompts)):
        assert len({tuple(t for t, _, _ in ref[(m, i)]) for m in names}) == 4, i
    results, errors = {}, []

    def client(k):
        m, i, n = names[k % 4], k % 5, 6 + k % 9
        try:
            results[k] = (m, i, n, engine.generate(m, prompts[i], SamplingParams(max_tokens=n, temperature=0.0),
                                                   timeout=60))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    before = engine.stats.forwards
    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 32
    ties = 0
    for k, (m, i, n, res) in results.items():
        got = res["choices"][0]["token_ids"]
        ok, tie = greedy_matches(got, ref[(m, i)], n)
        assert ok, (k, m, i, got, ref[(m, i)][:n])
        ties += tie
        assert res["completion_tokens"] == len(got)
        assert res["choices"][0]["finish_reason"] == ("stop" if got[-1] in engine.end_ids else "length")
    assert ties <= 4  # nearly every request is compared over its whole length
    # shared forwards: far fewer than one per generated token
    total = sum(len(r[3]["choices"][0]["token_ids"]) for r in results.values())
    assert engine.stats.forwards - before < total / 3


def test_short_request_joins_and_leaves_while_long_one_runs(engine, stack):
    """The short request is submitted from the long one's 3rd token event (so it surely arrives mid-decode):
    it joins at the next step and ends while the long one is still generating."""
    tok = stack.tokenizer
    prompt = tok("Hello")["input_ids"]
    order, seen = [], {"long": 0}

    def long_sink(ev):
        if ev.kind == "token":
            seen["long"] += 1
            if seen["long"] == 3:
                engine.submit("terse", prompt, SamplingParams(max_tokens=2, temperature=0.0), short_sink)
        if ev.kind == "end":
            order.append(("long", seen["long"]))

    def short_sink(ev):
        if ev.kind == "end":
            order.append(("short", seen["long"]))

    engine.submit("polite", prompt, SamplingParams(max_tokens=32, temperature=0.0), long_sink)
    deadline = time.monotonic() + 30
    while len(order) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [o[0] for o in order] == ["short", "long"]
    assert order[0][1] <= 5  # the short one ended two steps after it joined, at the long one's ~5th token
    assert order[1][1] == 32 or order[1][1] > 5


def test_seeded_sampling_does_not_depend_on_the_batch(engine, stack):
    tok = stack.tokenizer
    prompt = tok("The quick brown fox")["input_ids"]
    params = dict(max_tokens=10, temperature=1.5, top_p=0.9, seed=1234)
    alone = engine.generate("terse", prompt, SamplingParams(**params))["choices"][0]["token_ids"]
    res = {}
    noise = [threading.Thread(target=lambda k=k: engine.generate(["base", "both"][k % 2], prompt,
                                                                 SamplingParams(max_tokens=12, temperature=1.0)))
             for k in range(6)]
    for t in noise:
        t.start()
    res["x"] = engine.generate("terse", prompt, SamplingParams(**params))["choices"][0]["token_ids"]
    for t in noise:
        t.join()
    assert res["x"] == alone
    other = engine.generate("terse", prompt, SamplingParams(**{**params, "seed": 99}))["choices"][0]["token_ids"]
    assert other != alone


def test_n_choices_and_stop_strings(engine, stack):
    tok = stack.tokenizer
    prompt = tok("Hello")["input_ids"]
    full = engine.generate("base", prompt, SamplingParams(max_tokens=12, temperature=0.0))["choices"][0]
    text = full["text"]
    assert len(text) > 4
    stop = text[3:5]  # a stop string the greedy answer surely contains
    cut = engine.generate("base", prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[:text.find(stop)]
    res = engine.generate("base", prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=7, n=3))
    assert len(res["choices"]) == 3
    assert all(len(c["token_ids"]) == 5 or c["finish_reason"] == "stop" for c in res["choices"])
    assert len({tuple(c["token_ids"]) for c in res["choices"]}) > 1  # different streams per choice


def test_a_stop_string_ending_in_a_character_split_over_byte_tokens_does_not_leak(engine, stack, monkeypatch):
    """A character the byte-level tokenizer splits over several tokens ("€": three bytes) decodes to U+FFFD until its
    last byte; the engine held that tail back but looked for stop-string prefixes at the very end of the text (after
    the U+FFFD), so the "a" of a stop string "a€" was sent before the "€" completed it: "Ok a", not "Ok ". The
    text (the concatenation of the token events, as streamed) is cut before the stop string, as OpenAI and vLLM do."""
    tok = stack.tokenizer
    forced = tok("Ok a€ b", add_special_tokens=False)["input_ids"]
    assert len(forced) >= 6 and tok.decode(forced[:3]) == "Ok a"  # "€" is split over (at least two) byte tokens
    sample = engine._sample

    def forced_sample(logits, rows):  # the model writes "Ok a€ b"
        out = sample(logits, rows)
        for b, r in enumerate(rows):
            out[b] = forced[min(len(r.tokens), len(forced) - 1)]
        return out

    monkeypatch.setattr(engine, "_sample", forced_sample)
    prompt = tok("Hello")["input_ids"]
    for stop, text in ((["a€"], "Ok "), ([" a€"], "Ok"), (["€"], "Ok a"), (["zz", "a€ b"], "Ok ")):
        choice = engine.generate("base", prompt, SamplingParams(max_tokens=len(forced), temperature=0.0,
                                                                stop=stop))["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (text, "stop"), stop
    whole = engine.generate("base", prompt, SamplingParams(max_tokens=len(forced), temperature=0.0))["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == ("Ok a€ b", "length")


def test_a_stop_string_of_special_token_text_stops_on_that_token(engine, stack, monkeypatch):
    """Text is decoded without special tokens, so a stop string naming a special token that is not one of the
    engine's end tokens (`<|im_start|>`) never matched and the row ran on past the token. It now ends the row on that
    token (finish "stop", the token not in the text); one holding a special token with other text is refused."""
    tok = stack.tokenizer
    special = tok.convert_tokens_to_ids("<|im_start|>")
    assert special not in engine.end_ids
    prompt = tok("Hello")["input_ids"]
    greedy = engine.generate("base", prompt, SamplingParams(max_tokens=6, temperature=0.0))["choices"][0]["token_ids"]
    sample = engine._sample

    def third_is_special(logits, rows):  # the model draws <|im_start|> as its third token
        out = sample(logits, rows)
        for b, r in enumerate(rows):
            if len(r.tokens) == 2:
                out[b] = special
        return out

    monkeypatch.setattr(engine, "_sample", third_is_special)
    ran_on = engine.generate("base", prompt, SamplingParams(max_tokens=6, temperature=0.0))["choices"][0]
    assert ran_on["token_ids"][2] == special and len(ran_on["token_ids"]) > 3  # no stop: the row goes past it
    cut = engine.generate("base", prompt, SamplingParams(max_tokens=6, temperature=0.0, stop=["<|im_start|>"]))
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["token_ids"][:2] == greedy[:2]
    assert choice["text"] == tok.decode(greedy[:2], skip_special_tokens=True)
    with pytest.raises(RequestError, match=r"stop: '\\n<\|im_start\|>' holds the special token '<\|im_start\|>'"):
        engine.generate("base", prompt, SamplingParams(max_tokens=6, stop=["\n<|im_start|>"]))


def test_limits_and_errors(engine, stack):
    tok = stack.tokenizer
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        engine.generate("nope", [1, 2], SamplingParams())
    with pytest.raises(RequestError, match="prompt has 65 tokens"):
        engine.generate("base", [5] * 65, SamplingParams())
    with pytest.raises(RequestError, match="max_tokens=33 exceeds"):
        engine.generate("base", [5], SamplingParams(max_tokens=33))
    with pytest.raises(RequestError, match="top_p"):
        engine.generate("base", [5], SamplingParams(top_p=0.0))
    # a token id past the embedding table: before, accepted, then the prefill's lookup raised in the engine thread
    # and failed every request of its batch ("internal error: IndexError")
    rows = stack.model.get_input_embeddings().num_embeddings
    with pytest.raises(RequestError, match=rf"token id {rows}; this model's token ids are 0 \.\. {rows - 1}") as e:
        engine.generate("base", [5, rows], SamplingParams(max_tokens=2))
    assert e.value.param == "prompt"
    # still serving
    assert engine.generate("base", tok("Hello")["input_ids"], SamplingParams(max_tokens=2))["choices"][0]["token_ids"]


def test_prompt_plus_max_tokens_past_the_models_context_is_refused(stack):
    """As vLLM / OpenAI answer: a request whose prompt + max_tokens runs past the model's positions
    (max_position_embeddings) is a 400, not tokens generated at positions the model never saw."""
    from alignkit.adapters import unwrap_lm

    ctx = unwrap_lm(stack.model).config.max_position_embeddings
    eng = Engine(stack, EngineConfig(max_prompt_tokens=4 * ctx, max_new_tokens=4 * ctx))  # not started
    with pytest.raises(RequestError, match=f"context is {ctx} tokens; the prompt has {ctx - 10} and max_tokens is 11"):
        eng.submit("base", [5] * (ctx - 10), SamplingParams(max_tokens=11), lambda e: None)
    eng.submit("base", [5] * (ctx - 10), SamplingParams(max_tokens=10), lambda e: None).cancel()  # exactly fits
    # a prompt that fills the context alone: the prompt is at fault, whatever max_tokens (it was a 400 naming
    # max_tokens, 'lower max_tokens or shorten the prompt', though no max_tokens >= 1 fits)
    for n in (ctx, ctx + 7):
        with pytest.raises(RequestError, match=f"context is {ctx} tokens and the prompt has {n}: no room for a new "
                                               f"token; shorten the prompt to at most {ctx - 1} tokens") as e:
            eng.submit("base", [5] * n, SamplingParams(max_tokens=1), lambda e: None)
        assert e.value.param == "prompt"


def test_the_default_max_tokens_shrinks_to_the_context_left(stack):
    """Without max_tokens, a prompt leaving fewer positions than the default was refused ('max_tokens is 64',
    a field the client never sent); vLLM and OpenAI shrink the default to the context left. So does the engine
    now: ctx - 10 prompt tokens get 10 new ones at most; a prompt filling the context is refused naming the
    prompt; an explicit max_tokens that does not fit stays refused (the test above). A short prompt gets the whole
    context left (it got a fixed 64, cutting most answers), capped by max_new_tokens, or a default_max_tokens set."""
    from alignkit.adapters import unwrap_lm

    ctx = unwrap_lm(stack.model).config.max_position_embeddings
    assert ctx - 10 > 0 and 10 < 64 and ctx > 200
    eng = Engine(stack, EngineConfig(max_prompt_tokens=4 * ctx, max_new_tokens=4 * ctx))  # not started
    req = eng.submit("base", [5] * (ctx - 10), SamplingParams(), lambda e: None)
    assert req.params.max_tokens == 10
    req.cancel()
    req = eng.submit("base", [5] * 3, SamplingParams(), lambda e: None)
    assert req.params.max_tokens == ctx - 3  # the context left (it was 64)
    req.cancel()
    with pytest.raises(RequestError, match=f"context is {ctx} tokens and the prompt has {ctx}: no room") as e:
        eng.submit("base", [5] * ctx, SamplingParams(), lambda e: None)
    assert e.value.param == "prompt"
    eng = Engine(stack, EngineConfig(max_new_tokens=200))  # the server's cap below the context left
    req = eng.submit("base", [5] * 3, SamplingParams(), lambda e: None)
    assert req.params.max_tokens == 200
    req.cancel()
    eng = Engine(stack, EngineConfig(max_new_tokens=200, default_max_tokens=16))  # a default set: kept
    req = eng.submit("base", [5] * 3, SamplingParams(), lambda e: None)
    assert req.params.max_tokens == 16
    req.cancel()


def test_a_request_without_max_tokens_runs_to_the_servers_cap(stack):
    """A request that sets no max_tokens (most OpenAI clients) was cut at 64 tokens with finish_reason "length";
    with no end token drawn (none listed), it now runs to max_new_tokens (100 > 64), as vLLM runs to the context."""
    eng = Engine(stack, EngineConfig(max_new_tokens=100), end_token_ids=[]).start()
    try:
        res = eng.generate("base", [5, 6, 7], SamplingParams(temperature=0.0), timeout=120)
    finally:
        eng.stop()
    assert res["completion_tokens"] == 100
    assert len(res["choices"][0]["token_ids"]) == 100
    assert res["choices"][0]["finish_reason"] == "length"


def test_queue_full_and_cancel(stack):
    eng = Engine(stack, EngineConfig(max_batch_rows=1, max_queue=1, max_new_tokens=64))  # not started: nothing drains
    events = []
    first = eng.submit("base", [5, 6], SamplingParams(max_tokens=64), events.append)
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.submit("base", [5, 6], SamplingParams(max_tokens=4), events.append)
    first.cancel()
    eng.start()
    try:
        deadline = time.monotonic() + 10
        while not any(e.kind == "end" for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.kind for e in events][-2:] == ["error", "end"]
        assert events[-2].message == "cancelled"
        assert eng.stats.cancelled == 1
    finally:
        eng.stop()


def test_a_lora_that_trains_a_module_whole_is_served_with_it(serve_dirs, tmp_path):
    """A LoRA adapter saved with `modules_to_save: [lm_head]`: the stacked per-row LoRA switched peft's layers off
    with `disable_adapter_layers()`, which switches the modules_to_save copy off too, so its rows were answered with
    the base's lm_head (other tokens than the adapter alone, no warning). Now such an adapter routes through peft's
    mixed batches; each row of a batch of it, a plain LoRA and the base equals its model alone (`generate`)."""
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, load_adapter, save_adapter

    torch.manual_seed(0)
    m = apply_adapter(load_model(serve_dirs["base"]), AdapterConfig(kind="lora", lora=LoraSettings(
        r=4, modules_to_save=["lm_head"])))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.5)
    save_adapter(m, tmp_path / "head")
    folders = {"head": tmp_path / "head", "terse": serve_dirs["adapters"]["terse"]}
    eng = Engine(load_stack(serve_dirs["base"], folders, base_name="base")).start()
    prompt = [5, 17, 42, 9, 88]
    res: dict = {}
    run = [threading.Thread(target=lambda name=name: res.__setitem__(name, eng.generate(
        name, prompt, SamplingParams(max_tokens=8, temperature=0.0), timeout=60)["choices"][0]["token_ids"]))
        for name in ("head", "terse", "base", "head")]  # one batch, or joining it
    try:
        for t in run:
            t.start()
        for t in run:
            t.join(60)
    finally:
        eng.stop()
    want = {}
    for name in res:
        model = load_model(serve_dirs["base"]).eval()
        model = load_adapter(model, folders[name]).eval() if name != "base" else model
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=8, do_sample=False, pad_token_id=0)
        want[name] = out[0, len(prompt):].tolist()
    assert res == want
    assert want["head"] != want["terse"] and want["head"] != want["base"]


def test_a_reft_adapter_that_trained_a_module_whole_is_refused_at_load(serve_dirs, tmp_path):
    """A ReFT adapter saved with `reft.modules_to_save: [lm_head]` was served with the base's lm_head (the stack
    loads each ReFT's interventions, not its trained modules): its answers were not the adapter's, without a word.
    Now load_stack refuses it, naming the folder and the module."""
    from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter, save_adapter
    from alignkit.interventions import ReftConfig

    reft = ReftSettings(config=ReftConfig.uniform([0], "loreft", low_rank_dimension=2).to_dict(), positions="l1",
                        modules_to_save=["lm_head"])
    m = apply_adapter(load_model(serve_dirs["base"]), AdapterConfig(kind="reft", reft=reft))
    save_adapter(m, tmp_path / "head")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'head'}: this ReFT adapter also trained lm_head whole "
                                         r"\(adapter.reft.modules_to_save\).*would answer with the base's"):
        load_stack(serve_dirs["base"], {"head": tmp_path / "head"}, base_name="base")


def test_stacked_lora_equals_peft_mixed_batches(serve_dirs):
    """The gathered per-row LoRA (serve/lora.py) computes what peft's own mixed-adapter batch computes."""
    from alignkit.serve.stack import PEFT_BASE

    stacked = load_stack(serve_dirs["base"], serve_dirs["adapters"], base_name="base")
    plain = load_stack(serve_dirs["base"], serve_dirs["adapters"], base_name="base", stacked_lora=False)
    assert stacked.lora is not None and plain.lora is None
    ids = torch.randint(3, 200, (5, 7), generator=torch.Generator().manual_seed(0))
    names = [None, "terse", "both", "terse", None]
    with torch.no_grad():
        with stacked.lora.route(names, torch.device("cpu")):
            got = stacked.model(input_ids=ids, use_cache=False).logits
        want = plain.model(input_ids=ids, use_cache=False, adapter_names=[n or PEFT_BASE for n in names]).logits
        with stacked.lora.route(["terse"] * 5, torch.device("cpu")):  # one adapter for all rows: no gather
            one = stacked.model(input_ids=ids, use_cache=False).logits
        want_one = plain.model(input_ids=ids, use_cache=False, adapter_names=["terse"] * 5).logits
        base = plain.model(input_ids=ids, use_cache=False, adapter_names=[PEFT_BASE] * 5).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, want_one, rtol=1e-5, atol=1e-5)
    assert (got[1] - base[1]).abs().max() > 1e-2  # the LoRA rows really differ from the base
    torch.testing.assert_close(got[0], base[0], rtol=0, atol=0)  # rows without LoRA are the base, bitwise


@pytest.mark.parametrize("method, temperature", [("_forward", 0.0), ("_generator", 1.0)])
def test_a_failure_inside_the_engine_fails_its_requests_and_the_engine_keeps_serving(serve_stack, monkeypatch,
                                                                                   method, temperature):
    """A forward that raises fails its batch; a request whose admission raises (a choice's random generator, which
    runs outside a step's error handling) fails alone: before, an exception there killed the engine thread, leaving
    that request and every later one waiting forever. Either way the next request is served."""
    eng = Engine(serve_stack, EngineConfig())
    real = getattr(eng, method)
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(eng, method, flaky)
    params = SamplingParams(max_tokens=3, temperature=temperature, seed=1)
    eng.start()
    try:
        with pytest.raises(RuntimeError, match="internal error: RuntimeError: boom"):
            eng.generate("polite", [5, 6, 7], params, timeout=30)
        ok = eng.generate("polite", [5, 6, 7], params, timeout=30)
        assert len(ok["choices"][0]["token_ids"]) == 3 and eng.running_rows == 0 and eng.alive
        assert eng.stats.errors == 1
    finally:
        eng.stop()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_every_tiny_architecture_batched_equals_alone(arch, tiny_dir):
    """Left-padded batches with explicit position ids and merged caches give each row its alone-greedy tokens."""
    stack = load_stack(tiny_dir(arch), {}, base_name="base")
    eng = Engine(stack, EngineConfig())
    model = load_model(tiny_dir(arch)).eval()
    tok = stack.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    want = [reference_greedy(model, None, p, 6, set()) for p in prompts]
    events = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):  # submitted before the engine starts: one left-padded prefill of 5 rows
        eng.submit("base", p, SamplingParams(max_tokens=6 - i % 2, temperature=0.0), events[i].append)
    late = []
    eng.start()
    try:
        eng.submit("base", prompts[1], SamplingParams(max_tokens=6, temperature=0.0), late.append)  # joins later
        deadline = time.monotonic() + 30
        while not all(e and e[-1].kind == "end" for e in [*events.values(), late]) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.stop()
    for i, evs in events.items():
        assert greedy_matches([e.token_id for e in evs if e.kind == "token"], want[i], 6 - i % 2)[0], (arch, i)
    assert greedy_matches([e.token_id for e in late if e.kind == "token"], want[1], 6)[0]


def test_sliding_window_models_are_refused_by_name(tiny_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "sliding"
    shutil.copytree(tiny_dir("qwen2"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=4, max_window_layers=0,
               layer_types=["sliding_attention"] * cfg["num_hidden_layers"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer.*full-attention caches only"):
        load_stack(folder, {})


def test_an_adapter_trained_on_another_base_is_refused_at_load(serve_dirs, tmp_path):
    """serve loads every adapter onto one base: one trained on a different base with the same shapes (here a
    tiny Llama of another seed) would be served without a word; its alignkit_base.json refuses it by name."""
    from alignkit.models.tiny import save_tiny
    from alignkit.serve.stack import load_stack

    other = save_tiny(tmp_path / "other-base", "llama", hidden_size=64, num_layers=2, seed=7)
    with pytest.raises(ValueError, match=r"terse: this adapter was trained on a different base model"):
        load_stack(other, {"terse": serve_dirs["adapters"]["terse"]})


@pytest.mark.parametrize("kind", ["lora", "reft+lora"])
def test_a_lora_of_a_deeper_base_is_refused_at_load_not_served_in_part(serve_dirs, tmp_path, kind):
    """A LoRA trained on a 3-layer model, without its alignkit_base.json (a peft adapter from elsewhere, or an older
    save), served on the 2-layer base: peft dropped its third layer's tensors without a word and the server answered
    with two thirds of the adapter. Now a ValueError naming the folder and a dropped tensor (checked to fail before
    the fix: load_stack returned)."""
    from alignkit.models.tiny import save_tiny
    from alignkit.serve.stack import load_stack

    from .conftest import make_adapter

    deep = save_tiny(tmp_path / "deep-base", "llama", hidden_size=64, num_layers=3)
    make_adapter(deep, tmp_path / "deep", kind, seed=3)
    (tmp_path / "deep" / "alignkit_base.json").unlink()
    with pytest.raises(ValueError, match=r"deep: this LoRA adapter does not fit the base model .*: 14 saved "
                                         r"tensor\(s\) fit no module of the base \(e\.g\. \S*layers\.2\."):
        load_stack(serve_dirs["base"], {"terse": serve_dirs["adapters"]["terse"], "deep": tmp_path / "deep"})


@pytest.mark.parametrize("kind,part,value", [("lora", "lora_B", float("nan")), ("reft", "interventions", float("inf")),
                                              ("reft+lora", "lora_A", float("-inf"))])
def test_an_adapter_with_non_finite_weights_is_refused_at_load(serve_dirs, tmp_path, kind, part, value):
    """One NaN / inf in a served adapter's weights made every row routed to it answer garbage while the server
    said nothing; `load_adapter` refuses such a folder, and serve now does too, naming the folder and the weight
    (checked after a good adapter was loaded first, so only the bad adapter's own weights can be the ones named)."""
    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter, save_adapter
    from alignkit.interventions import ReftConfig

    model = load_model(serve_dirs["base"])
    reft = ReftSettings(config=ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2).to_dict(),
                        positions="f1+l2") if "reft" in kind else None
    wrapped = apply_adapter(model, AdapterConfig(kind=kind, lora=LoraSettings(r=4) if "lora" in kind else LoraSettings(),
                                                 reft=reft))
    name = next(n for n, p in wrapped.named_parameters() if part in n and p.requires_grad and p.dim() == 2)
    with torch.no_grad():
        dict(wrapped.named_parameters())[name].view(-1)[3] = value
    bad = tmp_path / "diverged"
    save_adapter(wrapped, bad)
    good = "terse" if "lora" in kind else "polite"
    with pytest.raises(ValueError, match=rf"diverged: adapter weight '[^']*{part}[^']*' holds 1 non-finite value\(s\)"):
        load_stack(serve_dirs["base"], {good: serve_dirs["adapters"][good], "bad": bad})


def test_serve_stops_where_generation_does(serve_stack):
    """The engine's ends are training-time generation's: EOS and, for a chat prompt, the chat template's turn end
    (tests/online/test_turn_end.py)."""
    from alignkit.serve.engine import default_end_ids

    tok = serve_stack.tokenizer
    assert default_end_ids(serve_stack) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    assert default_end_ids(serve_stack, chat=False) == [tok.eos_token_id]  # plain text (completions): EOS alone


def test_row_sampling_draws_the_temperature_and_top_p_distribution():
    """`Engine._sample` for sampled rows against a distribution written by hand: logits [2, 1, 0, -1, -9, 3] at
    temperature 0.5 are softmax([4, 2, 0, -2, -18, 6]); top-p 0.95 keeps the smallest prefix of the sorted
    probabilities reaching 0.95 (tokens 5 and 0: 0.865 + 0.117 = 0.982) and renormalises it. 20 000 rows, each with
    its own generator: frequencies within 5 standard errors, nothing outside the kept set; a greedy row is argmax;
    two rows with equally seeded generators draw the same token."""
    from types import SimpleNamespace

    from alignkit.serve.engine import Engine

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -9.0, 3.0])
    p = torch.softmax(logits.double() / 0.5, -1)
    assert p[5] + p[0] >= 0.95 > p[5]  # the hand-derived kept set
    want = torch.zeros(6, dtype=torch.float64)
    want[[5, 0]] = p[[5, 0]] / (p[5] + p[0])
    n = 20_000

    def row(temperature, seed):
        return SimpleNamespace(request=SimpleNamespace(params=SimpleNamespace(temperature=temperature, top_p=0.95)),
                               generator=torch.Generator().manual_seed(seed))

    rows = [row(0.5, i) for i in range(n)] + [row(0.0, 0), row(0.5, 7), row(0.5, 7)]
    got = Engine._sample(None, logits.repeat(len(rows), 1), rows)
    freq = torch.bincount(got[:n], minlength=6).double() / n
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-12).all() and (freq[want == 0] == 0).all()
    assert got[n] == 5 and got[n + 1] == got[n + 2]


def test_a_seed_torch_cannot_take_is_refused_and_the_engine_keeps_serving(stack):
    """A seed outside a 64-bit generator's range (or one whose n choices' seeds seed + i run past it) is a
    RequestError at submit. Before: accepted, then torch.Generator.manual_seed raised in the engine thread's
    admission (outside its per-step error handling): the thread died, the request never ended and every later
    request waited forever."""
    eng = Engine(stack, EngineConfig(max_batch_rows=4, max_new_tokens=4)).start()
    try:
        for seed, n in ((2 ** 70, 1), (-(2 ** 63) - 1, 1), (2 ** 63 - 1, 2)):
            with pytest.raises(RequestError, match="seed"):
                eng.submit("base", [5, 6], SamplingParams(seed=seed, n=n, temperature=1.0, max_tokens=2),
                           lambda ev: None)
        assert eng.alive
        res = eng.generate("base", [5, 6], SamplingParams(seed=2 ** 63 - 2, n=2, temperature=1.0, max_tokens=2),
                           timeout=30)
        assert all(len(c["token_ids"]) == 2 for c in res["choices"])
        res = eng.generate("base", [5, 6], SamplingParams(seed=-(2 ** 63), temperature=1.0, max_tokens=2),
                           timeout=30)
        assert len(res["choices"][0]["token_ids"]) == 2
    finally:
        eng.stop()


def run_together(eng, jobs, timeout=60):
    """Submit every job {key: (prompt ids, SamplingParams)} (key[0] or key: the model) to the engine before it starts,
    so they share one prefill; run until each has ended, stop the engine. Returns {key: [events]}."""
    events = {k: [] for k in jobs}
    for k, (prompt, params) in jobs.items():
        eng.submit(k[0] if isinstance(k, tuple) else k, prompt, params, events[k].append)
    eng.start()
    try:
        deadline = time.monotonic() + timeout
        while not all(e and e[-1].kind == "end" for e in events.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.stop()
    return events


def test_non_finite_logits_end_their_own_request_and_the_batch_is_served(stack, monkeypatch):
    """Rows routed to 'polite' (greedy) and 'both' (sampled, n=2) get NaN logits from their first decode step on, in
    one batch with a greedy 'base' row and a seeded sampled 'terse' row. Before: the greedy NaN row answered argmax
    over NaN (token 0, garbage, finish "length") and the sampled one raised in the draw, failing the whole batch
    (the healthy requests too) with "internal error". Now the two poisoned requests end with an error naming their
    model after their one good token, and the healthy requests get the tokens they get alone."""
    prompt = stack.tokenizer("The quick brown fox")["input_ids"]
    jobs = {"base": SamplingParams(max_tokens=6, temperature=0.0),
            "terse": SamplingParams(max_tokens=6, temperature=1.0, seed=5),
            "polite": SamplingParams(max_tokens=6, temperature=0.0),
            "both": SamplingParams(max_tokens=6, temperature=1.0, seed=9, n=2)}
    clean = Engine(stack, EngineConfig(max_new_tokens=8)).start()
    try:
        alone = {m: clean.generate(m, prompt, SamplingParams(**vars(p)), timeout=30)["choices"]
                 for m, p in jobs.items() if m in ("base", "terse")}
    finally:
        clean.stop()
    eng = Engine(stack, EngineConfig(max_new_tokens=8))  # not started: the four requests share one prefill
    real = eng._forward

    def nan_for_polite_and_both(input_ids, mask, position_ids, cache, routes, locations):
        logits, cache = real(input_ids, mask, position_ids, cache, routes, locations)
        if input_ids.shape[1] == 1:  # decode steps: the prefill's first token is still good
            for b, r in enumerate(routes):
                if r.name in ("polite", "both"):
                    logits[b] = float("nan")
        return logits, cache

    monkeypatch.setattr(eng, "_forward", nan_for_polite_and_both)
    events = run_together(eng, {m: (prompt, p) for m, p in jobs.items()})
    for m in ("polite", "both"):
        kinds = [e.kind for e in events[m]]
        assert kinds[-2:] == ["error", "end"] and "done" not in kinds, (m, kinds)
        assert f"model '{m}'" in events[m][-2].message and "NaN or inf" in events[m][-2].message
        assert "completion token 2" in events[m][-2].message
        assert len([e for e in events[m] if e.kind == "token"]) == jobs[m].n  # one good token per choice
    for m in ("base", "terse"):
        got = [e.token_id for e in events[m] if e.kind == "token"]
        assert got == alone[m][0]["token_ids"] and len(got) == 6, m
        assert [e.kind for e in events[m]][-2:] == ["done", "end"]
    assert eng.stats.errors == 2 and eng.alive is False


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_a_tiny_temperature_samples_the_greedy_token_and_fails_nothing(engine, stack, serve_dirs, temperature):
    """logits / 1e-40 overflows float32 to inf and softmax(inf - inf) is NaN: before, a request with temperature
    1e-40 (valid: the API takes [0, 2]) raised inside the draw and failed its whole batch ("internal error:
    NonFiniteLogitsError"). As the temperature goes to 0 the distribution goes to a one-hot on the largest logit,
    so such a request must draw the greedy tokens (of the independent reference: the adapter loaded alone, greedy
    without cache)."""
    prompt = stack.tokenizer("Hello")["input_ids"]
    ref = reference_greedy(*reference_model(serve_dirs, "terse"), prompt, 8, engine.end_ids)
    cold = engine.generate("terse", prompt, SamplingParams(max_tokens=8, temperature=temperature, seed=3), timeout=30)
    assert greedy_matches(cold["choices"][0]["token_ids"], ref, 8)[0]
    assert engine.alive


def test_reft_adapters_of_different_positions_and_layers_in_one_batch_equal_alone(serve_dirs, tmp_path):
    """The shared adapters all edit 'f1+l2' on layers 0 and 1; here each ReFT adapter has its own position spec, layers
    and weight sharing (last 3 on layer 1, first 2 on layer 0, 'f1+l2' split between two interventions, 'f3+l3'), so
    one batch's intervention_locations mix slot widths and adapter slices. Every request, all submitted together
    (one prefill), equals the independent reference of its adapter alone (greedy, no cache, no padding)."""
    from .conftest import make_adapter

    specs = {"l3": ("l3", (1,), True), "f2": ("f2", (0,), True), "split": ("f1+l2", (0, 1), False),
             "f3l3": ("f3+l3", (0, 1), True)}
    folders = {}
    for seed, (name, (positions, layers, share)) in enumerate(specs.items()):
        folders[name] = tmp_path / name
        make_adapter(serve_dirs["base"], folders[name], "reft", 20 + seed, positions, layers, share)
    stack = load_stack(serve_dirs["base"], folders, base_name="base")
    dirs = {"base": serve_dirs["base"], "adapters": folders}
    eng = Engine(stack, EngineConfig())
    tok = stack.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[1:4]]
    ref = {}
    for name in ["base", *specs]:
        model, cfg = reference_model(dirs, name)
        for i, p in enumerate(prompts):
            ref[(name, i)] = reference_greedy(model, cfg, p, 6, eng.end_ids)
    assert len({tuple(t for t, _, _ in ref[(m, 1)]) for m in ["base", *specs]}) >= 4  # the adapters do differ
    events = run_together(eng, {k: (prompts[k[1]], SamplingParams(max_tokens=6, temperature=0.0)) for k in ref})
    for k, evs in events.items():
        got = [e.token_id for e in evs if e.kind == "token"]
        assert greedy_matches(got, ref[k], 6)[0], (k, got, ref[k])


def test_sampling_defaults_of_the_generation_config_the_engine_does_not_apply_are_a_warning(tmp_path, stack, caplog):
    """vLLM's server samples a request that leaves temperature / top_p / top_k / ... out with the values of the model's
    generation_config.json (its --generation-config auto); alignkit's engine samples it at temperature 1.0, top_p 1.0
    (OpenAI's defaults), without a word: one request, two distributions on the two engines. A base whose generation
    config sets them away from neutral (temperature 0.7, top_k 50; top_p 1.0 is neutral) is now a warning naming
    them when the engine is built; the tiny base (none set) is quiet."""
    import json
    import logging

    from alignkit.models.tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llama", hidden_size=64, num_layers=2)
    path = base / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**gen, "temperature": 0.7, "top_k": 50, "top_p": 1.0, "do_sample": True}))
    with caplog.at_level(logging.WARNING, logger="alignkit.serve.engine"):
        Engine(load_stack(base, {}, base_name="b"))
        Engine(stack)
    said = [r.getMessage() for r in caplog.records if "generation config" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("serve: the base's generation config sets the sampling defaults "
                                                 "temperature=0.7, top_k=50, which alignkit's engine does not apply"), said


def test_generation_config_options_neither_engine_applies_are_a_warning(tmp_path, caplog):
    """generation_config.json options beyond the sampling defaults (no_repeat_ngram_size, suppress_tokens, ...):
    model.generate (`alignkit generate`) applies them, while alignkit's engine and vLLM's server (which reads the
    sampling defaults alone) serve without them, without a word. Now a warning naming the file and the options when
    the engine is built; a field that only says how generate runs (cache_implementation) is not named."""
    import json
    import logging

    from alignkit.models.tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llama", hidden_size=64, num_layers=2)
    path = base / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**gen, "no_repeat_ngram_size": 3, "suppress_tokens": [7],
                                "cache_implementation": "dynamic"}))
    with caplog.at_level(logging.WARNING, logger="alignkit.serve.engine"):
        Engine(load_stack(base, {}, base_name="b"))
    said = [r.getMessage() for r in caplog.records if "generation_config.json" in r.getMessage()]
    assert said == [f"serve: {base}/generation_config.json sets no_repeat_ngram_size=3, suppress_tokens=[7], which "
                    "neither alignkit's engine nor vLLM's server (it reads the sampling defaults alone) applies: "
                    f"responses are generated without it; remove it from {base}/generation_config.json to say so "
                    "(`alignkit generate` applies it)"], said
