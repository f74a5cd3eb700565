"""TRL SFTTrainer on the benchmark's prompt/completion data (completion-only loss, TRL's default for
prompt-completion datasets). Run in bench/.envs/trl; args: see bench/common.py `parse_args`."""

from __future__ import annotations

import _trl

REFUSED = [(("group_by_length", "precompute_ref"),
            "--group-by-length / --precompute-ref are not measured for this TRL trainer")]


def build(args, folder, tok, data):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    # padding_free=True refuses a max_length (it would not be enforced); the data is shorter than it anyway.
    cfg = SFTConfig(**_trl.config_kwargs(args, "trl_sft"), padding_free=args.padding_free,
                    max_length=None if args.padding_free else args.max_length)
    return model, SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok), None


if __name__ == "__main__":
    _trl.run("sft", REFUSED, build)
