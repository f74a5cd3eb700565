"""The whole-pipeline demo at a small scale: every stage moves its held-out number the right way.

The rule is re-checked here from the written generations with a regex of the test's own, so the
reported score is what the model really generated. Measured at scale 0.4 for seeds 0-3: SFT loss 6.1 ->
0.40-0.56; reward model 1.00 held-out accuracy; DPO reward accuracy 1.00, margin 0.26-0.31 (ReFT) and
0.73-3.5 (LoRA); greedy rule score 0.00 -> 0.97-1.00 and sampled 0.14-0.25 -> 0.33-0.49 for both adapters.
At scale 0.25 the SFT model is too weak (loss ~1.0) and one seed's ReFT stayed at 0.00, hence 0.4.
Reward-model accuracy BEFORE training is a random head on the SFT backbone (0.03 to 0.94 over those
seeds), so only the level after is asserted; so is DPO+ReFT's before (a LoReFT at init is not the identity).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from alignkit.cli.demo import PIPELINE_WRITES
from alignkit.demos import pipeline_data as task
from alignkit.demos.pipeline import load_task, run_pipeline_demo

RULE = re.compile(r"^\s*Sure!.*Hope this helps!\s*$", re.S)  # independent of pipeline_data.follows_rule


def _rule_fraction(path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(bool(RULE.match(r["response"])) for r in rows) / len(rows)


def _topic_fraction(path) -> float:
    """Share of responses naming the prompt's "the <colour> <animal>" (capitalised), by the test's own regex."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    hits = 0
    for r in rows:
        m = re.search(r"the (\w+) (\w+)\b", r["prompt"])
        hits += bool(m) and f"The {m.group(1)} {m.group(2)}" in r["response"]
    return hits / len(rows)


def _check_adapter(result, out, adapter: str) -> None:
    d = result.dpo[adapter]
    assert d.reward_accuracy.after > 0.5 and d.reward_margin.after > 0, adapter
    assert d.rule_greedy.after > d.rule_greedy.before and d.rule_greedy.after >= 0.5, adapter
    assert d.rule_sampled.after > d.rule_sampled.before, adapter
    assert d.rm_score_greedy.after > d.rm_score_greedy.before, adapter  # the reward model agrees with the rule
    # the scores are those of the generations written to disk, recomputed with the test's own regex
    assert _rule_fraction(out / f"dpo_{adapter}" / "generations_greedy.jsonl") == pytest.approx(d.rule_greedy.after)
    assert _rule_fraction(out / f"dpo_{adapter}" / "generations_sampled.jsonl") == pytest.approx(d.rule_sampled.after)
    assert _rule_fraction(out / "sft" / "generations_greedy.jsonl") == pytest.approx(d.rule_greedy.before)
    assert d.on_topic_greedy.after >= 0.5, adapter  # names the prompt's animal (ReFT on 5.24 fell to 0.25)
    assert _topic_fraction(out / f"dpo_{adapter}" / "generations_greedy.jsonl") == pytest.approx(d.on_topic_greedy.after)


def test_pipeline_demo_moves_every_number_the_right_way(tmp_path):
    # one test, one run (~12 s): a module fixture would run once per xdist worker
    threads = torch.get_num_threads()
    result = run_pipeline_demo(tmp_path, scale=0.4, seed=0, progress=False)
    assert result.shortfalls() == [], result.shortfalls()
    assert torch.get_num_threads() == threads  # restored
    assert {p.name for p in tmp_path.iterdir()} <= set(PIPELINE_WRITES)  # what `alignkit demo` takes back as its own
    assert result.steps == {"sft": 120, "reward_model": 40, "dpo": 40}

    assert result.sft_loss.before > 4.0  # about ln(vocabulary) for the random base
    assert result.sft_loss.after < 0.5 * result.sft_loss.before
    assert result.rm_accuracy.after >= 0.9
    for adapter in ("reft", "lora"):
        _check_adapter(result, tmp_path, adapter)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dpo"]["lora"]["reward_margin"]["after"] == pytest.approx(result.dpo["lora"].reward_margin.after)
    assert (tmp_path / "dpo_reft" / "interventions.safetensors").is_file()
    assert (tmp_path / "dpo_lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "reward_model" / "model.safetensors").is_file()
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    for stage in ("sft", "reward_model", "dpo_reft", "dpo_lora"):
        train = json.loads((tmp_path / stage / "metrics.json").read_text())["train"]
        # each stage is recorded as a training run is: the log, TensorBoard events, the loss curve
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        summary = next(r for r in rows if "train_loss" in r)  # the Trainer's end-of-training log
        assert len(losses) >= 5 and summary["train_loss"] == pytest.approx(train["train_loss"], rel=1e-6)
        assert sum(losses) / len(losses) == pytest.approx(train["train_loss"], rel=0.3)  # logged every steps/10
        assert list((tmp_path / stage / "tensorboard").glob("events.out.tfevents.*"))
        assert (tmp_path / stage / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    table = result.table()
    assert (tmp_path / "table.txt").read_text() == table + "\n"
    assert len(table.splitlines()) == 2 + len(result.rows()) + 4
    assert "DPO+ReFT: rule score, greedy" in table and "reward-model accuracy" in table


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": float("nan")}, {"threads": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        run_pipeline_demo(tmp_path, **kwargs)


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


def _result(scale: float = 1.0, **dpo_after):
    from alignkit.demos.pipeline_report import AdapterNumbers, Change, PipelineResult

    def numbers(rule=1.0, topic=1.0):
        c = Change(0.0, 1.0)
        return AdapterNumbers(reward_accuracy=Change(0.0, 1.0), reward_margin=c, rule_greedy=Change(0.2, rule),
                              rule_sampled=c, on_topic_greedy=Change(1.0, topic), rm_score_greedy=c)
    return PipelineResult(sft_loss=Change(6.1, 0.09), rm_accuracy=Change(0.3, 1.0),
                          dpo={"reft": numbers(**dpo_after.get("reft", {})), "lora": numbers()}, scale=scale)


def test_floors_name_the_stage_and_figure_that_fall_short():
    assert _result().shortfalls() == []
    # the transformers 5.24 failure: ReFT generation repeating "Sure!" scored 0.69 style, 0.25 on-topic
    short = _result(reft={"rule": 0.69, "topic": 0.25}).shortfalls()
    assert short == ["DPO+ReFT: greedy style score 0.69 < floor 0.9", "DPO+ReFT: greedy on-topic rate 0.25 < floor 0.9"]
    assert _result(reft={"topic": float("nan")}).shortfalls() == ["DPO+ReFT: greedy on-topic rate nan < floor 0.9"]
    assert _result(scale=0.4, reft={"rule": 0.69}).shortfalls() == []  # reduced floors below scale 1
    import dataclasses

    from alignkit.demos.pipeline_report import Change

    # small losses in 4 significant digits: 3 decimals read "0.000 -> 0.000 is 2.00x the start"
    tiny = dataclasses.replace(_result(), sft_loss=Change(0.00012, 0.00024)).shortfalls()
    assert tiny == ["SFT: held-out loss 0.00012 -> 0.00024 is 2.00x the start, floor <= 0.1x"]


def test_demo_cli_exits_nonzero_when_a_figure_falls_short(monkeypatch, tmp_path, capsys):
    import alignkit.demos.pipeline as pipeline
    from alignkit.cli import main

    bad = _result(reft={"rule": 0.69, "topic": 0.25})
    bad.output_dir = str(tmp_path)
    monkeypatch.setattr(pipeline, "run_pipeline_demo", lambda *a, **k: bad)
    assert main(["-q", "demo", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "DPO+ReFT: greedy on-topic rate 0.25 < floor 0.9" in err
    monkeypatch.setattr(pipeline, "run_pipeline_demo", lambda *a, **k: _result())
    assert main(["-q", "demo", "--output-dir", str(tmp_path)]) == 0
    assert "something in the stack is wrong" in err


def test_a_run_below_the_measured_scale_does_not_blame_the_stack(monkeypatch, tmp_path, capsys, caplog):
    """--scale 0.05 trains too little for the reduced floors (measured at 0.4): its FAILED line said "a healthy run of
    this demo never falls below these floors, so something in the stack is wrong". Now it warns before the run and
    says the scale is the reason."""
    import alignkit.demos.pipeline as pipeline
    from alignkit.cli import main

    short = _result(scale=0.05, reft={"rule": 0.0, "topic": 0.0})
    short.output_dir = str(tmp_path)
    monkeypatch.setattr(pipeline, "run_pipeline_demo", lambda *a, **k: short)
    assert main(["-q", "demo", "--scale", "0.05", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--scale 0.05 is below 0.4, the smallest scale the demo's reduced floors were measured at" in caplog.text
    assert "FAILED: DPO+ReFT: greedy style score 0.00 < floor 0.5" in err and "stack is wrong" not in err
    assert "--scale 0.05 is below 0.4, where the reduced floors were measured" in err
