"""ReFT overhead on CPU: what one LoReFT intervention costs over the plain model.

Model: a random tiny Llama, hidden 256, 4 layers, 4 heads (2 KV heads), intermediate 512, vocab 1024
(random token ids, no tokenizer). ReFT: one LoReFT, rank 4, block_output of layer 2, one position (the
last prompt token, "l1"). Measured with `torch.set_num_threads(--threads)` after a warmup, plain and ReFT
interleaved `--repeats` times so that machine drift hits both alike; reported as medians and minima, and
the overhead as the median of the per-repeat ratios (see `summary`):

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


def paired(fns: dict, repeats: int, inner: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per repeat; the fns take turns, in a shuffled order, inside
    every repeat, so samples with the same index saw about the same machine load."""
    for fn in fns.values():
        timed(fn, warmup)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            samples[k].append(timed(fns[k], inner))
    return samples


def summary(samples: dict[str, list[float]], base: str = "plain") -> dict[str, dict[str, float]]:
    """Per variant: median and min ms, and its overhead over `base` in % three ways: the median of the
    per-repeat ratios (robust to load that drifts between repeats), ratio of medians, ratio of minima
    (noise on a shared machine only ever adds time, so the minima are the least disturbed samples)."""
    out = {}
    for k, v in samples.items():
        ratios = [a / b for a, b in zip(v, samples[base])]
        out[k] = {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
                  "overhead_pct_paired": 100 * (statistics.median(ratios) - 1),
                  "overhead_pct_medians": 100 * (statistics.median(v) / statistics.median(samples[base]) - 1),
                  "overhead_pct_minima": 100 * (min(v) / min(samples[base]) - 1)}
    return out


def check_edit(plain, reft, ids, mask, loc) -> float:
    """The largest logit change the intervention makes (`reft` wraps a copy of `plain`'s weights). Refuses when it
    makes none, or when the hooks without locations change anything: the "reft" timings would then time no edit,
    or the "hooks_only" ones an edit."""
    with torch.inference_mode():
        base = plain(input_ids=ids, attention_mask=mask).logits
        edited = (reft(input_ids=ids, attention_mask=mask, intervention_locations=loc).logits - base).abs().max().item()
        hooks = (reft(input_ids=ids, attention_mask=mask).logits - base).abs().max().item()
    if not edited > 0:
        raise SystemExit(f"reft_overhead: the LoReFT intervention changed no logit (max change {edited}): the 'reft' "
                         "rows would time no edit; check the intervention locations")
    if hooks != 0:
        raise SystemExit(f"reft_overhead: the hooks without locations changed the logits by {hooks:.3g}: the "
                         "'hooks_only' row would time an edit")
    return edited


def check_same_generation(outs: dict[str, torch.Tensor]) -> None:
    """(c) compares the two generations' times: both must be BATCH rows of SEQ prompt + NEW new tokens (the same
    decode work), else the script stops before timing."""
    shapes = {k: tuple(v.shape) for k, v in outs.items()}
    if any(s != (BATCH, SEQ + NEW) for s in shapes.values()):
        raise SystemExit(f"reft_overhead: NOT COMPARABLE: the generations are {shapes}, not {BATCH} rows of {SEQ} + "
                         f"{NEW} tokens each: (c) would time different work")


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
    edit = check_edit(plain, reft, ids, mask, loc)
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    gens = {"plain": lambda: plain.generate(input_ids=ids, attention_mask=mask, **gen),
            "reft": lambda: reft.generate(input_ids=ids, attention_mask=mask, intervention_locations=loc, **gen)}
    with torch.inference_mode():
        check_same_generation({k: fn() for k, fn in gens.items()})
        fwd = summary(paired({"plain": lambda: plain(input_ids=ids, attention_mask=mask),
                              "reft": lambda: reft(input_ids=ids, attention_mask=mask, intervention_locations=loc),
                              "hooks_only": lambda: reft(input_ids=ids, attention_mask=mask)}, a.repeats, inner=10))
        gen_t = summary(paired(gens, a.repeats, inner=1, warmup=2))

    result = {
        "model": f"llama hidden={HIDDEN} layers={LAYERS} vocab={VOCAB} (random ids)",
        "reft": "1 x LoReFT rank 4, layer 2 block_output, 1 position",
        "threads": a.threads, "repeats": a.repeats, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "train_samples_per_s": train_sps, "max_logit_edit": edit,
        "forward": fwd,
        "generate": gen_t,
        "targets": {"forward_overhead_pct": 3.0, "generate_overhead_pct": 5.0},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    def row(name: str, r: dict, k: str) -> str:
        v, p = r[k], r["plain"]
        return (f"  {name:<22} plain {p['median_ms']:8.2f} ms (min {p['min_ms']:8.2f}), {k} {v['median_ms']:8.2f} ms "
                f"(min {v['min_ms']:8.2f}) -> paired {v['overhead_pct_paired']:+6.2f}%, medians "
                f"{v['overhead_pct_medians']:+6.2f}%, minima {v['overhead_pct_minima']:+6.2f}%")

    print(f"ReFT overhead, {result['model']}, {a.threads} threads, {a.repeats} interleaved repeats")
    print(f"  (a) training ({BATCH}x{SEQ}, ReftTrainer)  {train_sps:8.1f} samples/s")
    print(row(f"(b) forward {BATCH}x{SEQ}", fwd, "reft") + "  (target <= 3%)")
    print(row("    hooks, no locations", fwd, "hooks_only"))
    print(row(f"(c) generate {BATCH}x{NEW} new", gen_t, "reft") + "  (target <= 5%)")
    print(f"  JSON: {a.out}")


if __name__ == "__main__":
    main()
