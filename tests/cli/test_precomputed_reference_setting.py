"""method.reference=precomputed names a cache folder it needs (session 24's objectives audit)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from alignkit.settings import ConfigError
from alignkit.settings.load import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dpo-tiny.yaml"


def test_precomputed_without_a_cache_folder_is_refused_when_the_config_is_read(tmp_path):
    """Before: `alignkit dpo method.reference=precomputed` loaded the data and the model, then stopped with
    'unexpected error: ValueError: reference='precomputed' needs reference_cache_dir ... please report it' (a
    Python argument name, not the config key). Now one ConfigError line naming both keys and the fix, when the
    config is read; with a folder the same config loads."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["method.reference=precomputed"], command="dpo")
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(r"method\.reference: 'precomputed' .* method\.reference_cache_dir, which is not set", msg), msg
    cfg = load_config(CONFIG, ["method.reference=precomputed", f"method.reference_cache_dir={tmp_path / 'c'}"],
                      command="dpo")
    assert cfg.method.reference == "precomputed" and cfg.method.reference_cache_dir == str(tmp_path / "c")
