"""TRL 1.16 GRPOTrainer / OnlineDPOTrainer (trl.experimental.online_dpo) on the online CPU suite's tiny Llama,
prompts and reward (`common.even_fraction`), full finetuning (a frozen reference copy when beta > 0). Run in
bench/.envs/trl; args: `common.parse_online_args`.

Matched to alignkit's side: prompts_per_step prompts x num_samples completions per step, max_new_tokens,
temperature 1.0, no top-k / top-p, one optimizer update per generation (GRPO: per_device_train_batch_size =
prompts x samples, num_iterations=1, steps_per_generation=1; online DPO: 2 completions per prompt, batch =
prompts). Speed knobs left at "default" keep TRL's own (gradient checkpointing on, bf16 autocast on).
Generated tokens are counted on the policy's `generate` (each row up to and including its first EOS)."""

from __future__ import annotations

from pathlib import Path

import _trl
from _trl import common


def main() -> None:
    args = common.parse_online_args()
    common.setup_torch(args)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    folder = common.model_dir(args.run_dir, args.spec_dict)
    tok = common.load_tokenizer(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    data = Dataset.from_dict({"prompt": common.online_prompts(args)})
    kw = dict(output_dir=str(Path(args.run_dir) / "trainer_out" / f"trl_{args.method}"), max_steps=args.warmup + args.steps,
              learning_rate=args.lr, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
              dataloader_num_workers=0, disable_tqdm=True, seed=args.seed, temperature=1.0, top_p=1.0, top_k=0,
              **_trl.speed_kwargs(args))
    eos = tok.eos_token_id
    clock = common.StepClock(args.warmup, args.steps)
    if args.method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(per_device_train_batch_size=args.prompts_per_step * args.num_samples,
                         num_generations=args.num_samples, max_completion_length=args.max_new_tokens, beta=args.beta,
                         num_iterations=1, steps_per_generation=1, log_completions=False, **kw)
        trainer = GRPOTrainer(model=model, reward_funcs=[common.even_fraction], args=cfg, train_dataset=data,
                              processing_class=tok)
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        if args.num_samples != 2:
            common.skip(args, "trl", "TRL's online DPO samples exactly 2 completions per prompt")
        cfg = OnlineDPOConfig(per_device_train_batch_size=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                              beta=[args.beta], **kw)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=[common.even_fraction], args=cfg, train_dataset=data,
                                   processing_class=tok)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    generate = policy.generate

    def counted_generate(*a, **k):
        out = generate(*a, **k)
        seqs = out.sequences if hasattr(out, "sequences") else out
        prompt_len = (k.get("input_ids") if k.get("input_ids") is not None else a[0]).shape[1]
        new = seqs[:, prompt_len:]
        is_eos = new == eos
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full_like(is_eos[:, 0], new.shape[1],
                                                                                           dtype=torch.long))
        clock.add_generated(int(first.sum()))
        return out

    policy.generate = counted_generate

    trainer.add_callback(common.trainer_callback(clock))
    trainer.train()
    t = trainer.args
    common.finish_online(args, "trl", clock, {"effective": {"gradient_checkpointing": bool(t.gradient_checkpointing),
                                                            "bf16": bool(t.bf16), "beta": args.beta,
                                                            "torch_threads": torch.get_num_threads()}},
                         libs=("trl", "accelerate"))


if __name__ == "__main__":
    main()
