"""vLLM server mode without vLLM: the config vocabulary, the refusals, and the client against `alignkit
vllm-serve`'s own HTTP handler (`make_handler`) around a fake engine, or against servers that fail. (The real
engine: tests/vllm_backend/test_server_mode.py, `make test-vllm`.)"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from safetensors.torch import load

from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter
from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.online.vllm_client import (PROTOCOL, VllmServerClient, VllmServerError, VllmServerGenerator,
                                         full_weights_blob, lora_blob)
from alignkit.serve.vllm_serve import RequestError, make_handler, safetensors_metadata
from alignkit.settings import ConfigError

SERVER = dict(generation_backend="vllm", vllm_mode="server")
REWARD = {"type": "function", "fn": lambda p, r: float(len(r))}


class FakeEngine:
    """What `VllmServeEngine` answers, without vLLM: the policy's config, fixed tokens, pushes recorded."""

    def __init__(self, lm_config, enable_lora=True, max_lora_rank=8, fail_generate_after=None, vocab_size=None,
                 max_model_len=None):
        self.config = {k: getattr(lm_config, k, None) for k in ("model_type", "vocab_size", "hidden_size",
                                                                 "num_hidden_layers", "num_attention_heads")}
        self.config["architectures"] = list(lm_config.architectures or [])
        if vocab_size is not None:
            self.config["vocab_size"] = vocab_size
        self.enable_lora, self.max_lora_rank = enable_lora, max_lora_rank
        self.fail_generate_after = fail_generate_after
        self.max_model_len = max_model_len  # None: not in /info (as an older server)
        self.weights, self.loras, self.generated = [], [], []

    def info(self):
        return {"protocol": PROTOCOL, "model": "/fake/base", "config": self.config, "enable_lora": self.enable_lora,
                "max_lora_rank": self.max_lora_rank, "weights_version": len(self.weights),
                "lora_version": len(self.loras), **({"max_model_len": self.max_model_len} if self.max_model_len else {})}

    def generate(self, body):
        if self.fail_generate_after is not None and len(self.generated) >= self.fail_generate_after:
            raise RuntimeError("engine core died")
        self.generated.append(body)
        # sample k of every prompt: tokens 5+k, 6+k, ... (max_tokens of them)
        return {"outputs": [[{"token_ids": [5 + k + i for i in range(r["max_tokens"])], "finish_reason": "length"}
                             for k in range(r["n"])] for r in body["sampling"]]}

    def load_weights(self, blob):
        self.weights.append(blob)
        return {"weights_version": len(self.weights)}

    def load_lora(self, blob):
        safetensors_metadata(blob)
        self.loras.append(blob)
        return {"lora_version": len(self.loras)}


@pytest.fixture
def serve_engine():
    """Factory: serve an engine (FakeEngine or a plain handler class) on a free port; returns the URL."""
    servers = []

    def start(engine=None, handler=None):
        httpd = HTTPServer(("127.0.0.1", 0), handler or make_handler(engine))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed


def policy_of(tiny_dir, kind="full"):
    torch.manual_seed(0)
    return apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind=kind, lora=LoraSettings(r=4, alpha=8.0) if "lora" in kind else LoraSettings()))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- vocabulary

def test_config_vocabulary():
    with pytest.raises(ValueError, match="vllm_mode must be 'colocate' or 'server', got 'remote'"):
        GRPOConfig(generation_backend="vllm", vllm_mode="remote")
    with pytest.raises(ValueError, match=r"vllm \(max_model_len: vllm.LLM arguments\) is for vllm_mode='colocate'"):
        GRPOConfig(vllm={"max_model_len": 64}, **SERVER)
    with pytest.raises(ValueError, match="vllm_server_timeout must be > 0"):
        GRPOConfig(vllm_server_timeout=0, **SERVER)
    cfg = GRPOConfig(**SERVER)
    assert (cfg.vllm_mode, cfg.vllm_server_url, cfg.vllm_server_timeout) == ("server", "http://127.0.0.1:8000", 300.0)


def test_settings_and_help_list_the_keys():
    from alignkit.cli.helptext import keys_epilog
    from alignkit.settings import ConfigError
    from alignkit.settings.load import config_from_dict

    text = keys_epilog("grpo")
    for key in ("method.vllm_mode", "method.vllm_server_url", "method.vllm_server_timeout"):
        assert key in text
    base = {"command": "grpo", "model": {"path": "tiny:llama"}, "data": {"path": "p.jsonl"}, "annotator": {"kind": "function",
            "function": "alignkit.rewards:digit_fraction"}}
    cfg = config_from_dict({**base, "method": {"generation_backend": "vllm", "vllm_mode": "server",
                                               "vllm_server_url": "http://10.0.0.2:9000"}}, "grpo")
    tc = cfg.trainer_config()
    assert (tc.vllm_mode, tc.vllm_server_url) == ("server", "http://10.0.0.2:9000")
    with pytest.raises(ConfigError, match="method.vllm_mode"):
        config_from_dict({**base, "method": {"vllm_mode": "sideways"}}, "grpo")


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("kind", ["reft", "reft+lora"])
def test_reft_policy_is_refused_before_any_connection(tiny_dir, tokenizer, kind):
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}, positions="l1")
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind=kind, reft=reft))
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), report_to="none",
                     vllm_server_url=closed_port_url(), **SERVER)
    with pytest.raises(ValueError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], REWARD, cfg)
    assert f"this one is {kind}" in one_line(e) and "generation_backend='transformers' for ReFT" in str(e.value)


def test_several_processes_are_refused(tiny_dir, tokenizer, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    cfg = GRPOConfig(steps=1, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2),
                     report_to="none", **SERVER)
    with pytest.raises(ValueError) as e:
        GRPOTrainer(policy_of(tiny_dir), tokenizer, ["hi", "ho"], REWARD, cfg)
    assert "vllm_mode='server' (method.vllm_mode) runs in ONE process (2 here)" in one_line(e)


# ---------------------------------------------------------------------------------------------- the client's lines

def test_a_server_that_is_down_stops_with_one_line(tiny_dir, tokenizer):
    url = closed_port_url()
    with pytest.raises(VllmServerError) as e:
        VllmServerGenerator(policy_of(tiny_dir), tokenizer, url, timeout=0.3)
    msg = one_line(e)
    assert msg.startswith(f"vLLM server {url}: no answer after 0.3 s (method.vllm_server_timeout")
    assert "alignkit vllm-serve --model" in msg
    with pytest.raises(VllmServerError, match="is not an http"):
        VllmServerClient("localhost:8000")


def test_error_answers_are_one_line(serve_engine):
    class Broken(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            body = b"<html>\n<body>not the API</body>\n</html>" if self.path == "/info" else b'{"error": "x"}'
            self.send_response(200 if self.path == "/info" else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    url = serve_engine(handler=Broken)
    with pytest.raises(VllmServerError) as e:
        VllmServerClient(url).info()
    assert "GET /info answered something that is not JSON" in one_line(e) and url in str(e.value)
    with pytest.raises(VllmServerError) as e:
        VllmServerClient(url).health()
    assert one_line(e) == f"vLLM server {url}: GET /health failed with HTTP 503: x"


def test_another_model_is_refused(tiny_dir, tokenizer, serve_engine):
    policy = policy_of(tiny_dir)
    url = serve_engine(FakeEngine(policy.config, vocab_size=999))
    with pytest.raises(VllmServerError) as e:
        VllmServerGenerator(policy, tokenizer, url, timeout=5)
    msg = one_line(e)
    assert f"vocab_size 999 (policy {policy.config.vocab_size})" in msg and "alignkit vllm-serve --model" in msg


def test_a_server_folder_holding_other_weights_than_the_lora_policys_base_is_refused(tiny_dir, tokenizer,
                                                                                     serve_engine, tmp_path, caplog):
    """Server mode compared architecture and sizes only: alignkit vllm-serve --model on a finetuned copy of the base
    (an SFT run's model under a LoRA trained on the base) sampled through other weights, without a word. The
    server now names its folder (/info model_path); on this machine its weights are compared as the colocated
    engine's folder (one line naming the server, the folder and what differs); elsewhere, or from an older server,
    a warning that they were not compared. The base folder itself passes without one."""
    base = tiny_dir("llama")
    finetuned = tmp_path / "sft"
    model = load_model(base)
    with torch.no_grad():  # what SFT steps do to the final norm
        model.model.norm.weight.add_(1e-3)
    model.save_pretrained(finetuned)

    class Serving(FakeEngine):
        def __init__(self, config, path):
            super().__init__(config)
            self.path = path

        def info(self):
            return {**super().info(), **({"model_path": str(self.path)} if self.path else {})}

    def build(path):
        policy = policy_of(tiny_dir, "lora")
        url = serve_engine(Serving(policy.config, path))
        caplog.clear()
        with caplog.at_level("WARNING", logger="alignkit"):
            VllmServerGenerator(policy, tokenizer, url, timeout=5)
        return url, [r.getMessage() for r in caplog.records if "not compared" in r.getMessage()]

    with pytest.raises(ConfigError) as e:
        build(finetuned)
    msg = one_line(e)
    assert msg.startswith("vLLM server http://127.0.0.1:") and f" serves {finetuned}, which is not the model the " \
        f"policy's adapter is trained on ({base}): its final norm weights differ" in msg, msg
    assert msg.endswith(f"restart alignkit vllm-serve with --model set to the policy's base folder ({base})"), msg
    assert build(base)[1] == []
    url, warned = build(None)  # an older server / a folder on another machine
    assert len(warned) == 1 and warned[0].startswith(f"vLLM server {url}: its model folder (/fake/base) is not on "
                                                     "this machine, so its weights were not compared"), warned


@pytest.mark.parametrize("enable_lora, rank, why", [(False, 0, "restart it with alignkit vllm-serve ... --enable-lora"),
                                                    (True, 2, "max LoRA rank 2 < the policy's rank 4")])
def test_lora_needs_a_lora_server(tiny_dir, tokenizer, serve_engine, enable_lora, rank, why):
    policy = policy_of(tiny_dir, "lora")
    url = serve_engine(FakeEngine(policy.config, enable_lora=enable_lora, max_lora_rank=rank))
    with pytest.raises(VllmServerError) as e:
        VllmServerGenerator(policy, tokenizer, url, timeout=5)
    assert why in one_line(e)


def test_handler_answers_engine_errors_as_one_line_json(serve_engine, tiny_dir):
    class Refusing(FakeEngine):
        def load_weights(self, blob):
            raise RequestError(400, "the body is not a readable safetensors blob: bad")

    url = serve_engine(Refusing(policy_of(tiny_dir).config))
    client = VllmServerClient(url)
    with pytest.raises(VllmServerError) as e:
        client.push_weights(b"12345678")
    assert one_line(e) == f"vLLM server {url}: POST /weights failed with HTTP 400: the body is not a readable " \
                          "safetensors blob: bad"
    with pytest.raises(VllmServerError, match="HTTP 404: no POST /nowhere"):
        client._call("POST", "/nowhere", b"{}")
    with pytest.raises(VllmServerError, match=r"HTTP 400: the body is not a safetensors blob \(its header is not JSON"):
        # the server's safetensors check (the fake engine's load_lora calls it): 8 bytes, then no JSON
        client.push_lora(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    # /generate is strict: a key the protocol does not have, or a lora that is not a JSON boolean (the string
    # "false" was read with bool(): true), is a 400 naming it, and the engine is not asked
    engine = Refusing(policy_of(tiny_dir).config)
    url = serve_engine(engine)
    client = VllmServerClient(url)
    body = {"prompt_token_ids": [[1, 2]], "sampling": [{"n": 1, "max_tokens": 2}]}
    for extra, why in (({"lora": "false"}, "/generate: lora is 'false'; it must be a JSON boolean (true / false)"),
                       ({"lora": 0}, "/generate: lora is 0; it must be a JSON boolean"),
                       ({"loras": True, "adapter": "x"}, "/generate: unknown key(s) 'adapter', 'loras'; protocol 1 "
                                                         "reads prompt_token_ids, sampling, lora")):
        with pytest.raises(VllmServerError, match="HTTP 400: " + re.escape(why)):
            client._call("POST", "/generate", json.dumps({**body, **extra}).encode())
    assert engine.generated == []
    assert client._call("POST", "/generate", json.dumps({**body, "lora": False}).encode())["outputs"]


# ---------------------------------------------------------------------------------------------- what travels

def test_full_weights_blob_is_the_state_dict(tiny_dir):
    policy = policy_of(tiny_dir)
    got = load(full_weights_blob(policy))
    want = policy.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_lora_blob_carries_the_adapter_and_its_config(tiny_dir):
    policy = policy_of(tiny_dir, "lora")
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    blob = lora_blob(policy)
    meta = safetensors_metadata(blob)
    cfg = json.loads(meta["adapter_config"])
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    tensors = load(blob)
    b = [t for n, t in tensors.items() if "lora_B" in n]
    assert b and all(torch.all(t == 0.5) for t in b)


def test_training_pushes_before_every_generation_and_stops_on_a_failure(tiny_dir, tokenizer, serve_engine):
    policy = policy_of(tiny_dir)
    engine = FakeEngine(policy.config, fail_generate_after=2)
    url = serve_engine(engine)
    cfg = GRPOConfig(steps=3, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=3, seed=7),
                     learning_rate=1e-3, report_to="none", progress_bar=False, vllm_server_url=url, **SERVER)
    trainer = GRPOTrainer(policy, tokenizer, ["hi", "ho"], REWARD, cfg)
    with pytest.raises(VllmServerError) as e:
        trainer.train()
    assert one_line(e) == f"vLLM server {url}: POST /generate failed with HTTP 500: RuntimeError: engine core died"
    assert len(engine.generated) == 2 and len(engine.weights) == 3  # a push before each of the 3 generations
    first, second = (load(b) for b in engine.weights[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the step changed the pushed weights
    req = engine.generated[0]
    assert req["lora"] is False and len(req["prompt_token_ids"]) == 2
    s0, s1 = req["sampling"]
    assert s0["n"] == 2 and s0["max_tokens"] == 3 and s0["temperature"] == 1.0 and s1["seed"] - s0["seed"] == 2


def test_a_server_whose_max_model_len_cannot_hold_prompt_and_response_is_refused(tiny_dir, tokenizer, serve_engine):
    """The server's max_model_len (its /info) below the longest prompt + sampling.max_new_tokens: vLLM would have cut
    the responses short (finish 'length'). Now the generation stops in one line naming the server's setting before
    any request; a server whose limit fits generates as before. Prompt length from the tokenizer (plain text)."""
    policy = policy_of(tiny_dir)
    n = len(tokenizer("hello there")["input_ids"])
    cfg = SamplingConfig(num_samples=1, max_new_tokens=4, do_sample=False)
    for limit, fits in ((n + 3, False), (n + 4, True)):
        engine = FakeEngine(policy.config, max_model_len=limit)
        gen = VllmServerGenerator(policy, tokenizer, serve_engine(engine), timeout=5)
        if fits:
            assert [len(s.response_ids) for s in gen.generate(["hello there"], cfg, formatter="plain")] == [4]
            continue
        with pytest.raises(ValueError) as e:
            gen.generate(["hello there"], cfg, formatter="plain")
        assert one_line(e).startswith(f"the vLLM server's max_model_len (alignkit vllm-serve --max-model-len) {limit} "
                                      f"is shorter than prompt 'prompt[0]' ({n} tokens, the longest) + "
                                      f"sampling.max_new_tokens (4) = {n + 4}")
        assert engine.generated == []


def test_cli_prints_one_line_for_a_down_server(tmp_path, capsys):
    from alignkit.cli import main

    url = closed_port_url()
    config = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"
    code = main(["-q", "grpo", "--config", str(config), f"output_dir={tmp_path / 'run'}",
                 "train.max_steps=1", "adapter.kind=full", "adapter.lora=null", "method.generation_backend=vllm",
                 "method.vllm_mode=server", f"method.vllm_server_url={url}", "method.vllm_server_timeout=0.3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"alignkit grpo: error: vLLM server {url}: no answer after"), err
    assert not (tmp_path / "run").exists()  # contacted before the run folder (config.yaml, base_model/) is written


def test_cli_checks_the_servers_max_model_len_before_the_run_folder(tiny_dir, serve_engine, tmp_path, capsys):
    """The CLI's first contact with the server (before the run folder) also checks every prompt + max_new_tokens
    against the server's max_model_len: an 8-token limit cannot hold any prompt + sampling.max_new_tokens (8)."""
    from alignkit.cli import main

    url = serve_engine(FakeEngine(policy_of(tiny_dir).config, max_model_len=8))
    config = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"
    code = main(["-q", "grpo", "--config", str(config), f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 "method.generation_backend=vllm", "method.vllm_mode=server", f"method.vllm_server_url={url}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("alignkit grpo: error: the vLLM server's max_model_len (alignkit vllm-serve "
                                            "--max-model-len) 8 is shorter than prompt "), err
    assert not (tmp_path / "run").exists()
    url = serve_engine(FakeEngine(policy_of(tiny_dir).config, max_model_len=4096))  # fits: the run trains
    assert main(["-q", "grpo", "--config", str(config), f"output_dir={tmp_path / 'ok'}", "train.max_steps=1",
                 "method.generation_backend=vllm", "method.vllm_mode=server", f"method.vllm_server_url={url}"]) == 0
    assert (tmp_path / "ok" / "model").is_dir()


def test_cli_contacts_the_server_once(tiny_dir, serve_engine, tmp_path, caplog):
    """The CLI checked the server before the run folder (a VllmServerGenerator) and the trainer built another at its
    first step: /info asked and checked twice, and a remote server's "weights were not compared" warning logged twice.
    Now the trainer samples through the CLI's checked client: one /info, one warning, the run trains as before (a
    push before each of the 2 generations)."""
    from alignkit.cli import main

    class Counting(FakeEngine):
        asked = 0

        def info(self):
            Counting.asked += 1
            return super().info()

    engine = Counting(policy_of(tiny_dir).config, max_model_len=4096)
    url = serve_engine(engine)
    config = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"  # a LoRA policy: its base is checked
    assert main(["-q", "grpo", "--config", str(config), f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "method.generation_backend=vllm", "method.vllm_mode=server", f"method.vllm_server_url={url}"]) == 0
    warned = [r.getMessage() for r in caplog.records if "weights were not compared" in r.getMessage()]
    assert Counting.asked == 1 and len(warned) == 1, (Counting.asked, warned)
    assert len(engine.loras) == 2 and len(engine.generated) == 2 and (tmp_path / "run" / "model").is_dir()


def test_api_key_is_required_when_set(tiny_dir, serve_engine, monkeypatch):
    from alignkit.online.vllm_client import API_KEY_ENV

    url = serve_engine(handler=make_handler(FakeEngine(policy_of(tiny_dir).config), api_key="s3cret"))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    client = VllmServerClient(url)
    assert client.health() == {"status": "ok"}  # open: a load balancer may probe it
    for call in (client.info, lambda: client.push_weights(b"x" * 16)):
        with pytest.raises(VllmServerError) as e:
            call()
        assert f"HTTP 401: missing or wrong API key: set {API_KEY_ENV}" in one_line(e)
    monkeypatch.setenv(API_KEY_ENV, "wrong")
    with pytest.raises(VllmServerError, match="HTTP 401"):
        client.info()
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    assert client.info()["protocol"] == PROTOCOL and client.push_weights(b"x" * 16) == {"weights_version": 1}


def test_vllm_serve_help_imports_no_torch_and_needs_vllm(capsys):
    import importlib.util
    import subprocess
    import sys

    code = ("import sys\nfrom alignkit.cli import main\ntry:\n    main(['vllm-serve', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint('HEAVY', sorted(m for m in ('torch', 'transformers', 'vllm') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "HEAVY []" in out.stdout and "--enable-lora" in out.stdout, out.stderr[-500:]
    if importlib.util.find_spec("vllm") is None:  # alignkit's own .venv: one line, exit 2
        from alignkit.cli import main

        assert main(["vllm-serve", "--model", "nowhere"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("alignkit vllm-serve: error: vllm-serve needs vLLM installed in this Python") and "\n" not in err


def test_the_server_and_the_colocated_engine_stop_at_the_same_end_tokens(tiny_dir, tokenizer, serve_engine,
                                                                         monkeypatch):
    """Server mode's end tokens against the colocated engine's (`end_token_ids`: the folder's EOS list, the
    tokenizer's, and for chat-template prompts the turn end <|im_end|>): the stop_token_ids that reach vLLM's
    SamplingParams, through the client, the HTTP handler and `VllmServeEngine.generate`, are the colocated
    engine's, the turn end among them for a conversation and not for plain text. (vLLM itself: make test-vllm.)"""
    from alignkit.online import vllm_generation
    from alignkit.online.vllm_generation import VllmGenerator
    from alignkit.serve import vllm_serve
    from alignkit.serve.vllm_serve import VllmServeEngine

    class LLM:  # vllm.LLM's generate: records what it was asked, answers one end token per sample
        def __init__(self):
            self.params = []

        def generate(self, prompts, params, use_tqdm=False, lora_request=None):
            self.params.append(params)
            out = [type("C", (), {"token_ids": [tokenizer.eos_token_id], "finish_reason": "stop"})()]
            return [type("O", (), {"outputs": out * p["n"]})() for p in params]

    for module in (vllm_generation, vllm_serve):  # no vLLM here: SamplingParams stands as the request itself
        monkeypatch.setattr(module, "sampling_params", dict)
    policy = policy_of(tiny_dir)
    eot = tokenizer("Hello")["input_ids"][-1]
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, eot]  # a Llama-3-style folder's list
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    served = VllmServeEngine.__new__(VllmServeEngine)
    served.config, served.lora_request, served.llm = {"vocab_size": policy.config.vocab_size}, None, LLM()
    served.info, served.weights_version, served.lora_version = FakeEngine(policy.config).info, 0, 0
    server = VllmServerGenerator(policy, tokenizer, serve_engine(served))
    colocated = VllmGenerator.__new__(VllmGenerator)
    colocated.llm, colocated.tokenizer, colocated.lora_request, colocated.max_model_len = LLM(), tokenizer, None, None
    cfg = SamplingConfig(num_samples=2, max_new_tokens=3, seed=1)
    for prompt, turn_end in (([{"role": "user", "content": "Hi"}], True), ("Hi", False)):
        for gen in (server, colocated):
            (s, _) = gen.generate([prompt], cfg, eos_source=policy)
            assert s.finish_reason == "eos"
        (asked,), (local,) = served.llm.params[-1], colocated.llm.params[-1]
        assert asked["stop_token_ids"] == local["stop_token_ids"]
        assert set(asked["stop_token_ids"]) == {tokenizer.eos_token_id, eot} | ({im_end} if turn_end else set())
