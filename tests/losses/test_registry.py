"""Registries: every entry is documented (what `alignkit ls` prints) and callable."""

from __future__ import annotations

import pytest

from alignkit.losses import REGISTRIES, Registry


def test_every_entry_has_a_docstring_naming_its_source():
    assert set(REGISTRIES) == {"sft", "reward", "preference", "unpaired", "policy", "advantage", "kl"}
    for kind, reg in REGISTRIES.items():
        assert len(reg) > 0, kind
        for name, first_line in reg.describe():
            assert callable(reg[name])
            assert first_line, f"{kind}/{name} has no docstring"
            doc = reg[name].__doc__
            assert "=" in doc or "sigma" in doc, f"{kind}/{name}: write the equation in the docstring"


def test_double_registration_is_refused():
    reg = Registry("thing")
    reg.register("a")(lambda: None)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: None)
