"""TRL DPOTrainer (sigmoid loss, beta 0.1) on the benchmark's preference triples, full finetuning:
TRL loads a second, frozen copy of the model as the reference. Run in bench/.envs/trl; args: see
bench/common.py `parse_args`.

TRL 1.16 has no `max_prompt_length` any more (only `max_length`), and `padding_free=True` is
accepted but switched off with a warning ("temporarily unavailable after a refactor"), so the
script refuses --padding-free rather than report a setting that did not run."""

from __future__ import annotations

import _trl

REFUSED = [(("padding_free",), "TRL 1.16 DPOTrainer disables padding_free (falls back to padding)"),
           (("group_by_length",), "TRL's DPO data has no input_ids column for transformers' length-grouped sampler")]


def build(args, folder, tok, data):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    cfg = DPOConfig(**_trl.config_kwargs(args, "trl_dpo"), max_length=args.max_length, beta=0.1,
                    loss_type=["sigmoid"], precompute_ref_log_probs=args.precompute_ref)
    ref = "precomputed before training" if args.precompute_ref else "frozen copy (TRL default for full finetuning)"
    return model, DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok), {"reference": ref}


if __name__ == "__main__":
    _trl.run("pref", REFUSED, build)
