"""A full-weight sync of the colocated engine (`VllmGenerator.sync`: vLLM's in-place `reload_weights`) must also drop
vLLM's prefix cache: `reload_weights` leaves the cached prompt KV of the old weights in place, and a prompt seen
before the sync (a later epoch, a repeated prompt) was continued from it, sampling from neither the old nor the new
policy without a word. Run in a subprocess (`sync_worker.py`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import PYTHON, run_env

WORKER = Path(__file__).with_name("sync_worker.py")


def test_a_full_weight_sync_drops_the_prefix_cache(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([PYTHON, str(WORKER), str(out)], env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["before"] == r["old_policy"], r  # the engine is the policy before the change ...
    assert r["policy"] != r["old_policy"], r  # ... the change moves the greedy tokens ...
    assert r["after"] == r["policy"], r  # ... and after the sync the engine is the changed policy, prefix and all
