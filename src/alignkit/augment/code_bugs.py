"""Code bugging: break working Python on purpose, then ask for the fix (the original is the answer).

Each mutation is found on the AST and applied as a minimal edit of the source text (the node's exact
span), so the buggy snippet differs from the original only at the bug: formatting and comments stay as
written, and the answer is the original byte for byte. A mutant that no longer parses, or equals the
original, is dropped. Everything is deterministic: sites are taken in source order.

Mutations (site: edit):
- `flip_comparison`: each comparison operator: `<`->`>=`, `<=`->`>`, `==`->`!=`, `in`->`not in`, `is`->`is not`
  (and back)
- `off_by_one`: an int literal in `range(...)`, an index or slice, a comparison, or beside `+`/`-`: `n` -> `n + 1`
  (written as the number)
- `wrong_variable`: a read of a function's local variable or parameter: the next other local name, alphabetically
  (wrapping)
- `removed_return`: `return <value>`: `<value>` (computed, never returned)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, Iterator

FLIPS = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "==", "in": "not in", "not in": "in",
         "is": "is not", "is not": "is"}
_OP_RE = re.compile(r"not\s+in|is\s+not|<=|>=|==|!=|<|>|\bin\b|\bis\b")


@dataclass(frozen=True)
class Mutant:
    mutation: str  # the mutation's name
    source: str  # the buggy source
    line: int  # 1-based line of the edit in the original
    before: str  # the original text at the edit
    after: str  # what replaced it


class _Text:
    """Offsets into a source string from AST (line, col) positions; AST columns are UTF-8 byte offsets."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, line: int, col: int) -> int:
        text = self.lines[line - 1] if line - 1 < len(self.lines) else ""
        return self.starts[line - 1] + len(text.encode("utf-8")[:col].decode("utf-8", errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def edit(self, start: int, end: int, new: str) -> str:
        return self.source[:start] + new + self.source[end:]


def _comment_free(segment: str) -> bool:
    return "#" not in segment and '"' not in segment and "'" not in segment


def flip_comparison(tree: ast.AST, text: _Text) -> Iterator[tuple[int, int, str, int]]:
    """Sites: the operator between each pair of compared operands."""
    for node in _walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for left, right in zip(operands, operands[1:]):
            start, end = text.span(left)[1], text.span(right)[0]
            segment = text.source[start:end]
            match = _OP_RE.search(segment)
            if match is None or not _comment_free(segment):
                continue
            op = " ".join(match.group(0).split())
            yield start + match.start(), start + match.end(), FLIPS[op], node.lineno


def off_by_one(tree: ast.AST, text: _Text) -> Iterator[tuple[int, int, str, int]]:
    """Sites: int literals where an off-by-one bug lives (range arguments, indices and slices, comparisons,
    `+`/`-` operands)."""
    contexts: list[ast.AST] = []
    for node in _walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
            contexts += node.args
        elif isinstance(node, ast.Subscript):
            contexts.append(node.slice)
        elif isinstance(node, ast.Compare):
            contexts += [node.left, *node.comparators]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            contexts += [node.left, node.right]
    seen = set()
    for ctx in contexts:
        for node in _walk(ctx):
            if isinstance(node, ast.Constant) and type(node.value) is int and id(node) not in seen:
                seen.add(id(node))
                start, end = text.span(node)
                if text.source[start:end].isdigit():  # a plain decimal literal (not 0x10, 1_000)
                    yield start, end, str(node.value + 1), node.lineno


def wrong_variable(tree: ast.AST, text: _Text) -> Iterator[tuple[int, int, str, int]]:
    """Sites: each read of a local variable (a parameter or a name assigned in the same function), replaced by
    the next other local name in alphabetical order."""
    for fn in _walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = fn.args
        names = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
        names |= {p.arg for p in (a.vararg, a.kwarg) if p is not None}
        for node in _walk_body(fn):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
        ordered = sorted(names)
        if len(ordered) < 2:
            continue
        for node in _walk_body(fn):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names:
                other = ordered[(ordered.index(node.id) + 1) % len(ordered)]
                start, end = text.span(node)
                yield start, end, other, node.lineno


def removed_return(tree: ast.AST, text: _Text) -> Iterator[tuple[int, int, str, int]]:
    """Sites: `return <value>` statements; the value stays as an expression statement."""
    for node in _walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            start, end = text.span(node)
            value_start, value_end = text.span(node.value)
            yield start, end, text.source[value_start:value_end], node.lineno


MUTATIONS: dict[str, Callable[[ast.AST, _Text], Iterator[tuple[int, int, str, int]]]] = {
    "flip_comparison": flip_comparison, "off_by_one": off_by_one, "wrong_variable": wrong_variable,
    "removed_return": removed_return}


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` in source order (depth first, children by position)."""
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk(child)


def _walk_body(fn: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function's own body, not those of functions or classes nested in it."""
    for stmt in fn.body:
        stack = [stmt]
        while stack:
            node = stack.pop(0)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            yield node
            stack[:0] = list(ast.iter_child_nodes(node))


def mutants(source: str, mutations: list[str] | None = None) -> list[Mutant]:
    """Every single-edit mutant of `source` for each mutation in `mutations` (default: all), in source order.

    Raises `SyntaxError` if `source` is not valid Python."""
    tree = ast.parse(source)
    text = _Text(source)
    out: list[Mutant] = []
    seen = {source}
    for name in mutations or list(MUTATIONS):
        if name not in MUTATIONS:
            raise ValueError(f"unknown mutation {name!r}; valid: {', '.join(MUTATIONS)}")
        for start, end, new, line in MUTATIONS[name](tree, text):
            buggy = text.edit(start, end, new)
            if buggy in seen or not _parses(buggy):
                continue
            seen.add(buggy)
            out.append(Mutant(name, buggy, line, source[start:end], new))
    return out


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def split_functions(source: str) -> list[tuple[str, int]]:
    """(source, first line) of each top-level function and class of a module, decorators and comments inside
    included; a module without any is one snippet."""
    tree = ast.parse(source)
    text = _Text(source)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            start, end = text.offset(first, 0), text.span(node)[1]
            out.append((source[start:end] + "\n", first))
    return out or [(source, 1)]


__all__ = ["FLIPS", "MUTATIONS", "Mutant", "mutants", "split_functions"]
