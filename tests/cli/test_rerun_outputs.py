"""A rerun of eval / generate / augment into a folder holding that command's earlier outputs (audit F5, session 25):
it replaced them without a word (rc 0; comparing two checkpoints into one folder lost the first's numbers), while a
training rerun is refused. Now refused before anything is written, in one line naming the folder, the file found and
--overwrite; --overwrite replaces them; another command's files (eval in a training run folder:
test_command_outputs.py) and, for augment, the same config again (its LLM cache) are not refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, config, extra, results", [
    ("eval", "eval-rm-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null"], "metrics.json"),
    ("generate", "generate-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null",
                                        "generation.max_new_tokens=4"], "generations.jsonl"),
])
def test_a_rerun_into_a_folder_holding_the_commands_outputs_needs_overwrite(tmp_path, capsys, command, config, extra,
                                                                            results):
    out = tmp_path / "out"
    base = ["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", *extra]
    assert main([*base, "data.max_records=3"]) == 0
    before = snapshot(out)
    manifest = f"alignkit_{command}_outputs.json"
    for dry in ([], ["--dry-run"]):  # the run, and --dry-run as the run checks
        capsys.readouterr()
        assert main([*base, "data.max_records=2", *dry]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"output_dir: {out} already holds the outputs of an earlier `alignkit {command}` " \
            f"({manifest}, {results}" in err[0] and "pass --overwrite (overwrite=true) to replace them" in err[0], err
        assert snapshot(out) == before  # checked before anything is written
    assert main([*base, "data.max_records=2", "--overwrite"]) == 0
    if command == "eval":  # 3 records of the bundled pairs, then 2: the count the results hold
        import json
        assert json.loads((out / results).read_text())["pairs"] == 2
    else:
        assert len((out / results).read_text().splitlines()) == 2


def test_augment_again_with_the_same_config_uses_its_cache_and_with_another_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["-q", "augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"output_dir={out}"]
    assert main(base) == 0
    first = snapshot(out)
    assert main(base) == 0  # the same config: no refusal (the documented cache pay-off), the same records
    assert (out / "augmented.jsonl").read_bytes() == first["augmented.jsonl"]
    capsys.readouterr()
    assert main([*base, "data.max_records=2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"alignkit augment: error: output_dir: {out} already holds the outputs of an earlier `alignkit "
                   "augment` (alignkit_augment_outputs.json, augmented.jsonl, summary.json); pass --overwrite "
                   "(overwrite=true) to replace them, or choose another output_dir"]
    assert (out / "augmented.jsonl").read_bytes() == first["augmented.jsonl"]
    assert main([*base, "data.max_records=2", "--overwrite"]) == 0
    assert (out / "augmented.jsonl").read_bytes() != first["augmented.jsonl"]


def test_a_report_folder_is_not_called_an_earlier_generate_run(tmp_path, capsys):
    """Third review's F5: generation_report(out_dir=X) writes generations.jsonl, and `alignkit generate` into X was
    refused as holding 'the outputs of an earlier `alignkit generate`', a run that never happened."""
    from alignkit.trainers.evaluation import write_report

    out = tmp_path / "out"
    out.mkdir()
    write_report([{"prompt": "p", "base": "b", "adapted": "a"}], out)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"output_dir={out}",
                 "model.path=tiny:llama", "model.adapter_path=null", "generation.max_new_tokens=4"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"output_dir: {out} already holds files `alignkit generate` writes (generations.jsonl); " \
        "pass --overwrite (overwrite=true) to replace them" in err[0], err
    assert "an earlier" not in err[0] and snapshot(out) == before
