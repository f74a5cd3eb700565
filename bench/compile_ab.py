"""A/B of `train.compile` (regional torch.compile of each decoder layer) against eager, on the CPU suite's
"small" SFT scenario (tiny Llama 4 x 128, vocab 1024, ragged 16-96-token examples, batch 8, float32):

    .venv/bin/python bench/compile_ab.py                       # 3 pairs, 20 timed steps each, 1 thread
    .venv/bin/python bench/compile_ab.py --pairs 5 --steps 30 --threads 2 --run-dir bench/results/cpu-<stamp>

Each pair is one eager run and one compiled run of alignkit's SFTTrainer, in fresh subprocesses (so
neither inherits the other's warm caches or allocator), order alternating between pairs. Each run trains
`--warmup` untimed steps (compilation and the one recompilation for dynamic sequence lengths happen there),
then `--steps` timed steps (`common.Meter`). Reported: steps/s and tokens/s of each side (median, min-max),
the per-pair ratio compiled/eager (median, min-max), the compile time paid in warmup (warmup seconds
compiled minus eager), and whether the losses of the two sides match step for step (they must: same
seed, same batches). Writes bench/results/compile_ab-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402


def one_run(spec_path: str, run_dir: str, compiled: bool, warmup: int, steps: int, batch: int, threads: int,
            out: str) -> None:
    """Child process: train warmup + steps SFT steps, eager or compiled; write timings and losses to `out`."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from alignkit.data import SFTCollator, SFTRecord, tokenize_records
    from alignkit.models.efficiency import compile_layers
    from alignkit.models.loading import load_model
    from alignkit.trainers import SFTTrainer

    torch.set_num_threads(threads)
    spec = common.load_spec(spec_path)
    tok = common.load_tokenizer(common.model_dir(run_dir, spec))
    rows = common.read_jsonl(common.data_file(run_dir, spec, "sft"))
    feats, _ = tokenize_records([SFTRecord(r["prompt"], r["completion"], id=str(i)) for i, r in enumerate(rows)],
                                tok, max_length=spec["max_length"], max_prompt_length=None)
    torch.manual_seed(0)
    model = load_model(common.model_dir(run_dir, spec), dtype="float32")
    layers = compile_layers(model) if compiled else 0
    args = TrainingArguments(output_dir=str(Path(out).with_suffix("")) + "-trainer", per_device_train_batch_size=batch,
                             max_steps=warmup + steps, learning_rate=1e-4, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    meter = common.Meter(model, warmup, steps, batch, pad_token_id=tok.pad_token_id)
    marks = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["start"] = time.perf_counter()

        def on_step_end(self, a, state, c, **k):
            if state.global_step == warmup:
                marks["warm"] = time.perf_counter()

    trainer = SFTTrainer(model, args, train_dataset=feats, data_collator=SFTCollator(tok.pad_token_id),
                         processing_class=tok, callbacks=[common.trainer_callback(meter), Clock()])
    trainer.train()
    res = meter.result()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(out).write_text(json.dumps({"library": "compiled" if compiled else "eager", "status": "ok",
                                     "compiled": compiled, "compiled_layers": layers, "steps": steps, "warmup": warmup,
                                     "settings": {"batch_size": batch}, "steps_per_s": steps / res["seconds"],
                                     "tokens_per_s": res["tokens_per_s"], "timed_tokens": res["timed_tokens"],
                                     "final_loss": losses[-1] if losses else None,
                                     "warmup_s": marks["warm"] - marks["start"], "losses": losses}))


def same_work(e: dict, c: dict) -> list[str]:
    """Why an eager run and a compiled run did not do the same work ([] = they did): `common.work_mismatches` (steps,
    warm-up, batch, timed tokens, final losses), losses apart at some step (the same seed and batches: they must
    match step for step), or a compiled side that compiled no layer."""
    out = common.work_mismatches(e, c, tokens_rtol=0.0)
    if len(e["losses"]) != len(c["losses"]):
        out.append(f"{len(e['losses'])} vs {len(c['losses'])} logged losses")
    far = [i + 1 for i, (a, b) in enumerate(zip(e["losses"], c["losses"]))
           if not abs(a - b) <= 1e-3 * max(1.0, abs(a), abs(b))]  # NaN too
    if far:
        out.append(f"losses apart at step(s) {far[:5]}")
    if not c.get("compiled_layers"):
        out.append("the compiled run compiled no layer")
    return out


def spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="a bench/run_cpu.py run folder holding small/ (else a temp one)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "eager|compiled,<out>"
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, out = args.child.split(",", 1)
        one_run(args.spec, args.run_dir, mode == "compiled", args.warmup, args.steps, args.batch_size, args.threads,
                out)
        return {}
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="compile_ab-"))
    spec = common.SCENARIOS["small"]
    spec_path = run_dir / "small" / "spec.json"
    if not spec_path.exists():
        spec_path = common.prepare_scenario(spec, run_dir)
    results: dict[str, list[dict]] = {"eager": [], "compiled": []}
    work = Path(tempfile.mkdtemp(prefix="compile_ab-out-"))
    for pair in range(args.pairs):
        order = ["eager", "compiled"] if pair % 2 == 0 else ["compiled", "eager"]
        for mode in order:
            out = work / f"{mode}-{pair}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{mode},{out}", "--spec", str(spec_path),
                   "--run-dir", str(run_dir), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                           stdout=subprocess.DEVNULL)
            results[mode].append(json.loads(out.read_text()))
            print(f"pair {pair} {mode:>8}: {results[mode][-1]['steps_per_s']:.2f} steps/s, "
                  f"warmup {results[mode][-1]['warmup_s']:.1f} s", flush=True)
    kept, excluded, failed = common.pair_repeats(results["eager"], results["compiled"], check=same_work)
    ratios = [c["steps_per_s"] / e["steps_per_s"] for e, c in kept]
    compile_s = [c["warmup_s"] - e["warmup_s"] for e, c in kept]
    max_loss_diff = max((abs(a - b) for e, c in zip(results["eager"], results["compiled"])
                         for a, b in zip(e["losses"], c["losses"])), default=float("nan"))
    summary = {
        "scenario": "small", "batch_size": args.batch_size, "threads": args.threads, "pairs": args.pairs,
        "warmup": args.warmup, "steps": args.steps, "versions": common.versions("alignkit"),
        "eager_steps_per_s": [r["steps_per_s"] for r in results["eager"]],
        "compiled_steps_per_s": [r["steps_per_s"] for r in results["compiled"]],
        "eager_tokens_per_s": [r["tokens_per_s"] for r in results["eager"]],
        "compiled_tokens_per_s": [r["tokens_per_s"] for r in results["compiled"]],
        "ratio_compiled_over_eager": ratios, "compile_seconds_in_warmup": compile_s,
        "max_abs_loss_difference": max_loss_diff, "pairs_kept": len(kept), "pairs_not_comparable": excluded,
        "runs": results,
    }
    print(f"eager    steps/s {spread(summary['eager_steps_per_s'])}, tokens/s {spread(summary['eager_tokens_per_s'], '.0f')}")
    print(f"compiled steps/s {spread(summary['compiled_steps_per_s'])}, tokens/s "
          f"{spread(summary['compiled_tokens_per_s'], '.0f')}")
    if ratios:
        print(f"paired ratio compiled/eager {spread(ratios, '.3f')}; compile time in warmup {spread(compile_s, '.1f')} "
              f"s; max |loss difference| {max_loss_diff:.2e}"
              f"{common.repeats_note(len(kept), args.pairs, excluded, failed)}")
    else:
        print(f"NOT COMPARABLE (no ratio): no pair did the same work: {'; '.join(excluded + failed)}; max |loss "
              f"difference| {max_loss_diff:.2e}")
    res_dir = BENCH / "results"
    res_dir.mkdir(exist_ok=True)
    path = res_dir / f"compile_ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
