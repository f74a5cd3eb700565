"""Command line: `alignkit <command> --config x.yaml key=value`. (Being built: see README.)"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("alignkit: command line not built yet", file=sys.stderr)
    return 2
