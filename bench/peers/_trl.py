"""What the TRL peer scripts share (run in bench/.envs/trl, where alignkit is not installed): the speed knobs and
TrainingArguments of every TRL run, and `run`, the body of the offline scripts (trl_sft.py, trl_rm.py,
trl_dpo.py): arguments, refused flags, data, model, trainer, meter, result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py

import common  # noqa: E402


def speed_kwargs(args) -> dict:
    """The speed knobs set on the command line. Left at 'default' they are NOT passed, so TRL's own defaults apply
    (in TRL 1.16: gradient_checkpointing=True, bf16=True unless fp16)."""
    kw = {}
    if args.grad_ckpt != "default":
        kw["gradient_checkpointing"] = args.grad_ckpt == "on"
    if args.precision != "default":
        kw["bf16"] = args.precision == "bf16"
    return kw


def config_kwargs(args, name: str) -> dict:
    """TrainingArguments shared by every offline TRL run, speed knobs included (`speed_kwargs`)."""
    return dict(output_dir=str(Path(args.run_dir) / "trainer_out" / name), per_device_train_batch_size=args.batch_size,
                max_steps=args.warmup + args.steps, learning_rate=args.lr, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
                **speed_kwargs(args))


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


# build(args, model folder, tokenizer, dataset) -> (model, trainer, extra result fields)
Build = Callable[[Any, Path, Any, Any], "tuple[Any, Any, dict | None]"]


def run(data: str, refused: list[tuple[tuple[str, ...], str]], build: Build) -> dict:
    """One offline TRL benchmark run: the benchmark's arguments (`common.parse_args`); a skipped result naming the
    reason when one of a `refused` entry's flags is set; the scenario's tokenizer and its `data` file ("sft" or
    "pref") as a datasets.Dataset; `build` makes the model and the trainer; trained under the step meter."""
    args = common.parse_args()
    for flags, reason in refused:
        if any(getattr(args, flag) for flag in flags):
            common.skip(args, "trl", reason)
    common.setup_torch(args)
    from datasets import Dataset

    spec = args.spec_dict
    folder = common.model_dir(args.run_dir, spec)
    tok = common.load_tokenizer(folder)
    dataset = Dataset.from_list(common.read_jsonl(common.data_file(args.run_dir, spec, data)))
    model, trainer, extra = build(args, folder, tok, dataset)
    meter = common.Meter(model, args.warmup, args.steps, args.batch_size)
    return train(trainer, meter, args, extra)
