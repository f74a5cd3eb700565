"""What the augmentation strategies share: a source row (`Source`), what a strategy yields (`Candidate`), the
model and its settings (`Context`, with `Context.map` sending independent requests concurrently, results in input
order), reading a row's column (`check_columns` before any model call, `column_text` / `column_texts`, `EmptySource`),
checks of a strategy's options (`check_templates`, `at_least`) and the text clean-ups of a model's answers.
The strategies are `strategies.py` (registry, code_bugs) and `llm_strategies.py` (those that prompt a model).
"""

from __future__ import annotations

import re
import dataclasses
import string
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from alignkit.augment.llm import AnswerCutOff


@dataclass
class Source:
    id: str  # where the row came from: "file.jsonl:3" (1-based line/row) or "file.py:12" (first line)
    row: dict[str, Any]  # the row's columns ("text" for a whole .txt/.md file, "code" for a .py snippet)
    kind: str = "rows"  # "rows" (a table's row), "py" (a .py file's function: column "code"), "text" (.txt / .md)


FIXED_COLUMN = {"py": ("code", "a .py file's functions are"), "text": ("text", "a .txt / .md document is")}
EMPTY_SOURCE = "source text is empty"  # the drop reason of a row / file with nothing in its column
EMPTY_TASK = "empty task from the model"  # instructions: a proposal with no text


@dataclass
class Candidate:
    record: dict[str, Any]  # prompt + completion, or prompt + chosen + rejected
    source: str
    # strategy-specific provenance (mutation, seeds, ...)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    drop: str | None = None  # a format rule it broke


T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Context:
    llm: Any  # a ChatModel (None for strategies that need none)
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0
    concurrency: int = 1  # requests in flight at once (`map`); 1: one at a time, in order
    gate: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency: {self.concurrency!r}; it must be an integer >= 1 (1: one request at a "
                             "time)")
        if self.concurrency > 1:  # nested maps (summarize's documents, then chunks) share one bound
            self.gate = threading.BoundedSemaphore(self.concurrency)

    def ask(self, prompt: str, *, seed: int | None = None, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        kw = {"max_tokens": self.max_tokens, "temperature": self.temperature,
              "seed": self.seed if seed is None else seed}
        if self.gate is None:
            return self.llm.chat(messages, **kw).strip()
        with self.gate:
            return self.llm.chat(messages, **kw).strip()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn(item) for each item, yielded in the items' order. With concurrency 1: one after the other, in this
        thread (lazily, as a plain loop would). Above 1: up to `concurrency` calls at once on a thread pool, a
        bounded window ahead of the item being yielded. On a failure no new item is started, the calls in flight
        finish (their answers reach the cache), and the failure of the earliest item is raised."""
        if self.concurrency == 1:
            for item in items:
                yield fn(item)
            return
        window = 2 * self.concurrency
        pending: deque[Future] = deque()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="alignkit-augment")
        try:
            source = iter(items)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window and not any(
                        f.done() and f.exception() is not None for f in pending):
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                    else:
                        pending.append(pool.submit(fn, item))
                if not pending:
                    return
                head = pending[0]
                wait([head])
                if head.exception() is not None or any(f.done() and f.exception() is not None for f in pending):
                    for f in pending:
                        f.cancel()  # not started yet: never started
                    wait([f for f in pending if not f.cancelled()])
                    failed = next(f for f in pending if not f.cancelled() and f.exception() is not None)
                    raise failed.exception()  # type: ignore[misc]
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)


_END = object()


def dropping_unfinished(fn: Callable[[Any], Candidate]) -> Callable[[Any], Candidate]:
    """`fn(job)` (a job whose first item is its Source), or a candidate dropped with the reason of an answer the model
    did not finish (raised inside fn, where a `Context.map` would have stopped the run on it)."""
    def run(job: Any) -> Candidate:
        try:
            return fn(job)
        except AnswerCutOff as e:
            return Candidate({}, job[0].id, drop=e.reason)
    return run


class EmptySource(ValueError):
    """A source whose column is there but holds no text: the per-source strategies drop it (counted as
    `EMPTY_SOURCE` in summary.json), instructions' seeds stop the run on it."""


def missing_column(source: Source, key: str, option: str) -> str | None:
    """The one line for a source without the column `options.<option>` names (None: it has it). A .py / .txt /
    .md source's column is fixed, so its fix names that column; a table row's lists the columns it has."""
    if key in source.row:
        return None
    if source.kind in FIXED_COLUMN:
        column, what = FIXED_COLUMN[source.kind]
        return (f"{source.id}: options.{option} is {key!r}, but {what} read into column {column!r}; set "
                f"options.{option}: {column} (or give the sources as JSONL rows with a {key!r} column)")
    read_as = (" (ShareGPT's 'conversations' column is read as 'messages', as for training)"
               if key == "conversations" and "messages" in source.row else "")
    return (f"{source.id}: no column {key!r} (options.{option}); the row has {sorted(source.row)}{read_as}: set "
            f"options.{option} to the column that holds the text")


def check_columns(sources: list[Source], options: Any) -> None:
    """ValueError naming the first source without a column that `options` reads (`field`, `answer_field`), before
    any model call: a missing column is a wrong setting, not a bad row."""
    for f in dataclasses.fields(options):
        if f.name == "field" or f.name.endswith("_field"):
            for src in sources:
                msg = missing_column(src, getattr(options, f.name), f.name)
                if msg:
                    raise ValueError(msg)


def column_text(row: dict[str, Any], key: str, source: Source, option: str = "field") -> str:
    msg = missing_column(source, key, option)
    if msg:
        raise ValueError(msg)
    value = row.get(key)
    if isinstance(value, list):  # a conversation: the last user turn
        users = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise EmptySource(f"{source.id}: column {key!r} (options.{option}) is empty; fill it in or remove the "
                          f"{'row' if source.kind == 'rows' else 'file'}")
    if not isinstance(value, str):
        raise ValueError(f"{source.id}: column {key!r} (options.{option}) holds {type(value).__name__} "
                         f"{str(value)[:40]!r}, not text; set options.{option} to a text column")
    return value


def column_answer(row: dict[str, Any], key: str, source: Source, option: str) -> str | list:
    """The value of column `key` kept as an answer: text, or a conversation (a list of messages: the assistant
    reply of a TRL conversational row) kept whole. EmptySource when it holds nothing."""
    msg = missing_column(source, key, option)
    if msg:
        raise ValueError(msg)
    value = row.get(key)
    if value is None or (isinstance(value, (str, list)) and not "".join(texts_of(value)).strip()):
        raise EmptySource(f"{source.id}: column {key!r} (options.{option}) is empty; fill it in or remove the row")
    if not isinstance(value, (str, list)):
        raise ValueError(f"{source.id}: column {key!r} (options.{option}) holds {type(value).__name__} "
                         f"{str(value)[:40]!r}, not text or a conversation; set options.{option} to the answer column")
    return value


def texts_of(value: str | list) -> list[str]:
    """The text of a value: itself, or the contents of a conversation's messages."""
    if isinstance(value, str):
        return [value]
    return [str(m.get("content") or "") for m in value if isinstance(m, dict)]


def with_last_user_turn(value: str | list, text: str) -> str | list:
    """`value` with the text `column_text` read from it replaced by `text`: the text itself, or a conversation with its
    last user turn rewritten (the turns before it kept, so the answer still follows the conversation it answers)."""
    if not isinstance(value, list):
        return text
    last = max(i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user")
    return [*value[:last], {**value[last], "content": text}, *value[last + 1:]]


def column_texts(sources: list[Source], key: str) -> Iterator[tuple[Source, str | None]]:
    """(source, its text in column `key`), None for the text of an empty source (`EmptySource`)."""
    for src in sources:
        try:
            yield src, column_text(src.row, key, src)
        except EmptySource:
            yield src, None


def check_templates(options: Any, **spec: tuple[str, ...]) -> None:
    """ValueError naming the first template of `options` (key -> its placeholders, the first one required) that
    does not parse, lacks its required placeholder (every record would carry the same text, not the source's: exit
    0 with useless records) or names one it is not given (a KeyError mid-run)."""
    for key, names in spec.items():
        value = getattr(options, key)
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as e:
            raise ValueError(f"{key}: {value!r} is not a format string ({e}); write a literal brace as {{{{ or }}}}") \
                from None
        unknown = sorted(f for f in used if f not in names)
        if unknown:
            raise ValueError(f"{key}: unknown placeholder {{{unknown[0]}}}; it can use "
                             f"{', '.join('{' + n + '}' for n in names)} (a literal brace is {{{{ or }}}})")
        if names[0] not in used:
            raise ValueError(f"{key}: {value!r} has no {{{names[0]}}} placeholder, so every record would carry this "
                             f"same text instead of its own; put {{{names[0]}}} where the {names[0]} goes")



def at_least(options: Any, **minimum: int) -> None:
    """ValueError naming the first of `options`' integer fields below its minimum (None, where allowed, passes)."""
    for key, low in minimum.items():
        value = getattr(options, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{key}: {value!r}; it must be an integer >= {low}")


def norm_words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def strip_quotes(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" else text


def strip_numbering(text: str) -> str:
    return re.sub(r"^\s*(?:\d+[.)]|[-*])\s*", "", text.strip().splitlines()[0] if text.strip() else "")


__all__ = ["Candidate", "Context", "EMPTY_SOURCE", "EMPTY_TASK", "EmptySource", "FIXED_COLUMN", "Source", "at_least",
           "check_columns", "check_templates", "column_answer", "column_text", "column_texts", "dropping_unfinished",
           "missing_column", "norm_words", "strip_numbering", "strip_quotes", "texts_of", "with_last_user_turn"]
