"""`alignkit serve --engine vllm` without vLLM: which adapters are refused (one line each), what alignkit writes
for vLLM's LoRA loader, and the server's command line. The served tokens themselves are checked against peft
in tests/vllm_backend/ (`make test-vllm`, in vLLM's own environment)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.serve.vllm_server import command, prepare
from alignkit.settings import ConfigError

from .conftest import make_adapter


def stub_vllm_start(monkeypatch, vs) -> list:
    """`vllm_server` with vLLM's own steps stubbed out (no vLLM needed): its server command a no-op process; the
    list returned gets the max_model_len of each start."""
    import sys

    monkeypatch.setattr(vs, "require_vllm", lambda: None)
    monkeypatch.setattr(vs, "check_head_size", lambda *a: None)
    monkeypatch.setattr(vs, "prepare", lambda base, adapters, base_name, workdir: None)
    started = []
    monkeypatch.setattr(vs, "command", lambda plan, host, port, dtype, max_model_len=None:
                        started.append(max_model_len) or [sys.executable, "-c", "pass"])
    return started


def test_reft_adapters_are_refused_in_one_line_naming_the_adapter(serve_dirs, tmp_path):
    for name in ("polite", "both"):  # reft and reft+lora
        with pytest.raises(ConfigError) as e:
            prepare(serve_dirs["base"], {name: serve_dirs["adapters"][name]}, "base", tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and f"adapter {name!r}" in msg and "ReFT stays on alignkit's engine" in msg


def test_cli_refuses_reft_before_building_anything(serve_dirs, capsys):
    assert main(["serve", "--engine", "vllm", "--base", str(serve_dirs["base"]),
                 "--adapter", f"p={serve_dirs['adapters']['polite']}"]) == 2
    err = capsys.readouterr().err
    assert "adapter 'p'" in err and "ReFT stays on alignkit's engine" in err


def test_dora_is_refused(serve_dirs, tmp_path):
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    save_adapter(apply_adapter(load_model(serve_dirs["base"]),
                               AdapterConfig(kind="lora", lora=LoraSettings(r=4, use_dora=True))), tmp_path / "d")
    with pytest.raises(ConfigError, match="adapter 'd' .* uses DoRA"):
        prepare(serve_dirs["base"], {"d": tmp_path / "d"}, "base", tmp_path / "w")


def test_non_finite_lora_weights_are_refused_before_any_folder_is_written(serve_dirs, tmp_path):
    """vLLM would serve a diverged adapter's NaN rows without a word; the plan refuses it as load_adapter does,
    naming the adapter, its weights file and the tensor, and writes no vLLM folder for the good adapter either."""
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(serve_dirs["adapters"]["terse"], bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(weights)[1]
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ConfigError) as e:
        prepare(serve_dirs["base"], {"terse": serve_dirs["adapters"]["terse"], "bad": bad}, "base", tmp_path / "w")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"adapter 'bad': {bad / 'adapter_model.safetensors'}: adapter weight "
                                               f"{key!r} holds 1 non-finite value(s)")
    assert not (tmp_path / "w").exists()


def test_lora_folders_and_command(serve_dirs, tmp_path):
    second = tmp_path / "second"
    make_adapter(serve_dirs["base"], second, "lora", seed=3)
    adapters = {"terse": serve_dirs["adapters"]["terse"], "org/second": second}
    plan = prepare(serve_dirs["base"], adapters, "tiny", tmp_path / "w")
    assert plan.model == str(serve_dirs["base"].resolve()) and plan.max_lora_rank == 4
    assert set(plan.loras) == {"terse", "org/second"}
    for name, folder in adapters.items():
        out = plan.loras[name]
        cfg = json.loads((tmp_path / "w" / name.replace("/", "_") / "adapter_config.json").read_text())
        assert out.startswith(str(tmp_path / "w")) and cfg["base_model_name_or_path"] == plan.model
        assert cfg["r"] == 4 and cfg["target_modules"] == json.loads((folder / "adapter_config.json").read_text())[
            "target_modules"]
        got, want = load_file(f"{out}/adapter_model.safetensors"), load_file(str(folder / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    cmd = command(plan, "127.0.0.1", 8123, "float32", max_model_len=300)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"  # vLLM's smallest accepted rank >= 4
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--lora-modules") + 1:] == [f"terse={plan.loras['terse']}",
                                                     f"org/second={plan.loras['org/second']}"]
    assert "--api-key" not in cmd  # the key travels in VLLM_API_KEY, not on the command line


def test_a_base_whose_head_size_vllm_lacks_is_refused_before_vllm_starts(serve_dirs, monkeypatch):
    """serve --engine vllm and vllm-serve on a base with head_dim 16 (the tiny default: hidden 64 / 4 heads): vLLM's
    CPU build started its server / engine, said it was ready, and failed every generation ('Unsupported CPU
    attention configuration: head_dim=16'). Now one line before vLLM's server or engine starts (vLLM's own answer,
    `attention_head_sizes`, is pinned in tests/compat/test_vllm.py and stood in for here, where vLLM is absent)."""
    import subprocess
    import types

    import alignkit.models.vllm_support as support
    import alignkit.serve.vllm_server as vs
    from alignkit.serve.vllm_serve import EngineSettings, VllmServeEngine

    cpu = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vLLM 0.32's CPUAttentionBackend
    monkeypatch.setattr(support, "attention_head_sizes", lambda size: None if size in cpu else ("CPU_ATTN", cpu))
    monkeypatch.setattr(support, "vllm_installed", lambda: True)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("vLLM's server was started"))
    base = serve_dirs["base"]
    cfg = types.SimpleNamespace(adapters={}, max_prompt_tokens=8, max_new_tokens=8, host="127.0.0.1", port=0,
                                dtype="float32", api_key=None)
    for start, where, fix in ((lambda: vs.serve_with_vllm(cfg, str(base), "tiny"), "serve --engine vllm",
                               "serve it with --engine alignkit"),
                              (lambda: VllmServeEngine(EngineSettings(model=str(base))), "vllm-serve --model",
                               "or train with method.generation_backend=transformers")):
        with pytest.raises(ConfigError) as e:
            start()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{where}: the model in {base} has attention head size 16 ") \
            and "CPU_ATTN attention here takes 32, 64, 80, " in msg and msg.endswith(fix), msg


def test_prompt_and_completion_limits_vllm_cannot_enforce_are_a_warning_at_start(monkeypatch, caplog, tiny_dir,
                                                                                  tmp_path):
    """max_prompt_tokens / max_new_tokens reach vLLM only as their sum (--max-model-len): a longer prompt with a
    shorter completion was served without a word, where alignkit's engine refuses it. Set away from their defaults,
    a warning says so when the server starts (vLLM replaced by a child that exits at once, through the module's
    seams); at the defaults nothing is said. The sum is capped at the model's context (max_position_embeddings 64
    here): the warning quoted the uncapped sum (128) where vLLM was started with 64; it now quotes 64 and says what
    capped it. The context is vLLM's (`engine_max_model_len`, row V2) capped at alignkit's (row V16): a base with
    linear RoPE scaling, factor 2, runs 64 x 2 = 128 positions in vLLM (which multiplies max_position_embeddings by the
    factor model.rope_scaling has already applied), where alignkit's engine serves 64: vLLM is started with 64."""
    import json
    import shutil
    import types

    from alignkit.serve import vllm_server as vs

    base = tiny_dir("llama", max_positions=64)
    started = stub_vllm_start(monkeypatch, vs)

    def run(prompt, new, base=base):
        caplog.clear()
        cfg = types.SimpleNamespace(adapters={}, max_prompt_tokens=prompt, max_new_tokens=new, host="127.0.0.1",
                                    port=0, dtype="float32", api_key=None)
        with caplog.at_level("WARNING", logger="alignkit.serve.vllm_server"):
            assert vs.serve_with_vllm(cfg, str(base), "tiny", quiet=True) == 0
        return [r.getMessage() for r in caplog.records]

    assert run(40, 20) == [
        "serve --engine vllm: max_prompt_tokens 40 and max_new_tokens 20 reach vLLM only as their sum "
        "(--max-model-len 60, prompt + completion): vLLM caps neither on its own (a prompt over 40 tokens with a "
        "shorter completion is served, and so is max_tokens over 20), where engine=alignkit refuses both"]
    assert run(100, 28) == [
        "serve --engine vllm: max_prompt_tokens 100 and max_new_tokens 28 reach vLLM only as their sum "
        "(--max-model-len 64, prompt + completion; capped from their sum 128 at the model's context, "
        f"max_position_embeddings in {base / 'config.json'}): vLLM caps neither on its own (a prompt over 100 tokens "
        "with a shorter completion is served, and so is max_tokens over 28), where engine=alignkit refuses both"]
    assert run(2048, 512) == [] and started == [60, 64, 64]

    scaled = shutil.copytree(base, tmp_path / "scaled")
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    started.clear()
    assert run(40, 20, scaled) != [] and started == [60]  # within 64: not capped
    assert run(100, 20, scaled)[0].startswith(
        "serve --engine vllm: max_prompt_tokens 100 and max_new_tokens 20 reach vLLM only as their sum "
        "(--max-model-len 64, prompt + completion; capped from their sum 120 at the model's context, "
        f"max_position_embeddings 64 in {scaled / 'config.json'}, not vLLM's own 128: linear RoPE: vLLM multiplies "
        "it by the factor 2.0 again") and started == [60, 64]


def test_an_adapters_saved_tokenizer_is_checked_as_alignkits_engine_does(serve_dirs, tmp_path, caplog):
    """vLLM's LoRA folders hold no tokenizer, so vLLM tokenizes and formats chat with the base's: an adapter saved with
    a tokenizer of another vocabulary was served every prompt as ids it was not trained on, and one trained through
    another chat template its chat requests in a format it never saw, without a word, where engine=alignkit refuses
    the first at load and warns about the second (test_api.py). Now the same here: one line naming the adapter and
    the folder, before vLLM starts; a warning naming the folder for the template; the base's own tokenizer is quiet."""
    import logging
    import shutil

    from alignkit.models.loading import load_tokenizer
    from alignkit.models.tiny import build_tiny_tokenizer

    tok = load_tokenizer(serve_dirs["base"])
    same, other, foreign = tmp_path / "same", tmp_path / "other", tmp_path / "foreign"
    for folder in (same, other, foreign):
        shutil.copytree(serve_dirs["adapters"]["terse"], folder)
    tok.save_pretrained(same)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    tok.save_pretrained(other)
    build_tiny_tokenizer(["a b c d e f g " * 20, "zz yy xx"]).save_pretrained(foreign)
    with caplog.at_level(logging.WARNING):
        plan = prepare(serve_dirs["base"], {"same": same, "other": other}, "base", tmp_path / "w1")
    assert sorted(plan.loras) == ["other", "same"]
    said = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(said) == 1 and str(other) in said[0] and "vLLM formats its chat requests with the base's template" \
        in said[0], said
    with pytest.raises(ConfigError, match=r"^adapter 'foreign': the tokenizer saved with it .* has another vocabulary"):
        prepare(serve_dirs["base"], {"foreign": foreign}, "base", tmp_path / "w2")
    assert not (tmp_path / "w2").exists()


def test_an_adapter_trained_on_another_base_is_refused_as_alignkits_engine_does(serve_dirs, tmp_path):
    """alignkit's engine checks each adapter's alignkit_base.json against the base (load_stack: check_base); the vLLM
    plan did not, so a LoRA trained on another model of the same shapes (here a tiny Llama of another seed: other
    input embeddings) was served over the wrong weights, 200s without a word. Now refused in one line naming the
    adapter folder before vLLM starts (the base read from its safetensors, no model loaded); its own base passes."""
    from alignkit.models.tiny import save_tiny

    other = save_tiny(tmp_path / "other-base", "llama", hidden_size=64, num_layers=2, seed=7)
    make_adapter(other, tmp_path / "on-other", "lora", seed=3)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'on-other'}: this adapter was trained on a different base "
                                          r"model \(its input embedding weights differ"):
        prepare(serve_dirs["base"], {"x": tmp_path / "on-other"}, "base", tmp_path / "w1")
    assert sorted(prepare(other, {"x": tmp_path / "on-other"}, "base", tmp_path / "w2").loras) == ["x"]
    assert sorted(prepare(serve_dirs["base"], {"terse": serve_dirs["adapters"]["terse"]}, "base",
                          tmp_path / "w3").loras) == ["terse"]


def test_an_adapter_named_as_the_base_is_refused_as_alignkits_engine_does(serve_dirs, tmp_path):
    """alignkit's engine refuses an adapter served under the base's name (load_stack); the vLLM plan did not, and
    vLLM's server looks a request's model up among its LoRA modules first, so every request for the base was answered
    by the adapter, 200s without a word (e.g. --base runs/sft/model --adapter model=runs/dpo/model: both 'model').
    Now one line before anything is written; so is a name a client cannot send ('a=b' would also split vLLM's
    --lora-modules name=path)."""
    terse = serve_dirs["adapters"]["terse"]
    with pytest.raises(ConfigError, match=r"^adapter name 'model' is the base model's served name; pick another "
                                          r"name \(or set the base's name with --base-name\)$"):
        prepare(serve_dirs["base"], {"model": terse}, "model", tmp_path / "w1")
    with pytest.raises(ConfigError, match=r"^served model name 'a=b': use letters, digits"):
        prepare(serve_dirs["base"], {"a=b": terse}, "model", tmp_path / "w2")
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
    assert sorted(prepare(serve_dirs["base"], {"terse": terse}, "model", tmp_path / "w3").loras) == ["terse"]


def test_a_base_with_dynamic_rope_is_refused_before_vllm_starts(monkeypatch, tiny_dir, tmp_path):
    """Dynamic NTK scaling: transformers rescales the frequencies by the sequence's length past max_position_embeddings,
    vLLM uses one fixed table of max_position_embeddings rows (row V15), so `--engine vllm` served another model than
    engine=alignkit for a base saved with dynamic scaling past those positions, without a word. Now one line before
    vLLM starts; linear scaling (the same positions in both) still starts."""
    import shutil

    from alignkit.serve import vllm_server as vs

    started = stub_vllm_start(monkeypatch, vs)
    cfg = __import__("types").SimpleNamespace(adapters={}, max_prompt_tokens=8, max_new_tokens=8, host="127.0.0.1",
                                              port=0, dtype="float32", api_key=None)
    for kind in ("dynamic", "linear"):
        base = shutil.copytree(tiny_dir("llama", max_positions=64), tmp_path / kind)
        config = json.loads((base / "config.json").read_text())
        config["rope_parameters"] = {**config["rope_parameters"], "rope_type": kind, "factor": 2.0}
        (base / "config.json").write_text(json.dumps(config))
        if kind == "linear":
            assert vs.serve_with_vllm(cfg, str(base), "tiny", quiet=True) == 0 and started
            continue
        with pytest.raises(ConfigError) as e:
            vs.serve_with_vllm(cfg, str(base), "tiny", quiet=True)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(
            f"serve --engine vllm: the model in {base} has dynamic RoPE scaling (rope_parameters in "
            f"{base / 'config.json'})"), msg
        assert "--engine alignkit" in msg and not started
        from alignkit.serve.vllm_serve import EngineSettings, VllmServeEngine  # vllm-serve: before vLLM is imported

        monkeypatch.setattr("alignkit.serve.vllm_serve.check_head_size", lambda *a: None)
        with pytest.raises(ConfigError, match=rf"^vllm-serve --model: the model in {base} has dynamic RoPE scaling "):
            VllmServeEngine(EngineSettings(model=str(base)))
