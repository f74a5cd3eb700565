"""In-process A/B of batch layouts on CPU: one forward + backward of `completion_logps` (SFT rows, DPO 2B rows)
per layout, interleaved over 12 batches of 8 examples of the CPU suite's "small" scenario:

    padded (random batches) | padded + length-grouped | packed one row | packed rows of the longest | rows + grouped

    .venv/bin/python bench/packing_ab.py bench/results/cpu-<stamp>      # a run folder of run_cpu.py

Random and grouped batches hold different examples, so compare real (non-pad) tokens/s, not ms/step.
Writes bench/results/packing_ab.json.
"""
import sys, time, torch, statistics, random, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
torch.set_num_threads(1)
from alignkit.models.loading import load_model
from alignkit.data import SFTRecord, PreferenceRecord, tokenize_records, SFTCollator, PreferenceCollator
from alignkit.data.collators import PackedSFTCollator, PackedPreferenceCollator
from alignkit.data.batching import LengthGroupedSampler, example_length
from alignkit.trainers.logps import completion_logps
R = sys.argv[1]  # run folder of bench/run_cpu.py (holds small/spec.json, model, data)
spec = common.load_spec(f"{R}/small/spec.json")
tok = common.load_tokenizer(common.model_dir(R, spec))
model = load_model(common.model_dir(R, spec), dtype="float32").train()
out = {}
for kind in ("sft", "pref"):
    rows = common.read_jsonl(common.data_file(R, spec, kind))
    recs = [SFTRecord(r["prompt"], r["completion"], id=str(i)) if kind == "sft" else PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], id=str(i)) for i, r in enumerate(rows)]
    feats, _ = tokenize_records(recs, tok, max_length=128, max_prompt_length=None)
    order = list(range(len(feats))); random.Random(0).shuffle(order)
    rand_batches = [order[i:i+8] for i in range(0, 96, 8)]
    grouped = LengthGroupedSampler([example_length(f) for f in feats], 8, seed=0).batches(0)[1:13]
    pad = SFTCollator(0) if kind == "sft" else PreferenceCollator(0)
    pk = PackedSFTCollator() if kind == "sft" else PackedPreferenceCollator()
    pk_rows = PackedSFTCollator("longest") if kind == "sft" else PackedPreferenceCollator("longest")
    modes = {"padded": (pad, rand_batches), "padded+grouped": (pad, grouped), "packed 1 row": (pk, rand_batches), "packed rows": (pk_rows, rand_batches), "packed rows+grouped": (pk_rows, grouped)}
    res = {m: [] for m in modes}
    toks = {m: 0 for m in modes}
    for i in range(12):
        for m, (col, bs) in modes.items():
            b = col([feats[j] for j in bs[i]])
            model.zero_grad(); t = time.perf_counter()
            lp, n = completion_logps(model, b); lp.sum().backward()
            res[m].append(time.perf_counter() - t)
            if kind == "sft":
                toks[m] += sum(len(feats[j]["input_ids"]) for j in bs[i])
            else:
                toks[m] += sum(len(feats[j]["chosen_input_ids"]) + len(feats[j]["rejected_input_ids"]) for j in bs[i])
    for m in modes:
        out[f"{kind}/{m}"] = {"ms_per_step_median": 1000 * statistics.median(res[m]), "real_tokens_per_s": toks[m] / sum(res[m])}
        print(kind, m, f"{1000*statistics.median(res[m]):.1f} ms/step, {toks[m]/sum(res[m]):.0f} real tok/s")
json.dump(out, open(Path(__file__).resolve().parent / "results" / "packing_ab.json", "w"), indent=2)
