"""Position selection: parsing and the (B, K, P) location tensor, checked against tensors written by hand."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.positions import (
    Positions, locations_from_mask, locations_from_spans, prompt_spans, prompt_spans_from_mask,
)


@pytest.mark.parametrize("spec,first,last", [("l1", 0, 1), ("f1", 1, 0), ("f3+l3", 3, 3), ("f5+l5", 5, 5),
                                             ("l2+f1", 1, 2), ("f12+l10", 12, 10)])
def test_parse(spec, first, last):
    p = Positions.parse(spec)
    assert (p.first_n, p.last_n) == (first, last)
    assert Positions.parse(str(p)) == p


@pytest.mark.parametrize("bad", ["", "x1", "l", "f1+f2", "f0", "l1+", "first3"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        Positions.parse(bad)


@pytest.mark.parametrize("loose", ["F1", "f1+L2", "f 1", " f1", "f1 + l1", "f01", "l007", "f\u0663", "l\uff11",
                                   "f1\n"])
def test_parse_refuses_what_pyreft_does_not_write_naming_the_spec_and_the_grammar(loose):
    # pyreft's parse_positions strips lowercase 'f' / 'l' and its validator matches ^[fl]\d+$: upper case, spaces,
    # leading zeros and non-ASCII digits (int() reads '\u0663' as 3) were taken as f1 / f3 before
    with pytest.raises(ValueError) as e:
        Positions.parse(loose)
    assert repr(loose) in str(e.value) and "f<n>+l<n>" in str(e.value) and "lowercase" in str(e.value)


def test_width():
    assert Positions(3, 3).width(True) == 6
    assert Positions(3, 2).width(False) == 3
    assert Positions(0, 2).width(False) == 2


# Batch of 3 rows padded to T = 8; prompt lengths 5, 2, 3.
# Right padding: prompts start at 0. Left padding of the full sequence: the rows' real tokens are
# (8, 4, 6) long, so they start at 0, 4, 2 (the prompt is the start of the real tokens).
LENGTH = torch.tensor([5, 2, 3])
RIGHT = torch.tensor([0, 0, 0])
LEFT = torch.tensor([0, 4, 2])


def test_last1_both_padding_sides():
    got = locations_from_spans("l1", RIGHT, LENGTH, num_interventions=2)
    assert got.dtype == torch.long and got.shape == (3, 2, 1)
    assert got.tolist() == [[[4], [4]], [[1], [1]], [[2], [2]]]
    got = locations_from_spans("l1", LEFT, LENGTH, num_interventions=1)
    assert got.tolist() == [[[4]], [[5]], [[4]]]


def test_first1_last1_shared():
    # row 0: first 0, last 4; row 1: first 0, last 1; row 2: first 0, last 2 (right padding)
    got = locations_from_spans("f1+l1", RIGHT, LENGTH, num_interventions=1)
    assert got.tolist() == [[[0, 4]], [[0, 1]], [[0, 2]]]
    got = locations_from_spans("f1+l1", LEFT, LENGTH, num_interventions=1)
    assert got.tolist() == [[[0, 4]], [[4, 5]], [[2, 4]]]


def test_f2_l2_shared_dedups_short_prompts():
    # row 0 (L=5): first 0,1 last 3,4. row 1 (L=2): first 0,1; last would be 0,1 again -> -1,-1.
    # row 2 (L=3): first 0,1; last 1,2 -> 1 is a duplicate -> -1, 2.
    want_right = [[0, 1, 3, 4], [0, 1, -1, -1], [0, 1, -1, 2]]
    got = locations_from_spans("f2+l2", RIGHT, LENGTH, num_interventions=3)
    assert got.shape == (3, 3, 4)
    assert all(got[:, k].tolist() == want_right for k in range(3))
    want_left = [[0, 1, 3, 4], [4, 5, -1, -1], [2, 3, -1, 4]]
    assert locations_from_spans("f2+l2", LEFT, LENGTH, num_interventions=1)[:, 0].tolist() == want_left


def test_f5_l5_prompt_shorter_than_spec_never_out_of_range():
    got = locations_from_spans("f5+l5", torch.tensor([3]), torch.tensor([3]), num_interventions=1)
    # first slots: 3,4,5 then past the prompt end -> -1,-1; every last slot is a duplicate or before start
    assert got.tolist() == [[[3, 4, 5, -1, -1, -1, -1, -1, -1, -1]]]
    got = locations_from_spans("l5", torch.tensor([3]), torch.tensor([3]), num_interventions=1)
    assert got.tolist() == [[[-1, -1, 3, 4, 5]]]


def test_split_weights_layout():
    # K = 4: interventions 0,1 on the first 2 tokens, 2,3 on the last 3 tokens; P = 3.
    got = locations_from_spans("f2+l3", LEFT, LENGTH, num_interventions=4, share_weights=False)
    assert got.shape == (3, 4, 3)
    first = [[0, 1, -1], [4, 5, -1], [2, 3, -1]]
    last = [[2, 3, 4], [-1, 4, 5], [2, 3, 4]]  # row 1 has 2 prompt tokens: slot 0 (L-3 = -1) is none
    for k in (0, 1):
        assert got[:, k].tolist() == first
    for k in (2, 3):
        assert got[:, k].tolist() == last


def test_split_needs_even_interventions():
    with pytest.raises(ValueError, match="even"):
        locations_from_spans("f1+l1", RIGHT, LENGTH, num_interventions=3, share_weights=False)


def test_empty_prompt_all_none():
    got = locations_from_spans("f2+l2", torch.tensor([0]), torch.tensor([0]), num_interventions=2)
    assert (got == -1).all()


def test_from_mask_left_and_right():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert [t.tolist() for t in prompt_spans_from_mask(right)] == [[0, 0], [3, 5]]
    assert [t.tolist() for t in prompt_spans_from_mask(left)] == [[2, 0], [3, 5]]
    assert locations_from_mask("l1", right, 1).tolist() == [[[2]], [[4]]]
    assert locations_from_mask("l1", left, 1).tolist() == [[[4]], [[4]]]
    assert locations_from_mask("f1+l2", left, 1).tolist() == [[[2, 3, 4]], [[0, 3, 4]]]


def test_from_mask_refuses_a_row_with_holes():
    """A mask with a 0 between attended tokens gave start = first 1, length = number of 1s: row [0,1,1,0,1,1] put
    "l1" at index 4 (start 1 + 4 - 1), not on its last token 5. Now refused, naming the row and the hole."""
    holes = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"^attention_mask row 1 is not one contiguous span of attended tokens "
                                         r"\(0 at index 3, between attended tokens 2 and 4\)"):
        locations_from_mask("l1", holes, 1)
    assert prompt_spans_from_mask(torch.tensor([[0, 0, 0], [0, 1, 1]]))[1].tolist() == [0, 2]  # all-pad row: fine
    # with a completion mask (training batches, KTO's mismatched pairs): row 1's prompt [1, 2] + completion [4, 5]
    # gave start 1, prompt length 3 (up to the first completion token), so "l1" fell on index 3, the hole, not the
    # prompt's last token 2; a caller's own batch is now refused the same way (collators' masks pass)
    completion = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"^attention_mask row 1 is not one contiguous span .*0 at index 3"):
        prompt_spans(holes, completion)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert [t.tolist() for t in prompt_spans(right, completion)] == [[0, 0], [2, 4]]  # hand: [start], [prompt length]


def test_indices_point_inside_prompt_randomised():
    # Independent naive reference: a Python loop over rows builds the same sets of positions.
    g = torch.Generator().manual_seed(0)
    length = torch.randint(0, 9, (50,), generator=g)
    start = torch.randint(0, 6, (50,), generator=g)
    got = locations_from_spans("f3+l4", start, length, num_interventions=1)[:, 0]
    for b in range(50):
        s, n = int(start[b]), int(length[b])
        want = set(range(s, s + min(3, n))) | set(range(s + max(0, n - 4), s + n))
        row = [p for p in got[b].tolist() if p >= 0]
        assert len(row) == len(set(row)) and set(row) == want


# --- prompts shorter than the spec: said, not silent -------------------------------------------------------

@pytest.fixture
def fresh_warnings(monkeypatch):
    from alignkit.interventions import positions

    monkeypatch.setattr(positions, "_WARNED", set())


@pytest.mark.parametrize("spec,share,need", [("f3+l3", True, 6), ("f3+l3", False, 3), ("l4", True, 4),
                                             ("f2+l5", False, 5), ("f2", False, 2)])
def test_needed_length_by_hand(spec, share, need):
    from alignkit.interventions.positions import needed_length

    assert needed_length(spec, share) == need


def test_a_short_prompt_is_warned_once_per_spec(fresh_warnings, caplog):
    """Rows of 4 and 9 tokens under f3+l3 (needs 6): one warning with the counts; the second call and a batch with
    no short row say nothing more; the tensor is unchanged by the check (slots written by hand)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
        got = locations_from_spans("f3+l3", torch.tensor([0, 0]), torch.tensor([4, 9]), 1)
        locations_from_spans("f3+l3", torch.tensor([0]), torch.tensor([2]), 1)
        locations_from_spans("l1", torch.tensor([0]), torch.tensor([2]), 1)
    assert got[:, 0].tolist() == [[0, 1, 2, -1, -1, 3], [0, 1, 2, 6, 7, 8]]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    assert "'f3+l3' need prompts of at least 6 tokens; 1 of 2 prompts are shorter (shortest: 4 tokens)" in msgs[0]
    assert "adapter.reft.positions" in msgs[0]


def test_check_prompt_lengths_stops_on_an_empty_prompt_and_names_the_record(fresh_warnings, caplog):
    import logging

    from alignkit.interventions.positions import check_prompt_lengths
    from alignkit.settings import ConfigError

    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
        check_prompt_lengths("f1+l1", True, [2, 5, 9], ["a", "b", "c"])
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
        check_prompt_lengths("f2+l2", True, [5, 3, 1], ["a", "b", "c"], where="data.path")
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("data.path: ReFT positions 'f2+l2'") and "2 of 3 prompts are shorter (shortest: 1" in msg
    with pytest.raises(ConfigError, match=r"data.path: record b has an empty prompt \(1 of 3"):
        check_prompt_lengths("l1", True, [5, 0, 7], ["a", "b", "c"])


def _pyreft_rule(length: int, f: int, l: int, share: bool) -> list[set[int]]:
    """pyreft 0.1.0 `dataset.get_intervention_locations` (pad slots dropped): min(L // 2, n) of each group."""
    f2, l2 = min(length // 2, f), min(length // 2, l)
    first, last = set(range(f2)), set(range(length - l2, length))
    return [first | last] * 2 if share or not (f2 and l2) else [first, last]


# (L, share_weights, pyreft's positions per intervention (its output for "f3+l3", 2 interventions), alignkit's)
SHORT_PROMPTS = [
    (1, True, [set(), set()], [{0}, {0}]),
    (4, True, [{0, 1, 2, 3}] * 2, [{0, 1, 2, 3}] * 2),
    (4, False, [{0, 1}, {2, 3}], [{0, 1, 2}, {1, 2, 3}]),
    (5, True, [{0, 1, 3, 4}] * 2, [{0, 1, 2, 3, 4}] * 2),
    (5, False, [{0, 1}, {3, 4}], [{0, 1, 2}, {2, 3, 4}]),
    (6, True, [{0, 1, 2, 3, 4, 5}] * 2, [{0, 1, 2, 3, 4, 5}] * 2),
    (6, False, [{0, 1, 2}, {3, 4, 5}], [{0, 1, 2}, {3, 4, 5}]),
]


@pytest.mark.parametrize("length, share, pyreft, ours", SHORT_PROMPTS)
def test_short_prompts_differ_from_pyreft_as_documented(length, share, pyreft, ours, fresh_warnings):
    """docs/architecture.md ("Short prompts") and the module docstring: below 2·max(f, l) tokens alignkit edits every
    position of the spec that exists, pyreft min(L // 2, n) per group; from there on they agree."""
    locs = locations_from_spans("f3+l3", torch.tensor([0]), torch.tensor([length]), 2, share)[0]
    assert [set(row[row >= 0].tolist()) for row in locs] == ours
    assert _pyreft_rule(length, 3, 3, share) == pyreft
    for spec, (f, l) in (("f3+l3", (3, 3)), ("f2+l1", (2, 1)), ("l2", (0, 2)), ("f1", (1, 0))):
        for n in range(2 * max(f, l), 2 * max(f, l) + 3):
            for s in (True, False):
                got = locations_from_spans(spec, torch.tensor([0]), torch.tensor([n]), 2, s)[0]
                assert [set(r[r >= 0].tolist()) for r in got] == _pyreft_rule(n, f, l, s), (spec, n, s)
