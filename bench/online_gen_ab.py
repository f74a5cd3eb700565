"""Generation A/B on the online suite's tiny Llama: `model.generate` vs `decode.lean_generate` (same tokens).

    .venv/bin/python bench/online_gen_ab.py --repeats 15        # GRPO's 8 prompts x 4 and online DPO's 8 x 2

One call = `generate_responses` on 8 prompts of the "small" scenario x num_samples, 32 new tokens, temperature 1
(what one online step samples). Variants, interleaved call by call: `generate` (lean=False), `lean, model's
mask` (the lean loop with generate's multinomial draws, the model building each step's attention mask), `lean`
(a prepared 4D mask, multinomial draws), `lean, inverse cdf, model's step` (the inverse-CDF sampler, every decode
step the model's own forward: decode.FAST_STEP off), `lean, inverse cdf` (the default: the inverse-CDF sampler and
the fast decode step, `online.fast_step`), `lean, inverse cdf, unfused` (the default with `fast_step.FUSE` off:
each layer's q/k/v, gate/up, norms called one module at a time).
Each call's CPU seconds (time.process_time, 1 thread); prints min and median per variant and the paired ratio
generate / variant (`common.paired_summary`: median, min-max and the median's CI over the repeats). Checks first
that every multinomial variant gives generate's tokens, and that the inverse-CDF variant gives as many tokens per
call within 25 % (other draws).
A ratio is printed only where both sides generated rows of the same lengths (the same decode work,
`common.generation_mismatch`; the inverse-CDF variants draw other tokens, so with stop tokens their rows end
elsewhere): otherwise "n/c" and a NOT COMPARABLE line saying how the generations differ.
`--stop-tokens K`: K vocabulary ids become stop tokens (rows end at different steps) and the variant
`lean, inverse cdf, rows kept` (decode.DROP_FINISHED off: ended rows stay in the batch, as in generate) joins,
with the paired ratio rows kept / rows leaving (the same sampler, but not the same tokens: rows leaving draw fewer
random numbers per step, so later draws differ and the ratio is usually n/c). With stop tokens the 25 % check on
the inverse-CDF variants' token counts is skipped (rows end at other steps; the ratios' own check still applies).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--samples", type=int, nargs="*", default=[4, 2])
    ap.add_argument("--stop-tokens", type=int, default=0,
                    help="make this many vocabulary ids (fixed, random) stop tokens, so rows end at different "
                         "steps, and add the variant 'lean, inverse cdf, rows kept' (ended rows stay in the batch)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import alignkit.online.decode as decode
    import alignkit.online.fast_step as fast_step
    from alignkit.models.loading import load_model
    from alignkit.online.generation import SamplingConfig, generate_responses

    run_dir = Path(args.results) / f"genab-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = common.load_spec(common.prepare_scenario(common.SCENARIOS["small"], run_dir))
    folder = common.model_dir(run_dir, spec)
    tok = common.load_tokenizer(folder, padding_side="left")
    model = load_model(folder, task="causal_lm", dtype="float32")
    prompts = [r["prompt"] for r in common.read_jsonl(common.data_file(run_dir, spec, "sft"))][:8]

    def call(variant: str, cfg: SamplingConfig):
        decode.PREPARED_MASK = variant != "lean, model's mask"
        decode.DROP_FINISHED = variant != "lean, inverse cdf, rows kept"
        decode.FAST_STEP = variant != "lean, inverse cdf, model's step"
        fast_step.FUSE = variant != "lean, inverse cdf, unfused"
        if not variant.startswith("lean, inverse cdf"):
            cfg = replace(cfg, sampler="multinomial")
        return generate_responses(model, tok, prompts, cfg, batch_size=64, lean=variant != "generate")

    variants = ["generate", "lean, model's mask", "lean", "lean, inverse cdf, model's step",
                "lean, inverse cdf, unfused", "lean, inverse cdf"]
    stop_ids: list[int] = []
    if args.stop_tokens:
        variants.append("lean, inverse cdf, rows kept")
        stop_ids = random.Random(0).sample(range(10, len(tok)), args.stop_tokens)
    print(f"load average {__import__('os').getloadavg()}")
    for k in args.samples:
        cfg = SamplingConfig(num_samples=k, max_new_tokens=32, temperature=1.0, seed=1, stop_token_ids=stop_ids)
        toks = {v: [s.response_ids for s in call(v, cfg)] for v in variants}
        assert all(toks[v] == toks["generate"] for v in variants[:3]), "a multinomial variant sampled other tokens"
        assert toks["lean, inverse cdf"] == toks["lean, inverse cdf, model's step"], "the fast step sampled other tokens"
        assert toks["lean, inverse cdf, unfused"] == toks["lean, inverse cdf"], "the fused step sampled other tokens"
        n_gen = {v: sum(map(len, t)) for v, t in toks.items()}
        if not stop_ids:  # with stop tokens, other draws end rows at other steps: counts differ by more
            assert all(abs(n_gen[v] - n_gen["generate"]) <= 0.25 * n_gen["generate"] for v in variants[3:]), n_gen
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                t = time.process_time()
                out = call(v, cfg)
                cpu[v].append(time.process_time() - t)
                if [s.response_ids for s in out] != toks[v]:  # a seeded call draws what the checked one drew
                    raise SystemExit(f"NOT COMPARABLE: {v!r} generated other tokens in repeat {r} than in the "
                                     "checked call (its seeded draws are not reproducible); no ratio")
        print(f"8 prompts x {k} samples x 32 tokens ({sum(map(len, toks['generate']))} generated), CPU ms per call:")
        notes = []

        def ratio(a: str, b: str) -> str:
            """median (min-max) of the paired CPU ratios a / b, or n/c with a NOT COMPARABLE note."""
            why = common.generation_mismatch(toks[a], toks[b])
            if why:
                notes.append(f"  NOT COMPARABLE {a!r} vs {b!r} (n/c: no ratio): {why}")
                return "n/c"
            return common.paired_summary([x / y for x, y in zip(cpu[a], cpu[b])])

        for v in variants:
            print(f"  {v:<20} min {min(cpu[v]) * 1e3:6.1f}  median {statistics.median(cpu[v]) * 1e3:6.1f}   "
                  f"generate / this: {ratio('generate', v)}")
        default = "lean, inverse cdf"
        print(f"  fast decode step: model's step / fast step {ratio(variants[3], default)}")
        print(f"  fused layers: unfused / fused {ratio(variants[4], default)}")
        if "lean, inverse cdf, rows kept" in cpu:
            print(f"  ended rows: kept / leaving {ratio('lean, inverse cdf, rows kept', default)}")
        for line in notes:
            print(line)
    print(f"load average {__import__('os').getloadavg()}")


if __name__ == "__main__":
    main()
