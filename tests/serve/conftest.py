"""Served adapters built locally: a tiny Llama base and ReFT / LoRA / ReFT+LoRA adapters saved to folders.

LoRA's B matrices start at zero (the adapter would be the identity), so they are filled with random
values before saving: every adapter really changes the model's outputs (checked in test_engine)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

from alignkit.interventions import ReftConfig
from alignkit.models.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter, save_adapter
from alignkit.models.loading import load_model
from alignkit.models.tiny import save_tiny


def make_adapter(base, folder, kind: str, seed: int, positions: str = "f1+l2") -> None:
    torch.manual_seed(seed)
    model = load_model(base)
    reft = ReftSettings(config=ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2).to_dict(),
                        positions=positions) if "reft" in kind else None
    wrapped = apply_adapter(model, AdapterConfig(kind=kind, lora=LoraSettings(r=4), reft=reft))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            elif "interventions" in n and p.dim() == 2 and "reft" in kind:
                p.add_(torch.randn_like(p) * 0.3)
    save_adapter(wrapped, folder)


@pytest.fixture(scope="session")
def serve_dirs(tmp_path_factory):
    """{"base": folder, "adapters": {name: folder}}: base + reft, lora, reft+lora adapters."""
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny(root / "tiny-base", "llama", hidden_size=64, num_layers=2)
    adapters = {}
    for i, (name, kind) in enumerate([("polite", "reft"), ("terse", "lora"), ("both", "reft+lora")]):
        make_adapter(base, root / name, kind, seed=10 + i)
        adapters[name] = root / name
    return {"base": base, "adapters": adapters}


@contextlib.contextmanager
def running_server(engine, api_key=None):
    """uvicorn on 127.0.0.1 (a free port) in a thread, over `engine` (started here); yields the base URL."""
    import uvicorn

    from alignkit.serve.api import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    engine.start()
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        sock.close()


@pytest.fixture(scope="session")
def serve_stack(serve_dirs):
    from alignkit.serve.stack import load_stack

    return load_stack(serve_dirs["base"], serve_dirs["adapters"], base_name="base")
