"""A torchrun worker for tests/distributed/test_exit.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 exit_worker.py OUT_DIR CODE MODE

Runs gloo all-reduces on Python tensors while keeping the GIL (a long switch interval), the pattern that
makes interpreter teardown abort a rank. MODE "helper" ends through
alignkit.distributed.exit_after_distributed_run(CODE); MODE "plain" just returns (the control).
Each rank registers an atexit handler that writes OUT_DIR/atexit-RANK and prints a line without a newline,
so the test can see that both still happen.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out_dir: str, code: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    atexit.register(lambda: Path(out_dir, f"atexit-{rank}").write_text("ran"))
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
