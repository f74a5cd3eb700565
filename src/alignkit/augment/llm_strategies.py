"""The augmentation strategies that prompt a language model: paraphrase, instructions (self-instruct), summarize
(hierarchical) and entities; what each does is the table in `strategies.py`, which registers them.
"""

from __future__ import annotations

import json
import random
import re
import dataclasses
from dataclasses import dataclass
from typing import Iterator

from alignkit.augment.llm import AnswerCutOff
from alignkit.augment.sources import (EMPTY_SOURCE, EMPTY_TASK, Candidate, Context, EmptySource, Source, at_least,
                                      check_templates, column_answer, column_text, column_texts, dropping_unfinished,
                                      norm_words, strip_numbering, strip_quotes, with_last_user_turn)


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
                text = column_text(src.row, opt.field, src)
                answer = column_answer(src.row, opt.answer_field, src, "answer_field")
            except EmptySource:
                yield src, None, "", 0
                continue
            for k in range(opt.n):
                yield src, text, answer, k

    def rewrite(job: tuple[Source, str | None, str | list, int]) -> Candidate:
        src, text, answer, k = job
        if text is None:
            return Candidate({}, src.id, drop=EMPTY_SOURCE)
        new = strip_quotes(ctx.ask(opt.template.format(text=text), seed=ctx.seed + k))
        drop = "same as the original" if norm_words(new) == norm_words(text) else None
        return Candidate({"prompt": with_last_user_turn(src.row[opt.field], new), "completion": answer}, src.id,
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
    seeds = [(column_text(s.row, opt.field, s), s.id) for s in sources]
    if not seeds:
        return
    rng = random.Random(ctx.seed)
    pool = [t for t, _ in seeds]

    def propose(job: tuple[int, str, str]) -> str | AnswerCutOff:  # (attempt, examples, source) -> a new task
        try:
            task = ctx.ask(opt.template.format(examples=job[1]), seed=ctx.seed + job[0])
            return strip_quotes(strip_numbering(task))
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
    x, y = norm_words(a).split(), norm_words(b).split()
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

    yield from ctx.map(dropping_unfinished(one), column_texts(sources, opt.field))


# ------------------------------------------------------------------------------------------------ entities

@dataclass
class EntitiesOptions:
    field: str = "text"
    types: list[str] = dataclasses.field(
        default_factory=lambda: ["PERSON", "ORGANIZATION", "LOCATION", "DATE", "OTHER"])
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

    yield from ctx.map(dropping_unfinished(one), column_texts(sources, opt.field))


__all__ = ["EntitiesOptions", "InstructionsOptions", "ParaphraseOptions", "SummarizeOptions", "chunk_text", "entities",
           "instructions", "paraphrase", "parse_entities", "rouge_l", "summarize"]
