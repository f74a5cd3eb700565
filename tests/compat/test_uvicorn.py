"""uvicorn's shutdown on SIGTERM (row M20): `alignkit serve` stops its serve log (the last metrics row, TensorBoard's
close, the plots) in the app's lifespan shutdown, because uvicorn runs that hook on SIGTERM and then raises the
signal again, which (default handler) ends the process before any code after `Server.run` (a `finally`) runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .guards import check

WHERE = "alignkit/serve/api.py:serve_forever/shutdown_lifespan (the serve log stopped at shutdown)"

CHILD = textwrap.dedent("""
    import contextlib, pathlib, socket, sys
    import uvicorn
    from fastapi import FastAPI

    out = pathlib.Path(sys.argv[1])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        (out / "started").write_text("")
        yield
        (out / "shutdown").write_text("")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        uvicorn.Server(uvicorn.Config(FastAPI(lifespan=lifespan), log_level="warning")).run(sockets=[sock])
    finally:
        (out / "after_run").write_text("")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_uvicorn_runs_the_lifespan_shutdown_on_sigterm_then_raises_it_again(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
            time.sleep(0.05)
        time.sleep(0.2)  # the startup hook has returned; uvicorn's signal handlers are in place before it runs
        os.kill(child.pid, signal.SIGTERM)
        log, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    check((tmp_path / "shutdown").exists(), "uvicorn", "the app's lifespan shutdown no longer runs on SIGTERM", WHERE,
          log)
    check(child.returncode == -signal.SIGTERM and not (tmp_path / "after_run").exists(), "uvicorn",
          "after its shutdown on SIGTERM, uvicorn no longer raises the signal again (the process went on past "
          "Server.run, so a `finally` there runs too: the comment of serve_forever and row M20 are out of date)",
          WHERE, f"returncode {child.returncode}; {log}")
