"""The one way the tests start a multi-process run: `torchrun` with N CPU processes (gloo).

    run = torchrun([str(WORKER), str(model_dir), str(out), *cases])          # 2 ranks, 600 s
    assert run.returncode == 0, run.failure()

Every launch gets the same environment: one OpenMP thread per rank (the machine's cores are shared), the rendezvous
on 127.0.0.1, and this checkout's `src/` first on PYTHONPATH (the ranks import the alignkit under test, whatever
is installed). A run past its timeout is killed with every rank it started (torchrun's process group, and each rank,
which torchrun starts in a session of its own) and comes back
as a failed run (`timed_out`), with the output it wrote so far, instead of a TimeoutExpired from the middle of
pytest that leaves the ranks running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SRC = str(Path(__file__).resolve().parents[2] / "src")


@dataclass
class Launched:
    """What a `torchrun` launch returned: its exit code and both streams (all ranks')."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    def failure(self, tail: int = 12000) -> str:
        """A readable failure message: how it ended, the command, and the end of stderr (then stdout)."""
        how = "timed out (killed)" if self.timed_out else f"exited with {self.returncode}"
        shown = " ".join(self.command[self.command.index("torch.distributed.run") + 1:])
        text = f"torchrun {how}: {shown}\n--- stderr (last {tail} characters) ---\n{self.stderr[-tail:]}"
        if self.stdout.strip():
            text += f"\n--- stdout (last 2000 characters) ---\n{self.stdout[-2000:]}"
        return text


def torchrun(args: Sequence[str], *, nproc: int = 2, timeout: float = 600,
             env: dict[str, str] | None = None) -> Launched:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node=<nproc> <args>` on CPU processes and
    wait at most `timeout` seconds. `args`: the script and its arguments (or `-m module ...`); `env`: variables
    added to the shared launch environment (see the module docstring)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p),
                **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout ends every rank
    try:
        out, err = proc.communicate(timeout=timeout)
        return Launched(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own, so killing torchrun's process group leaves the ranks
        # running, holding the output pipes open (communicate() would then wait for ever): kill them first
        import psutil

        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ranks = []
        for child in ranks:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Launched(cmd, proc.returncode, out, err + f"\n[tests/distributed/launch.py: killed after {timeout} s]",
                        timed_out=True)
