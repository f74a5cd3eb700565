"""`alignkit.naming.code_digest` / `source_digest`: a stable digest of a callable's code, the same in every process
(a function with no source, made by exec, whose nested code objects' reprs hold addresses, included) and different
where the code or a partial's arguments differ."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from alignkit.data.tokenize_cache import function_fingerprint
from alignkit.naming import code_digest, source_digest

SRC = Path(__file__).resolve().parents[1] / "src"

# exec'd: no source, a nested code object (the list comprehension / the inner lambda) and a frozenset constant
BODY = ("def r(prompts, completions):\n"
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
