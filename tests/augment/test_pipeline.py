"""The pipeline's filters, one reason each, with a stub model whose answers are set by hand."""

from __future__ import annotations

import json

from alignkit.augment.pipeline import Filters, augment
from alignkit.augment.strategies import ParaphraseOptions, Source


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
