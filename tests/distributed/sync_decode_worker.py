"""Sharded generation worker for tests/distributed/test_sync_decode.py (run under torchrun; not a test module).

    python -m torch.distributed.run --standalone --nproc_per_node 2 sync_decode_worker.py MODEL_DIR OUT_DIR STOP_ID LEAN PROMPT0 PROMPT1

The tiny model is sharded with FSDP2 (`fully_shard` on each decoder layer, then the root, as accelerate's FSDP2
plugin does), so every forward all-gathers each layer's parameters: a collective. Rank r samples greedily for
PROMPT<r> with STOP_ID as a stop token. The test picks STOP_ID so that rank 0's answer ends after one token and
rank 1's runs to max_new_tokens: a decode loop that stops when its own rows are done leaves rank 1 waiting in
an all-gather rank 0 never joins (a hang). Each rank writes OUT_DIR/rank<r>.json with its response token ids.
"""

from __future__ import annotations

import json
import sys

import torch


def main(model_dir: str, out_dir: str, stop_id: str, lean: str, *prompts: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from alignkit.distributed import exit_after_distributed_run, gathered_root
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.online.generation import SamplingConfig, generate_responses

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    cfg = SamplingConfig(num_samples=1, max_new_tokens=8, do_sample=False, stop_token_ids=[int(stop_id)])
    with gathered_root(model):
        samples = generate_responses(model, tok, [prompts[rank]], cfg, lean={"auto": None, "off": False}[lean])
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump([s.response_ids for s in samples], f)
    dist.barrier()
    exit_after_distributed_run(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
