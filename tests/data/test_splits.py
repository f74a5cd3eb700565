"""Phase splits: disjoint, covering, deterministic, in proportion; groups never span two parts."""

from __future__ import annotations

import pytest

from alignkit.data import DataError, SFTRecord, parse_fractions, split_indices, split_records
from alignkit.data.splits import part_sizes


def test_parse_fractions():
    assert parse_fractions("2,4,4") == [0.2, 0.4, 0.4]
    assert parse_fractions([95, 5]) == [0.95, 0.05]
    for bad in ("a,b", "0,0", "-1,2"):
        with pytest.raises(DataError):
            parse_fractions(bad)


@pytest.mark.parametrize("method", ["permutation", "hash"])
@pytest.mark.parametrize("spec", ["nan,1", "inf,1", "1,nan", [1e308, 1e308]])
def test_non_finite_weights_are_refused(spec, method):
    # before: the hash split put all 10 items in the last part ([[], [0..9]]; 1e308 + 1e308 overflows to inf, so
    # both fractions were 0), and the permutation split stopped on "cannot convert float NaN to integer"
    with pytest.raises(DataError, match="weights must be finite numbers >= 0 with a positive, finite sum"):
        split_indices(10, spec, method=method)


def test_part_sizes_largest_remainder():
    assert part_sizes(10, [0.2, 0.4, 0.4]) == [2, 4, 4]
    assert part_sizes(11, [0.2, 0.4, 0.4]) == [2, 5, 4]  # 2.2, 4.4, 4.4: one extra to the first largest remainder
    assert part_sizes(3, [1 / 3] * 3) == [1, 1, 1]


@pytest.mark.parametrize("method", ["permutation", "hash"])
def test_phase_split_properties(method):
    n = 1000
    parts = split_indices(n, "2,4,4", seed=7, method=method)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    assert parts == split_indices(n, "2,4,4", seed=7, method=method)  # deterministic
    assert parts != split_indices(n, "2,4,4", seed=8, method=method)
    sizes = [len(p) for p in parts]
    if method == "permutation":
        assert sizes == [200, 400, 400]
    else:  # binomial: 4 standard deviations
        for s, f in zip(sizes, (0.2, 0.4, 0.4)):
            assert abs(s - n * f) < 4 * (n * f * (1 - f)) ** 0.5


def test_hash_split_is_stable_when_data_grows():
    keys = [f"k{i}" for i in range(200)]
    small = split_indices(keys[:100], "5,5", seed=1, method="hash")
    big = split_indices(keys, "5,5", seed=1, method="hash")
    assert [set(p) for p in small] == [set(i for i in p if i < 100) for p in big]


def test_groups_stay_together():
    recs = [SFTRecord(f"p{i}", " c", meta={"tree_id": f"t{i % 7}"}) for i in range(50)]
    parts = split_records(recs, "6,4", seed=0, group_by="tree_id")
    seen = [{r.meta["tree_id"] for r in p} for p in parts]
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == 7
    assert [len(s) for s in seen] == part_sizes(7, [0.6, 0.4])
    with pytest.raises(DataError, match="no meta\\['lang'\\]"):
        split_records(recs, "6,4", group_by="lang")
