"""`alignkit eval` (dpo) with neither `model.adapter_path` nor `method.reference_path`: the model would be its own
reference (every implicit reward 0, accuracy 0, loss ln 2, whatever it learned). Before: a logged warning and
metrics.json with those numbers, exit 0. Now one line naming both keys, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA = Path(__file__).resolve().parents[2] / "src" / "alignkit" / "resources" / "data" / "hh_rlhf_sample.jsonl"


def test_dpo_eval_of_a_model_against_itself_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    model = tiny_dir("llama")
    out = tmp_path / "eval"
    capsys.readouterr()
    args = ["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={model}",
            "model.adapter_path=null", f"data.path={DATA}", f"output_dir={out}"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
    assert len(err) == 1, err
    assert f"model.path={model} would be its own reference" in err[0]
    assert "method.reference_path" in err[0] and "model.adapter_path" in err[0]
    assert not out.exists()
    # naming the reference runs it: the same model as its reference gives the rewards the refusal describes
    assert main(args + [f"method.reference_path={model}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 6
    assert abs(metrics["rewards/accuracies"]) < 1e-12
    assert abs(metrics["loss"] - 0.6931471805599453) < 1e-5


def test_a_missing_model_path_is_named_before_the_reference(tmp_path, capsys):
    capsys.readouterr()
    assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={tmp_path / 'nowhere'}",
                 "model.adapter_path=null", f"data.path={DATA}", f"output_dir={tmp_path / 'eval'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
    assert len(err) == 1 and "model.path" in err[0] and "does not exist" in err[0], err


def test_a_reference_path_beside_an_adapter_that_switches_off_is_refused(tiny_dir, tmp_path, capsys):
    """`method.reference_path` with `model.adapter_path` a LoRA (or ReFT) adapter: the reference is the adapter
    switched off (model.path), and reference_path was never loaded, exit 0 with metrics against model.path. Now one
    line naming both keys, and nothing written; a fully finetuned folder as adapter_path still reads it."""
    import torch

    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    base, other = tiny_dir("llama"), tiny_dir("llama", hidden_size=32)
    lora = tmp_path / "lora"
    torch.manual_seed(0)
    save_adapter(apply_adapter(load_model(base), AdapterConfig(kind="lora", lora=LoraSettings(r=2, alpha=4.0))), lora)
    out = tmp_path / "eval"
    capsys.readouterr()
    args = ["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={base}",
            f"model.adapter_path={lora}", f"data.path={DATA}", f"output_dir={out}", "data.max_records=2"]
    assert main(args + [f"method.reference_path={other}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
    assert len(err) == 1, err
    assert "method.reference_path" in err[0] and "model.adapter_path" in err[0] and "lora" in err[0], err
    assert not out.exists()
    assert main(args) == 0  # the adapter switched off is the reference


def test_a_model_without_the_head_that_scores_is_refused_before_anything_is_written(tiny_dir, tmp_path, capsys):
    """A causal LM evaluated as a reward model was loaded with a newly initialised score head: exit 0 and an accuracy
    of chance that changed from run to run (0.67, then 0.17 on the bundled pairs). A reward model evaluated with kind
    dpo, or as a DPO reference, got a random LM head. One line now naming the key; the right heads still run."""
    lm, rm = tiny_dir("llama"), tiny_dir("llama", classifier=True)
    out = tmp_path / "eval"
    base = ["-q", "eval", f"data.path={DATA}", f"output_dir={out}", "model.adapter_path=null"]
    cases = [(["--config", str(CONFIGS / "eval-rm-tiny.yaml"), f"model.path={lm}"], "model.path", lm,
              "is not a sequence classifier", "method.kind=dpo"),
             (["--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={rm}", f"method.reference_path={lm}"],
              "model.path", rm, "is a sequence classifier", "method.kind=reward"),
             (["--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={lm}", f"method.reference_path={rm}"],
              "method.reference_path", rm, "is a sequence classifier", "method.kind=reward")]
    for args, key, folder, what, fix in cases:
        capsys.readouterr()
        assert main(base + args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
        assert len(err) == 1 and err[0].startswith(f"alignkit eval: error: {key}: {folder} {what}"), err
        assert fix in err[0] and "newly initialised at random" in err[0], err
        assert not out.exists()
    assert main(base + ["--config", str(CONFIGS / "eval-rm-tiny.yaml"), f"model.path={rm}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["pairs"] == 6


def test_a_reward_model_annotator_without_a_score_head_is_refused(tiny_dir):
    """The same for `annotate` (and best-of-n, online runs): a causal LM as annotator.path scored every sample with
    a random head; the records were built from those scores."""
    from alignkit.cli.online import make_annotator
    from alignkit.settings import ConfigError
    from alignkit.settings.online import AnnotatorSettings

    lm = tiny_dir("llama")
    with pytest.raises(ConfigError, match=rf"annotator\.path: {lm} is not a sequence classifier .*annotator\.path"):
        make_annotator(AnnotatorSettings(kind="reward_model", path=lm), None)
    make_annotator(AnnotatorSettings(kind="reward_model", path=tiny_dir("llama", classifier=True)), None)


def test_an_adapter_saved_for_the_other_head_is_refused_before_anything_is_written(tiny_dir, tmp_path, capsys):
    """A LoRA trained with SFT (peft task_type CAUSAL_LM) given as the reward model's `model.adapter_path`: the base
    was loaded as a classifier with a newly initialised score head, the LoRA has none, so every score was chance
    (exit 0, metrics.json). The same for a ReFT saved without a score head, and a reward model's LoRA (SEQ_CLS)
    evaluated as a DPO policy. One line naming the key and the adapter's saved task; a reward-model LoRA still runs."""
    import torch

    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    base = tiny_dir("llama")
    lora_cfg = AdapterConfig(kind="lora", lora=LoraSettings(r=2, alpha=4.0))
    reft_cfg = AdapterConfig(kind="reft", reft=ReftSettings(config={"representations": [
        {"layer": 0, "low_rank_dimension": 2}]}, positions="l1"))
    torch.manual_seed(0)
    sft_lora, sft_reft, rm_lora = tmp_path / "sft-lora", tmp_path / "sft-reft", tmp_path / "rm-lora"
    save_adapter(apply_adapter(load_model(base), lora_cfg), sft_lora)
    save_adapter(apply_adapter(load_model(base), reft_cfg), sft_reft)
    save_adapter(apply_adapter(load_model(base, task="classifier", num_labels=1), lora_cfg), rm_lora)
    out = tmp_path / "eval"
    common = ["-q", "eval", f"model.path={base}", f"data.path={DATA}", f"output_dir={out}", "data.max_records=2"]
    rm = ["--config", str(CONFIGS / "eval-rm-tiny.yaml")]
    dpo = ["--config", str(CONFIGS / "eval-dpo-tiny.yaml")]
    for config, folder, saved in ((rm, sft_lora, "task_type CAUSAL_LM"), (rm, sft_reft, "no trained score head"),
                                  (dpo, rm_lora, "task_type SEQ_CLS")):
        capsys.readouterr()
        assert main(common + config + [f"model.adapter_path={folder}"]) == 2, folder
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
        assert len(err) == 1 and err[0].startswith(f"alignkit eval: error: model.adapter_path: {folder} holds a "), err
        assert saved in err[0] and "newly initialised at random" in err[0] and "nothing was written" in err[0], err
        assert not out.exists()
    assert main(common + rm + [f"model.adapter_path={rm_lora}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["pairs"] == 2
    from alignkit.cli.online import make_annotator  # a reward-model annotator reads the same check
    from alignkit.settings import ConfigError
    from alignkit.settings.online import AnnotatorSettings

    with pytest.raises(ConfigError, match=r"annotator\.adapter_path: .* task_type CAUSAL_LM"):
        make_annotator(AnnotatorSettings(kind="reward_model", path=base, adapter_path=str(sft_lora)), None)


def test_a_full_policy_reference_is_loaded_with_the_policys_rope_scaling(tiny_dir, tmp_path):
    """DPO eval of a fully finetuned policy under model.rope_scaling: the policy was loaded with the scaling, its
    reference (model.path) without it, so a policy equal to its base got implicit rewards != 0 (accuracy 1/3, loss
    != ln 2 on three pairs). The reference is now loaded as the policy is: a policy with its base's weights has every
    implicit reward 0, so accuracy 0 and loss ln 2."""
    import math

    from alignkit.adapters import AdapterConfig, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    base, full, out = tiny_dir("llama"), tmp_path / "full", tmp_path / "eval"
    save_adapter(apply_adapter(load_model(base, rope_scaling={"type": "linear", "factor": 4.0}),
                               AdapterConfig(kind="full")), full)
    assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={base}",
                 f"model.adapter_path={full}", "model.rope_scaling={type: linear, factor: 4.0}", f"data.path={DATA}",
                 f"output_dir={out}", "data.max_records=3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rewards/accuracies"] == 0 and abs(metrics["rewards/margins"]) < 1e-7
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_reft_eval_on_prompts_cut_at_their_start_warns_that_first_positions_moved(tiny_dir, tmp_path, caplog):
    """eval of a ReFT policy ('f1+l1') with data.max_prompt_length=8: the prompts keep their last 8 tokens, so the
    'f1' intervention edits a token from the middle of each; the same warning as training gives (count, key, fix),
    and none for 'l1' (the end of a prompt is always kept)."""
    import logging

    import torch

    from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    base = tiny_dir("llama")
    for spec, expect in (("f1+l1", 1), ("l1", 0)):
        torch.manual_seed(0)
        folder = tmp_path / f"reft-{spec}"
        save_adapter(apply_adapter(load_model(base), AdapterConfig(kind="reft", reft=ReftSettings(
            config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}, positions=spec))), folder)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
            assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={base}",
                         f"model.adapter_path={folder}", f"data.path={DATA}", f"output_dir={tmp_path / spec}",
                         "data.max_prompt_length=8"]) == 0
        msgs = [r.getMessage() for r in caplog.records if "edit their first KEPT tokens" in r.getMessage()]
        assert len(msgs) == expect, msgs
        if expect:
            assert msgs[0].startswith("data.path: ") and "of 6 record(s) have a prompt longer than " \
                "data.max_prompt_length=8" in msgs[0]
