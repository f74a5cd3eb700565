"""The LLM clients: retries with backoff, non-retryable errors named, rate limit spacing, the on-disk cache."""

from __future__ import annotations

import hashlib
import json

import pytest

from alignkit.augment.llm import (CONTENT_FILTERED, CUT_AT_MAX_TOKENS, AnswerCutOff, Cached, LLMError, OpenAIChat,
                                 RateLimiter)
from tests.augment.fake_openai import serving

MSG = [{"role": "user", "content": "hi"}]


def echo(messages):
    return "echo: " + messages[-1]["content"]


def test_retries_429_and_500_then_answers():
    slept = []
    with serving(echo) as (fake, url):
        fake.fail = [429, 500]
        llm = OpenAIChat(url, "m", retries=3, backoff=0.5, sleep=slept.append)
        assert llm.chat(MSG, max_tokens=8, temperature=0.0, seed=1) == "echo: hi"
    assert llm.requests == 3 and len(fake.requests) == 3
    assert slept == [0.5, 1.0]  # 0.5 * 2**attempt (Retry-After: 0 is shorter)
    assert fake.requests[-1] == {"model": "m", "messages": MSG, "max_tokens": 8, "temperature": 0.0, "seed": 1}


def test_gives_up_after_retries_and_does_not_retry_a_client_error():
    with serving(echo) as (fake, url):
        fake.fail = [503, 503, 503]
        llm = OpenAIChat(url, "m", retries=2, sleep=lambda s: None)
        with pytest.raises(LLMError, match=r"gave up after 3 attempts; last error: HTTP 503: fake error 503"):
            llm.chat(MSG, max_tokens=8, temperature=0.0)
        fake.fail = [400]
        with pytest.raises(LLMError, match=r"/v1/chat/completions: HTTP 400: fake error 400"):
            llm.chat(MSG, max_tokens=8, temperature=0.0)
        assert len(fake.requests) == 4


def test_connection_refused_is_retried_then_named():
    llm = OpenAIChat("http://127.0.0.1:9/v1", "m", retries=1, sleep=lambda s: None, timeout=2)
    with pytest.raises(LLMError, match="gave up after 2 attempts; last error: URLError"):
        llm.chat(MSG, max_tokens=8, temperature=0.0)


def test_rate_limiter_spaces_calls_evenly():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one call every 0.5 s
    for _ in range(3):
        limiter.wait()
    assert slept == [0.5, 0.5]
    now[0] += 2.0  # idle long enough: no wait
    limiter.wait()
    assert slept == [0.5, 0.5]


def test_cache_answers_a_repeated_request_without_asking(tmp_path):
    with serving(echo) as (fake, url):
        llm = Cached(OpenAIChat(url, "m"), tmp_path / "cache")
        a = llm.chat(MSG, max_tokens=8, temperature=0.7, seed=0)
        b = llm.chat(MSG, max_tokens=8, temperature=0.7, seed=0)
        c = llm.chat(MSG, max_tokens=8, temperature=0.7, seed=1)  # another seed is another request
        again = Cached(OpenAIChat(url, "m"), tmp_path / "cache").chat(MSG, max_tokens=8, temperature=0.7, seed=0)
    assert a == b == c == again == "echo: hi"
    assert len(fake.requests) == 2 and (llm.hits, llm.misses) == (1, 2)
    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
    assert json.loads(files[0].read_text())["model"] == "m"


def test_cache_keeps_two_endpoints_serving_one_model_name_apart(tmp_path):
    """The key was the model name: a second server answering under the same name (another model behind
    llm.model: base, a vLLM and an alignkit serve) got the first one's cached answers, never asked. Now the
    endpoint is part of the key: each is asked once, and each rerun is a hit on its own answer."""
    cache = tmp_path / "cache"
    with serving(echo) as (one, url_one), serving(lambda m: "other: " + m[-1]["content"]) as (two, url_two):
        a = Cached(OpenAIChat(url_one, "base"), cache).chat(MSG, max_tokens=8, temperature=0.0, seed=0)
        b = Cached(OpenAIChat(url_two, "base"), cache).chat(MSG, max_tokens=8, temperature=0.0, seed=0)
        again = Cached(OpenAIChat(url_two + "/", "base"), cache)  # the same endpoint written with a slash
        c = again.chat(MSG, max_tokens=8, temperature=0.0, seed=0)
    assert (a, b, c) == ("echo: hi", "other: hi", "other: hi")
    assert (len(one.requests), len(two.requests), again.hits) == (1, 1, 1)
    entries = sorted(json.loads(f.read_text())["endpoint"] for f in cache.rglob("*.json"))
    assert entries == sorted([url_one + "/chat/completions", url_two + "/chat/completions"])


def test_cache_keeps_a_local_models_dtypes_apart(tmp_path, tiny_dir):
    """llm.kind local: the key was the model path alone, so a rerun with llm.dtype: bfloat16 read back the float32
    run's answers (the setting did nothing for anything cached). The dtype is now in the key (float32 keys as before:
    earlier caches still hit)."""
    from alignkit.augment.llm import LocalChat

    path, cache = str(tiny_dir("llama")), tmp_path / "cache"
    runs = [Cached(LocalChat.from_path(path, dtype=d), cache) for d in ("float32", "bfloat16", "float32")]
    for llm in runs:  # the random model's 3 tokens never end its answer: cut off, cached as such
        with pytest.raises(AnswerCutOff):
            llm.chat(MSG, max_tokens=3, temperature=0.0)
    assert [(llm.hits, llm.misses) for llm in runs] == [(0, 1), (0, 1), (1, 0)]
    assert runs[0].inner.legacy_identity == {"model": path}  # the key an earlier alignkit wrote: `_older_key`
    assert runs[1].inner.legacy_identity == {"model": path, "dtype": "bfloat16"}


def ask_cut(llm, messages=MSG, max_tokens=3, temperature=0.0, seed=None):
    """The random tiny model never ends its answer in 3 tokens: cut off, and cached as such (a hit or a miss)."""
    with pytest.raises(AnswerCutOff):
        llm.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return (llm.hits, llm.misses)


def local_variants(tiny_lm, tokenizer):
    """(what changes, a LocalChat under the name "tiny" differing from the base one by it)."""
    import copy

    import torch

    from alignkit.augment.llm import LocalChat

    retrained = tiny_lm("llama")
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)  # the same folder name, other weights
    ngram = tiny_lm("llama")
    ngram.generation_config.no_repeat_ngram_size = 2  # applied by model.generate to every answer
    template = copy.deepcopy(tokenizer)
    template.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    return [("weights", LocalChat(retrained, tokenizer, "tiny")),
            ("generation_config", LocalChat(ngram, tokenizer, "tiny")),
            ("chat_template", LocalChat(tiny_lm("llama"), template, "tiny"))]


def test_the_local_cache_key_holds_what_shapes_the_answer(tmp_path, tiny_lm, tokenizer):
    """llm.kind local keyed answers on the folder name (and dtype) alone: a model retrained into the same folder, a
    generation_config.json option model.generate applies (no_repeat_ngram_size) or another chat template read back
    the old answers. Now the key holds `online.digests.model_digest`; each of those misses, and so does each request setting
    (temperature, max_tokens, seed, the system prompt in the messages); the same model and request hit."""
    from alignkit.augment.llm import LocalChat

    cache = tmp_path / "cache"
    base = Cached(LocalChat(tiny_lm("llama"), tokenizer, "tiny"), cache)
    assert ask_cut(base) == (0, 1)
    assert ask_cut(Cached(LocalChat(tiny_lm("llama"), tokenizer, "tiny"), cache)) == (1, 0)  # same: a hit
    for what, chat in local_variants(tiny_lm, tokenizer):
        llm = Cached(chat, cache)
        assert ask_cut(llm) == (0, 1), what
        assert ask_cut(Cached(chat, cache)) == (1, 0), what  # then cached under its own key
    system = [{"role": "system", "content": "Be terse."}, *MSG]
    for what, request in (("temperature", {"temperature": 0.5, "seed": 0}), ("max_tokens", {"max_tokens": 2}),
                          ("seed", {"seed": 1}), ("system prompt", {"messages": system})):
        assert ask_cut(Cached(LocalChat(tiny_lm("llama"), tokenizer, "tiny"), cache), **request) == (0, 1), what
    assert ask_cut(base) == (1, 1)  # still a hit after them all


def test_a_local_entry_from_before_the_digest_is_asked_again_with_one_warning(tmp_path, tiny_lm, tokenizer, caplog):
    """An entry under the older key (name and dtype only: it may be another model's answer) is not read back: it is
    asked again, with one warning naming the folder and the entry; the new entry then hits."""
    from alignkit.augment.llm import LocalChat

    cache = tmp_path / "cache"
    old = hashlib.sha256(json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 3, "temperature": 0.0,
                                     "seed": None}, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    (cache / old[:2]).mkdir(parents=True)
    (cache / old[:2] / f"{old}.json").write_text(json.dumps({"model": "tiny", "messages": MSG,
                                                             "content": "another model's answer", "finished": True}))
    llm = Cached(LocalChat(tiny_lm("llama"), tokenizer, "tiny"), cache)
    with caplog.at_level("WARNING", logger="alignkit.augment.llm"):
        assert ask_cut(llm) == (0, 1)  # not "another model's answer": asked, and cut off
        assert ask_cut(llm, seed=None) == (1, 1)
    warned = [r.getMessage() for r in caplog.records if "asked again" in r.getMessage()]
    assert len(warned) == 1 and f"{old}.json" in warned[0] and "tiny" in warned[0]


def test_an_unfinished_answer_is_not_returned_as_whole_and_the_cache_keeps_why(tmp_path):
    """finish_reason "length" (cut at max_tokens) or "content_filter": the answer was used as if complete (a
    truncated training target). It raises AnswerCutOff now; a missing finish_reason (some servers send none) is
    taken as finished; the cache keeps the reason, so a rerun drops it again without asking."""
    finish = {"cut": "length", "filtered": "content_filter", "none": None, "done": "stop"}
    with serving(lambda m: ("half an ans", finish[m[-1]["content"]])) as (fake, url):
        llm = Cached(OpenAIChat(url, "m"), tmp_path / "cache")

        def ask(what):
            return llm.chat([{"role": "user", "content": what}], max_tokens=3, temperature=0.0)

        for what, reason in (("cut", CUT_AT_MAX_TOKENS), ("filtered", CONTENT_FILTERED)):
            for _ in range(2):  # asked, then read from the cache: the same refusal
                with pytest.raises(AnswerCutOff) as e:
                    ask(what)
                assert (e.value.reason, e.value.content) == (reason, "half an ans")
        assert ask("none") == ask("done") == "half an ans"
        assert len(fake.requests) == 4 and (llm.hits, llm.misses) == (2, 4)
    assert (CUT_AT_MAX_TOKENS, CONTENT_FILTERED) == ("answer cut off at max_tokens",
                                                     "answer stopped by the endpoint's content filter")


def test_a_local_model_stopped_by_max_tokens_is_cut_off(tiny_dir):
    """LocalChat: max_tokens tokens made without the end token is an unfinished answer; ended by it, a whole one."""
    import torch

    from alignkit.augment.llm import LocalChat

    llm = LocalChat.from_path(str(tiny_dir("llama")))
    eos = llm.tokenizer.eos_token_id
    msgs = [{"role": "user", "content": "Hello there"}]
    with pytest.raises(AnswerCutOff, match="answer cut off at max_tokens"):  # the tiny random model's 3 greedy
        llm.chat(msgs, max_tokens=3, temperature=0.0)                         # tokens are not its end token
    bias = torch.full((llm.model.config.vocab_size,), -1e9)
    bias[eos] = 0.0
    llm.model.get_output_embeddings().bias = torch.nn.Parameter(bias)  # the model can only say the end token
    assert llm.chat(msgs, max_tokens=3, temperature=0.0) == ""


def test_a_cache_entry_written_before_finish_reasons_were_recorded_is_asked_again(tmp_path, caplog):
    """Cache entries written before finish reasons were recorded carry no `cut_off`: one holding an answer cut at
    max_tokens counted as finished, and its text was kept as a record. Such an entry (neither `finished` nor
    `cut_off`) is asked again now, with one warning, and rewritten; the answer cut at max_tokens is dropped."""
    import logging

    with serving(lambda m: ("half an ans", "length")) as (fake, url):
        llm = Cached(OpenAIChat(url, "m"), tmp_path / "cache")
        key = llm.key(MSG, 8, 0.0, 0)
        entry = tmp_path / "cache" / key[:2] / f"{key}.json"
        entry.parent.mkdir(parents=True)
        entry.write_text(json.dumps({"model": "m", "messages": MSG, "content": "half an ans"}))  # the old form
        with caplog.at_level(logging.WARNING, logger="alignkit.augment.llm"):
            with pytest.raises(AnswerCutOff, match="cut off at max_tokens"):
                llm.chat(MSG, max_tokens=8, temperature=0.0, seed=0)
        assert len(fake.requests) == 1 and (llm.hits, llm.misses) == (0, 1)
        assert json.loads(entry.read_text())["cut_off"] == CUT_AT_MAX_TOKENS
        assert [r.message for r in caplog.records if "asked again" in r.message]


def test_the_answerer_digest_leaves_out_how_generation_runs(tiny_lm, tokenizer):
    """model_digest (then augment.llm.answerer_digest) hashed cache_implementation / compile_config options too,
    which change how model.generate runs, not its answers: setting one refused a kept round and missed the cache. They are left out now (as
    check_on_policy_options leaves them out); an option that changes answers (no_repeat_ngram_size) still counts."""
    from alignkit.online.digests import model_digest

    base = model_digest(tiny_lm("llama"), tokenizer)
    how = tiny_lm("llama")
    how.generation_config.cache_implementation = "static"
    how.generation_config.disable_compile = True
    assert model_digest(how, tokenizer) == base
    ngram = tiny_lm("llama")
    ngram.generation_config.no_repeat_ngram_size = 2
    assert model_digest(ngram, tokenizer) != base


def test_a_local_model_without_a_chat_template_is_not_prompted_after_an_appended_eos(tiny_lm, tokenizer):
    """LocalChat without a chat template encodes the messages' text with special tokens: a tokenizer that appends its
    EOS to every text (GPT-NeoX / Pythia, Llama saved with add_eos_token) ended the prompt with EOS, and the answer
    was generated after an end of text. Now the prompt's ids are the text's, without it (`chat.prompt_ids`, as
    training's prompts). Fails without the fix: yes (the prompt ended in EOS)."""
    import copy

    import torch

    from alignkit.augment.llm import LocalChat

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    tok.add_eos_token = True
    text = "Hello there\nGeneral\n"
    assert tok(text)["input_ids"][-1] == tok.eos_token_id  # the tokenizer appends EOS itself
    model, seen = tiny_lm("llama"), []

    def generate(input_ids, **kwargs):
        seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([[tok.eos_token_id]])], dim=1)

    model.generate = generate
    LocalChat(model, tok, "tiny").chat([{"role": "user", "content": "Hello there"}, {"role": "user", "content":
                                        "General"}], max_tokens=4, temperature=0.0)
    assert seen == [tok(text, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("appends", [True, False], ids=["appends-eos", "appends-nothing"])
def test_a_local_answer_cached_after_an_appended_eos_is_asked_again(tmp_path, tiny_lm, tokenizer, appends):
    """LocalChat's prompts no longer end in the EOS a template-less tokenizer appends, but the cache key (name, dtype,
    model_digest, request) did not change: answers generated after an end of text stayed hits. Such a tokenizer's
    key now holds a marker (asked again); any other tokenizer's key is the one written before (a hit). The old key
    is built here from its recipe. Fails without the fix: yes (appends-eos: a hit)."""
    import copy

    from alignkit.augment.llm import LocalChat
    from alignkit.online.digests import model_digest

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    tok.add_eos_token = appends
    assert (tok("hi")["input_ids"][-1] == tok.eos_token_id) == appends
    model, cache = tiny_lm("llama"), tmp_path / "cache"
    old = hashlib.sha256(json.dumps({"model": "tiny", "answerer": model_digest(model, tok), "messages": MSG,
                                     "max_tokens": 3, "temperature": 0.0, "seed": None},
                                    sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    (cache / old[:2]).mkdir(parents=True)
    (cache / old[:2] / f"{old}.json").write_text(json.dumps({"model": "tiny", "messages": MSG,
                                                             "content": "after an end of text", "finished": True}))
    llm = Cached(LocalChat(model, tok, "tiny"), cache)
    if appends:
        assert ask_cut(llm) == (0, 1)
    else:
        assert llm.chat(MSG, max_tokens=3, temperature=0.0) == "after an end of text" and llm.hits == 1
