"""`alignkit serve --output-dir` stopped by SIGTERM, as docker stop / systemd / k8s / `kill` stop it: the serve
log's last row, its TensorBoard close and its plots are written before the process ends.

uvicorn catches the signal, shuts down (the app's lifespan shutdown included), then raises SIGTERM again (row M20):
the default SIGTERM handler ends the process there, so `serve_forever`'s `finally` never ran and the folder had no
"stop" row and no plots/. A real `alignkit serve` child process, one request, then SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from alignkit.serve.log import SERVE_PLOTS


def child_env() -> dict[str, str]:
    src = str(Path(__import__("alignkit").__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src, "PYTHONUNBUFFERED": "1"}


def wait_for_port(child: subprocess.Popen, seen: list[str]) -> int:
    """The port of the child's 'alignkit serve: ... on http://127.0.0.1:PORT/' line (its stdout, lines kept)."""
    for line in child.stdout:
        seen.append(line)
        if line.startswith("alignkit serve:") and " on http://127.0.0.1:" in line:
            return int(line.split(" on http://127.0.0.1:")[1].split("/")[0])
    raise AssertionError("the server never started:\n" + "".join(seen))


def get(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_sigterm_leaves_the_stop_row_tensorboard_and_plots(serve_dirs, tmp_path):
    """SIGTERM (Ctrl-C's SIGINT already got them: it becomes a KeyboardInterrupt through the `finally`)."""
    out = tmp_path / "serve-log"
    child = subprocess.Popen([sys.executable, "-m", "alignkit", "serve", "--base", str(serve_dirs["base"]),
                              "--port", "0", "--device", "cpu", "--output-dir", str(out), "--log-every", "1"],
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        port = wait_for_port(child, seen)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # uvicorn may not listen yet when the line is printed
            try:
                get(url + "/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and child.poll() is None, "".join(seen)
                time.sleep(0.1)
        answer = get(url + "/v1/completions", {"model": "tiny-base", "prompt": "Hello", "max_tokens": 3})
        assert answer["usage"]["completion_tokens"] >= 1
        child.send_signal(signal.SIGTERM)
        rest, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    log = "".join(seen) + rest
    assert child.returncode == -signal.SIGTERM, log  # uvicorn raised it again (row M20)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start"
    assert [r.get("event") for r in rows].count("stop") == 1, rows  # once: the hook, not again in `finally`
    assert rows[-1]["event"] == "stop" and rows[-1]["requests"] == 1, rows
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(f"{name}.png" for name in SERVE_PLOTS)
    events = list((out / "tensorboard" / "serve").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
