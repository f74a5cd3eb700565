"""HH-RLHF text reader on hand-written rows (bundled in alignkit/resources/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import alignkit
from alignkit.data import DataError, PreferenceRecord, load_records, read_hh

HH = Path(alignkit.__file__).parent / "resources" / "data" / "hh_rlhf_sample.jsonl"


def test_bundled_sample_is_detected_and_split():
    recs = load_records(HH)
    assert len(recs) == 6 and all(isinstance(r, PreferenceRecord) for r in recs)
    r = recs[1]  # two human turns
    assert r.prompt == [
        {"role": "user", "content": "Can you help me write a birthday message for my sister?"},
        {"role": "assistant", "content": "Of course! How old is she turning, and is there anything special you'd like "
                                         "to mention?"},
        {"role": "user", "content": "She's turning 30 and just moved to Lisbon."}]
    assert r.rejected == [{"role": "assistant", "content": "Happy birthday. Have a nice day."}]
    assert [len(x.prompt) for x in recs] == [1, 3, 1, 3, 1, 5]


def test_text_mode_keeps_bytes():
    row = json.loads(HH.read_text().splitlines()[4])
    (r,) = read_hh([row], conversational=False)
    assert r.prompt == "\n\nHuman: What is 17 times 6?\n\nAssistant:"
    assert (r.chosen, r.rejected) == (" 17 times 6 is 102.", " 17 times 6 is 112.")
    assert r.prompt + r.chosen == row["chosen"]


def test_dialogues_stripped_of_their_leading_blank_line_are_read_as_hh(tmp_path):
    """An HH export whose texts were stripped ("Human: ..." without the leading "\\n\\n") was not recognised as
    HH: the preference-implicit reader took it, split each pair at the first differing word (" 17 times 6 is" went to
    the prompt) and trained the dialogue as raw text, not through the chat template, without a word. It is now read
    as HH, the same records as the unstripped text in conversational mode; text mode keeps its bytes."""
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    stripped = [{k: v.lstrip() if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    assert all(r["chosen"].startswith("Human:") for r in stripped)
    path = tmp_path / "stripped.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stripped))
    assert [(r.prompt, r.chosen, r.rejected) for r in load_records(path)] == \
        [(r.prompt, r.chosen, r.rejected) for r in load_records(HH)]
    (r,) = read_hh(stripped[4:5], conversational=False)
    assert (r.prompt, r.chosen) == ("Human: What is 17 times 6?\n\nAssistant:", " 17 times 6 is 102.")


def test_errors(tmp_path):
    p = "\n\nHuman: hi\n\nAssistant:"
    rows = [{"chosen": p + " hello", "rejected": p + " hey"},
            {"chosen": p + " hello", "rejected": p + " "},
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}]
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"hh\.jsonl:2: 'rejected' has an empty final assistant reply"):
        load_records(f)
    f.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[2])))
    with pytest.raises(DataError, match=r"hh\.jsonl:2: 'chosen' and 'rejected' differ before"):
        load_records(f)
    assert len(load_records(f, on_invalid="skip")) == 1
    # a dialogue ending on a Human turn after the last reply: that turn was trained as part of the reply (its
    # "Human: ..." text inside the assistant message), exit 0
    f.write_text(json.dumps({"chosen": p + " hello\n\nHuman: thanks", "rejected": p + " hey"}) + "\n")
    with pytest.raises(DataError, match=r"hh\.jsonl:1: 'chosen' ends on a 'Human:' turn after its last 'Assistant:' "
                                        r"reply, which would be trained as part of the reply"):
        load_records(f)


def test_margin_is_read_and_a_misspelled_or_unread_column_is_not_silent(tmp_path, caplog):
    """The HH reader read only chosen / rejected / weight: a `margin` column (read by the reward model's
    use_margin, and by every other preference reader) was dropped, a misspelled `weigth` left the weight at 1, and
    neither was said. Now margin is read, a column close to one it reads is an error naming the row, and any other
    column is one warning (as the column readers do)."""
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({**row, "margin": 3}) + "\n" + json.dumps({**row, "margin": 1.5}) + "\n")
    assert [r.margin for r in load_records(f)] == [3.0, 1.5]
    f.write_text(json.dumps({**row, "weigth": 0.2}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: unknown column 'weigth' \(did you mean 'weight'\?\)"):
        load_records(f)
    f.write_text(json.dumps({**row, "source": "web"}) + "\n")
    with caplog.at_level("WARNING"):
        assert len(load_records(f)) == 1
    assert "ignored column(s) ['source']" in caplog.text


def test_a_weight_given_in_some_rows_only_is_said_once(tmp_path, caplog):
    """The HH reader runs through the column readers' checks (`read_checked`): a weight column present in some rows
    and missing in others gets their one warning."""
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({**row, "weight": 2.0}) + "\n" + json.dumps(row) + "\n")
    with caplog.at_level("WARNING"):
        assert [r.weight for r in load_records(f)] == [2.0, 1.0]
    assert [r.getMessage() for r in caplog.records if "is given in" in r.getMessage()] == [
        f"{str(f)[:80]}: column 'weight' is given in 1 of 2 rows (the first: {f}:1); the other 1 weigh 1 (the "
        f"default) (the first: {f}:2). Give every row a weight if they should not"]


@pytest.mark.parametrize("prompt, message", [
    ("Hi there\n\nAssistant:", r"HH text must start with '\\n\\nHuman:', found 'Hi there' before the first turn"),
    ("\n\nHuman: a\n\nAssistant: b\n\nAssistant:", "the HH prompt must end with a Human turn before the final "
                                                    "Assistant reply"),
    # turns out of order or empty (these were read without a word: two user messages in a row, an empty turn)
    ("\n\nHuman: a\n\nHuman: b\n\nAssistant:", "turns 1 and 2 of the HH dialogue are both 'Human:' turns; "
                                                "HH turns alternate Human / Assistant"),
    ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant:",
     "turns 2 and 3 of the HH dialogue are both 'Assistant:' turns"),
    ("\n\nAssistant: a\n\nHuman: b\n\nAssistant:", "the HH dialogue starts with an 'Assistant:' turn"),
    ("\n\nHuman: a\n\nAssistant:\n\nHuman: b\n\nAssistant:", r"turn 2 of the HH dialogue \(a 'Assistant:' turn\) is "
                                                                 r"empty; give it its text, or drop the row"),
    ("\n\nHuman: \n\nAssistant:", r"turn 1 of the HH dialogue \(a 'Human:' turn\) is empty"),
])
@pytest.mark.parametrize("conversational", [True, False])
def test_a_malformed_dialogue_is_refused_in_both_modes(prompt, message, conversational):
    """conversational=False (text kept byte for byte) never parsed the dialogue: text before the first Human turn,
    or two Assistant turns in a row, became a prompt that conversational mode refuses (exit 0). Both modes now
    refuse it, naming the row. Turns out of order (two Human turns in a row, a leading Assistant turn) or empty were
    read in both modes without a word; now refused naming the row and the turn."""
    row = {"chosen": prompt + " yes", "rejected": prompt + " no"}
    with pytest.raises(DataError, match=rf"^<list>\[0\]: {message}"):
        load_records([row], reader="hh-rlhf", conversational=conversational)
