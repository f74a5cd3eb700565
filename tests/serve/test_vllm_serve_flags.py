"""`alignkit vllm-serve`'s flags and its port. Before: a --max-lora-rank vLLM does not take was a plain ValueError
(the CLI's "unexpected error ... please report it"), a --dtype, --max-model-len or --gpu-memory-utilization vLLM
refuses failed only as its engine started (after the workdir was taken), a --port outside 0..65535 or one already in
use failed after the engine started, with the engine left open: its workdir lock and temporary folder went only with
the process. Now each flag is one line naming it, its value and what vLLM takes, from `EngineSettings` (before vLLM
is even looked for), and a port it cannot listen on closes the engine and says so in one line. vLLM is not needed:
`vllm.LLM` is a stand-in."""

from __future__ import annotations

import socket
import sys
import types

import pytest

from alignkit.settings import ConfigError

RANKS = "8, 16, 32, 64, 128, 256, 320, 512"  # vLLM's MaxLoRARanks but 1 (vllm/config/lora.py)
FLAGS = [
    (["--enable-lora", "--max-lora-rank", "12"],
     f"vllm-serve --max-lora-rank 12: vLLM accepts {RANKS}; give one of them, at least the policy's LoRA rank"),
    (["--dtype", "fp32"], "vllm-serve --dtype fp32: vLLM accepts auto, half, float16, bfloat16, float, float32"),
    (["--max-model-len", "0"], "vllm-serve --max-model-len 0: give a number of tokens (prompt + response) of 1 or "
                               "more, or leave it out for the model's context"),
    (["--gpu-memory-utilization", "1.5"], "vllm-serve --gpu-memory-utilization 1.5: give a share of GPU memory above "
                                          "0 and at most 1 (e.g. 0.9)"),
]


@pytest.mark.parametrize("flags, line", FLAGS, ids=["rank", "dtype", "max-model-len", "gpu-memory"])
def test_a_flag_vllm_refuses_is_one_line_naming_it(tiny_dir, capsys, flags, line):
    from alignkit.cli import main

    model = str(tiny_dir("llama"))
    capsys.readouterr()  # (the fixture's progress bar)
    assert main(["vllm-serve", "--model", model, *flags]) == 2
    assert capsys.readouterr().err == f"alignkit vllm-serve: error: {line}\n"


def test_the_engine_checks_settings_changed_after_they_were_made(tiny_dir, tmp_path):
    from alignkit.serve.vllm_serve import EngineSettings, VllmServeEngine

    settings = EngineSettings(model=str(tiny_dir("llama")), max_lora_rank=12)  # no LoRA: the rank is not read
    assert EngineSettings(model=str(tiny_dir("llama")), dtype="Float32").dtype == "Float32"  # vLLM lowers the case
    settings.enable_lora = True
    with pytest.raises(ConfigError, match=f"^vllm-serve --max-lora-rank 12: vLLM accepts {RANKS}; "):
        VllmServeEngine(settings, tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.fixture
def stand_in_engine(monkeypatch):
    """`vllm.LLM` as VllmServeEngine reads it, counting the engines shut down."""
    from alignkit.serve import vllm_serve

    closed = []

    class LLM:
        def __init__(self, **kw):
            config = types.SimpleNamespace(max_model_len=64, dtype="torch.float32")
            self.llm_engine = types.SimpleNamespace(model_config=config, engine_core=types.SimpleNamespace(
                shutdown=lambda: closed.append(1)))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    monkeypatch.setattr(vllm_serve, "check_head_size", lambda *a, **k: None)
    return closed


def test_a_port_in_use_closes_the_engine_and_says_so(tiny_dir, tmp_path, stand_in_engine):
    from alignkit.serve.vllm_serve import EngineSettings, claim_workdir, serve

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError) as e:
            serve(EngineSettings(model=str(tiny_dir("llama"))), port=port, workdir=tmp_path / "w")
    finally:
        taken.close()
    assert str(e.value) == (f"vllm-serve --host 127.0.0.1 --port {port}: cannot listen there (Address already in "
                            "use); give another --port (0: a free one) or stop what uses it")
    assert stand_in_engine == [1]  # the engine was shut down
    claim_workdir(tmp_path / "w").close()  # its lock was let go (a held flock refuses a second claim)


def test_a_port_out_of_range_is_refused_before_the_engine(tiny_dir, tmp_path, stand_in_engine):
    from alignkit.serve.vllm_serve import EngineSettings, serve

    with pytest.raises(ConfigError) as e:
        serve(EngineSettings(model=str(tiny_dir("llama"))), port=70000, workdir=tmp_path / "w")
    assert str(e.value) == "vllm-serve --port 70000: give a port from 0 (a free one) to 65535"
    assert not (tmp_path / "w").exists() and stand_in_engine == []
