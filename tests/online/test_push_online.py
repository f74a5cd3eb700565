"""push_to_hub for online runs: the final model / adapter folder and its card go up, never checkpoints/, TensorBoard
events or metrics.jsonl. No network here: huggingface_hub.HfApi is replaced by a fake that applies upload_folder's
own pattern filter (huggingface_hub.utils.filter_repo_objects) and records which files would be uploaded."""

from __future__ import annotations

import inspect
from pathlib import Path

import huggingface_hub
import pytest

from alignkit.cli import main
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer

from .toy import PROMPTS, digit_fraction, toy_policy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, allow_patterns=None,
                      ignore_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        kept = set(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        FakeApi.calls.append(("upload_folder", repo_id, root, kept))


@pytest.fixture
def fake_hub(monkeypatch):
    real = inspect.signature(huggingface_hub.HfApi.upload_folder).parameters
    assert {"repo_id", "folder_path", "repo_type", "commit_message", "ignore_patterns"} <= set(real)
    assert {"private", "exist_ok", "repo_type"} <= set(inspect.signature(huggingface_hub.HfApi.create_repo).parameters)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    return FakeApi.calls


def test_cli_online_run_pushes_model_folder_only(tmp_path, fake_hub):
    out = tmp_path / "grpo-run"
    rc = main(["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={out}", "train.max_steps=2",
               "train.save_steps=1", "sampling.max_new_tokens=3", "--push_to_hub", "--hub_model_id", "me/grpo-lora"])
    assert rc == 0
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # written, and not pushed
    assert fake_hub[0] == ("create_repo", "me/grpo-lora", False)
    kind, repo, folder, files = fake_hub[1]
    assert (kind, repo, folder) == ("upload_folder", "me/grpo-lora", out / "model")
    on_disk = {p.relative_to(out / "model").as_posix() for p in (out / "model").rglob("*") if p.is_file()}
    assert files == on_disk and {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= files


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9}])  # the EMA's model_ema/ is a by-product: not pushed
def test_python_trainer_pushes_what_save_wrote(tiny_dir, tokenizer, tmp_path, fake_hub, extra):
    cfg = GRPOConfig(steps=2, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=3),
                     save_steps=1, push_to_hub=True, progress_bar=False, **extra)
    out = tmp_path / "my-grpo"
    GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, {"type": "function", "fn": digit_fraction},
                cfg, output_dir=out).train()
    kind, repo, folder, files = fake_hub[1]
    assert (kind, repo, folder) == ("upload_folder", "my-grpo", out)  # default repo: the folder's name
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints").is_dir()
    assert {"adapter_model.safetensors", "adapter_config.json", "online_config.json"} <= files
    assert not any(f.startswith(("checkpoints/", "tensorboard/", "model_ema/")) or f == "metrics.jsonl"
                   for f in files), files
    assert (out / "model_ema").is_dir() == bool(extra)
