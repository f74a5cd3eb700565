"""Issue 12, finding 8: a config is not code. `annotator.function: module:function` outside alignkit's own reward
functions is imported only when the user passes --allow-code; --dry-run and config validation import nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.settings import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GRPO = str(CONFIGS / "grpo-tiny.yaml")
SMALL = ["train.max_steps=1", "method.prompts_per_step=1", "sampling.num_samples=2", "sampling.max_new_tokens=2",
         "data.max_records=2"]


@pytest.fixture
def foreign(tmp_path, monkeypatch):
    """A module outside alignkit whose import leaves a trace (a file), with a well-formed reward function."""
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    trace = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(trace)!r}).write_text('imported')\n"
        "def length(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{name}:length", trace
    sys.modules.pop(name, None)


def test_dry_run_and_config_loading_import_nothing(foreign, tmp_path, capsys):
    spec, trace = foreign
    assert main(["-q", "grpo", "--config", GRPO, "--dry-run", "--allow-code", f"annotator.function={spec}"]) == 0
    assert spec in capsys.readouterr().out
    load_config(GRPO, [f"annotator.function={spec}"])
    assert not trace.exists()


@pytest.mark.parametrize("command, config", [("grpo", GRPO), ("annotate", str(CONFIGS / "annotate-tiny.yaml"))])
def test_dry_run_refuses_foreign_code_without_allow_code_as_the_run_does(command, config, foreign, capsys):
    """A dry run said the config was fine (exit 0) for code outside alignkit.rewards without --allow-code, which the
    run itself then refused: the same one line now, from the name alone (nothing imported)."""
    spec, trace = foreign
    rc = main(["-q", command, "--config", config, "--dry-run", "annotator.kind=function", f"annotator.function={spec}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"annotator.function: '{spec}' is code outside" in err
    assert "--allow-code" in err and not trace.exists()


def test_foreign_code_needs_allow_code(foreign, tmp_path, capsys):
    spec, trace = foreign
    rc = main(["-q", "grpo", "--config", GRPO, f"output_dir={tmp_path / 'run'}", f"annotator.function={spec}", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "annotator.function" in err and "--allow-code" in err
    assert not trace.exists() and not (tmp_path / "run").exists()
    # the dangerous example of the issue: refused the same way, nothing imported or called
    rc = main(["-q", "grpo", "--config", GRPO, f"output_dir={tmp_path / 'run'}", "annotator.function=shutil:rmtree"])
    assert rc == 2 and "--allow-code" in capsys.readouterr().err


def test_allow_code_runs_it(foreign, tmp_path):
    spec, trace = foreign
    rc = main(["-q", "grpo", "--config", GRPO, "--allow-code", f"output_dir={tmp_path / 'run'}",
               f"annotator.function={spec}", *SMALL])
    assert rc == 0 and trace.read_text() == "imported"
    assert (tmp_path / "run" / "model" / "alignkit_complete.json").is_file()


def test_alignkit_rewards_need_no_flag():
    cfg = load_config(GRPO)  # alignkit.rewards:digit_fraction, imported and checked at load time
    assert cfg.annotator.function == "alignkit.rewards:digit_fraction"
