"""Online resume under several processes, for tests/distributed/test_online_resume.py (run under torchrun;
not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 online_resume_worker.py MODEL_DIR OUT_DIR CASE...

For each CASE of online_worker.py: run A trains 3 steps with a checkpoint every 2 (`save_steps=2`:
checkpoints/checkpoint-2); run B, a fresh trainer built the same way, resumes from A's checkpoint-2 and
trains step 3 ("ppo-refused", "grpo-vllm-refused": only builds that trainer and records its refusal). Rank 0 writes OUT_DIR/CASE.json (both histories, the checkpoint's files) and the trainable
parameters of both runs (OUT_DIR/CASE-a.safetensors, CASE-b.safetensors). With ALIGNKIT_TEST_FSDP=1 the
environment of `accelerate launch --config_file configs/accelerate/fsdp2.yaml` is set first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    if os.environ.get("ALIGNKIT_TEST_FSDP") == "1":
        from fsdp_worker import FSDP_ENV

        os.environ.update(FSDP_ENV)
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from online_worker import build, trainable

    torch.set_num_threads(1)
    for case in cases:
        if case.endswith("-refused"):  # the trainer refuses at construction, in one line, before any output:
            #   ppo (FSDP2: the value head is not sharded), grpo-vllm (several processes: one vLLM engine each)
            try:
                build(model_dir, case.removesuffix("-refused"), f"{out_dir}/{case}")
                message = None
            except ValueError as e:
                message = str(e)
            if dist.get_rank() == 0:
                Path(f"{out_dir}/{case}.json").write_text(json.dumps(
                    {"message": message, "wrote": Path(f"{out_dir}/{case}").exists()}))
            continue
        runs = {}
        for name in ("a", "b"):
            trainer = build(model_dir, case, f"{out_dir}/{case}-{name}")
            trainer.config.steps, trainer.config.save_steps = 3, 2
            ckpt = Path(f"{out_dir}/{case}-a/checkpoints/checkpoint-2")
            history = trainer.train(resume_from_checkpoint=ckpt if name == "b" else None)
            runs[name] = (history, trainable(trainer), str(trainer.accelerator.distributed_type))
        if dist.get_rank() == 0:
            files = sorted(p.name for p in ckpt.iterdir())
            Path(f"{out_dir}/{case}.json").write_text(json.dumps(
                {"a": runs["a"][0], "b": runs["b"][0], "world": dist.get_world_size(), "checkpoint_files": files,
                 "distributed_type": runs["a"][2]}))
            for name in ("a", "b"):
                save_file(runs[name][1], f"{out_dir}/{case}-{name}.safetensors")
        dist.barrier()
    from alignkit.distributed import exit_after_distributed_run

    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
