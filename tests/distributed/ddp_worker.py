"""One DDP worker for tests/distributed/test_ddp.py (run under torchrun; not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node N ddp_worker.py MODEL_DIR OUT_DIR KIND:OBJECTIVE...

For each KIND:OBJECTIVE, trains one optimizer step (SGD, lr 0.5) on 4 fixed examples with a global batch
of 4 (per-device 4 / N), then rank 0 writes the trainable parameters to OUT_DIR/KIND-OBJECTIVE.safetensors.
`train_one` is also called in-process by the test for the one-process reference.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from alignkit.data import PreferenceCollator, PreferenceRecord, SFTCollator, SFTRecord, tokenize_records
from alignkit.distributed import exit_after_distributed_run
from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.trainers import PreferenceTrainer, SFTTrainer

PROMPTS = ["Question: what is the capital of France?", "Hello! How can I help you", "def add(a, b):",
           "The quick brown fox"]
GOOD = [" Answer: Paris.", " today? I am here to help with anything at all.", "\n    return a + b\n", " jumps."]
BAD = [" Answer: 12.", " no", " pass", " sleeps over the lazy dog all day long."]


def train_one(model_dir: str, out: str, kind: str, objective: str, on_trainer=None,
              use_cpu: bool = True, steps: int = 1, layout: dict | None = None) -> dict[str, torch.Tensor]:
    """`steps` optimizer steps (loss logged at each); `layout`: the trainer's padding_free / share_prompt (unset:
    their defaults)."""
    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    reft = ReftSettings(config={"representations": [{"layer": 1, "low_rank_dimension": 2}]}, positions="f1+l1")
    model = apply_adapter(load_model(model_dir), AdapterConfig(kind=kind, lora=LoraSettings(r=2, alpha=4.0) if "lora" in kind else LoraSettings(),
                                                               reft=reft if "reft" in kind else None))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=out + ".run", per_device_train_batch_size=4 // world, max_steps=steps,
                             optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant",
                             weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=use_cpu, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, data_seed=0, ddp_backend="gloo" if world > 1 else None,
                             logging_steps=1)
    if objective == "sft":
        feats, _ = tokenize_records([SFTRecord(p, c) for p, c in zip(PROMPTS, GOOD)], tok, max_length=48)
        trainer = SFTTrainer(model, args, train_dataset=feats, data_collator=SFTCollator(tok.pad_token_id),
                             **(layout or {}))
    else:
        recs = [PreferenceRecord(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)]
        feats, _ = tokenize_records(recs, tok, max_length=48)
        trainer = PreferenceTrainer(model, args, train_dataset=feats, data_collator=PreferenceCollator(tok.pad_token_id),
                                    loss_type=["sigmoid", "sft"] if objective == "dpo_sft" else "sigmoid", beta=0.5,
                                    **(layout or {}))
    trainer.train()
    if on_trainer is not None:
        on_trainer(trainer)
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    torch.set_num_threads(1)
    for case in cases:
        kind, objective = case.split(":")
        params = train_one(model_dir, f"{out_dir}/{kind}-{objective}", kind, objective)
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(params, f"{out_dir}/{kind}-{objective}.safetensors")
    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
