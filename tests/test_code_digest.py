"""`alignkit.naming.code_digest` / `source_digest`: a stable digest of a callable's code, the same in every process
(a function with no source, made by exec, whose nested code objects' reprs hold addresses, included) and different
where the code or a partial's arguments differ."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from alignkit.data.tokenize_cache import function_fingerprint
from alignkit.naming import code_digest, source_digest

SRC = Path(__file__).resolve().parents[1] / "src"

# exec'd: no source, a nested code object (the list comprehension / the inner lambda) and a frozenset constant
BODY = ("def r(prompts, completions):\n"
           "    SEEN.update((c, 1) for c in completions)\n"
        "    inner = lambda c: len(c) % {mod}\n"
        "    return [inner(c) for c in completions if c not in {{'a', 'b', 'c', 'd'}}]\n")


def _made(body: str):
    ns: dict = {}
    exec(body, ns)
    return ns["r"]


SCRIPT = f"""
import functools, sys
from alignkit.naming import source_digest
ns = {{}}
exec({BODY.format(mod=3)!r}, ns)
print(source_digest([ns["r"]]), source_digest([functools.partial(ns["r"], completions=["x"])]))
"""


def test_the_same_exec_made_function_has_the_same_digest_in_two_processes():
    outs = []
    for seed in ("1", "2"):  # two string hash seeds: a frozenset constant's order differs between them
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": seed}
        outs.append(subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                                   check=True).stdout.split())
    assert outs[0] == outs[1] and len(outs[0]) == 2
    here = _made(BODY.format(mod=3))
    assert outs[0] == [source_digest([here]), source_digest([functools.partial(here, completions=["x"])])]


def test_an_edited_body_changes_the_digest():
    assert source_digest([_made(BODY.format(mod=3))]) != source_digest([_made(BODY.format(mod=4))])
    assert code_digest(_made(BODY.format(mod=3))) == code_digest(_made(BODY.format(mod=3)))


def test_a_partial_sees_its_function_edited_and_its_arguments():
    old, new = _made(BODY.format(mod=3)), _made(BODY.format(mod=4))
    assert source_digest([functools.partial(old, completions=["x"])]) != \
        source_digest([functools.partial(new, completions=["x"])])
    assert source_digest([functools.partial(old, completions=["x"])]) != \
        source_digest([functools.partial(old, completions=["y"])])
    # the tokenization cache's key of a formatter follows the same digest
    assert function_fingerprint(functools.partial(old, completions=["x"])) != \
        function_fingerprint(functools.partial(new, completions=["x"]))


def test_bound_methods_and_callable_objects_by_their_code():
    ns_a: dict = {}
    ns_b: dict = {}
    exec("class S:\n    def __call__(self, c):\n        return 1\n    def m(self):\n        return 1\n", ns_a)
    exec("class S:\n    def __call__(self, c):\n        return 2\n    def m(self):\n        return 2\n", ns_b)
    a, b = ns_a["S"](), ns_b["S"]()
    assert code_digest(a) != code_digest(b) and code_digest(a.m) != code_digest(b.m)
    assert code_digest(a) == code_digest(ns_a["S"]())


def test_a_closure_value_is_part_of_the_digest():
    def make(k):
        return lambda c: len(c) * k
    assert code_digest(make(2)) != code_digest(make(3)) and code_digest(make(2)) == code_digest(make(2))


SET_SCRIPT = """
from alignkit.naming import code_digest
def make():
    stop = {"the", "a", "an", "of", "and", "to"}
    def f(x):
        return x in stop
    return f
def g(x, words=frozenset({"x", "y", "z", "w"})):
    return x in words
print(code_digest(make()), code_digest(g))
"""


def test_a_set_in_a_closure_or_a_default_has_the_same_digest_in_two_processes():
    """A set held in a closure cell or a default argument was hashed through repr(), whose order follows the hash
    seed: every process gave another digest (every online resume warned "edited"; every tokenize run missed its
    cache for such a formatter). Now its items are written sorted. Fails without the fix: yes (seeds 1 and 2 differ)."""
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": seed}
        outs.append(subprocess.run([sys.executable, "-c", SET_SCRIPT], env=env, capture_output=True, text=True,
                                   check=True).stdout.split())
    assert outs[0] == outs[1] and len(outs[0]) == 2


# a reward function and the module-level helpers it calls, as a user's rewards.py holds them
HELPERS = ("import math, re\n"
           "WORDS = frozenset({{'good', 'fine', 'great'}})\n"
           "SEEN = {{}}\n"
           "PATTERN = re.compile(r'\\d+')\n"
           "UNRELATED = {unrelated}\n"
           "def _score(c):\n"
           "    return {score} + len(PATTERN.findall(c)) + sum(w in c for w in WORDS) + math.floor(_even(len(c)))\n"
           "def _even(n):\n"
           "    return n == 0 or _odd(n - 1)\n"
           "def _odd(n):\n"
           "    return n != 0 and _even(n - 1)\n"
           "def r(prompts, completions):\n"
           "    SEEN.update((c, 1) for c in completions)\n"
           "    return [_score(c) * 2 for c in completions]\n")


def _module(score: str = "len(c)", unrelated: int = 1, **consts: str) -> dict:
    ns: dict = {"__name__": "rewards_under_test"}
    exec(HELPERS.format(score=score, unrelated=unrelated, **consts), ns)
    return ns


def test_an_edited_helper_changes_the_digest_an_unrelated_global_does_not():
    """`def r(c): return _score(c) * 2` with `_score` edited between runs had the same digest (a resume warned of
    nothing; a formatter calling a helper read a stale tokenize cache): the digest covered `r`'s own code only.
    Now the module-level names it reads are in it, helpers recursively (`_even` / `_odd` call each other: the walk
    ends). Fails without the fix: yes (the first inequality)."""
    base = code_digest(_module()["r"])
    assert code_digest(_module(score="len(c) + 1")["r"]) != base  # the helper r calls, edited
    assert code_digest(_module(unrelated=2)["r"]) == base  # a global r never reads
    edited_deep = _module()
    exec("def _odd(n):\n    return n != 1 and _even(n - 1)\n", edited_deep)  # two calls down, in a cycle
    assert code_digest(edited_deep["r"]) != base
    constant = _module()
    constant["WORDS"] = frozenset({"good", "fine"})  # a constant the helper reads
    assert code_digest(constant["r"]) != base
    filled = _module()
    filled["r"]([], ["a 1 good", "b"])  # a module-level cache r fills as it runs: state, not code
    assert filled["SEEN"] and code_digest(filled["r"]) == base
    # the tokenization cache keys a formatter by the same digest
    assert function_fingerprint(_module(score="len(c) + 1")["r"]) != function_fingerprint(_module()["r"])


STATEFUL = {
    "counter": "N = 0\ndef r(c):\n    global N\n    N += 1\n    return [1.0] * len(c)\n",
    "lazy": ("_clf = None\ndef r(c):\n    global _clf\n    if _clf is None:\n        _clf = object()\n"
             "    return [1.0] * len(c)\n"),
    # written by a function the digest never walks (r does not call setup), and deleted by another one
    "elsewhere": ("LIMIT = 3\nOLD = 1\ndef setup():\n    global LIMIT\n    LIMIT = 5\nclass Reset:\n"
                  "    @staticmethod\n    def drop():\n        global OLD\n        del OLD\n"
                  "def r(c):\n    return [float(LIMIT) + ('OLD' in globals())] * len(c)\n"),
}


@pytest.mark.parametrize("registered", [False, True], ids=["exec", "imported"])
@pytest.mark.parametrize("case", sorted(STATEFUL))
def test_a_global_a_function_of_the_module_writes_is_state_not_code(case, registered, monkeypatch):
    """A module-level counter (`global N; N += 1`) or a lazily loaded model (`_clf = None`, then an object) changed
    the digest at the first call: a checkpoint records it after scoring and a resume recomputes it before any call,
    so every resume warned "edited" of unchanged code. Names any function of the module writes (or deletes) are left
    out, the writer walked or not; a constant nobody writes is still in (the edited-constant case above). Fails
    without the fix: yes (counter, lazy and elsewhere differ after the call)."""
    module = types.ModuleType(f"stateful_{case}")
    if registered:  # an imported module: its scan is memoized
        monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(STATEFUL[case], module.__dict__)
    before = code_digest(module.r)
    module.r(["x"])
    if case == "elsewhere":
        module.setup()
        module.Reset.drop()
        assert module.LIMIT == 5 and not hasattr(module, "OLD")
    assert code_digest(module.r) == before
    edited = types.ModuleType(module.__name__)
    exec(STATEFUL[case].replace("[1.0]", "[2.0]").replace("[float(LIMIT)", "[float(LIMIT) * 2"), edited.__dict__)
    assert code_digest(edited.r) != before  # its own code edited: still seen


HELPER_SCRIPT = f"""
from alignkit.naming import code_digest
ns = {{"__name__": "rewards_under_test"}}
exec({HELPERS.format(score="len(c)", unrelated=1)!r}, ns)
print(code_digest(ns["r"]))
"""


def test_a_digest_with_helpers_is_the_same_in_two_processes():
    """The helpers' walk (a set constant, a cycle of helpers) gives one digest under two string hash seeds."""
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": seed}
        outs.append(subprocess.run([sys.executable, "-c", HELPER_SCRIPT], env=env, capture_output=True, text=True,
                                   check=True).stdout.split())
    assert outs[0] == outs[1] == [code_digest(_module()["r"])]


def test_a_callable_objects_methods_see_their_helpers():
    src = "def _h(c):\n    return {k}\nclass S:\n    def __call__(self, c):\n        return _h(c)\n"
    a, b = ({"__name__": "m"}, {"__name__": "m"})
    exec(src.format(k=1), a)
    exec(src.format(k=2), b)
    assert code_digest(a["S"]()) != code_digest(b["S"]())
    assert code_digest(a["S"]()) == code_digest(a["S"]())


def test_builtins_are_keyed_by_their_names():
    """Every builtin / C function had one digest (no source, no code: the digest of its type), so
    `partial(reward, agg=max)` -> `agg=min` was not seen. Fails without the fix: yes."""
    import math

    assert code_digest(len) != code_digest(abs)
    assert code_digest(math.floor) != code_digest(math.ceil) != code_digest(len)
    assert code_digest([].append) != code_digest([].pop)
    assert code_digest(len) == code_digest(len)
    assert code_digest(functools.partial(sorted, key=len)) != code_digest(functools.partial(sorted, key=abs))


def test_version_1_is_the_digest_before_helpers():
    """What checkpoints recorded before (no version): an edited helper does not change it, so a resume compares
    an old checkpoint's value with this one's version-1 digest, not with the new one (which always differs)."""
    assert code_digest(_module()["r"], 1) == code_digest(_module(score="len(c) + 1")["r"], 1)
    assert code_digest(_module()["r"], 1) != code_digest(_module()["r"])
    assert code_digest(len, 1) == code_digest(abs, 1)


def _pinned_reward(prompts, completions, scale=2):
    return [len(c) * scale + _pinned_helper(c) for c in completions]


def _pinned_helper(c):
    return c.count(" ")


def test_version_1_is_the_value_the_previous_alignkit_recorded():
    """Checkpoints without annotator_code_version hold the previous alignkit's code_digest, which a resume compares
    with version 1: a drift of version 1 would make every such resume warn "edited". The hex values were computed by
    the previous code (f6648b7's naming.code_digest, no version argument) on these functions' source, not by this
    one."""
    assert code_digest(_pinned_reward, 1) == "5c891a2c5efb1cc4b027104b73854c493070cb4fdf45d9c0dec2d7f10f641f44"
    assert code_digest(functools.partial(_pinned_reward, scale=3), 1) == (
        "8b216ed0868ac53db49ee526708508759864eb00336c7bec98c8f8e9bc4fd124")
    assert code_digest(len, 1) == "b952292a7b7ee73fa1d47e58a8895169644d62dffdc043ca938de9d42617aee9"


FORMATTER_FILE = ('LIMIT = 3\n\n\ndef _clip(text):\n    return text[:LIMIT]\n\n\n'
                  'def my_formatter(record):\n    return {"prompt": _clip(record["q"]), "completion": record["a"]}\n')


def test_a_file_backed_formatters_key_is_the_one_before_version_2(tmp_path, monkeypatch):
    """The tokenize cache keys a formatter by its module file's bytes and its code_digest; version 2's walk of its
    helpers' source (already in the file) made the built-in formatters' key 50-200x slower (1.3 ms -> 20-300 ms a
    key) and changed every file-backed formatter's key. A function of a module with a file is digested by version 1:
    the key is the one the previous code gave (hex computed by f6648b7's function_fingerprint on this file, module
    revfix_fmt_mod), and an edited helper still changes it (the file). Fails without the fix: yes (8737d612...)."""
    import importlib

    (tmp_path / "revfix_fmt_mod.py").write_text(FORMATTER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "revfix_fmt_mod", raising=False)
    mod = importlib.import_module("revfix_fmt_mod")
    try:
        assert function_fingerprint(mod.my_formatter) == (
            "32f14c2c26c3d4752ab834617daf8bc6a2dafc89c437905cb928d8678940e159")
        (tmp_path / "revfix_fmt_mod.py").write_text(FORMATTER_FILE.replace("text[:LIMIT]", "text[:LIMIT + 1]"))
        assert function_fingerprint(mod.my_formatter) != "32f14c2c26c3d4752ab834617daf8bc6a2dafc89c437905cb928d8678940e159"
    finally:
        sys.modules.pop("revfix_fmt_mod", None)
