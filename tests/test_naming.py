"""`alignkit.naming`: names of Python objects that are the same in every process (no memory address) and differ
where the settings differ. Expected strings are written out by hand."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from alignkit.naming import stable_name, stable_repr

HERE = __name__


def score(prompt, response, scale=1.0, words=()):
    return 0.0


class Scorer:
    def __init__(self, threshold):
        self.threshold, self._cache = threshold, {}

    def __call__(self, prompt, response):
        return 0.0


@dataclass
class Rule:
    word: str
    bonus: float = 1.0


def test_functions_classes_and_methods_by_module_and_qualname():
    assert stable_name(score) == f"{HERE}:score"
    assert stable_name(Scorer) == f"{HERE}:Scorer"
    assert stable_name(Scorer.__call__) == f"{HERE}:Scorer.__call__"
    assert stable_name("pkg.mod:fn") == "pkg.mod:fn"
    assert stable_name(Path("/a/b")) == "/a/b"


def test_a_partial_by_its_function_and_arguments():
    assert stable_name(functools.partial(score, scale=2)) == f"{HERE}:score(scale=2)"
    assert stable_name(functools.partial(score, "p", words=["a", "b"])) == f"{HERE}:score('p', words=['a', 'b'])"
    inner = functools.partial(functools.partial(score, scale=2), words=(score,))
    assert stable_name(inner) == f"{HERE}:score(scale=2, words=({HERE}:score,))"


def test_objects_by_their_type_and_settings_never_an_address():
    assert stable_name(Scorer(0.5)) == f"{HERE}:Scorer(threshold=0.5)"  # _cache is private: left out
    assert stable_name(Rule("yes")) == f"{HERE}:Rule(word='yes', bonus=1.0)"
    assert stable_name(object()) == "<builtins:object>"
    for value in (Scorer(0.5), functools.partial(score, scale=Scorer(1)), object(), [score, Scorer(2)]):
        assert " at 0x" not in stable_repr(value), stable_repr(value)
    assert stable_name(Scorer(0.5)) != stable_name(Scorer(0.6))
    assert stable_repr({"k": [1, 2.5, None]}) == "{'k': [1, 2.5, None]}"
