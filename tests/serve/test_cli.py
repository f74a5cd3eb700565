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
])
def test_errors_name_the_problem(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err
