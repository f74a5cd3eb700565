"""`llm.concurrency`: up to N requests in flight at once (the fake server counts them), the records of a sequential
run (input order, not completion order), one rate limit across threads, one request per cache key, a failed
request stopping the job with the cache and the previous run's files intact, and values that cannot apply refused
before anything is written."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from alignkit.augment.llm import Cached, LocalChat, OpenAIChat
from alignkit.augment.pipeline import Filters, augment
from alignkit.augment.strategies import (Context, EntitiesOptions, InstructionsOptions, ParaphraseOptions, Source,
                                         SummarizeOptions)
from alignkit.cli import main
from tests.augment.fake_openai import serving
from tests.augment.test_augment_cli import fake_answer, rows, run_llm, summary

SEEDS = "bundled:data/seed_tasks.jsonl"  # 8 prompt / completion rows
WORDS = ["river", "violin", "prime", "glacier", "tax", "poem", "engine", "soup", "orbit", "chess", "lichen", "bridge",
         "vote", "comet", "yeast", "atlas"]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def varied(messages):
    """Answers that differ per prompt, each after a delay of its own (0-20 ms): requests sent together finish
    out of order, so records written in completion order would differ from the sequential run's."""
    text = messages[-1]["content"]
    h = digest(text)
    time.sleep(int(h[:2], 16) / 255 * 0.02)
    if text.startswith("Rewrite the following request"):
        return f"Rewritten {h[:6]}: " + text.split("\n\n", 1)[1]
    if text.startswith("Here are some example tasks"):  # three words of 16: mostly new tasks, now and then a near one
        return f"1. Write about the {WORDS[int(h[0], 16)]} and the {WORDS[int(h[1], 16)]} or {WORDS[int(h[2], 16)]}."
    if text.startswith("Summarize"):
        return f"S{len(text)}-{h[:4]}."
    if text.startswith("Here are summaries"):
        return f"ALL-{h[:4]}." + " x" * (len(text) // 40)  # long enough to need another level now and then
    if text.startswith("List the named"):
        return json.dumps([{"text": w, "type": "OTHER"} for w in WORDS if w in text.split("Text: ", 1)[1]])
    return f"Answer {h[:6]}."


def sources_for(strategy: str) -> tuple[list[Source], object]:
    if strategy == "paraphrase":
        return ([Source(f"d.jsonl:{i + 1}", {"prompt": f"Tell me about the {w}.", "completion": f"The {w} ..."})
                 for i, w in enumerate(WORDS[:8])], ParaphraseOptions(n=3))
    if strategy == "instructions":
        return ([Source(f"d.jsonl:{i + 1}", {"prompt": f"Describe a {w} in one sentence."})
                 for i, w in enumerate(WORDS[:8])], InstructionsOptions(num=6, seeds_per_prompt=2))
    if strategy == "summarize":
        docs = ["\n\n".join(f"Part {p} of document {d} is about the {WORDS[(d + p) % 16]}. " + "word " * 20
                            for p in range(d + 1)) for d in range(6)]
        return ([Source(f"docs.jsonl:{i + 1}", {"text": t}) for i, t in enumerate(docs)] +
                [Source("docs.jsonl:7", {"text": "  "})], SummarizeOptions(chunk_chars=250))
    return ([Source(f"t.jsonl:{i + 1}", {"text": f"The {WORDS[i]} met the {WORDS[i + 3]} near the {WORDS[i + 5]}."})
             for i in range(8)], EntitiesOptions())


@pytest.mark.parametrize("strategy", ["paraphrase", "instructions", "summarize", "entities"])
def test_each_llm_strategy_runs_requests_at_once_and_writes_the_sequential_records(tmp_path, strategy):
    sources, options = sources_for(strategy)
    runs = {}
    for n in (1, 4):
        with serving(varied) as (fake, url):
            if n > 1:
                fake.hold(n)  # the first n requests wait until all n are in flight (or 30 s pass)
            result = augment(sources, strategy, options, OpenAIChat(url, "fake"), Filters(), tmp_path / f"{n}.jsonl",
                             max_tokens=32, temperature=0.7, seed=3, concurrency=n)
        runs[n] = (result, sorted(json.dumps(r, sort_keys=True) for r in fake.requests), fake.max_in_flight)
    (seq, seq_requests, seq_flight), (par, par_requests, par_flight) = runs[1], runs[4]
    assert (seq_flight, par_flight) == (1, 4)  # never more than 4 either
    assert (tmp_path / "4.jsonl").read_bytes() == (tmp_path / "1.jsonl").read_bytes()
    assert (par.written, par.candidates, par.dropped) == (seq.written, seq.candidates, seq.dropped)
    assert par_requests == seq_requests  # the same requests, none more (instructions asks no speculative task)
    assert seq.written >= 3


def test_cli_concurrency_overlaps_requests_and_a_rerun_is_answered_from_the_cache(tmp_path):
    with serving(fake_answer) as (fake, url):
        assert run_llm(tmp_path / "seq", url, "paraphrase", SEEDS, "options.n=2") == 0
        assert fake.max_in_flight == 1
    with serving(fake_answer) as (fake, url):
        fake.hold(4)
        assert run_llm(tmp_path / "par", url, "paraphrase", SEEDS, "options.n=2", "llm.concurrency=4") == 0
        assert fake.max_in_flight == 4 and len(fake.requests) == 16
        assert summary(tmp_path / "par") == summary(tmp_path / "seq")
        assert run_llm(tmp_path / "par", url, "paraphrase", SEEDS, "options.n=2", "llm.concurrency=4") == 0
        assert len(fake.requests) == 16 and summary(tmp_path / "par")["cache_hits"] == 16
    assert rows(tmp_path / "par") == rows(tmp_path / "seq")


def test_the_rate_limit_is_one_limit_for_all_threads(tmp_path):
    """With a frozen clock every call's wait is its slot's distance from now: 4 threads sharing one limit reserve
    slots 0.5 s apart (0, 0.5, ..., 3.5); a limit per thread would give each thread its own 0, 0.5, ..."""
    slept: list[float] = []
    sources, options = sources_for("entities")
    with serving(varied) as (fake, url):
        fake.hold(4)
        llm = OpenAIChat(url, "fake", requests_per_minute=120, clock=lambda: 100.0, sleep=slept.append)
        result = augment(sources, "entities", options, llm, Filters(), tmp_path / "out.jsonl", concurrency=4)
    assert fake.max_in_flight == 4 and len(fake.requests) == 8 and result.written == 8
    assert sorted(slept) == [0.5 * i for i in range(1, 8)]


def test_one_request_per_cache_key_however_many_threads_ask_it(tmp_path):
    def slow_echo(messages):
        time.sleep(0.05)
        return "echo: " + messages[-1]["content"]

    with serving(slow_echo) as (fake, url):
        llm = Cached(OpenAIChat(url, "m"), tmp_path / "cache")
        ctx = Context(llm, concurrency=4)
        assert list(ctx.map(lambda _: ctx.ask("same"), range(8))) == ["echo: same"] * 8
    assert len(fake.requests) == 1 and (llm.hits, llm.misses) == (7, 1)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_request_failing_after_its_retries_stops_the_job_and_keeps_the_cache(tmp_path, capsys):
    out = tmp_path / "out"
    with serving(fake_answer) as (fake, url):
        assert run_llm(out, url, "paraphrase", SEEDS, "llm.max_tokens=32") == 0  # a previous run's files
        before = {name: (out / name).read_bytes() for name in ("augmented.jsonl", "summary.json", "config.yaml")}
        cached = set((out / "cache").rglob("*.json"))
        fifth = rows(out)[4]["meta"]["original"]  # row 5 (none of rows 1-5 is dropped)
        fake.fail_when = lambda messages: fifth in messages[-1]["content"]
        capsys.readouterr()
        args = ["paraphrase", SEEDS, "options.n=2", "llm.concurrency=4", "llm.retries=1", "llm.backoff=0",
                "--overwrite"]  # (another config than the previous run's: replacing it is asked for)
        assert run_llm(out, url, *args) == 2  # the endpoint failed, not alignkit: an error with its fix, exit 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"alignkit augment: error: {url}/chat/completions: gave up after 2 attempts; last error: "
                       "HTTP 503: fake error 503. Check that the server (llm.base_url) is up and serves 'fake' "
                       "(llm.model), or allow more tries (llm.retries, llm.backoff); answers already received are "
                       "cached and a rerun reuses them"]
        assert {name: (out / name).read_bytes() for name in before} == before  # the previous run's, as written
        new = set((out / "cache").rglob("*.json")) - cached
        assert not list((out / "cache").rglob("*.tmp"))
        for path in new:  # every answer that came back is a whole entry; rows 1-4 (both rewrites) at least
            entry = json.loads(path.read_text())
            assert fifth not in entry["messages"][-1]["content"] and entry["content"] == fake_answer(entry["messages"])
        assert 8 <= len(new) < 16
        fake.fail_when = None
        sent = len(fake.requests)
        assert run_llm(out, url, *args) == 0
        assert len(fake.requests) - sent == 16 - len(new)  # only what the failed run did not get
        assert run_llm(tmp_path / "seq", url, "paraphrase", SEEDS, "options.n=2") == 0
    assert rows(out) == rows(tmp_path / "seq")


@pytest.mark.parametrize("llm, message", [
    ("{kind: openai, base_url: 'http://127.0.0.1:9/v1', model: m, concurrency: 0}",
     "llm.concurrency: 0; the requests in flight at once, an integer >= 1 (1: one at a time)"),
    ("{kind: local, path: 'tiny:llama', concurrency: 4}",
     "llm.concurrency: 4; a local model answers one request at a time (concurrency is for kind 'openai': alignkit "
     "serve, vLLM, a hosted API); set llm.concurrency: 1 or remove it"),
])
def test_a_concurrency_that_cannot_apply_is_one_line_before_anything_is_written(tmp_path, capsys, llm, message):
    assert main(["augment", "strategy=paraphrase", f"data.path={SEEDS}", f"output_dir={tmp_path / 'o'}",
                 f"llm={llm}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignkit augment: error: ") and err[0].endswith(message)
    assert not (tmp_path / "o").exists()


class Module:
    def eval(self):
        return self


def test_the_library_refuses_concurrency_a_client_cannot_take(tmp_path):
    sources, options = sources_for("paraphrase")
    local = Cached(LocalChat(Module(), None, "tiny"), tmp_path / "cache")  # never asked
    with pytest.raises(ValueError, match=r"^concurrency: 2; tiny answers at most 1 request\(s\) at a time; set "
                                         r"concurrency 1$"):
        augment(sources, "paraphrase", options, local, Filters(), tmp_path / "out.jsonl", concurrency=2)
    with pytest.raises(ValueError, match=r"^concurrency: 0; it must be an integer >= 1"):
        augment(sources, "paraphrase", options, local, Filters(), tmp_path / "out.jsonl", concurrency=0)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "cache").exists()
