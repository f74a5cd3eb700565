"""`model.adapter_path` folders under eval / generate: what is refused before the base model is loaded (one line,
exit 2, nothing written), and what loads back (every adapter kind of tests/adapters/table.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import alignkit.cli.models as cli_models
from alignkit.adapters import AdapterConfig, apply_adapter, save_adapter
from alignkit.cli import main
from alignkit.models.loading import load_model

from tests.adapters.table import ADAPTERS, perturb

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ADAPTER_ROWS = [r for r in ADAPTERS if not r.whole_model]


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """kind -> an adapter folder of that kind saved from the tiny Llama `tiny_dir("llama")`."""
    root = tmp_path_factory.mktemp("adapters")
    return {r.kind: save_adapter(perturb(apply_adapter(load_model(tiny_dir("llama")), r.config())), root / r.kind)
            for r in ADAPTER_ROWS}


def _generate(base, folder, out, *extra):
    return main(["generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"model.path={base}",
                 f"model.adapter_path={folder}", f"output_dir={out}", "generation.max_new_tokens=2", "data.max_records=2",
                 *extra])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("row", ADAPTER_ROWS, ids=lambda r: r.kind)
def test_a_folder_missing_or_damaging_a_file_is_refused_before_the_base_loads(row, saved, tiny_dir, tmp_path,
                                                                             monkeypatch, capsys):
    """Before: the base model was loaded first, then a ReFT folder without reft_config.json failed inside load_reft
    and a LoRA folder without adapter_config.json inside peft ("model.adapter_path: cannot load ...:
    FileNotFoundError / HFValidationError"), and a truncated weights file only after the base had loaded. Now the
    kind's files are checked (Adapter.weight_files) and read whole before anything loads: one line naming the file."""
    monkeypatch.setattr(cli_models, "load_model", lambda *a, **k: pytest.fail("the base model was loaded"))
    cases = [(name, "missing") for name in row.files] + [(n, "truncated") for n in row.files if n.endswith(".safetensors")]
    for name, how in cases:
        folder = tmp_path / f"{how}-{name}"
        shutil.copytree(saved[row.kind], folder)
        if how == "missing":
            (folder / name).unlink()
        else:
            _truncate(folder / name)
        out = tmp_path / f"out-{how}-{name}"
        assert _generate(tiny_dir("llama"), folder, out) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit generate")]
        says = f"{folder} has no {name} (" if how == "missing" else f"{folder / name} cannot be read ("
        assert len(err) == 1 and "model.adapter_path: " in err[0] and says in err[0], err
        assert not out.exists()


@pytest.mark.parametrize("row", ADAPTER_ROWS, ids=lambda r: r.kind)
def test_an_adapter_on_a_base_of_another_shape_is_one_line_naming_its_base(row, saved, tiny_dir, tmp_path, capsys):
    """Before: a LoRA / ReFT+LoRA folder on a wider base gave peft's "size mismatch for base_model.model..." (read as
    "trained on a model of another size"), a ReFT folder its own wording, and none named the base it was trained on.
    Now check_base runs before the adapter is loaded: one line with what differs and the base to use."""
    out = tmp_path / "out"
    wide = tiny_dir("llama", hidden_size=96)
    capsys.readouterr()
    assert _generate(wide, saved[row.kind], out) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit generate")]
    assert len(err) == 1, err
    assert ("trained on a different base model (hidden_size 96 here, 64 when trained; it was trained on "
            f"{tiny_dir('llama')}); load it on the base it was trained with") in err[0], err
    assert not out.exists()


def test_check_base_beside_a_fully_finetuned_folder_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    """model.check_base: false was accepted beside a model.adapter_path holding a fully finetuned model, which is
    loaded whole (no alignkit_base.json, nothing compared), so the key did nothing. One line before anything loads."""
    folder = save_adapter(apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="full")), tmp_path / "full")
    monkeypatch.setattr(cli_models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    out = tmp_path / "out"
    assert _generate(tiny_dir("llama"), folder, out, "model.check_base=false") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit generate")]
    assert len(err) == 1 and "model.check_base: false is read only for an adapter" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("row", [r for r in ADAPTER_ROWS if r.lora], ids=lambda r: r.kind)
def test_a_lora_of_a_deeper_base_is_one_line_naming_a_dropped_tensor(row, tiny_dir, tmp_path, capsys):
    """A LoRA of a 3-layer base without alignkit_base.json (a plain peft folder) under `generate` on the 2-layer
    base: before, peft dropped its third layer's tensors and the run generated with two thirds of it, exit 0. Now
    one line, exit 2, naming the key, the folder and a layer-2 tensor, and nothing is written."""
    folder = save_adapter(perturb(apply_adapter(load_model(tiny_dir("llama", num_layers=3)), row.config())),
                          tmp_path / "deep")
    (folder / "alignkit_base.json").unlink()
    out = tmp_path / "out"
    capsys.readouterr()
    assert _generate(tiny_dir("llama"), folder, out) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit generate")]
    assert len(err) == 1, err
    assert f"model.adapter_path: {folder}: this LoRA adapter does not fit the base model " in err[0], err
    assert "14 saved tensor(s) fit no module of the base (e.g. base_model.model.model.layers.2." in err[0], err
    assert "use it with the base it was trained on" in err[0], err
    assert not out.exists()
