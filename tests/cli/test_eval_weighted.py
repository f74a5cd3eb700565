"""`alignkit eval` on weighted and on ranked data. Before: record weights were read and ignored (every figure the
unweighted mean, nothing said so), and ranked records were only scored as their pairs (no ranking figure). Now
weighted data also gives `weighted/<name>` = sum w v / sum w (each record evaluated alone gives v), and ranked
data `prompts`, `kendall_tau` and `exact_match` per prompt, checked against scores computed row by row."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.data import TokenizeConfig, tokenize_records
from alignkit.data.records import RankedRecord
from alignkit.models.loading import load_model, load_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LIMITS = {"max_length": 128, "max_prompt_length": 64}  # the eval-*-tiny configs'
PAIRS = [{"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A chair."},
         {"prompt": "What is 2 + 2?", "chosen": " Four.", "rejected": " Seven, surely."},
         {"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " No."}]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(tmp_path: Path, name: str, rows: list[dict], args: list[str]) -> dict:
    out = tmp_path / f"eval-{name}"
    assert main(["-q", "eval", f"data.path={write(tmp_path / f'{name}.jsonl', rows)}", f"output_dir={out}",
                 *args]) == 0
    return json.loads((out / "metrics.json").read_text())


def lora_policy(base: str, folder: Path) -> Path:
    """A LoRA on `base` away from its reference (lora_B drawn), so the implicit rewards are not all 0."""
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, save_adapter

    torch.manual_seed(0)
    model = apply_adapter(load_model(base), AdapterConfig(kind="lora", lora=LoraSettings(r=2, alpha=4.0)))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        [p.normal_(0, 0.5) for p in lora_b]
    return save_adapter(model, folder)


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_weighted_records_give_weighted_figures_beside_the_unweighted_ones(kind, tiny_dir, tmp_path):
    if kind == "reward":
        args = ["--config", str(CONFIGS / "eval-rm-tiny.yaml"), f"model.path={tiny_dir('llama', classifier=True)}",
                "model.adapter_path=null"]
        names = ["accuracy", "rewards/chosen", "rewards/rejected", "margin"]
    else:
        base = tiny_dir("llama")
        args = ["--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={base}",
                f"model.adapter_path={lora_policy(base, tmp_path / 'lora')}"]
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    weights = [1.0, 0.0, 3.0]
    got = evaluate(tmp_path, "weighted", [{**r, "weight": w} for r, w in zip(PAIRS, weights)], args)
    alone = [evaluate(tmp_path, f"alone{i}", [r], args) for i, r in enumerate(PAIRS)]
    assert got["pairs"] == 3
    for m in names:
        assert got[m] == pytest.approx(sum(a[m] for a in alone) / 3, abs=1e-5), m  # unweighted, as before
        want = sum(w * a[m] for w, a in zip(weights, alone)) / sum(weights)
        assert got[f"weighted/{m}"] == pytest.approx(want, abs=1e-5), m
    assert not any(k.startswith("weighted/") for k in evaluate(tmp_path, "ones", PAIRS, args))


def test_ranked_records_give_ranking_figures(tiny_dir, tmp_path):
    """Two ranked records (3 replies, one with a tie) and a third of all-tied replies (no ordered pair), weights
    1, 2, 4: tau-a and exact match per prompt by hand from each reply's score."""
    rm = tiny_dir("llama", classifier=True)
    rows = [{"prompt": "Name a fruit.", "responses": [" An apple.", " A pear, I think.", " A chair."], "ranks": [0, 1, 2],
             "weight": 1.0},
            {"prompt": "Say hi.", "responses": [" Hi there!", " Hello.", " No."], "ranks": [0, 0, 1], "weight": 2.0},
            {"prompt": "Count.", "responses": [" One.", " Two."], "ranks": [0, 0], "weight": 4.0}]
    got = evaluate(tmp_path, "ranked", rows, ["--config", str(CONFIGS / "eval-rm-tiny.yaml"), f"model.path={rm}",
                                              "model.adapter_path=null"])
    model, tok = load_model(rm, task="classifier", num_labels=1).eval(), load_tokenizer(rm)
    records = [RankedRecord(r["prompt"], r["responses"], ranks=r["ranks"]) for r in rows]
    features, _ = tokenize_records(records, tok, TokenizeConfig(**LIMITS))
    taus, exact, weights, ok, n = [], [], [], 0, 0
    for f, row in zip(features, rows):
        with torch.no_grad():
            s = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in f["input_ids"]]
        ordered = [(i, j) for i, j in itertools.combinations(range(len(s)), 2) if row["ranks"][i] < row["ranks"][j]]
        if not ordered:
            continue
        right = sum(s[i] > s[j] for i, j in ordered)
        wrong = sum(s[i] < s[j] for i, j in ordered)
        taus.append((right - wrong) / len(ordered))
        exact.append(float(right == len(ordered)))
        weights.append(row["weight"])
        ok, n = ok + right, n + len(ordered)
    assert got["pairs"] == n == 5 and got["prompts"] == 2
    assert got["accuracy"] == pytest.approx(ok / n)
    assert got["kendall_tau"] == pytest.approx(sum(taus) / 2, abs=1e-6)
    assert got["exact_match"] == pytest.approx(sum(exact) / 2)
    assert got["weighted/kendall_tau"] == pytest.approx((taus[0] + 2 * taus[1]) / 3, abs=1e-6)
    assert got["weighted/exact_match"] == pytest.approx((exact[0] + 2 * exact[1]) / 3)
