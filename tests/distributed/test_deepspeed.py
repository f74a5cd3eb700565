"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo): full, LoRA, ReFT and
ReFT+LoRA, SFT and DPO.

The worker sets the environment `accelerate launch --config_file configs/accelerate/zero{2,3}-cpu.yaml`
sets; accelerate starts DeepSpeed but counts one process on a CPU, which alignkit corrects
(`alignkit.distributed.deepspeed_on_cpu`). Checked: the policy really is a DeepSpeed engine (ZeRO-3: its
parameters are partitions), one SGD step over a global batch of 4 (2 per rank) equals the same step in one
process (parameters, and the two ranks' losses average to the one-process loss), full DPO's frozen reference
is a ZeRO-3 engine of its own holding half of its elements per process (not a whole copy), and the saved
folder is an ordinary alignkit folder (safetensors + JSON) that loads without DeepSpeed into the trained
weights."""

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

WORKER = Path(__file__).with_name("deepspeed_worker.py")
CASES = [("2", "full", "sft"), ("2", "lora", "dpo"), ("3", "full", "dpo"), ("3", "lora", "sft"),
         ("3", "reft+lora", "dpo")]


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    proc = torchrun([str(WORKER), str(tiny_dir("llama")), str(out), *(":".join(c) for c in CASES)],
                    env={"DS_ACCELERATOR": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.failure()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,kind,objective", CASES)
def test_zero_two_ranks_equal_one_process_and_save_plain_folders(stage, kind, objective, two_ranks, tiny_dir,
                                                                  tmp_path):
    from alignkit.adapters import load_adapter
    from alignkit.models.loading import load_model

    name = f"{stage}-{kind}-{objective}"
    info = [json.loads((two_ranks / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["distributed_type"].endswith("DEEPSPEED") and info[0]["world"] == 2
    assert info[0]["engine"] == "DeepSpeedEngine"
    assert (info[0]["partitioned"] > 0) == (stage == "3")  # ZeRO-3 partitions parameters, ZeRO-2 does not
    if (stage, kind, objective) == ("3", "full", "dpo"):  # the reference: an engine of its own, partitioned
        assert info[0]["reference_engine"] == "DeepSpeedEngine" and info[0]["reference_partitioned"] > 0
        assert info[0]["reference_local_numel"] * 2 <= info[0]["reference_numel"] + 64  # half (+ padding)
    two = load_file(str(two_ranks / f"{name}.safetensors"))
    seen = {}
    one = train_one(str(tiny_dir("llama")), str(tmp_path / "one"), kind, objective,
                    on_trainer=lambda t: seen.update(loss=t.state.log_history[-1]["train_loss"]))
    assert one.keys() == two.keys() and one
    init = _initial(tiny_dir("llama"), kind)
    assert any(not torch.equal(two[n], init[n]) for n in two), "the step changed nothing"
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=5e-6, msg=n)
    # each rank's loss is its share of the global normaliser: their mean is the one-process loss
    assert (info[0]["loss"] + info[1]["loss"]) / 2 == pytest.approx(seen["loss"], rel=1e-5)
    # the saved folder: plain files, loaded without DeepSpeed, holds the trained weights
    saved = two_ranks / f"{name}.saved"
    assert (saved / "alignkit_adapter.json").is_file()
    assert not list(saved.rglob("*.pt")) and not list(saved.rglob("global_step*"))  # no DeepSpeed pickles
    loaded = load_model(saved) if kind == "full" else load_adapter(load_model(tiny_dir("llama")), saved)
    got = {n: p for n, p in loaded.named_parameters()}
    for n in one:
        torch.testing.assert_close(got[n].detach(), one[n], rtol=1e-5, atol=5e-6, msg=n)
