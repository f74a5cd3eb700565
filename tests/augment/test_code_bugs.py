"""code_bugs, mutation by mutation: every expected buggy snippet is written out by hand."""

from __future__ import annotations

import pytest

from alignkit.augment.code_bugs import mutants, split_functions
from alignkit.augment.strategies import CodeBugsOptions, Context, Source, code_bugs


def sources_of(mutation: str, code: str) -> list[str]:
    return [m.source for m in mutants(code, [mutation])]


def test_flip_comparison_each_operator_and_chain():
    code = "def f(a, b, xs):\n    return a < b and a not in xs and 0 <= a < 9\n"
    assert sources_of("flip_comparison", code) == [
        "def f(a, b, xs):\n    return a >= b and a not in xs and 0 <= a < 9\n",
        "def f(a, b, xs):\n    return a < b and a in xs and 0 <= a < 9\n",
        "def f(a, b, xs):\n    return a < b and a not in xs and 0 > a < 9\n",
        "def f(a, b, xs):\n    return a < b and a not in xs and 0 <= a >= 9\n",
    ]


def test_flip_comparison_is_and_parenthesised_operands_keep_their_text():
    code = "def g(x):\n    if (x) is None:  # nothing to do\n        return 0\n    return x\n"
    assert sources_of("flip_comparison", code) == [
        "def g(x):\n    if (x) is not None:  # nothing to do\n        return 0\n    return x\n"]


def test_off_by_one_literals_in_ranges_indices_comparisons_and_sums():
    code = ("def last_pairs(xs, n):\n"
            "    out = []\n"
            "    for i in range(1, len(xs)):\n"
            "        if i > 2:\n"
            "            out.append(xs[i - 1] * 10)\n"
            "    return out\n")
    assert sources_of("off_by_one", code) == [
        code.replace("range(1,", "range(2,"),
        code.replace("i > 2", "i > 3"),
        code.replace("xs[i - 1]", "xs[i - 2]"),
    ]  # the 10 of `* 10` is no off-by-one site


def test_wrong_variable_uses_the_next_local_name_alphabetically():
    code = "def add(a, b):\n    return a + b\n"
    assert sources_of("wrong_variable", code) == ["def add(a, b):\n    return b + b\n",
                                                  "def add(a, b):\n    return a + a\n"]


def test_wrong_variable_leaves_globals_builtins_and_nested_scopes_alone():
    code = ("def outer(items):\n"
            "    total = len(items)\n"
            "    def inner(k):\n"
            "        return k\n"
            "    return total\n")
    # variables of outer: items (parameter), total (assigned) -- a nested def is no variable to swap in; reads:
    # items (line 2) -> total, total (line 5) -> items (wrapping); `len` is a builtin and `k` belongs to inner
    # (its only local: nothing to swap with)
    assert sources_of("wrong_variable", code) == [
        code.replace("len(items)", "len(total)"),
        code.replace("    return total\n", "    return items\n"),
    ]


def test_removed_return_keeps_the_value_as_a_statement():
    code = "def square(x):\n    y = x * x\n    return y\n\n\ndef nothing():\n    return\n"
    assert sources_of("removed_return", code) == ["def square(x):\n    y = x * x\n    y\n\n\ndef nothing():\n    return\n"]


def test_mutants_that_equal_the_original_or_repeat_are_dropped():
    code = "def same(a, b):\n    return a == a\n"  # wrong_variable a -> b twice gives two distinct mutants
    assert sources_of("wrong_variable", code) == ["def same(a, b):\n    return b == a\n",
                                                  "def same(a, b):\n    return a == b\n"]
    assert mutants("def one(x):\n    return x\n", ["wrong_variable"]) == []  # a single local: no other name


def test_split_functions_keeps_decorators_and_first_lines():
    module = "import os\n\n@staticmethod\ndef a(x):\n    return x\n\n\nclass B:\n    pass\n"
    assert split_functions(module) == [("@staticmethod\ndef a(x):\n    return x\n", 3), ("class B:\n    pass\n", 8)]
    assert split_functions("x = 1\n") == [("x = 1\n", 1)]


def test_records_sft_and_preference_with_provenance():
    code = "def lt(a, b):\n    return a < b\n"
    src = [Source("snippets.py:1", {"code": code})]
    sft = list(code_bugs(src, Context(None), CodeBugsOptions(mutations=["flip_comparison"])))
    assert len(sft) == 1 and sft[0].source == "snippets.py:1"
    assert sft[0].record == {
        "prompt": "The following Python code has a bug. Find it and fix it.\n\n```python\n"
                  "def lt(a, b):\n    return a >= b\n```",
        "completion": "```python\ndef lt(a, b):\n    return a < b\n```"}
    assert sft[0].extra == {"mutation": "flip_comparison", "line": 2, "before": "<", "after": ">="}
    pref = list(code_bugs(src, Context(None), CodeBugsOptions(mutations=["flip_comparison"], output="preference")))
    assert pref[0].record["chosen"] == sft[0].record["completion"]
    assert pref[0].record["rejected"] == "```python\ndef lt(a, b):\n    return a >= b\n```"


def test_per_snippet_sampling_is_deterministic_and_bad_source_is_counted():
    code = "def f(a, b, c):\n    return a + b + c < 3\n"
    opt = CodeBugsOptions(per_snippet=2)
    first = [c.record for c in code_bugs([Source("s:1", {"code": code})], Context(None, seed=5), opt)]
    again = [c.record for c in code_bugs([Source("s:1", {"code": code})], Context(None, seed=5), opt)]
    assert len(first) == 2 and first == again
    broken = list(code_bugs([Source("s:9", {"code": "def (:\n"})], Context(None), CodeBugsOptions()))
    assert len(broken) == 1 and broken[0].drop.startswith("source is not valid Python")


def test_unknown_mutation_named():
    with pytest.raises(ValueError, match="mutations: unknown \\['swap_args'\\]"):
        CodeBugsOptions(mutations=["swap_args"])


def test_per_snippet_takes_each_mutation_kind_in_turn():
    code = "def f(a, b):\n    if a < b:\n        return a + 1\n    return b\n"  # 1 flip, 1 literal, 3 reads, 2 returns
    picked = list(code_bugs([Source("s:1", {"code": code})], Context(None), CodeBugsOptions(per_snippet=4)))
    assert sorted(c.extra["mutation"] for c in picked) == ["flip_comparison", "off_by_one", "removed_return",
                                                           "wrong_variable"]


def test_no_mutation_kind_and_no_mutant_per_snippet_are_refused():
    # mutations: [] fell through to mutants()' default and made every kind of bug (20 records on the bundled file)
    with pytest.raises(ValueError, match="mutations: empty, so no bug would be made"):
        CodeBugsOptions(mutations=[])
    with pytest.raises(ValueError, match="per_snippet: 0; it must be an integer >= 1"):
        CodeBugsOptions(per_snippet=0)
    assert CodeBugsOptions(mutations=["off_by_one"], per_snippet=None).per_snippet is None
