"""One online-training worker for tests/distributed/test_online_ddp.py (run under torchrun; not a test module).

    python -m torch.distributed.run --standalone --nproc_per_node 2 online_worker.py MODEL_DIR OUT_DIR CASE...

For each CASE (see `CASES`) it trains `STEPS` online steps with a global batch of 4 prompts, recording the
samples every rank generated (and the sampling seed it used). Rank 0 then writes OUT_DIR/CASE.safetensors
(the trainable parameters), OUT_DIR/CASE.json (per step, every rank's samples in rank order, and the seeds)
and the run's metrics.jsonl under OUT_DIR/CASE/. `build` is also called in-process by the test for the
one-process reference, which replays the recorded samples instead of sampling.

The optimizer is plain SGD (`optimizer="sgd"`): Adam's first step, lr * g / (|g| + eps), turns float-noise-sized
gradient differences into lr-sized parameter differences, which would hide what is compared here.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from alignkit.distributed import exit_after_distributed_run
from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.online import GRPOConfig, GRPOTrainer, OnlineDPOConfig, OnlineDPOTrainer, PPOConfig, PPOTrainer
from alignkit.online.generation import SamplingConfig

PROMPTS = ["Question: what is 2 + 2?", "Say something nice.", "def add(a, b):", "The quick brown fox",
           "Count to five:", "Name a colour."]
STEPS = 2
# held-out prompts of case "grpo-eval": 5 over 2 ranks, so each rank evaluates 2 and the fifth is left out
EVAL_PROMPTS = ["Tell me a joke.", "What is the capital of France?", "List three fruits.", "Say hello.",
                "Spell 'cat'."]


def reward(prompt, response) -> float:
    """Deterministic, varied across samples: characters mod 7, plus a bonus per vowel."""
    return float(len(response) % 7) + 0.5 * sum(ch in "aeiou" for ch in response)


# case -> (trainer class, adapter kind, config)
def CASES(case: str):
    sampling = SamplingConfig(num_samples=2, max_new_tokens=5)
    common = dict(steps=STEPS, prompts_per_step=4, sampling=sampling, max_grad_norm=None, seed=3, optimizer="sgd")
    if case == "rloo":  # leave-one-out baselines, running moments over every rank's scores, 2 micro-batches
        return GRPOTrainer, "lora", GRPOConfig(advantage="rloo", reward_normalization="running", kl_coef=0.1,
                                               gradient_accumulation_steps=2, **common)
    if case == "grpo-token":  # token_sum aggregation: the normaliser is the global token count
        return GRPOTrainer, "lora", GRPOConfig(aggregation="token_sum", kl_coef=0.1, **common)
    if case == "grpo-full":  # full finetuning: the frozen reference copy (FSDP: sharded like the policy)
        return GRPOTrainer, "full", GRPOConfig(kl_coef=0.2, gradient_accumulation_steps=3, **common)
    if case == "dpo":  # full finetuning, frozen-copy reference, pair counts differ per rank
        return OnlineDPOTrainer, "full", OnlineDPOConfig(beta=0.5, **common)
    if case == "dpo-simpo":  # a reference-free loss, full finetuning: no reference on either rank
        return OnlineDPOTrainer, "full", OnlineDPOConfig(beta=0.5, loss_type="simpo", **common)
    if case == "grpo-eval":  # held-out evaluation after every step, each rank on its share of EVAL_PROMPTS
        return GRPOTrainer, "lora", GRPOConfig(kl_coef=0.1, eval_steps=1, **common)
    if case == "grpo-adam":  # AdamW (optimizer state to checkpoint), "running" reward moments (their state too; they
        #   scale Dr. GRPO's advantage: GRPO's std would undo them, and is refused with them)
        return GRPOTrainer, "lora", GRPOConfig(kl_coef=0.1, reward_normalization="running", scale_by_std=False,
                                               **{**common, "optimizer": "adamw"})
    if case == "grpo-vllm":  # vLLM generation: one engine in one process; several processes are refused
        return GRPOTrainer, "lora", GRPOConfig(generation_backend="vllm", **common)
    if case == "ppo":  # advantages whitened over every rank's tokens, 2 epochs
        return PPOTrainer, "lora", PPOConfig(epochs_per_step=2, **common)
    if case == "ppo-ptx-ema":  # PPO-ptx (3 records a batch: 1 on rank 0, 2 on rank 1, NLL over the global tokens)
        #   and the actor EMA, 2 epochs, 2 micro-batches: the EMA once per optimizer step
        return PPOTrainer, "lora", PPOConfig(epochs_per_step=2, ptx_coef=0.5, ptx_batch_size=3, ema_decay=0.6,
                                             gradient_accumulation_steps=2, **common)
    if case == "ppo-ptx-ga":  # PPO-ptx in 2 micro-batches (5 records, 2 on rank 0, 3 on rank 1); under FSDP2 PPO is
        #   refused (its value head is not sharded: test_ppo_ptx_under_fsdp2_is_refused_in_one_line)
        return PPOTrainer, "lora", PPOConfig(ptx_coef=0.2, ptx_batch_size=5, gradient_accumulation_steps=2, **common)
    if case == "ppo-ptx1":  # a ptx batch of 1 record over 2 ranks: rank 0 takes a zero-weight pass
        return PPOTrainer, "lora", PPOConfig(ptx_coef=0.2, ptx_batch_size=1, **common)
    if case == "gdpo":  # normalize_then_sum: each function standardised per group, the sum over every rank's items
        return GRPOTrainer, "lora", GRPOConfig(multi_objective_aggregation="normalize_then_sum", kl_coef=0.1,
                                               **common)
    raise ValueError(case)


# PPO-ptx's records (plain strings: every token trained), of unlike lengths: the ranks' token counts differ
PTX = ["The cat sat on the mat.", "1 2 3 4 5 6 7 8 9 10 11 12", "Hello!",
       "A longer sentence about nothing in particular."]


def first_prompt(prompt, response) -> float:
    """GDPO's first function: `reward` on PROMPTS[0], a constant (no signal) on the others."""
    return reward(prompt, response) if prompt == PROMPTS[0] else 1.0


def second_prompt(prompt, response) -> float:
    """GDPO's second function: the response's length on PROMPTS[1], a constant on the others. So a rank whose
    share of a step holds neither prompt has no signal of its own, while the other rank's does."""
    return float(len(response)) if prompt == PROMPTS[1] else 2.0


def annotator(case: str):
    """The case's reward: `reward`, or (gdpo) two functions weighted 1 and 0.5."""
    if case != "gdpo":
        return reward
    from alignkit.online import FunctionAnnotator

    return FunctionAnnotator([first_prompt, second_prompt], weights=[1.0, 0.5])


def build(model_dir: str, case: str, output_dir: str | None = None):
    cls, kind, cfg = CASES(case.split("+")[0])  # CASE+SETTING: an accelerate FSDP setting on (fsdp_worker.SETTINGS)
    torch.manual_seed(0)
    model = apply_adapter(load_model(model_dir), AdapterConfig(kind=kind, lora=LoraSettings(r=2, alpha=4.0) if "lora" in kind else LoraSettings()))
    cfg.learning_rate = 0.5 if kind == "lora" else 0.05
    extra = {"ptx_data": PTX} if case.startswith("ppo-ptx") else {}
    trainer = cls(model, load_tokenizer(model_dir), PROMPTS, annotator(case), cfg, output_dir=output_dir,
                  eval_prompts=EVAL_PROMPTS if case == "grpo-eval" else None, **extra)
    flats: list = []  # each step's no-signal judgement (over every process's items; gdpo: its own)
    score = trainer.score

    def recording_score(*a, score=score, **k):
        out = score(*a, **k)
        flats.append(getattr(trainer, "_step_flat", None))
        return out

    trainer.score, trainer.flats = recording_score, flats
    return trainer


def trainable(trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous().clone()
           for n, p in trainer.policy.named_parameters() if p.requires_grad}
    if hasattr(trainer, "value_head"):
        vh = trainer.accelerator.unwrap_model(trainer.value_head)
        out.update({f"value_head.{n}": p.detach().contiguous().clone() for n, p in vh.named_parameters()})
    return out


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if os.environ.get("ALIGNKIT_TEST_FSDP") == "1":  # what `accelerate launch` with configs/accelerate/fsdp2.yaml sets
        from fsdp_worker import FSDP_ENV

        os.environ.update(FSDP_ENV)

    torch.set_num_threads(1)
    for case in cases:
        setting = case.split("+")[1:]
        if setting:  # under FSDP only (ALIGNKIT_TEST_FSDP)
            from fsdp_worker import SETTINGS

            os.environ.update({SETTINGS[s]: "true" for s in setting})
        trainer = build(model_dir, case, f"{out_dir}/{case}")
        record: list[dict] = []
        generate = trainer.generate

        def recording(prompts, step, generate=generate, record=record):
            samples = generate(prompts, step)
            record.append({"seed": trainer.sampling_seed(step), "samples": [s.to_dict() for s in samples]})
            return samples

        trainer.generate = recording
        evals: list[dict] = []  # held-out evaluations (their own seed): this rank's prompts and samples
        sample_prompts = trainer.sample_prompts

        def recording_eval(prompts, seed, sample_prompts=sample_prompts, evals=evals):
            samples = sample_prompts(prompts, seed)
            if prompts is trainer.eval_prompts:
                evals.append({"seed": seed, "samples": [s.to_dict() for s in samples]})
            return samples

        trainer.sample_prompts = recording_eval
        trainer.train()
        sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())
        ref_sharded = sum(isinstance(p, DTensor) for p in trainer.ref_model.parameters()) if trainer.ref_model else 0
        trainer.save(f"{out_dir}/{case}.saved")
        params = trainable(trainer)  # a collective under FSDP (shards gathered): every rank
        per_rank: list = [None] * trainer.world
        if setting:
            from fsdp_worker import SETTINGS, reference_off_base

            dist.all_gather_object(per_rank, {"reference_off_base": reference_off_base(trainer, model_dir),
                                              "names": [n for n, _ in trainer.model.named_parameters()]})
            os.environ.update({SETTINGS[s]: "false" for s in setting})
        everyone: list = [None] * trainer.world
        dist.all_gather_object(everyone, record)
        every_eval: list = [None] * trainer.world
        dist.all_gather_object(every_eval, evals)
        flats: list = [None] * trainer.world  # every rank's judgements and functions that varied (gdpo)
        dist.all_gather_object(flats, [trainer.flats, None if getattr(trainer, "_varied", None) is None
                                       else trainer._varied.tolist()])
        if trainer.rank == 0:
            steps = [{"seeds": [r[i]["seed"] for r in everyone], "samples": [s for r in everyone for s in r[i]["samples"]]}
                     for i in range(STEPS)]
            with open(f"{out_dir}/{case}.json", "w") as f:
                json.dump({"world": trainer.world, "steps": steps, "evals": every_eval, "history": trainer.history,
                           "flats": [fl for fl, _ in flats], "varied": [v for _, v in flats],
                           "sharded": sharded,
                       "reference_sharded": ref_sharded, "reference_mode": trainer.reference_mode, "per_rank": per_rank,
                       "distributed_type": str(trainer.accelerator.distributed_type)}, f)
            save_file(params, f"{out_dir}/{case}.safetensors")
            if trainer.ema is not None:
                save_file(trainer.ema.state(), f"{out_dir}/{case}.ema.safetensors")
        dist.barrier()
    exit_after_distributed_run(0)  # leaves without interpreter teardown (see there)


if __name__ == "__main__":
    main(*sys.argv[1:])
