"""The ZeRO-3 reference of a ReFT + LoRA policy, for tests/distributed/test_zero3_reference.py (run under torchrun
with DS_ACCELERATOR=cpu; not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 zero3_reference_worker.py MODEL_DIR OUT_DIR

Trains DPO (sigmoid, beta 0.5) with adapter reft+lora under DeepSpeed ZeRO-3 for two SGD steps (global batch 4,
2 per rank; padded batches) as tests/distributed/ddp_worker.py does, recording every value the trainer's reference
returns (`Reference.logps`: the policy with its adapter switched off) with the rows it scored. Each rank writes
OUT_DIR/reference.rank<R>.pt (a list of {"input_ids", "attention_mask", "completion_mask", "reference"} per call)
and rank 0 writes the trainable parameters gathered from the ZeRO-3 partitions to OUT_DIR/trained.safetensors and
OUT_DIR/info.json (the engine, how many parameters are partitions, the training losses).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(model_dir: str, out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    import ddp_worker

    from alignkit.distributed import exit_after_distributed_run, full_parameters
    from alignkit.trainers.reference import Reference

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                       "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"})
    calls, logps = [], Reference.logps

    def recording(self, policy, batch, score=None):
        got = logps(self, policy, batch, score)
        calls.append({k: batch[k].detach().cpu() for k in ("input_ids", "attention_mask", "completion_mask")}
                     | {"reference": got.detach().cpu()})
        return got

    Reference.logps = recording
    seen = {}
    ddp_worker.train_one(model_dir, f"{out_dir}/run", "reft+lora", "dpo", on_trainer=lambda t: seen.update(t=t),
                         use_cpu=False, steps=2, layout={"padding_free": False, "share_prompt": False})
    trainer = seen["t"]
    model = trainer.model_wrapped
    with full_parameters(model):
        full = {n.removeprefix("module."): p.detach().clone().contiguous()
                for n, p in model.named_parameters() if p.requires_grad}
    torch.save(calls, f"{out_dir}/reference.rank{rank}.pt")
    if rank == 0:
        save_file(full, f"{out_dir}/trained.safetensors")
        Path(out_dir, "info.json").write_text(json.dumps({
            "engine": type(model).__name__, "mode": trainer.reference.mode,
            "partitioned": sum(hasattr(p, "ds_id") for p in model.parameters()),
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}))
    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
