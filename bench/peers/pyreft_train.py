"""pyreft ReftTrainerForCausalLM: LoReFT (rank --rank) at one layer's block output, positions
"l1" (last prompt token) or "f1+l1" (first and last, one shared intervention), on the benchmark's
prompt -> answer pairs; the base model is frozen. Run in bench/.envs/pyreft (transformers 4.45);
args: see bench/common.py `parse_args`.

pyreft has no speed knobs: no gradient checkpointing or padding-free path, so its default and
fastest settings are the same run; --grad-ckpt on / --padding-free / --precision bf16 are refused.
LoreftIntervention builds its `learned_source` in bfloat16 unless given `dtype` (a silent default
that fails on a float32 model), so dtype=float32 is passed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py

import common  # noqa: E402


def main() -> None:
    args = common.parse_args()
    if args.grad_ckpt == "on" or args.padding_free or args.precision == "bf16" or args.group_by_length:
        common.skip(args, "pyreft", "pyreft offers no gradient checkpointing / padding-free / bf16 knob here")
    common.setup_torch(args)
    import pyreft
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    spec = args.spec_dict
    folder = common.model_dir(args.run_dir, spec)
    tok = common.load_tokenizer(folder, padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    rows = common.read_jsonl(common.data_file(args.run_dir, spec, "reft"))
    hidden = spec["model"]["hidden_size"]
    torch.manual_seed(args.seed)
    reft_config = pyreft.ReftConfig(representations={
        "layer": args.layer, "component": "block_output", "low_rank_dimension": args.rank,
        "intervention": pyreft.LoreftIntervention(embed_dim=hidden, low_rank_dimension=args.rank,
                                                  dtype=torch.float32)})
    reft_model = pyreft.get_reft_model(model, reft_config)
    data_module = pyreft.make_multiple_position_supervised_data_module(
        tok, model, [r["prompt"] for r in rows], [r["completion"] for r in rows],
        positions=args.position, num_interventions=1, share_weights=True)
    targs = TrainingArguments(
        output_dir=str(Path(args.run_dir) / "trainer_out" / "pyreft"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
        remove_unused_columns=False)
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=targs, **data_module)
    # pyvene removes every forward hook on the base model at each call, so count on the wrapper.
    meter = common.Meter(reft_model, args.warmup, args.steps, args.batch_size)
    trainer.add_callback(common.trainer_callback(meter))
    trainer.train()
    n_train = sum(p.numel() for p in reft_model.parameters() if p.requires_grad)
    common.finish(args, "pyreft", meter, {"trainable_params": n_train, "intervention": "LoReFT",
                                          "layer": args.layer, "position": args.position},
                  libs=("pyreft", "pyvene", "accelerate"))


if __name__ == "__main__":
    main()
