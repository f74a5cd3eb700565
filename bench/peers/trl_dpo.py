"""TRL DPOTrainer (sigmoid loss, beta 0.1) on the benchmark's preference triples, full finetuning:
TRL loads a second, frozen copy of the model as the reference. Run in bench/.envs/trl; args: see
bench/common.py `parse_args`.

TRL 1.16 has no `max_prompt_length` any more (only `max_length`), and `padding_free=True` is
accepted but switched off with a warning ("temporarily unavailable after a refactor"), so the
script refuses --padding-free rather than report a setting that did not run."""

from __future__ import annotations

import _trl
from _trl import common


def main() -> None:
    args = common.parse_args()
    if args.padding_free:
        common.skip(args, "trl", "TRL 1.16 DPOTrainer disables padding_free (falls back to padding)")
    if args.group_by_length:
        common.skip(args, "trl", "TRL's DPO data has no input_ids column for transformers' length-grouped sampler")
    common.setup_torch(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    spec = args.spec_dict
    folder = common.model_dir(args.run_dir, spec)
    tok = common.load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    data = Dataset.from_list(common.read_jsonl(common.data_file(args.run_dir, spec, "pref")))
    cfg = DPOConfig(**_trl.config_kwargs(args, "trl_dpo"), max_length=args.max_length, beta=0.1,
                    loss_type=["sigmoid"], precompute_ref_log_probs=args.precompute_ref)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    meter = common.Meter(model, args.warmup, args.steps, args.batch_size)
    ref = "precomputed before training" if args.precompute_ref else "frozen copy (TRL default for full finetuning)"
    _trl.train(trainer, meter, args, {"reference": ref})


if __name__ == "__main__":
    main()
