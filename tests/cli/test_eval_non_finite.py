"""`alignkit eval` on a model whose scores are not finite: one line naming the value and the record, and no
metrics written (before: metrics.json held NaN loss and rewards, then the histogram stopped it with
'unexpected error: ValueError: The histogram is empty')."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignkit.cli import main
from alignkit.models.loading import load_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA = Path(__file__).resolve().parents[2] / "src" / "alignkit" / "resources" / "data" / "hh_rlhf_sample.jsonl"


def test_dpo_eval_with_an_infinite_weight_is_one_line_and_writes_no_metrics(tiny_dir, tmp_path, capsys):
    src = Path(tiny_dir("llama"))
    model = load_model(src)
    with torch.no_grad():  # one infinite weight in the last MLP: every hidden state after it holds inf / NaN
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("inf")
    folder = tmp_path / "inf-model"
    model.save_pretrained(folder)
    for f in src.iterdir():  # the tokenizer files beside the weights
        if f.name.startswith("tokenizer") or f.suffix == ".jinja" or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={folder}",
                 "model.adapter_path=null", f"method.reference_path={src}", f"data.path={DATA}", f"output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
    assert len(err) == 1 and err[0].startswith("alignkit eval: error: eval: ")
    # the first of the 6 bundled pairs is named; all 6 are NaN (the inf reaches every position's hidden state)
    assert f"is nan at record {DATA}:1 (6 non-finite) with {folder}" in err[0]
    assert not (out / "metrics.json").exists() and not (out / "tensorboard").exists()


def test_eval_data_the_length_limits_drop_entirely_writes_nothing(tiny_dir, tmp_path, capsys):
    """eval wrote <output_dir>/config.yaml before it loaded the model and tokenized the data, so data whose every
    record data.max_length drops (or a model that does not load) stopped with exit 2 after writing into output_dir.
    Now the model is loaded and the data tokenized first: one line, and output_dir is not created."""
    src = Path(tiny_dir("llama"))
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={src}",
                 "model.adapter_path=null", f"method.reference_path={src}", f"data.path={DATA}", f"output_dir={out}",
                 "data.max_length=3", "data.max_prompt_length=null"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
    assert len(err) == 1 and "data.path: every record was dropped" in err[0] and "raise data.max_length" in err[0]
    assert not out.exists()
