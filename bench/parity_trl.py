"""alignkit vs TRL's DPOTrainer: same model, reference, rows and settings -> same tokens, loss and metrics.

Runs in the TRL venv (alignkit from the source tree, TRL never enters alignkit's own venv):

    PYTHONPATH=src bench/.envs/trl/bin/python bench/parity_trl.py [--write-golden]

For every dataset of `tests/parity/fixture.py` (plain text, conversational) and every case (TRL loss
types alignkit also has, with their settings) it
1. tokenizes the rows with TRL (`DPOTrainer._prepare_dataset`) and with alignkit (`tokenize_records`, TRL's
   conventions) and compares the ids row by row (prompt, chosen, rejected) -- where conventions bite;
2. computes TRL's loss and logged metrics on one batch of all rows (`DPOTrainer.compute_loss`, an explicit
   `ref_model` = the unperturbed model) and alignkit's (`PreferenceTrainer.compute_loss`, reference="copy");
3. prints the table and writes `bench/results/parity_trl.json`; `--write-golden` also writes TRL's numbers
   to `tests/parity/golden_trl.json` for the CI test.
Then it probes the conventions that differ (EOS, truncation, token-boundary merges, sigmoid label smoothing,
exo_pair at eps = 0) and records what each side does.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from parity.fixture import (CASES, DATASETS, LOGP_KEYS, METRICS, MODEL_ARGS, PERTURB,  # noqa: E402
                            alignkit_case, alignkit_features, build_models, parity_problems, tokenizer_checksum,
                            trl_settings, weights_checksum)

GOLDEN = ROOT / "tests" / "parity" / "golden_trl.json"
RESULTS = ROOT / "bench" / "results" / "parity_trl.json"


def trl_trainer(tok: Any, policy: Any, reference: Any, rows: list[dict], settings: dict, tmp: str, **config: Any):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    kw = {"max_length": None, **settings, **config}
    args = DPOConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False, seed=0,
                     per_device_train_batch_size=len(rows), save_strategy="no", **kw)
    return DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok)


def trl_tokens(trainer: Any) -> list[dict[str, list[int]]]:
    ds = trainer.train_dataset
    return [{k: list(ds[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(ds))]


def trl_case(tok: Any, policy: Any, reference: Any, rows: list[dict], case: dict) -> dict[str, Any]:
    """TRL's loss, logged metrics, per-pair log-probs and token ids for one case on one batch of all rows."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(tok, policy, reference, rows, trl_settings(case), tmp)
        tokens = trl_tokens(trainer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
            pol_c, pol_r = trainer.compute_ref_log_probs(trainer.model, batch)  # the policy, same code path
            ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        logged = trainer._metrics["eval"]
        return {"loss": float(loss), "metrics": {k: float(logged[k][-1]) for k in METRICS},
                "policy_chosen_logps": pol_c.tolist(), "policy_rejected_logps": pol_r.tolist(),
                "reference_chosen_logps": ref_c.tolist(), "reference_rejected_logps": ref_r.tolist(),
                "tokens": tokens}


def compare_tokens(trl: list[dict], ours: list[dict]) -> list[str]:
    """Row-by-row differences between TRL's (prompt_ids, chosen_ids, rejected_ids) and alignkit's features."""
    problems = []
    for i, (t, f) in enumerate(zip(trl, ours)):
        n = f["prompt_length"]
        mine = {"prompt_ids": f["chosen_input_ids"][:n], "chosen_ids": f["chosen_input_ids"][n:],
                "rejected_ids": f["rejected_input_ids"][n:]}
        if f["rejected_input_ids"][:n] != mine["prompt_ids"]:
            problems.append(f"row {i}: alignkit's chosen and rejected prompts differ")
        for k in mine:
            if mine[k] != t[k]:
                problems.append(f"row {i} {k}: TRL {t[k]} != alignkit {mine[k]}")
    return problems


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def probes(tok: Any, policy: Any, reference: Any, golden: dict[str, Any]) -> dict[str, Any]:
    """The conventions that differ, each run on both sides; TRL's side also goes to `golden["probes"]`."""
    out: dict[str, Any] = {}
    g = golden.setdefault("probes", {})
    rows = DATASETS["plain"][:2]
    with tempfile.TemporaryDirectory() as tmp:
        t = trl_tokens(trl_trainer(tok, policy, reference, rows, trl_settings(CASES["sigmoid"]), tmp))
    eos = tok.eos_token_id
    no_eos = alignkit_features(rows, tok, add_eos=False)
    out["eos"] = {"trl_chosen_ends_with_eos": all(r["chosen_ids"][-1] == eos for r in t),
                  "alignkit_add_eos_false_differs": bool(compare_tokens(t, no_eos)),
                  "alignkit_default_equal": not compare_tokens(t, alignkit_features(rows, tok))}
    # truncation: TRL keeps the start of prompt+completion (max_length); alignkit's defaults also cut the prompt
    long_rows = [{"prompt": "The quick brown fox jumps over the lazy dog." * 3, "chosen": " Paris.",
                  "rejected": " Hello! How can I help you today? Thank you very much!"}]
    L = 40
    with tempfile.TemporaryDirectory() as tmp:
        tr = trl_trainer(tok, policy, reference, long_rows, trl_settings(CASES["sigmoid"]), tmp, max_length=L)
        batch = tr.data_collator([tr.train_dataset[0]])
    trl_seq = [batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist() for r in range(2)]
    ours = alignkit_features(long_rows, tok, max_length=L)[0]
    ours_short_prompt = alignkit_features(long_rows, tok, max_length=L, max_prompt_length=16)[0]
    g["truncation"] = {"rows": long_rows, "max_length": L, "trl_input_ids": trl_seq}
    out["truncation"] = {
        "max_length": L, "prompt_tokens": len(tr.train_dataset[0]["prompt_ids"]),
        "alignkit_max_prompt_length_none_equal": [ours["chosen_input_ids"], ours["rejected_input_ids"]] == trl_seq,
        "alignkit_max_prompt_length_16_equal": [ours_short_prompt["chosen_input_ids"],
                                                ours_short_prompt["rejected_input_ids"]] == trl_seq}
    # a prompt ending in a space: BPE merges " Paris" across the boundary
    merged = [{"prompt": "Question: what is the capital of France? Answer: ", "chosen": "Paris.",
               "rejected": "Lazy dog."}]
    with tempfile.TemporaryDirectory() as tmp:
        tm = trl_tokens(trl_trainer(tok, policy, reference, merged, trl_settings(CASES["sigmoid"]), tmp))[0]
    try:
        alignkit_features(merged, tok)
        ours_merged = "accepted"
    except Exception as e:  # noqa: BLE001 -- we record what happened
        ours_merged = f"{type(e).__name__}: {str(e)[:160]}"
    full_prompt = tok(merged[0]["prompt"])["input_ids"]
    g["boundary_merge"] = {"rows": merged, "trl_tokens": [tm]}
    out["boundary_merge"] = {"trl_prompt_tokens_kept": len(tm["prompt_ids"]), "prompt_tokens": len(full_prompt),
                             "trl_chosen_ids_decoded": tok.decode(tm["chosen_ids"]), "alignkit": ours_merged}
    # exo_pair with label_smoothing = 0: TRL refuses; alignkit uses eps = 1e-3
    rows = DATASETS["plain"]
    exo0 = {"loss_type": ["exo_pair"], "label_smoothing": 0.0}
    try:
        trl_exo0: Any = trl_case(tok, policy, reference, rows, exo0)["loss"]
    except ValueError as e:
        trl_exo0 = f"ValueError: {e}"
    ak_exo0 = alignkit_case(tok, policy, reference, rows, exo0)["loss"]
    ak_exo1e3 = alignkit_case(tok, policy, reference, rows, CASES["exo_pair_ls1e-3"])["loss"]
    g["exo_pair_eps0"] = {"trl": trl_exo0}
    out["exo_pair_eps0"] = {"trl_loss": trl_exo0, "alignkit_loss": ak_exo0, "alignkit_loss_eps1e-3": ak_exo1e3}
    # sigmoid + label_smoothing: TRL 1.16 ignores it; alignkit's is cDPO unless label_smoothing = 0
    from alignkit.losses import PreferenceBatch, PreferenceParams, preference_loss

    r = alignkit_case(tok, policy, reference, rows, CASES["sigmoid"])
    pb = PreferenceBatch(*(torch.tensor(r[k]) for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                         "reference_chosen_logps", "reference_rejected_logps")))
    ak_cdpo = float(preference_loss(pb, PreferenceParams(beta=0.1, label_smoothing=0.1), "sigmoid").losses.mean())
    out["sigmoid_label_smoothing"] = {
        "trl_sigmoid_ls0.1": trl_case(tok, policy, reference, rows, CASES["sigmoid_ls0.1"])["loss"],
        "trl_sigmoid_ls0": trl_case(tok, policy, reference, rows, CASES["sigmoid"])["loss"],
        "alignkit_sigmoid_ls0": r["loss"], "alignkit_sigmoid_ls0.1_cdpo": ak_cdpo}
    return out


def dumps(value: Any) -> str:
    """JSON with one key per line but each list of numbers on one line (readable diffs of the golden file)."""
    text = json.dumps(value, indent=1)
    return re.sub(r"\[\s*([-0-9.e, \n]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-golden", action="store_true", help=f"write TRL's numbers to {GOLDEN}")
    ap.add_argument("--no-probes", action="store_true")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    import transformers
    import trl

    tok, policy, reference = build_models()
    golden: dict[str, Any] = {
        "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "model_args": MODEL_ARGS, "perturb": PERTURB,
        "reference_checksum": weights_checksum(reference), "policy_checksum": weights_checksum(policy),
        "tokenizer_checksum": tokenizer_checksum(tok), "datasets": {}}
    table, token_problems, problems = [], {}, []
    for dname, rows in DATASETS.items():
        golden["datasets"][dname] = {"rows": rows, "cases": {}}
        for cname, case in CASES.items():
            t = trl_case(tok, policy, reference, rows, case)
            a = alignkit_case(tok, policy, reference, rows, case)
            if "tokens" not in golden["datasets"][dname]:
                golden["datasets"][dname]["tokens"] = t["tokens"]
                token_problems[dname] = compare_tokens(t["tokens"], alignkit_features(rows, tok))
            golden["datasets"][dname]["cases"][cname] = {"settings": trl_settings(case),
                                                         **{k: v for k, v in t.items() if k != "tokens"}}
            row = {"dataset": dname, "case": cname, "trl_loss": t["loss"], "alignkit_loss": a["loss"],
                   "loss_abs_diff": abs(t["loss"] - a["loss"]), "loss_rel_diff": rel(a["loss"], t["loss"]),
                   "metric_abs_diffs": {m: abs(t["metrics"][m] - a["metrics"][m]) for m in METRICS},
                   "logps_max_abs_diff": max(abs(x - y) for k in LOGP_KEYS for x, y in zip(t[k], a[k]))}
            table.append(row)
            problems += [f"{dname}/{cname} {p}" for p in parity_problems(a, t)]
    print("token ids:", {d: (p or "identical") for d, p in token_problems.items()})
    head = f"{'dataset':<15}{'case':<24}{'TRL loss':>14}{'alignkit':>14}{'abs diff':>10}" + "".join(
        f"{m.split('/')[1][:9]:>11}" for m in METRICS)
    print(head)
    for r in table:
        print(f"{r['dataset']:<15}{r['case']:<24}{r['trl_loss']:>14.8f}{r['alignkit_loss']:>14.8f}"
              f"{r['loss_abs_diff']:>10.1e}" + "".join(f"{r['metric_abs_diffs'][m]:>11.1e}" for m in METRICS))
    worst = max(r["loss_rel_diff"] for r in table)
    print(f"worst relative loss difference: {worst:.2e}")
    # the exit status checks what tests/parity checks (log-probs, loss, metrics; a NaN on either side fails), not
    # the loss alone: a NaN relative difference compared False with the threshold and passed
    trl_bad = [f"{d}/{c} TRL {k}" for d, ds in golden["datasets"].items() for c, v in ds["cases"].items()
               for k, x in [("loss", v["loss"]), *v["metrics"].items(), *((f"{k}[{i}]", y) for k in LOGP_KEYS
                                                                          for i, y in enumerate(v[k]))]
               if not math.isfinite(x)]
    for p in trl_bad + problems:
        print(f"DIFFERS: {p}")
    result = {"table": table, "token_problems": token_problems, "differences": trl_bad + problems,
              "checksums": {k: golden[k] for k in ("reference_checksum", "policy_checksum", "tokenizer_checksum")}}
    if opts.write_golden and opts.no_probes:
        ap.error("--write-golden needs the probes (their TRL side is part of the golden file)")
    if opts.write_golden and trl_bad:
        ap.error(f"--write-golden: TRL's own figures are not finite ({'; '.join(trl_bad[:3])}); not recorded")
    if not opts.no_probes:
        result["probes"] = probes(tok, policy, reference, golden)
        print(json.dumps(result["probes"], indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if opts.write_golden:
        GOLDEN.write_text(dumps(golden) + "\n")
        print(f"wrote {GOLDEN}")
    if any(token_problems.values()) or trl_bad or problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
