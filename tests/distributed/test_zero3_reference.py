"""DPO with a ReFT + LoRA policy under DeepSpeed ZeRO-3 on two CPU processes: the reference is the policy with both
adapters switched off ("adapter_off", no copy), computed while every weight of the policy is a ZeRO-3 partition.

Checked against an independent computation: every reference value the trainer used in its two steps equals the base
model's summed completion log-probs of the same rows, computed here in one process with plain transformers (the
model loaded from its folder, full logits, log_softmax over the vocabulary in float64), and the second step's
reference (after the first step moved the LoRA and ReFT weights) is still the base model's. The two steps train:
the trained ReFT and LoRA weights equal two steps of the same training in one process (the same global batch),
and they moved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import torchrun

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import train_one  # noqa: E402
from test_ddp import _initial  # noqa: E402

WORKER = Path(__file__).with_name("zero3_reference_worker.py")


def base_completion_logps(model_dir: Path, call: dict[str, torch.Tensor]) -> list[float]:
    """Each row's sum of log p(x_t | x_<t) over its completion tokens, by the base model: the attended tokens of the
    row as one unpadded sequence, full logits, log_softmax in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sums = []
    for ids, attended, completion in zip(call["input_ids"], call["attention_mask"], call["completion_mask"]):
        keep = attended.bool()
        ids, completion = ids[keep], completion[keep].bool()
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0, :-1].double(), dim=-1)
        token = logp.gather(1, ids[1:, None])[:, 0]  # log p(x_{t+1} | x_<=t)
        sums.append(token[completion[1:]].sum().item())
    return sums


@pytest.mark.slow
def test_zero3_reft_lora_reference_is_the_base_model_and_the_steps_train(tiny_dir, tmp_path):
    model_dir = tiny_dir("llama")
    out = tmp_path / "two"
    out.mkdir()
    proc = torchrun([str(WORKER), str(model_dir), str(out)], env={"DS_ACCELERATOR": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.failure()
    info = json.loads((out / "info.json").read_text())
    assert info["engine"] == "DeepSpeedEngine" and info["mode"] == "adapter_off"
    assert info["partitioned"] > 0  # ZeRO-3: the policy's parameters are partitions
    for rank in (0, 1):
        calls = torch.load(out / f"reference.rank{rank}.pt")
        assert len(calls) == 2  # one micro-batch per step, two steps
        for step, call in enumerate(calls, 1):
            assert call["reference"].shape == (4,)  # 2 pairs: chosen rows, then rejected ones
            want = torch.tensor(base_completion_logps(model_dir, call), dtype=torch.float64)
            torch.testing.assert_close(call["reference"].double(), want, rtol=0, atol=2e-4,
                                       msg=f"rank {rank}, step {step}: the reference is not the base model")
    two = load_file(str(out / "trained.safetensors"))
    one = train_one(str(model_dir), str(tmp_path / "one"), "reft+lora", "dpo", steps=2,
                    layout={"padding_free": False, "share_prompt": False})
    init = _initial(model_dir, "reft+lora")
    assert one.keys() == two.keys() and any("lora_" in n for n in one) and any("lora_" not in n for n in one)
    for n in one:
        assert not torch.equal(two[n], init[n]), f"{n}: two ZeRO-3 steps left it unchanged"
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=5e-6, msg=n)
