"""Online DPO A/B: the samples in no pair with a no-grad pass of their own vs the decode loop's recorded values.

    PYTHONPATH=$PWD/src .venv/bin/python bench/online_unpaired_ab.py --repeats 11 --steps 8

The online suite's alignkit side (bench/online_alignkit.py, online DPO: the "small" scenario's tiny Llama fully
trained, a frozen-copy reference, 8 prompts x 2 samples x 32 tokens, the shared reward), run in one process, the
two variants interleaved run by run (order alternating): "pass" (`wants_token_record` False: the unpaired samples'
"kl" / "entropy" from a no-grad forward over them, what the trainer did before) and "record" (the default: the
decode loop records each token's log-prob and entropy, `decode.TokenRecord`). Each run: 1 warm-up step then
`--steps` timed ones (CPU seconds, time.process_time, 1 thread). Prints the median CPU s a step per variant, the
paired ratio pass / record (`common.paired_summary`: median, min-max, the median's CI) and checks that both
variants' losses are equal (bitwise: the training forward is the same) and their metrics close. Then the generation
call alone (`generate_responses`, token_record False / True, same tokens), paired the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gen-repeats", type=int, default=41)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from alignkit.models.loading import load_model
    from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
    from alignkit.online.generation import SamplingConfig, generate_responses

    run_dir = Path(args.results) / f"unpairedab-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = common.load_spec(common.prepare_scenario(common.SCENARIOS["small"], run_dir))
    folder = common.model_dir(run_dir, spec)
    tok = common.load_tokenizer(folder, padding_side="left")
    prompts = [r["prompt"] for r in common.read_jsonl(common.data_file(run_dir, spec, "sft"))]
    sampling = SamplingConfig(num_samples=2, max_new_tokens=32, temperature=1.0)

    spent: dict[str, list[float]] = {"pass": [], "record": []}  # CPU s a run in `_unpaired_pass`

    def run(variant: str) -> tuple[float, list[dict]]:
        trainer = OnlineDPOTrainer(load_model(folder, task="causal_lm", dtype="float32"), tok, prompts,
                                   {"type": "function", "fn": common.even_fraction},
                                   OnlineDPOConfig(beta=0.04, steps=1 + args.steps, prompts_per_step=8,
                                                   sampling=sampling, learning_rate=1e-6, reference="copy",
                                                   progress_bar=False, report_to="none", save_at_end=False, seed=0))
        if variant == "pass":
            trainer.wants_token_record = lambda: False
        marks, log, unpaired, inner = [], trainer.log, [0.0], trainer._unpaired_pass

        def timed(pairs):
            t = time.process_time()
            inner(pairs)
            unpaired[0] += time.process_time() - t

        trainer._unpaired_pass = timed
        trainer.log = lambda m: (log(m), marks.append(time.process_time()))
        rows = trainer.train()
        spent[variant].append(unpaired[0] / len(rows))
        return (marks[-1] - marks[0]) / args.steps, rows

    print(f"load average {os.getloadavg()}")
    cpu: dict[str, list[float]] = {"pass": [], "record": []}
    rows: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for v in (["pass", "record"] if r % 2 == 0 else ["record", "pass"]):
            s, rows[v] = run(v)
            cpu[v].append(s)
    a, b = rows["pass"], rows["record"]
    assert [m["loss"] for m in a] == [m["loss"] for m in b], "the losses differ"
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("kl", "entropy"))
    unpaired = sum(16 - 2 * m["pairs"] for m in b)
    print(f"online DPO, {args.steps} timed steps, CPU s a step: pass {statistics.median(cpu['pass']):.4f}, record "
          f"{statistics.median(cpu['record']):.4f}; pass / record {paired(cpu['pass'], cpu['record'])}")
    print(f"  losses equal (final {b[-1]['loss']!r}); kl / entropy within {worst:.2e}; unpaired samples over the "
          f"{len(b)} steps: {unpaired}")
    print(f"  CPU ms a step in _unpaired_pass (median of runs): pass {statistics.median(spent['pass']) * 1e3:.2f}, "
          f"record {statistics.median(spent['record']) * 1e3:.2f}")
    model = load_model(folder, task="causal_lm", dtype="float32")
    gen: dict[bool, list[float]] = {False: [], True: []}
    seeded = SamplingConfig(num_samples=2, max_new_tokens=32, temperature=1.0, seed=1)
    ids = {}
    for r in range(args.gen_repeats):
        for v in ([False, True] if r % 2 == 0 else [True, False]):
            t = time.process_time()
            out = generate_responses(model, tok, prompts[:8], seeded, batch_size=64, token_record=v)
            gen[v].append(time.process_time() - t)
            ids[v] = [s.response_ids for s in out]
    assert ids[False] == ids[True], "the record changed the tokens"
    print(f"generation call (8 x 2 x 32), CPU ms: without record {statistics.median(gen[False]) * 1e3:.1f}, with "
          f"{statistics.median(gen[True]) * 1e3:.1f}; with / without {paired(gen[True], gen[False])}")
    print(f"load average {os.getloadavg()}")


def paired(a: list[float], b: list[float]) -> str:
    xs = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(xs):.3f} = " + common.paired_summary(xs)


if __name__ == "__main__":
    main()
