"""Tokenization speed: alignkit's batched `tokenize_records` against the one-record-at-a-time path it replaced
and reading the features back from the cache a previous run left (all in this process, interleaved, same
records, same tokenizer).

    python bench/tokenize_speed.py --rows 50000 --repeats 3

Records: half plain-text prompt/completion SFT rows, half chat rows (a user turn and an assistant turn through
the tiny tokenizer's ChatML template). Reports wall and CPU seconds per run (CPU time is what a busy shared
machine does not distort; it counts the Rust encoder's threads too), their medians and the paired ratios; checks
both paths give identical features. `TOKENIZERS_PARALLELISM=false` by default, as the CLI sets it: the old path
never used threads, and `tokenize_records` turns them on for its own batches of >= 1,024 texts (restoring the
setting after).

    python bench/tokenize_speed.py --prepare --rows 20000 --repeats 1

`--prepare` times the trainers' path instead: `prepare_dataset` (datasets.map over raw rows, as a TRL user's
`train_dataset`) on the same rows as two `datasets.Dataset`s (prompt/completion, and messages), one JSON line per
repeat, with a digest of the output datasets (their features and every value). To compare two versions of
alignkit, run it with each one's `src` on PYTHONPATH, alternating processes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def records(n: int, seed: int = 0):
    from alignkit.data.records import SFTRecord

    rng = random.Random(seed)
    words = ("the cat dog red blue runs jumps over under quickly slowly house tree river mountain seven "
             "apples question answer because").split()

    def sent(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))
    out = []
    for i in range(n):
        if i % 2:
            out.append(SFTRecord(prompt=[{"role": "user", "content": sent(rng.randint(8, 40))}],
                                 completion=[{"role": "assistant", "content": sent(rng.randint(8, 60))}], id=f"r{i}"))
        else:
            out.append(SFTRecord(prompt=sent(rng.randint(8, 40)) + "\n", completion=" " + sent(rng.randint(8, 60)),
                                 id=f"r{i}"))
    return out


def one_at_a_time(recs, tok, cfg):
    """The path before batching: every record formatted and tokenized on its own."""
    from alignkit.data.tokenize import TokenizeStats, Unfit, tokenize_record

    stats, out = TokenizeStats(total=len(recs)), []
    for r in recs:
        try:
            out.append(tokenize_record(r, tok, cfg, stats))
        except Unfit as e:
            stats.drop(e.reason, r.id)
    return out


def rows(n: int) -> tuple[list[dict], list[dict]]:
    """`records(n)` as TRL-style rows: the plain ones as prompt/completion, the chat ones as messages."""
    plain, chat = [], []
    for r in records(n):
        if isinstance(r.prompt, str):
            plain.append({"prompt": r.prompt, "completion": r.completion})
        else:
            chat.append({"messages": r.prompt + r.completion})
    return plain, chat


def time_prepare(n: int, repeats: int, tok, cfg) -> None:
    """One JSON line per repeat: wall and CPU seconds of `prepare_dataset` over both datasets, the rows kept."""
    import hashlib
    import json

    from datasets import Dataset

    from alignkit.data.prepare import prepare_dataset

    plain, chat = rows(n)
    for _ in range(repeats):
        sets = [Dataset.from_list(plain), Dataset.from_list(chat)]  # in memory: no datasets cache between repeats
        w, c = time.perf_counter(), time.process_time()
        outs = [prepare_dataset(ds, tok, ("sft",), cfg)[0] for ds in sets]
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        digest = hashlib.sha256(json.dumps([[o.features.to_dict(), o.to_dict()] for o in outs]).encode()).hexdigest()
        print(json.dumps({"rows": n, "kept": sum(map(len, outs)), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                          "load": round(os.getloadavg()[0], 2), "output_sha256": digest[:16]}))


def main() -> int:
    import logging

    from alignkit.data.tokenize import TokenizeConfig, cache_key, tokenize_records
    from alignkit.models.loading import load_tokenizer
    from alignkit.models.tiny import save_tiny

    logging.disable(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prepare", action="store_true", help="time prepare_dataset (datasets.map) instead")
    args = ap.parse_args()
    tok = load_tokenizer(save_tiny(tempfile.mkdtemp(), "llama"))
    cfg = TokenizeConfig(max_length=256, max_prompt_length=128)
    if args.prepare:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        time_prepare(args.rows, args.repeats, tok, cfg)
        return 0
    recs = records(args.rows)
    runs: dict[str, list[tuple[float, float]]] = {"one_at_a_time": [], "batched": [], "cached": []}
    results = {}
    cache = tempfile.mkdtemp()
    tokenize_records(recs, tok, cfg, cache_dir=cache)  # fills the cache: what a previous run left
    if not (Path(cache) / f"{cache_key(recs, tok, cfg)}.jsonl").is_file():  # "cached" would tokenize again
        raise SystemExit(f"tokenize_speed.py: NOT COMPARABLE: the features were not cached in {cache}, so the "
                         "'cached' runs would time tokenizing again; no ratio")
    for _ in range(args.repeats):
        for name, fn in (("one_at_a_time", lambda: one_at_a_time(recs, tok, cfg)),
                         ("batched", lambda: tokenize_records(recs, tok, cfg)[0]),
                         ("cached", lambda: tokenize_records(recs, tok, cfg, cache_dir=cache)[0])):
            w, c = time.perf_counter(), time.process_time()
            results[name] = fn()
            runs[name].append((time.perf_counter() - w, time.process_time() - c))
    differ = [name for name in ("batched", "cached") if results[name] != results["one_at_a_time"]]
    if differ:  # not an assert: a ratio of runs that made other features must not print under python -O either
        raise SystemExit(f"tokenize_speed.py: NOT COMPARABLE: the {' and '.join(differ)} features differ from the "
                         "one-at-a-time path's; no ratio")
    print(f"{args.rows} SFT rows, {args.repeats} interleaved repeats, TOKENIZERS_PARALLELISM="
          f"{os.environ['TOKENIZERS_PARALLELISM']}, load average {os.getloadavg()[0]:.1f}")
    for name, rs in runs.items():
        print(f"  {name:<14} wall {statistics.median(r[0] for r in rs):6.2f} s  cpu "
              f"{statistics.median(r[1] for r in rs):6.2f} s   (wall runs: {', '.join(f'{r[0]:.2f}' for r in rs)})")
    for other in ("batched", "cached"):
        for k, label in ((0, "wall"), (1, "cpu")):
            ratios = [a[k] / b[k] for a, b in zip(runs["one_at_a_time"], runs[other])]
            print(f"  {other} speed-up ({label}): paired {', '.join(f'{x:.2f}x' for x in ratios)}; median "
                  f"{statistics.median(ratios):.2f}x")
    print("  features identical: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
