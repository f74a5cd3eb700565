"""A part's settings (adapter.lora, adapter.reft) given to a kind without that part are refused where the
`AdapterConfig` is built, in Python as in a config file, with the CLI's line (`unused_part_message`): before,
`AdapterConfig(kind="full", lora=LoraSettings(r=8))` was accepted and the rank read by nothing (until apply_adapter).
Driven from the tables (`KINDS`, `PART_SETTINGS`): every kind x every part it lacks. Defaults stay accepted (the
dataclass builds them), and saved alignkit_adapter.json files of earlier versions (every section written) load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from alignkit.adapters.config import (KINDS, PART_SETTINGS, AdapterConfig, ReftSettings,
                                      read_adapter_config, refuse_unused_parts)

REFT = {"representations": [{"layer": 1, "low_rank_dimension": 4}]}
SET = {"lora": {"r": 4}, "reft": {"config": REFT, "positions": "l2"}}  # a value a user sets, per part
assert set(SET) == set(PART_SETTINGS)
UNUSED = [(kind, part) for kind, info in KINDS.items() for part in PART_SETTINGS if part not in info.parts]


def needed(kind: str) -> dict:
    """What a kind's own parts need to build (a ReFT part its interventions)."""
    return {"reft": ReftSettings(config=REFT)} if "reft" in KINDS[kind].parts else {}


@pytest.mark.parametrize("kind, part", UNUSED, ids=[f"{k}-{p}" for k, p in UNUSED])
def test_a_part_the_kind_does_not_use_is_refused_when_built_with_the_clis_line(kind, part):
    with pytest.raises(ValueError) as cli:
        refuse_unused_parts({"kind": kind, part: SET[part]})
    settings = PART_SETTINGS[part](**SET[part])
    with pytest.raises(ValueError) as built:
        AdapterConfig(kind=kind, **{**needed(kind), part: settings})
    assert str(built.value) == str(cli.value)
    assert str(built.value).startswith(f"adapter.{part}: read only by adapter.kind ") and "\n" not in str(built.value)
    with pytest.raises(ValueError, match=f"^adapter.{part}: read only"):  # a mapping, as from_dict gives it
        AdapterConfig.from_dict({"kind": kind, part: SET[part]})
    cfg = AdapterConfig(kind=kind, **needed(kind))
    setattr(cfg, part, settings)  # set after building: apply_adapter's check() still refuses it
    with pytest.raises(ValueError, match=f"^adapter.{part}: read only"):
        cfg.check()


@pytest.mark.parametrize("kind, part", UNUSED, ids=[f"{k}-{p}" for k, p in UNUSED])
def test_a_part_at_its_defaults_is_accepted_and_an_earlier_save_loads(kind, part, tmp_path):
    """At its defaults (the settings class's, or None) the part is what the dataclass builds, and what alignkit
    wrote for every part into alignkit_adapter.json before it dropped unused ones: accepted, and such a saved file
    loads. A saved file from a version that accepted a set part loads too, without it (the run ignored it)."""
    AdapterConfig(kind=kind, **{**needed(kind), part: PART_SETTINGS[part]()})
    own = {p: dataclasses.asdict(s) for p, s in needed(kind).items()}
    for written in (dataclasses.asdict(PART_SETTINGS[part]()), SET[part]):
        (tmp_path / "alignkit_adapter.json").write_text(json.dumps({"kind": kind, **own, part: written}))
        cfg = read_adapter_config(tmp_path)
        assert cfg.kind == kind and getattr(cfg, part) in (None, PART_SETTINGS[part]())


@pytest.mark.parametrize("kind, part", UNUSED, ids=[f"{k}-{p}" for k, p in UNUSED])
@pytest.mark.parametrize("value", ["oops", 16, [4]])
def test_a_part_that_is_no_settings_at_all_is_refused_too(kind, part, value):
    """`AdapterConfig(kind="full", lora="oops")` (or a number, a list) was refused before check_parts began to pass
    its parts to `refuse_unused_parts`, which skips what is not a mapping; then accepted (a review's finding). Fails
    without the fix: yes (seen)."""
    with pytest.raises(ValueError, match=f"adapter.{part}"):
        AdapterConfig(kind=kind, **needed(kind), **{part: value})
