"""bench/common.median_ci: the distribution-free interval the suites print for the median paired ratio. Expected
order statistics and coverages worked out by hand from the binomial(n, 1/2) distribution."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_five_repeats_give_min_and_max(common):
    # k = 1: 1 - 2 * C(5,0) / 32 = 30/32; k = 2 would cover 1 - 2 * (1 + 5) / 32 = 0.625
    assert common.median_ci([2.3, 1.9, 2.1, 1.7, 2.6]) == (1.7, 2.6, 30 / 32)


def test_eleven_repeats_drop_two_from_each_end(common):
    xs = [float(x) for x in (11, 3, 7, 1, 9, 5, 2, 10, 4, 8, 6)]
    # k = 3: 1 - 2 * (1 + 11 + 55) / 2048 = 0.934570...; k = 4: 1 - 2 * 232 / 2048 = 0.7734 < 0.90
    assert common.median_ci(xs) == (3.0, 9.0, 1 - 134 / 2048)
    # at 0.95 only k = 2 qualifies: 1 - 2 * 12 / 2048
    assert common.median_ci(xs, level=0.95) == (2.0, 10.0, 1 - 24 / 2048)


def test_too_few_repeats_give_no_interval(common):
    assert common.median_ci([1.0, 2.0, 3.0, 4.0]) is None  # (min, max) of 4 covers 1 - 2/16 = 0.875
    assert common.paired_summary([1.0, 2.0, 3.0, 4.0]) == "2.50 (1.00-4.00, n=4)"
    assert common.paired_summary([]) == "—"
    assert common.paired_summary([2.0] * 9) == "2.00 (2.00-2.00, n=9; median's CI96.1% 2.00-2.00)"
