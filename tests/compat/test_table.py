"""The table "Where alignkit leans on other libraries' internals" in docs/architecture.md and tests/compat/ stay
in step: every guard the table names exists, and every compatibility test is named by a row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).parent
DOC = HERE.parents[1] / "docs" / "architecture.md"
TITLE = "## Where alignkit leans on other libraries' internals"


def table_rows() -> dict[str, str]:
    text = DOC.read_text()
    assert TITLE in text, f"{DOC}: section {TITLE!r} is missing"
    section = text.split(TITLE, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[A-Z]\d+", cells[0]):
            rows[cells[0]] = cells[4]
    return rows


def compat_tests() -> set[str]:
    out = set()
    for f in HERE.glob("test_*.py"):
        if f.name == Path(__file__).name:
            continue
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.add(f"{f.name}::{node.name}")
    return out


def test_every_row_names_existing_guards_and_every_guard_has_a_row():
    rows = table_rows()
    assert len(rows) >= 30, f"{DOC}: only {len(rows)} table rows parsed"
    named = {ref for guard in rows.values() for ref in re.findall(r"test_\w+\.py::test_\w+", guard)}
    tests = compat_tests()
    without = sorted(k for k, g in rows.items() if not re.search(r"test_\w+\.py::test_\w+", g))
    assert not without, f"rows without a guard test: {without}"
    assert not named - tests, f"the table names tests that do not exist in tests/compat: {sorted(named - tests)}"
    assert not tests - named, f"tests/compat tests no row of the table names: {sorted(tests - named)}"
