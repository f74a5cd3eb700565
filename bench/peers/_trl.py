"""Helpers shared by the TRL peer scripts (run in bench/.envs/trl, where alignkit is not installed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py

import common  # noqa: E402


def config_kwargs(args, name: str) -> dict:
    """TrainingArguments shared by every TRL run. Speed knobs left at 'default' are NOT passed, so
    TRL's own defaults apply (in TRL 1.16: gradient_checkpointing=True, bf16=True unless fp16)."""
    kw = dict(output_dir=str(Path(args.run_dir) / "trainer_out" / name), per_device_train_batch_size=args.batch_size,
              max_steps=args.warmup + args.steps, learning_rate=args.lr, logging_steps=1, report_to="none",
              save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed)
    if args.grad_ckpt != "default":
        kw["gradient_checkpointing"] = args.grad_ckpt == "on"
    if args.precision != "default":
        kw["bf16"] = args.precision == "bf16"
    return kw


def effective(trainer) -> dict:
    """The speed settings TRL actually ran with (after its defaults)."""
    a = trainer.args
    return {"effective": {"gradient_checkpointing": bool(a.gradient_checkpointing), "bf16": bool(a.bf16),
                          "padding_free": bool(getattr(a, "padding_free", False)),
                          "max_length": getattr(a, "max_length", None)}}


def train(trainer, meter: common.Meter, args, extra: dict | None = None) -> dict:
    trainer.add_callback(common.trainer_callback(meter))
    trainer.train()
    return common.finish(args, "trl", meter, {**effective(trainer), **(extra or {})}, libs=("trl", "accelerate"))
