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
    ("cli/serve.py", "alignkit.serve"): "`alignkit serve --help` " + STARTUP,
    ("cli/serve.py", "alignkit.models.tiny"): "`alignkit serve --help` " + STARTUP,
    ("cli/serve.py", "torch"): "`alignkit serve --help` " + STARTUP,
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
