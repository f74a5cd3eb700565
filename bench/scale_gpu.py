"""Scaling check for GPU machines: the same short SFT run under one process, DDP, FSDP2, DeepSpeed ZeRO-2
and ZeRO-3 (accelerate config files in configs/accelerate/), reporting loss parity with the one-process run
and the peak memory of every rank.

    .venv/bin/python bench/scale_gpu.py                         # every engine, all visible GPUs (>= 2)
    .venv/bin/python bench/scale_gpu.py --engines ddp fsdp2 --steps 10 --model path/to/llama
    .venv/bin/python bench/scale_gpu.py --dry-run               # CPU: configs checked, the worker run once
                                                                # in-process on a tiny model (what CI runs)
    .venv/bin/python bench/scale_gpu.py --cpu --steps 3         # the same engines on 2 CPU processes (gloo)

Each engine runs `accelerate launch --config_file configs/accelerate/<engine>.yaml --num_processes N
bench/scale_gpu.py --worker ...`: full-finetuning SFT with a fixed global batch (per-device batch x N x
accumulation is the same for every engine), fixed data order, seed and dropout off, so every engine's
loss curve should match the one-process run's up to reduction order (bf16: a few 1e-3). Each rank writes
its losses and `torch.cuda.max_memory_allocated()`; the report (one JSON line per engine, and
bench/results/scale-<timestamp>.json) holds the max |loss - one-process loss| over the steps and the peak
memory per rank in GiB (`--cpu`: peak resident set size per process). The loss difference is given only where the
engine did the one-process run's work (the same global batch, steps and mixed precision: `same_work`), else
`not_comparable` says what differs. The one-process run uses one GPU (on several, the Trainer's DataParallel would
train a larger batch). ZeRO-2/3 need `pip install 'alignkit[deepspeed]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
ENGINES = {"ddp": "ddp-gpu.yaml", "fsdp2": "fsdp2.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}
# --cpu: the same engines on CPU processes (gloo), fp32; peak memory is each rank's peak resident set size
CPU_ENGINES = {"ddp": "ddp-cpu.yaml", "fsdp2": "fsdp2.yaml", "zero2": "zero2-cpu.yaml", "zero3": "zero3-cpu.yaml"}
PAIRS = [(f"Question {i}: what is {i} plus {i + 1}?", f" Answer: {2 * i + 1}. Because {i} and {i + 1} make {2 * i + 1}.")
         for i in range(64)]


def check_configs(engines: list[str], table: dict[str, str] = ENGINES) -> dict[str, dict]:
    """Each engine's accelerate config, read by accelerate's own loader (a typo fails here, not on a GPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    out = {}
    for e in engines:
        path = CONFIGS / table[e]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing accelerate config for engine {e!r}")
        cfg = load_config_from_file(str(path))
        out[e] = {"path": str(path.relative_to(ROOT)), "distributed_type": str(cfg.distributed_type)}
    return out


def worker(model: str, out_dir: str, steps: int, global_batch: int, dtype: str, device: str | None) -> None:
    """One rank (or the one-process reference): SFT full finetuning, losses and peak memory to JSON."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from alignkit.data import SFTCollator, SFTRecord, tokenize_records
    from alignkit.adapters import AdapterConfig, apply_adapter
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.models.tiny import save_tiny
    from alignkit.trainers import SFTTrainer

    if model.startswith("tiny:"):
        model = str(save_tiny(Path(out_dir) / "tiny-model", model.split(":", 1)[1]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if global_batch % world:
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of {world} processes")
    tok = load_tokenizer(model)
    torch.manual_seed(0)
    policy = apply_adapter(load_model(model, dtype=dtype), AdapterConfig(kind="full"))
    feats, _ = tokenize_records([SFTRecord(p, c) for p, c in PAIRS], tok, max_length=128)
    losses: list[float] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    use_cpu = device == "cpu"
    backend = None
    if world > 1 and not torch.cuda.is_available():  # CPU processes: gloo; DeepSpeed needs use_cpu unset
        from alignkit.distributed import requested_engine

        use_cpu, backend = requested_engine() != "deepspeed", "gloo"
    args = TrainingArguments(output_dir=f"{out_dir}/run-{world}", per_device_train_batch_size=global_batch // world,
                             max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
                             logging_steps=1, report_to=[], save_strategy="no", seed=0, data_seed=0,
                             disable_tqdm=True, dataloader_num_workers=0, bf16=dtype == "bfloat16",
                             use_cpu=use_cpu, ddp_backend=backend, max_grad_norm=1.0)
    trainer = SFTTrainer(policy, args, train_dataset=feats, data_collator=SFTCollator(tok.pad_token_id),
                         callbacks=[Keep()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:  # CPU: the process's peak resident set (KiB on Linux), the whole process, not tensors only
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    Path(out_dir, f"rank{rank}-of{world}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "losses": losses, "peak_gib": peak,
         "distributed_type": str(trainer.accelerator.distributed_type),
         # the work done, as the Trainer ran it (`same_work`): examples per optimizer step over all ranks (the
         # Trainer's own batch: x GPUs under DataParallel), optimizer steps, mixed precision (an accelerate config's)
         "global_batch": trainer.args.train_batch_size * world * trainer.args.gradient_accumulation_steps,
         "steps_done": trainer.state.global_step,
         "mixed_precision": str(trainer.accelerator.state.mixed_precision)}))
    from alignkit.distributed import exit_after_distributed_run

    exit_after_distributed_run(0)  # several processes: leave without interpreter teardown (see there)


def launch(engine: str | None, n: int, args: argparse.Namespace, out: Path,
           table: dict[str, str] = ENGINES) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    tail = ["--worker", "--model", args.model, "--out", str(out), "--steps", str(args.steps),
            "--global-batch", str(args.global_batch), "--dtype", args.dtype]
    if engine is None:
        cmd = [sys.executable, __file__, *tail]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(CONFIGS / table[engine]), "--num_processes", str(n), __file__, *tail]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if args.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    elif engine is None:  # the one-process reference on one GPU: on several, the Trainer would wrap the model in
        #   DataParallel and train a batch of --global-batch per GPU (not the engines' global batch)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    subprocess.run(cmd, check=True, env=env)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*-of*.json"))]


def same_work(ranks: list[dict], ref: dict) -> list[str]:
    """Why an engine's run (`ranks`, one result per rank) did not do the one-process run's (`ref`) work: another
    global batch, step count or mixed precision, a rank that wrote no result, or fewer / more logged losses. [] = it
    did, and its loss curve can be compared with the reference's."""
    r = ranks[0]
    out = [f"{k} {r.get(k)} vs {ref.get(k)} (one process)" for k in ("global_batch", "steps_done", "mixed_precision")
           if r.get(k) != ref.get(k)]
    if len(ranks) != r["world"]:
        out.append(f"{len(ranks)} of {r['world']} ranks wrote a result")
    if len(r["losses"]) != len(ref["losses"]):
        out.append(f"{len(r['losses'])} vs {len(ref['losses'])} logged losses (one process)")
    return out


def report(engine: str, ranks: list[dict], ref: dict) -> dict:
    """One engine's row: its losses against the one-process run's (`ref`, its rank-0 result) and its peak memory.
    The loss difference is left out (None, with `not_comparable`) when the two did not do the same work."""
    losses, ref_losses = ranks[0]["losses"], ref["losses"]
    why = same_work(ranks, ref)
    diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
    row = {"engine": engine, "world": ranks[0]["world"], "distributed_type": ranks[0]["distributed_type"],
           "steps": len(losses), "max_abs_loss_diff": max(diffs) if diffs and not why else None,
           "final_loss": losses[-1] if losses else None,
           "reference_final_loss": ref_losses[-1] if ref_losses else None,
           "peak_gib_per_rank": [r["peak_gib"] for r in ranks]}
    if why:
        row["not_comparable"] = why
        print(f"NOT COMPARABLE {engine} (no loss difference): {'; '.join(why)}", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--model", default="tiny:llama", help="a local HF causal LM folder, or tiny:<arch>")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--processes", type=int, default=None, help="default: the visible GPUs")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--cpu", action="store_true", help="run the engines on CPU processes (gloo, fp32; configs "
                   "ddp-cpu / fsdp2 / zero2-cpu / zero3-cpu; peak memory = peak resident set per rank)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.model, args.out, args.steps, args.global_batch, args.dtype, None)
        return 0
    table = CPU_ENGINES if args.cpu else ENGINES
    configs = check_configs(args.engines, table)
    if args.dry_run:  # CPU: the worker once, in this process, 2 steps of a tiny model in fp32
        with tempfile.TemporaryDirectory() as tmp:
            worker("tiny:llama", tmp, 2, 4, "float32", "cpu")
            ranks = [json.loads(x.read_text()) for x in Path(tmp).glob("rank*.json")]
        row = report("one-process (dry run)", ranks, ranks[0])
        print(json.dumps({"dry_run": True, "configs": configs,
                          "cpu_configs": check_configs(list(CPU_ENGINES), CPU_ENGINES), "one_process": row}))
        return 0
    import torch

    if args.cpu:
        args.dtype = "float32"
    n = args.processes or (2 if args.cpu else torch.cuda.device_count())
    if n < 2:
        raise SystemExit(f"need >= 2 GPUs for the engines, found {n} (use --cpu or --dry-run on a CPU)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(tempfile.mkdtemp(prefix="alignkit-scale-"))
    one = launch(None, 1, args, base / "one")
    ref = one[0]
    rows = [report("one-process", one, ref)]
    for e in args.engines:
        try:
            rows.append(report(e, launch(e, n, args, base / e, table), ref))
        except subprocess.CalledProcessError as err:
            rows.append({"engine": e, "error": f"exit {err.returncode}"})
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results" / f"scale-{'cpu-' if args.cpu else ''}{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "steps": args.steps, "global_batch": args.global_batch,
                               "dtype": args.dtype, "cpu": args.cpu, "processes": n, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
