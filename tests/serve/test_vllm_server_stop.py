"""`alignkit serve --engine vllm` runs vLLM's server as a child process: a SIGTERM to alignkit (kill, a service
manager, a container stop) must end that server too. Before, only Ctrl-C was passed on: SIGTERM ended alignkit
alone, and vLLM's server kept its port and memory (found as orphaned servers after the vLLM tests). vLLM is not
needed here: its server is replaced by a sleeping child through the module's own seams."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent("""
    import sys, types
    from alignkit.serve import vllm_server as vs
    pidfile = sys.argv[1]
    vs.require_vllm = lambda: None
    vs.prepare = lambda base, adapters, base_name, workdir: None
    vs._max_len = lambda base, wanted: (wanted, "")
    child = ("import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(120)" % pidfile)
    vs.command = lambda plan, host, port, dtype, max_model_len=None: [sys.executable, "-c", child]
    cfg = types.SimpleNamespace(adapters={}, max_prompt_tokens=8, max_new_tokens=8, host="127.0.0.1", port=0,
                                dtype="float32", api_key=None)
    sys.exit(abs(vs.serve_with_vllm(cfg, "unused", "tiny", quiet=True)))
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def test_sigterm_to_alignkit_stops_the_vllm_server_it_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(pidfile)])
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, f"the serving process ended early ({proc.returncode})"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert alive(child)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == signal.SIGTERM  # it waited for the server, whose exit code it returns
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "vLLM's server (here a stand-in) outlived the alignkit process that started it"
    finally:
        for pid in ([child] if child else []):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
