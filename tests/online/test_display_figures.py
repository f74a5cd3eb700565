"""Figures of a run as a person reads them (`runs.figure`): the online step's log line and the CLI's last lines
rounded to 4 decimals, so a KL of 6e-06 read "0.0" / "0.0000", which cannot be told from a real 0 or a broken
metric. Now 4 significant digits; NaN reads nan, never 0; metrics.jsonl keeps every digit."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

from alignkit.online.metrics import ProcessMetrics
from alignkit.runs import figure


def test_figure_keeps_small_values_and_nan():
    assert figure(6e-06) == "6e-06"  # 4 decimals: 0.0000
    assert figure(-1.23456e-07) == "-1.235e-07"
    assert figure(0.123456) == "0.1235" and figure(2.0) == "2" and figure(0.0) == "0"
    assert figure(float("nan")) == "nan" and figure(float("inf")) == "inf"


def test_the_online_step_line_shows_significant_digits(tmp_path, caplog):
    owner = SimpleNamespace(history=[], output_dir=tmp_path, accelerator=SimpleNamespace(is_main_process=True),
                            trackers=[], SHOWN_METRICS=ProcessMetrics.SHOWN_METRICS)
    row = {"step": 3.0, "reward": 0.5, "kl": 6e-06, "loss": float("nan"), "entropy": 1.25, "grad_norm": 0.1}
    with caplog.at_level(logging.INFO, logger="alignkit.online.metrics"):
        ProcessMetrics.log(owner, row)
    line = "\n".join(r.getMessage() for r in caplog.records)
    assert "online step 3: reward 0.5, kl 6e-06, loss nan, entropy 1.25" in line, line
    saved = json.loads((tmp_path / "metrics.jsonl").read_text().replace("NaN", "null"))
    assert saved["kl"] == 6e-06 and saved["loss"] is None and math.isnan(owner.history[0]["loss"])  # every digit
