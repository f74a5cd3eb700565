"""Run one augmentation: read sources -> strategy -> filters -> JSONL records with provenance.

    sources (JSONL/JSON/Parquet rows, .py files split into functions, .txt/.md files as one document)
      -> STRATEGIES[name].run(sources, Context(llm), options)       candidates
      -> format rule (the strategy's own), an answer the model did not finish (cut at max_tokens, content filter:
       dropped, counted and warned about), length and printable-text filters, de-duplication
      -> <output_dir>/augmented.jsonl  (+ summary.json: counts, drops by reason, requests, cache hits)

Each output line is an alignkit record (the `prompt-completion` or `preference` reader reads it) plus
`meta`: {"strategy", "source" (file:line or file:first line of the snippet), "model" (the LLM's name; null
for code_bugs), ...the strategy's own provenance}. De-duplication is on the normalised record text
(lowercase, punctuation and runs of whitespace folded; exact text for code_bugs, whose records differ by an operator),
first occurrence kept.

`concurrency` (> 1: an OpenAI-compatible endpoint only) sends up to that many requests at once; the candidates
come back in input order (`Context.map`), so the file written is the sequential run's. The records are written
once, atomically, at the end: a run that fails (a request that failed after its retries) leaves `out_path` as it
was, and the answers it did get are in the cache for the next run.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from alignkit.augment.code_bugs import split_functions
from alignkit.augment.llm import UNFINISHED
from alignkit.augment.sources import norm_words
from alignkit.augment.strategies import STRATEGIES, Candidate, Context, Source, check_columns, texts_of
from alignkit.files import DataError, atomic_write_jsonl

logger = logging.getLogger(__name__)


@dataclass
class Filters:
    min_chars: int = 1  # every generated text field (prompt, completion / chosen, rejected) at least this long
    max_chars: int | None = 20000
    dedup: bool = True
    printable: bool = True  # drop text holding control characters (other than newline, tab) or U+FFFD


_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


@dataclass
class AugmentResult:
    path: Path
    written: int
    candidates: int
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return f"{self.written} record(s) written from {self.candidates} candidate(s); dropped: {drops}"


def read_sources(paths: Iterable[str], max_rows: int | None = None, per_path: int | None = None) -> list[Source]:
    """Sources from files: tables by row (alignkit's row readers, each row in TRL's form as training reads it:
    ShareGPT's `conversations` of {"from", "value"} messages become `messages` of {"role", "content"}), `.py` by
    top-level function or class (column "code"), `.txt` / `.md` whole (column "text"). `per_path`: at most that
    many from each path (`alignkit augment --dry-run` reads the first of each; a table is not read further)."""
    from alignkit.data.readers.columns import from_sharegpt
    from alignkit.data.readers.rows import decode_utf8, iter_rows

    out: list[Source] = []
    for p in paths:
        path = Path(p)
        if path.suffix == ".py":
            try:
                functions = split_functions(decode_utf8(path.read_bytes(), str(path)))
            except SyntaxError as e:  # a .py source is split by parsing it: a file that does not parse gives nothing
                raise DataError(f"{path}:{e.lineno}: not valid Python ({e.msg}), so it cannot be split into its "
                                "functions; fix the file, or give the snippets as JSONL rows (a row that does not "
                                "parse is dropped and counted)") from None
            out += [Source(f"{path}:{line}", {"code": code}, "py") for code, line in functions][:per_path]
        elif path.suffix in (".txt", ".md"):
            out.append(Source(str(path), {"text": decode_utf8(path.read_bytes(), str(path))}, "text"))
        else:
            out += [Source(where, from_sharegpt(row, where)) for row, where in islice(iter_rows(str(path)), per_path)]
    return out[:max_rows] if max_rows is not None else out


TEXT_KEYS = ("prompt", "completion", "chosen", "rejected")


def augment(sources: list[Source], strategy: str, options: Any, llm: Any, filters: Filters, out_path: str | Path,
            *, max_tokens: int = 256, temperature: float = 0.7, seed: int = 0, concurrency: int = 1,
            progress: bool = False, before_write: Callable[[], Any] | None = None) -> AugmentResult:
    """Run `strategy` over `sources` and write the kept records to `out_path` (atomically). `options` is the
    strategy's options dataclass; `llm` a ChatModel (None for code_bugs); `concurrency` the requests in flight
    at once (ValueError above the client's `max_concurrency`: a local model's is 1). DataError, and `out_path`
    left as it was, when no record is kept (an empty file would replace an earlier run's records and train
    nothing). `progress`: a bar counting the candidates (`alignkit augment`, where each may be an LLM request).
    `before_write`: called just before `out_path` is written (`alignkit augment` begins its output set there)."""
    spec = STRATEGIES[strategy]
    if spec.needs_llm and llm is None:
        raise ValueError(f"strategy {strategy!r} prompts a language model: configure llm")
    ctx = Context(llm=llm, max_tokens=max_tokens, temperature=temperature, seed=seed, concurrency=concurrency)
    limit = getattr(llm, "max_concurrency", None)
    if limit is not None and concurrency > limit:
        raise ValueError(f"concurrency: {concurrency}; {getattr(llm, 'name', 'this model')} answers at most {limit} "
                         f"request(s) at a time; set concurrency {limit}")
    check_columns(sources, options)
    model = getattr(llm, "name", None) if spec.needs_llm else None
    norm = str if spec.exact_dedup else norm_words  # code: punctuation is meaning (a flipped `<` is another bug)
    dropped: Counter = Counter()
    seen: set[str] = set()
    rows: list[dict] = []
    n = 0
    for cand in tqdm(spec.run(sources, ctx, options), desc="augment", unit="candidate", disable=not progress):
        n += 1
        reason = cand.drop or _length_problem(cand, filters)
        if reason is None and filters.dedup:
            key = "\x00".join(norm(str(cand.record.get(k, ""))) for k in TEXT_KEYS)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason is not None:
            dropped[reason] += 1
            logger.debug("dropped a candidate from %s: %s", cand.source, reason)
            continue
        rows.append({**cand.record, "meta": {"strategy": strategy, "source": cand.source, "model": model,
                                             **cand.extra}})
    result = AugmentResult(Path(out_path), len(rows), n, dict(dropped))
    for reason in UNFINISHED.values():  # legitimate, but it costs records: say so, and what to change
        if dropped[reason]:
            logger.warning("augment %s: %d of %d candidate(s) dropped: %s (max_tokens %d); %s", strategy,
                           dropped[reason], n, reason, max_tokens,
                           "raise llm.max_tokens to keep them" if "max_tokens" in reason else
                           "the endpoint withheld these answers")
    if not rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        why = (f"every one of the {n} candidate(s) was dropped ({reasons}); loosen the filters or check the sources"
               if n else
               f"the strategy made no candidate from the {len(sources)} source(s); check data.path and options")
        raise DataError(f"augment {strategy}: no record to write: {why} ({out_path} was not written)")
    if before_write is not None:
        before_write()
    result.path = atomic_write_jsonl(out_path, rows)
    logger.info("augment %s: %s", strategy, result.summary())
    return result


def _length_problem(cand: Candidate, filters: Filters) -> str | None:
    for key in TEXT_KEYS:
        value = cand.record.get(key)
        if value is None:
            continue
        value = "\n".join(texts_of(value))  # a conversation (paraphrase of a conversational row): its messages' text
        if len(value.strip()) < filters.min_chars:
            return f"{key} shorter than {filters.min_chars} characters"
        if filters.max_chars is not None and len(value) > filters.max_chars:
            return f"{key} longer than {filters.max_chars} characters"
        if filters.printable and _UNPRINTABLE.search(value):
            return f"{key} holds control or replacement characters"
    return None


__all__ = ["AugmentResult", "Filters", "augment", "read_sources"]
