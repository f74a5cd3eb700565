"""`serve/parsing.py:READ_FIELDS`, the request fields `alignkit serve` reads (any other field that is neither refused
nor known to change nothing is warned about as ignored), checked against the code that reads them: every key read
from a request body in serve/parsing.py and serve/api.py (`body.get("k")`, `body["k"]`, `_num(body, "k", ...)`, a
loop over a tuple of keys) is listed, and every listed one is read. A field read but not listed was warned about as
ignored while it was used; a field listed but never read was accepted silently and ignored."""

from __future__ import annotations

import ast
from pathlib import Path

import alignkit.serve as serve
from alignkit.serve.parsing import IGNORED_UNLESS_NEUTRAL, NOT_SUPPORTED, READ_FIELDS

BODY = "body"  # the name every reader gives the request's JSON object


def keys_read(tree: ast.AST) -> set[str]:
    """String keys read from `body`: subscripts, .get, `_num(body, key)`, and `for k in ("a", "b")` loops whose
    body reads `body.get(k)` / `body[k]`."""
    def is_body(n):
        return isinstance(n, ast.Name) and n.id == BODY

    def key_of(n):  # the key a node reads from body: a constant, or a name (a loop variable)
        if isinstance(n, ast.Subscript) and is_body(n.value):
            return n.slice
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" \
                and is_body(n.func.value) and n.args:
            return n.args[0]
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_num" and is_body(n.args[0]):
            return n.args[1]
        return None

    out: set[str] = set()
    for node in ast.walk(tree):
        k = key_of(node)
        if isinstance(k, ast.Constant) and isinstance(k.value, str):
            out.add(k.value)
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            names = {kk.id for sub in node.body for n in ast.walk(sub) if isinstance(kk := key_of(n), ast.Name)}
            if node.target.id in names:
                out |= {e.value for e in node.iter.elts if isinstance(e, ast.Constant)}
    return out


def test_read_fields_are_the_fields_the_server_reads():
    folder = Path(serve.__file__).parent
    read = set()
    for name in ("parsing.py", "api.py"):
        read |= keys_read(ast.parse((folder / name).read_text()))
    # the prompt inputs: each endpoint's own (unread_fields knows the other's as unread)
    read -= {"messages", "prompt"}
    assert read - READ_FIELDS == set(), "read but not in READ_FIELDS (warned about as ignored while used)"
    assert READ_FIELDS - read == set(), "in READ_FIELDS but never read (accepted and silently ignored)"
    assert not READ_FIELDS & (IGNORED_UNLESS_NEUTRAL.keys() | NOT_SUPPORTED.keys())


def test_the_reader_finds_each_way_a_key_is_read():
    src = ('def f(body):\n    a = body.get("x"); b = body["y"]; c = _num(body, "z", 1, int)\n'
           '    for key in ("u", "v"):\n        body.get(key)\n    for key in ("w",):\n        other.get(key)\n')
    assert keys_read(ast.parse(src)) == {"x", "y", "z", "u", "v"}
