"""Augmentation strategies, one registry: each turns source rows into new SFT or preference records. What they
share is `sources.py`; the strategies that prompt a model are `llm_strategies.py`; code_bugs is here.

Strategies (input per row; model calls; output record):
- `code_bugs`: Python code (a `.py` file: each top-level function; JSONL: `options.field`); none: AST mutations
  (`code_bugs.py`); SFT "find and fix the bug" -> the original, or preference (chosen = original, rejected = buggy
  code)
- `paraphrase`: a prompt + completion row; `n` rewrites of the prompt; SFT: rewritten prompt -> the same completion
- `instructions`: seed tasks (prompt [+ completion]); self-instruct: a new task from `seeds_per_prompt` sampled seeds,
  then its answer; SFT: new task -> answer
- `summarize`: a document (`options.field`, or a `.txt`/`.md` file); hierarchical: each chunk summarised, then the
  summaries summarised (repeated until one chunk); SFT: "summarize" + document -> final summary
- `entities`: a text; the named entities as a JSON list; SFT: "list the entities" + text -> JSON (only entities found
  verbatim in the text)

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

import random
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from alignkit.augment.code_bugs import MUTATIONS, mutants
from alignkit.augment.llm_strategies import (EntitiesOptions, InstructionsOptions, ParaphraseOptions, SummarizeOptions,
                                             chunk_text, entities, instructions, paraphrase, parse_entities, rouge_l,
                                             summarize)
from alignkit.augment.sources import (EMPTY_SOURCE, Candidate, Context, EmptySource, Source, at_least, check_columns,
                                      check_templates, column_text, dropping_unfinished, missing_column, texts_of)


# ------------------------------------------------------------------------------------------------ code_bugs

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
            code = column_text(src.row, opt.field, src)
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


__all__ = ["Candidate", "CodeBugsOptions", "Context", "EMPTY_SOURCE", "EmptySource", "EntitiesOptions",
           "InstructionsOptions", "ParaphraseOptions", "STRATEGIES", "Source", "Strategy", "SummarizeOptions",
           "check_columns", "check_templates", "chunk_text", "code_bugs", "dropping_unfinished", "entities",
           "instructions", "missing_column", "paraphrase", "parse_entities", "register_strategy", "rouge_l",
           "summarize", "texts_of"]
