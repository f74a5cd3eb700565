"""Shared fixtures: tiny models and a tokenizer built locally, saved, and loaded back from disk."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ALIGNKIT_CACHE", tempfile.mkdtemp(prefix="alignkit-cache-"))  # hermetic: not ~/.cache
torch.set_num_threads(1)

from alignkit.models.loading import load_model, load_tokenizer  # noqa: E402
from alignkit.models.tiny import ARCHITECTURES, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: folder of a saved tiny model of `arch` (cached per session)."""
    cache: dict = {}

    def make(arch: str = "llama", classifier: bool = False, **kw):
        key = (arch, classifier, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}{'-cls' if classifier else ''}")
            cache[key] = save_tiny(folder, arch, classifier=classifier, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir("llama"))


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def tiny_lm(tiny_dir):
    """Factory: a freshly loaded tiny causal LM (from_pretrained on a saved folder), in eval mode."""

    def make(arch: str = "llama", **kw):
        torch.manual_seed(0)
        return load_model(tiny_dir(arch, **kw)).eval()

    return make


@pytest.fixture
def tiny_classifier(tiny_dir):
    def make(arch: str = "llama", num_labels: int = 2):
        return load_model(tiny_dir(arch, classifier=True, num_labels=num_labels), task="classifier",
                          num_labels=num_labels).eval()

    return make


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache in tmp_path (HF_HUB_CACHE, and huggingface_hub's constant read at import), holding
    what `hub_cache(repo, folder)` copies into it: the layout a download leaves (`models--org--name/refs/main` naming
    the commit, `snapshots/<commit>/` the files). Returns the snapshot folder. No network is used."""
    import huggingface_hub.constants as hub_constants

    root = tmp_path / "hf-cache" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))

    def add(repo: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
        repo_dir = root / f"models--{repo.replace('/', '--')}"
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        snapshot = repo_dir / "snapshots" / commit
        shutil.copytree(folder, snapshot)
        return snapshot

    return add


@pytest.fixture
def next_event_file_second():
    """Call it before a resume whose TensorBoard events a test reads: it sleeps until the wall clock's whole second
    changes. TensorBoard reads a folder's event files in name order, and the names of the files one process writes
    differ only in the whole-second time and then an unpadded counter ('...<pid>.10' sorts before '...<pid>.9'), so a
    resumed run whose writer opened in the killed run's second could be read first, and its purge_step then could not
    hide the killed run's later steps (a real resume, another process seconds later, never meets that)."""

    def wait() -> None:
        now = time.time()
        time.sleep(int(now) + 1 - now + 0.01)

    return wait
