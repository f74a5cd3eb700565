"""pyvene's on-disk config, which `interventions/pyreft_compat.py` reads field by field (`REPRESENTATION_FIELDS`) (row R1 of the table in
docs/architecture.md). They run where pyvene is installed (bench/.envs/pyreft); elsewhere they are skipped."""

from __future__ import annotations

import importlib.util

import pytest

from alignkit.interventions.pyreft_compat import REPRESENTATION_FIELDS

from .guards import check, guard

PYVENE = "pyvene"
pytestmark = pytest.mark.skipif(importlib.util.find_spec(PYVENE) is None,
                                reason="pyvene is not installed in this Python (bench/.envs/pyreft has it)")


def test_pyvene_representation_fields_and_mode_are_what_the_reader_knows():
    """config.json stores each representation as a list in the field order of pyvene's RepresentationConfig; the
    reader names them by `REPRESENTATION_FIELDS` and refuses the ones it cannot honour when set. A field added,
    removed or moved would shift every value after it; the default `mode` is the one alignkit runs."""
    where = "alignkit/interventions/pyreft_compat.py:REPRESENTATION_FIELDS/_representation/_check_mode"
    with guard(PYVENE, "pyvene.RepresentationConfig / IntervenableConfig moved", where):
        from pyvene import IntervenableConfig, RepresentationConfig
        fields = tuple(RepresentationConfig._fields)
        mode = IntervenableConfig().mode
    check(fields == REPRESENTATION_FIELDS, PYVENE, "RepresentationConfig's fields changed", where,
          f"pyvene: {fields}, alignkit reads {REPRESENTATION_FIELDS}")
    check(mode == "parallel", PYVENE, "IntervenableConfig's default mode changed", where, f"mode={mode!r}")
