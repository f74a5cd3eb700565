"""`alignkit vllm-serve --workdir` (VllmServeEngine's `workdir`) given again after a server was killed mid-push.
POST /lora writes a pushed adapter into a hidden staging folder `.lora-N.<random>.tmp` renamed into place at the
end; a SIGKILL between the two (nothing of the process runs) left that half-written folder there for good. Before:
the next server on that workdir neither removed it nor noticed a second server on the same folder. Now the server
takes the workdir with a lock (flock on `.alignkit-vllm-serve.lock`, dropped by the kernel when the process dies):
a second live server is refused in one line naming the holder's pid before its engine starts, and the next server
after a killed one removes the staging folders (that pattern only) with one log line naming them. vLLM is not
needed: `vllm.LLM` is a stand-in, and the killed server a child process stopped inside the push's first write."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

FAKE_VLLM = textwrap.dedent("""
    import sys, types
    from alignkit.serve import vllm_serve as vs

    class LLM:  # vllm.LLM as VllmServeEngine reads it
        def __init__(self, **kw):
            config = types.SimpleNamespace(max_model_len=64, dtype="torch.float32")
            self.llm_engine = types.SimpleNamespace(model_config=config)

    vs.check_head_size = lambda *a, **k: None  # (vLLM's attention backend is not asked here)
""")

CHILD = FAKE_VLLM + textwrap.dedent("""
    import time
    sys.modules["vllm"] = types.SimpleNamespace(LLM=LLM)
    model, workdir, ready = sys.argv[1:4]
    engine = vs.VllmServeEngine(vs.EngineSettings(model=model, enable_lora=True), workdir)

    def stuck(path, data):  # the push's first file: the server is killed here
        open(ready, "w").write(str(path))
        time.sleep(120)

    vs.atomic_write = stuck
    engine.write_lora("lora-1", {"r": 2}, b"weights")
""")


def fake_vllm(monkeypatch):
    from alignkit.serve import vllm_serve

    # (the stand-in assigns vs.check_head_size itself: recorded first, so the test's end puts the real one back)
    monkeypatch.setattr(vllm_serve, "check_head_size", vllm_serve.check_head_size)
    namespace: dict = {}
    exec(FAKE_VLLM, namespace)  # noqa: S102 - the child's stand-in, in this process
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=namespace["LLM"]))


def start(model, workdir):
    from alignkit.serve.vllm_serve import EngineSettings, VllmServeEngine

    return VllmServeEngine(EngineSettings(model=str(model), enable_lora=True), workdir)


def test_a_killed_servers_staging_folder_is_removed_at_the_next_start_and_a_live_one_is_never_shared(
        tiny_dir, tmp_path, monkeypatch, caplog):
    from alignkit.settings import ConfigError

    model, workdir, ready = tiny_dir("llama"), tmp_path / "w", tmp_path / "ready"
    theirs = {"lora-1/adapter_model.safetensors": b"a finished run's adapter", "notes.txt": b"the user's",
              ".lora-x.tmp/f": b"not our pattern (no version)", ".lora-2.abc/f": b"not our pattern (no .tmp)"}
    for name, data in theirs.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(workdir), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"the child server did not reach its push (exit code {child.poll()})"
        staging = [p.name for p in workdir.iterdir() if p.name.startswith(".lora-1.")]
        assert len(staging) == 1 and staging[0].endswith(".tmp")  # write_lora's staging folder, mid-push
        fake_vllm(monkeypatch)
        with pytest.raises(ConfigError) as e:  # a second server while the first is alive
            start(model, workdir)
        assert str(e.value) == (f"vllm-serve workdir {workdir}: another alignkit vllm-serve (pid {child.pid}) is using "
                                "it (it holds .alignkit-vllm-serve.lock); stop that server or give this one another "
                                "--workdir")
        assert (workdir / staging[0]).is_dir()  # the live server's folder untouched
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert (workdir / staging[0]).is_dir()  # what SIGKILL leaves
    with caplog.at_level(logging.INFO, logger="alignkit.serve.vllm_serve"):
        engine = start(model, workdir)
    removed = [r.getMessage() for r in caplog.records if "staging" in r.getMessage()]
    assert removed == [f"vllm-serve workdir {workdir}: removed 1 half-written LoRA staging folder(s) that a stopped "
                       f"server (pid {child.pid}) left: {staging[0]}"]
    assert not (workdir / staging[0]).exists()
    assert {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()
            and p.name != ".alignkit-vllm-serve.lock"} == theirs
    engine.close()
    start(model, workdir).close()  # a closed server lets the next one in
    assert {str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()} == {*theirs,
                                                                                      ".alignkit-vllm-serve.lock"}


@pytest.mark.parametrize("own", [True, False])
def test_a_check_refusing_the_start_leaves_no_workdir_and_no_lock(tiny_dir, tmp_path, monkeypatch, own):
    """A --max-model-len refused above a RoPE-scaled model's context (`engine_limit`, row V16) ran after the workdir
    was made and locked: the refusal left the temporary folder (and its lock file) behind. Now the workdir is taken
    after every check: nothing is made for a refused start; a user's --workdir is not created either. Fails without
    the fix: yes (the temporary folder stayed)."""
    import tempfile

    from alignkit.serve import vllm_serve
    from alignkit.settings import ConfigError

    fake_vllm(monkeypatch)

    def refuse(*a, **k):
        raise ConfigError("vllm-serve --max-model-len 99999: above the model's context")

    monkeypatch.setattr(vllm_serve, "engine_limit", refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    workdir = None if own else tmp_path / "w"
    with pytest.raises(ConfigError, match="max-model-len"):
        vllm_serve.VllmServeEngine(vllm_serve.EngineSettings(model=str(tiny_dir("llama")), max_model_len=99999),
                                   workdir)
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "w").exists()
