"""Layout workers for tests/distributed/test_packing.py (run under torchrun; not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 packing_worker.py MODEL_DIR OUT_DIR ENGINE

ENGINE "ddp" or "fsdp" (the environment of tests/distributed/fsdp_worker.py). For each case of `CASES` trains
what tests/distributed/ddp_worker.py trains (LoRA, SGD, global batch 4, 2 per rank) for 2 steps with the
trainer's layout arguments of that case (none: the defaults), and rank 0 writes OUT_DIR/<case>.safetensors
(the trainable parameters, full tensors) and OUT_DIR/<case>.json (the layout the trainer resolved, the loss
logged at each step, the accelerate distributed type and the number of processes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# case -> (objective, the trainer's layout arguments)
CASES = {"sft-default": ("sft", {}), "sft-padded": ("sft", {"padding_free": False}),
         "dpo-default": ("dpo", {}), "dpo-packed": ("dpo", {"padding_free": True}),
         "dpo-padded": ("dpo", {"padding_free": False, "share_prompt": False})}


def main(model_dir: str, out_dir: str, engine: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    if engine == "fsdp":
        from fsdp_worker import FSDP_ENV

        os.environ.update(FSDP_ENV)
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    import ddp_worker

    torch.set_num_threads(1)
    for case, (objective, layout) in CASES.items():
        seen = {}

        def keep(trainer, seen=seen):
            seen["trainer"] = trainer

        params = ddp_worker.train_one(model_dir, f"{out_dir}/{case}", "lora", objective, on_trainer=keep, steps=2,
                                      layout=layout)
        trainer = seen["trainer"]
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous() for n, p in params.items()}
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(full, f"{out_dir}/{case}.safetensors")
            Path(f"{out_dir}/{case}.json").write_text(json.dumps(
                {"padding_free": trainer.padding_free, "share_prompt": getattr(trainer, "share_prompt", False),
                 "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                 "distributed_type": str(trainer.accelerator.distributed_type),
                 "world": trainer.accelerator.num_processes}))
    from alignkit.distributed import exit_after_distributed_run

    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
