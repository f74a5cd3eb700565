"""ReFT positions on prompts cut by the length limits: counted on the tokens kept (as pyreft counts them on its
truncated prompt), and said once, with the count, a record and the fix, when the cut removes the tokens the spec
names (the first tokens of a left-truncated prompt; the last tokens of a right-truncated classification text)."""

from __future__ import annotations

import logging

import pytest

from alignkit.data import PreferenceRecord, SFTRecord, tokenize_records
from alignkit.data.collators import PreferenceCollator, SFTCollator
from alignkit.data.reft_data import make_classification_data_module
from alignkit.interventions.positions import check_truncated_prompts, locations_from_spans, prompt_spans

PROMPT, COMPLETION = "0 1 2 3 4 5 6 7 8 9", " 10 11"


def words(tok, ids):
    return [tok.decode([i]).strip() for i in ids]


@pytest.fixture
def fresh_warnings(monkeypatch):
    from alignkit.interventions import positions

    monkeypatch.setattr(positions, "_WARNED", set())


def test_a_left_truncated_prompt_moves_first_positions_to_its_first_kept_token(tokenizer, fresh_warnings):
    """max_prompt_length=4 keeps "6 7 8 9" of the ten-token prompt "0 .. 9" (tokenize's policy: the end is kept).
    SFT and preference rows alike: 'f1' lands on "6" (the first KEPT token, not the prompt's "0"), 'l1' on "9" (the
    prompt's real last token, never inside the completion "10 11")."""
    assert words(tokenizer, tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) == [str(i) for i in range(10)]
    (sft, pref), stats = tokenize_records([SFTRecord(PROMPT, COMPLETION, id="s-1"),
                                           PreferenceRecord(PROMPT, COMPLETION, " 12", id="p-1")],
                                          tokenizer, max_prompt_length=4, max_length=20)
    assert (stats.prompt_truncated, stats.prompt_truncated_ids) == (2, ["s-1", "p-1"])
    for batch in (SFTCollator(tokenizer.pad_token_id)([sft]), PreferenceCollator(tokenizer.pad_token_id)([pref])):
        start, length = prompt_spans(batch["attention_mask"], batch["completion_mask"])
        assert length.tolist() == [4] * len(length)
        loc = locations_from_spans("f1+l1", start, length, 1)  # (B, 1, 2)
        for row, (first, last) in enumerate(loc[:, 0].tolist()):
            assert words(tokenizer, batch["input_ids"][row, [first, last]].tolist()) == ["6", "9"]
            assert batch["completion_mask"][row, last] == 0 and batch["completion_mask"][row, last + 1] == 1


def test_truncated_prompts_under_first_positions_are_warned_with_count_record_and_fix(caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
        check_truncated_prompts("l2", 3, 10, ["a", "b", "c"], 64)  # the end is kept: nothing to say
        check_truncated_prompts("f1+l1", 0, 10, [], 64)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
        check_truncated_prompts("f1+l1", 3, 10, ["a", "b", "c"], 64, where="evaluation data")
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("evaluation data: 3 of 10 record(s) have a prompt longer than data.max_prompt_length=64")
    assert "(e.g. a, b, c)" in msg and "'f1+l1' edit their first KEPT tokens" in msg
    assert "raise data.max_prompt_length" in msg and "'l1'" in msg


@pytest.mark.parametrize("side,spec,kept,warned", [
    ("right", "l1", ["0", "1", "2", "3"], "their last tokens"),
    ("left", "f1", ["6", "7", "8", "9"], "their first tokens"),
    ("left", "l1", ["6", "7", "8", "9"], None),  # the end is kept: 'l1' is the text's real last token
])
def test_classification_texts_cut_on_the_truncation_side(tokenizer, monkeypatch, caplog, fresh_warnings, side, spec,
                                                         kept, warned):
    """(text, class) data is cut by the tokenizer itself (truncation_side); positions are counted on what is kept,
    and a cut that removes the named tokens is warned with the count and the record."""
    monkeypatch.setattr(tokenizer, "truncation_side", side)
    with caplog.at_level(logging.WARNING, logger="alignkit.data.reft_data"):
        mod = make_classification_data_module(tokenizer, [PROMPT, "2 3"], [1, 0], positions=spec, max_length=4)
    ds = mod["train_dataset"]
    assert words(tokenizer, ds[0]["input_ids"].tolist()) == kept and ds.truncated == [0]
    loc = mod["data_collator"]([ds[0]])["intervention_locations"]
    assert loc.tolist() == [[[0 if spec == "f1" else 3]]]
    msgs = [r.getMessage() for r in caplog.records]
    if warned is None:
        assert msgs == []
    else:
        (msg,) = msgs
        assert msg.startswith("1 of 2 text(s) are longer than max_length=4 tokens (e.g. record 0)") and warned in msg
        assert f"truncation_side={side!r}" in msg and "raise max_length" in msg
