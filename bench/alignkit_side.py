"""alignkit's side of the CPU benchmark: same interface, model, data and settings as bench/peers/*.py.

    .venv/bin/python bench/alignkit_side.py --spec RUN/small/spec.json --run-dir RUN --task sft --out r.json [...]

One function per task (TASK_RUNNERS), each: load the benchmark model folder, tokenize the JSONL with
alignkit.data, build the alignkit trainer, attach `common.Meter`, train warmup + steps, write the result
with `common.finish(args, "alignkit", meter, ...)`. The alignkit imports are lazy: when a name the task
needs cannot be imported (the trainers are being written), the task writes a "skipped" result saying
so, and run_cpu.py shows the row as missing. See bench/README.md ("alignkit_side.py interface").

alignkit's speed knobs: precision "default" = float32 (alignkit never turns bf16 on by itself),
grad-ckpt "default" = off, --padding-free = the trainers' `padding_free=True` (SFT, DPO, ReFT-SFT; without it the trainers' default
`padding_free=None`, which packs on sdpa: same examples per batch, `alignkit.trainers.packing`),
--group-by-length = `group_by_length=True` (length-grouped sampler), --precompute-ref = DPO with
`reference_cache_dir` (reference log-probs computed once at construction, before timing starts),
--share-prompt = RM / DPO with `share_prompt=True` (one row per pair, the prompt run once).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for common.py

import common  # noqa: E402


def _import(args, module: str, *names: str) -> list[Any]:
    """`from module import names`, or write a skipped result ("not available yet") and exit."""
    import importlib

    try:
        mod = importlib.import_module(module)
        return [getattr(mod, n) for n in names]
    except (ImportError, AttributeError) as e:
        common.skip(args, "alignkit", f"not available yet: {module}.{{{', '.join(names)}}} ({e})")


def _training_args(args, name: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(args.run_dir) / "trainer_out" / name), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
        activation_checkpointing=args.grad_ckpt == "on", bf16=args.precision == "bf16")


def _tokenized(args, kind: str, tok) -> list[dict]:
    """The JSONL of `kind` ('sft' | 'pref' | 'reft') as alignkit records, tokenized (EOS appended)."""
    SFTRecord, PreferenceRecord, tokenize_records = _import(
        args, "alignkit.data", "SFTRecord", "PreferenceRecord", "tokenize_records")
    rows = common.read_jsonl(common.data_file(args.run_dir, args.spec_dict, kind))
    if kind == "pref":
        recs = [PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], id=str(i)) for i, r in enumerate(rows)]
    else:
        recs = [SFTRecord(r["prompt"], r["completion"], id=str(i)) for i, r in enumerate(rows)]
    feats, _ = tokenize_records(recs, tok, max_length=args.max_length, max_prompt_length=None)
    return feats


def _model(args, task: str = "causal_lm"):
    import torch

    (load_model,) = _import(args, "alignkit.models.loading", "load_model")
    torch.manual_seed(args.seed)  # a classifier's score head is initialised at load
    return load_model(common.model_dir(args.run_dir, args.spec_dict), task=task, dtype="float32",
                      num_labels=1 if task == "classifier" else None)


def _knobs(args) -> dict:
    """Trainer keyword arguments of the speed knobs; padding_free None = the trainer's default (on where faster)."""
    return {"padding_free": True if args.padding_free else None, "group_by_length": bool(args.group_by_length)}


def _train(args, trainer, meter_module, extra: dict | None = None) -> dict:
    import torch

    meter = common.Meter(meter_module, args.warmup, args.steps, args.batch_size, pad_token_id=0)  # SPECIALS[0]
    trainer.add_callback(common.trainer_callback(meter))
    trainer.train()
    (unwrap_lm,) = _import(args, "alignkit.adapters", "unwrap_lm")
    lm = unwrap_lm(trainer.model)
    # what ran, read off the trained model and the trainer (not the flags asked): common.fallbacks compares the two
    eff = {"effective": {"gradient_checkpointing": bool(getattr(lm, "is_gradient_checkpointing", False)),
                         "bf16": bool(trainer.args.bf16) or next(lm.parameters()).dtype == torch.bfloat16,
                         "padding_free": bool(getattr(trainer, "padding_free", args.padding_free)),
                         "group_by_length": bool(args.group_by_length),
                         "share_prompt": bool(getattr(trainer, "share_prompt", args.share_prompt)),
                         "max_length": args.max_length}}
    return common.finish(args, "alignkit", meter, {**eff, **(extra or {})}, libs=("alignkit", "accelerate"))


def run_sft(args, tok) -> dict:
    (SFTTrainer,) = _import(args, "alignkit.trainers", "SFTTrainer")
    (SFTCollator,) = _import(args, "alignkit.data", "SFTCollator")
    model = _model(args)
    trainer = SFTTrainer(model, _training_args(args, "alignkit_sft"), train_dataset=_tokenized(args, "sft", tok),
                         data_collator=SFTCollator(tok.pad_token_id), processing_class=tok, **_knobs(args))
    return _train(args, trainer, model)


def run_rm(args, tok) -> dict:
    (RewardTrainer,) = _import(args, "alignkit.trainers", "RewardTrainer")
    (PreferenceCollator,) = _import(args, "alignkit.data", "PreferenceCollator")
    model = _model(args, task="classifier")
    trainer = RewardTrainer(model, _training_args(args, "alignkit_rm"), train_dataset=_tokenized(args, "pref", tok),
                            data_collator=PreferenceCollator(tok.pad_token_id), processing_class=tok,
                            group_by_length=bool(args.group_by_length), share_prompt=True if args.share_prompt else None,
                            padding_free=True if args.padding_free else None)
    return _train(args, trainer, model)


def run_dpo(args, tok) -> dict:
    (PreferenceTrainer,) = _import(args, "alignkit.trainers", "PreferenceTrainer")
    (PreferenceCollator,) = _import(args, "alignkit.data", "PreferenceCollator")
    model = _model(args)
    # Full finetuning: the reference is a frozen copy, as in TRL (reference="auto" picks it), or log-probs
    # precomputed at construction (--precompute-ref; a fresh cache folder per run, so nothing is reused).
    cache = str(Path(args.out).with_suffix("")) + "-refcache" if args.precompute_ref else None
    trainer = PreferenceTrainer(model, _training_args(args, "alignkit_dpo"), loss_type="sigmoid", beta=0.1,
                                train_dataset=_tokenized(args, "pref", tok), reference_cache_dir=cache,
                                data_collator=PreferenceCollator(tok.pad_token_id), processing_class=tok,
                                share_prompt=True if args.share_prompt else None, **_knobs(args))
    return _train(args, trainer, model, {"reference": trainer.reference_mode})


def run_reft(args, tok) -> dict:
    """LoReFT at one layer (block output), rank --rank, positions --position; SFT loss on the answer."""
    (SFTTrainer,) = _import(args, "alignkit.trainers", "SFTTrainer")
    (SFTCollator,) = _import(args, "alignkit.data", "SFTCollator")
    AdapterConfig, ReftSettings, apply_adapter = _import(
        args, "alignkit.adapters", "AdapterConfig", "ReftSettings", "apply_adapter")
    import torch

    base = _model(args)
    torch.manual_seed(args.seed)
    reft = ReftSettings(config={"representations": [{"layer": args.layer, "component": "block_output",
                                                     "intervention": "loreft", "low_rank_dimension": args.rank}]},
                        positions=args.position, share_weights=True)
    model = apply_adapter(base, AdapterConfig(kind="reft", reft=reft))
    cache = {"auto": None, "on": True, "off": False}[args.reft_prefix_cache]
    trainer = SFTTrainer(model, _training_args(args, "alignkit_reft"), train_dataset=_tokenized(args, "reft", tok),
                         data_collator=SFTCollator(tok.pad_token_id), processing_class=tok, reft_prefix_cache=cache,
                         **_knobs(args))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _train(args, trainer, model, {"trainable_params": n_train, "intervention": "LoReFT",
                                         "layer": args.layer, "position": args.position,
                                         "reft_prefix_cache": args.reft_prefix_cache})


TASK_RUNNERS: dict[str, Callable] = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "reft": run_reft}


def main() -> None:
    args = common.parse_args()
    _import(args, "alignkit", "__name__")  # alignkit itself must import (this runs in the alignkit venv)
    common.setup_torch(args)
    if args.last_layer == "off":
        from alignkit.models import last_layer
        last_layer.ENABLED = False
    tok = common.load_tokenizer(common.model_dir(args.run_dir, args.spec_dict))
    TASK_RUNNERS[args.task](args, tok)


if __name__ == "__main__":
    main()
