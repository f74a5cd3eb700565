"""What alignkit reads as vLLM does before an engine starts (rows V21, V22 of the table in docs/architecture.md): the
number of experts of a model (vLLM's `ModelConfig.get_num_experts` / `is_moe`, behind the refusal of LoRA on a
mixture of experts on vLLM's CPU platform, row V20) and that platform; the dtypes and GPU memory share vLLM's engine
takes (`vllm-serve`'s flags, checked when given). They run where vLLM is installed (`make test-vllm`: .venv-vllm);
elsewhere they are skipped."""

from __future__ import annotations

import importlib.util
import json
import shutil
import typing

import pytest

from .guards import check, guard

VLLM = "vllm"
pytestmark = pytest.mark.skipif(importlib.util.find_spec(VLLM) is None,
                                reason="vLLM is not installed in this Python (make test-vllm runs these in .venv-vllm)")


def test_num_experts_is_vllms(tiny_dir, tmp_path):
    """For a model folder with each key vLLM reads the expert count from (and two of them: the first wins), alignkit's
    `num_experts` is vLLM's `ModelConfig.get_num_experts()` (0 for the dense tiny llama, whose `is_moe` is False),
    and `vllm_cpu_platform` is vLLM's `current_platform.is_cpu()`."""
    where = "alignkit/models/vllm_support.py:num_experts/vllm_cpu_platform (check_moe_lora)"
    with guard(VLLM, "vllm.config.ModelConfig / vllm.platforms.current_platform moved", where):
        from vllm.config import ModelConfig
        from vllm.platforms import current_platform
    from transformers import AutoConfig

    from alignkit.models.vllm_support import EXPERT_KEYS, num_experts, vllm_cpu_platform

    check(vllm_cpu_platform() == current_platform.is_cpu(), VLLM, "vllm_cpu_platform differs", where)
    cases = {"dense": ({}, 0), **{key: ({key: 3}, 3) for key in EXPERT_KEYS},
             "first wins": ({EXPERT_KEYS[0]: 2, EXPERT_KEYS[-1]: 5}, 2)}
    for name, (extra, expected) in cases.items():
        folder = shutil.copytree(tiny_dir("llama"), tmp_path / name.replace(" ", "_"))
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **extra}))
        with guard(VLLM, "ModelConfig(model=, tokenizer=, dtype=).get_num_experts() / is_moe changed", where):
            model_config = ModelConfig(model=str(folder), tokenizer=str(folder), dtype="float32")
            theirs, moe = model_config.get_num_experts(), model_config.is_moe
        ours = num_experts(AutoConfig.from_pretrained(str(folder)))
        check(ours == theirs == expected and moe == (expected > 0), VLLM,
              f"{name}: vLLM reads {theirs} experts (is_moe {moe}), alignkit {ours}, the config gives {expected}", where)


def test_vllm_serve_flag_values_are_vllms():
    """`VLLM_DTYPES` (vllm-serve --dtype) are vLLM's `ModelDType` values, which it takes in any case; its GPU memory
    share is refused at 0 and above 1 and taken at 1 (vllm-serve --gpu-memory-utilization)."""
    where = "alignkit/serve/vllm_serve.py:EngineSettings.check (VLLM_DTYPES, --gpu-memory-utilization)"
    with guard(VLLM, "vllm.config.model.ModelDType / vllm.config.CacheConfig moved", where):
        from vllm.config import CacheConfig
        from vllm.config.model import ModelDType
    from alignkit.serve.vllm_serve import VLLM_DTYPES

    check(set(typing.get_args(ModelDType)) == set(VLLM_DTYPES), VLLM,
          f"vLLM's dtypes are {typing.get_args(ModelDType)}, alignkit's {VLLM_DTYPES}", where)
    for share, taken in ((0.0, False), (1.5, False), (1.0, True)):
        try:
            CacheConfig(gpu_memory_utilization=share)
            ok = True
        except ValueError:  # (pydantic's ValidationError is one)
            ok = False
        check(ok == taken, VLLM, f"vLLM's CacheConfig {'takes' if ok else 'refuses'} gpu_memory_utilization {share}",
              where)
