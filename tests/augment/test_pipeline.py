"""The pipeline's filters, one reason each, with a stub model whose answers are set by hand."""

from __future__ import annotations

import json

from alignkit.augment.pipeline import Filters, augment
from alignkit.augment.strategies import CodeBugsOptions, ParaphraseOptions, Source


class Stub:
    name = "stub"

    def __init__(self, answers):
        self.answers = list(answers)

    def chat(self, messages, *, max_tokens, temperature, seed=None):
        return self.answers.pop(0)


def test_each_filter_drops_with_its_reason(tmp_path):
    sources = [Source(f"d.jsonl:{i + 1}", {"prompt": f"question {i}", "completion": "answer"}) for i in range(6)]
    answers = ["ok one", "x", "y" * 50, "bad \x00 byte", "bad \ufffd char", "OK, one!"]
    res = augment(sources, "paraphrase", ParaphraseOptions(), Stub(answers), Filters(min_chars=2, max_chars=40),
                  tmp_path / "out.jsonl")
    assert res.dropped == {"prompt shorter than 2 characters": 1, "prompt longer than 40 characters": 1,
                           "prompt holds control or replacement characters": 2, "duplicate": 1}
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "ok one", "completion": "answer",
                     "meta": {"strategy": "paraphrase", "source": "d.jsonl:1", "model": "stub", "original": "question 0",
                              "sample": 0}}]
    assert (res.written, res.candidates) == (1, 6)


def test_filters_can_be_switched_off(tmp_path):
    sources = [Source("d:1", {"prompt": "q", "completion": "a"}), Source("d:2", {"prompt": "r", "completion": "a"})]
    res = augment(sources, "paraphrase", ParaphraseOptions(), Stub(["same \x01", "same \x01"]),
                  Filters(dedup=False, printable=False), tmp_path / "out.jsonl")
    assert (res.written, res.dropped) == (2, {})


class Replies:
    """A ChatModel answering from a list, in order (records what it was asked)."""

    def __init__(self, *replies: str) -> None:
        self.replies, self.asked = list(replies), []

    def chat(self, messages, **kw):
        self.asked.append(messages[-1]["content"])
        return self.replies.pop(0)


def test_summarize_drops_a_document_an_empty_summary_would_cut_short():
    """Before: an empty reply for every chunk left no summary to combine (IndexError, the run died), and an empty
    reply for one chunk was combined without it (a summary missing part of the document, kept)."""
    from alignkit.augment.strategies import Context, SummarizeOptions, summarize

    doc = Source("doc.txt", {"text": "First part here.\n\nSecond part here."}, "text")  # 16 + 2 + 17 characters
    opt = SummarizeOptions(chunk_chars=20)  # each paragraph its own chunk: 2 chunks
    cands = list(summarize([doc], Context(Replies("", "")), opt))
    assert [(c.drop, c.record["completion"], c.extra) for c in cands] == [
        ("empty summary from the model (level 1)", "", {"chunks": 2, "levels": 1})]
    llm = Replies("A.", "", "never asked")
    cands = list(summarize([doc], Context(llm), opt))
    assert [c.drop for c in cands] == ["empty summary from the model (level 1)"] and len(llm.asked) == 2
    llm = Replies("A.", "B.", "")  # the summary of summaries comes back empty
    cands = list(summarize([doc], Context(llm), opt))
    assert [(c.drop, c.extra["levels"]) for c in cands] == [("empty summary from the model (level 2)", 2)]
    assert llm.asked[2].endswith("A.\n\nB.")
    llm = Replies("A.", "B.", "AB.")
    assert [(c.drop, c.record["completion"]) for c in summarize([doc], Context(llm), opt)] == [(None, "AB.")]


def test_code_bugs_differing_by_an_operator_are_not_duplicates(tmp_path):
    """De-duplication folds punctuation (prose near-duplicates), and for code that made every comparison flip of a
    snippet (`x < lo` -> `x >= lo`, `x > hi` -> `x <= hi`) the 'duplicate' of the first: distinct bugs dropped under
    a wrong reason. code_bugs now compares exact text: both flips are written; the same snippet given twice is
    still a duplicate."""
    code = "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n"
    opts = CodeBugsOptions(mutations=["flip_comparison"])
    res = augment([Source("f.py:1", {"code": code}, "py")], "code_bugs", opts, None, Filters(), tmp_path / "a.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (res.written, res.dropped) == (2, {})
    assert [(r["meta"]["before"], r["meta"]["after"], r["meta"]["line"]) for r in rows] == [("<", ">=", 2),
                                                                                           (">", "<=", 4)]
    twice = [Source("f.py:1", {"code": code}, "py"), Source("g.py:1", {"code": code}, "py")]
    res = augment(twice, "code_bugs", opts, None, Filters(), tmp_path / "b.jsonl")
    assert (res.written, res.dropped) == (2, {"duplicate": 2})


def test_entity_types_match_whatever_their_case(tmp_path):
    """`options.types` written in lower case ([person, place]: the prompt asks the model for those) kept no entity:
    the reply's type was upper-cased and compared with the configured spelling, so every record was dropped ("no
    entity ... with a valid type") after every request. Types now compare case-insensitively and are written as
    configured; the default upper-case types read a lower-case reply as before."""
    from alignkit.augment.strategies import EntitiesOptions

    text = "Ada Lovelace met Babbage in London."
    reply = '[{"text": "Ada Lovelace", "type": "person"}, {"text": "London", "type": "Place"}, ' \
            '{"text": "Babbage", "type": "robot"}]'
    res = augment([Source("d.jsonl:1", {"text": text})], "entities", EntitiesOptions(types=["person", "place"]),
                  Stub([reply]), Filters(), tmp_path / "a.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (res.written, res.dropped) == (1, {})
    assert "(one of person, place)" in row["prompt"]
    assert json.loads(row["completion"]) == [{"text": "Ada Lovelace", "type": "person"},
                                             {"text": "London", "type": "place"}]
    augment([Source("d.jsonl:1", {"text": text})], "entities", EntitiesOptions(), Stub([reply]), Filters(),
            tmp_path / "b.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert json.loads(row["completion"]) == [{"text": "Ada Lovelace", "type": "PERSON"}]


def test_paraphrase_of_a_conversation_keeps_its_earlier_turns_and_answer(tmp_path):
    """A conversational row (TRL: prompt and completion lists of messages) was written as its rewritten last user
    turn alone ("Multiply that by three?" -> "12": the turns the answer follows were lost, exit 0), and a
    conversational completion (no user turn in it) dropped every row as "source text is empty". Now the last user
    turn is rewritten in place, the turns before it kept, and the answer kept whole; the file reads back as SFT."""
    from alignkit.data import SFTRecord, load_records

    prompt = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And times 3?"}]
    answer = [{"role": "assistant", "content": "12"}]
    sources = [Source("d.jsonl:1", {"prompt": prompt, "completion": answer}),
               Source("d.jsonl:2", {"prompt": prompt, "completion": "It is 12."})]
    res = augment(sources, "paraphrase", ParaphraseOptions(), Stub(["Multiply that by three?"] * 2), Filters(),
                  tmp_path / "out.jsonl")
    assert (res.written, res.dropped) == (2, {})
    rewritten = prompt[:2] + [{"role": "user", "content": "Multiply that by three?"}]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["meta"]["original"]) for r in rows] == [
        (rewritten, answer, "And times 3?"), (rewritten, "It is 12.", "And times 3?")]
    assert load_records(tmp_path / "out.jsonl", "sft") == [SFTRecord(rewritten, answer),
                                                           SFTRecord(rewritten, "It is 12.")]
    empty = [Source("d.jsonl:3", {"prompt": prompt, "completion": [{"role": "assistant", "content": " "}]}),
             Source("d.jsonl:4", {"prompt": "Hi there", "completion": "Hello"})]
    res = augment(empty, "paraphrase", ParaphraseOptions(), Stub(["Hello there"]), Filters(), tmp_path / "b.jsonl")
    assert (res.written, res.dropped) == (1, {"source text is empty": 1})


def test_an_empty_task_proposal_is_not_one_of_the_tasks_made(tmp_path):
    """instructions counted an empty proposal as one of `num` new tasks (ROUGE-L of nothing is 0, never too similar),
    asked the model to answer it, and the pipeline then dropped the record as 'prompt shorter than 1 characters': a
    run asked for 2 tasks wrote 1 while attempts were left. Now an empty proposal is dropped as such, not counted and
    not answered; the next attempt makes the second task (requests by hand: propose '', propose, answer, propose,
    answer)."""
    from alignkit.augment.strategies import InstructionsOptions

    seeds = [Source(f"s.jsonl:{i + 1}", {"prompt": p}) for i, p in enumerate(["Name a colour.", "Count to three."])]
    llm = Replies("1. ", "Write a haiku about rain.", "Rain taps on the roof.", "List three fruits.",
                  "Apple, pear, plum.")
    llm.name = "replies"
    res = augment(seeds, "instructions", InstructionsOptions(num=2, seeds_per_prompt=1), llm, Filters(),
                  tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in rows] == [("Write a haiku about rain.", "Rain taps on the roof."),
                                                             ("List three fruits.", "Apple, pear, plum.")]
    assert (res.written, res.candidates, res.dropped) == (2, 3, {"empty task from the model": 1})
    assert not llm.replies


def test_a_sharegpt_file_is_read_as_training_reads_it(tmp_path):
    """Augment read a table's rows as they were, so a ShareGPT file (`conversations` of {"from", "value"}) had no
    user turn to find: every row was dropped as "source text is empty" (instructions: "column ... is empty"), though
    training reads the same file. Now its rows are those training reads: `messages` of {"role", "content"}, and a
    setting naming ShareGPT's column is one line saying what it is read as."""
    import pytest

    from alignkit.augment.pipeline import read_sources
    from alignkit.augment.strategies import EntitiesOptions

    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Ada met Bob."},
                               {"from": "gpt", "value": "Nice."}]}]
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src,) = read_sources([str(tmp_path / "share.jsonl")])
    assert src.row == {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Ada met Bob."},
                                    {"role": "assistant", "content": "Nice."}]}
    res = augment([src], "entities", EntitiesOptions(field="messages"), Stub(['[{"text": "Ada", "type": "PERSON"}]']),
                  Filters(), tmp_path / "out.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (res.dropped, row["completion"]) == ({}, '[{"text": "Ada", "type": "PERSON"}]')
    assert row["prompt"].endswith("Text: Ada met Bob.")
    with pytest.raises(ValueError, match=r"share\.jsonl:1: no column 'conversations' \(options\.field\); the row has "
                                         r"\['messages'\] \(ShareGPT's 'conversations' column is read as 'messages'"):
        augment([src], "entities", EntitiesOptions(field="conversations"), Stub([]), Filters(), tmp_path / "o.jsonl")
