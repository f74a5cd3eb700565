"""The records the length limits drop: a warning naming the share, the limits and the fix; over
data.max_dropped_fraction (default 0.5) the run stops in one line naming the setting (before: only a stop when
every record was dropped, a count inside the tokenization summary otherwise)."""

from __future__ import annotations

import logging

import pytest

from alignkit.cli.data import check_dropped
from alignkit.data.tokenize import TokenizeStats
from alignkit.settings import ConfigError, DataSettings


def stats(total: int, dropped: int) -> TokenizeStats:
    s = TokenizeStats(total=total, kept=total - dropped)
    for i in range(dropped):
        s.drop("prompt_too_long", f"d.jsonl:{i + 1}")
    return s


def test_most_records_dropped_stops_naming_the_share_limits_and_setting():
    ds = DataSettings(max_length=64, max_prompt_length=32)
    with pytest.raises(ConfigError, match=r"^data\.path: the length limits \(data\.max_length=64, data\.max_prompt_"
                       r"length=32\) drop 6 of 10 record\(s\) \(60%: 6 prompt_too_long, e\.g\. \['d\.jsonl:1', "
                       r"'d\.jsonl:2', 'd\.jsonl:3'\]\), over data\.max_dropped_fraction=0\.5: .*"
                       r"data\.max_dropped_fraction=1"):
        check_dropped(stats(10, 6), ds, "data.path")


@pytest.mark.parametrize("total,dropped,allowed", [(10, 5, 0.5), (10, 6, 1.0), (4, 1, 0.25)])
def test_a_share_within_the_setting_warns(total, dropped, allowed, caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.cli.data"):
        check_dropped(stats(total, dropped), DataSettings(max_dropped_fraction=allowed), "data.path")
    assert f"drop {dropped} of {total} record(s) ({dropped / total:.0%}" in caplog.text
    assert "raise data.max_length" in caplog.text
    assert f"within data.max_dropped_fraction={allowed} (over it the run stops)" in caplog.text


def test_nothing_dropped_says_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        check_dropped(stats(10, 0), DataSettings(), "data.path")
    assert not caplog.text
