"""TRL RewardTrainer (pairwise Bradley-Terry) on the benchmark's preference triples. The reward model
is the benchmark's tiny Llama loaded as a sequence classifier with one label (a fresh, seeded score
head). Run in bench/.envs/trl; args: see bench/common.py `parse_args`."""

from __future__ import annotations

import _trl
from _trl import common


def main() -> None:
    args = common.parse_args()
    if args.group_by_length or args.precompute_ref:
        common.skip(args, "trl", "--group-by-length / --precompute-ref are not measured for this TRL trainer")
    common.setup_torch(args)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    spec = args.spec_dict
    folder = common.model_dir(args.run_dir, spec)
    tok = common.load_tokenizer(folder)
    torch.manual_seed(args.seed)  # the score head is initialised at load
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype="float32")
    data = Dataset.from_list(common.read_jsonl(common.data_file(args.run_dir, spec, "pref")))
    cfg = RewardConfig(**_trl.config_kwargs(args, "trl_rm"), max_length=args.max_length)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    meter = common.Meter(model, args.warmup, args.steps, args.batch_size)
    _trl.train(trainer, meter, args)


if __name__ == "__main__":
    main()
