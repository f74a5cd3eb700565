"""Issue 11's rule: no module outside `alignkit.adapters` and `alignkit.interventions` tests an adapter's kind.

A kind test is a comparison (`==`, `!=`, `in`, `not in`) with a kind name or a part name ("full", "lora",
"reft", "reft+lora") as a string literal, e.g. `cfg.kind == "full"` or `"lora" in adapter.kind`, or a
`case "lora":` of a match statement. Such code
asks the adapter object instead (`adapter_of(model)`, `adapter_for(config)`, `adapter_in(folder)`)."""

from __future__ import annotations

import ast
from pathlib import Path

from alignkit.adapters.config import KINDS

SRC = Path(__file__).resolve().parents[2] / "src" / "alignkit"
ALLOWED = ("adapters", "interventions")  # the packages that own the kinds
WORDS = set(KINDS) | {part for info in KINDS.values() for part in info.parts}


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for elt in node.elts for s in _strings(elt)]
    return []


def kind_tests(source: str, filename: str) -> list[str]:
    """`file:line: code` of every comparison with a kind or part name in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.MatchValue) and set(_strings(node.value)) & WORDS:
            found.append(f"{filename}:{node.lineno}: case {ast.get_source_segment(source, node)}")
            continue
        if not isinstance(node, ast.Compare):
            continue
        if not all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        if any(s in WORDS for operand in [node.left, *node.comparators] for s in _strings(operand)):
            found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_checker_finds_kind_tests():
    code = ('if cfg.kind == "full": pass\nx = "lora" in a.kind\ny = kind in ("reft", "x")\n'
            'z = kind == "sft"\nw = a.kind != "reft+lora"\nmatch k:\n    case "sft": pass\n    case "reft": pass\n')
    assert [f.split(":")[1] for f in kind_tests(code, "m.py")] == ["1", "2", "3", "5", "8"]


def test_no_module_outside_adapters_and_interventions_tests_a_kind():
    files = [p for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).parts[0] not in ALLOWED]
    assert len(files) > 50  # the walk found the source tree
    found = [hit for p in files for hit in kind_tests(p.read_text(), str(p.relative_to(SRC.parent)))]
    assert not found, "adapter kind tested outside alignkit.adapters (ask the adapter object):\n" + "\n".join(found)
