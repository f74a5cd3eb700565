"""`alignkit eval` on a model whose scores are not finite: one line naming the value and the record, and no
metrics written (before: metrics.json held NaN loss and rewards, then the histogram stopped it with
'unexpected error: ValueError: The histogram is empty'). `eval` and `generate` write their folder only once they
have their results: a failure leaves an earlier run's files as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alignkit.cli import main
from alignkit.models.loading import load_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA = Path(__file__).resolve().parents[2] / "src" / "alignkit" / "resources" / "data" / "hh_rlhf_sample.jsonl"


def inf_model(src: Path, folder: Path) -> Path:
    """`src` saved to `folder` with one infinite weight in the last MLP: every hidden state after it holds inf / NaN."""
    model = load_model(src)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(folder)
    for f in src.iterdir():  # the tokenizer files beside the weights
        if f.name.startswith("tokenizer") or f.suffix == ".jinja" or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return folder


def earlier_run(out: Path, command: str) -> dict[str, bytes]:
    """`out` holding an earlier run's files, which a failed run must leave as they are (before: its config.yaml was
    replaced by the failed run's, beside the earlier run's results)."""
    out.mkdir()
    (out / "config.yaml").write_text(f"command: {command}\nearlier: true\n")
    (out / "metrics.json").write_text('{"earlier": true}')
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_dpo_eval_with_an_infinite_weight_is_one_line_and_writes_no_metrics(tiny_dir, tmp_path, capsys):
    src = Path(tiny_dir("llama"))
    folder = inf_model(src, tmp_path / "inf-model")
    out = tmp_path / "eval"
    before = earlier_run(out, "eval")
    capsys.readouterr()
    assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={folder}",
                 "model.adapter_path=null", f"method.reference_path={src}", f"data.path={DATA}", f"output_dir={out}",
                 "--overwrite"]) == 2  # (over the earlier eval's metrics.json: asked to replace it)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit eval")]
    assert len(err) == 1 and err[0].startswith("alignkit eval: error: eval: ")
    # the first of the 6 bundled pairs is named; all 6 are NaN (the inf reaches every position's hidden state)
    assert f"is nan at record {DATA}:1 (6 non-finite) with {folder}" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_generate_that_fails_on_non_finite_logits_leaves_an_earlier_run_as_it_was(tiny_dir, tmp_path, capsys):
    folder = inf_model(Path(tiny_dir("llama")), tmp_path / "inf-model")
    out = tmp_path / "gen"
    before = earlier_run(out, "generate")
    capsys.readouterr()
    assert main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"model.path={folder}",
                 "model.adapter_path=null", "data.max_records=2", "generation.max_new_tokens=3",
                 f"output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit generate")]
    assert len(err) == 1 and "error:" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


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


def test_sample_that_fails_keeps_the_settings_of_the_samples_it_did_not_replace(tiny_dir, tmp_path, capsys):
    """sample.yaml was written before sampling: an `overwrite=true` run that failed left it describing settings the
    kept samples.jsonl was not made with, so the next run with those settings kept the old samples (exit 0) instead
    of refusing them (check_kept_stage)."""
    src = Path(tiny_dir("llama"))
    folder = inf_model(src, tmp_path / "inf-model")
    out = tmp_path / "round"
    args = ["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={out}", "data.max_records=2",
            "sampling.max_new_tokens=3", "sampling.num_samples=2"]
    assert main([*args, f"model.path={src}"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*args, f"model.path={folder}", "overwrite=true"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main([*args, f"model.path={folder}"]) == 2  # the kept samples are of model.path={src}: refused
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sample")]
    assert "made with other settings" in err[-1] and f"model.path: '{src}' then" in err[-1], err
