"""ref_sync (TR-DPO) under a sharding engine, for tests/distributed/test_ref_sync_sharded.py (run under torchrun; not a
test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 ref_sync_worker.py ENGINE MODEL_DIR OUT_DIR

ENGINE "fsdp2" (the environment of configs/accelerate/fsdp2.yaml, use_cpu) or "zero3" (that of zero3-cpu.yaml,
DeepSpeed's CPU accelerator). Builds a full-finetuning PreferenceTrainer with ref_sync={"alpha": 0.5, "steps": 1} on
the 4 pairs of tests/distributed/ddp_worker.py and writes OUT_DIR/rank<R>.json: the ConfigError's text (None when
the trainer was built) and whether its output_dir exists.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ENV = {"fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                 "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"},
       "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                 "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}}


def main(engine: str, model_dir: str, out_dir: str) -> None:
    import torch
    from transformers import TrainingArguments

    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_worker import BAD, GOOD, PROMPTS

    from alignkit.data import PreferenceCollator, PreferenceRecord, tokenize_records
    from alignkit.distributed import exit_after_distributed_run
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.settings import ConfigError
    from alignkit.trainers import PreferenceTrainer

    torch.set_num_threads(1)
    os.environ.update(ENV[engine])
    tok = load_tokenizer(model_dir)
    feats, _ = tokenize_records([PreferenceRecord(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)], tok, max_length=48)
    run = Path(out_dir, "run")
    args = TrainingArguments(output_dir=str(run), per_device_train_batch_size=2, max_steps=1, optim="sgd",
                             learning_rate=0.5, report_to=[], save_strategy="no", use_cpu=engine == "fsdp2",
                             disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo")
    error, engine_seen = None, None
    try:
        trainer = PreferenceTrainer(load_model(model_dir), args, train_dataset=feats, loss_type="sigmoid", beta=0.5,
                                    data_collator=PreferenceCollator(tok.pad_token_id),
                                    ref_sync={"alpha": 0.5, "steps": 1})
        engine_seen = str(trainer.accelerator.distributed_type)
    except ConfigError as e:
        error = str(e)
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"error": error, "engine": engine_seen,
                                                              "written": run.exists()}))
    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
