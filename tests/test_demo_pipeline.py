"""The whole-pipeline demo at a small scale: every stage moves its held-out number the right way.

The rule is re-checked here from the written generations with a regex of the test's own, so the
reported score is what the model really generated. What is robust at scale 0.25 (seeds 0, 1, 2, see the
report in the commit): SFT loss falls from ~6.1 to < 0.75; the reward model reaches 1.00 held-out
accuracy; DPO reward accuracy 1.00 and margin > 0.2 for both adapters; the greedy rule score goes from
0.00 to 1.00 and the sampled one from ~0.15 to ~0.3 for both. Reward-model accuracy BEFORE training is a
random head on the SFT backbone (anything from 0.1 to 0.97), so only the level after is asserted.
"""

from __future__ import annotations

import json
import re

import pytest

from alignkit.demos import pipeline_data as task
from alignkit.demos.pipeline import load_task, run_pipeline_demo

RULE = re.compile(r"^\s*Sure!.*Hope this helps!\s*$", re.S)  # independent of pipeline_data.follows_rule


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    return run_pipeline_demo(out, scale=0.25, seed=0, progress=False, threads=1), out


def _rule_fraction(path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(bool(RULE.match(r["response"])) for r in rows) / len(rows)


def test_sft_and_reward_model_learn(demo):
    result, _ = demo
    assert result.sft_loss.before > 4.0  # about ln(vocabulary) for the random base
    assert result.sft_loss.after < 0.5 * result.sft_loss.before
    assert result.rm_accuracy.after >= 0.9


@pytest.mark.parametrize("adapter", ["reft", "lora"])
def test_dpo_moves_rewards_and_generations(demo, adapter):
    result, out = demo
    d = result.dpo[adapter]
    assert d.reward_accuracy.after > 0.5 and d.reward_margin.after > 0
    assert d.rule_greedy.after > d.rule_greedy.before and d.rule_greedy.after >= 0.5
    assert d.rule_sampled.after > d.rule_sampled.before
    assert d.rm_score_greedy.after > d.rm_score_greedy.before  # the reward model agrees with the rule
    # the scores are those of the generations written to disk, recomputed with the test's own regex
    assert _rule_fraction(out / f"dpo_{adapter}" / "generations_greedy.jsonl") == pytest.approx(d.rule_greedy.after)
    assert _rule_fraction(out / f"dpo_{adapter}" / "generations_sampled.jsonl") == pytest.approx(d.rule_sampled.after)
    assert _rule_fraction(out / "sft" / "generations_greedy.jsonl") == pytest.approx(d.rule_greedy.before)


def test_outputs_written(demo):
    result, out = demo
    saved = json.loads((out / "results.json").read_text())
    assert saved["dpo"]["lora"]["reward_margin"]["after"] == pytest.approx(result.dpo["lora"].reward_margin.after)
    assert (out / "dpo_reft" / "interventions.safetensors").is_file()
    assert (out / "dpo_lora" / "adapter_model.safetensors").is_file()
    assert (out / "reward_model" / "model.safetensors").is_file() and (out / "sft" / "model.safetensors").is_file()
    for stage in ("sft", "reward_model", "dpo_reft", "dpo_lora"):
        assert "train" in json.loads((out / stage / "metrics.json").read_text())
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    table = result.table()
    assert len(table.splitlines()) == 2 + len(result.rows()) + 3
    assert "DPO+ReFT: rule score, greedy" in table and "reward-model accuracy" in table


def test_bundled_data_is_what_the_generator_writes(tmp_path):
    folder = task.write_files(tmp_path)
    for name in task.FILES:
        shipped = task.default_folder() / f"{name}.jsonl"
        assert (folder / f"{name}.jsonl").read_bytes() == shipped.read_bytes(), f"regenerate {shipped}"


def test_bundled_data_split_and_styles():
    recs = load_task()
    train = {r.prompt for r in recs["sft_train"]} | {r.prompt for r in recs["preference_train"]}
    held = [r.prompt for r in recs["prompts_heldout"]]
    assert len(held) == 64 and not train & set(held)  # held-out prompts are new to every stage
    assert {r.prompt for r in recs["preference_heldout"]} == set(held)
    assert all(RULE.match(r.chosen) and not RULE.match(r.rejected) for r in recs["preference_train"])
    polite = sum(bool(RULE.match(r.completion)) for r in recs["sft_train"]) / len(recs["sft_train"])
    assert 0.2 < polite < 0.4  # both styles in the SFT data, the preferred one the minority
    assert task.follows_rule(" Sure! The red cat is curious. Hope this helps!")
    assert not task.follows_rule(" The red cat is curious. Hope this helps!")
