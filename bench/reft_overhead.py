"""ReFT overhead on CPU: what one LoReFT intervention costs over the plain model.

Model: a random tiny Llama, hidden 256, 4 layers, 4 heads (2 KV heads), intermediate 512, vocab 1024
(random token ids, no tokenizer). ReFT: one LoReFT, rank 4, block_output of layer 2, one position (the
last prompt token, "l1"). Measured, with `torch.set_num_threads(--threads)`, warmup, and the median of
`--repeats` timings, plain and ReFT interleaved so that machine drift hits both alike:

  (a) training throughput (samples/s) of `ReftTrainer` on batches of 8 x 64 tokens;
  (b) forward pass, batch 8 x 64, no grad: plain model vs ReftModel with locations vs ReftModel with
      `intervention_locations=None` (hooks installed, no edit: the fixed cost of the hooks);
  (c) batched greedy generation, batch 8, 64-token prompts, exactly 32 new tokens.

Prints a table; writes JSON to bench/results/reft_overhead.json (gitignored).
    python bench/reft_overhead.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import ReftConfig
from alignkit.interventions.training import ReftTrainer

VOCAB, HIDDEN, LAYERS, BATCH, SEQ, NEW = 1024, 256, 4, 8, 64, 32


def build_model() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def paired(fns: dict, repeats: int, inner: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns, in a shuffled order, inside every repeat."""
    for fn in fns.values():
        timed(fn, warmup)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            samples[k].append(timed(fns[k], inner))
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_train(model, steps: int) -> float:
    torch.manual_seed(0)
    reft = get_reft_model(model, ReftConfig.uniform([2], "loreft", low_rank_dimension=4))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(BATCH * (steps + 5)):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: SEQ // 2] = -100  # first half is the "prompt"
        rows.append({"input_ids": ids, "labels": labels})

    def collate(feats):
        ids = torch.stack([f["input_ids"] for f in feats])  # (B, T)
        loc = torch.full((len(feats), 1, 1), SEQ // 2 - 1)  # (B, 1, 1): last prompt token
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.stack([f["labels"] for f in feats]), "intervention_locations": loc}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=1e-3,
                                 save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, logging_steps=10**6,
                                 dataloader_num_workers=0)
        trainer = ReftTrainer(model=reft, args=args, train_dataset=rows, data_collator=collate)
        metrics = trainer.train().metrics
    reft.unwrap()
    for p in model.parameters():
        p.requires_grad_(True)
    return float(metrics["train_samples_per_second"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reft_overhead.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)

    model = build_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    loc = torch.full((BATCH, 1, 1), SEQ - 1)  # (B, I=1, P=1): the last prompt token

    train_sps = bench_train(model, a.train_steps)

    torch.manual_seed(0)
    plain = build_model()
    reft_base = build_model()
    reft = get_reft_model(reft_base, ReftConfig.uniform([2], "loreft", low_rank_dimension=4)).eval()
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    with torch.inference_mode():
        fwd = paired({"plain": lambda: plain(input_ids=ids, attention_mask=mask),
                      "reft": lambda: reft(input_ids=ids, attention_mask=mask, intervention_locations=loc),
                      "hooks_only": lambda: reft(input_ids=ids, attention_mask=mask)}, a.repeats, inner=10)
        gen_t = paired({"plain": lambda: plain.generate(input_ids=ids, attention_mask=mask, **gen),
                        "reft": lambda: reft.generate(input_ids=ids, attention_mask=mask, intervention_locations=loc,
                                                      **gen)}, max(5, a.repeats // 2), inner=1, warmup=2)

    def pct(x: float, base: float) -> float:
        return 100.0 * (x / base - 1.0)

    result = {
        "model": f"llama hidden={HIDDEN} layers={LAYERS} vocab={VOCAB} (random ids)",
        "reft": "1 x LoReFT rank 4, layer 2 block_output, 1 position",
        "threads": a.threads, "repeats": a.repeats, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "train_samples_per_s": train_sps,
        "forward_ms": {k: 1e3 * v for k, v in fwd.items()},
        "forward_overhead_pct": pct(fwd["reft"], fwd["plain"]),
        "forward_hooks_only_overhead_pct": pct(fwd["hooks_only"], fwd["plain"]),
        "generate_ms": {k: 1e3 * v for k, v in gen_t.items()},
        "generate_overhead_pct": pct(gen_t["reft"], gen_t["plain"]),
        "targets": {"forward_overhead_pct": 3.0, "generate_overhead_pct": 5.0},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"ReFT overhead, {result['model']}, {a.threads} threads, median of {a.repeats}")
    print(f"  (a) training ({BATCH}x{SEQ}, ReftTrainer)          {train_sps:8.1f} samples/s")
    print(f"  (b) forward {BATCH}x{SEQ}: plain {result['forward_ms']['plain']:.2f} ms, ReFT {result['forward_ms']['reft']:.2f} ms"
          f" -> {result['forward_overhead_pct']:+.2f}% (target <= 3%); hooks only {result['forward_hooks_only_overhead_pct']:+.2f}%")
    print(f"  (c) generate {BATCH}x{NEW} new: plain {result['generate_ms']['plain']:.1f} ms, ReFT {result['generate_ms']['reft']:.1f} ms"
          f" -> {result['generate_overhead_pct']:+.2f}% (target <= 5%)")
    print(f"  JSON: {a.out}")


if __name__ == "__main__":
    main()
