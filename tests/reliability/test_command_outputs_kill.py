"""Kill and crash safety of what the one-shot commands (sample, annotate, augment, generate, eval, serve) write
over an earlier run's files: the earlier file stays byte-equal, or the new one is whole; never a cut file.

A full disk is stood in for by RLIMIT_FSIZE in a child process (a write past the limit fails with EFBIG, as one
past the free space fails with ENOSPC); a kill by SIGKILL of a real `alignkit augment` child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

FULL_DISK = """
import resource, signal, sys
from alignkit.settings import load_config, save_config
cfg = load_config(sys.argv[1], ["batch_size=3"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an OSError, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_config(cfg, sys.argv[2])
except OSError as e:
    print("OSError", e.errno)
    sys.exit(3)
"""


def child_env() -> dict[str, str]:
    src = str(Path(__import__("alignkit").__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_FSIZE: Linux")
def test_a_config_write_that_fails_half_way_leaves_the_previous_config_whole(tmp_path):
    """save_config wrote config.yaml (eval / generate / augment) and sample.yaml / annotate.yaml in place: a write
    that failed part-way (a full disk) left the previous run's file cut to what fitted, read back as a config with
    keys missing. Now through the atomic writer: the previous file is byte-equal and no temporary file is left."""
    from alignkit.settings import load_config, save_config

    target = tmp_path / "config.yaml"
    save_config(load_config(CONFIGS / "generate-tiny.yaml"), target)
    before = target.read_bytes()
    assert len(before) > 64  # the limit cuts the new write part-way
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(CONFIGS / "generate-tiny.yaml"), str(target)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr  # the write failed, loudly
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
