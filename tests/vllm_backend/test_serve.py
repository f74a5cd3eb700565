"""`alignkit serve --engine vllm`: vLLM's OpenAI server, started by alignkit for a tiny Llama (head_dim 64) and
two LoRA adapters that alignkit trained and saved. Through HTTP, the greedy tokens of the base and of each
adapter equal peft / transformers greedy tokens for the same prompt; the adapters really change them.
`/v1/models` lists the base and both adapters under their served names."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from .conftest import PYTHON, run_env

PROMPTS = ["Hello there, how", "The quick brown fox", "Question: what is"]
MAX_TOKENS = 8


def make_lora(base, folder, seed: int) -> None:
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    torch.manual_seed(seed)
    wrapped = apply_adapter(load_model(base), AdapterConfig(kind="lora", lora=LoraSettings(r=4, alpha=8.0)))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:  # B starts at zero (the identity): fill it so the adapter changes the outputs
                p.normal_(0, 0.3)
    save_adapter(wrapped, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def wait_ready(proc, url: str, timeout: float = 600) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"the server was not ready after {timeout} s")


def peft_greedy(base, adapter, tok, prompt) -> list[int]:
    from peft import PeftModel

    from alignkit.models.loading import load_model

    model = load_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_vllm_server_greedy_equals_peft(tmp_path):
    from alignkit.models.loading import load_tokenizer
    from alignkit.models.tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llama", hidden_size=128, num_heads=2)  # head_dim 64
    adapters = {"alpha": tmp_path / "alpha", "beta": tmp_path / "beta"}
    for i, folder in enumerate(adapters.values()):
        make_lora(base, folder, seed=10 + i)
    tok = load_tokenizer(base)
    port = free_port()
    cmd = [PYTHON, "-m", "alignkit", "serve", "--engine", "vllm", "--base", str(base), "--base-name", "tiny",
           "--port", str(port), "--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}"]
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        models = wait_ready(proc, url)
        assert {m["id"] for m in models["data"]} == {"tiny", "alpha", "beta"}
        got, want = {}, {}
        for name, adapter in [("tiny", None), *adapters.items()]:
            for prompt in PROMPTS:
                ids = tok(prompt).input_ids
                r = post(url + "/v1/completions", {"model": name, "prompt": ids, "max_tokens": MAX_TOKENS,
                                                   "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
                got[name, prompt] = r["choices"][0]["token_ids"]
                want[name, prompt] = peft_greedy(base, adapter, tok, prompt)
        assert got == want
        for name in adapters:  # the adapters change the greedy tokens: the comparison covers the LoRA path
            assert any(want[name, p] != want["tiny", p] for p in PROMPTS), name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
