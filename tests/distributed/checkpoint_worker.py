"""`train.save_steps` checkpoints of the offline trainers under FSDP2 and DeepSpeed, for
tests/distributed/test_checkpoints.py (run under torchrun; not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 checkpoint_worker.py ENGINE MODEL_DIR OUT_DIR KIND:OBJECTIVE...

ENGINE "fsdp" sets the environment of `accelerate launch --config_file configs/accelerate/fsdp2.yaml`, "zero3"
that of zero3-cpu.yaml. For each case, run A trains 3 AdamW steps (global batch 4, 2 per rank, the examples
of tests/distributed/ddp_worker.py) with a checkpoint every 2 steps (checkpoint-2); run B, a fresh trainer
built the same way, resumes from A's checkpoint-2 and trains step 3 (zero3: records the refusal instead).
Rank 0 writes OUT_DIR/KIND-OBJECTIVE.json (both runs' per-step losses, how many training steps each really
ran, the checkpoint's files, the refusal)
and both runs' trainable parameters, gathered (KIND-OBJECTIVE-a.safetensors, -b.safetensors). Case
"ds-mismatch" (zero3) only builds a trainer whose DeepSpeed config sets gradient_accumulation_steps 4 against the
arguments' 1 and records the refusal (OUT_DIR/ds-mismatch.json); "ds-optimizer" likewise with a DeepSpeed JSON
(deepspeed_config_file) that has its own optimizer and scheduler sections (OUT_DIR/ds-optimizer.json), and
"ds-precision" with accelerate's mixed_precision bf16 against train.bf16 unset (OUT_DIR/ds-precision.json).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def build(model_dir: str, out: str, kind: str, objective: str, use_cpu: bool):
    import torch
    from transformers import TrainingArguments

    from alignkit.data import PreferenceCollator, PreferenceRecord, SFTCollator, SFTRecord, tokenize_records
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.trainers import PreferenceTrainer, SFTTrainer
    from ddp_worker import BAD, GOOD, PROMPTS

    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = apply_adapter(load_model(model_dir), AdapterConfig(kind=kind, lora=LoraSettings(r=2, alpha=4.0) if "lora" in kind else LoraSettings()))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3, optim="adamw_torch",
                             learning_rate=1e-2, max_grad_norm=0.0, lr_scheduler_type="linear", weight_decay=0.0,
                             report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, data_seed=0, ddp_backend="gloo", use_cpu=use_cpu)
    if objective == "sft":
        feats, _ = tokenize_records([SFTRecord(p, c) for p, c in zip(PROMPTS, GOOD)], tok, max_length=48)
        return SFTTrainer(model, args, train_dataset=feats, data_collator=SFTCollator(tok.pad_token_id))
    recs = [PreferenceRecord(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)]
    feats, _ = tokenize_records(recs, tok, max_length=48)
    return PreferenceTrainer(model, args, train_dataset=feats, data_collator=PreferenceCollator(tok.pad_token_id),
                             loss_type="sigmoid", beta=0.5)


def main(engine: str, model_dir: str, out_dir: str, *cases: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    if engine == "fsdp":
        from fsdp_worker import FSDP_ENV

        os.environ.update(FSDP_ENV)
    else:
        os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": engine[-1],
                           "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"})
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from alignkit.distributed import exit_after_distributed_run, full_parameters

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for case in cases:
        if case in ("ds-mismatch", "ds-optimizer", "ds-precision"):
            if case == "ds-mismatch":  # accelerate's deepspeed_config gradient_accumulation_steps 4 vs the run's 1
                key, value = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4"
            elif case == "ds-precision":  # accelerate's mixed_precision: bf16 against train.bf16 unset
                key, value = "ACCELERATE_MIXED_PRECISION", "bf16"
            else:  # a DeepSpeed-Chat style JSON with its own optimizer and schedule, "auto" values elsewhere
                key, value = "ACCELERATE_DEEPSPEED_CONFIG_FILE", f"{out_dir}/ds_config.json"
                if rank == 0:
                    Path(value).write_text(json.dumps({
                        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                        "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}))
                dist.barrier()
            os.environ[key] = value
            try:
                build(model_dir, f"{out_dir}/{case}", "lora", "sft", use_cpu=False)
                message = None
            except ValueError as e:
                message = f"{type(e).__name__}: {e}"
            finally:
                del os.environ[key]
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()  # the refused trainer's ZeRO-3 config would shape the next case's loading
            if rank == 0:
                Path(f"{out_dir}/{case}.json").write_text(json.dumps({"refused": message}))
            dist.barrier()
            continue
        kind, objective = case.split(":")
        name = f"{out_dir}/{kind}-{objective}"
        ckpt = Path(f"{name}-a/checkpoint-2")
        result: dict = {"world": int(os.environ["WORLD_SIZE"])}
        for run in ("a", "b"):
            trainer = build(model_dir, f"{name}-{run}", kind, objective, use_cpu=engine == "fsdp")  # DeepSpeed: unset
            calls = []
            step = trainer.training_step
            trainer.training_step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]  # count what really ran
            try:
                trainer.train(resume_from_checkpoint=str(ckpt) if run == "b" else None)
            except Exception as e:  # noqa: BLE001 - the refusal is what is recorded
                import traceback

                result["refused"], result["traceback"] = f"{type(e).__name__}: {e}", traceback.format_exc()
                break
            result[run] = [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]
            result[f"{run}_steps_run"] = len(calls)
            result["distributed_type"] = str(trainer.accelerator.distributed_type)
            model = trainer.model_wrapped
            with full_parameters(model):
                params = {n.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p)
                          .detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            if rank == 0:
                save_file(params, f"{name}-{run}.safetensors")
            if run == "a" and rank == 0:
                result["checkpoint_files"] = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
        if rank == 0:
            Path(f"{name}.json").write_text(json.dumps(result))
        dist.barrier()
    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
