"""A LoRA on a mixture-of-experts model's expert parameters (peft's `target_parameters`: one `ParamWrapper` per
targeted parameter, nested on a module holding several, compat row P18). peft saves such a tensor with rank axis
r x experts and keys the inner wrappers' tensors `<module>.base_layer.lora_A.weight`. Before: `check_lora_fits`
expected rank r, so every such LoRA, even on its own base, was refused as "rank 8 ... r=2" (the advice: use the
adapter_config.json saved with these weights, which it was); and one of a base with another expert count or hidden
size reached peft, which failed with torch's multi-line size mismatch. Now the rank is r x the base parameter's
expert count and the widths are those peft reads from the parameter's shape: one line naming folder and tensor."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from alignkit.adapters.lora import Lora, check_lora_fits

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(experts: int = 4, hidden: int = 16, inter: int = 8) -> Qwen3MoeForCausalLM:
    """Qwen3-MoE of 2 layers: its experts are 3-D parameters, gate_up_proj (experts, 2 x inter, hidden) and
    down_proj (experts, hidden, inter) (transformers 5's Qwen3MoeExperts), not Linear modules."""
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=hidden, intermediate_size=16, moe_intermediate_size=inter,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture
def expert_lora(tmp_path):
    """A peft LoRA (r=2) on both expert parameters of a 4-expert, hidden-16 base, B made non-zero."""
    model = get_peft_model(tiny_moe(), LoraConfig(r=2, target_modules=[], target_parameters=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(tmp_path / "moe")
    return tmp_path / "moe"


def test_an_expert_lora_loads_on_its_own_base_and_changes_the_output(expert_lora):
    """Before: refused on its own base ("has rank 8 (shape [8, 16]) but adapter_config.json gives ... r=2")."""
    ids = torch.tensor([[1, 2, 3, 4]])
    plain = tiny_moe()(ids).logits
    check_lora_fits(tiny_moe(), expert_lora, "moe4")
    loaded = Lora().load(tiny_moe(), expert_lora, trainable=False)
    assert not torch.allclose(loaded(ids).logits, plain)  # B != 0: the LoRA runs


# saved tensors (r=2, 4 experts, hidden 16, inter 8): gate_up_proj (the inner wrapper, `.base_layer`) A [8, 16],
# B [16, 8]; down_proj A [8, 8], B [16, 8]. Sorted, the first tensor checked is gate_up_proj's lora_A.
CASES = [
    (dict(experts=3), r"saved LoRA tensor base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\.lora_A\."
                      r"weight has 8 on its rank axis \(shape \[8, 16\]\) but the base model moe's "
                      r"model\.layers\.0\.mlp\.experts\.gate_up_proj \(shape \[3, 16, 16\]\) takes r x experts = "
                      r"2 x 3 = 6"),
    (dict(hidden=24), r"saved LoRA tensor base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\.lora_A\."
                      r"weight has shape \[8, 16\] but the base model moe's model\.layers\.0\.mlp\.experts\."
                      r"gate_up_proj \(parameter \[4, 16, 24\], in width 24\) takes \[8, 24\]"),
    (dict(inter=12), r"saved LoRA tensor base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\.lora_B\."
                     r"weight has shape \[16, 8\] but the base model moe's model\.layers\.0\.mlp\.experts\."
                     r"gate_up_proj \(parameter \[4, 24, 16\], out width 24\) takes \[24, 8\]"),
]


@pytest.mark.parametrize("kw, pattern", CASES, ids=["experts", "hidden", "inter"])
def test_an_expert_lora_of_another_base_is_refused_in_one_line_naming_folder_and_tensor(expert_lora, kw, pattern):
    """Before: a false rank refusal (r=2 against 8) for all three; past it peft's multi-line size mismatch."""
    with pytest.raises(ValueError) as e:
        check_lora_fits(tiny_moe(**kw), expert_lora, "moe")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{expert_lora}: ") and re.search(pattern, msg), msg


def test_an_expert_lora_checked_against_its_wrapped_model_fits(expert_lora):
    """The resume path (`Lora.load_weights`) checks the base inside the PeftModel, where the nested wrappers'
    names (`experts.base_layer`) exist: the same expectations, read through the wrappers."""
    loaded = Lora().load(tiny_moe(), expert_lora, trainable=True)
    check_lora_fits(loaded.get_base_model(), expert_lora, "moe4")
    Lora().load_weights(loaded, expert_lora)
    with pytest.raises(ValueError, match=r"r x experts = 2 x 3 = 6"):
        check_lora_fits(tiny_moe(experts=3), expert_lora, "moe3")


def test_vllm_paths_refuse_an_expert_lora_at_load_before_writing(expert_lora, tmp_path, monkeypatch):
    """vLLM 0.32's CPU build cannot run a LoRA on a mixture of experts (its fused-MoE LoRA kernels are Triton's: the
    first generation fails with "module 'triton.language' has no attribute 'float32'", compat row V20). Before: the
    three vLLM paths took an expert LoRA (vllm-serve's POST /lora wrote the folder and answered 200, the failure came
    with the next /generate; `serve --engine vllm` wrote its folder and started vLLM; the colocated engine's check let
    it through). Now each refuses it in one line at load, naming target_parameters; vllm-serve writes nothing."""
    import json
    import types

    from safetensors.torch import load_file, save

    from alignkit.online.vllm_generation import refuse_unsupported
    from alignkit.serve.vllm_serve import EngineSettings, RequestError, VllmServeEngine
    from alignkit.serve.vllm_server import prepare
    from alignkit.settings import ConfigError

    why = f"targets a mixture of experts' expert parameters (target_parameters {sorted(TARGETS)})"
    engine = VllmServeEngine.__new__(VllmServeEngine)
    engine.settings = EngineSettings(model=str(tmp_path / "base"), enable_lora=True, max_lora_rank=16)
    engine.hf_config, engine.skeleton = tiny_moe().config, None
    engine.workdir, engine.lora_version, engine.weights_version, engine.lora_request = tmp_path / "w", 0, 0, None
    blob = save(load_file(str(expert_lora / "adapter_model.safetensors")),
                metadata={"format": "pt", "adapter_config": (expert_lora / "adapter_config.json").read_text()})
    with pytest.raises(RequestError) as e:
        engine.load_lora(blob)
    assert e.value.status == 400 and str(e.value).startswith(f"the adapter {why}, which vLLM's LoRA does not run")
    assert not (tmp_path / "w").exists() and engine.lora_version == 0

    tiny_moe().save_pretrained(tmp_path / "base")
    (expert_lora / "alignkit_adapter.json").write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(ConfigError) as e:
        prepare(tmp_path / "base", {"moe": expert_lora}, "base", tmp_path / "w2")
    assert str(e.value) == (f"adapter 'moe' ({expert_lora}) {why}, which vLLM's LoRA does not serve; serve it with "
                            "--engine alignkit")
    assert not (tmp_path / "w2").exists()

    policy = Lora().load(tiny_moe(), expert_lora, trainable=True)
    with pytest.raises(ConfigError) as e:
        refuse_unsupported(types.SimpleNamespace(vllm_sync="lora_request", kind="lora"), policy)
    assert str(e.value).startswith(f"generation_backend='vllm': the LoRA policy {why}, which vLLM's LoRA does not run")
