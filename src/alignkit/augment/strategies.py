"""Augmentation strategies, one registry: each turns source rows into new SFT or preference records.

| strategy       | input (per row)                  | model calls                                  | output record |
|----------------|----------------------------------|----------------------------------------------|---------------|
| `code_bugs`    | Python code (a `.py` file: each top-level function; JSONL: `options.field`) | none: AST mutations (`code_bugs.py`) | SFT "find and fix the bug" -> the original; or preference (chosen = original, rejected = buggy code) |
| `paraphrase`   | a prompt + completion row        | `n` rewrites of the prompt                   | SFT: rewritten prompt -> the same completion |
| `instructions` | seed tasks (prompt [+ completion]) | self-instruct: a new task from `seeds_per_prompt` sampled seeds, then its answer | SFT: new task -> answer |
| `summarize`    | a document (`options.field`, or a `.txt`/`.md` file) | hierarchical: each chunk summarised, then the summaries summarised (repeated until one chunk) | SFT: "summarize" + document -> final summary |
| `entities`     | a text                           | the named entities as a JSON list            | SFT: "list the entities" + text -> JSON (only entities found verbatim in the text) |

A strategy is `fn(sources, ctx) -> iterator of Candidate`; a candidate that breaks a strategy's own format rule
is yielded with `drop=<reason>` so the pipeline counts it (summary.json) instead of losing it silently. So is a
source whose column is empty (`EMPTY_SOURCE`; instructions' seeds refuse one instead: a seed task is hand-written);
a source without the column is a wrong `options.field` and stops the run before any model call (`check_columns`).
Options are a dataclass per strategy (`OPTIONS`), built from the config's `options:` with errors naming the key.
An answer the model did not finish (`AnswerCutOff`: cut at max_tokens, or stopped by a content filter) drops the
candidate it was for with that reason (`dropping_unfinished`; a summary: the whole document; instructions: the task
proposed, or the answer to a task, which still counts as one of the `num` made).

Concurrency (`Context.concurrency`, `llm.concurrency`): a strategy sends its independent requests through
`Context.map`, which runs up to `concurrency` of them at once and returns their results in input order, so the
candidates (and the records written) are those of a sequential run. paraphrase maps over (row, rewrite), entities
over rows, summarize over documents and, within one, over a level's chunks (a semaphore keeps the requests in
flight at `concurrency` in all); instructions asks the next min(concurrency, tasks still to make) proposals at
once (all of which a sequential run would ask too: no request is spent on speculation), then their answers.
"""

from __future__ import annotations

import json
import random
import re
import dataclasses
import string
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from alignkit.augment.code_bugs import MUTATIONS, mutants, split_functions
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
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # strategy-specific provenance (mutation, seeds, ...)
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


def _text(row: dict[str, Any], key: str, source: Source, option: str = "field") -> str:
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


def _answer(row: dict[str, Any], key: str, source: Source, option: str) -> str | list:
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


def _with_last_user_turn(value: str | list, text: str) -> str | list:
    """`value` with the text `_text` read from it replaced by `text`: the text itself, or a conversation with its
    last user turn rewritten (the turns before it kept, so the answer still follows the conversation it answers)."""
    if not isinstance(value, list):
        return text
    last = max(i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user")
    return [*value[:last], {**value[last], "content": text}, *value[last + 1:]]


def _texts(sources: list[Source], key: str) -> Iterator[tuple[Source, str | None]]:
    """(source, its text in column `key`), None for the text of an empty source (`EmptySource`)."""
    for src in sources:
        try:
            yield src, _text(src.row, key, src)
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


# ------------------------------------------------------------------------------------------------ code_bugs

def at_least(options: Any, **minimum: int) -> None:
    """ValueError naming the first of `options`' integer fields below its minimum (None, where allowed, passes)."""
    for key, low in minimum.items():
        value = getattr(options, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{key}: {value!r}; it must be an integer >= {low}")


@dataclass
class CodeBugsOptions:
    field: str = "code"  # JSONL column holding the code (.py files: each top-level function / class)
    mutations: list[str] = dataclasses.field(default_factory=lambda: list(MUTATIONS))
    per_snippet: int | None = None  # at most this many per snippet, each mutation kind in turn (seeded); None: all
    output: str = "sft"  # "sft" or "preference"
    template: str = "The following Python code has a bug. Find it and fix it.\n\n```python\n{code}```"
    answer_template: str = "```python\n{code}```"

    def __post_init__(self) -> None:
        bad = [m for m in self.mutations if m not in MUTATIONS]
        if bad:
            raise ValueError(f"mutations: unknown {bad}; valid: {', '.join(MUTATIONS)}")
        if self.output not in ("sft", "preference"):
            raise ValueError(f"output: {self.output!r}; choose sft or preference")
        if not self.mutations:  # an empty list meant every mutation (mutants' default) without a word
            raise ValueError(f"mutations: empty, so no bug would be made; name at least one of {', '.join(MUTATIONS)} "
                             "(or leave the key out for all)")
        at_least(self, per_snippet=1)
        check_templates(self, template=("code",), answer_template=("code",))


def code_bugs(sources: list[Source], ctx: Context, opt: CodeBugsOptions) -> Iterator[Candidate]:
    for src in sources:
        try:
            code = _text(src.row, opt.field, src)
        except EmptySource:
            yield Candidate({}, src.id, drop=EMPTY_SOURCE)
            continue
        code = code if code.endswith("\n") else code + "\n"
        try:
            found = mutants(code, opt.mutations)
        except SyntaxError as e:
            yield Candidate({}, src.id, drop=f"source is not valid Python ({e.msg}, line {e.lineno})")
            continue
        if opt.per_snippet is not None and len(found) > opt.per_snippet:
            found = [found[i] for i in _balanced_sample(found, opt.per_snippet, random.Random(f"{ctx.seed}:{src.id}"))]
        for m in found:
            prompt = opt.template.format(code=m.source)
            answer = opt.answer_template.format(code=code)
            record = {"prompt": prompt, "completion": answer} if opt.output == "sft" else \
                {"prompt": prompt, "chosen": answer, "rejected": opt.answer_template.format(code=m.source)}
            yield Candidate(record, src.id, {"mutation": m.mutation, "line": m.line, "before": m.before,
                                             "after": m.after})


def _balanced_sample(found: list, k: int, rng: random.Random) -> list[int]:
    """Indices of `k` mutants, taken in turn from each mutation kind (each kind's sites shuffled), so the kind
    with the most sites (usually wrong_variable) does not crowd out the others; returned in source order."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(found):
        groups.setdefault(m.mutation, []).append(i)
    for idx in groups.values():
        rng.shuffle(idx)
    picked: list[int] = []
    while len(picked) < k:
        for idx in groups.values():
            if idx and len(picked) < k:
                picked.append(idx.pop())
    return sorted(picked)


# ------------------------------------------------------------------------------------------------ paraphrase

@dataclass
class ParaphraseOptions:
    field: str = "prompt"  # the column to rewrite (text, or a conversation: its last user turn, the turns before kept)
    answer_field: str = "completion"  # the column kept as the answer (text, or a conversation kept whole)
    n: int = 1  # rewrites per row (different seeds)
    template: str = ("Rewrite the following request in different words, keeping exactly its meaning. "
                     "Reply with the rewritten request only.\n\n{text}")

    def __post_init__(self) -> None:
        at_least(self, n=1)
        check_templates(self, template=("text",))


def paraphrase(sources: list[Source], ctx: Context, opt: ParaphraseOptions) -> Iterator[Candidate]:
    def jobs() -> Iterator[tuple[Source, str | None, str | list, int]]:
        for src in sources:
            try:
                text = _text(src.row, opt.field, src)
                answer = _answer(src.row, opt.answer_field, src, "answer_field")
            except EmptySource:
                yield src, None, "", 0
                continue
            for k in range(opt.n):
                yield src, text, answer, k

    def rewrite(job: tuple[Source, str | None, str | list, int]) -> Candidate:
        src, text, answer, k = job
        if text is None:
            return Candidate({}, src.id, drop=EMPTY_SOURCE)
        new = _strip_quotes(ctx.ask(opt.template.format(text=text), seed=ctx.seed + k))
        drop = "same as the original" if _norm(new) == _norm(text) else None
        return Candidate({"prompt": _with_last_user_turn(src.row[opt.field], new), "completion": answer}, src.id,
                         {"original": text, "sample": k}, drop)

    yield from ctx.map(dropping_unfinished(rewrite), jobs())


# ------------------------------------------------------------------------------------------------ instructions

@dataclass
class InstructionsOptions:
    field: str = "prompt"  # the seed task's column
    num: int = 10  # new tasks to generate (attempts stop at 3 * num)
    seeds_per_prompt: int = 3
    max_similarity: float = 0.7  # drop a new task whose word-level ROUGE-L F1 with any task so far is above this
    template: str = ("Here are some example tasks:\n{examples}\n\nWrite one new task that is different from all of "
                     "these. Reply with the task only.")
    answer_template: str = "{task}"

    def __post_init__(self) -> None:
        at_least(self, num=1, seeds_per_prompt=1)
        check_templates(self, template=("examples",), answer_template=("task",))
        if not 0 <= self.max_similarity <= 1:
            raise ValueError(f"max_similarity: {self.max_similarity!r}; a ROUGE-L F1 bound, in [0, 1]")


def instructions(sources: list[Source], ctx: Context, opt: InstructionsOptions) -> Iterator[Candidate]:
    seeds = [(_text(s.row, opt.field, s), s.id) for s in sources]
    if not seeds:
        return
    rng = random.Random(ctx.seed)
    pool = [t for t, _ in seeds]

    def propose(job: tuple[int, str, str]) -> str | AnswerCutOff:  # (attempt, examples, source) -> a new task
        try:
            task = ctx.ask(opt.template.format(examples=job[1]), seed=ctx.seed + job[0])
            return _strip_quotes(_strip_numbering(task))
        except AnswerCutOff as e:  # returned, not raised: ctx.map would stop the run on it
            return e

    def solve(job: tuple[int, str]) -> str | AnswerCutOff:  # (attempt, task) -> its answer
        try:
            return ctx.ask(opt.answer_template.format(task=job[1]), seed=ctx.seed + job[0])
        except AnswerCutOff as e:
            return e

    made = attempt = 0
    limit = 3 * opt.num
    while made < opt.num and attempt < limit:
        # each attempt adds at most one task, so a sequential run makes the next (num - made) attempts too: asking
        # their proposals at once spends no request it would not (with concurrency 1: one attempt at a time)
        batch = []
        for a in range(attempt, attempt + min(ctx.concurrency, opt.num - made, limit - attempt)):
            picked = rng.sample(range(len(seeds)), min(opt.seeds_per_prompt, len(seeds)))
            batch.append((a, "\n".join(f"{i + 1}. {seeds[j][0]}" for i, j in enumerate(picked)),
                          ",".join(seeds[j][1] for j in picked)))
        attempt += len(batch)
        out: list[Candidate] = []
        for (a, _, source), task in zip(batch, list(ctx.map(propose, batch))):  # in order: each compared with
            if isinstance(task, AnswerCutOff):  # an unfinished task: not one of the num made
                out.append(Candidate({"prompt": task.content, "completion": ""}, source, {"attempt": a}, task.reason))
                continue
            if not task.strip():  # no task to answer: not one of the num made, and no answer asked for it
                out.append(Candidate({"prompt": task, "completion": ""}, source, {"attempt": a}, EMPTY_TASK))
                continue
            similar = max((rouge_l(task, t) for t in pool), default=0.0)    # the tasks kept before it
            if similar > opt.max_similarity:
                out.append(Candidate({"prompt": task, "completion": ""}, source, {"attempt": a},
                                     f"too similar to an existing task (ROUGE-L {similar:.2f} > {opt.max_similarity})"))
                continue
            pool.append(task)
            made += 1
            out.append(Candidate({"prompt": task, "completion": None}, source, {"attempt": a, "similarity": similar}))
        kept = [c for c in out if c.drop is None]
        for cand, answer in zip(kept, list(ctx.map(solve, [(c.extra["attempt"], c.record["prompt"]) for c in kept]))):
            if isinstance(answer, AnswerCutOff):
                cand.record["completion"], cand.drop = answer.content, answer.reason
            else:
                cand.record["completion"] = answer
        yield from out


def rouge_l(a: str, b: str) -> float:
    """Word-level ROUGE-L F1 (longest common subsequence), as self-instruct uses to drop near-duplicate tasks."""
    x, y = _norm(a).split(), _norm(b).split()
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------------------------------------ summarize

@dataclass
class SummarizeOptions:
    field: str = "text"
    chunk_chars: int = 2000  # a chunk: whole paragraphs (then sentences, then words) up to this many characters
    max_levels: int = 4  # summary-of-summaries rounds at most
    template: str = "Summarize the following text in a few sentences.\n\n{text}"
    combine_template: str = ("Here are summaries of consecutive parts of one document. Write one summary of the "
                             "whole document.\n\n{text}")
    prompt_template: str = "Summarize the following text.\n\n{text}"  # the output record's prompt

    def __post_init__(self) -> None:
        at_least(self, chunk_chars=1, max_levels=1)  # chunk_text never ended with a size below 1
        check_templates(self, template=("text",), combine_template=("text",), prompt_template=("text",))


def chunk_text(text: str, size: int) -> list[str]:
    """Consecutive chunks of at most `size` characters, cut at paragraph, then sentence, then word boundaries."""
    pieces: list[str] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text.strip())):
        if len(para) <= size:
            pieces.append(para)
            continue
        for sent in re.split(r"(?<=[.!?])\s+", para):
            while len(sent) > size:
                cut = sent.rfind(" ", 0, size)
                cut = cut if cut > 0 else size
                pieces.append(sent[:cut])
                sent = sent[cut:].lstrip()
            pieces.append(sent)
    chunks: list[str] = []
    for p in pieces:
        if chunks and len(chunks[-1]) + 2 + len(p) <= size:
            chunks[-1] += "\n\n" + p
        elif p:
            chunks.append(p)
    return chunks


def summarize(sources: list[Source], ctx: Context, opt: SummarizeOptions) -> Iterator[Candidate]:
    def one(job: tuple[Source, str | None]) -> Candidate:
        src, text = job
        if text is None:
            return Candidate({}, src.id, drop=EMPTY_SOURCE)
        chunks = chunk_text(text, opt.chunk_chars)
        summaries = list(ctx.map(lambda c: ctx.ask(opt.template.format(text=c)), chunks))
        levels = 1
        # an empty reply for one part would leave that part out of the final summary (and an all-empty level left
        # nothing to summarise: IndexError): the document is dropped, counted by its level
        while all(summaries) and len(summaries) > 1 and levels < opt.max_levels:
            groups = chunk_text("\n\n".join(summaries), opt.chunk_chars)
            summaries = list(ctx.map(lambda g: ctx.ask(opt.combine_template.format(text=g)), groups))
            levels += 1
        drop = (f"empty summary from the model (level {levels})" if not all(summaries) else
                None if len(summaries) == 1 else f"still {len(summaries)} summaries after {opt.max_levels} levels")
        return Candidate({"prompt": opt.prompt_template.format(text=text),
                          "completion": summaries[0] if drop is None else ""}, src.id,
                         {"chunks": len(chunks), "levels": levels}, drop)

    yield from ctx.map(dropping_unfinished(one), _texts(sources, opt.field))


# ------------------------------------------------------------------------------------------------ entities

@dataclass
class EntitiesOptions:
    field: str = "text"
    types: list[str] = dataclasses.field(default_factory=lambda: ["PERSON", "ORGANIZATION", "LOCATION", "DATE", "OTHER"])
    template: str = ("List the named entities in the text below as a JSON array of objects with keys \"text\" "
                     "(exactly as written in the text) and \"type\" (one of {types}). Reply with the JSON only."
                     "\n\nText: {text}")
    prompt_template: str = ("List the named entities in the text below as a JSON array of objects with keys "
                            "\"text\" and \"type\" (one of {types}).\n\nText: {text}")

    def __post_init__(self) -> None:
        check_templates(self, template=("text", "types"), prompt_template=("text", "types"))
        if not self.types or not all(isinstance(t, str) and t.strip() for t in self.types):
            raise ValueError(f"types: {self.types!r}; name at least one entity type (e.g. [PERSON, LOCATION]), each a "
                             "non-empty string: an entity is kept only if its type is one of them")


def parse_entities(reply: str, text: str, types: list[str]) -> tuple[list[dict[str, str]], str | None]:
    """(entities, None) from a model's reply, or ([], reason). Kept: objects with a string `text` found
    verbatim in the source text and a `type` in `types` (compared case-insensitively, written as `types` spells
    it: the prompt shows the model the configured spelling); duplicates removed, order kept."""
    match = re.search(r"\[.*\]", reply, re.S)
    if match is None:
        return [], "no JSON array in the reply"
    try:
        items = json.loads(match.group(0))
    except json.JSONDecodeError as e:
        return [], f"reply is not valid JSON ({e.msg})"
    out, seen = [], set()
    spelled = {t.strip().upper(): t.strip() for t in types}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            continue
        name, kind = item["text"].strip(), spelled.get(str(item.get("type", "")).strip().upper())
        if name and name in text and kind is not None and (name, kind) not in seen:
            seen.add((name, kind))
            out.append({"text": name, "type": kind})
    return (out, None) if out else ([], "no entity of the reply occurs in the text with a valid type")


def entities(sources: list[Source], ctx: Context, opt: EntitiesOptions) -> Iterator[Candidate]:
    types = ", ".join(opt.types)

    def one(job: tuple[Source, str | None]) -> Candidate:
        src, text = job
        if text is None:
            return Candidate({}, src.id, drop=EMPTY_SOURCE)
        found, drop = parse_entities(ctx.ask(opt.template.format(text=text, types=types)), text, opt.types)
        return Candidate({"prompt": opt.prompt_template.format(text=text, types=types),
                          "completion": json.dumps(found, ensure_ascii=False)}, src.id, {"entities": len(found)}, drop)

    yield from ctx.map(dropping_unfinished(one), _texts(sources, opt.field))


# ------------------------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable[[list[Source], Context, Any], Iterator[Candidate]]
    options: type
    needs_llm: bool
    output: str  # record kind written: "sft", or "sft or preference" (code_bugs' options.output)
    # de-duplication compares exact text (code: `x < lo` and `x >= lo` are different records), not the
    # case- and punctuation-folded text that catches prose near-duplicates
    exact_dedup: bool = False


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("code_bugs", code_bugs, CodeBugsOptions, False, "sft or preference", exact_dedup=True),
    Strategy("paraphrase", paraphrase, ParaphraseOptions, True, "sft"),
    Strategy("instructions", instructions, InstructionsOptions, True, "sft"),
    Strategy("summarize", summarize, SummarizeOptions, True, "sft"),
    Strategy("entities", entities, EntitiesOptions, True, "sft"),
)}


def register_strategy(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _strip_quotes(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" else text


def _strip_numbering(text: str) -> str:
    return re.sub(r"^\s*(?:\d+[.)]|[-*])\s*", "", text.strip().splitlines()[0] if text.strip() else "")


__all__ = ["Candidate", "CodeBugsOptions", "Context", "EMPTY_SOURCE", "EmptySource", "EntitiesOptions",
           "InstructionsOptions", "ParaphraseOptions", "STRATEGIES", "Source", "Strategy", "SummarizeOptions",
           "check_columns", "check_templates", "chunk_text", "dropping_unfinished", "missing_column", "parse_entities", "register_strategy", "rouge_l",
           "texts_of"]
