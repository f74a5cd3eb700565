"""FSDP2 (`fully_shard` through accelerate) on two CPU processes (gloo): full, LoRA, ReFT and ReFT+LoRA.

The worker sets the environment `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets;
alignkit attaches the FSDP plugin accelerate drops on CPU processes (`alignkit.distributed`). Checked: the
run really is FSDP (accelerate's distributed type, trainable parameters held as DTensor shards), one SGD
step over a global batch of 4 (2 per rank) equals the same step in one process (full DPO: its frozen
reference copy sharded with `fully_shard` too, not a whole copy per process), and the saved folder is an
ordinary alignkit folder (safetensors + JSON) that loads without FSDP into the trained weights.

Two accelerate FSDP settings, each in a case of its own (KIND:OBJECTIVE:SETTING), checked the same way and more:
- fsdp_cpu_ram_efficient_loading ("ram": accelerate moves the policy to the meta device on every rank but 0 and
  broadcasts rank 0's weights; transformers leaves weights missing from the checkpoint unmaterialised there): the
  frozen reference copy's shard on EACH rank equals the model folder's weights, and the step equals one process's;
- fsdp_activation_checkpointing ("ac": accelerate's CheckpointWrapper put `_checkpoint_wrapped_module.` into every
  layer's parameter names, model/ was written under them, and the step stopped with torch's CheckpointError): alignkit
  applies its own checkpointing instead, the names and model/'s keys are the base model's."""

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
# the settings' cases last: the process group is then up when their model loads (transformers' rank-0-only path)
CASES = ["full:sft", "full:dpo", "lora:sft", "reft:sft", "reft+lora:dpo", "full:dpo:ram", "full:sft:ac"]


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun([str(WORKER), str(tiny_dir("llama")), str(out), *CASES], timeout=600)
    assert proc.returncode == 0, proc.failure()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_two_ranks_equal_one_process_and_save_plain_folders(case, two_ranks, tiny_dir, tmp_path):
    from alignkit.adapters import load_adapter
    from alignkit.models.loading import load_model

    kind, objective, *setting = case.split(":")
    name = case.replace(":", "-")
    info = json.loads((two_ranks / f"{name}.json").read_text())
    assert info["distributed_type"].endswith("FSDP") and info["world"] == 2
    assert info["sharded"] > 0  # parameters really were DTensor shards
    if (kind, objective) == ("full", "dpo"):  # the frozen reference copy is sharded by the same engine
        assert info["reference_sharded"] > 0
        assert [r["reference_off_base"] for r in info["per_rank"]] == [[], []]  # each rank's shard: the real weights
    assert info["cpu_ram_efficient_loading"] == (setting == ["ram"])
    if setting == ["ac"]:  # alignkit's checkpointing on; the names (both ranks) and model/ the base's
        assert info["layers_checkpointed"] > 0
        base_names = [n for n, _ in load_model(tiny_dir("llama")).named_parameters()]
        assert [r["names"] for r in info["per_rank"]] == [base_names, base_names]
        base_keys = load_file(str(tiny_dir("llama") / "model.safetensors")).keys()
        assert load_file(str(two_ranks / f"{name}.saved" / "model.safetensors")).keys() == base_keys
    two = load_file(str(two_ranks / f"{name}.safetensors"))
    one = train_one(str(tiny_dir("llama")), str(tmp_path / "one"), kind, objective)
    assert one.keys() == two.keys() and one
    init = _initial(tiny_dir("llama"), kind)
    assert any(not torch.equal(two[n], init[n]) for n in two), "the step changed nothing"
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=5e-6, msg=n)
    # the saved folder: plain files, loaded without FSDP, holds the trained weights
    saved = two_ranks / f"{name}.saved"
    assert (saved / "alignkit_adapter.json").is_file()
    loaded = load_model(saved) if kind == "full" else load_adapter(load_model(tiny_dir("llama")), saved)
    got = {n: p for n, p in loaded.named_parameters()}
    for n in one:
        torch.testing.assert_close(got[n].detach(), one[n], rtol=1e-5, atol=5e-6, msg=n)
