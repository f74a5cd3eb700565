"""A torchrun worker for tests/distributed/test_exit.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 exit_worker.py OUT_DIR CODE MODE

Runs gloo all-reduces on Python tensors while keeping the GIL (a long switch interval), the pattern that
makes interpreter teardown abort a rank. MODE "helper" ends through
alignkit.distributed.exit_after_distributed_run(CODE); MODE "plain" just returns (the control).
Each rank registers an atexit handler that writes OUT_DIR/atexit-RANK (then waits for the other rank's file)
and prints a line without a newline, so the test can see that both still happen.
"""

from __future__ import annotations

import atexit
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _mark_and_wait_for_peer(out_dir: Path, rank: int, world: int) -> None:
    """Write OUT_DIR/atexit-RANK, then wait (up to 60 s) until every rank's file exists. When a run fails,
    torchrun terminates the other ranks as soon as it sees the first one exit; without this rendezvous a slower
    rank could be killed before its own handler ran, and the test would see one file for reasons of timing, not
    of alignkit. The group is already destroyed here, hence files, not a barrier."""
    out_dir.joinpath(f"atexit-{rank}").write_text("ran")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(out_dir.joinpath(f"atexit-{r}").exists() for r in range(world)):
        time.sleep(0.05)


def main(out_dir: str, code: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    atexit.register(_mark_and_wait_for_peer, Path(out_dir), rank, dist.get_world_size())
    sys.setswitchinterval(30.0)  # the main thread keeps the GIL: a gloo worker waiting for it meets finalisation
    total = torch.zeros(4)
    for _ in range(20):
        t = torch.ones(4)
        dist.all_reduce(t)
        total += t
    print(f"rank {rank} sum {int(total[0])}", end="")  # no newline: only a flush writes it out
    if mode == "helper":
        from alignkit.distributed import exit_after_distributed_run

        exit_after_distributed_run(int(code))
    sys.exit(int(code))


if __name__ == "__main__":
    main(*sys.argv[1:])
