"""`alignkit serve` command line: flags and config merge, errors that name the flag or key."""

from __future__ import annotations

import pytest

from alignkit.cli import main


def test_dry_run_merges_config_flags_and_overrides(capsys, tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("command: serve\nbase: tiny:llama\nadapters: {a: /x/a}\nport: 9000\n")
    assert main(["serve", "--config", str(cfg), "--adapter", "b=/x/b", "--port", "9100", "max_queue=5",
                 "--api-key", "k", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "adapters:\n  a: /x/a\n  b: /x/b\n" in out
    assert "port: 9100" in out and "max_queue: 5" in out and "host: 127.0.0.1" in out
    assert "api_key: '***'" in out and ": k\n" not in out  # the key is never echoed


@pytest.mark.parametrize("argv, message", [
    (["--base", "tiny:llama", "--adapter", "noequals"], "--adapter 'noequals': expected NAME=DIR"),
    (["--base", "tiny:llama", "--engine", "vllm", "--adapter", "r=/no/such"], "adapter 'r': folder /no/such does not exist"),
    (["--base", "tiny:llama", "max_batch_rows=0"], "max_batch_rows: must be >= 1"),
    (["--base", "tiny:nope"], "unknown tiny architecture"),
    (["--base", "/no/such/folder"], "/no/such/folder does not exist"),
    # before: accepted, and a request without max_tokens got max_new_tokens (the engine clamped it without a word)
    (["--base", "tiny:llama", "--default-max-tokens", "100", "--max-new-tokens", "50"],
     "default_max_tokens: 100 exceeds max_new_tokens (50)"),
])
def test_errors_name_the_problem(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, key", [
    (["--max-queue", "4"], "max_queue"), (["--max-batch-rows", "2"], "max_batch_rows"),
    (["--device", "cuda:1"], "device"), (["--request-timeout", "5"], "request_timeout"),
    (["--default-max-tokens", "16"], "default_max_tokens"), (["log_every=5"], "log_every"),
])
def test_engine_vllm_refuses_what_only_alignkits_engine_reads(argv, key, capsys):
    """`--engine vllm` starts vLLM's own server with host, port, dtype, the API key and a max model length; the
    queue, batch, timeout, default max_tokens, device and log settings are alignkit's engine's, and were accepted and
    ignored (vLLM served with its own). One line naming the key now, before vLLM is looked for."""
    assert main(["serve", "--base", "tiny:llama", "--engine", "vllm", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit serve")]
    assert len(err) == 1 and err[0].startswith(f"alignkit serve: error: {key}: ") and "engine=vllm" in err[0], err
