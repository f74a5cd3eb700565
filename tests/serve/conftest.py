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
from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter, save_adapter
from tests.adapters.table import ROWS
from alignkit.models.loading import load_model
from alignkit.models.tiny import save_tiny


def make_adapter(base, folder, kind: str, seed: int, positions: str = "f1+l2", layers=(0, 1),
                 share_weights: bool = True) -> None:
    torch.manual_seed(seed)
    model = load_model(base)
    reft = ReftSettings(config=ReftConfig.uniform(list(layers), "loreft", low_rank_dimension=2).to_dict(),
                        positions=positions, share_weights=share_weights) if ROWS[kind].reft else None
    wrapped = apply_adapter(model, AdapterConfig(kind=kind, lora=LoraSettings(r=4) if ROWS[kind].lora else LoraSettings(),
                                                 reft=reft))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            elif "interventions" in n and p.dim() == 2 and ROWS[kind].reft:
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


def reference_model(serve_dirs, name):
    """(model, adapter config) for served name `name`, loaded alone with alignkit's `load_adapter`."""
    from alignkit.adapters import load_adapter, read_adapter_config

    model = load_model(serve_dirs["base"]).eval()
    if name == "base":
        return model, None
    folder = serve_dirs["adapters"][name]
    return load_adapter(model, folder).eval(), read_adapter_config(folder)


def reference_greedy(model, cfg, prompt, max_tokens, end_ids):
    """Greedy decoding by re-running the whole sequence each step (no cache, no padding, batch of one).
    Returns [(token, runner-up token, top-1 minus top-2 logit)] per step."""
    from alignkit.data.positions import locations_from_spans

    locs = None
    if cfg is not None and "reft" in cfg.kind:
        locs = locations_from_spans(cfg.reft.positions, torch.tensor([0]), torch.tensor([len(prompt)]),
                                    model.num_interventions, cfg.reft.share_weights)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            kw = {"intervention_locations": locs} if locs is not None else {}
            logits = model(input_ids=torch.tensor([ids]), use_cache=False, **kw).logits[0, -1]
            top = logits.topk(2)
            t = int(top.indices[0])
            out.append((t, int(top.indices[1]), float(top.values[0] - top.values[1])))
            ids.append(t)
            if t in end_ids:
                break
    return out


NEAR_TIE = 1e-4


def greedy_matches(got, ref, n, margin=NEAR_TIE):
    """(matches, stopped at a near-tie): `got` equals the reference's first n greedy tokens, except that at a
    step whose top-2 logits are within `margin` either of the two is accepted and the comparison stops."""
    for i, (t, t2, gap) in enumerate(ref[:n]):
        if i >= len(got):
            return False, False
        if gap < margin:
            return got[i] in (t, t2), True
        if got[i] != t:
            return False, False
    return len(got) == len(ref[:n]), False
