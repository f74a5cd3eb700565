"""`alignkit serve --engine vllm --dry-run` checks the base's config as the server's start does (session 25).

The dry run checked only the adapters: a base vLLM computes otherwise (dynamic RoPE), one whose head size vLLM's
attention here refuses, or LoRA on a mixture of experts on vLLM's CPU build passed it (rc 0, "OK"), and the real
start refused them (`serve_with_vllm`: check_rope_type, check_head_size; `prepare`: check_moe_lora). Now the dry
run makes them too; the ones that ask vLLM's platform (head size, MoE-LoRA) say they run at start where vLLM is not
importable (this venv). vLLM "here" is the test's stand-in: `vllm_installed` and the platform's answers replaced."""

from __future__ import annotations

import json
import shutil

import pytest

import alignkit.models.vllm_support as vllm_support
from alignkit.cli import main


def base_with(serve_dirs, tmp_path, **config):
    """A copy of the served tiny base (head size 64 / 4 = 16) with `config` written into its config.json."""
    base = tmp_path / "base"
    shutil.copytree(serve_dirs["base"], base)
    data = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**data, **config}))
    return base


def dry_run(capsys, base, *more: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    rc = main(["serve", "--base", str(base), "--engine", "vllm", *more, "--dry-run"])
    got = capsys.readouterr()
    return rc, got.out, [line for line in got.err.splitlines() if line.strip()]


def vllm_here(monkeypatch, cpu: bool, head_sizes=(32, 64, 128)):
    monkeypatch.setattr(vllm_support, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_support, "vllm_cpu_platform", lambda: cpu)
    monkeypatch.setattr(vllm_support, "attention_head_sizes",
                        lambda size: None if size in head_sizes else ("CPU_ATTN", list(head_sizes)))


def test_dynamic_rope_is_refused_by_the_dry_run(serve_dirs, tmp_path, capsys):
    base = base_with(serve_dirs, tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                            "rope_theta": 10000.0})
    rc, out, err = dry_run(capsys, base)
    assert rc == 2 and len(err) == 1, (rc, err)  # was: rc 0, "OK"
    assert f"serve --engine vllm: the model in {base} has dynamic RoPE scaling" in err[0], err
    assert "serve it with --engine alignkit" in err[0] and not out


def test_the_head_size_is_checked_where_vllm_is_here_and_said_to_run_at_start_where_not(serve_dirs, tmp_path, capsys,
                                                                                       monkeypatch):
    base = base_with(serve_dirs, tmp_path)
    rc, out, err = dry_run(capsys, base)
    assert rc == 0, err
    assert f"# --dry-run checked base {base}: attention head size 16: checked against vLLM's attention when the " \
           "server starts (vLLM is not importable here)" in out
    assert f"# --dry-run checked base {base}: its RoPE (default) as vLLM computes it" in out
    vllm_here(monkeypatch, cpu=True)
    rc, out, err = dry_run(capsys, base)
    assert rc == 2 and len(err) == 1 and "has attention head size 16" in err[0] and "CPU_ATTN" in err[0], err


def test_lora_on_a_mixture_of_experts_is_refused_on_vllms_cpu_platform(serve_dirs, tmp_path, capsys, monkeypatch):
    base = base_with(serve_dirs, tmp_path, num_local_experts=4)
    adapter = f"terse={serve_dirs['adapters']['terse']}"
    rc, out, err = dry_run(capsys, base, "--adapter", adapter)
    assert rc == 0, err
    assert "a mixture of experts (4 experts) with LoRA adapters: the platform check (vLLM's CPU build cannot run " \
           "LoRA on one) runs when the server starts (vLLM is not importable here)" in out
    rc, out, err = dry_run(capsys, base)  # the base alone: no LoRA, nothing to say about experts
    assert rc == 0 and "mixture of experts" not in out
    vllm_here(monkeypatch, cpu=True, head_sizes=(16,))
    rc, out, err = dry_run(capsys, base, "--adapter", adapter)
    assert rc == 2 and len(err) == 1, err
    assert "serve --engine vllm --adapter: the model in" in err[0] and "mixture of experts (4 experts)" in err[0]
    vllm_here(monkeypatch, cpu=False, head_sizes=(16,))  # a GPU platform: served
    rc, out, err = dry_run(capsys, base, "--adapter", adapter)
    assert rc == 0 and "vLLM's platform here runs LoRA on it" in out, err


@pytest.mark.parametrize("base", ["tiny:llama"])
def test_a_tiny_base_is_checked_as_it_would_be_built(base, capsys):
    rc, out, err = dry_run(capsys, base)
    assert rc == 0 and "attention head size 64" in out, err  # resolve_base's sizes for vLLM: 128 / 2


@pytest.mark.parametrize("config, says", [
    ({"model_type": "llama9000"}, "model type `llama9000` but Transformers does not recognize this architecture"),
    (None, "is not a valid JSON file"),
])
def test_a_config_transformers_cannot_read_is_one_line_not_an_unexpected_error(serve_dirs, tmp_path, capsys,
                                                                               config, says):
    """Third review's F4: a base whose model_type this transformers does not know (a newer architecture), or whose
    config.json is broken, ended the dry run (and the start) as 'unexpected error' rc 1 with transformers' paragraph."""
    base = base_with(serve_dirs, tmp_path, **(config or {}))
    if config is None:
        (base / "config.json").write_text('{"model_type": "llama", ')
    rc, out, err = dry_run(capsys, base)
    assert rc == 2 and len(err) == 1 and not out, (rc, err)
    assert f"serve --engine vllm: cannot read the model config in {base} (" in err[0] and says in err[0], err
    assert "unexpected error" not in err[0] and "pip install -U transformers" in err[0], err


def test_vllm_serve_names_itself_when_the_config_cannot_be_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama9000"}))
    with pytest.raises(vllm_support.ConfigError, match=r"^vllm-serve --model: cannot read the model config in "):
        vllm_support.folder_config(tmp_path, where="vllm-serve --model")
