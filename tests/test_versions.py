"""The reproducible set-up: constraints.txt pins what CI passed, every pin satisfies pyproject's ranges, and
`python -m alignkit.versions --check` names a library whose installed version drifted from its pin."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from alignkit.versions import drift, main, read_constraints

ROOT = Path(__file__).resolve().parents[1]


def test_every_dependency_is_pinned_within_its_range():
    pins = read_constraints(ROOT / "constraints.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is a dependency but constraints.txt does not pin it (make constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"


def test_drift_names_the_library_and_both_versions(tmp_path):
    c = tmp_path / "c.txt"
    c.write_text("# pinned\ntorch==2.13.0\nTransformers==0.0.1\npeft==9.9 ; python_version>'3'\n")
    assert read_constraints(c) == {"torch": "2.13.0", "transformers": "0.0.1", "peft": "9.9"}
    lines = drift(["torch", "transformers", "no-such-lib-xyz"], c)
    assert lines[0].startswith("transformers: ") and "pins 0.0.1" in lines[0]
    assert lines[1] == f"no-such-lib-xyz: not pinned in {c}"
    assert len(lines) == 2  # torch 2.13.0+cpu equals its pin 2.13.0
    assert main(["transformers", "--check", str(c)]) == 2
    assert main(["torch", "--check", str(c)]) == 0
