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


class Scaled:
    """Its setting kept private (`self._scale`), beside state that changes as it is used (`_calls`, `_cache`)."""

    def __init__(self, threshold, scale=1.0):
        self.threshold, self._scale, self._calls, self._cache = threshold, scale, 0, {}

    def __call__(self, prompt, response):
        self._calls += 1
        return 0.0


def test_private_settings_named_after_an_init_parameter_are_part_of_the_name():
    """`Scaled(0.5, scale=1)` and `Scaled(0.5, scale=2)` were both `Scaled(threshold=0.5)`: one name for two reward
    functions (a resume with another scale was not refused). A private attribute named after an __init__ parameter
    is named now; state that is not (a call counter, a cache) still is not, so using the object keeps its name."""
    one, two = Scaled(0.5, scale=1), Scaled(0.5, scale=2)
    assert stable_name(one) == f"{HERE}:Scaled(_scale=1, threshold=0.5)"
    assert stable_name(two) == f"{HERE}:Scaled(_scale=2, threshold=0.5)"
    one("p", "r")
    assert stable_name(one) == stable_name(Scaled(0.5, scale=1))  # _calls / _cache left out
    from alignkit.trainers.checks import settings_changes

    recorded = {"reward_funcs": [stable_name(one)]}  # as a checkpoint records it (JSON, default=stable_name)
    assert settings_changes(recorded, {"reward_funcs": [two]}) == [
        f"reward_funcs: ['{HERE}:Scaled(_scale=1, threshold=0.5)'] -> ['{HERE}:Scaled(_scale=2, threshold=0.5)']"]
    assert settings_changes(recorded, {"reward_funcs": [Scaled(0.5, scale=1)]}) == []


class Tokenizes:
    """A reward function holding a tokenizer (an object) and a plain setting, both private, both __init__ parameters."""

    def __init__(self, tokenizer, max_len, words=("a",)):
        self._tokenizer, self._max_len, self._words = tokenizer, max_len, {"w": list(words)}


class Vocab:
    def __init__(self, folder):
        self.folder = folder

    def __repr__(self):
        return f"Vocab(name_or_path='{self.folder}', vocab_size=32000, ...)"


def test_a_private_object_setting_stays_out_of_the_name_and_a_plain_one_enters_it():
    """`self._tokenizer = tokenizer` put the tokenizer's repr (its absolute folder) into the name: the same reward
    function with its tokenizer copied elsewhere refused a valid resume. A private attribute named after an __init__
    parameter enters the name only when it holds a plain value (number, str, bool, None, containers of them)."""
    here, moved = Tokenizes(Vocab("/data/tok"), 10), Tokenizes(Vocab("/elsewhere/tok"), 10)
    assert stable_name(here) == stable_name(moved) == f"{HERE}:Tokenizes(_max_len=10, _words={{'w': ['a']}})"
    assert stable_name(Tokenizes(Vocab("/data/tok"), 11)) == f"{HERE}:Tokenizes(_max_len=11, _words={{'w': ['a']}})"
    assert stable_name(Tokenizes(None, 10, words=("a", "b"))) == (
        f"{HERE}:Tokenizes(_max_len=10, _tokenizer=None, _words={{'w': ['a', 'b']}})")
