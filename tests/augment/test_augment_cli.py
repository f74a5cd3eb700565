"""`alignkit augment` end to end: code_bugs on the bundled snippets; the four LLM strategies against a fake
OpenAI-compatible server (answers chosen per prompt, so every count is known by hand); a local tiny model in
process; and `alignkit serve` on loopback. Reruns are answered from the cache."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data import load_records
from alignkit.settings import ConfigError, load_config
from tests.augment.fake_openai import serving

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "augmented.jsonl").read_text().splitlines()]


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_code_bugs_config_writes_sft_records_alignkit_reads(tmp_path):
    assert main(["-q", "augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"output_dir={tmp_path}"]) == 0
    out = rows(tmp_path)
    # 5 functions in the bundled file, each with more than 4 mutation sites: 4 sampled per function
    assert len(out) == 20 and summary(tmp_path)["written"] == 20 and summary(tmp_path)["requests"] == 0
    first = out[0]
    assert first["meta"]["strategy"] == "code_bugs" and first["meta"]["model"] is None
    assert re.fullmatch(r".*code_snippets\.py:\d+", first["meta"]["source"])
    assert first["meta"]["mutation"] in ("flip_comparison", "off_by_one", "wrong_variable", "removed_return")
    # the answer is the original function, the prompt holds it with exactly the recorded edit
    fixed = first["completion"][len("```python\n"):-len("```")]
    buggy = first["prompt"].split("```python\n")[1][:-len("```")]
    assert fixed != buggy and fixed.startswith("def ")
    records = load_records(str(tmp_path / "augmented.jsonl"), "sft")
    assert len(records) == 20 and records[0].completion == first["completion"]
    # like every command: TensorBoard events and a plot beside the records
    assert (tmp_path / "plots" / "augment-record_chars.png").read_bytes()[:4] == b"\x89PNG"
    if importlib.util.find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "tensorboard" / "augment"), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        assert acc.Scalars("augment/written")[-1].value == 20
        assert acc.Histograms("augment/record_chars")[-1].histogram_value.num == 20


@pytest.mark.parametrize("kind, says", [
    ("missing", "llm.path: {p} does not exist; point it at a folder written by save_pretrained"),
    ("file", "llm.path: {p} is a file; point it at the folder that holds it"),
    ("no-config", "llm.path: {p} has no config.json, so it is not a saved model folder"),
    ("no-weights", "llm.path: cannot load {p}: "),  # a config without weights: transformers' reason, on one line
])
def test_a_local_llm_path_that_is_not_a_model_is_one_line_before_the_output_folder(tmp_path, capsys, kind, says):
    """llm.kind local with a path that holds no model stopped on "unexpected error: OSError: Repo id must be in the
    form 'repo_name' ..." (exit 1, naming no key) after the output folder was made. Now one line naming llm.path
    (exit 2) and no output folder."""
    path = tmp_path / "m"
    if kind != "missing":
        path.mkdir()
    if kind == "file":
        path = path / "f.txt"
        path.write_text("x")
    if kind == "no-weights":
        (path / "config.json").write_text(tiny_config_json())
    out = tmp_path / "out"
    assert run_local(out, f"llm.path={path}") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")]
    assert len(err) == 1 and err[0].startswith("alignkit augment: error: " + says.format(p=path)), err
    assert not out.exists()


def tiny_config_json() -> str:
    from alignkit.models.tiny import tiny_config

    return tiny_config("llama", vocab_size=64).to_json_string()


def run_local(out: Path, *overrides: str) -> int:
    return main(["-q", "augment", "--config", str(CONFIGS / "augment-paraphrase.yaml"), f"output_dir={out}",
                 "llm.kind=local", "llm.base_url=null", "llm.requests_per_minute=null", *overrides])


@pytest.mark.parametrize("name", ["snippets.py", "notes.txt", "notes.md"])
def test_a_source_file_not_in_utf8_is_one_line_naming_it(tmp_path, capsys, name):
    """A .py / .txt / .md source saved in Latin-1 stopped `alignkit augment` on "unexpected error: UnicodeDecodeError
    ... please report it" (exit 1, naming no file). Now one line naming the file, where the byte is and the fix
    (exit 2), before the output folder is made."""
    from alignkit.augment.pipeline import read_sources
    from alignkit.data import DataError

    src = tmp_path / name
    src.write_bytes("def cafe(x):\n    return x  # caf\u00e9\n".encode("latin-1"))  # 0xe9: line 2, col 20
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}: not UTF-8 text \(byte 0xe9 at line 2, column 20\); "
                                        r"save the file as UTF-8"):
        read_sources([str(src)])
    out = tmp_path / "out"
    assert main(["-q", "augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"data.path={src}",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"alignkit augment: error: {src}: not UTF-8 text (byte 0xe9 at line 2, column 20); save the file "
                   "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"]
    assert not out.exists()


def test_code_bugs_preference_output_reads_as_preference(tmp_path):
    assert main(["-q", "augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"output_dir={tmp_path}",
                 "options.output=preference", "options.per_snippet=1"]) == 0
    records = load_records(str(tmp_path / "augmented.jsonl"), "preference")
    assert len(records) == 5 and all(r.chosen != r.rejected for r in records)


def fake_answer(messages):
    """Deterministic answers keyed on the prompt (the tests count on them)."""
    text = messages[-1]["content"]
    if text.startswith("Rewrite the following request"):
        original = text.split("\n\n", 1)[1]
        return "Kindly: " + original.lower() if "haiku" not in original else original  # a haiku is "unchanged"
    if text.startswith("Here are some example tasks"):
        n = sum(1 for line in text.splitlines() if re.match(r"\d+\. ", line))
        return f"1. Name {n} animals that live in the sea."  # the same each time: a near-duplicate after the first
    if text.startswith("Write one") or not text.startswith(("Summarize", "Here are summaries", "List the named")):
        return "An answer."
    if text.startswith("Summarize"):
        return f"S({len(text.split(chr(10) + chr(10), 1)[1])})"  # the chunk's length in characters
    if text.startswith("Here are summaries"):
        return "ALL"
    # entities: one true entity, one invented, one with a bad type
    return ('Sure: [{"text": "Paris", "type": "location"}, {"text": "Atlantis", "type": "LOCATION"}, '
            '{"text": "France", "type": "COUNTRY"}]')


def run_llm(out, url, strategy, data, *overrides):
    return main(["-q", "augment", f"strategy={strategy}", f"data.path={data}", f"output_dir={out}",
                 f"llm={{kind: openai, base_url: '{url}', model: fake}}", *overrides])


def test_paraphrase_against_an_openai_endpoint_then_from_the_cache(tmp_path):
    with serving(fake_answer) as (fake, url):
        assert run_llm(tmp_path, url, "paraphrase", "bundled:data/seed_tasks.jsonl", "options.n=2") == 0
        out = rows(tmp_path)
        # 8 rows x 2 rewrites = 16 requests; the haiku row's rewrites equal the original: 2 dropped; the fake answers
        # both rewrites of a row alike (only the seed differs), so each other row's second is a duplicate: 7
        s = summary(tmp_path)
        assert (s["candidates"], s["written"], len(fake.requests)) == (16, 7, 16)
        assert s["dropped"] == {"same as the original": 2, "duplicate": 7}
        assert out[0]["prompt"] == "Kindly: give three tips for keeping houseplants alive."
        assert out[0]["completion"].startswith("Water only when")
        assert out[0]["meta"] == {"strategy": "paraphrase", "model": "fake", "sample": 0,
                                  "source": out[0]["meta"]["source"],
                                  "original": "Give three tips for keeping houseplants alive."}
        assert out[0]["meta"]["source"].endswith("seed_tasks.jsonl:1")
        assert run_llm(tmp_path, url, "paraphrase", "bundled:data/seed_tasks.jsonl", "options.n=2") == 0
        assert len(fake.requests) == 16 and summary(tmp_path)["cache_hits"] == 16  # the rerun paid nothing
        assert rows(tmp_path) == out


def test_instructions_self_instruct_drops_near_duplicates(tmp_path):
    with serving(fake_answer) as (fake, url):
        assert run_llm(tmp_path, url, "instructions", "bundled:data/seed_tasks.jsonl", "options.num=3",
                       "options.seeds_per_prompt=2") == 0
    out = rows(tmp_path)
    # every attempt proposes the same task: the first is kept and answered, the next 8 attempts (3 * num in
    # all) are near-duplicates of it (ROUGE-L 1.0) and cost no answer request
    s = summary(tmp_path)
    assert len(out) == 1 and s["candidates"] == 9 and len(fake.requests) == 9 + 1
    assert out[0]["prompt"] == "Name 2 animals that live in the sea." and out[0]["completion"] == "An answer."
    assert s["dropped"] == {"too similar to an existing task (ROUGE-L 1.00 > 0.7)": 8}
    assert len(out[0]["meta"]["source"].split(",")) == 2  # the two seed rows it was made from


def test_summarize_is_hierarchical(tmp_path):
    doc = tmp_path / "doc.txt"
    paragraphs = [("Paragraph %d. " % i) + "word " * 40 for i in range(5)]  # 5 paragraphs of ~213 characters
    doc.write_text("\n\n".join(paragraphs))
    with serving(fake_answer) as (fake, url):
        assert run_llm(tmp_path / "out", url, "summarize", doc, "options.chunk_chars=500") == 0
    out = rows(tmp_path / "out")
    # chunks of at most 500 characters, whole paragraphs: [p0 p1] [p2 p3] [p4] -> 3 chunk summaries, whose
    # concatenation fits one chunk -> 1 summary of summaries: 4 requests
    sizes = [len(p.strip()) for p in paragraphs]
    assert [m["messages"][-1]["content"].startswith("Summarize") for m in fake.requests] == [True] * 3 + [False]
    assert fake.requests[0]["messages"][-1]["content"].endswith(paragraphs[1].strip())
    assert len(out) == 1 and out[0]["completion"] == "ALL"
    assert out[0]["meta"]["chunks"] == 3 and out[0]["meta"]["levels"] == 2
    assert fake.requests[2]["messages"][-1]["content"].endswith(paragraphs[4].strip()) and sizes[0] + sizes[1] + 2 <= 500


def test_entities_keeps_only_entities_found_in_the_text_with_a_valid_type(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "Paris is the capital of France."}) + "\n"
                    + json.dumps({"text": "Nothing named here."}) + "\n")
    with serving(fake_answer) as (fake, url):
        assert run_llm(tmp_path / "out", url, "entities", data) == 0
    out = rows(tmp_path / "out")
    # row 1: Paris kept (type upper-cased), Atlantis not in the text, France's type not allowed;
    # row 2: none of them occurs in the text -> dropped
    assert len(out) == 1 and json.loads(out[0]["completion"]) == [{"text": "Paris", "type": "LOCATION"}]
    assert summary(tmp_path / "out")["dropped"] == {"no entity of the reply occurs in the text with a valid type": 1}


def test_local_tiny_model_in_process(tmp_path, capsys):
    """The random tiny model never ends an answer within max_tokens: every candidate is cut off, dropped and counted
    (it used to be written as a record), the run keeps none (exit 2, one line); the rerun asks nothing (cached)."""
    args = ["augment", "strategy=paraphrase", "data.path=bundled:data/seed_tasks.jsonl", f"output_dir={tmp_path}",
            "llm={kind: local, path: 'tiny:llama', max_tokens: 6, temperature: 0.0}", "data.max_records=3"]
    for _ in range(2):
        capsys.readouterr()
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")]
        assert err == ["alignkit augment: error: augment paraphrase: no record to write: every one of the 3 candidate(s) "
                       "was dropped (answer cut off at max_tokens: 3); loosen the filters or check the sources "
                       f"({tmp_path / 'augmented.jsonl'} was not written)"]
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3  # asked once each, then read from the cache


def test_against_alignkit_serve_on_loopback(tmp_path, tiny_dir, capsys):
    from alignkit.serve.engine import Engine
    from alignkit.serve.stack import load_stack
    from tests.serve.conftest import running_server

    engine = Engine(load_stack(tiny_dir("llama"), {}, base_name="base"))
    with running_server(engine) as url:
        args = ["augment", "--config", str(CONFIGS / "augment-paraphrase.yaml"), f"output_dir={tmp_path}",
                f"llm.base_url={url}/v1", "llm.model=base", "llm.max_tokens=6", "llm.temperature=0.0",
                "options.n=1", "data.max_records=2", "filters.min_chars=1",
                "filters.printable=false"]  # the random model's bytes: the transport is tested, not the text
        # the random model's answers reach max_tokens: serve says finish_reason "length", so none is kept
        assert main(args) == 2
        assert "(answer cut off at max_tokens: 2)" in capsys.readouterr().err
        served = dict(engine.stats.requests)  # finished requests per served model
        assert main(args) == 2  # from the cache: no request
        assert dict(engine.stats.requests) == served == {"base": 2}
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2


LOCAL = ["llm.kind=local", "llm.path=tiny:llama", "llm.base_url=null", "llm.requests_per_minute=null"]


@pytest.mark.parametrize("overrides, message", [
    (["strategy=shuffle"], "strategy: 'shuffle' is not registered; valid: code_bugs, paraphrase"),
    (["llm=null"], "llm: strategy 'paraphrase' prompts a language model"),
    (["llm.base_url=null"], "llm.base_url: required for kind 'openai'"),
    (["options.nn=2"], "options.nn: unknown key; did you mean 'n'?"),
    (["strategy=code_bugs"], "llm: strategy 'code_bugs' uses no language model; remove the llm section"),
    (["llm.kind=local"], "llm.path: required for kind 'local'"),
    (["options.n=0"], "options: n: 0; it must be an integer >= 1"),  # asked nothing
    # settings of the other kind of llm, and a cache folder with the cache off, were accepted and never read
    ([*LOCAL, "llm.retries=9"], "llm.retries: 9 is read only by kind 'openai' (an HTTP endpoint's requests)"),
    ([*LOCAL, "llm.timeout=5"], "llm.timeout: 5.0 is read only by kind 'openai'"),
    (["llm.dtype=bfloat16"], "llm.dtype: bfloat16 is read only by kind 'local' (the model loaded in this process)"),
    (["llm.cache=false", "llm.cache_dir=/tmp/c"], "llm.cache_dir: /tmp/c is where answers are cached, and llm.cache is "
                                                 "false, so it would be ignored"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "augment-paraphrase.yaml", overrides)
    assert message in str(e.value)
    if overrides[0] == LOCAL[0]:  # the defaults of the openai-only keys are fine
        assert load_config(CONFIGS / "augment-paraphrase.yaml", LOCAL).llm.kind == "local"


@pytest.mark.parametrize("strategy, options, message", [
    # chunk_chars 0: chunk_text looped for ever
    ("summarize", "chunk_chars: 0", "options: chunk_chars: 0; it must be an integer >= 1"),
    ("summarize", "max_levels: 0", "options: max_levels: 0; it must be an integer >= 1"),
    ("instructions", "num: 0", "options: num: 0; it must be an integer >= 1"),
    ("instructions", "seeds_per_prompt: 0", "options: seeds_per_prompt: 0; it must be an integer >= 1"),
    ("instructions", "max_similarity: 1.5", "options: max_similarity: 1.5; a ROUGE-L F1 bound, in [0, 1]"),
    # a template without its placeholder wrote records that all carried the same text (exit 0); an unknown one
    # died mid-run with "unexpected error: KeyError"; a lone brace with a bare ValueError
    ("summarize", "prompt_template: 'Summarize this.'", "options: prompt_template: 'Summarize this.' has no {text} "
     "placeholder, so every record would carry this same text instead of its own; put {text} where the text goes"),
    ("paraphrase", "template: 'Rewrite it.'", "options: template: 'Rewrite it.' has no {text} placeholder"),
    ("entities", "template: 'List {entities} in {text}'",
     "options: template: unknown placeholder {entities}; it can use {text}, {types} (a literal brace is {{ or }})"),
    ("instructions", "answer_template: 'Answer: {task'", "options: answer_template: 'Answer: {task' is not a format "
     "string ("),
    # no type to keep an entity of: every reply dropped, after every request was paid for
    ("entities", "types: []", "options: types: []; name at least one entity type (e.g. [PERSON, LOCATION])"),
])
def test_options_a_strategy_cannot_run_with_are_refused_at_load(tmp_path, strategy, options, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"command: augment\nstrategy: {strategy}\ndata: {{path: x.jsonl}}\noptions: {{{options}}}\n"
                      "llm: {kind: openai, base_url: 'http://127.0.0.1:9/v1', model: m}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config, [])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["filters.min_chars=100", "filters.max_chars=10"],
     "filters.max_chars: 10 is below filters.min_chars (100) or 1, so every record would be dropped"),
    (["filters.max_chars=0"], "filters.max_chars: 0 is below filters.min_chars (1) or 1"),
    (["filters.min_chars=-5"], "filters.min_chars: -5; a length, >= 0"),
])
def test_filters_no_record_can_pass_are_refused_at_load(overrides, message):
    """Contradictory length filters dropped every candidate, found out only after the run (every LLM call spent)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "augment-code-bugs.yaml", overrides)
    load_config(CONFIGS / "augment-code-bugs.yaml", ["filters.max_chars=null"])


def test_missing_column_is_one_line(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "hi"}) + "\n")
    assert main(["augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"data.path={data}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"alignkit augment: error: {data}:1: no column 'code' (options.field); the row has ['question']: "
                   "set options.field to the column that holds the text"]
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


@pytest.mark.parametrize("strategy, source, column", [("code_bugs", "snippets.py", "code"),
                                                      ("summarize", "doc.md", "text")])
def test_options_field_on_a_file_source_names_the_file_key_and_column(tmp_path, capsys, strategy, source, column):
    """A .py file's functions are column 'code', a .txt / .md document column 'text', whatever options.field says;
    the line used to say "set options.field" to a user who had set it, without naming the column to set."""
    data = tmp_path / source
    data.write_text("def ok(a):\n    return a < 1\n")
    config = ["--config", str(CONFIGS / "augment-code-bugs.yaml")] if strategy == "code_bugs" else \
        ["strategy=summarize", "llm={kind: openai, base_url: 'http://127.0.0.1:9', model: fake}"]  # never called
    assert main(["augment", *config, f"data.path={data}", f"output_dir={tmp_path / 'o'}", "options.field=src"]) == 2
    where = f"{data}:1" if source.endswith(".py") else str(data)
    what = "a .py file's functions are" if source.endswith(".py") else "a .txt / .md document is"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"alignkit augment: error: {where}: options.field is 'src', but {what} read into column {column!r}; set "
        f"options.field: {column} (or give the sources as JSONL rows with a 'src' column)"]
    assert not (tmp_path / "o").exists()


def test_empty_documents_are_dropped_and_counted_and_an_all_empty_run_is_one_line(tmp_path, capsys):
    """summarize on an empty document raised IndexError (an empty reply left no summary) or a line saying "set
    options.field" (the column was there, just empty). An empty row is now dropped and counted like any other."""
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["One short document.", "", "  \n "]) + "\n")
    with serving(fake_answer) as (fake, url):
        assert run_llm(tmp_path / "out", url, "summarize", data) == 0
        assert len(fake.requests) == 1  # only the non-empty document reached the model
    assert summary(tmp_path / "out")["dropped"] == {"source text is empty": 2}
    assert [r["meta"]["source"] for r in rows(tmp_path / "out")] == [f"{data}:1"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    capsys.readouterr()
    with serving(fake_answer) as (fake, url):
        assert main(["augment", "strategy=summarize", f"data.path={empty}", f"output_dir={tmp_path / 'o2'}",
                     f"llm={{kind: openai, base_url: '{url}', model: fake}}"]) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")] == [  # not the bar
        "alignkit augment: error: augment summarize: no record to write: every one of the 1 candidate(s) was dropped "
        f"(source text is empty: 1); loosen the filters or check the sources ({tmp_path / 'o2' / 'augmented.jsonl'} "
        "was not written)"]


def test_a_run_that_keeps_no_record_fails_and_leaves_the_previous_run(tmp_path, capsys):
    config = str(CONFIGS / "augment-code-bugs.yaml")
    assert main(["-q", "augment", "--config", config, f"output_dir={tmp_path}"]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("augmented.jsonl", "summary.json", "config.yaml")}
    capsys.readouterr()
    # the bundled snippets' 20 candidates (5 functions x 4 bugs) are all far shorter than 100000 characters
    assert main(["augment", "--overwrite", "--config", config, f"output_dir={tmp_path}", "filters.min_chars=100000",
                 "filters.max_chars=null"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")]  # not the bar's
    assert err == [f"alignkit augment: error: augment code_bugs: no record to write: every one of the 20 candidate(s) "
                   f"was dropped (prompt shorter than 100000 characters: 20); loosen the filters or check the sources "
                   f"({tmp_path / 'augmented.jsonl'} was not written)"]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the first run's files, as written


def test_a_source_with_no_candidate_is_refused(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"code": "x = 1\n"}) + "\n")  # nothing to mutate: no comparison, number, name or return
    assert main(["augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"data.path={data}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    assert "no record to write: the strategy made no candidate from the 1 source(s)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "augmented.jsonl").exists() and not (tmp_path / "o" / "config.yaml").exists()


def test_a_python_source_that_does_not_parse_is_one_line_naming_its_line(tmp_path, capsys):
    data = tmp_path / "snippets.py"
    data.write_text("def ok(a):\n    return a < 1\n\n\ndef broken(a:\n    return a\n")
    assert main(["augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"data.path={data}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"alignkit augment: error: {data}:5: not valid Python (")


def test_answers_cut_off_at_max_tokens_are_dropped_counted_and_warned_about(tmp_path, caplog):
    """An answer the endpoint ended with finish_reason "length" was written as a whole record (a truncated training
    target). It is dropped now, counted by its reason in summary.json, with a warning naming llm.max_tokens; for
    summarize, one unfinished chunk summary drops the document; for instructions, an unfinished answer its task."""
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "completion": "A."}) for i in range(3)) + "\n")

    def answer(messages):  # the row of question 1 is cut off, the others finish
        text = messages[-1]["content"]
        return ("Kindly: question 1, and th", "length") if "Question 1?" in text else ("Kindly: " + text[-12:], "stop")

    with serving(answer) as (fake, url), caplog.at_level("WARNING", logger="alignkit.augment.pipeline"):
        assert run_llm(tmp_path / "out", url, "paraphrase", data) == 0
    assert summary(tmp_path / "out")["dropped"] == {"answer cut off at max_tokens": 1}
    assert [r["meta"]["source"] for r in rows(tmp_path / "out")] == [f"{data}:1", f"{data}:3"]
    assert "1 of 3 candidate(s) dropped: answer cut off at max_tokens (max_tokens 256); raise llm.max_tokens" \
        in caplog.text
    doc = tmp_path / "doc.txt"
    doc.write_text("Paragraph one. " + "word " * 40 + "\n\nParagraph two. " + "word " * 40)
    with serving(lambda m: ("ALL", "stop") if "Paragraph one" in m[-1]["content"] else ("Part", "length")) as (f, url):
        assert main(["-q", "augment", "strategy=summarize", f"data.path={doc}", f"output_dir={tmp_path / 's'}",
                     f"llm={{kind: openai, base_url: '{url}', model: fake}}", "options.chunk_chars=250"]) == 2
        assert len(f.requests) == 2  # two chunks; no combining asked for a document already dropped
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"prompt": "Name a colour."}) + "\n")
    with serving(lambda m: ("Name a fruit.", "stop") if "example tasks" in m[-1]["content"] else
                 ("A fruit is an apple, a pe", "length")) as (f, url):
        assert main(["-q", "augment", "strategy=instructions", f"data.path={seeds}", f"output_dir={tmp_path / 'i'}",
                     f"llm={{kind: openai, base_url: '{url}', model: fake}}", "options.num=1"]) == 2
        assert len(f.requests) == 2  # the task, then its answer: cut off, so nothing to write
