"""`alignkit eval` (dpo) with neither `model.adapter_path` nor `method.reference_path`: the model would be its own
reference (every implicit reward 0, accuracy 0, loss ln 2, whatever it learned). Before: a logged warning and
metrics.json with those numbers, exit 0. Now one line naming both keys, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

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
