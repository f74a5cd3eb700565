"""`alignkit serve` command line: flags and config merge, errors that name the flag or key."""

from __future__ import annotations

import shutil
import socket

import pytest

from alignkit.cli import main


def test_dry_run_merges_config_flags_and_overrides(capsys, tmp_path, monkeypatch):
    import alignkit.cli.serve

    cfg = tmp_path / "s.yaml"
    cfg.write_text("command: serve\nbase: tiny:llama\nadapters: {a: /x/a}\nport: 9000\n")
    argv = ["serve", "--config", str(cfg), "--adapter", "b=/x/b", "--port", "9100", "max_queue=5", "--api-key", "k",
            "--dry-run"]
    assert main(argv) == 2  # the dry run checks the adapter folders, as the server does before loading
    assert "adapter 'a': /x/a does not exist" in capsys.readouterr().err
    monkeypatch.setattr(alignkit.cli.serve, "check_folders", lambda cfg: None)  # (this test: how the config merges)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "adapters:\n  a: /x/a\n  b: /x/b\n" in out
    assert "port: 9100" in out and "max_queue: 5" in out and "host: 127.0.0.1" in out
    assert "api_key: '***'" in out and ": k\n" not in out  # the key is never echoed


def test_an_api_key_override_is_used(capsys):
    """`api_key=KEY` (a key=value override, as every other key takes) was dropped without a word: the server ran
    with no key at all while its user believed it protected."""
    assert main(["serve", "--base", "tiny:llama", "api_key=s3cret", "--dry-run"]) == 0
    assert "api_key: '***'" in capsys.readouterr().out
    assert main(["serve", "--base", "tiny:llama", "--api-key", "123", "--dry-run"]) == 0  # a flag's key stays text
    assert "api_key: '***'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--base", "tiny:llama", "--adapter", "noequals"], "--adapter 'noequals': expected NAME=DIR"),
    (["--base", "tiny:llama", "--engine", "vllm", "--adapter", "r=/no/such"], "adapter 'r': folder /no/such does not exist"),
    (["--base", "tiny:llama", "max_batch_rows=0"], "max_batch_rows: must be >= 1"),
    (["--base", "tiny:nope"], "unknown tiny architecture"),
    (["--base", "/no/such/folder"], "/no/such/folder does not exist"),
    # before: accepted, and a request without max_tokens got max_new_tokens (the engine clamped it without a word)
    (["--base", "tiny:llama", "--default-max-tokens", "100", "--max-new-tokens", "50"],
     "default_max_tokens: 100 exceeds max_new_tokens (50)"),
    # before: the base was built and loaded, then torch's own error as an 'unexpected error' (exit 1)
    (["--base", "tiny:llama", "--device", "banana"], "device: 'banana' is not a torch device"),
    (["--base", "tiny:llama", "--device", "cuda:99"], "device: 'cuda:99', but this torch sees"),
    # before: the model was loaded and the engine started, then an 'unexpected error: FileExistsError' (exit 1)
    (["--base", "tiny:llama", "--output-dir", "/dev/null"], "output_dir: /dev/null is a file, not a folder"),
    # before: accepted (e.g. --api-key "$KEY" with KEY unset): 'Bearer ' was the key, and no warning off localhost
    (["--base", "tiny:llama", "--api-key", "", "--dry-run"], "api_key: empty"),
    (["--base", "tiny:llama", "--dry-run", "api_key=' '"], "api_key: empty"),
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


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("case, message", [
    ("lora-no-weights", "adapter 'a': {folder} has no adapter_model.safetensors (the LoRA weights)"),
    ("lora-truncated", "adapter 'a': {folder}/adapter_model.safetensors cannot be read"),
    ("reft-truncated", "adapter 'a': {folder}/interventions.safetensors cannot be read"),
    ("base-truncated", "base: {folder}/model.safetensors cannot be read"),
    ("lora-json", "{folder}/adapter_config.json (peft's LoRA config): not valid JSON at line 1, column 9 (Expecting "
                  "property name"),
    ("reft-json", "{folder}/reft_config.json (the ReFT interventions and positions): holds a JSON list, not an "
                  "object"),
    ("base-json", "{folder}/generation_config.json (a file of the base model): not valid JSON at line 1"),
])
def test_a_folder_the_server_cannot_load_is_refused_before_loading(serve_dirs, tmp_path, monkeypatch, capsys, case,
                                                                   message):
    """Before: the base model was loaded, then peft / safetensors failed: a LoRA folder without its weights gave
    huggingface_hub's "Repo id must be in the form 'repo_name'..." and a truncated weights file an "unexpected error:
    SafetensorError" (exit 1); a damaged adapter_config.json json's bare "Expecting property name ..." after the base
    had loaded, a damaged generation_config.json was served without its end tokens (row T27) (both checked to fail
    before their fixes). Now one line naming the file, before any model is loaded."""
    import alignkit.serve.stack as stack_module

    kind = case.split("-")[0]
    src = serve_dirs["base"] if kind == "base" else serve_dirs["adapters"]["terse" if kind == "lora" else "polite"]
    folder = tmp_path / case
    shutil.copytree(src, folder)
    weights = folder / {"lora": "adapter_model", "reft": "interventions", "base": "model"}[kind]
    weights = weights.with_suffix(".safetensors")
    if case == "lora-no-weights":
        weights.unlink()
    elif case.endswith("-json"):  # json's bare "Expecting property name ..." after the base had loaded, no file named
        name, text = {"lora": ("adapter_config.json", '{"r": 4,'), "reft": ("reft_config.json", "[1]"),
                      "base": ("generation_config.json", '{"eos_token_id": [2,')}[kind]  # base: served, no end ids
        (folder / name).write_text(text)
    else:
        _truncate(weights)
    base, adapter = (folder, serve_dirs["adapters"]["terse"]) if kind == "base" else (serve_dirs["base"], folder)
    monkeypatch.setattr(stack_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["serve", "--base", str(base), "--adapter", f"a={adapter}", "--port", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit serve")]
    assert len(err) == 1 and message.format(folder=folder) in err[0], err


def test_a_port_in_use_is_refused_before_loading_or_writing(serve_dirs, tmp_path, monkeypatch, capsys):
    """Before: the model was loaded, 'alignkit serve: ... on http://...' printed, the --output-dir got a start and a
    stop row and its plots/ were drawn over the previous server's, then uvicorn's "address already in use" and exit 3
    (SystemExit). Now the port is bound first: one line naming it, nothing loaded, the output folder untouched."""
    import alignkit.serve.stack as stack_module

    out = tmp_path / "served"
    (out / "plots").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"event": "start"}\n')
    (out / "plots" / "serve-load.png").write_bytes(b"previous plot")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(stack_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--base", str(serve_dirs["base"]), "--port", str(port), "--output-dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit serve")]
    assert code == 2 and len(err) == 1 and f"port: cannot listen on 127.0.0.1:{port}" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_log_every_without_output_dir_warns(serve_dirs, caplog, monkeypatch):
    """log_every spaces the metrics rows written to output_dir; set without output_dir it was read by nothing, without
    a word. Now a warning naming both (the server still starts: a config may set it for runs with output_dir)."""
    import alignkit.cli.serve as serve_cli

    def stop_here(host, port):  # the warning comes before the port is bound: nothing is served
        raise serve_cli.ConfigError("stopped before binding")

    monkeypatch.setattr(serve_cli, "bind", stop_here)
    with caplog.at_level("WARNING"):
        assert main(["serve", "--base", str(serve_dirs["base"]), "log_every=5"]) == 2
    assert any("log_every=5 is read only with output_dir" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("base_name, adapter_name", [(None, "tiny-base"), ("x", "x"), (None, "tiny-llama")])
def test_an_adapter_named_like_the_base_is_refused_by_the_dry_run(serve_dirs, capsys, base_name, adapter_name):
    """`serve --dry-run --adapter tiny-base=...` on a base folder named tiny-base said 'OK', then the real start
    failed in load_stack ('is the base model's served name'). Now the settings check refuses it, in one line naming
    the adapter and the fix, for the folder's name, a --base-name, and tiny:<arch>'s name (tiny-<arch>)."""
    base = "tiny:llama" if adapter_name == "tiny-llama" else str(serve_dirs["base"])
    argv = ["serve", "--base", base, "--adapter", f"{adapter_name}={serve_dirs['adapters']['polite']}", "--dry-run"]
    if base_name is not None:
        argv += ["--base-name", base_name]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit serve")]
    assert len(err) == 1 and f"adapter name {adapter_name!r} is the base model's served name; pick another name " \
        "(or set the base's name with --base-name)" in err[0], err
    assert main(argv[:4] + [f"polite={serve_dirs['adapters']['polite']}", "--dry-run"]) == 0  # another name: OK
