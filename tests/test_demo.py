"""`alignkit demo` end to end (fewer steps): the reloaded ReFT reproduces every bundled answer."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.cli.demo import REFT_WRITES
from alignkit.demos.reft import load_demo_pairs


def test_demo_cli_reproduces_answers(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["-q", "demo", "--reft", "--output-dir", str(out), "--max-steps", "200"])
    printed = capsys.readouterr().out
    pairs = load_demo_pairs()
    assert rc == 0, printed
    assert f"{len(pairs)}/{len(pairs)} answers reproduced" in printed
    for prompt, answer in pairs:
        line = next(l for l in printed.splitlines() if l.startswith(prompt))
        assert line.rstrip().endswith(f"{answer}  [ok]")
    # the saved ReFT holds interventions only (an adapter folder: alignkit_adapter.json, read by load_adapter,
    # and alignkit_base.json, the base it was trained on);
    # the base was saved and loaded back separately
    assert sorted(p.name for p in (out / "reft").iterdir() if p.suffix in (".json", ".safetensors")) == \
        ["alignkit_adapter.json", "alignkit_base.json", "interventions.safetensors", "reft_config.json", "tokenizer.json",
         "tokenizer_config.json", "training_args.json"]
    assert (out / "base" / "model.safetensors").is_file()
    assert {p.name for p in out.iterdir()} <= set(REFT_WRITES)  # what `demo --reft` takes back as its own folder
    assert main(["-q", "demo", "--reft", "--output-dir", str(out), "--max-steps", "1"]) == 1  # over it: runs
    assert json.loads((out / "reft" / "reft_config.json").read_text())["base_model"]["num_layers"] == 4


def test_demo_pairs_bundled():
    pairs = load_demo_pairs()
    assert len(pairs) >= 10 and len({p for p, _ in pairs}) == len(pairs)


BAD_DEMO_ARGS = [  # (arguments, what the one line names): each was taken, then failed after writing the demo's folder
    # with "unexpected error ... please report it", or ran while ignoring it (--threads 0: torch's default;
    # --target-loss nan: never below it; --max-steps -1: the Trainer's "train by epochs"; --scale with --reft)
    (["--scale", "0"], "--scale 0.0: must be a finite number > 0"),
    (["--scale", "nan"], "--scale nan: must be a finite number > 0"),
    (["--threads", "0"], "--threads 0: must be an integer >= 1"),
    (["--threads", "-2"], "--threads -2: must be an integer >= 1"),
    (["--max-steps", "-1"], "--max-steps -1: must be an integer >= 1"),
    (["--target-loss", "nan"], "--target-loss nan: must be a finite number >= 0"),
    (["--learning-rate", "-1"], "--learning-rate -1.0: must be a finite number > 0"),
    (["--reft", "--scale", "0.2"], "--scale 0.2: the pipeline demo's option, which the ReFT demo does not read"),
    (["--pairs", "missing.jsonl"], "--pairs missing.jsonl: no such file"),
    (["--pairs", "{completion}"], "line 1: expected a JSON object with 'prompt' and 'response' (KeyError: 'response')"),
    (["--pairs", "{empty}"], "no records; --pairs takes"),
    (["--output-dir", "{file}"], "is a file, not a folder"),
    (["--output-dir", "{run}"], "holds config.yaml, metrics.jsonl, which the demo does not write"),  # a training run's
    (["--reft", "--output-dir", "{run}"], "holds config.yaml, metrics.jsonl, which the demo does not write"),
]


@pytest.mark.parametrize("argv, says", BAD_DEMO_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_demo_refuses_a_bad_option_in_one_line_before_writing(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "completion.jsonl").write_text('{"prompt": "Hi", "completion": " Hello"}\n')  # TRL's column name
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("command: sft\n")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    argv = [a.format(completion="completion.jsonl", empty="empty.jsonl", file="file", run="run") for a in argv]
    out = [] if "--output-dir" in argv else ["--output-dir", "out"]
    before = sorted(tmp_path.rglob("*"))
    assert main(["-q", "demo", *argv, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("alignkit demo: error: ") and says in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
