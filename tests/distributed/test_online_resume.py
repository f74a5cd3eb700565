"""Online training resumed under two CPU processes (torchrun, gloo): a run interrupted after its step-2
checkpoint and resumed from it gives the uninterrupted run's step 3 (losses, rewards, KL, parameters), for
LoRA GRPO with AdamW and running reward moments (optimizer and moment state restored), RLOO with gradient
accumulation, and full-finetuning online DPO (frozen-copy reference). Each rank samples its own share with
its own seed, so this also checks that every rank restores the same state from the one checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import torchrun

WORKER = Path(__file__).with_name("online_resume_worker.py")
CASES = {"ddp": ["grpo-adam", "rloo", "dpo"], "fsdp": ["grpo-adam", "dpo"]}
EXTRA = {"fsdp": ["ppo-refused"], "ddp": ["grpo-vllm-refused"]}
_RUNS: dict = {}


def run_two_ranks(engine: str, model_dir, tmp_path_factory) -> Path:
    if engine not in _RUNS:
        out = tmp_path_factory.mktemp(f"online-resume-{engine}")
        proc = torchrun([str(WORKER), str(model_dir), str(out), *CASES[engine], *EXTRA.get(engine, [])],
                        env={"ALIGNKIT_TEST_FSDP": "1" if engine == "fsdp" else "0"}, timeout=600)
        assert proc.returncode == 0, proc.failure()
        _RUNS[engine] = out
    return _RUNS[engine]


@pytest.mark.slow
@pytest.mark.parametrize("engine,case", [(e, c) for e, cases in CASES.items() for c in cases])
def test_resumed_run_equals_uninterrupted(engine, case, tiny_dir, tmp_path_factory):
    out = run_two_ranks(engine, tiny_dir("llama"), tmp_path_factory)
    run = json.loads((out / f"{case}.json").read_text())
    assert run["world"] == 2 and run["distributed_type"].endswith("FSDP" if engine == "fsdp" else "MULTI_CPU")
    assert {"trainable.safetensors", "optimizer.pt", "trainer_state.json"} <= set(run["checkpoint_files"])
    a, b = run["a"], run["b"]
    assert [r["step"] for r in a] == [0, 1, 2] and [r["step"] for r in b] == [2]
    assert a[2]["loss"] != a[1]["loss"]  # the steps differ: equal step-3 rows below are not a coincidence
    for key in ("loss", "reward", "kl"):
        assert b[0][key] == pytest.approx(a[2][key], rel=1e-6, abs=1e-9), key
    pa, pb = load_file(str(out / f"{case}-a.safetensors")), load_file(str(out / f"{case}-b.safetensors"))
    assert pa.keys() == pb.keys() and pa
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.slow
def test_ppo_value_head_under_fsdp_is_refused_in_one_line(tiny_dir, tmp_path_factory):
    """PPO's value head is not sharded by FSDP2 (and cannot share the policy's optimizer once accelerate
    swaps the policy's parameters for shards): the trainer stops at construction with one line naming DDP."""
    out = run_two_ranks("fsdp", tiny_dir("llama"), tmp_path_factory)
    message = json.loads((out / "ppo-refused.json").read_text())["message"]
    assert message is not None and "\n" not in message
    assert "value head" in message and "FSDP" in message and "DDP" in message


@pytest.mark.slow
def test_vllm_generation_under_several_processes_is_refused_in_one_line(tiny_dir, tmp_path_factory):
    """generation_backend='vllm' under 2 DDP ranks: each rank would start its own colocated engine (no placement,
    sync or seeding per rank yet); the trainer refuses at construction, before vLLM is imported (vLLM is not
    installed here) and before its output folder exists, naming the key and both ways out."""
    out = run_two_ranks("ddp", tiny_dir("llama"), tmp_path_factory)
    run = json.loads((out / "grpo-vllm-refused.json").read_text())
    message = run["message"]
    assert message is not None and "\n" not in message
    assert "method.generation_backend" in message and "2 process(es)" in message
    assert "one process" in message and "method.generation_backend=transformers" in message
    assert not run["wrote"]
