"""Replacing earlier outputs, from Python and in both spellings (session 25).

`evaluate(cfg)` / `generate(cfg)` / `augment(cfg)` called from Python replaced an earlier run's results in
output_dir without a word, while the CLI refuses them unless --overwrite (tests/cli/test_rerun_outputs.py): the
check ran only in the CLI's wrapper. Now the library functions run it first (before anything is written), lifted by
their `overwrite=True` keyword (as `train(cfg, ..., overwrite=True)`) or the config's key `overwrite`.

sample / annotate took the key `overwrite: true` only, eval / generate / augment the flag --overwrite only (the
other spelling: "unrecognized arguments" / "unknown key"). Now all five take both: the flag sets the key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from alignkit.cli import build_parser, main
from alignkit.cli.augment import augment
from alignkit.cli.evaluate import evaluate
from alignkit.cli.generate import generate
from alignkit.cli.rounds import annotate, sample
from alignkit.settings import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def results(command: str, out: Path) -> int:
    """How many records the results in `out` count (3 written first, then 2)."""
    if command == "eval":
        return json.loads((out / "metrics.json").read_text())["pairs"]
    return len((out / "generations.jsonl").read_text().splitlines())


@pytest.mark.parametrize("command, config, run, extra", [
    ("eval", "eval-rm-tiny.yaml", evaluate, ["model.path=tiny:llama", "model.adapter_path=null"]),
    ("generate", "generate-tiny.yaml", generate, ["model.path=tiny:llama", "model.adapter_path=null",
                                                  "generation.max_new_tokens=4"]),
])
def test_the_library_functions_refuse_an_earlier_set_unless_overwrite(tmp_path, command, config, run, extra):
    out = tmp_path / "out"

    def cfg(*more: str):
        return load_config(CONFIGS / config, [f"output_dir={out}", *extra, *more], command=command)

    run(cfg("data.max_records=3"), progress=False)
    assert results(command, out) == 3
    before = snapshot(out)
    with pytest.raises(ConfigError) as e:
        run(cfg("data.max_records=2"), progress=False)
    assert f"output_dir: {out} already holds the outputs of an earlier `alignkit {command}` " \
           f"(alignkit_{command}_outputs.json, " in str(e.value) and "overwrite=true" in str(e.value), e.value
    assert "\n" not in str(e.value) and snapshot(out) == before  # one line, checked before anything is written
    run(cfg("data.max_records=2"), progress=False, overwrite=True)  # the keyword, as train(..., overwrite=True)
    assert results(command, out) == 2
    run(cfg("data.max_records=3", "overwrite=true"), progress=False)  # the config's key
    assert results(command, out) == 3


def test_the_library_augment_refuses_an_earlier_set_of_another_config(tmp_path):
    out = tmp_path / "out"

    def cfg(*more: str):
        return load_config(CONFIGS / "augment-code-bugs.yaml", [f"output_dir={out}", *more], command="augment")

    augment(cfg(), progress=False)
    first = snapshot(out)
    augment(cfg(), progress=False)  # the same config: its cache, not refused
    with pytest.raises(ConfigError, match="already holds the outputs of an earlier `alignkit augment`"):
        augment(cfg("data.max_records=2"), progress=False)
    assert snapshot(out)["augmented.jsonl"] == first["augmented.jsonl"]
    augment(cfg("data.max_records=2", "overwrite=true"), progress=False)
    assert snapshot(out)["augmented.jsonl"] != first["augmented.jsonl"]
    augment(cfg("data.max_records=2"), progress=False)  # the key alone is no other config: the same one again


def test_eval_takes_the_key_overwrite_as_its_flag(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["-q", "eval", "--config", str(CONFIGS / "eval-rm-tiny.yaml"), f"output_dir={out}", "model.path=tiny:llama",
            "model.adapter_path=null"]
    assert main([*base, "data.max_records=3"]) == 0
    assert main([*base, "data.max_records=2", "overwrite=true"]) == 0  # was: unknown key overwrite
    assert results("eval", out) == 2


def test_sample_takes_the_flag_overwrite_as_its_key(tmp_path, capsys):
    rnd = tmp_path / "round"
    base = ["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={rnd}", "data.max_records=2",
            "sampling.max_new_tokens=3"]
    assert main(base) == 0
    kept = (rnd / "samples.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*base, "sampling.temperature=0.5"]) == 2  # a kept round made with other settings: refused
    assert "Pass --overwrite (overwrite=true) to redo it" in capsys.readouterr().err
    assert main([*base, "sampling.temperature=0.5", "--overwrite"]) == 0  # was: unrecognized arguments
    assert (rnd / "samples.jsonl").read_bytes() != kept
    saved = (rnd / "sample.yaml").read_text()
    assert "temperature: 0.5" in saved and "overwrite: false" in saved  # the switch is not recorded (below)


def test_a_config_saved_by_an_overwriting_run_asks_again(tmp_path, capsys):
    """`--overwrite` set the key `overwrite`, which the saved config.yaml then recorded as true: a rerun from that
    file (or a copy of it for another folder) replaced the earlier results without a word, the very case the rerun
    refusal is for (found by a review). The switch is per invocation: saved as false. Fails without the fix: yes."""
    out = tmp_path / "out"
    base = ["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"output_dir={out}",
            "model.path=tiny:llama", "model.adapter_path=null", "generation.max_new_tokens=4"]
    assert main([*base, "data.max_records=3"]) == 0
    assert main([*base, "data.max_records=2", "--overwrite"]) == 0
    assert "overwrite: false" in (out / "config.yaml").read_text()
    before = snapshot(out)
    capsys.readouterr()
    assert main(["-q", "generate", "--config", str(out / "config.yaml"), "data.max_records=1"]) == 2
    assert "already holds the outputs of an earlier `alignkit generate`" in capsys.readouterr().err
    assert snapshot(out) == before and results("generate", out) == 2


@pytest.mark.parametrize("command", ["eval", "generate", "augment", "sample", "annotate"])
def test_the_help_names_both_spellings(command):
    sub = next(a for a in build_parser([command, "--help"])._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    flag = next(a for a in p._actions if "--overwrite" in a.option_strings)  # sample / annotate: was none
    assert "overwrite=true" in flag.help, flag.help
    assert "overwrite" in [line.split()[0] for line in p.epilog.splitlines()[1:]]  # the key, in the key listing


def test_the_library_sample_and_annotate_take_the_keyword_overwrite(tmp_path):
    """`sample(cfg)` / `annotate(cfg)` took only the key `overwrite` (a TypeError for `overwrite=True`), unlike
    evaluate / generate / augment (session 26). Now the keyword redoes a kept stage made with other settings, as the
    key does. Fails without the fix: yes."""
    rnd = tmp_path / "round"

    def cfg(config: str, command: str, *more: str):
        return load_config(CONFIGS / config, [f"output_dir={rnd}", *more], command=command)

    sampled = ("sample-tiny.yaml", "sample", "data.max_records=2", "sampling.max_new_tokens=3")
    sample(cfg(*sampled), progress=False)
    annotate(cfg("annotate-tiny.yaml", "annotate"), progress=False)
    kept = {f: (rnd / f).read_bytes() for f in ("samples.jsonl", "records.jsonl")}
    with pytest.raises(ConfigError, match="Pass --overwrite \\(overwrite=true\\) to redo it"):
        sample(cfg(*sampled, "sampling.temperature=0.5"), progress=False)
    with pytest.raises(ConfigError, match="Pass --overwrite \\(overwrite=true\\) to redo it"):
        annotate(cfg("annotate-tiny.yaml", "annotate", "feedback=random_pairs"), progress=False)
    assert {f: (rnd / f).read_bytes() for f in kept} == kept  # refused before anything is written
    annotate(cfg("annotate-tiny.yaml", "annotate", "feedback=random_pairs"), progress=False, overwrite=True)
    assert "feedback: random_pairs" in (rnd / "annotate.yaml").read_text()
    sample(cfg(*sampled, "sampling.temperature=0.5"), progress=False, overwrite=True)
    assert (rnd / "samples.jsonl").read_bytes() != kept["samples.jsonl"]
    assert "temperature: 0.5" in (rnd / "sample.yaml").read_text()
