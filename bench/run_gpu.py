"""GPU suite: a 1B-parameter Llama-shaped model (random weights, bf16, built from config; nothing downloaded)
trained with alignkit's trainers; tokens/s, model FLOPs utilisation and peak memory per workload.

    .venv/bin/python bench/run_gpu.py                          # every workload, on the visible GPU
    .venv/bin/python bench/run_gpu.py --workloads dpo_full_precomputed --steps 20
    .venv/bin/python bench/run_gpu.py --dry-run                # tiny config on CPU: checks the script runs
    .venv/bin/python bench/run_gpu.py --kernels liger --compile   # Liger check (loss with/without), then workloads
                                                               # with model.kernels: liger and train.compile

Workloads (WORKLOADS): SFT full finetuning; DPO with LoRA (reference = adapter off), full (frozen copy),
and both with the reference log-probs precomputed once before training; ReFT (LoReFT rank 4 on the
middle layer, SFT loss); one GRPO step with transformers generation (`grpo_full`: --batch-size prompts x 8
samples, full finetuning, KL to a frozen copy; steps/s, generated tokens/s and the generation share of a
step), and the same step with a colocated vLLM engine generating (`grpo_vllm`: `generation_backend: vllm`,
`gpu_memory_utilization` --vllm-gpu-memory so training fits beside it; the engine starts inside the warm-up;
skipped, with the reason, where vLLM is not importable). `--padding-free` packs each batch (flash-attention
varlen when installed).

Model FLOPs utilisation (the brief's convention, PaLM appendix B without the attention term):

    MFU = 6 * N * tokens / seconds / peak_flops

N = parameters doing matmuls per token (all but the input embedding; a tied LM head counted once), tokens
= non-pad tokens the policy trains on (chosen + rejected for DPO), peak_flops = dense bf16 peak of the
GPU found by name in PEAK_TFLOPS. The reference forward of DPO (2N per token) is NOT counted as useful
work, so precomputing it raises MFU; and LoRA / ReFT skip most weight gradients (about 4N instead of 6N
per token), so their 6N-MFU overstates the work done. Both are reported as is, with `mfu_hw` (FLOPs
actually executed: + 2N per reference token, 4N instead of 6N for frozen-base adapters) beside it.

Results: one JSON line per workload on stdout and bench/results/gpu-<timestamp>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import common as bench_common  # noqa: E402  (bench/common.py: token counting, the GRPO reward and tokenizer)

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity), matched on the device name.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),          # H200 SXM (NVL: 835)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),          # H100 SXM5 / HBM3
    ("GH200", 989.0),
    ("A100", 312.0),          # SXM and PCIe alike
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),           # AWS A10G (A10: 125)
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),          # fp16 tensor cores (no bf16)
]

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
# grpo_vllm's dry run: vLLM's CPU attention needs head_dim >= 64 (TINY has 16)
TINY_HD64 = dict(TINY, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)


def peak_tflops(name: str) -> float | None:
    """bf16 dense peak of the GPU called `name` (torch.cuda.get_device_name), None when not in the table."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def matmul_params(model: Any) -> int:
    """N of the 6N rule: parameters that multiply activations (the input embedding is a lookup)."""
    from alignkit.adapters import unwrap_lm

    lm = unwrap_lm(model)
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    total = sum(p.numel() for n, p in lm.named_parameters() if "lora_" not in n)
    return total - emb.numel() + (head.numel() if head is emb else 0)


def mfu(n_params: int, tokens_per_s: float, peak: float | None, kind: str, objective: str,
        reference: str | None) -> tuple[float | None, float | None]:
    """(MFU, mfu_hw) of the module docstring: 6N FLOPs per trained token; the hardware count adds 2N per token for a
    DPO reference forward run every step (not when precomputed) and takes 4N instead of 6N for a frozen base (no
    weight gradients). None without a known peak (TFLOP/s)."""
    if not peak:
        return None, None
    hw = (6.0 if kind == "full" else 4.0) + (2.0 if objective == "dpo" and reference != "precomputed" else 0.0)
    return 6 * n_params * tokens_per_s / (peak * 1e12), hw * n_params * tokens_per_s / (peak * 1e12)


def fresh_peak_memory(cuda: bool) -> float | None:
    """Free what the previous workload left (its trainer and model hold reference cycles: `del` alone frees nothing
    until the garbage collector runs), then restart the peak counter. Returns the GB still allocated: the next
    workload's peak includes them, so they are reported beside it."""
    import gc

    import torch

    gc.collect()
    if not cuda:
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def param_dtypes(model: Any) -> dict[str, int]:
    """Parameters by dtype (numel): what the run actually trained and ran in (bf16 on a GPU; LoRA / ReFT weights
    may stay float32)."""
    out: dict[str, int] = {}
    for prm in model.parameters():
        out[str(prm.dtype).replace("torch.", "")] = out.get(str(prm.dtype).replace("torch.", ""), 0) + prm.numel()
    return out


# ----------------------------------------------------------------------------------------------------- data
def make_features(kind: str, n: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> list[dict]:
    """Random token data, already tokenized: lengths vary +-25 % around the given means."""
    import random

    rng = random.Random(seed)
    ln = lambda m: max(2, int(m * rng.uniform(0.75, 1.25)))  # noqa: E731
    seq = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    out = []
    for _ in range(n):
        p = seq(ln(prompt_len))
        if kind == "sft":
            c = seq(ln(completion_len))
            out.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
        else:
            c, r = seq(ln(completion_len)), seq(ln(completion_len))
            out.append({"chosen_input_ids": p + c, "chosen_completion_mask": [0] * len(p) + [1] * len(c),
                        "rejected_input_ids": p + r, "rejected_completion_mask": [0] * len(p) + [1] * len(r)})
    return out


# ------------------------------------------------------------------------------------------------ workloads
def build_model(cfg: dict, dtype: Any, device: str, attn: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn))
    return model.to(dtype)


def adapter(kind: str, layer: int) -> Any:
    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings

    if kind == "lora":
        return AdapterConfig(kind="lora", lora=LoraSettings(r=16, alpha=32.0))
    if kind == "reft":
        return AdapterConfig(kind="reft", reft=ReftSettings(
            config={"representations": [{"layer": layer, "component": "block_output", "intervention": "loreft",
                                         "low_rank_dimension": 4}]}, positions="f1+l1"))
    return AdapterConfig(kind="full")


# name -> (objective, adapter kind, reference)
WORKLOADS: dict[str, tuple[str, str, str | None]] = {
    "sft_full": ("sft", "full", None),
    "dpo_lora": ("dpo", "lora", "auto"),
    "dpo_lora_precomputed": ("dpo", "lora", "precomputed"),
    "dpo_full": ("dpo", "full", "auto"),
    "dpo_full_precomputed": ("dpo", "full", "precomputed"),
    "reft": ("sft", "reft", None),
    "grpo_full": ("grpo", "full", "auto"),  # one GRPO step = generate (transformers) + score + one update
    "grpo_vllm": ("grpo", "full", "auto"),  # the same step, generated by a colocated vLLM engine
}
GRPO_BACKEND = {"grpo_full": "transformers", "grpo_vllm": "vllm"}  # method.generation_backend of each GRPO workload
GRPO_SAMPLES = 8  # completions per prompt (--batch-size prompts per step); 2 in --dry-run


class _Timer:
    """TrainerCallback: synchronises the device and times steps warmup+1 .. warmup+steps; counts policy tokens."""

    def __init__(self, model: Any, warmup: int, steps: int, sync: Callable[[], None]) -> None:
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.tokens = 0
        self.t0 = self.t1 = None
        self.tok0 = self.tok1 = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: dict) -> None:
        import torch

        if torch.is_grad_enabled():  # the policy's training forward, not reference passes under no_grad
            # pad id 0 (make_features draws ids from 3 up); a shared-prompt batch's 4-D mask is not a token count
            self.tokens += bench_common.batch_tokens(args, kwargs, pad_token_id=0)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step in (timer.warmup, timer.warmup + timer.steps):
                    timer.sync()
                    now = time.perf_counter()
                    if state.global_step == timer.warmup:
                        timer.t0, timer.tok0 = now, timer.tokens
                    else:
                        timer.t1, timer.tok1 = now, timer.tokens

        return _CB()


def run_workload(name: str, args: argparse.Namespace, cfg: dict) -> dict:
    import torch
    from transformers import TrainingArguments

    from alignkit.data import PreferenceCollator, SFTCollator
    from alignkit.adapters import apply_adapter
    from alignkit.trainers import PreferenceTrainer, SFTTrainer

    objective, kind, reference = WORKLOADS[name]
    if objective == "grpo":
        return run_grpo(name, args, cfg)
    cuda = args.device == "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    mem_before = fresh_peak_memory(cuda)
    base = build_model(cfg, dtype, args.device, args.attn)
    if args.kernels_ok:
        from alignkit.models.efficiency import apply_kernels

        apply_kernels(base, args.kernels)
    model = apply_adapter(base, adapter(kind, cfg["num_hidden_layers"] // 2))
    if args.compile:
        from alignkit.models.efficiency import compile_layers

        compile_layers(model)
    n_params = matmul_params(model)
    feats = make_features("sft" if objective == "sft" else "pref", args.batch_size * (args.warmup + args.steps),
                          args.prompt_len, args.completion_len, cfg["vocab_size"], seed=1)
    out_dir = Path(args.work_dir) / name
    targs = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=1e-5, logging_steps=max(1, args.steps), report_to=[],
        save_strategy="no", use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        activation_checkpointing=args.grad_ckpt, bf16=False)  # weights are already bf16: no autocast needed
    common = dict(train_dataset=feats, padding_free=args.padding_free)
    t_setup = time.perf_counter()
    if objective == "sft":
        trainer = SFTTrainer(model, targs, data_collator=SFTCollator(0), **common)
    else:
        cache = str(out_dir / "refcache") if reference == "precomputed" else None
        trainer = PreferenceTrainer(model, targs, data_collator=PreferenceCollator(0), beta=0.1,
                                    reference="auto" if cache is None else "precomputed", reference_cache_dir=cache,
                                    **common)
    setup_s = time.perf_counter() - t_setup  # includes the reference precomputation
    timer = _Timer(model, args.warmup, args.steps, torch.cuda.synchronize if cuda else (lambda: None))
    trainer.add_callback(timer.callback())
    trainer.train()
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"timing incomplete: steps {args.warmup} and {args.warmup + args.steps} not both seen "
                           f"(t0 {timer.t0}, t1 {timer.t1}); did training stop early?")
    dt = timer.t1 - timer.t0
    tokens = timer.tok1 - timer.tok0
    tps = tokens / dt
    peak = peak_tflops(args.gpu_name) if cuda else None
    mfu_6n, mfu_hw = mfu(n_params, tps, peak, kind, objective, reference)
    res = {"workload": name, "objective": objective, "adapter": kind, "reference": reference,
           "kernels": args.kernels if args.kernels_ok else None, "compile": args.compile,
           "params_matmul": n_params, "batch_size": args.batch_size, "steps": args.steps,
           "padding_free": args.padding_free, "grad_ckpt": args.grad_ckpt, "attn": args.attn,
           "seconds": dt, "tokens": tokens, "tokens_per_s": tps, "samples_per_s": args.batch_size * args.steps / dt,
           "setup_s": setup_s, "model_tflops_per_s": 6 * n_params * tps / 1e12,
           "mfu": mfu_6n, "mfu_hw": mfu_hw, "param_dtypes": param_dtypes(model),
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "allocated_before_gb": mem_before}
    del trainer, model
    return res


def vllm_skip_reason(args: argparse.Namespace) -> str | None:
    """Why grpo_vllm cannot run here (one line), or None."""
    from alignkit.models.vllm_support import vllm_installed
    from alignkit.online.vllm_generation import NO_VLLM

    if not vllm_installed():
        return f"skipped: {NO_VLLM}; the other workloads ran"
    if args.warmup < 1:
        return f"skipped: --warmup {args.warmup}: the vLLM engine starts in the first generation call, which would be timed"
    return None


def vllm_engine(name: str, args: argparse.Namespace, model: Any, tok: Any) -> dict:
    """GRPOConfig fields of a colocated vLLM engine: the policy's starting weights and tokenizer saved for vLLM to
    load (each generation then pushes the current weights), max_model_len for the longest prompt + completion, and on
    a GPU `gpu_memory_utilization` --vllm-gpu-memory (on CPU that is a share of host memory: a 1 GB KV cache instead)."""
    from alignkit.adapters import unwrap_lm

    folder = Path(args.work_dir) / name / "base"
    unwrap_lm(model).save_pretrained(folder)
    tok.save_pretrained(folder)
    kw: dict[str, Any] = {"model": str(folder), "max_model_len": int(args.prompt_len * 1.25) + 2 + args.completion_len}
    if args.device == "cuda":
        kw["gpu_memory_utilization"] = args.vllm_gpu_memory
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return {"generation_backend": "vllm", "vllm": kw}


def grpo_timers(trainer: Any, warmup: int, steps: int, sync: Callable[[], None], tally: Any) -> tuple[dict, dict]:
    """Wrap the trainer's generate / log: (marks: perf_counter at the end of steps `warmup` and `warmup + steps`,
    gen: generated tokens, generation seconds and trained tokens over the timed steps, and the first generation
    call's seconds (vLLM: the engine's start-up, in the warm-up)); every row tallied in `tally`."""
    marks: dict[int, float] = {}
    gen: dict[str, Any] = {"tokens": 0, "seconds": 0.0, "trained": 0, "first_call_s": None}
    generate, log = trainer.generate, trainer.log

    def timed_generate(p, step):
        sync()
        t = time.perf_counter()
        samples = generate(p, step)
        sync()
        if gen["first_call_s"] is None:
            gen["first_call_s"] = time.perf_counter() - t
        tally.add(samples)
        if step >= warmup:
            gen["seconds"] += time.perf_counter() - t
            gen["tokens"] += sum(len(x.response_ids) for x in samples)
            gen["trained"] += sum(len(x.prompt_ids) + len(x.response_ids) for x in samples)
        return samples

    def timed_log(metrics):
        log(metrics)
        step = int(metrics["step"]) + 1
        if step in (warmup, warmup + steps):
            sync()
            marks[step] = time.perf_counter()

    trainer.generate, trainer.log = timed_generate, timed_log
    return marks, gen


def grpo_prompts(args: argparse.Namespace, cfg: dict) -> list[str]:
    """--batch-size prompts per step of ~--prompt-len (+-25 %) random words "tN" of the model's vocabulary."""
    import random

    rng = random.Random(3)
    n_words = cfg["vocab_size"] - len(bench_common.SPECIALS)
    return [" ".join(f"t{rng.randrange(n_words)}" for _ in range(max(2, int(args.prompt_len * rng.uniform(0.75, 1.25)))))
            for _ in range(args.batch_size * (args.warmup + args.steps))]


def run_grpo(name: str, args: argparse.Namespace, cfg: dict) -> dict:
    """GRPO steps: --batch-size prompts of ~--prompt-len tokens x GRPO_SAMPLES completions of up to --completion-len
    tokens (sampled at temperature 1 from random weights, so nearly all run to the limit), generated by transformers
    (grpo_full) or a colocated vLLM engine (grpo_vllm), the reward `common.even_fraction`, KL 0.04 to a frozen copy,
    one update per step. Reported: steps/s, generated tokens/s, the share of the step spent generating, trained
    tokens/s, peak memory, and whether every row is a real generation (`online_vllm.tally_problems`)."""
    import torch

    from alignkit.adapters import apply_adapter
    from alignkit.online.generation import SamplingConfig
    from alignkit.online.grpo import GRPOConfig, GRPOTrainer
    from online_vllm import GenerationTally, tally_problems

    _, kind, reference = WORKLOADS[name]
    backend = GRPO_BACKEND[name]
    skip = vllm_skip_reason(args) if backend == "vllm" else None
    if skip:
        return {"workload": name, "objective": "grpo", "generation_backend": backend, "status": "skipped", "reason": skip}
    if backend == "vllm" and args.dry_run:
        cfg = dict(TINY_HD64)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # the offline workloads' knobs: this loop does not read them, so say so rather than label them applied
    ignored = [flag for flag, on in (("--padding-free", args.padding_free), ("--grad-ckpt", args.grad_ckpt),
                                     ("--compile", args.compile), ("--kernels", args.kernels_ok)) if on]
    if ignored:
        logging.warning("%s: %s not applied (GRPO runs without them here): its figures are without them", name,
                        " ".join(ignored))
    mem_before = fresh_peak_memory(cuda)
    base = build_model(cfg, torch.float32 if args.dry_run else torch.bfloat16, args.device, args.attn)
    model = apply_adapter(base, adapter(kind, cfg["num_hidden_layers"] // 2))
    tok = bench_common.build_tokenizer(cfg["vocab_size"])  # word-level: "t17" is one token, ids = 4 + 17
    prompts = grpo_prompts(args, cfg)
    k = 2 if args.dry_run else GRPO_SAMPLES
    # vLLM schedules its own batches (generation_batch_size is transformers generation's: refused with vLLM)
    engine = vllm_engine(name, args, model, tok) if backend == "vllm" else {"generation_batch_size": args.batch_size * k}
    gcfg = GRPOConfig(steps=args.warmup + args.steps, prompts_per_step=args.batch_size,
                      sampling=SamplingConfig(num_samples=k, max_new_tokens=args.completion_len), learning_rate=1e-6,
                      kl_coef=0.04, reference=reference, progress_bar=False, report_to="none", save_at_end=False,
                      **engine)
    trainer = GRPOTrainer(model, tok, prompts, {"type": "function", "fn": bench_common.even_fraction}, gcfg)
    tally = GenerationTally(args.completion_len, {tok.eos_token_id})
    marks, gen = grpo_timers(trainer, args.warmup, args.steps, sync, tally)
    t_setup = time.perf_counter()
    try:
        trainer.train()
    finally:
        if trainer.vllm_generator is not None:
            trainer.vllm_generator.close()
    dt = marks[args.warmup + args.steps] - marks[args.warmup]
    res = {"workload": name, "objective": "grpo", "adapter": kind, "reference": reference, "attn": args.attn,
           "params_matmul": matmul_params(model), "prompts_per_step": args.batch_size, "samples_per_prompt": k,
           "max_new_tokens": args.completion_len, "steps": args.steps, "seconds": dt, "steps_per_s": args.steps / dt,
           "generated_tokens": gen["tokens"], "generated_tokens_per_s": gen["tokens"] / dt,
           "generation_share": gen["seconds"] / dt, "tokens": gen["trained"], "tokens_per_s": gen["trained"] / dt,
           "total_s": time.perf_counter() - t_setup, "mfu": None, "not_applied": ignored,
           "generation_backend": gcfg.generation_backend, "first_generation_s": gen["first_call_s"],
           "vllm": engine.get("vllm"), "vllm_sync_s": getattr(trainer.vllm_generator, "sync_seconds", None),
           "generation": tally.result(), "generation_problems": tally_problems(
               {"library": "alignkit", "generation_backend": backend, "generation": tally.result()}),
           "param_dtypes": param_dtypes(model), "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "allocated_before_gb": mem_before}
    del trainer, model
    return res


def kernel_check(args: argparse.Namespace, cfg: dict) -> dict:
    """`model.kernels: liger` on this machine: unavailable (the one-line reason alignkit gives, e.g. no GPU or
    no liger-kernel package), or the loss of one SFT batch with and without the kernels (they must agree to
    bf16 precision) and the forward+backward time of each."""
    import torch

    from alignkit.models.efficiency import apply_kernels, check_kernels
    from alignkit.settings import ConfigError

    try:
        check_kernels(args.kernels)
    except ConfigError as e:
        return {"check": args.kernels, "status": "unavailable", "reason": str(e)}
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    feats = make_features("sft", args.batch_size, args.prompt_len, args.completion_len, cfg["vocab_size"], seed=2)
    ids = torch.tensor([f["input_ids"] for f in feats], device=args.device)
    out: dict[str, Any] = {"check": args.kernels}
    for label in ("plain", args.kernels):
        model = build_model(cfg, dtype, args.device, args.attn)
        if label != "plain":
            apply_kernels(model, args.kernels)
        times = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"loss_{label}"] = float(loss)
        out[f"fwd_bwd_s_{label}"] = min(times[1:])
        del model
    out["rel_loss_diff"] = abs(out[f"loss_{args.kernels}"] - out["loss_plain"]) / abs(out["loss_plain"])
    out["status"] = "ok" if out["rel_loss_diff"] < 2e-2 else "mismatch"
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--padding-free", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 if installed, "
                                                 "else sdpa)")
    ap.add_argument("--kernels", choices=["liger"], default=None,
                    help="check model.kernels (loss with/without on one batch) and train the workloads with them")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile of each decoder layer")
    ap.add_argument("--vllm-gpu-memory", type=float, default=0.3,
                    help="grpo_vllm: the engine's gpu_memory_utilization (weights + KV cache), leaving the rest to training")
    ap.add_argument("--dry-run", action="store_true", help="tiny config, float32, CPU, 2 steps: a check, not a measure")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cfg = dict(LLAMA_1B)
    if args.dry_run:
        given = [f"--{k.replace('_', '-')}" for k in ("steps", "warmup", "batch_size", "prompt_len", "completion_len")
                 if getattr(args, k) != ap.get_default(k)]
        if given:
            logging.warning("--dry-run runs its own tiny sizes (2 steps, 1 warm-up, batch 2, 12 + 12 tokens): %s "
                            "ignored", " ".join(given))
        cfg, args.device, args.gpu_name = dict(TINY), "cpu", "cpu (dry run)"
        args.steps, args.warmup, args.batch_size = 2, 1, 2
        args.prompt_len, args.completion_len = 12, 12
    else:
        if not torch.cuda.is_available():
            raise SystemExit("run_gpu.py: no CUDA device visible; use --dry-run to check the script on CPU")
        args.device, args.gpu_name = "cuda", torch.cuda.get_device_name()
        if peak_tflops(args.gpu_name) is None:
            logging.warning("no bf16 peak known for %r: MFU not reported (add it to PEAK_TFLOPS)", args.gpu_name)
    if args.attn is None:
        import importlib.util

        args.attn = "flash_attention_2" if (args.device == "cuda" and importlib.util.find_spec("flash_attn")) else "sdpa"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.work_dir = args.work_dir or str(BENCH / "results" / f"gpu-{stamp}-work")
    results = []
    args.kernels_ok = False
    if args.kernels:
        check = kernel_check(args, cfg)
        check["device"] = args.gpu_name
        print(json.dumps(check), flush=True)
        results.append(check)
        args.kernels_ok = check["status"] == "ok"
    for name in args.workloads:
        try:
            res = run_workload(name, args, cfg)
        except Exception as e:  # one failing workload (e.g. out of memory) must not lose the others
            res = {"workload": name, "status": "error", "reason": f"{type(e).__name__}: {e}"[:400]}
        res["device"] = args.gpu_name
        dtypes = res.get("param_dtypes") or {}
        if not args.dry_run and dtypes and dtypes.get("bfloat16", 0) < 0.9 * sum(dtypes.values()):
            logging.warning("%s: only %d of %d parameters in bfloat16 (%s): not the bf16 run it is labelled as", name,
                            dtypes.get("bfloat16", 0), sum(dtypes.values()), dtypes)
        print(json.dumps(res), flush=True)
        results.append(res)
    out = Path(args.out) if args.out else BENCH / "results" / f"gpu-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.gpu_name, "torch": torch.__version__, "config": cfg,
                               "settings": {k: v for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"[run_gpu] wrote {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
