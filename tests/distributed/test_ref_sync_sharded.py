"""ref_sync (TR-DPO: the reference moves towards the policy every N steps) under FSDP2 and DeepSpeed ZeRO-3 on two CPU
processes: refused in one line when the trainer is built, before anything is written.

Why refused rather than mixed: the mix `mix_into_reference` is a plain in-place lerp of each reference parameter
towards the policy's. Under ZeRO-3 each parameter outside a gather is an empty placeholder (its elements live in the
per-process partitions `ds_tensor`), and the reference checkpoint (`save_reference`) would write those empty tensors;
under FSDP2 the mix would act on DTensor shards and save / load each process's shard. A gathered mix, save and load
are not built, so the combination is refused, which this checks on real engines (two ranks each). Before: the
refusal (`refuse_sharded_ref_sync`) read the accelerator, which exists only once the Trainer is built, and the
Trainer had by then created its output_dir on rank 0 (an empty folder left by a refused run); now `check_ref_sync`
reads the launcher's engine first (`requested_engine`: the variables `accelerate launch` sets) and nothing is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

WORKER = Path(__file__).with_name("ref_sync_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("engine, named", [("fsdp2", "FSDP"), ("zero3", "DEEPSPEED")])
def test_ref_sync_under_a_sharding_engine_is_refused_on_two_ranks(engine, named, tiny_dir, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    proc = torchrun([str(WORKER), engine, str(tiny_dir("llama")), str(tmp_path)], env={"DS_ACCELERATOR": "cpu"},
                    timeout=600)
    assert proc.returncode == 0, proc.failure()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["error"] is not None, f"rank {rank}: the trainer was built under {got['engine']}"
        assert got["error"].startswith(f"PreferenceTrainer: ref_sync under {named} is not supported: the reference "
                                       "is sharded by the engine"), got["error"]
        assert "\n" not in got["error"] and not got["written"]
