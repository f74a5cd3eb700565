"""FSDP2 workers for tests/distributed/test_fsdp.py (run under torchrun; not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_worker.py MODEL_DIR OUT_DIR KIND:OBJECTIVE...

Sets the environment `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets (FSDP version 2,
transformer-based wrapping, full state dict), then trains what tests/distributed/ddp_worker.py trains (one
SGD step, global batch 4, 2 per rank). Rank 0 writes the trainable parameters, gathered from their shards,
to OUT_DIR/KIND-OBJECTIVE.safetensors, the trainer's saved folder to OUT_DIR/KIND-OBJECTIVE.saved/, and
OUT_DIR/KIND-OBJECTIVE.json (the accelerate distributed type, how many parameters of the policy and of a
frozen reference copy were sharded). A case KIND:OBJECTIVE:SETTING runs with one more accelerate FSDP setting on
(`SETTINGS`: "ram" fsdp_cpu_ram_efficient_loading, "ac" fsdp_activation_checkpointing) and writes
OUT_DIR/KIND-OBJECTIVE-SETTING.*; its JSON also holds, per rank, the reference parameters whose local shard differs
from the model folder's weights, and the policy's parameter names.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}
SETTINGS = {"ram": "FSDP_CPU_RAM_EFFICIENT_LOADING", "ac": "FSDP_ACTIVATION_CHECKPOINTING"}


def reference_off_base(trainer, model_dir: str) -> list[str]:
    """The frozen reference's parameters whose shard on THIS rank differs from the model folder's weights (FSDP2
    shards dim 0 as `torch.chunk`)."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    base, rank, world = load_file(f"{model_dir}/model.safetensors"), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    off = []
    for n, p in trainer.ref_model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        want = torch.chunk(base[n], world, dim=0)[rank] if isinstance(p, DTensor) else base[n]
        if local.is_meta or not torch.equal(local.detach(), want):
            off.append(n)
    return off


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    os.environ.update(FSDP_ENV)
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(Path(__file__).parent))
    import ddp_worker

    torch.set_num_threads(1)
    for case in cases:
        kind, objective, *setting = case.split(":")
        name = "-".join([kind, objective, *setting])
        os.environ.update({SETTINGS[s]: "true" for s in setting})
        seen = {}

        def keep(trainer, seen=seen):
            seen["trainer"] = trainer

        params = ddp_worker.train_one(model_dir, f"{out_dir}/{name}", kind, objective, on_trainer=keep)
        trainer = seen["trainer"]
        sharded = sum(isinstance(p, DTensor) for p in params.values())
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous() for n, p in params.items()}
        trainer.save_model(f"{out_dir}/{name}.saved")
        has_ref = getattr(trainer, "ref_model", None) is not None
        per_rank = ddp_gather({"reference_off_base": reference_off_base(trainer, model_dir) if has_ref else [],
                               "names": [n for n, _ in trainer.model.named_parameters()]})
        plugin = trainer.accelerator.state.fsdp_plugin
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(full, f"{out_dir}/{name}.safetensors")
            Path(f"{out_dir}/{name}.json").write_text(json.dumps(
                {"distributed_type": str(trainer.accelerator.distributed_type), "sharded": sharded,
                 "reference_sharded": sum(isinstance(p, DTensor) for p in trainer.ref_model.parameters())
                 if has_ref else None, "per_rank": per_rank,
                 "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
                 "layers_checkpointed": sum(getattr(m, "gradient_checkpointing", False) is True
                                            for m in trainer.model.modules()),
                 "world": trainer.accelerator.num_processes}))
        os.environ.update({SETTINGS[s]: "false" for s in setting})
    from alignkit.distributed import exit_after_distributed_run

    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


def ddp_gather(obj):
    """Every rank's `obj`, in rank order (a collective)."""
    import torch.distributed as dist

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, obj)
    return rows


if __name__ == "__main__":
    main(*sys.argv[1:])
