"""Where one alignkit ReFT training step spends its time, on the CPU suite's "small" scenario.

    .venv/bin/python bench/reft_step_profile.py [--run-dir bench/results/cpu-<stamp>] [--repeats 5]

Same model, data, adapter and batch size as `run_cpu.py --tasks reft` (LoReFT rank 4 at layer 2's block
output, positions l1, batch 8, random batches padded to their longest row, 1 thread). Without
`--run-dir` the scenario is built in a temporary folder. On 20 fixed batches, each part is timed
alone, the parts interleaved `--repeats` times, and the minimum per batch is reported (load on a shared
machine only ever adds time):

  backbone_fwd_nograd   the frozen model's backbone, no grad: the work pyreft does too
  reft_fwd_grad         ReftModel forward with grad (hooks, locations, LoReFT, autograd recording)
  step                  completion_token_logps + SFT loss + backward (no optimizer, no Trainer)
  head_fwd_bwd          the chunked LM head alone on the step's completion rows (N, d), fwd + bwd
  edit_fwd_bwd          gather -> LoReFT -> scatter alone on one (B, T, d) hidden state, fwd + bwd
  locations             position computation from the batch (prompt spans -> locations)
  collate               SFTCollator on 8 examples

Backward (rest) = step - reft_fwd_grad - head. Trainer overhead (optimizer, clipping, logging, data
loading) = 1000 / (run_cpu.py samples/s / 8) - step. Writes bench/results/reft_step_profile.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="a run_cpu.py run folder (holds small/model and small/*.jsonl)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run_dir = Path(a.run_dir) if a.run_dir else Path(tempfile.mkdtemp(prefix="reft-profile-"))
    spec = common.SCENARIOS["small"]
    if not (common.model_dir(run_dir, spec) / "config.json").exists():
        common.prepare_scenario(spec, run_dir)

    import alignkit_side
    from alignkit.data import SFTCollator
    from alignkit.interventions.editing import Run, Step, edit_positions
    from alignkit.losses import SFT_LOSSES, chunked_lm_logprobs
    from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter
    from alignkit.trainers.logps import batch_locations, completion_token_logps, final_hidden_states

    args = common.parse_args(["--spec", str(common.scenario_dir(run_dir, spec) / "spec.json"), "--run-dir",
                              str(run_dir), "--task", "reft", "--out", "/dev/null"])
    args.spec_dict = spec
    tok = common.load_tokenizer(common.model_dir(run_dir, spec))
    feats = alignkit_side._tokenized(args, "reft", tok)
    base = alignkit_side._model(args)
    torch.manual_seed(0)
    reft = ReftSettings(config={"representations": [{"layer": args.layer, "component": "block_output",
                                                     "intervention": "loreft", "low_rank_dimension": args.rank}]},
                        positions="l1", share_weights=True)
    model = apply_adapter(base, AdapterConfig(kind="reft", reft=reft))
    model.train()
    collate = SFTCollator(tok.pad_token_id)
    rng = random.Random(0)
    samples = [rng.sample(feats, 8) for _ in range(20)]
    batches = [collate(s) for s in samples]
    head = base.get_output_embeddings().weight
    slot = model.slots[0]
    heads, edits = [], []
    for b in batches:  # the head's and the hook's inputs, as the step sees them
        mask = (b["completion_mask"][:, 1:] & b["attention_mask"][:, 1:]).bool()
        with torch.no_grad():
            h = final_hidden_states(model, b)
        rows, cols = mask.nonzero(as_tuple=True)
        heads.append((h[rows, cols].clone().requires_grad_(True), b["input_ids"][:, 1:][rows, cols]))
        edits.append((torch.randn(*b["input_ids"].shape, h.shape[-1]),
                      Step(Run(batch_locations(model, b), frozenset([slot.pos])), 0)))

    def step(i):
        tl, m = completion_token_logps(model, batches[i])
        (SFT_LOSSES["nll"](tl, m).losses.sum() / m.sum()).backward()

    def backbone(i):
        b = batches[i]
        with torch.no_grad():
            base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])

    def head_fb(i):
        chunked_lm_logprobs(heads[i][0], head, None, heads[i][1]).sum().backward()

    def edit_fb(i):
        h = edits[i][0].requires_grad_(True)
        edit_positions(h, slot, edits[i][1]).sum().backward()

    parts = {"backbone_fwd_nograd": backbone, "reft_fwd_grad": lambda i: final_hidden_states(model, batches[i]),
             "step": step, "head_fwd_bwd": head_fb, "edit_fwd_bwd": edit_fb,
             "locations": lambda i: batch_locations(model, batches[i]), "collate": lambda i: collate(samples[i])}
    for fn in parts.values():  # warm up
        fn(0)
    best = {k: float("inf") for k in parts}
    for _ in range(a.repeats):
        for name, fn in parts.items():
            t = time.perf_counter()
            for i in range(len(batches)):
                fn(i)
            best[name] = min(best[name], (time.perf_counter() - t) / len(batches) * 1e3)
    best["backward_rest"] = best["step"] - best["reft_fwd_grad"] - best["head_fwd_bwd"]
    real = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    for k, v in best.items():
        print(f"{k:22s} {v:8.3f} ms  ({100 * v / best['step']:5.1f} % of step)")
    print(f"non-pad fraction of the padded batches: {real:.3f}")
    out = BENCH / "results" / "reft_step_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ms": best, "non_pad_fraction": real, "threads": a.threads, "repeats": a.repeats,
                               "versions": common.versions("alignkit")}, indent=2))


if __name__ == "__main__":
    main()
