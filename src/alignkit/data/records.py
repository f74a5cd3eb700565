"""One record model for every objective, and the views that turn one kind into another.

A record is what a reader produces and what the tokenizer consumes. Every kind carries the prompt
(plain text, or a conversation: a list of {"role", "content"} messages), one or more responses, and a
per-sample `weight` (>= 0; reduction with weights happens once, in the trainer base). `id` says where
the record came from ("file.jsonl:12", "trees.jsonl:3 tree=... message=...") and is quoted by every
error about it; `meta` holds source facts (e.g. `tree_id` for OASST, used to split by tree).

| kind         | class              | responses                               | used by                       |
|--------------|--------------------|-----------------------------------------|-------------------------------|
| "sft"        | `SFTRecord`        | `completion`                            | SFT                           |
| "preference" | `PreferenceRecord` | `chosen`, `rejected` (+ `margin`)       | pairwise RM, DPO family, ORPO |
| "ranked"     | `RankedRecord`     | `responses`, best first (+ `ranks`)     | K-wise RM                     |
| "unpaired"   | `UnpairedRecord`   | `completion` + `label` (desirable?)     | KTO, BCO                      |
| "prompt"     | `PromptRecord`     | none                                    | online training, generation   |

Conversational records are normalised at construction: if the prompt is a conversation, a plain-text
response becomes `[{"role": "assistant", "content": text}]`. A response is never empty, nor a prompt, nor a user or
assistant message anywhere (`EMPTY_REFUSED`; a system / developer / tool message may be).

Views (`convert(records, kind)`): ranked -> all pairs (tied ranks skipped), preference -> SFT on the
chosen response, preference -> unpaired (chosen desirable, rejected not), preference -> ranked (K=2),
ranked -> SFT on the best response, anything -> prompt. A conversion that would have to drop or invent
data (e.g. SFT -> preference) is an error.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Union

from alignkit.files import DataError  # defined there (torch-free); every reader imports it from here

Message = dict[str, str]
Prompt = Union[str, list[Message]]
Completion = Union[str, list[Message]]

KINDS = ("sft", "preference", "ranked", "unpaired", "prompt")
# meta key set by the readers of rows that give the prompt in a column of its own (TRL's prompt-completion, preference,
# unpaired, ranked rows): the prompt is context, so loss_on all_assistant trains none of its assistant turns (TRL's
# completion_only_loss); a `messages` conversation or an Open-Assistant thread has every assistant turn trained
PROMPT_IS_CONTEXT = "prompt_is_context"
# meta key of an SFT record whose conversation gave some assistant turns weight 0 (ShareGPT's / axolotl's per-turn
# `weight`, read by the `messages` reader): the indices, in the record's prompt, of the assistant turns not trained
UNTRAINED_TURNS = "untrained_turns"
# the meta keys tokenization reads (which tokens are trained): two records with the same text that differ in one of
# them are trained differently, so they are not repeats of each other (alignkit.cli.data.warn_repeated)
TRAINING_META = (PROMPT_IS_CONTEXT, UNTRAINED_TURNS)


def _where(rid: str) -> str:
    return rid if rid else "record"


ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")  # roles chat templates know


MAX_WEIGHT = 3.4028234663852886e38  # float32's largest finite value: a batch's weights are float32
PART_SEPARATOR = "\n"  # joins a message's text parts: as vLLM's OpenAI server does (row V13 of docs/architecture.md)


def content_text(content: Any, rid: str, where: str) -> Any:
    """A message's content as text: a string as is; a list of text parts (`[{"type": "text", "text": ...}]`, the
    OpenAI / TRL convention) joined with `PART_SEPARATOR`, as serving joins them (`alignkit.serve.parsing`), so a
    record trains on the prompt a request of the same parts is served with. A part of another type (image, audio,
    ...) is a DataError naming the record, the message and the part: alignkit trains on text, and the part would
    otherwise be dropped or written into the prompt as a string. Anything else is returned as is (check_messages
    refuses it)."""
    if not isinstance(content, list) or not content:
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str) and kind != "text":
            raise DataError(f"{_where(rid)}: {where}.content[{j}] is a {kind!r} part, and alignkit trains on text "
                            f"only (the part would be dropped, or written into the prompt as text); remove the "
                            f"non-text parts from the record's messages, or drop the record")
        else:
            raise DataError(f"{_where(rid)}: {where}.content[{j}] must be a text part {{'type': 'text', 'text': "
                            f"str}}, got {str(part)[:80]!r}; fix the part or give the content as a string")
    return PART_SEPARATOR.join(texts)


def check_messages(value: Any, rid: str, key: str) -> list[Message]:
    """Validate a conversation: a non-empty list of {"role": str, "content": str} dicts (a content given as a list
    of text parts is joined into a string: `content_text`)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{_where(rid)}: {key!r} must be a string or a non-empty list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__} {str(value)[:60]!r}")
    if all(isinstance(m, int) for m in value):  # else "key[0] must be a dict with 'role' and 'content', got '1'"
        raise DataError(f"{_where(rid)}: {key!r} is a list of {len(value)} integers (token ids?), and alignkit reads "
                        f"text or {{'role', 'content'}} messages here; give the text, or pass data tokenized whole "
                        f"(input_ids / chosen_input_ids columns, used as they are)")
    value = [{**m, "content": content_text(m.get("content"), rid, f"{key}[{i}]")} if isinstance(m, dict) else m
             for i, m in enumerate(value)]
    for i, m in enumerate(value):
        if isinstance(m, dict) and m.get("content") is None and m.get("tool_calls"):  # OpenAI's tool-call turn
            raise DataError(f"{_where(rid)}: {key}[{i}] is a tool call (content null, 'tool_calls' "
                            f"{str(m['tool_calls'])[:60]!r}), and records keep each message's role and content only, "
                            f"so the call would be lost; write the call into the content as the model should output "
                            f"it, or drop the record")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{_where(rid)}: {key}[{i}] must be a dict with string 'role' and 'content', got "
                            f"{str(m)[:80]!r}; fix the message or convert it to {{'role': ..., 'content': ...}}")
        if m["role"] not in ROLES:
            close = difflib.get_close_matches(m["role"], ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{_where(rid)}: {key}[{i}] has role {m['role']!r}, not a chat role{hint}; use one of "
                            f"{', '.join(ROLES)}")
        if m["role"] in EMPTY_REFUSED and not m["content"].strip():
            raise empty_message(rid, f"{key}[{i}]", m)
    return [{"role": m["role"], "content": m["content"]} for m in value]


# the roles whose empty message (no text, or whitespace only) is refused: an empty user turn is a data bug (a lost
# question: the model is taught to answer nothing), an empty assistant turn teaches the model to stop at once (or, as
# context, shows it a conversation where it said nothing). TRL checks neither. A system / developer / tool message
# may be empty in sound data (an export's blank system prompt, a tool that returned nothing): it is rendered as it is.
EMPTY_REFUSED = ("user", "assistant")


def empty_message(rid: str, where: str, message: dict) -> DataError:
    """The DataError for an empty user / assistant message `where` ("messages[3]") of record `rid`."""
    calls = " (its tool_calls are dropped: alignkit trains on role and content only)" if message.get("tool_calls") \
        else ""
    harm = "a lost question, and the model learns to answer nothing" if message["role"] == "user" else \
        "the model learns to stop at once there"
    return DataError(f"{_where(rid)}: {where} is an empty {message['role']!r} message{calls}: {harm}; give it its "
                     f"text, remove the message (and the turn it answers), or drop the record")


def _check_prompt(prompt: Any, rid: str) -> Prompt:
    if isinstance(prompt, str):  # empty: the plain-text twin of an empty user message (EMPTY_REFUSED)
        if not prompt.strip():
            raise DataError(f"{_where(rid)}: 'prompt' is empty (a lost question: the model learns to answer "
                            f"nothing); remove the record or fill in the prompt")
        return prompt
    return check_messages(prompt, rid, "prompt")


def _check_response(resp: Any, prompt: Prompt, rid: str, key: str) -> Completion:
    if isinstance(resp, str):
        if not resp.strip():
            raise DataError(f"{_where(rid)}: {key!r} is empty; every response needs text to train on "
                            f"(remove the record or fill in the response)")
        return [{"role": "assistant", "content": resp}] if isinstance(prompt, list) else resp
    msgs = check_messages(resp, rid, key)
    if not any(m["content"].strip() for m in msgs):
        raise DataError(f"{_where(rid)}: {key!r} has only empty messages; fill in the response or drop the record")
    if isinstance(prompt, str):
        raise DataError(f"{_where(rid)}: {key!r} is a conversation but the prompt is plain text; make both "
                        f"conversations (prompt=[{{'role': 'user', 'content': ...}}]) or both strings")
    if not any(m["role"] == "assistant" for m in msgs):  # TRL: a conversational response is the assistant's turn(s)
        roles = sorted({m["role"] for m in msgs})
        raise DataError(f"{_where(rid)}: {key!r} has no assistant message (only {', '.join(roles)}), so there is "
                        f"nothing for the model to learn to say; put those messages in the prompt and add the "
                        f"assistant's reply to {key!r}, or drop the record")
    if msgs[0]["role"] != "assistant" and not (len(msgs) > len(prompt) and msgs[:len(prompt)] == prompt):
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        raise DataError(f"{_where(rid)}: {key!r} starts with a {msgs[0]['role']!r} message, and a response is the "
                        f"assistant's reply: the prompt is rendered up to the assistant's turn, so this record either "
                        f"stopped on a misleading token-boundary error or trained the model to write the "
                        f"{msgs[0]['role']!r} turn; move {key}[:{first}] into the prompt (chosen / rejected that "
                        f"differ before their reply answer different conversations: fix the pair or drop it)")
    if len(msgs) > len(prompt) and msgs[:len(prompt)] == prompt:
        raise DataError(f"{_where(rid)}: {key!r} starts with the whole prompt ({len(prompt)} message(s)), so the model "
                        f"would read the prompt twice and be trained on the copy inside {key!r}; drop the prompt's "
                        f"messages from {key!r} (a response holds only what follows the prompt), or for chosen / "
                        f"rejected pairs remove the 'prompt' column (their shared leading messages become the prompt)")
    return msgs


def _check_weight(weight: Any, rid: str) -> float:
    """A record's weight as a float; a DataError naming the record for a bool, a string, NaN / inf, a negative one,
    or one past float32's range (`MAX_WEIGHT`: batches keep weights in float32, where 1e39 is inf and the run stopped
    at its first step on a non-finite loss that blamed the learning rate)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or weight > MAX_WEIGHT \
            or not math.isfinite(weight):  # compared first: math.isfinite of an int past float's range raises
        raise DataError(f"{_where(rid)}: 'weight' must be a finite number >= 0, got {weight!r}"
                        + (f" (past {MAX_WEIGHT:.3g}, float32's largest: batches keep weights in float32)"
                           if isinstance(weight, (int, float)) and MAX_WEIGHT < weight < math.inf else ""))
    return float(weight)


def is_conversational(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


@dataclass
class SFTRecord:
    prompt: Prompt
    completion: Completion
    weight: float = 1.0
    id: str = field(default="", compare=False)
    meta: dict = field(default_factory=dict, compare=False)
    kind = "sft"

    def __post_init__(self):
        self.prompt = _check_prompt(self.prompt, self.id)
        self.completion = _check_response(self.completion, self.prompt, self.id, "completion")
        self.weight = _check_weight(self.weight, self.id)


@dataclass
class PreferenceRecord:
    prompt: Prompt
    chosen: Completion
    rejected: Completion
    weight: float = 1.0
    margin: float | None = None
    id: str = field(default="", compare=False)
    meta: dict = field(default_factory=dict, compare=False)
    kind = "preference"

    def __post_init__(self):
        self.prompt = _check_prompt(self.prompt, self.id)
        self.chosen = _check_response(self.chosen, self.prompt, self.id, "chosen")
        self.rejected = _check_response(self.rejected, self.prompt, self.id, "rejected")
        self.weight = _check_weight(self.weight, self.id)
        if self.margin is not None:
            m = self.margin
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise DataError(f"{_where(self.id)}: 'margin' must be a finite number or null, got {self.margin!r}")
            self.margin = float(self.margin)


@dataclass
class RankedRecord:
    """`responses` ordered best first. `ranks` (same length, non-decreasing, 0 = best) marks ties:
    equal ranks are equally good; None means strictly ordered (ranks 0, 1, 2, ...)."""
    prompt: Prompt
    responses: list[Completion]
    ranks: list[int] | None = None
    weight: float = 1.0
    id: str = field(default="", compare=False)
    meta: dict = field(default_factory=dict, compare=False)
    kind = "ranked"

    def __post_init__(self):
        self.prompt = _check_prompt(self.prompt, self.id)
        if not isinstance(self.responses, list) or len(self.responses) < 2:
            raise DataError(f"{_where(self.id)}: 'responses' must be a list of at least 2 responses (best first), "
                            f"got {str(self.responses)[:60]!r}")
        self.responses = [_check_response(r, self.prompt, self.id, f"responses[{i}]")
                          for i, r in enumerate(self.responses)]
        if self.ranks is None:
            self.ranks = list(range(len(self.responses)))
        ok = (isinstance(self.ranks, list) and len(self.ranks) == len(self.responses)
              and all(isinstance(r, int) and not isinstance(r, bool) for r in self.ranks)
              and all(a <= b for a, b in zip(self.ranks, self.ranks[1:])))
        if not ok:
            raise DataError(f"{_where(self.id)}: 'ranks' must be {len(self.responses)} non-decreasing integers "
                            f"(responses are ordered best first), got {self.ranks!r}")
        self.weight = _check_weight(self.weight, self.id)


@dataclass
class UnpairedRecord:
    prompt: Prompt
    completion: Completion
    label: bool
    weight: float = 1.0
    id: str = field(default="", compare=False)
    meta: dict = field(default_factory=dict, compare=False)
    kind = "unpaired"

    def __post_init__(self):
        self.prompt = _check_prompt(self.prompt, self.id)
        self.completion = _check_response(self.completion, self.prompt, self.id, "completion")
        if not isinstance(self.label, bool):
            raise DataError(f"{_where(self.id)}: 'label' must be true/false (desirable completion or not), "
                            f"got {self.label!r}")
        self.weight = _check_weight(self.weight, self.id)


@dataclass
class PromptRecord:
    prompt: Prompt
    weight: float = 1.0
    id: str = field(default="", compare=False)
    meta: dict = field(default_factory=dict, compare=False)
    kind = "prompt"

    def __post_init__(self):
        self.prompt = _check_prompt(self.prompt, self.id)
        self.weight = _check_weight(self.weight, self.id)


Record = Union[SFTRecord, PreferenceRecord, RankedRecord, UnpairedRecord, PromptRecord]
RECORD_CLASSES = {"sft": SFTRecord, "preference": PreferenceRecord, "ranked": RankedRecord,
                  "unpaired": UnpairedRecord, "prompt": PromptRecord}


# ----------------------------------------------------------------------------- views

def ranked_to_pairs(r: RankedRecord) -> list[PreferenceRecord]:
    """All pairs (i, j), i before j, with rank[i] < rank[j]; tied pairs are skipped. Each pair keeps the
    record's weight (InstructGPT-style K-choose-2 expansion; divide weights yourself to count a prompt once)."""
    out = []
    for i in range(len(r.responses)):
        for j in range(i + 1, len(r.responses)):
            if r.ranks[i] < r.ranks[j]:
                out.append(PreferenceRecord(r.prompt, r.responses[i], r.responses[j], weight=r.weight,
                                            id=f"{r.id} pair({i},{j})", meta=dict(r.meta)))
    return out


def preference_to_sft(r: PreferenceRecord) -> SFTRecord:
    return SFTRecord(r.prompt, r.chosen, weight=r.weight, id=r.id, meta=dict(r.meta))


def preference_to_unpaired(r: PreferenceRecord) -> list[UnpairedRecord]:
    return [UnpairedRecord(r.prompt, r.chosen, True, weight=r.weight, id=f"{r.id} chosen", meta=dict(r.meta)),
            UnpairedRecord(r.prompt, r.rejected, False, weight=r.weight, id=f"{r.id} rejected", meta=dict(r.meta))]


def preference_to_ranked(r: PreferenceRecord) -> RankedRecord:
    return RankedRecord(r.prompt, [r.chosen, r.rejected], weight=r.weight, id=r.id, meta=dict(r.meta))


def ranked_to_sft(r: RankedRecord) -> SFTRecord:
    return SFTRecord(r.prompt, r.responses[0], weight=r.weight, id=r.id, meta=dict(r.meta))


def to_prompt(r: Record) -> PromptRecord:
    return PromptRecord(r.prompt, weight=r.weight, id=r.id, meta=dict(r.meta))


def to_conversational(r: Record, role: str = "user") -> Record:
    """A plain-text record as a conversation: the prompt becomes one `role` message, responses
    become assistant messages. Conversational records are returned unchanged."""
    if is_conversational(r.prompt):
        return r
    wrap = (lambda c: [{"role": "assistant", "content": c}])
    prompt = [{"role": role, "content": r.prompt}]
    if isinstance(r, SFTRecord) or isinstance(r, UnpairedRecord):
        return replace(r, prompt=prompt, completion=wrap(r.completion))
    if isinstance(r, PreferenceRecord):
        return replace(r, prompt=prompt, chosen=wrap(r.chosen), rejected=wrap(r.rejected))
    if isinstance(r, RankedRecord):
        return replace(r, prompt=prompt, responses=[wrap(c) for c in r.responses])
    return replace(r, prompt=prompt)


_VIEWS = {
    ("ranked", "preference"): ranked_to_pairs,
    ("ranked", "sft"): ranked_to_sft,
    ("preference", "sft"): preference_to_sft,
    ("preference", "unpaired"): preference_to_unpaired,
    ("preference", "ranked"): preference_to_ranked,
}


def can_convert(src: str, dst: str) -> bool:
    return src == dst or dst == "prompt" or (src, dst) in _VIEWS


def convert(records: list[Record], kind: str) -> list[Record]:
    """Turn every record into `kind` (see the module docstring for the allowed views)."""
    if kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}; valid: {', '.join(KINDS)}")
    out: list[Record] = []
    for r in records:
        if r.kind == kind:
            out.append(r)
            continue
        fn = to_prompt if kind == "prompt" else _VIEWS.get((r.kind, kind))
        if fn is None:
            possible = sorted(k for (src, k) in _VIEWS if src == r.kind) + ["prompt"]
            raise DataError(f"{_where(r.id)}: cannot turn a {r.kind!r} record into {kind!r} records without "
                            f"inventing or dropping data; from {r.kind!r} you can get: {', '.join(possible)}")
        res = fn(r)
        out.extend(res if isinstance(res, list) else [res])
    return out
