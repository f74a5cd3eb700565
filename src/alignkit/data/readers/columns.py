"""Readers for the column conventions people use with TRL (plus `responses` for ranked data).

| reader               | columns                                   | record            |
|----------------------|-------------------------------------------|-------------------|
| `messages`           | messages (last message = assistant turn)  | SFTRecord         |
| `prompt-completion`  | prompt, completion                        | SFTRecord         |
| `preference`         | prompt, chosen, rejected                  | PreferenceRecord  |
| `preference-implicit`| chosen, rejected (prompt = shared prefix) | PreferenceRecord  |
| `unpaired`           | prompt, completion, label                 | UnpairedRecord    |
| `ranked`             | prompt, responses (best first) [, ranks]  | RankedRecord      |
| `prompt`             | prompt                                    | PromptRecord      |

Every value may be plain text or a conversation (a list of {"role", "content"} messages; a message's other keys, such as
`name` or `tool_calls`, are dropped with one warning per file). A `messages` conversation's messages may carry a
per-turn `weight` (ShareGPT's / axolotl's: 1 train the turn, 0 do not; null: the default): an assistant turn with weight
0 is context (`records.UNTRAINED_TURNS`), the turns after the last trained one are left out (a causal LM's loss on the
turns before does not depend on them; read as prompts, a conversation is every message before its final assistant turn,
whatever the weights); another value, weight 1 on a turn that is not the assistant's, or no trained turn is an error
naming the row. Optional columns: `weight` (a number >= 0, default 1) everywhere, `margin` for preference data; a
column named as a weight otherwise (`sample_weight`, `loss_weight`: `names_a_weight`) is an error naming the row, its
weights would be ignored. Other columns are ignored, except by the `prompt` reader, which keeps them in
`meta["columns"]` (e.g. a reference `answer`): reward functions written for TRL get them as keyword arguments
(`FunctionAnnotator`); prompts read from rows with responses (prompt-completion, preference, unpaired, ranked) go
through the `prompt` reader too. TRL's vision columns
(`images`, `image`) holding a value are an error: alignkit trains text-only models; so are `tools` and
`chat_template_kwargs` holding a value (TRL passes them to the chat template; records keep messages only). The columns
alignkit itself writes beside a record (`id`, `meta`: annotate's records.jsonl, augment's output) are skipped silently
by the training readers; the `prompt` reader keeps them with the other columns, as TRL's GRPOTrainer passes every column
but prompt and completion (a reward function without `**kwargs` gets only the keywords it names).

ShareGPT rows (`conversations`: [{"from": "human" | "gpt" | "system", "value": ...}]) are read as TRL reads them
(`maybe_convert_to_chatml`): `conversations` is `messages`, and a {"from", "value"} message in any column is
{"role", "content"}, the speaker mapped to its role (human/user -> user, gpt/assistant/model -> assistant,
system -> system, tool/observation (a tool's result) -> tool; a tool call (`function_call`) is an error saying how to
write it, and so is any other speaker, naming the row and the value).

Implicit prompts (TRL's `extract_prompt` convention, made token-friendly): for conversations, the
longest run of equal leading messages; for text, the longest common character prefix, moved back to the
start of the word where chosen and rejected differ and before the whitespace in front of it, so the
completions start with that whitespace (" 4" / " 5" after "The answer is") and BPE does not merge
across the boundary. No shared prefix, or one response being a prefix of the other, is an error.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

from alignkit.data.readers.notes import DEFAULTED, PartialColumns, ReaderNotes
from alignkit.data.readers.registry import register_reader
from alignkit.data.readers.rows import collect, get_field, iter_rows, source_name
from alignkit.data.records import (
    PROMPT_IS_CONTEXT, UNTRAINED_TURNS, DataError, PreferenceRecord, PromptRecord, RankedRecord, SFTRecord,
    UnpairedRecord,
    check_messages,
)

RESPONSE_COLUMNS = ("completion", "chosen", "rejected", "responses", "messages")  # a row without them is prompts


def _opt(row: dict) -> dict:
    return {"weight": row["weight"]} if row.get("weight") is not None else {}


def _given(row: dict) -> dict:
    """The keyword arguments of a record whose row gives its prompt in a column of its own: `_opt`, and the prompt
    marked as context (`PROMPT_IS_CONTEXT`: its assistant turns are not trained by default, TRL's meaning)."""
    return {**_opt(row), "meta": {PROMPT_IS_CONTEXT: True}}


def _req(row: dict, key: str, where: str) -> Any:
    """A required column's value; missing or null is an error naming the row and the fix (types are checked
    by the record classes)."""
    if row.get(key) is None:  # a null is said as such: "missing field 'chosen' (row has [..., 'chosen', ...])" read odd
        what = f"field {key!r} is null (no value)" if key in row else f"missing field {key!r} (row has {sorted(row)})"
        raise DataError(f"{where}: {what}; every row of this file needs {key!r} like the first row, or remove the row")
    return row[key]


def _prompt_column(row: dict, where: str) -> Any:
    """The `prompt` column's value (`_req`); a conversation ending on an assistant message is a DataError: TRL reads
    it as the start of the reply, for the model to continue (apply_chat_template's continue_final_message), and
    alignkit renders no such prefill: each response (or sample) would follow it as a new assistant turn."""
    prompt = _req(row, "prompt", where)
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        raise DataError(f"{where}: 'prompt' ends with an assistant message, which TRL reads as the start of the reply "
                        f"for the model to continue (a prefill); alignkit renders no prefill, so the reply would be "
                        f"trained and sampled as a new assistant turn after it; end the prompt with the user's turn "
                        f"(a prefill's text goes at the start of each response), or drop the row")
    return prompt


def _is_value(v: Any) -> bool:
    return isinstance(v, (str, list))


def split_shared_prefix(chosen: Any, rejected: Any, where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen_rest, rejected_rest) from two full texts or conversations sharing a prompt."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no leading message, so there is no implicit "
                            f"prompt; add a 'prompt' column")
        if k == len(chosen) or k == len(rejected):
            raise DataError(f"{where}: one of 'chosen'/'rejected' is a prefix of the other (empty response); "
                            f"fix the pair or drop it")
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == len(chosen) or k == len(rejected):
            raise DataError(f"{where}: one of 'chosen'/'rejected' is a prefix of the other (empty response); "
                            f"fix the pair or drop it")
        while k > 0 and not chosen[k - 1].isspace() and not chosen[k].isspace():
            k -= 1  # back to the start of the differing word
        while k > 0 and chosen[k - 1].isspace():
            k -= 1  # and before the whitespace in front of it
        if k == 0:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt text; add a 'prompt' column")
        return chosen[:k], chosen[k:], rejected[k:]
    raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both conversations, got "
                    f"{type(chosen).__name__} and {type(rejected).__name__}")


# ShareGPT's speakers (`conversations`: [{"from": ..., "value": ...}]) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "observation": "tool"}
# speakers of a tool CALL (LLaMA-Factory's function_call: the assistant's call as JSON text, which it renders in the
# template's tool-call format): records keep role and content only, so read as an assistant turn the model would be
# trained to write the bare JSON, not the call the template (and the serving stack) expects
SHAREGPT_TOOL_CALLS = ("function_call",)
# the columns that may hold a conversation (or, `responses`, a list of them)
CONVERSATION_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


def _from_sharegpt(messages: Any, where: str, col: str) -> Any:
    """`messages` with each ShareGPT message ({"from", "value"}, no "role") as {"role", "content"} (other keys kept:
    they are counted as dropped keys like any message's); anything else unchanged."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "from" in m and m.get("role") is None:
            speaker = m["from"]
            if speaker in SHAREGPT_TOOL_CALLS:
                raise DataError(f"{where}: {col}[{i}] has 'from' {speaker!r}, a tool call, and alignkit keeps each "
                                f"message's role and content only: it would train the bare call text, not the chat "
                                f"template's tool-call format; write the call into an assistant ('gpt') message as the "
                                f"model should output it, or drop the row")
            if speaker not in SHAREGPT_ROLES:
                raise DataError(f"{where}: {col}[{i}] has 'from' {str(speaker)[:40]!r}, not a ShareGPT speaker "
                                "alignkit maps to a chat role "
                                f"({', '.join(f'{k} -> {v}' for k, v in SHAREGPT_ROLES.items())}); change it to one of "
                                "them, or give the message a 'role'")
            rest = {k: v for k, v in m.items() if k not in ("from", "value", "role", "content")}
            m = {"role": SHAREGPT_ROLES[speaker], "content": m.get("value", m.get("content")), **rest}
        out.append(m)
    return out


def from_sharegpt(row: dict, where: str) -> dict:
    """A row in ShareGPT's form as the same row in TRL's (TRL's `maybe_convert_to_chatml`, with the speakers mapped to
    chat roles: `SHAREGPT_ROLES`): `conversations` becomes `messages`, and every {"from", "value"} message of a column
    holding a conversation becomes {"role", "content"}. Rows without them are returned as they are."""
    if "conversations" in row and "messages" in row:
        raise DataError(f"{where}: the row has both 'messages' and 'conversations' (ShareGPT's name for them); keep "
                        f"one of the two columns")
    if not any(c in row for c in (*CONVERSATION_COLUMNS, "responses")):
        return row
    out = {("messages" if k == "conversations" else k): v for k, v in row.items()}
    for col in CONVERSATION_COLUMNS:
        if col in row:
            key = "messages" if col == "conversations" else col
            out[key] = _from_sharegpt(row[col], where, col)
    if isinstance(row.get("responses"), list):
        out["responses"] = [_from_sharegpt(r, where, f"responses[{i}]") for i, r in enumerate(row["responses"])]
    return out


def turn_weights(raw: list, msgs: list[dict], where: str) -> list[bool]:
    """Whether each message of a conversation is trained by its own `weight` key (ShareGPT's / axolotl's per-turn
    weight: 1 train, 0 do not; missing or null: the default, an assistant turn trained and any other turn not). A
    weight other than 0 / 1, or 1 on a turn that is not the assistant's, is a DataError naming the message."""
    out = []
    for i, (m, msg) in enumerate(zip(raw, msgs)):
        w = m.get("weight")
        assistant = msg["role"] == "assistant"
        if w is None:
            out.append(assistant)
            continue
        if not isinstance(w, (int, float)) or w not in (0, 1):
            raise DataError(f"{where}: messages[{i}] has 'weight' {repr(w)[:40]}; a turn's weight is 0 (not trained) "
                            f"or 1 (trained): give a whole row a weight with the row's 'weight' column")
        if w == 1 and not assistant:
            raise DataError(f"{where}: messages[{i}] is a {msg['role']!r} turn with 'weight' 1, and alignkit trains "
                            f"assistant turns (data.loss_on); set it to 0 or null (or data.loss_on=all to train "
                            f"every token)")
        out.append(w == 1)
    return out


def _conversation(row: dict, where: str) -> tuple[list[dict], list[bool]]:
    """A `messages` row's checked messages and whether each is trained (`turn_weights`)."""
    raw = get_field(row, "messages", where, list, "a list of {'role', 'content'} messages")
    msgs = check_messages(raw, where, "messages")
    last = msgs[-1] if msgs else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise DataError(f"{where}: the last message of 'messages' must be the assistant turn to train on, got "
                        f"{str(last)[:60]!r}; end each conversation with an assistant message")
    if len(msgs) < 2:
        raise DataError(f"{where}: 'messages' needs at least one message before the final assistant turn")
    return msgs, turn_weights(raw, msgs, where)


def _messages_prompt(row: dict, where: str) -> PromptRecord:
    """A `messages` row read as a prompt (online commands, sample, generate): the conversation before its final
    assistant turn, which the policy answers anew. Per-turn weights say which replies supervised training imitates,
    and a prompt trains none, so they do not cut it (read as SFT, a conversation ends at its last trained turn: its
    prompt would have dropped the turns after, the last question included)."""
    msgs, _ = _conversation(row, where)
    return PromptRecord(msgs[:-1], id=where, **_opt(row))


def _messages(row: dict, where: str) -> SFTRecord:
    msgs, trained = _conversation(row, where)
    if not any(trained):
        raise DataError(f"{where}: every assistant turn of 'messages' has 'weight' 0, so nothing would be trained; "
                        f"give the turns to train 'weight' 1, or remove the row")
    end = max(i for i, t in enumerate(trained) if t)  # the turns after the last trained one add nothing to train
    untrained = [i for i, (m, t) in enumerate(zip(msgs[:end], trained)) if m["role"] == "assistant" and not t]
    return SFTRecord(msgs[:end], [msgs[end]], id=where, meta={UNTRAINED_TURNS: untrained} if untrained else {},
                     **_opt(row))


def _prompt_completion(row: dict, where: str) -> SFTRecord:
    return SFTRecord(_prompt_column(row, where), _req(row, "completion", where), id=where, **_given(row))


def _preference(row: dict, where: str) -> PreferenceRecord:
    return PreferenceRecord(_prompt_column(row, where), _req(row, "chosen", where), _req(row, "rejected", where),
                            margin=row.get("margin"), id=where, **_given(row))


def _preference_implicit(row: dict, where: str) -> PreferenceRecord:
    chosen, rejected = _req(row, "chosen", where), _req(row, "rejected", where)
    prompt, chosen, rejected = split_shared_prefix(chosen, rejected, where)
    return PreferenceRecord(prompt, chosen, rejected, margin=row.get("margin"), id=where, **_opt(row))


def _unpaired(row: dict, where: str) -> UnpairedRecord:
    label = _req(row, "label", where)
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    return UnpairedRecord(_prompt_column(row, where), _req(row, "completion", where), label, id=where,
                          **_given(row))


def _ranked(row: dict, where: str) -> RankedRecord:
    responses = get_field(row, "responses", where, list, "a list of responses, best first")
    return RankedRecord(_prompt_column(row, where), responses, ranks=row.get("ranks"), id=where, **_given(row))


def _prompt(row: dict, where: str) -> PromptRecord:
    columns = {k: v for k, v in row.items() if k not in ("prompt", "weight")}
    return PromptRecord(_prompt_column(row, where), id=where, meta={"columns": columns} if columns else {},
                        **_opt(row))


# columns each reader reads (besides these, a column close to one of them is an error: a misspelling)
COLUMNS = {"messages": ("messages", "weight"), "prompt_completion": ("prompt", "completion", "weight"),
           "preference": ("prompt", "chosen", "rejected", "margin", "weight"),
           "preference_implicit": ("chosen", "rejected", "margin", "weight"),
           "unpaired": ("prompt", "completion", "label", "weight"),
           "ranked": ("prompt", "responses", "ranks", "weight"),
           "prompt": ("prompt", "weight")}


# TRL's vision columns: the text of such a row refers to images alignkit never reads (it trains text-only models)
IMAGE_COLUMNS = ("images", "image")
# columns TRL passes to the chat template (apply_chat_template(messages, tools=..., **chat_template_kwargs)): records
# keep messages only, so the text would be rendered without what these add (tool definitions, enable_thinking, ...)
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
# columns alignkit itself writes beside the record's (`annotate`'s records.jsonl: id, meta; `augment`: meta): the
# reader names a record by its place in the file, so they are skipped without the "ignored column" warning
OWN_COLUMNS = ("id", "meta")


def _holds(value: Any) -> bool:
    """Whether a column's value says something (a Parquet null or an empty list / dict / string does not)."""
    return value not in (None, [], {}, "")


def check_columns(row: dict, where: str, known: tuple[str, ...], unknown: dict[str, int]) -> None:
    """Policy for columns a reader does not read: alignkit's own (`OWN_COLUMNS`) are skipped; chat-template columns
    (`TEMPLATE_COLUMNS`) and images (`IMAGE_COLUMNS`) holding a value are an error, the text would be trained or
    sampled rendered without them / without the images it describes; one whose name is close to a column it reads
    (`weigth`, `chossen`), or named as a weight (`sample_weight`), is an error with a did-you-mean; any other is
    counted into `unknown` (ignored, and reported in one warning per file, except by the `prompt` reader, which keeps
    extra columns for reward functions)."""
    for col in row:
        if col in known or col in OWN_COLUMNS:
            continue
        if col in TEMPLATE_COLUMNS:
            if not _holds(row[col]):
                continue  # null or empty (a Parquet column's padding): nothing to render
            raise DataError(f"{where}: column {col!r} holds a value TRL passes to the chat template "
                            f"(apply_chat_template(..., {'tools=' if col == 'tools' else '**'}{col})), and alignkit "
                            f"renders each conversation's messages alone, so the {col!r} of this row would be dropped "
                            f"and the model trained on text rendered without it; fold it into the messages (e.g. the "
                            f"tool descriptions into the system message), or drop the {col!r} column")
        if col in IMAGE_COLUMNS and _holds(row[col]):
            raise DataError(f"{where}: column {col!r} holds images (TRL's vision-language format), and alignkit trains "
                            f"text-only models, so the text would be trained without the images it refers to; use "
                            f"rows without images, or drop the {col!r} column to train on the text alone")
        close = difflib.get_close_matches(str(col), known, n=1, cutoff=0.75)
        if close:
            raise DataError(f"{where}: unknown column {col!r} (did you mean {close[0]!r}?); rename it, or remove it")
        if "weight" in known and names_a_weight(col):
            raise DataError(f"{where}: unknown column {col!r} (did you mean 'weight'?); alignkit reads a record's "
                            f"weight from the 'weight' column only, so these weights would be ignored: rename it to "
                            f"'weight', or remove it")
        unknown[col] = unknown.get(col, 0) + 1


def where_of(source: Any) -> str:
    """How the readers' warnings name `source`: a trainer's map batch (`NamedRows`) by its rows ("train_dataset rows
    0-999"; its repr was the first row's text), a file by its whole path (cut, a long one named another file), anything
    else by its type, as the readers' errors name it ("<Dataset>", "<list>"): its text, cut at 80 characters, broke a
    `datasets.Dataset`'s warning over three lines ("Dataset({\n    features: [...],\n    num_rows: column 'weight'
    is given in ...") and named a list by its first row's text."""
    return str(source) if isinstance(source, (str, os.PathLike)) else source_name(source)


def names_a_weight(column: Any) -> bool:
    """Whether a column's name says it holds per-record weights under another name than `weight`: a word of it (split
    at `_`, `-`, `.`, spaces and lower-to-upper case changes) is `weight` / `weights` (`sample_weight`, TRL-less
    exports' `loss_weight`, `sampleWeight`). Too far from `weight` for the did-you-mean above, such a column was only
    counted among the ignored ones: every record trained with weight 1, after one warning."""
    words = re.split(r"[\W_]+|(?<=[a-z0-9])(?=[A-Z])", str(column))
    return any(w.lower() in ("weight", "weights") for w in words)


MESSAGE_KEYS = ("role", "content")  # what a record keeps of each message (alignkit.data.records.check_messages)


def count_message_keys(row: dict, dropped: dict[str, int], read: tuple[str, ...] = MESSAGE_KEYS) -> None:
    """Count into `dropped` the keys of the row's messages (in any column holding a conversation, or a list of
    them: `responses`) other than those `read` (role and content; the `messages` reader's per-turn weight too) that
    hold a value: the records keep role and content only, so `name`, `tool_calls`, ... never reach the chat
    template. A null value (a Parquet struct's padding) is not one."""
    for value in row.values():
        for item in value if isinstance(value, list) else ():
            for m in item if isinstance(item, list) else [item]:
                if isinstance(m, dict) and "role" in m:
                    for key, v in m.items():
                        if key not in read and v is not None:
                            dropped[key] = dropped.get(key, 0) + 1


def read_checked(source: Any, split: str | None, convert: Any, known: tuple[str, ...], on_invalid: str, *,
                 name: str, warn_unknown: bool = True, message_keys: tuple[str, ...] = MESSAGE_KEYS) -> list:
    """`convert(row, where)` over the rows of `source`, each row's columns checked against `known`
    (`check_columns`), then one warning per file for the columns no reader read (unless `warn_unknown` is False),
    for an optional column given in some rows only (`PartialColumns`) and for the message keys dropped
    (`ReaderNotes.warn`). Every column reader runs through it."""
    unknown: dict[str, int] = {}
    dropped: dict[str, int] = {}
    partial = PartialColumns(tuple(c for c in DEFAULTED if c in known))

    def checked(row: dict, where: str) -> Any:
        row = from_sharegpt(row, where)
        check_columns(row, where, known, unknown)
        record = convert(row, where)
        partial.add(row, where)
        count_message_keys({k: v for k, v in row.items() if k in known}, dropped, message_keys)
        return record

    out = collect(iter_rows(source, split), checked, on_invalid, name=name)
    ReaderNotes(unknown if warn_unknown else {}, dropped, partial).warn(where_of(source))
    return out


def _reader(convert):
    known = COLUMNS[convert.__name__.strip("_")]

    def read(source: Any, *, kind: str | None = None, on_invalid: str = "raise", split: str | None = None) -> list:
        fn = _messages_prompt if convert is _messages and kind == "prompt" else convert
        return read_checked(source, split, fn, known, on_invalid, name=where_of(source),
                            warn_unknown=convert is not _prompt,
                            message_keys=(*MESSAGE_KEYS, "weight") if convert is _messages else MESSAGE_KEYS)
    read.__doc__ = f"Read rows with {convert.__name__.strip('_')} columns into records."
    return read


# the readers of this module: name, record kind, priority, detect(row), columns -> record, description
COLUMN_READERS = (
    ("messages", ("sft", "prompt"), 10,
     lambda r: ("messages" in r or "conversations" in r) and "prompt" not in r, _messages,
     "messages (conversation ending on the assistant turn; ShareGPT's conversations too) -> sft (prompt: the "
     "messages before the final assistant turn)"),
    ("prompt-completion", "sft", 10, lambda r: _is_value(r.get("prompt")) and "completion" in r and "label" not in r,
     _prompt_completion, "prompt, completion -> sft"),
    ("preference", "preference", 10, lambda r: _is_value(r.get("prompt")) and "chosen" in r and "rejected" in r,
     _preference, "prompt, chosen, rejected [, margin] -> preference"),
    ("preference-implicit", "preference", 10, lambda r: "chosen" in r and "rejected" in r and "prompt" not in r,
     _preference_implicit, "chosen, rejected (prompt = their shared prefix) -> preference"),
    ("unpaired", "unpaired", 10, lambda r: _is_value(r.get("prompt")) and "completion" in r and "label" in r,
     _unpaired, "prompt, completion, label -> unpaired"),
    ("ranked", "ranked", 10, lambda r: _is_value(r.get("prompt")) and "responses" in r,
     _ranked, "prompt, responses (best first) [, ranks] -> ranked"),
    ("prompt", "prompt", 0, lambda r: _is_value(r.get("prompt")) and not any(c in r for c in RESPONSE_COLUMNS),
     _prompt, "prompt only (a JSONL of strings too) -> prompt"),
)
# the readers of rows with a `prompt` column beside their responses: read for prompts, such rows go to the `prompt`
# reader, which keeps the other columns (alignkit.data.readers.reader_of)
WITH_PROMPT_COLUMN = ("prompt-completion", "preference", "unpaired", "ranked")
for _name, _kind, _priority, _detect, _convert, _description in COLUMN_READERS:
    register_reader(_name, kinds=_kind if isinstance(_kind, tuple) else (_kind,), priority=_priority, detect=_detect,
                    description=_description)(_reader(_convert))
