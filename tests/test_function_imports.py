"""Imports belong at the top of a module. A function-level import is allowed only for an optional dependency
(OPTIONAL, any module) or as a deliberate lazy import listed in ALLOWED with its reason: the torch-free start-up
(`alignkit --help` and `alignkit <command> --help` under a second, settings importable without torch), a
command's work loaded only when it runs, or a torch build that may lack a part. An import cycle is not a
reason: restructure the modules instead (issue 11). A new function-level import fails this test, naming
file:line and what to do."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "alignkit"

# module prefix -> why it is imported only where it is used (optional: not a dependency of alignkit itself)
OPTIONAL = {
    "vllm": "the vLLM backend (`generation_backend: vllm`, `serve --engine vllm`); runs in vLLM's own environment",
    "deepspeed": "DeepSpeed ZeRO under `accelerate launch`; an optional install",
    "liger_kernel": "`model.kernels: liger`; an optional install",
    "matplotlib": "plots (the `cli` extra); the library never needs it",
    "torch.utils.tensorboard": "TensorBoard logs (the `cli` extra: tensorboard)",
    "fastapi": "`alignkit serve`'s HTTP server (the `serve` extra)",
    "uvicorn": "`alignkit serve`'s HTTP server (the `serve` extra)",
    "pyarrow": "Parquet data files (pulled in by datasets, but read only for .parquet)",
    "peft": "only in runs.versions(): the installed version, None when peft cannot be imported",
}

STARTUP = "keeps `alignkit --help` / `alignkit <command> --help` torch-free (under 1 s, tests/cli/test_startup.py)"
SETTINGS = ("settings import no torch (settings/__init__); a config's names are checked against the registries, "
            "which import torch, only when a config is loaded")
# (file under src/alignkit, module prefix) -> why the import is inside a function there
ALLOWED = {
    ("cli/__init__.py", "alignkit"): "the entry point: " + STARTUP + "; it imports only the command's module",
    ("cli/listing.py", "alignkit"): "`alignkit ls --help` " + STARTUP + "; each section imports only its registry",
    ("cli/demo.py", "alignkit.demos"): "`alignkit demo --help` " + STARTUP,
    ("cli/demo.py", "torch"): "`alignkit demo --help` " + STARTUP,
    ("cli/demo.py", "transformers"): "`alignkit demo --help` " + STARTUP,
    ("data/chat.py", "transformers"): "chat.py is imported on torch-free paths (runs.py, cli/models.py); transformers' "
                                      "compiled chat template is needed only when records are tokenized",
    ("cli/serve.py", "alignkit.serve"): "`alignkit serve --help` " + STARTUP,
    ("cli/serve.py", "alignkit.models.tiny"): "`alignkit serve --help` " + STARTUP,
    ("cli/serve.py", "alignkit.cli.models"): "`alignkit serve --help` " + STARTUP + " (cli/models imports torch)",
    ("cli/serve.py", "alignkit.cli.runfolder"): "`alignkit serve --help` " + STARTUP + " (cli/runfolder imports torch)",
    ("cli/demo.py", "alignkit.cli.runfolder"): "`alignkit demo --help` " + STARTUP + " (cli/runfolder imports torch)",
    ("cli/serve.py", "torch"): "`alignkit serve --help` " + STARTUP,
    ("cli/serve.py", "alignkit.models.loading"): "`alignkit serve --help` " + STARTUP + " (--dry-run loads the base's "
                                                 "tokenizer only, to check its chat template)",
    ("cli/vllm_serve.py", "alignkit"): "`alignkit vllm-serve --help` " + STARTUP,
    ("cli/flags.py", "transformers"): "TRL-style --flags are translated before the command's module loads; "
                                      "TrainingArguments' fields are read only for a flag settings do not know",
    ("settings/load.py", "alignkit"): SETTINGS,
    ("settings/load.py", "transformers"): SETTINGS + " (a model folder's config for model.rope_scaling)",
    ("settings/online.py", "alignkit"): SETTINGS,
    ("settings/augment.py", "alignkit.augment"): SETTINGS + " (augment's strategy registry)",
    ("settings/bounds.py", "torch"): SETTINGS + " (dtype names)",
    ("settings/bounds.py", "importlib"): SETTINGS,
    ("augment/llm.py", "torch"): "only the `llm.kind: local` backend runs a model; HTTP backends need no torch",
    ("augment/llm.py", "alignkit.models.loading"): "only the `llm.kind: local` backend loads a model",
    ("augment/llm.py", "alignkit.online.generation"): "only the `llm.kind: local` backend generates (imports torch)",
    ("augment/llm.py", "alignkit.data.chat"): "only the `llm.kind: local` backend encodes a prompt (alignkit.data "
                                              "imports torch)",
    ("augment/llm.py", "alignkit.online.digests"): "only the `llm.kind: local` backend digests its model "
                                                     "(imports torch)",
    ("augment/pipeline.py", "alignkit.data.readers"): "the reader registry is read by settings (torch-free); "
                                                      "augment imports it when it reads data",
    ("data/readers/rows.py", "datasets"): "the reader registry is read by settings: datasets (pandas, pyarrow, "
                                          "~2 s) is imported only for a saved dataset or a Hub dataset",
    ("distributed.py", "torch.distributed"): "absent on torch builds without distributed support",
    ("distributed.py", "transformers.integrations.deepspeed"): "DeepSpeed's config helpers (deepspeed is optional)",
}


def function_level_imports() -> list[tuple[str, int, str]]:
    """(file under src/alignkit, line, module) of every import inside a function."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()

        def visit(node: ast.AST, inside: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if inside and isinstance(child, ast.Import):
                    out.extend((rel, child.lineno, a.name) for a in child.names)
                elif inside and isinstance(child, ast.ImportFrom):
                    out.append((rel, child.lineno, "." * child.level + (child.module or "")))
                visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(path.read_text(), str(path)), False)
    return out


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _allowed_by(rel: str, module: str) -> str | None:
    for prefix in OPTIONAL:
        if _under(module, prefix):
            return prefix
    for (file, prefix) in ALLOWED:
        if file == rel and _under(module, prefix):
            return f"{file}:{prefix}"
    return None


def test_no_function_level_import_outside_the_allowlist():
    bad = [f"src/alignkit/{rel}:{line}: `{module}` imported inside a function; import it at the top of the "
           "module (restructure an import cycle), or add an OPTIONAL / ALLOWED entry with its reason in "
           "tests/test_function_imports.py" for rel, line, module in function_level_imports()
           if _allowed_by(rel, module) is None]
    assert not bad, "\n".join(bad)


def test_every_allowlist_entry_is_used_and_names_a_file():
    used = {_allowed_by(rel, module) for rel, _, module in function_level_imports()}
    stale = [f"{file}:{prefix}" for file, prefix in ALLOWED if f"{file}:{prefix}" not in used]
    assert not stale, f"ALLOWED entries no import needs any more (remove them): {stale}"
    assert all((SRC / file).is_file() for file, _ in ALLOWED)
    assert all(reason.strip() for reason in [*OPTIONAL.values(), *ALLOWED.values()])


def test_the_walk_finds_function_level_imports(tmp_path):
    """The check itself: a module with imports at three depths yields exactly the two inside functions."""
    pkg = tmp_path / "alignkit"
    pkg.mkdir()
    (pkg / "m.py").write_text("import os\n\ndef f():\n    import json\n    class C:\n        def g(self):\n"
                              "            from alignkit.x import y\n")
    globals()["SRC"], old = pkg, SRC
    try:
        assert function_level_imports() == [("m.py", 4, "json"), ("m.py", 7, "alignkit.x")]
    finally:
        globals()["SRC"] = old


def private_imports() -> list[tuple[str, int, str]]:
    """(file under src/alignkit, line, "module.name") of every private name (one leading underscore) that a
    module takes from another alignkit module: `from alignkit.x import _y`, or `m._y` where `m` was imported
    as an alignkit module (`import alignkit.x as m`, `from alignkit import x as m`)."""
    modules = {".".join(("alignkit", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
               for p in SRC.rglob("*.py")}
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        package = ".".join(("alignkit", *path.relative_to(SRC).parent.parts))
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> alignkit module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _under(a.name, "alignkit"):
                        bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(x for x in (base, node.module) if x)
                if not _under(module, "alignkit"):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        out.append((rel, node.lineno, f"{module}.{a.name}"))
                    elif f"{module}.{a.name}" in modules:
                        bound[a.asname or a.name] = f"{module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                out.append((rel, node.lineno, f"{bound[node.value.id]}.{node.attr}"))
    return out


def test_no_private_name_imported_from_another_module():
    bad = [f"src/alignkit/{rel}:{line}: `{name}` is private to its module; give it a public name there (in its "
           "__all__) or move the code that needs it into that module" for rel, line, name in private_imports()]
    assert not bad, "\n".join(bad)


def test_the_walk_finds_private_imports(tmp_path):
    """The check itself: private names taken by `from ... import`, relative or absolute, and by attribute on an
    imported alignkit module are found; dunders, public names and other packages' private names are not."""
    pkg = tmp_path / "alignkit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def _f(): pass\ndef g(): pass\n")
    (pkg / "m.py").write_text("from alignkit.sub.a import _f, g\nfrom alignkit.sub import a\n"
                              "import alignkit.sub.a as aa\nfrom os import _exit\nfrom alignkit import __version__\n"
                              "x = a._f, aa._f, a.g, a.__name__\n")
    (pkg / "sub" / "b.py").write_text("from .a import _f\nfrom . import a\ny = a._f\n")
    globals()["SRC"], old = pkg, SRC
    try:
        assert sorted(private_imports()) == [("m.py", 1, "alignkit.sub.a._f"), ("m.py", 6, "alignkit.sub.a._f"),
                                             ("m.py", 6, "alignkit.sub.a._f"), ("sub/b.py", 1, "alignkit.sub.a._f"),
                                             ("sub/b.py", 3, "alignkit.sub.a._f")]
    finally:
        globals()["SRC"] = old
