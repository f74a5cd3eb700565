"""Engines the online loop does not run under are refused in one line when the trainer is built, before
anything is written (no process group needed: the launcher's environment says which engine was asked for)."""

from __future__ import annotations

import pytest

from alignkit.adapters import AdapterConfig, apply_adapter
from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.settings import ConfigError


def refused_at_build(tiny_dir, tokenizer, tmp_path, kind: str = "lora") -> str:
    """The ConfigError's text when a one-step GRPO trainer (a LoRA policy, or `kind`'s) is built under the test's
    environment."""
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind=kind))
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), report_to="none")
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg,
                    output_dir=tmp_path / "run")
    return str(e.value)


def test_deepspeed_launch_is_refused_for_the_online_loop(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """`accelerate launch --config_file configs/accelerate/zero2-cpu.yaml -m alignkit grpo ...` sets
    ACCELERATE_USE_DEEPSPEED; on CPU processes accelerate would have dropped DeepSpeed for plain DDP."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    msg = refused_at_build(tiny_dir, tokenizer, tmp_path)
    assert "\n" not in msg and "DeepSpeed" in msg and "fsdp2.yaml" in msg and "torchrun" in msg
    assert not (tmp_path / "run").exists()


def test_an_fsdp_state_dict_type_the_loop_would_ignore_is_refused(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """An accelerate FSDP config with `fsdp_state_dict_type: SHARDED_STATE_DICT`: the loop's checkpoints and model/
    are always full safetensors gathered on rank 0, so the setting was ignored without a word."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    msg = refused_at_build(tiny_dir, tokenizer, tmp_path)
    assert "\n" not in msg and msg.startswith("GRPOTrainer: the accelerate config's fsdp_state_dict_type: SHARDED_STATE_DICT")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp1_is_refused_for_the_online_loop_on_a_gpu_machine_too(kind, tiny_dir, tokenizer, tmp_path, monkeypatch):
    """Before: with CUDA, an FSDP1 launch (fsdp_version: 1) of the online loop with a LoRA policy was let through,
    though the loop gathers sharded weights for model/ and checkpoints only under FSDP2 (`full_parameters`); now one
    line when the trainer is built, before anything is written. The same for full finetuning (session 25: it was let
    through, and its model/ and checkpoints, which have no Trainer's FSDP1 state dict to read, would have held each
    process's flat shard; fails without the fix: yes, seen)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past refuse_fsdp1_on_cpu: a GPU machine's path
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    msg = refused_at_build(tiny_dir, tokenizer, tmp_path, kind)
    assert "\n" not in msg and msg.startswith("GRPOTrainer: the accelerate config asks for FSDP version 1 ")
    assert "the online loop does not save under" in msg and "set fsdp_version: 2" in msg
    assert not (tmp_path / "run").exists()
