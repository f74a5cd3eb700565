"""Issue 12: property-based fuzzing (hypothesis) of the data readers and the config parser. Whatever the input,
they return records / a config or raise alignkit's own error (DataError / ConfigError, one line that names the
place); any other exception is a bug. Bounded (few examples, no deadline flakiness) so the suite stays fast."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.data import load_records
from alignkit.data.records import DataError
from alignkit.settings import ConfigError
from alignkit.settings.load import config_from_dict
from alignkit.settings.typed import parse_overrides

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)

KEYS = ["prompt", "chosen", "rejected", "completion", "messages", "responses", "label", "weight", "margin", "ranks",
        "weigth", "chossen", "answer", "id"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "usr", ""]),
                                 "content": st.text(max_size=8)})
value = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.lists(message, max_size=3), st.lists(st.text(max_size=5), max_size=3))
row = st.dictionaries(st.sampled_from(KEYS), value, max_size=5)


def _write(lines: list[bytes]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="alignkit-fuzz-"))
    path = folder / "data.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@FAST
@given(rows=st.lists(row, min_size=1, max_size=4), kind=st.sampled_from([None, "sft", "preference", "prompt"]))
def test_jsonl_rows_read_or_fail_with_a_data_error(rows, kind):
    path = _write([json.dumps(r).encode() for r in rows])
    try:
        records = load_records(str(path), kind)
    except DataError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    assert isinstance(records, list)
    for r in records:
        assert math.isfinite(r.weight) and r.weight >= 0


@FAST
@given(lines=st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_raw_bytes_read_or_fail_with_a_data_error(lines):
    path = _write([line.replace(b"\n", b" ") for line in lines])
    try:
        load_records(str(path))
    except DataError as e:
        assert str(path) in str(e) or "no rows" in str(e)


override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["method.beta", "train.max_steps", "data.path", "a..b",
                                                                 "train.learning_rate", "model", "x", "1bad"]),
                     st.text(max_size=10))


@FAST
@given(items=st.lists(st.one_of(override, st.text(max_size=12)), max_size=4))
def test_overrides_parse_or_fail_with_a_config_error(items):
    try:
        out = parse_overrides(items)
    except ConfigError:
        return
    assert isinstance(out, dict)


section_value = st.one_of(value, st.dictionaries(st.sampled_from(["beta", "loss_type", "max_steps", "learning_rate",
                                                                  "path", "kind", "r", "eval_fraction", "bf16"]),
                                                 value, max_size=3))


@FAST
@given(data=st.dictionaries(st.sampled_from(["model", "data", "adapter", "method", "train", "output_dir", "extra"]),
                            section_value, max_size=5),
       command=st.sampled_from(["sft", "dpo", "kto", "rm"]))
def test_config_dicts_build_or_fail_with_a_config_error(data, command):
    data = {"model": {"path": "tiny:llama"}, "data": {"path": "bundled:data/hh_rlhf_sample.jsonl"}, **data}
    try:
        cfg = config_from_dict(data, command)
    except ConfigError as e:
        assert str(e)
        return
    assert cfg.model.path
