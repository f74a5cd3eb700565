"""tests/vllm_backend run only where vLLM is installed: `make test-vllm` (vLLM's CPU build in .venv-vllm, transformers
5.19). Everywhere else (`make test`, alignkit's .venv with transformers 5.24) they are skipped, saying why."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

NO_VLLM = ("vLLM is not installed in this Python: tests/vllm_backend run in vLLM's own environment "
           "(make test-vllm builds .venv-vllm)")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason=NO_VLLM)
    for item in items:
        if "tests/vllm_backend/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


def run_env() -> dict:
    """The environment of a subprocess: this checkout's src first, quiet vLLM, offline."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1")
    return env


PYTHON = sys.executable
