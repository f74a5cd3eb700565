"""`alignkit demo` end to end (fewer steps): the reloaded ReFT reproduces every bundled answer."""

from __future__ import annotations

import json

from alignkit.cli import main
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
    assert json.loads((out / "reft" / "reft_config.json").read_text())["base_model"]["num_layers"] == 4


def test_demo_pairs_bundled():
    pairs = load_demo_pairs()
    assert len(pairs) >= 10 and len({p for p, _ in pairs}) == len(pairs)
