"""Anthropic HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> preference records.

Each row has `chosen` and `rejected`, two whole dialogues that differ only in the final assistant turn (a dialogue
may start with "Human:" without the blank line before it, as exports that strip the text write it)
(optional `weight` and `margin` columns are read as the column readers read them; a column close to one of
these is an error, any other is ignored with one warning).
The prompt is their shared prefix up to and including the **last** "\\n\\nAssistant:" (both texts must
agree on it, else the row is an error); the completions are what follows it.
The dialogue's turns must alternate Human / Assistant from a Human turn, each with text (`check_turns`): else the row
is an error naming the turn.

`conversational=True` (default): the prompt becomes a list of messages ("Human" -> "user", "Assistant"
-> "assistant", multi-turn kept, the final empty assistant marker dropped) and each completion one
assistant message, all stripped of surrounding whitespace; the tokenizer's chat template formats them.
`conversational=False`: plain text, kept byte for byte: the prompt ends with "Assistant:" and each
completion starts with its leading space, as in the original data.
"""

from __future__ import annotations

import re
from typing import Any

from alignkit.data.readers.columns import read_checked, where_of
from alignkit.data.readers.registry import register_reader
from alignkit.data.readers.rows import get_field
from alignkit.data.records import DataError, Message, PreferenceRecord

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_dialogue(text: str, where: str) -> list[Message]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = _TURN.split("\n\n" + text.lstrip() if text.lstrip().startswith(HUMAN.strip()) else text)
    if parts[0].strip():
        raise DataError(f"{where}: HH text must start with {HUMAN!r}, found {parts[0][:40]!r} before the first turn")
    return [{"role": _ROLES[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]


def split_hh(text: str, where: str, key: str) -> tuple[str, str]:
    """(prompt text ending with "\\n\\nAssistant:", completion text) of one HH dialogue."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: {key!r} has no {ASSISTANT!r} turn; every HH dialogue ends with an assistant reply")
    cut += len(ASSISTANT)
    if not text[cut:].strip():
        raise DataError(f"{where}: {key!r} has an empty final assistant reply; drop the row or pass on_invalid='skip'")
    if HUMAN in text[cut:]:  # else the Human turn after the last reply was trained as part of that reply
        raise DataError(f"{where}: {key!r} ends on a {HUMAN.strip()!r} turn after its last {ASSISTANT.strip()!r} "
                        f"reply, which would be trained as part of the reply; cut the trailing Human turn, or drop the "
                        f"row (on_invalid='skip')")
    return text[:cut], text[cut:]


def check_turns(messages: list[Message], where: str) -> None:
    """DataError naming the row and the turn: a dialogue that starts with an Assistant turn, has two Human (or two
    Assistant) turns in a row, or an empty turn before the final reply. Before, these became prompts without a word:
    two user messages in a row (which one chat template renders as two turns, another refuses with a Jinja error
    naming no row) or a turn with no text the model was trained to answer after."""
    name = {"user": HUMAN.strip(), "assistant": ASSISTANT.strip()}
    if messages[0]["role"] != "user":
        raise DataError(f"{where}: the HH dialogue starts with an {name['assistant']!r} turn; HH dialogues start with "
                        f"a {name['user']!r} turn: cut the leading reply, or drop the row (on_invalid='skip')")
    for i, (a, b) in enumerate(zip(messages, messages[1:]), start=1):
        if a["role"] == b["role"]:
            raise DataError(f"{where}: turns {i} and {i + 1} of the HH dialogue are both {name[a['role']]!r} turns; HH "
                            f"turns alternate Human / Assistant: merge the two turns, or drop the row "
                            f"(on_invalid='skip')")
    empty = next((i for i, m in enumerate(messages, start=1) if not m["content"].strip()), None)
    if empty is not None:
        raise DataError(f"{where}: turn {empty} of the HH dialogue (a {name[messages[empty - 1]['role']]!r} turn) is "
                        "empty; give it its text, or drop the row (on_invalid='skip')")


def hh_to_preference(row: dict, where: str, conversational: bool = True) -> PreferenceRecord:
    chosen = get_field(row, "chosen", where, str, "an HH dialogue string")
    rejected = get_field(row, "rejected", where, str, "an HH dialogue string")
    prompt, chosen_rest = split_hh(chosen, where, "chosen")
    prompt_r, rejected_rest = split_hh(rejected, where, "rejected")
    if prompt != prompt_r:
        raise DataError(f"{where}: 'chosen' and 'rejected' differ before their last {ASSISTANT!r}; HH pairs must share "
                        f"the dialogue and differ only in the final reply")
    weight = {"weight": row["weight"]} if row.get("weight") is not None else {}
    # the dialogue's shape is checked in both modes (text mode kept text before the first Human turn, or two
    # Assistant turns in a row, that conversational mode refuses)
    messages = parse_dialogue(prompt, where)[:-1]  # drop the final, empty assistant marker
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the HH prompt must end with a Human turn before the final Assistant reply")
    check_turns(messages, where)
    if not conversational:
        return PreferenceRecord(prompt, chosen_rest, rejected_rest, margin=row.get("margin"), id=where, **weight)
    return PreferenceRecord(messages, chosen_rest.strip(), rejected_rest.strip(), margin=row.get("margin"), id=where,
                            **weight)


COLUMNS = ("chosen", "rejected", "margin", "weight")  # what an HH row may hold (others: warned, ignored)


@register_reader("hh-rlhf", kinds=("preference",), priority=20,
                 detect=lambda r: "prompt" not in r and isinstance(r.get("chosen"), str)
                 and r["chosen"].lstrip().startswith(HUMAN.strip()) and ASSISTANT in r["chosen"],
                 description="Anthropic HH-RLHF text: chosen, rejected dialogues -> preference")
def read_hh(source: Any, *, kind: str = "preference", conversational: bool = True, on_invalid: str = "raise",
            split: str | None = None) -> list[PreferenceRecord]:
    """Preference records from HH-RLHF rows (see the module docstring)."""
    return read_checked(source, split, lambda row, where: hh_to_preference(row, where, conversational), COLUMNS,
                        on_invalid, name=where_of(source))
