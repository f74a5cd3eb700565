"""FSDP2 (`fully_shard` through accelerate) on two CPU processes (gloo): full, LoRA, ReFT and ReFT+LoRA.

The worker sets the environment `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets;
alignkit attaches the FSDP plugin accelerate drops on CPU processes (`alignkit.distributed`). Checked: the
run really is FSDP (accelerate's distributed type, trainable parameters held as DTensor shards), one SGD
step over a global batch of 4 (2 per rank) equals the same step in one process (full DPO: its frozen
reference copy sharded with `fully_shard` too, not a whole copy per process), and the saved folder is an
ordinary alignkit folder (safetensors + JSON) that loads without FSDP into the trained weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import torchrun

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import train_one  # noqa: E402
from test_ddp import _initial  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_worker.py")
CASES = [("full", "sft"), ("full", "dpo"), ("lora", "sft"), ("reft", "sft"), ("reft+lora", "dpo")]


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun([str(WORKER), str(tiny_dir("llama")), str(out), *(f"{k}:{o}" for k, o in CASES)], timeout=600)
    assert proc.returncode == 0, proc.failure()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind,objective", CASES)
def test_fsdp2_two_ranks_equal_one_process_and_save_plain_folders(kind, objective, two_ranks, tiny_dir, tmp_path):
    from alignkit.adapters import load_adapter
    from alignkit.models.loading import load_model

    info = json.loads((two_ranks / f"{kind}-{objective}.json").read_text())
    assert info["distributed_type"].endswith("FSDP") and info["world"] == 2
    assert info["sharded"] > 0  # parameters really were DTensor shards
    if (kind, objective) == ("full", "dpo"):  # the frozen reference copy is sharded by the same engine
        assert info["reference_sharded"] > 0
    two = load_file(str(two_ranks / f"{kind}-{objective}.safetensors"))
    one = train_one(str(tiny_dir("llama")), str(tmp_path / "one"), kind, objective)
    assert one.keys() == two.keys() and one
    init = _initial(tiny_dir("llama"), kind)
    assert any(not torch.equal(two[n], init[n]) for n in two), "the step changed nothing"
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=5e-6, msg=n)
    # the saved folder: plain files, loaded without FSDP, holds the trained weights
    saved = two_ranks / f"{kind}-{objective}.saved"
    assert (saved / "alignkit_adapter.json").is_file()
    loaded = load_model(saved) if kind == "full" else load_adapter(load_model(tiny_dir("llama")), saved)
    got = {n: p for n, p in loaded.named_parameters()}
    for n in one:
        torch.testing.assert_close(got[n].detach(), one[n], rtol=1e-5, atol=5e-6, msg=n)
