"""FSDP2 workers for tests/distributed/test_fsdp.py (run under torchrun; not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_worker.py MODEL_DIR OUT_DIR KIND:OBJECTIVE...

Sets the environment `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets (FSDP version 2,
transformer-based wrapping, full state dict), then trains what tests/distributed/ddp_worker.py trains (one
SGD step, global batch 4, 2 per rank). Rank 0 writes the trainable parameters, gathered from their shards,
to OUT_DIR/KIND-OBJECTIVE.safetensors, the trainer's saved folder to OUT_DIR/KIND-OBJECTIVE.saved/, and
OUT_DIR/KIND-OBJECTIVE.json (the accelerate distributed type, how many parameters of the policy and of a
frozen reference copy were sharded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    os.environ.update(FSDP_ENV)
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(Path(__file__).parent))
    import ddp_worker

    torch.set_num_threads(1)
    for case in cases:
        kind, objective = case.split(":")
        seen = {}

        def keep(trainer, seen=seen):
            seen["trainer"] = trainer

        params = ddp_worker.train_one(model_dir, f"{out_dir}/{kind}-{objective}", kind, objective, on_trainer=keep)
        trainer = seen["trainer"]
        sharded = sum(isinstance(p, DTensor) for p in params.values())
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous() for n, p in params.items()}
        trainer.save_model(f"{out_dir}/{kind}-{objective}.saved")
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(full, f"{out_dir}/{kind}-{objective}.safetensors")
            Path(f"{out_dir}/{kind}-{objective}.json").write_text(json.dumps(
                {"distributed_type": str(trainer.accelerator.distributed_type), "sharded": sharded,
                 "reference_sharded": sum(isinstance(p, DTensor) for p in trainer.ref_model.parameters())
                 if getattr(trainer, "ref_model", None) is not None else None,
                 "world": trainer.accelerator.num_processes}))
    from alignkit.distributed import exit_after_distributed_run

    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
