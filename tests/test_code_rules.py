"""House rules on the shape of the code under src/ (docs/architecture.md, "Dependency direction and imports"): no
function or method of 70 lines or more (split it into pieces with one job each), no line over 120 characters (wrap
it), no module over 600 lines (split the module). Each test fails naming every file:line (and function) that breaks
its rule."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 69  # a function reaching 70 lines breaks the rule
MAX_LINE_CHARS = 120
MAX_MODULE_LINES = 600


def sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} Python files under {SRC}: the rules would check nothing"
    return files


def long_functions(text: str) -> list[tuple[int, str, int]]:
    """(line, name, length in lines from `def` to its last line) of each function of `text` past the limit."""
    return [(n.lineno, n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def long_lines(text: str) -> list[tuple[int, int]]:
    """(line, characters) of each line of `text` over the limit."""
    return [(i, len(line)) for i, line in enumerate(text.splitlines(), 1) if len(line) > MAX_LINE_CHARS]


def test_the_checks_find_what_they_look_for():
    """The checkers themselves, on hand-made text: a 70-line function is found (69 is not), a nested one by its own
    length, a 121-character line is found (120 is not)."""
    def func(name: str, body_lines: int, indent: str = "") -> str:
        return f"{indent}def {name}():\n" + "".join(f"{indent}    x = {i}\n" for i in range(body_lines))

    assert long_functions(func("ok", 68)) == []  # def + 68 lines: 69
    assert long_functions(func("big", 69)) == [(1, "big", 70)]
    nested = "class C:\n" + func("method", 69, "    ")
    assert long_functions(nested) == [(2, "method", 70)]
    assert long_lines("a" * 120 + "\n" + "b" * 121 + "\n") == [(2, 121)]


def test_no_function_reaches_70_lines():
    bad = [f"{p.relative_to(SRC)}:{line} {name} ({n} lines)"
           for p in sources() for line, name, n in long_functions(p.read_text())]
    assert not bad, (f"{len(bad)} function(s) of 70 lines or more (house rule: split each into well-named pieces "
                     f"with one job each): " + "; ".join(bad))


def test_no_line_over_120_characters():
    bad = [f"{p.relative_to(SRC)}:{line} ({n} characters)" for p in sources() for line, n in long_lines(p.read_text())]
    assert not bad, (f"{len(bad)} line(s) over {MAX_LINE_CHARS} characters (house rule: wrap them): "
                     + "; ".join(bad))


def test_no_module_over_600_lines():
    bad = [f"{p.relative_to(SRC)} ({n} lines)" for p in sources()
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not bad, (f"{len(bad)} module(s) over {MAX_MODULE_LINES} lines (house rule: split the module): "
                     + "; ".join(bad))
