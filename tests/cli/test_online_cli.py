"""The online commands on the shipped tiny configs: grpo and online-dpo runs (2 steps) write the run folder,
sample -> annotate -> best-of-n write files the offline commands read, the verifiable rewards by hand, and
config errors that name the key."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.rewards import contains_keyword, digit_fraction, length_target
from alignkit.settings import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["train.max_steps=2", "method.prompts_per_step=2", "sampling.num_samples=2", "sampling.max_new_tokens=3"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rewards_by_hand():
    assert digit_fraction(None, "ab12") == 0.5 and digit_fraction(None, "") == 0.0
    assert contains_keyword(None, "Well, PLEASE do", keyword="please") == 1.0
    assert contains_keyword(None, "Well, PLEASE do", keyword="please", case_sensitive=True) == 0.0
    assert contains_keyword(None, "no match", keyword=["x", "match"]) == 1.0
    assert length_target(None, "abcdef", target=4) == pytest.approx(0.5)  # 1 - |6 - 4| / 4
    assert length_target(None, "a" * 9, target=4) == 0.0  # more than twice the target: clipped at 0
    assert length_target(None, "one two three", target=2, unit="words") == pytest.approx(0.5)


@pytest.mark.parametrize("command, config, extra", [
    ("grpo", "grpo-tiny.yaml", []),
    ("online-dpo", "online-dpo-tiny.yaml", ["adapter.kind=lora", "adapter.reft=null", "sampling.num_samples=4"]),
])
def test_tiny_online_run_writes_the_run_folder(command, config, extra, tmp_path, capsys):
    out = tmp_path / command
    args = ["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", *FAST, *extra]
    assert main(args) == 0
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0.0, 1.0]
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and r["reward_std"] >= 0.0 and r["reward/failed"] == 0.0
        assert r["kl"] >= 0.0 and r["completions/mean_length"] <= 3
        assert math.isfinite(r["loss"]) or r.get("pairs") == 0.0  # online DPO: a step of tied groups has no loss
    # LoRA starts with B = 0, so the first rollout's policy IS the reference (adapter off): KL exactly 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    if command == "online-dpo":
        assert all("pairs" in r for r in rows) and sum(r["pairs"] for r in rows) > 0
    else:
        assert all("clip_ratio/region_mean" in r for r in rows)
    saved = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_model.safetensors", "alignkit_adapter.json", "online_config.json", "README.md"} <= saved
    assert json.loads((out / "model" / "online_config.json").read_text())["steps"] == 2
    # completion lengths, finish reasons, entropy and the policy ratio's / the pairs' figures were on no plot
    drawn = {"reward.png", "kl.png", "loss.png", "completions.png", "finish.png", "entropy.png"}
    drawn |= {"rewards.png", "accuracy.png", "logps.png"} if command == "online-dpo" else {"policy.png"}
    assert {p.name for p in (out / "plots").iterdir()} == drawn
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in (out / "plots").iterdir())
    assert load_config(out / "config.yaml") == load_config(args[3], args[4:])
    card = (out / "README.md").read_text()
    assert "**lora** adapter" in card and "alignkit.rewards:" in card and f"alignkit -q {command}" in card
    assert f"| `reward` | {rows[-1]['reward']:.6g} |" in card  # final metrics from the run's own rows
    assert "| `trainable weights` | float32 |" in card and "| `frozen weights` | float32 |" in card  # LoRA, fp32
    printed = capsys.readouterr().out
    assert "alignkit " + command + ": done (2 step(s))" in printed
    # the last line's figures in 4 significant digits: 4 decimals printed the second step's small KL as "kl 0.0000"
    assert f"kl {rows[-1]['kl']:.4g}," in printed and (rows[-1]["kl"] == 0.0 or "kl 0.0000" not in printed)


def _by_group(samples: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for s in samples:
        out.setdefault(s["group"], []).append(s)
    return out


def test_sample_annotate_best_of_n_through_files(tiny_dir, tmp_path, capsys):
    from alignkit.cli.data import load_data
    from alignkit.data import load_records
    from alignkit.data.records import PreferenceRecord, SFTRecord

    rnd = tmp_path / "round-000"
    assert main(["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}",
                 "sampling.num_samples=3", "sampling.max_new_tokens=6"]) == 0
    samples = _rows(rnd / "samples.jsonl")
    groups = _by_group(samples)
    assert len(groups) == 6 and all(len(g) == 3 for g in groups.values())  # 6 bundled prompts x 3
    assert yaml.safe_load((rnd / "sample.yaml").read_text())["command"] == "sample"

    # job 2: a verifiable function, best-vs-worst pairs; the expected pairs by hand from the samples file
    assert main(["-q", "annotate", "--config", str(CONFIGS / "annotate-tiny.yaml"), f"output_dir={rnd}",
                 "feedback_kwargs.min_margin=0.0", "reweighters=[]"]) == 0
    want = []
    for g, items in sorted(groups.items()):
        scored = [(max(0.0, 1 - abs(len(s["response"]) - 24) / 24), s["response"]) for s in items]
        best = max(scored, key=lambda x: x[0])  # first of the best on ties
        worst = min(scored, key=lambda x: x[0])
        if best[0] - worst[0] > 0.0:
            want.append((best[1], worst[1]))
    pairs = load_records(str(rnd / "records.jsonl"))
    assert all(isinstance(r, PreferenceRecord) for r in pairs)
    got = [(r.chosen if isinstance(r.chosen, str) else r.chosen[-1]["content"],
            r.rejected if isinstance(r.rejected, str) else r.rejected[-1]["content"]) for r in pairs]
    assert got == want and want  # first of the maxima / minima, as the builder documents

    # best-of-n with a reward model (a tiny 1-label classifier): one SFT record per prompt, the argmax score
    rm = tiny_dir("llama", classifier=True, num_labels=1)
    # the round holds the pairs above: the example config keeps them (it replaced them silently, `overwrite: true`)
    kept = (rnd / "records.jsonl").read_bytes()
    assert main(["-q", "annotate", "--config", str(CONFIGS / "best-of-n-tiny.yaml"), f"output_dir={rnd}",
                 f"annotator.path={rm}"]) == 2
    assert "--overwrite (overwrite=true) to redo it" in capsys.readouterr().err
    assert (rnd / "records.jsonl").read_bytes() == kept
    assert main(["-q", "annotate", "--config", str(CONFIGS / "best-of-n-tiny.yaml"), f"output_dir={rnd}",
                 f"annotator.path={rm}", "overwrite=true"]) == 0
    manifest = json.loads((rnd / "manifest.json").read_text())
    scores = manifest["annotation"]["scores"]
    assert manifest["annotation"]["feedback"] == "best_of_n" and len(scores) == len(samples)
    best = {}
    for s, v in zip(samples, scores):
        if s["group"] not in best or v > best[s["group"]][0]:
            best[s["group"]] = (v, s["response"])
    sft = load_records(str(rnd / "records.jsonl"))
    assert len(sft) == 6 and all(isinstance(r, SFTRecord) for r in sft)
    completions = [r.completion if isinstance(r.completion, str) else r.completion[-1]["content"] for r in sft]
    assert completions == [best[g][1] for g in sorted(best)]
    # ... and `alignkit sft` reads them through its own data path
    cfg = load_config(CONFIGS / "sft-tiny.yaml", [f"data.path={rnd / 'records.jsonl'}", "data.eval_fraction=0.0",
                                                    "train.eval_strategy=no"])
    train, evals = load_data(cfg.data, "sft")
    assert len(train) == 6 and not evals


def test_a_kept_round_made_with_other_settings_is_refused(tmp_path, capsys):
    """A complete samples.jsonl is kept, not redone (resume). Before, `alignkit sample` with another model or
    temperature into that folder exited 0 with the OLD samples and rewrote sample.yaml to record the new settings.
    Now one line naming each changed key, and nothing in the folder changes; the same settings still resume."""
    rnd = tmp_path / "round"
    base = ["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}", "data.max_records=2",
            "sampling.max_new_tokens=3"]
    assert main(base) == 0
    before = {p.relative_to(rnd): p.read_bytes() for p in rnd.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*base, "sampling.temperature=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds a complete samples.jsonl made with other settings" in err, err
    assert "sampling.temperature: 1.0 then, 0.5 now" in err and "overwrite=true" in err, err
    assert {p.relative_to(rnd): p.read_bytes() for p in rnd.rglob("*") if p.is_file()} == before
    assert main(base) == 0  # same settings: kept, as before
    assert (rnd / "samples.jsonl").read_bytes() == before[Path("samples.jsonl")]


def test_a_kept_round_sampled_from_other_prompts_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The prompt file edited between two `alignkit sample` runs (same config): sample_round refused the kept samples,
    but only after the model was loaded and sample.yaml rewritten. Now the prompts are compared first: one line,
    no model loaded, nothing in the folder changed."""
    import alignkit.cli.rounds as rounds
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n" + json.dumps({"prompt": "Name a fruit."}))
    rnd = tmp_path / "round"
    base = ["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}", f"data.path={data}",
            "sampling.max_new_tokens=3"]
    assert main(base) == 0
    before = {p.relative_to(rnd): (p.read_bytes(), p.stat().st_mtime_ns) for p in rnd.rglob("*") if p.is_file()}
    data.write_text(json.dumps({"prompt": "Why is the sea blue?"}) + "\n" + json.dumps({"prompt": "Name a fruit."}))

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rounds, "load_for_sampling", no_model)
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples.jsonl: complete, and sampled from other prompts (2 then, 2 now" in err[0], err
    assert {p.relative_to(rnd): (p.read_bytes(), p.stat().st_mtime_ns) for p in rnd.rglob("*") if p.is_file()} \
        == before


def test_annotate_without_samples_fails_before_loading_anything(tmp_path, capsys):
    rc = main(["annotate", "--config", str(CONFIGS / "annotate-tiny.yaml"), f"output_dir={tmp_path / 'empty'}"])
    assert rc == 2 and "has no samples.jsonl; run `alignkit sample`" in capsys.readouterr().err


@pytest.mark.parametrize("command, config, override, text", [
    ("grpo", "grpo-tiny.yaml", "train.max_stpes=2", "train.max_stpes: unknown key; did you mean 'max_steps'"),
    ("grpo", "grpo-tiny.yaml", "sampling.temprature=1", "sampling.temprature: unknown key"),
    ("grpo", "grpo-tiny.yaml", "annotator.template=x", "annotator.template: not used by kind 'function'"),
    ("grpo", "grpo-tiny.yaml", "annotator.function=alignkit.rewards:nope", "annotator.function: "),
    ("grpo", "grpo-tiny.yaml", "annotator.kwargs={bogus: 1}", "annotator.kwargs: alignkit.rewards:digit_fraction"),
    ("grpo", "grpo-tiny.yaml", "annotator.kind=rm", "annotator.kind: 'rm' is not allowed"),
    ("grpo", "grpo-tiny.yaml", "method.kl_estimator=k9", "method.kl_estimator: 'k9' is not registered; valid: k1,"),
    ("online-dpo", "online-dpo-tiny.yaml", "method.loss_type=[sigmoid, sigmod]", "method.loss_type: 'sigmod' is not"),
    ("grpo", "grpo-tiny.yaml", "data.path=null", "data.path: required"),
    ("rloo", "rloo-tiny.yaml", "sampling.num_samples=1", "it needs sampling.num_samples >= 2, got 1"),
    # group advantages and pairs compare a prompt's samples: one sample, or identical greedy ones, learn nothing
    ("grpo", "grpo-tiny.yaml", "sampling.num_samples=1", "method: GRPO learns from the differences between the samp"),
    ("online-dpo", "online-dpo-tiny.yaml", "sampling.num_samples=1", "method: online DPO (pairs of a prompt's samp"),
    ("grpo", "grpo-tiny.yaml", "sampling.do_sample=false", "draws 4 identical ones (nothing would be learned); set "
     "sampling.do_sample=true"),
    ("online-dpo", "online-dpo-tiny.yaml", "sampling.do_sample=false", "set sampling.do_sample=true"),
    # top_k=1 keeps only the most likely token: sampling is greedy whatever the temperature (was accepted, exit 0,
    # every step's group flat until the stall stop)
    ("grpo", "grpo-tiny.yaml", "sampling.top_k=1", "sampling.top_k=1 keeps only the most likely token at each step, "
     "so it draws 4 identical ones (greedy decoding: nothing would be learned); remove sampling.top_k or set it above 1"),
    ("rloo", "rloo-tiny.yaml", "sampling.top_k=1", "method: RLOO (a leave-one-out baseline per prompt) learns from"),
    ("online-dpo", "online-dpo-tiny.yaml", "sampling.top_k=1", "remove sampling.top_k or set it above 1"),
    ("online-dpo", "online-dpo-tiny.yaml", "method.feedback_kwargs={k: 1}", "method.feedback_kwargs.k: unknown key"),
    ("online-dpo", "online-dpo-tiny.yaml", "method.reweighters=[nope]", "method.reweighters[0]: "),
    ("annotate", "annotate-tiny.yaml", "feedback=best_of_m", "feedback: 'best_of_m' is not allowed"),
    ("annotate", "best-of-n-tiny.yaml", "annotator.path=null", "annotator.path: required for kind 'reward_model'"),
    ("annotate", "annotate-tiny.yaml", "feedback_kwargs={k: 2}", "feedback_kwargs.k: unknown key"),
])
def test_config_errors_name_the_key(command, config, override, text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refusal that regresses runs the command: its run folder lands here, not in the checkout
    rc = main([command, "--config", str(CONFIGS / config), override])
    err = capsys.readouterr().err
    assert rc == 2 and text in err and config in err, err


def test_ls_lists_the_online_commands(capsys):
    assert main(["ls", "commands"]) == 0
    out = capsys.readouterr().out
    for name in ("online-dpo", "grpo", "rloo", "ppo", "sample", "annotate"):
        assert f"  {name} " in out
    assert "GRPORunConfig: sections model, annotator, data, adapter, sampling, train, output_dir, method" in out


def test_reward_function_scoring_nothing_is_one_line(tmp_path, monkeypatch, capsys):
    """A reward function that returns None for every response: exit 2 with one line naming the step (was a NaN
    reward curve and a saved model; an AnnotatorError from the user's function read "unexpected error")."""
    (tmp_path / "my_rewards.py").write_text("def unscored(prompt, response):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    rc = main(["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), "--allow-code", f"output_dir={out}",
               *FAST, "annotator.function=my_rewards:unscored"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("alignkit grpo: error: step 1: the annotator scored none"), err
    assert not (out / "model").exists()


def test_sample_reads_prompts_as_the_training_commands_do_and_drops_no_held_out_split(tmp_path):
    """`sample` read its prompts by its own copy of the first half of cli/data.read_splits; now by read_splits
    itself. A `data` asking for held-out prompts (possible only by building DataSettings directly: the sample
    config refuses the keys) was read as if there were none, every record sampled; now one line."""
    from alignkit.cli.online import read_prompts
    from alignkit.settings import ConfigError, DataSettings

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(6)))
    assert [r.prompt for r in read_prompts(DataSettings(path=str(path), max_records=4))] == ["q0", "q1", "q2", "q3"]
    for held_out in ({"eval_fraction": 0.5}, {"eval_path": str(path)}):
        with pytest.raises(ConfigError, match=r"^data: alignkit sample takes no evaluation split, and data\.eval_path "
                                              r"/ data\.eval_fraction would hold out (3|6) prompt\(s\)"):
            read_prompts(DataSettings(path=str(path), **held_out))


def test_annotate_that_keeps_no_record_is_one_line_and_writes_nothing(tmp_path, capsys):
    """length_target's rewards lie in [0, 1], so no best-vs-worst margin can exceed 2: no pair passes. Before: an
    empty records.jsonl, the annotation marked complete and 'train on them', exit 0. Now one line naming the samples
    file and the fix; records.jsonl is not written and the manifest gains no annotation entry."""
    rnd = tmp_path / "round"
    assert main(["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}",
                 "data.max_records=2", "sampling.num_samples=2", "sampling.max_new_tokens=3"]) == 0
    manifest = (rnd / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["-q", "annotate", "--config", str(CONFIGS / "annotate-tiny.yaml"), f"output_dir={rnd}",
                 "feedback_kwargs.min_margin=2.0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit annotate")]
    assert len(err) == 1, err
    assert f"{rnd / 'samples.jsonl'}: no best_worst record passed from its 4 scored sample(s)" in err[0]
    assert "min_margin" in err[0]
    assert not (rnd / "records.jsonl").exists()
    assert (rnd / "manifest.json").read_bytes() == manifest
    # a margin some pair can pass writes the round as before
    assert main(["-q", "annotate", "--config", str(CONFIGS / "annotate-tiny.yaml"), f"output_dir={rnd}",
                 "feedback_kwargs.min_margin=0.0", "reweighters=[]"]) == 0
    assert len(_rows(rnd / "records.jsonl")) == 2


JUDGE = "annotator={kind: judge, path: 'tiny:llama'}"


@pytest.mark.parametrize("command, feedback, key, value", [
    # pointwise scores (every online objective; online DPO's best_worst / random_pairs): the pair prompt is never asked
    ("grpo", None, "pair_template", "'{prompt} A: {response_a} B: {response_b}'"),
    ("online-dpo", "best_worst", "pair_pattern", "'Winner: ([AB])'"),
    ("annotate", "pointwise", "pair_template", "'{prompt} A: {response_a} B: {response_b}'"),
    # judge_pairs: the judge compares pairs, the rubric and its score settings are never used
    ("online-dpo", "judge_pairs", "template", "'Rate {prompt} {response}'"),
    ("online-dpo", "judge_pairs", "score_range", "[0, 5]"),
    ("annotate", "judge_pairs", "on_failure", "default"),
])
def test_judge_keys_the_feedback_never_asks_for_are_refused(command, feedback, key, value, tmp_path, capsys):
    """A judge answers a rubric (template, pattern, score_range, normalize, on_failure / default_score) for pointwise
    scores, and a pair prompt (pair_template, pair_pattern) for feedback judge_pairs only. Each was accepted beside
    the other mode and ignored (e.g. a pair_template with GRPO, or score_range with judge_pairs), exit 0."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"] if command != "annotate" else []
    where = "method.feedback" if command == "online-dpo" else "feedback"
    fb = [f"{where}={feedback}"] if feedback else []
    extra = ["annotator.default_score=0"] if key == "on_failure" else []
    with pytest.raises(ConfigError, match=rf"annotator.{key}: .*so it would be ignored"):
        load_config(None, [*base, JUDGE, *fb, f"annotator.{key}={value}", *extra], command=command)
    load_config(None, [*base, JUDGE, *fb], command=command)


def test_reward_settings_with_judge_pairs_are_refused_before_the_run_folder(tmp_path, capsys):
    """online-dpo with method.feedback=judge_pairs never scores a response on its own, so reward_normalization and
    reward_clip had nothing to act on and were ignored, exit 0. One line now, nothing written."""
    cfg = yaml.safe_load((CONFIGS / "online-dpo-tiny.yaml").read_text())
    cfg["annotator"] = {"kind": "judge", "path": "tiny:llama"}
    cfg["method"].update(feedback="judge_pairs", feedback_kwargs={}, reweighters=[], reward_normalization="group")
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["-q", "online-dpo", "--config", str(config), f"output_dir={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit online-dpo")]
    assert rc == 2 and len(err) == 1, err
    assert "method.reward_normalization" in err[0] and "judge_pairs" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("command", ["online-dpo", "annotate"])
@pytest.mark.parametrize("reweighter", ["margin_sigmoid", "margin_linear"])
def test_a_margin_reweighter_with_judge_pairs_is_refused_when_the_config_is_read(command, reweighter):
    """judge_pairs records carry no margin (the judge gives a verdict, not two scores), so a margin reweighter stopped
    at the first step with a DataError, after the run folder had been written. One line at load time now."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"] if command != "annotate" else []
    prefix = "method." if command == "online-dpo" else ""
    args = [*base, JUDGE, f"{prefix}feedback=judge_pairs"]
    with pytest.raises(ConfigError, match=rf"{prefix}reweighters\[0\]: {reweighter} weighs .* by their margin, and "
                                          r".*judge_pairs .* no margin"):
        load_config(None, [*args, f"{prefix}reweighters=[{reweighter}]"], command=command)
    load_config(None, [*args, f"{prefix}reweighters=[inverse_prompt_frequency]"], command=command)


def test_the_confidence_reweighter_online_is_refused_before_the_run_folder(tmp_path, capsys):
    """`confidence` reads meta['confidence'] from each record, and no feedback mode writes one: online-dpo wrote the
    run folder (config.yaml, base_model/, tensorboard/) and stopped at step 1 with a DataError. One line now, naming
    the key and the reweighters that work with the feedback, nothing written."""
    out = tmp_path / "run"
    rc = main(["-q", "online-dpo", "--config", str(CONFIGS / "online-dpo-tiny.yaml"), f"output_dir={out}", *FAST,
               "method.reweighters=[confidence]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit online-dpo")]
    assert rc == 2 and len(err) == 1, err
    assert ("method.reweighters[0]: confidence weighs records by their meta['confidence'], and "
            "method.feedback=best_worst gives records with no meta['confidence']") in err[0], err
    assert "(with this feedback: inverse_prompt_frequency, margin_linear, margin_sigmoid)" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("feedback", ["pointwise", "best_worst", "random_pairs", "judge_pairs", "best_of_n"])
def test_annotate_refuses_the_confidence_reweighter_and_a_margin_without_margins(feedback, tmp_path):
    """`alignkit annotate` builds its records with the same feedback builders: none carries meta['confidence'], so
    annotate refuses it too; best_of_n's SFT records carry no margin (like judge_pairs'). A meta key the records do
    carry (the scores) may be read as a confidence."""
    from alignkit.settings import ConfigError

    args = [JUDGE if feedback == "judge_pairs" else "annotator={kind: function, function: alignkit.rewards:length_target}",
            f"feedback={feedback}"]
    with pytest.raises(ConfigError, match=rf"reweighters\[0\]: confidence weighs records by their meta\['confidence'\], "
                                          rf"and feedback={feedback} gives records with no meta\['confidence'\]"):
        load_config(None, [*args, "reweighters=[confidence]"], command="annotate")
    if feedback == "best_of_n":
        with pytest.raises(ConfigError, match=r"margin_linear weighs records by their margin, .*best_of_n .*no margin"):
            load_config(None, [*args, "reweighters=[margin_linear]"], command="annotate")
    if feedback in ("pointwise", "best_of_n"):
        load_config(None, [*args, "reweighters=[{type: confidence, key: score}]"], command="annotate")


@pytest.fixture
def judge_without_chat_template(tiny_dir, tmp_path):
    """A tiny causal LM whose tokenizer has no chat template (a base model's)."""
    import shutil

    folder = tmp_path / "plain-judge"
    shutil.copytree(tiny_dir("llama"), folder)
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("chat", [True, None])
def test_judge_chat_true_without_a_chat_template_is_refused_before_the_run_folder(judge_without_chat_template,
                                                                                  chat, tmp_path, capsys):
    """annotator.chat: true with a judge whose tokenizer has no chat template was dropped silently: the questions
    went as plain text, exit 0. One line now when the judge loads, before the run folder; the default (auto) runs."""
    out = tmp_path / "run"
    cfg = yaml.safe_load((CONFIGS / "grpo-tiny.yaml").read_text())
    cfg["annotator"] = {"kind": "judge", "path": str(judge_without_chat_template), "max_new_tokens": 2,
                        "on_failure": "default", "default_score": 0.5,  # a random judge answers no score
                        **({"chat": True} if chat else {})}
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["-q", "grpo", "--config", str(config), f"output_dir={out}", *FAST, "train.max_steps=1"]
    rc = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit grpo")]
    if chat is None:
        assert rc == 0 and (out / "model").is_dir(), err
        return
    assert rc == 2 and len(err) == 1, err
    assert "annotator.chat: true sends the judge's questions through its tokenizer's chat template" in err[0], err
    assert "remove chat (auto: the template when there is one) or set it false" in err[0], err
    assert not out.exists()


def test_annotate_with_judge_chat_true_without_a_chat_template_writes_nothing(judge_without_chat_template, tmp_path,
                                                                             capsys):
    rnd = tmp_path / "round"
    assert main(["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}",
                 "data.max_records=2", "sampling.num_samples=2", "sampling.max_new_tokens=3"]) == 0
    before = {p.relative_to(rnd): p.read_bytes() for p in rnd.rglob("*") if p.is_file()}
    capsys.readouterr()
    config = tmp_path / "annotate.yaml"
    config.write_text(yaml.safe_dump({"command": "annotate", "feedback": "judge_pairs", "annotator": {
        "kind": "judge", "path": str(judge_without_chat_template), "chat": True}}))
    rc = main(["-q", "annotate", "--config", str(config), f"output_dir={rnd}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit annotate")]
    assert rc == 2 and len(err) == 1 and "annotator.chat: true" in err[0], err
    assert {p.relative_to(rnd): p.read_bytes() for p in rnd.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command, key, value, extra", [
    ("grpo", "clip_eps", "0.3", []),
    ("grpo", "clip_eps_high", "0.28", []),
    ("rloo", "dual_clip", "3", []),
    ("grpo", "clip_eps_high", "0.28", ["method.mini_batch_size=8"]),  # one minibatch: the step's 2 x 4 samples
    ("ppo", "clip_eps", "0.1", ["method.epochs_per_step=1"]),  # PPO's default is 4 epochs (the config: 2)
    ("ppo", "cliprange_value", "0.1", ["method.epochs_per_step=1"]),
])
def test_clip_settings_that_cannot_act_are_refused_before_the_run_folder(command, key, value, extra, tmp_path,
                                                                          capsys):
    """With one update per generation step the policy (and PPO's value head) is still the one that sampled: the
    ratio pi / pi_old is exactly 1, so clip_eps, clip_eps_high, dual_clip (and the value clip) never act. They were
    accepted and ignored, exit 0. One line now, nothing written; the defaults, and several updates, still run."""
    out = tmp_path / "run"
    rc = main(["-q", command, "--config", str(CONFIGS / f"{command}-tiny.yaml"), f"output_dir={out}",
               f"method.{key}={value}", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert rc == 2 and len(err) == 1, err
    assert f"method.{key}: {float(value)!r} " in err[0] and "one update per generation step" in err[0], err
    assert "so it would never act; remove it, or make several updates per step: method.epochs_per_step >= 2 or " \
           "method.mini_batch_size < " in err[0], err
    assert not out.exists()
    base = [f"{command}-tiny.yaml"]
    load_config(CONFIGS / base[0], [f"method.{key}={value}", *extra, "method.epochs_per_step=2"])
    load_config(CONFIGS / base[0], [f"method.{key}={value}", *extra, "method.mini_batch_size=2"])  # 2 minibatches
    load_config(CONFIGS / base[0], extra)  # the default clip settings are never refused


# (command, overrides, gradient_accumulation_steps refused, what a minibatch holds at most: items and the message's
# words): 2 prompts per step; grpo 4 samples each, ppo 2, online DPO 1 pair each (best_worst; random_pairs by
# default), random_pairs with pairs_per_prompt 10: all C(4, 2) = 6
ACCUMULATION = [
    ("grpo", [], 8, "8 sample(s) (method.prompts_per_step 2 x sampling.num_samples 4)"),
    ("grpo", ["method.mini_batch_size=2"], 2, "2 item(s) (method.mini_batch_size)"),
    ("ppo", [], 4, "4 sample(s) (method.prompts_per_step 2 x sampling.num_samples 2)"),
    ("online-dpo", [], 2, "2 pair(s) (method.prompts_per_step 2 x 1 for method.feedback best_worst)"),
    # random_pairs forms feedback_kwargs.pairs_per_prompt pairs a prompt (1 by default): 12 (every pair) passed
    ("online-dpo", ["method.feedback=random_pairs"], 2,
     "2 pair(s) (method.prompts_per_step 2 x method.feedback_kwargs.pairs_per_prompt 1 (1 by default) for "
     "random_pairs)"),
    ("online-dpo", ["method.feedback=random_pairs", "method.feedback_kwargs.pairs_per_prompt=10"], 12,
     "12 pair(s) (method.prompts_per_step 2 x the 6 pairs of sampling.num_samples 4)"),
]


@pytest.mark.parametrize("command, extra, items, what", ACCUMULATION)
def test_more_accumulation_steps_than_a_minibatch_has_items_is_refused(command, extra, items, what, tmp_path, capsys):
    """train.gradient_accumulation_steps above the items a minibatch can hold split it into empty micro-batches that
    ran a zero-weight forward and backward each, on every update, exit 0 (the gradient was right). One line now,
    before the run folder, naming both numbers and the fix; as many steps as items still load."""
    out = tmp_path / "run"
    rc = main(["-q", command, "--config", str(CONFIGS / f"{command}-tiny.yaml"), f"output_dir={out}", *extra,
               f"train.gradient_accumulation_steps={items + 1}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert rc == 2 and err == [
        f"alignkit {command}: error: {CONFIGS / f'{command}-tiny.yaml'}: train.gradient_accumulation_steps: "
        f"{items + 1} splits each minibatch into "
        f"{items + 1} micro-batches, and a minibatch holds at most {what}, so at least 1 of them would be empty "
        f"zero-weight passes on every update (the gradient is the same); set train.gradient_accumulation_steps to "
        f"{items} or less"], err
    assert not out.exists()
    load_config(CONFIGS / f"{command}-tiny.yaml", [*extra, f"train.gradient_accumulation_steps={items}"])


def test_the_bundled_online_configs_load():
    for config in ("grpo-tiny.yaml", "rloo-tiny.yaml", "ppo-tiny.yaml", "online-dpo-tiny.yaml"):
        load_config(CONFIGS / config)


def test_resume_over_an_edited_prompt_file_is_one_line(tmp_path, capsys):
    """--resume compares the config, not the prompt file's contents: a file edited between the runs (here: 4 of its
    6 prompts removed) resumed with exit 0 on whatever prompts the checkpoint's saved order now pointed at (or, when
    it pointed past the end, "unexpected error: IndexError ... please report it" after the run folder was reopened).
    Now one line naming the checkpoint and the prompt counts, before anything in the run folder changes."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    args = ["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={out}", f"data.path={data}",
            *FAST[1:], "train.save_steps=1"]
    assert main([*args, "train.max_steps=1"]) == 0
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, "train.max_steps=2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("alignkit grpo: error: resume: ") and "checkpoint-1 was written by a run over 6 prompt(s), " \
        "this run has 2; " in err, err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_resumed_run_records_all_its_steps(tmp_path):
    """The model card's "steps done" and model/'s completion marker counted the rows of the resumed call only: a
    run of 1 step resumed to 2 said 1 (and a 4-step run resumed from checkpoint 2 said 2). Now the run's steps."""
    out = tmp_path / "run"
    args = ["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={out}", *FAST[1:],
            "train.save_steps=1"]
    assert main([*args, "train.max_steps=1"]) == 0
    assert main([*args, "train.max_steps=2", "--resume"]) == 0
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [0.0, 1.0]
    assert "| `steps done` | 2 |" in (out / "README.md").read_text()
    assert "| `steps done` | 2 |" in (out / "model" / "README.md").read_text()
    assert json.loads((out / "model" / "alignkit_complete.json").read_text())["step"] == 2


def test_generation_past_a_learned_position_table_is_refused_before_the_run_folder(tiny_dir, tmp_path, capsys):
    """GPT-2 reads positions from a table of n_positions rows: a prompt + sampling.max_new_tokens past it stopped the
    first generation with "IndexError: index out of range in self" after the run folder was written (a warning said
    it beforehand, as for a RoPE model, which keeps going). One line now, naming both numbers and the fix; prompts
    cut to fit (data.max_prompt_length) run."""
    base = tiny_dir("gpt2", max_positions=16)
    out = tmp_path / "run"
    args = ["-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"model.path={base}",
            *FAST, "train.max_steps=1", "sampling.max_new_tokens=8"]
    rc = main([*args, f"output_dir={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit grpo")]
    assert rc == 2 and len(err) == 1, err
    assert "past the model's 16 learned positions" in err[0] and "data.max_prompt_length" in err[0], err
    assert not out.exists()
    assert main([*args, f"output_dir={tmp_path / 'fits'}", "data.max_prompt_length=8"]) == 0  # 8 + 8 = 16 rows


def test_ppo_with_prompts_cut_to_one_token_runs(tmp_path, capsys):
    """data.max_prompt_length=1: every prompt keeps its last token, so the first decode step has nothing cached.
    ppo stopped there with "unexpected error: AttributeError: 'NoneType' object has no attribute 'shape'" (the fast
    decode step read the empty cache); it now runs its steps and writes the model."""
    out = tmp_path / "run"
    args = ["-q", "ppo", "--config", str(CONFIGS / "ppo-tiny.yaml"), f"output_dir={out}", *FAST,
            "data.max_prompt_length=1"]
    assert main(args) == 0, capsys.readouterr().err
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0.0, 1.0] and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "model" / "adapter_model.safetensors").is_file()


def test_online_plots_draw_every_logged_figure_but_bookkeeping():
    """Each figure of a row lands on one plot: a reward function's mean / std on reward, a loss of a loss_type list on
    loss, a loss's own figure (orpo's log_odds_ratio) on other; counts, totals and timings on none."""
    from alignkit.cli.online import online_plots

    rows = [{"step": 0, "reward": 0.5, "rewards/len/mean": 0.5, "rewards/len/std": 0.1, "loss": 1.0,
             "loss/sigmoid": 0.7, "loss/orpo": 0.3, "log_odds_ratio": -0.6, "entropy": 2.0, "grad_norm": 3.0,
             "num_tokens": 40.0, "time/step_s": 0.2, "pairs": 2.0, "judge/answers": 4.0, "judge/failure_rate": 0.0,
             "reward/failed": 0.0, "flag": True, "note": "x"}]
    plots = online_plots(rows)
    assert {"rewards/len/mean", "rewards/len/std", "reward"} <= set(plots["reward"])
    assert {"loss", "loss/sigmoid", "loss/orpo"} <= set(plots["loss"])
    assert plots["other"] == ("log_odds_ratio",)
    drawn = {k for keys in plots.values() for k in keys}
    assert drawn.isdisjoint({"step", "grad_norm", "num_tokens", "time/step_s", "pairs", "judge/answers",
                             "judge/failure_rate", "reward/failed", "flag", "note"})
    assert "other" not in online_plots([{"step": 0, "reward": 1.0, "grad_norm": 1.0}])


def test_a_reft_policy_with_first_positions_on_prompts_cut_at_their_start_is_warned_before_the_run(tmp_path, caplog):
    """online-dpo-tiny ('f1+l1') with data.max_prompt_length=8: generation keeps each prompt's last 8 tokens, so
    'f1' edits a token from the middle of every bundled prompt; one warning naming the key, the count and the fix,
    before the run folder is written (as training and eval give it), and none for 'l1'."""
    import logging

    for spec, expect in (("f1+l1", 1), ("l1", 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
            assert main(["-q", "online-dpo", "--config", str(CONFIGS / "online-dpo-tiny.yaml"),
                         f"output_dir={tmp_path / spec}", *FAST, "data.max_prompt_length=8",
                         f"adapter.reft.positions={spec}"]) == 0
        msgs = [r.getMessage() for r in caplog.records if "edit their first KEPT tokens" in r.getMessage()]
        assert len(msgs) == expect, msgs
        if expect:
            assert msgs[0].startswith("data.path: ") and "longer than data.max_prompt_length=8" in msgs[0]


def test_ppo_ptx_config_runs_and_logs_the_ptx_loss(tmp_path):
    """configs/ppo-ptx-tiny.yaml: the pretraining mix's data (data.ptx_path, SFT records) is read and tokenized as
    alignkit sft's, and every step's row carries ptx_loss (a positive NLL) and ptx/epochs."""
    out = tmp_path / "run"
    assert main(["-q", "ppo", "--config", str(CONFIGS / "ppo-ptx-tiny.yaml"), f"output_dir={out}", "train.max_steps=2",
                 "sampling.max_new_tokens=3"]) == 0
    rows = _rows(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["ptx_loss"] > 0 for r in rows)
    # 2 steps x 2 epochs x one update (4 samples, no mini_batch_size) x ptx_batch_size 4 records
    assert rows[-1]["ptx/epochs"] * _sft_count() == pytest.approx(16)
    assert (out / "model" / "value_head.safetensors").is_file()


def _sft_count() -> int:
    from alignkit.data import load_records
    from alignkit.cli.data import data_path

    return len(load_records(data_path("bundled:data/hh_rlhf_sample.jsonl"), "sft"))


def test_ptx_data_without_a_trainable_token_is_refused_before_the_run_folder(tmp_path, capsys):
    """SFT rows whose every prompt is longer than data.max_length=8 (no max_prompt_length cut) are all dropped, so no
    trainable token is left: one line naming data.ptx_path, nothing written (the run would train without the mix)."""
    out = tmp_path / "run"
    rc = main(["-q", "ppo", "--config", str(CONFIGS / "ppo-ptx-tiny.yaml"), f"output_dir={out}",
               "data.max_length=8", "data.max_prompt_length=null"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit ppo")]
    assert rc == 2 and len(err) == 1, err
    assert "data.ptx_path: none of its" in err[0] and "trainable token" in err[0], err
    assert not out.exists()


def test_train_ema_decay_saves_model_ema_that_generate_loads(tmp_path):
    """train.ema_decay (DeepSpeed-Chat's --enable_ema): the run folder gets model_ema/ beside model/, in its format
    (adapter, card, complete marker), and `alignkit generate` loads it on the run's base."""
    out = tmp_path / "run"
    assert main(["-q", "ppo", "--config", str(CONFIGS / "ppo-tiny.yaml"), f"output_dir={out}", *FAST,
                 "train.ema_decay=0.9"]) == 0
    ema, model = out / "model_ema", out / "model"
    value_head = {"value_head.safetensors", "value_head.json"}  # PPO's head is not averaged: model/ only
    assert {p.name for p in model.iterdir()} - value_head == {p.name for p in ema.iterdir()}
    assert (ema / "adapter_model.safetensors").read_bytes() != (model / "adapter_model.safetensors").read_bytes()
    card = (ema / "README.md").read_text()  # its own card: loads model_ema/, says it is the EMA (was model/'s card)
    assert str(ema) in card and "decay 0.9" in card and "moving average" in card
    assert not re.search(re.escape(str(model)) + "(?!_ema)", card), card
    assert main(["generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"model.path={out / 'base_model'}",
                 f"model.adapter_path={ema}", f"output_dir={tmp_path / 'gen'}", "generation.max_new_tokens=2",
                 "data.max_records=2"]) == 0


def test_train_ema_decay_under_an_offline_command_is_refused(tmp_path, capsys):
    rc = main(["-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'run'}",
               "train.ema_decay=0.99"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert rc == 2 and len(err) == 1 and "train.ema_decay" in err[0] and "online commands" in err[0], err
    assert not (tmp_path / "run").exists()


def refused_once_retrained(argv: list[str], rnd: Path, folder: Path, load, capsys) -> list[str]:
    """`main(argv)` twice (the same weights: the round is kept), then the model at `folder` "retrained" in place (one
    weight nudged: `load(folder)`, save_pretrained) and `main(argv)` again: exit 2, the round folder `rnd` unchanged;
    returns that run's stderr lines."""
    import torch

    assert main(argv) == 0
    assert main(argv) == 0  # the same weights: kept
    before = {p.relative_to(rnd): p.read_bytes() for p in rnd.rglob("*") if p.is_file()}
    model = load(folder)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(folder)  # "retrained" in place
    capsys.readouterr()
    assert main(argv) == 2
    assert {p.relative_to(rnd): p.read_bytes() for p in rnd.rglob("*") if p.is_file()} == before
    return capsys.readouterr().err.strip().splitlines()


def test_a_kept_round_sampled_by_other_weights_at_the_same_path_is_refused(tiny_dir, tmp_path, capsys):
    """sample.yaml records model.path, not what is in it: a model retrained into the same folder resumed over the old
    model's samples, exit 0. Now the manifest records the policy's digest (weights, tokenizer, generation options)
    and another one is refused in one line naming it, nothing in the round folder changed; the same weights resume."""
    import shutil

    from alignkit.models.loading import load_model

    folder, rnd = tmp_path / "policy", tmp_path / "round"
    shutil.copytree(tiny_dir("llama"), folder)
    base = ["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}", f"model.path={folder}",
            "data.max_records=2", "sampling.max_new_tokens=3"]
    err = refused_once_retrained(base, rnd, folder, lambda f: load_model(str(f)), capsys)
    assert len(err) == 1 and "samples.jsonl: complete, and sampled with other settings (policy.sha256 (the model's " \
                             "weights, tokenizer or generation options): " in err[0] and "overwrite=true" in err[0], err


def test_a_kept_annotation_scored_by_other_reward_model_weights_at_the_same_path_is_refused(tiny_dir, tmp_path,
                                                                                              capsys):
    """annotate.yaml and the annotator's describe() record annotator.path, not what is in it: a reward model
    retrained into the same folder kept the old model's records, exit 0. Now the manifest records the annotator
    model's digest and another one is refused in one line naming it; the same weights keep the round."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    folder, rnd = tmp_path / "rm", tmp_path / "round"
    shutil.copytree(tiny_dir("llama", classifier=True), folder)
    assert main(["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}",
                 "data.max_records=3", "sampling.max_new_tokens=3"]) == 0
    config = tmp_path / "annotate.yaml"
    config.write_text(f"command: annotate\noutput_dir: {rnd}\nannotator:\n  kind: reward_model\n  path: {folder}\n"
                      "feedback: best_worst\n")
    base = ["-q", "annotate", "--config", str(config)]
    err = refused_once_retrained(base, rnd, folder, AutoModelForSequenceClassification.from_pretrained, capsys)
    assert len(err) == 1 and "records.jsonl: complete, and annotated with other settings (annotator_model_sha256: " \
                             in err[0] and "overwrite=True" in err[0], err


def test_a_prompt_the_reward_models_tokenizer_refuses_stops_the_run_before_its_folder(tiny_dir, tmp_path, capsys):
    """The reward model's tokenizer first met the prompts at the first annotation, after the run folder was written:
    a prompt the policy accepts (it adds no BOS) but the reward model's tokenizer refuses (it adds its own BOS, and
    the prompt starts with it) stopped the run at step 1. Now one line naming the record, before the folder."""
    import json
    import shutil

    from tokenizers.processors import TemplateProcessing

    from alignkit.models.loading import load_tokenizer

    folder, out, data = tmp_path / "rm", tmp_path / "run", tmp_path / "prompts.jsonl"
    shutil.copytree(tiny_dir("llama", classifier=True), folder)
    tok = load_tokenizer(str(folder))
    bos, bos_id = tok.bos_token, tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                              special_tokens=[(bos, bos_id)])
    tok.save_pretrained(str(folder))
    assert load_tokenizer(str(folder))("x")["input_ids"][0] == bos_id
    data.write_text("".join(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n"
                            for i, p in enumerate(["Q: one?", "Q: two?", f"{bos}Q: three?", "Q: four?"])))
    config = tmp_path / "online.yaml"
    config.write_text((CONFIGS / "online-dpo-tiny.yaml").read_text().replace(
        "  kind: function\n  function: alignkit.rewards:length_target\n  kwargs: {target: 24, unit: chars}\n",
        f"  kind: reward_model\n  path: {folder}\n"))
    rc = main(["-q", "online-dpo", "--config", str(config), f"output_dir={out}", *FAST, f"data.path={data}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit online-dpo")]
    assert rc == 2 and len(err) == 1, err
    assert f"data.path: record {data}:3: " in err[0] and "the reward model's tokenizer refuses it" in err[0], err
    assert f"the prompt starts with '{bos}', the BOS token" in err[0], err
    assert not out.exists()
