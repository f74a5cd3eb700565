"""Which versions of the libraries alignkit leans on are installed, against the ones it was tested with.

`python -m alignkit.versions transformers peft` prints the installed versions; with `--check
constraints.txt` it also exits 2, naming each library, when the installed version differs from the pinned
one (`make test` runs this first, so a venv that drifted from what CI passed says so before any test runs).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_constraints(path: str | Path) -> dict[str, str]:
    """`name==version` lines of a constraints file (names lower-cased, `_` as `-`)."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def drift(names: list[str], constraints: str | Path) -> list[str]:
    """One line per library whose installed version is not the pinned one."""
    pins = read_constraints(constraints)
    out = []
    for name in names:
        want, have = pins.get(name.lower().replace("_", "-")), installed(name)
        if want is None:
            out.append(f"{name}: not pinned in {constraints}")
        elif have is None:
            out.append(f"{name}: not installed ({constraints} pins {want})")
        elif have.split("+")[0] != want.split("+")[0]:
            out.append(f"{name}: {have} installed, {constraints} pins {want}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.versions", description=__doc__)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--check", metavar="CONSTRAINTS", help="exit 2 when an installed version is not the pinned one")
    args = parser.parse_args(argv)
    print("versions: " + ", ".join(f"{n} {installed(n) or 'missing'}" for n in args.names))
    if args.check:
        bad = drift(args.names, args.check)
        if bad:
            for line in bad:
                print(f"alignkit.versions: {line}; rerun `make clean test` to reinstall the tested versions",
                      file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
