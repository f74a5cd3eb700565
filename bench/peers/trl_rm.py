"""TRL RewardTrainer (pairwise Bradley-Terry) on the benchmark's preference triples. The reward model
is the benchmark's tiny Llama loaded as a sequence classifier with one label (a fresh, seeded score
head). Run in bench/.envs/trl; args: see bench/common.py `parse_args`."""

from __future__ import annotations

import _trl

REFUSED = [(("group_by_length", "precompute_ref"),
            "--group-by-length / --precompute-ref are not measured for this TRL trainer")]


def build(args, folder, tok, data):
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(args.seed)  # the score head is initialised at load
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype="float32")
    cfg = RewardConfig(**_trl.config_kwargs(args, "trl_rm"), max_length=args.max_length)
    return model, RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok), None


if __name__ == "__main__":
    _trl.run("pref", REFUSED, build)
