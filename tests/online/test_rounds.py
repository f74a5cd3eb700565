"""Offline rounds through files: sample -> annotate -> records on disk -> train, resumable stage by stage;
best-of-n rounds keep each prompt's best responses as SFT records. Expectations rebuilt by hand from the
files a round wrote."""

from __future__ import annotations

import json

import pytest

from alignkit.data import load_records
from alignkit.data.records import PreferenceRecord, SFTRecord
from alignkit.online.generation import SamplingConfig
from alignkit.online.rounds import (MANIFEST_FILE, RECORDS_FILE, SAMPLES_FILE, annotate_round, read_manifest,
                                    read_samples, round_dir, run_offline_rounds, sample_round)

PROMPTS = ["Hello!", "The quick brown fox", "What is 2 + 2?"]
SAMPLING = SamplingConfig(num_samples=3, max_new_tokens=4, seed=5)


def length_score(prompt, response: str) -> float:
    return float(len(response))


def by_group(samples):
    groups: dict[int, list] = {}
    for s in samples:
        if s.response.strip():  # records hold no empty responses
            groups.setdefault(s.group, []).append(s)
    return groups


class FakeTrainer:
    def __init__(self, log, records, k):
        self.log, self.records, self.k = log, records, k

    def train(self):
        self.log.append((self.k, self.records))
        return self.k


def test_offline_rounds_through_files_and_resume(tiny_lm, tokenizer, tmp_path):
    model = tiny_lm("llama")
    log: list = []
    manifests = run_offline_rounds(model, tokenizer, PROMPTS, tmp_path, num_rounds=2, sampling=SAMPLING,
                                   annotator={"type": "function", "fn": length_score}, feedback="best_worst",
                                   trainer_factory=lambda recs, k: FakeTrainer(log, recs, k))
    assert [k for k, _ in log] == [0, 1] and all(m["trained"] is True for m in manifests)
    rounds_samples = []
    for k in range(2):
        folder = round_dir(tmp_path, k)
        samples = read_samples(folder / SAMPLES_FILE)
        rounds_samples.append([s.response_ids for s in samples])
        assert len(samples) == 9 and [s.group for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        manifest = read_manifest(folder)
        assert manifest["samples"]["sampling"]["seed"] == (5, 885225367)[k]  # round_seed(5, k), by hand below
        assert manifest["annotation"]["scores"] == [length_score(None, s.response) for s in samples]
        # best vs worst by hand: first longest vs first shortest non-empty response, if they differ
        want = []
        for g, items in sorted(by_group(samples).items()):
            best = max(items, key=lambda s: len(s.response))
            worst = min(items, key=lambda s: len(s.response))
            if len(best.response) > len(worst.response):
                want.append((best.prompt, best.response, worst.response, len(best.response) - len(worst.response)))
        assert want, "the test needs responses of different lengths"
        records = load_records(str(folder / RECORDS_FILE))
        assert all(isinstance(r, PreferenceRecord) for r in records)
        assert [(r.prompt, r.chosen, r.rejected, r.margin) for r in records] == want
        assert [(r.prompt, r.chosen) for r in log[k][1]] == [(w[0], w[1]) for w in want]  # what was trained on
        assert manifest["annotation"]["metrics"]["records/count"] == len(want)
    assert rounds_samples[0] != rounds_samples[1]
    # resume: complete stages and trained rounds are not redone
    before = (round_dir(tmp_path, 1) / SAMPLES_FILE).read_bytes()
    (round_dir(tmp_path, 1) / RECORDS_FILE).unlink()  # an incomplete annotation stage is redone

    def must_not_train(recs, k):
        raise AssertionError("a trained round was trained again")

    again = run_offline_rounds(model, tokenizer, PROMPTS, tmp_path, num_rounds=2, sampling=SAMPLING,
                               annotator={"type": "function", "fn": length_score}, feedback="best_worst",
                               trainer_factory=must_not_train)
    assert (round_dir(tmp_path, 1) / SAMPLES_FILE).read_bytes() == before
    assert (round_dir(tmp_path, 1) / RECORDS_FILE).is_file()
    assert again[1]["annotation"]["scores"] == manifests[1]["annotation"]["scores"]


def test_best_of_n_round_keeps_the_best_responses_as_sft(tiny_lm, tokenizer, tmp_path):
    model = tiny_lm("llama")
    cfg = SamplingConfig(num_samples=4, max_new_tokens=4, seed=11)
    sample_round(model, tokenizer, PROMPTS, tmp_path, cfg)
    # annotation runs as its own job: it only reads the folder
    annotate_round(tmp_path, {"type": "function", "fn": length_score}, "best_of_n",
                   feedback_kwargs={"k": 2}, reweighters=["inverse_prompt_frequency"])
    samples = read_samples(tmp_path / SAMPLES_FILE)
    want = []
    for g, items in sorted(by_group(samples).items()):
        ranked = sorted(items, key=lambda s: -len(s.response))[:2]  # stable: earlier samples win ties
        want += [(s.prompt, s.response) for s in ranked]
    records = load_records(str(tmp_path / RECORDS_FILE))
    assert records and all(isinstance(r, SFTRecord) for r in records)
    assert [(r.prompt, r.completion) for r in records] == want
    # two records per prompt, so inverse prompt frequency keeps every weight at 1
    assert [r.weight for r in records] == pytest.approx([1.0] * len(records))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["annotation"]["feedback"] == "best_of_n"
    assert manifest["annotation"]["reweighters"] == [{"type": "inverse_prompt_frequency"}]


def test_annotate_before_sampling_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run sample_round first"):
        annotate_round(tmp_path, {"type": "function", "fn": length_score})


def test_annotate_round_refuses_feedback_kwargs_that_make_wrong_pairs(tmp_path):
    """annotate_round (the library's offline round) took a negative min_margin (best_worst then paired an all-equal
    group's first sample with itself) and any feedback_kwargs key: the CLI's check_feedback now runs here too,
    before the samples are read or scored."""
    from alignkit.settings import ConfigError

    with pytest.raises(ConfigError, match=r"^feedback_kwargs.min_margin: -1.0 must be a number >= 0"):
        annotate_round(tmp_path, {"type": "function", "fn": length_score}, feedback_kwargs={"min_margin": -1.0})
    with pytest.raises(ConfigError, match=r"^feedback_kwargs.min_margn: unknown key"):
        annotate_round(tmp_path, {"type": "function", "fn": length_score}, feedback_kwargs={"min_margn": 0.1})



def short_score(prompt, response: str) -> float:
    return -float(len(response))


def test_a_kept_annotation_made_by_another_annotator_is_refused(tiny_lm, tokenizer, tmp_path):
    """annotate_round kept a complete annotation whatever annotator (feedback, reweighters) was passed: records
    of length_score stood for short_score's, exit 0. Now a DataError naming the file and what differs; the same
    settings keep it, overwrite=True redoes it."""
    from alignkit.data.records import DataError

    sample_round(tiny_lm("llama"), tokenizer, PROMPTS, tmp_path, SAMPLING)
    annotate_round(tmp_path, {"type": "function", "fn": length_score}, "best_worst")
    kept = (tmp_path / RECORDS_FILE).read_text()
    annotate_round(tmp_path, {"type": "function", "fn": length_score}, "best_worst")  # the same: kept
    for args, kwargs, what in (
            (({"type": "function", "fn": short_score}, "best_worst"), {}, "short_score"),
            (({"type": "function", "fn": length_score}, "best_of_n"), {}, "feedback"),
            (({"type": "function", "fn": length_score}, "best_worst"), {"feedback_kwargs": {"min_margin": 2}},
             "min_margin")):
        with pytest.raises(DataError, match=f"{RECORDS_FILE}: complete, and annotated with other settings .*{what}"):
            annotate_round(tmp_path, *args, **kwargs)
        assert (tmp_path / RECORDS_FILE).read_text() == kept
    annotate_round(tmp_path, {"type": "function", "fn": short_score}, "best_worst", overwrite=True)
    assert read_manifest(tmp_path)["annotation"]["annotator"]["fn"].endswith(":short_score")


def near_score(prompt, response: str, target: int = 24) -> float:
    return -abs(len(response) - target)


def test_a_kept_annotation_made_with_other_function_kwargs_is_refused(tiny_lm, tokenizer, tmp_path):
    """FunctionAnnotator.describe() had no kwargs, so target=100 kept the target=24 records (exit 0). Now the
    manifest entry records them and other kwargs are a DataError; an entry written without them (older round
    folders) still keeps the same function, and another function is still refused."""
    from alignkit.data.records import DataError

    sample_round(tiny_lm("llama"), tokenizer, PROMPTS, tmp_path, SAMPLING)
    fn = {"type": "function", "fn": near_score, "kwargs": {"target": 24}}
    annotate_round(tmp_path, fn, "best_worst")
    kept = (tmp_path / RECORDS_FILE).read_text()
    assert read_manifest(tmp_path)["annotation"]["annotator"]["kwargs"] == {"target": 24}
    annotate_round(tmp_path, fn, "best_worst")  # the same: kept
    with pytest.raises(DataError, match=f"{RECORDS_FILE}: complete, and annotated with other settings .*\"target\": 100"):
        annotate_round(tmp_path, {**fn, "kwargs": {"target": 100}}, "best_worst")
    assert (tmp_path / RECORDS_FILE).read_text() == kept
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())  # as written before kwargs were recorded
    del manifest["annotation"]["annotator"]["kwargs"], manifest["annotation"]["annotator"]["default_score"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    annotate_round(tmp_path, fn, "best_worst")  # kept
    assert (tmp_path / RECORDS_FILE).read_text() == kept
    with pytest.raises(DataError, match="annotated with other settings .*length_score"):
        annotate_round(tmp_path, {"type": "function", "fn": length_score}, "best_worst")


def test_new_samples_do_not_keep_records_of_the_old_ones(tiny_lm, tokenizer, tmp_path):
    """Sampling a round again (overwrite) left records.jsonl and its manifest entry from the OLD samples: the next
    annotation kept them as complete (records of responses no longer in samples.jsonl, exit 0). Now new samples
    remove the annotation made from the old ones, and the round is annotated again."""
    model = tiny_lm("llama")
    fn = {"type": "function", "fn": length_score}
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)
    annotate_round(tmp_path, fn, "best_worst")
    old = {s.response for s in read_samples(tmp_path / SAMPLES_FILE)}
    sample_round(model, tokenizer, PROMPTS, tmp_path, SamplingConfig(num_samples=3, max_new_tokens=4, seed=6),
                 overwrite=True)
    assert not (tmp_path / RECORDS_FILE).exists() and set(read_manifest(tmp_path)) == {"samples"}
    annotate_round(tmp_path, fn, "best_worst")  # not overwrite: redone, since the old annotation is gone
    responses = {s.response for s in read_samples(tmp_path / SAMPLES_FILE)}
    assert responses != old, "the test needs the second sampling to differ"
    records = load_records(str(tmp_path / RECORDS_FILE))
    assert records and all(r.chosen in responses and r.rejected in responses for r in records)


def test_a_kept_round_sampled_from_other_prompts_is_refused(tiny_lm, tokenizer, tmp_path):
    """A complete samples.jsonl is kept (resume), and the CLI compares only the config: a prompt file edited between
    two `alignkit sample` runs (same data.path) kept the samples of the OLD prompts, exit 0. Now the manifest records
    the prompts' SHA-256 and other prompts are a DataError before anything is written; the same prompts still
    resume, and overwrite samples the new ones."""
    from alignkit.data.records import DataError

    model = tiny_lm("llama")
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)
    before = (tmp_path / SAMPLES_FILE).read_bytes()
    other = [PROMPTS[0], "Another question?", PROMPTS[2]]
    with pytest.raises(DataError, match=r"samples.jsonl: complete, and sampled from other prompts \(3 then, 3 now, "
                                        r"or the same number changed\): it would be kept as it is, not redone"):
        sample_round(model, tokenizer, other, tmp_path, SAMPLING)
    assert (tmp_path / SAMPLES_FILE).read_bytes() == before
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)  # the same prompts: kept
    assert (tmp_path / SAMPLES_FILE).read_bytes() == before
    sample_round(model, tokenizer, other, tmp_path, SAMPLING, overwrite=True)
    assert {s.prompt for s in read_samples(tmp_path / SAMPLES_FILE)} == set(other)


def test_annotate_samples_in_chunks_equals_one_call(monkeypatch):
    """`annotate_round` now scores ANNOTATE_CHUNK samples per annotator call (its progress bar's steps): the
    scores, failure counts and rewards/<fn>/mean|std of 3 chunks equal the statistics module's over all items."""
    import statistics

    import alignkit.online.rounds as r
    from alignkit.online.annotators import FunctionAnnotator
    from alignkit.online.generation import Sample

    monkeypatch.setattr(r, "ANNOTATE_CHUNK", 4)

    def length(prompt, response):
        return None if response.endswith("!") else float(len(response))

    responses = ["a", "bb", "c!", "dddd", "ee", "f", "ggggg!", "hhh", "ii", "j"]
    samples = [Sample(prompt="p", response=t, prompt_ids=[1], response_ids=[2], finish_reason="stop") for t in responses]
    got = r.annotate_samples(FunctionAnnotator(length), samples)
    ok = [float(len(t)) for t in responses if not t.endswith("!")]
    assert [v for v in got.values.tolist() if v == v] == ok and got.failed.tolist() == [t.endswith("!") for t in responses]
    name = next(k for k in got.metrics if k.endswith("/mean"))
    assert got.metrics[name] == pytest.approx(statistics.mean(ok))
    assert got.metrics[name.replace("/mean", "/std")] == pytest.approx(statistics.stdev(ok))
    assert got.metrics["function/failures"] == 2.0 and len(got.meta) == 10


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing catches it on the way out."""


@pytest.mark.parametrize("stage", ["samples", "annotation"])
def test_a_redo_killed_between_its_file_and_its_manifest_entry_is_redone_not_kept(tiny_lm, tokenizer, tmp_path,
                                                                                monkeypatch, stage):
    """A stage redone with overwrite=True replaced its data file first and its manifest entry last, so a kill between
    the two left the NEW file under the OLD entry: complete to the next run, which kept it as the old settings' (the
    old seed's samples, the old annotator's records) without a word, or refused it as made by other settings than
    the ones that made it. Now the old entry goes before the file is replaced: the round is incomplete and the next
    call redoes it, as an unkilled one would have written."""
    import alignkit.online.rounds as rounds

    model = tiny_lm("llama")
    fn = {"type": "function", "fn": length_score}
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)
    annotate_round(tmp_path, fn, "best_worst")
    new_sampling = SamplingConfig(num_samples=3, max_new_tokens=4, seed=6)
    new_fn = {"type": "function", "fn": short_score}

    def redo():
        if stage == "samples":
            sample_round(model, tokenizer, PROMPTS, tmp_path, new_sampling, overwrite=True)
        else:
            annotate_round(tmp_path, new_fn, "best_worst", overwrite=True)

    def killed(folder, key, entry):
        raise Killed()

    monkeypatch.setattr(rounds, "_update_manifest", killed)
    with pytest.raises(Killed):
        redo()
    monkeypatch.undo()
    assert stage not in read_manifest(tmp_path)  # incomplete: nothing claims the new file was made the old way
    if stage == "samples":
        sample_round(model, tokenizer, PROMPTS, tmp_path, new_sampling)  # no overwrite: redone, not kept
        assert read_manifest(tmp_path)["samples"]["sampling"]["seed"] == 6
    else:
        annotate_round(tmp_path, new_fn, "best_worst")  # no overwrite: redone, not refused as another annotator's
        assert read_manifest(tmp_path)["annotation"]["annotator"]["fn"].endswith(":short_score")
    got = (tmp_path / (SAMPLES_FILE if stage == "samples" else RECORDS_FILE)).read_bytes()
    clean = tmp_path / "clean"
    sample_round(model, tokenizer, PROMPTS, clean, new_sampling if stage == "samples" else SAMPLING)
    if stage == "annotation":
        annotate_round(clean, new_fn, "best_worst")
    assert got == (clean / (SAMPLES_FILE if stage == "samples" else RECORDS_FILE)).read_bytes()


def test_round_k_draws_the_same_however_the_rounds_were_split_across_calls(tiny_lm, tokenizer, tmp_path):
    """Round k's seed is derived from (base seed, k) alone: 2 rounds then a resumed call for 3 write the 3-round
    call's samples, round by round. Rounds were seeded `seed + k`: round 1 of seed 5 drew round 0 of seed 6's
    samples (two runs meant to be independent shared them); now they differ."""
    import hashlib

    from alignkit.online.rounds import round_seed

    model = tiny_lm("llama")
    run = dict(sampling=SAMPLING, annotator={"type": "function", "fn": length_score}, feedback="best_worst")
    run_offline_rounds(model, tokenizer, PROMPTS, tmp_path / "split", num_rounds=2, **run)
    run_offline_rounds(model, tokenizer, PROMPTS, tmp_path / "split", num_rounds=3, **run)
    run_offline_rounds(model, tokenizer, PROMPTS, tmp_path / "whole", num_rounds=3, **run)
    for k in range(3):
        split, whole = (read_samples(round_dir(tmp_path / d, k) / SAMPLES_FILE) for d in ("split", "whole"))
        assert [s.response_ids for s in split] == [s.response_ids for s in whole]
    digest = hashlib.sha256(b"alignkit-round:5:1").digest()
    assert round_seed(5, 1) == int.from_bytes(digest[:4], "big") % 2 ** 31 == 885225367
    assert round_seed(5, 0) == 5 and round_seed(None, 3) is None
    run_offline_rounds(model, tokenizer, PROMPTS, tmp_path / "six", num_rounds=1,
                       **{**run, "sampling": SamplingConfig(num_samples=3, max_new_tokens=4, seed=6)})
    six = read_samples(round_dir(tmp_path / "six", 0) / SAMPLES_FILE)
    five = read_samples(round_dir(tmp_path / "whole", 1) / SAMPLES_FILE)
    assert [s.response_ids for s in six] != [s.response_ids for s in five]


# (what changes, the call's kwargs, the key and old -> new value the refusal names)
OTHER_SETTINGS = [
    ("seed", {"cfg": SamplingConfig(num_samples=3, max_new_tokens=4, seed=6)}, "sampling.seed: 5 then, 6 now"),
    ("temperature", {"cfg": SamplingConfig(num_samples=3, max_new_tokens=4, seed=5, temperature=0.7)},
     "sampling.temperature: 1.0 then, 0.7 now"),
    ("max_new_tokens", {"cfg": SamplingConfig(num_samples=3, max_new_tokens=6, seed=5)},
     "sampling.max_new_tokens: 4 then, 6 now"),
    ("num_samples", {"cfg": SamplingConfig(num_samples=2, max_new_tokens=4, seed=5)},
     "sampling.num_samples: 3 then, 2 now"),
    ("sampler", {"cfg": SamplingConfig(num_samples=3, max_new_tokens=4, seed=5, sampler="multinomial")},
     'sampling.sampler: null then, "multinomial" now'),
    ("top_k", {"cfg": SamplingConfig(num_samples=3, max_new_tokens=4, seed=5, top_k=2)},
     "sampling.top_k: null then, 2 now"),
    ("formatter", {"formatter": "plain"}, 'generate.formatter: "auto" then, "plain" now'),
    ("max_prompt_length", {"max_prompt_length": 3}, "generate.max_prompt_length: null then, 3 now"),
    ("row_seed", {"row_seed": 5}, "generate.row_seed: null then, 5 now"),
]


@pytest.mark.parametrize("what,call,named", OTHER_SETTINGS, ids=[t[0] for t in OTHER_SETTINGS])
def test_a_kept_round_sampled_with_other_settings_is_refused(tiny_lm, tokenizer, tmp_path, what, call, named):
    """A complete samples.jsonl was kept whatever sampling settings the resuming call passed (only the prompts were
    compared): `run_offline_rounds` resumed with another seed / temperature / max_new_tokens / sampler kept the old
    draws as the new settings'. Now each setting recorded in the manifest is compared: a DataError naming the key,
    its old and new value and overwrite, before anything is written; the same settings still resume."""
    from alignkit.data.records import DataError

    model = tiny_lm("llama")
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    cfg = call.get("cfg", SAMPLING)
    kwargs = {k: v for k, v in call.items() if k != "cfg"}
    with pytest.raises(DataError) as e:
        sample_round(model, tokenizer, PROMPTS, tmp_path, cfg, **kwargs)
    message = str(e.value)
    assert f"samples.jsonl: complete, and sampled with other settings ({named})" in message
    assert "overwrite=true" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)  # the same settings: kept
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    sample_round(model, tokenizer, PROMPTS, tmp_path, cfg, overwrite=True, **kwargs)
    assert read_manifest(tmp_path)["samples"]["sampling"] == cfg.to_dict()


def test_an_older_manifest_without_the_generate_settings_still_resumes(tiny_lm, tokenizer, tmp_path):
    """A manifest written before the "generate" settings were recorded: not compared on them (kept, not refused)."""
    model = tiny_lm("llama")
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)
    manifest = read_manifest(tmp_path)
    del manifest["samples"]["generate"], manifest["samples"]["sampling"]["sampler"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    before = (tmp_path / SAMPLES_FILE).read_bytes()
    sample_round(model, tokenizer, PROMPTS, tmp_path, SamplingConfig(num_samples=3, max_new_tokens=4, seed=5,
                                                                     sampler="multinomial"), formatter="plain")
    assert (tmp_path / SAMPLES_FILE).read_bytes() == before


def test_a_kept_annotation_judged_with_another_rubric_is_refused(tiny_lm, tokenizer, tmp_path):
    """The judge's describe() (what a kept annotation is compared on) lacked its templates, pair_pattern, chat and
    dtype: a round judged with another rubric was kept as this one's, exit 0. Now each is a DataError naming it;
    the same judge keeps it."""
    from alignkit.data.records import DataError
    from alignkit.online.judge import DEFAULT_TEMPLATE, JudgeAnnotator

    model = tiny_lm("llama")
    sample_round(model, tokenizer, PROMPTS, tmp_path, SAMPLING)

    def judge(**kw):
        return JudgeAnnotator(model, tokenizer, on_failure="default", default_score=5.0, max_new_tokens=2, **kw)

    annotate_round(tmp_path, judge(), "pointwise", feedback_kwargs={"threshold": 5.0})
    kept = (tmp_path / RECORDS_FILE).read_text()
    annotate_round(tmp_path, judge(), "pointwise", feedback_kwargs={"threshold": 5.0})  # the same: kept
    for kw, what in (({"template": "Grade it.\n" + DEFAULT_TEMPLATE}, "template_sha256"),
                     ({"pair_pattern": r"Better:\s*([AB])"}, "pair_pattern"), ({"chat": False}, '"chat": false')):
        with pytest.raises(DataError, match=f"{RECORDS_FILE}: complete, and annotated with other settings .*{what}"):
            annotate_round(tmp_path, judge(**kw), "pointwise", feedback_kwargs={"threshold": 5.0})
        assert (tmp_path / RECORDS_FILE).read_text() == kept


def test_a_run_seeded_the_old_way_resumes_with_its_seeds(tiny_lm, tokenizer, tmp_path, caplog):
    """Rounds were seeded `seed + k` before round_seed: such a run's kept round 1 (seed 6, trained) was refused on
    resume for sampling.seed 6 vs round_seed(5, 1), advising overwrite=true, which run_offline_rounds does not take.
    Now a kept round recording seed + k keeps that seed (not resampled, not retrained); a kept round made with
    another seed is still refused, naming the folder to delete and out_dir, not overwrite."""
    from dataclasses import replace

    from alignkit.data.records import DataError

    model = tiny_lm("llama")
    run = dict(annotator={"type": "function", "fn": length_score}, feedback="best_worst")
    log: list = []
    for k in range(2):  # as the older run_offline_rounds wrote them: round k sampled with seed 5 + k
        folder = round_dir(tmp_path, k)
        sample_round(model, tokenizer, PROMPTS, folder, replace(SAMPLING, seed=5 + k))
        annotate_round(folder, run["annotator"], "best_worst")
        manifest = read_manifest(folder)
        manifest["trained"] = True
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    before = {k: (round_dir(tmp_path, k) / SAMPLES_FILE).read_bytes() for k in range(2)}
    with caplog.at_level("WARNING", logger="alignkit.online.rounds"):
        manifests = run_offline_rounds(model, tokenizer, PROMPTS, tmp_path, num_rounds=3, sampling=SAMPLING,
                                       trainer_factory=lambda recs, k: FakeTrainer(log, recs, k), **run)
    assert [r.getMessage().count("older seeding") for r in caplog.records] == [1]  # once, naming round 1
    assert "round(s) [1]" in caplog.records[0].getMessage()
    assert {k: (round_dir(tmp_path, k) / SAMPLES_FILE).read_bytes() for k in range(2)} == before
    assert [k for k, _ in log] == [2]  # only the new round trained
    assert [m["samples"]["sampling"]["seed"] for m in manifests] == [5, 6, 64481628]  # round 2: round_seed(5, 2)
    other = round_dir(tmp_path / "other", 1)
    sample_round(model, tokenizer, PROMPTS, other, replace(SAMPLING, seed=9))
    with pytest.raises(DataError) as e:
        run_offline_rounds(model, tokenizer, PROMPTS, tmp_path / "other", num_rounds=2, sampling=SAMPLING, **run)
    message = str(e.value)
    assert "sampling.seed: 9 then, 885225367 now" in message and f"Delete {other} " in message
    assert "out_dir" in message and "overwrite" not in message and "\n" not in message
