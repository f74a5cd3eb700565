"""DeepSpeed ZeRO-2 / ZeRO-3 workers for tests/distributed/test_deepspeed.py (run under torchrun; not a
test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 deepspeed_worker.py MODEL_DIR OUT_DIR STAGE:KIND:OBJECTIVE...

For each case, sets the environment `accelerate launch --config_file configs/accelerate/zero<STAGE>-cpu.yaml`
sets (ACCELERATE_USE_DEEPSPEED, the ZeRO stage) and trains what tests/distributed/ddp_worker.py trains (one
SGD step, global batch 4, 2 per rank) with `use_cpu` left unset (DeepSpeed's CPU accelerator, gloo). Every
process writes its training loss; rank 0 writes the trainable parameters (gathered from ZeRO-3 partitions)
to OUT_DIR/S-KIND-OBJECTIVE.safetensors, the trainer's saved folder to OUT_DIR/S-KIND-OBJECTIVE.saved/ and
OUT_DIR/S-KIND-OBJECTIVE.json (accelerate's distributed type and process count, the engine that wraps the
policy and the DPO reference, how many of their parameters are ZeRO-3 partitions, the local share of the
reference's elements).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    import ddp_worker

    from alignkit.distributed import full_parameters

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for case in cases:
        stage, kind, objective = case.split(":")
        os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage,
                           "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"})
        name = f"{out_dir}/{stage}-{kind}-{objective}"
        seen = {}

        def keep(trainer, seen=seen):
            seen["trainer"] = trainer

        ddp_worker.train_one(model_dir, name, kind, objective, on_trainer=keep, use_cpu=False)
        trainer = seen["trainer"]
        model = trainer.model_wrapped
        partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
        with full_parameters(model):
            full = {n.removeprefix("module."): p.detach().clone().contiguous()
                    for n, p in model.named_parameters() if p.requires_grad}
        trainer.save_model(name + ".saved")
        ref = getattr(trainer, "ref_model", None)
        info = {"distributed_type": str(trainer.accelerator.distributed_type), "world": trainer.accelerator.num_processes,
                "engine": type(model).__name__, "partitioned": partitioned,
                "loss": trainer.state.log_history[-1]["train_loss"],
                "reference_engine": type(ref).__name__ if ref is not None else None,
                "reference_partitioned": sum(hasattr(p, "ds_id") for p in ref.parameters()) if ref is not None else None,
                "reference_local_numel": sum(getattr(p, "ds_tensor", p).numel() for p in ref.parameters())
                if ref is not None else None,
                "reference_numel": sum(getattr(p, "ds_numel", p.numel()) for p in ref.parameters())
                if ref is not None else None}
        Path(f"{name}.rank{rank}.json").write_text(json.dumps(info))
        if rank == 0:
            save_file(full, f"{name}.safetensors")
        dist.barrier()
    from alignkit.distributed import exit_after_distributed_run

    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
