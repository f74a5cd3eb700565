"""TRL SFTTrainer on the benchmark's prompt/completion data (completion-only loss, TRL's default for
prompt-completion datasets). Run in bench/.envs/trl; args: see bench/common.py `parse_args`."""

from __future__ import annotations

import _trl
from _trl import common


def main() -> None:
    args = common.parse_args()
    if args.group_by_length or args.precompute_ref:
        common.skip(args, "trl", "--group-by-length / --precompute-ref are not measured for this TRL trainer")
    common.setup_torch(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    spec = args.spec_dict
    folder = common.model_dir(args.run_dir, spec)
    tok = common.load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    data = Dataset.from_list(common.read_jsonl(common.data_file(args.run_dir, spec, "sft")))
    # padding_free=True refuses a max_length (it would not be enforced); the data is shorter than it anyway.
    cfg = SFTConfig(**_trl.config_kwargs(args, "trl_sft"), padding_free=args.padding_free,
                    max_length=None if args.padding_free else args.max_length)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    meter = common.Meter(model, args.warmup, args.steps, args.batch_size)
    _trl.train(trainer, meter, args)


if __name__ == "__main__":
    main()
