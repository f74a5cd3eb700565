"""The LLM judge: a local causal LM answers a rubric template about each response (or a pair of responses), and
its answer is parsed into a score (or an A/B verdict). Registered as the "judge" annotator
(`alignkit.online.annotators.ANNOTATORS`); the interface and the failure policy are `annotators.py`'s."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from alignkit.data.records import Completion, Prompt
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.online.digests import model_files_digest
from alignkit.online.annotators import (ANNOTATORS, Annotator, AnnotatorArgumentError, Scores, check_lengths,
                                        check_policy, finalize_scores, response_text)
from alignkit.online.generation import SamplingConfig, generate_responses

logger = logging.getLogger(__name__)

ONE_SIDED_MIN = 8  # decided comparisons all naming one position before a warning (chance: 2 / 2**8 for a fair judge)
DEFAULT_TEMPLATE = ("Rate how helpful and correct the response is, from 1 (useless) to 10 (excellent).\n"
                    "Question: {prompt}\nResponse: {response}\nEnd your answer with 'Score: <1-10>'.")
DEFAULT_PAIR_TEMPLATE = ("Which response answers the question better?\nQuestion: {prompt}\n"
                         "Response A: {response_a}\nResponse B: {response_b}\nAnswer 'Winner: A' or 'Winner: B'.")


def render(template: str, **values: str) -> str:
    """Replace each {name} of `template` (plain replacement: other braces in the text are left alone)."""
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template


def prompt_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def judge_chat(chat: bool | None, tokenizer: Any, owner: str = "JudgeAnnotator") -> bool:
    """Whether a judge's questions go through its tokenizer's chat template: `chat` None (auto) when it has one;
    True without one is an `AnnotatorArgumentError` (key "chat") naming the fix (the questions would silently go as
    plain text)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has_template:
        raise AnnotatorArgumentError(owner, "chat", "true sends the judge's questions through its tokenizer's chat "
                                     "template, and this tokenizer has none (they would go as plain text); remove chat "
                                     "(auto: the template when there is one) or set it false, or use a judge whose "
                                     "tokenizer has a chat template")
    return has_template if chat is None else bool(chat)


@ANNOTATORS.register("judge")
class JudgeAnnotator(Annotator):
    """A local causal LM judges each response with a rubric template; the score is parsed with a regex.

    `template` holds {prompt} and {response}; it is sent as one user message through the tokenizer's chat template
    when there is one (`chat=None`, auto), always (`chat=True`: a tokenizer without one is a ValueError) or never
    (`chat=False`: plain text). Greedy answers of up to `max_new_tokens`; `pattern`'s first group is the score.
    An answer whose matches give different scores ("Score: 3 ... Score: 8") has no single verdict and counts as a
    failure ("ambiguous"), as does a score outside `score_range` or one an answer cut at `max_new_tokens` may
    have cut ("cut_off": "Score: 7" of "Score: 7.5"); with `normalize`, s -> (s - lo) / (hi - lo)
    in [0, 1]. Metrics: judge/parse_failures (no match, disagreeing matches, cut off), judge/out_of_range,
    judge/answers, judge/failure_rate (over processes the counts are summed, the rate recomputed from them).
    Pairwise: `pair_template` ({prompt}, {response_a}, {response_b}) and `pair_pattern`
    capturing "A" or "B" (an answer naming both winners is undecided, None); judge/pair_parse_failures and
    judge/pair_first_wins (verdicts for the first shown) count them, with a warning for undecided answers and for
    a judge naming one position in all of at least ONE_SIDED_MIN decided comparisons of a batch.
    """

    name = "judge"

    def __init__(self, model: str | Path | torch.nn.Module, tokenizer: Any = None, *, template: str = DEFAULT_TEMPLATE,
                 pattern: str = r"Score:\s*(-?\d+(?:\.\d+)?)", score_range: tuple[float, float] = (1.0, 10.0),
                 normalize: bool = True, on_failure: str = "skip", default_score: float | None = None,
                 max_new_tokens: int = 16, batch_size: int = 8, chat: bool | None = None,
                 pair_template: str = DEFAULT_PAIR_TEMPLATE, pair_pattern: str = r"Winner:\s*([AB])",
                 device: str | None = None, dtype: str = "float32"):
        self.path = str(model) if isinstance(model, (str, Path)) else None
        if self.path is not None:
            model = load_model(self.path, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.path, padding_side="left")
            self.model_files = model_files_digest(self.path)
        if tokenizer is None:
            raise ValueError("JudgeAnnotator: pass the judge's tokenizer along with a model object")
        for key, tpl, names in (("template", template, ("prompt", "response")),
                                ("pair_template", pair_template, ("prompt", "response_a", "response_b"))):
            missing = [n for n in names if "{" + n + "}" not in tpl]
            if missing:
                raise ValueError(f"JudgeAnnotator: {key} lacks placeholder(s) {['{' + n + '}' for n in missing]}")
        self.regex, self.pair_regex = re.compile(pattern), re.compile(pair_pattern)
        if self.regex.groups < 1 or self.pair_regex.groups < 1:
            raise ValueError("JudgeAnnotator: pattern and pair_pattern need one capture group, e.g. 'Score: (\\d+)'")
        lo, hi = float(score_range[0]), float(score_range[1])
        if not lo < hi:
            raise ValueError(f"JudgeAnnotator: score_range must be (low, high) with low < high, got {score_range}")
        check_policy(on_failure, default_score, "JudgeAnnotator")
        self.model = model.to(device) if device is not None else model
        self.tokenizer, self.template, self.pair_template = tokenizer, template, pair_template
        self.pattern, self.pair_pattern, self.range, self.normalize = pattern, pair_pattern, (lo, hi), normalize
        self.on_failure, self.default_score = on_failure, default_score
        self.chat = judge_chat(chat, tokenizer)
        self.batch_size = batch_size
        self.sampling = SamplingConfig(do_sample=False, max_new_tokens=max_new_tokens)
        self.last_pair_metrics: dict[str, float] = {}

    def _ask(self, texts: list[str]) -> list[tuple[str, bool]]:
        """(answer, cut at max_new_tokens?) of each question."""
        prompts = [[{"role": "user", "content": t}] if self.chat else t for t in texts]
        samples = generate_responses(self.model, self.tokenizer, prompts, self.sampling, batch_size=self.batch_size)
        return [(s.response, s.finish_reason == "length") for s in samples]

    def parse(self, answer: str, cut: bool = False) -> tuple[float | None, str | None]:
        """(score in output scale, None) or (None, "unparseable" | "ambiguous" | "cut_off" | "out_of_range").
        Every match is read: matches that give different scores (the first used to win) are "ambiguous". In an
        answer `cut` at max_new_tokens, a last match followed by nothing but digits or a point ("Score: 7" of
        "Score: 7.5") may be a cut number: "cut_off" (it was read as the number so far)."""
        try:
            matches = list(self.regex.finditer(answer))
            found = {float(m.group(1)) for m in matches}
        except (TypeError, ValueError):
            return None, "unparseable"
        if not found:
            return None, "unparseable"
        if cut and re.fullmatch(r"[\d.,]*", answer[matches[-1].end():]):
            return None, "cut_off"
        if len(found) > 1:
            return None, "ambiguous"
        s = found.pop()
        lo, hi = self.range
        if not lo <= s <= hi:
            return None, "out_of_range"
        return ((s - lo) / (hi - lo) if self.normalize else s), None

    def annotate(self, prompts: Sequence[Prompt], responses: Sequence[Completion],
                 metas: Sequence[dict] | None = None) -> Scores:
        check_lengths(prompts, responses, "JudgeAnnotator")
        asks = [render(self.template, prompt=prompt_text(p), response=response_text(r))
                for p, r in zip(prompts, responses)]
        asked = self._ask(asks)
        answers = [a for a, _ in asked]
        parsed = [self.parse(a, cut) for a, cut in asked]
        meta = [{"judge_output": a, **({"judge_error": err} if err else {})} for a, (_, err) in zip(answers, parsed)]
        n_parse = sum(err in ("unparseable", "ambiguous", "cut_off") for _, err in parsed)
        n_cut = sum(err == "cut_off" for _, err in parsed)
        n_range = sum(err == "out_of_range" for _, err in parsed)
        if n_parse or n_range:
            cut_note = (f", {n_cut} with the score cut at max_new_tokens={self.sampling.max_new_tokens} (raise "
                        "annotator.max_new_tokens)" if n_cut else "")
            logger.warning("judge: %d/%d answer(s) unparseable or with disagreeing scores (pattern %r)%s, %d out of "
                           "range %s; policy %r; e.g. %r",
                           n_parse, len(answers), self.pattern, cut_note, n_range, self.range, self.on_failure,
                           next(m["judge_output"] for m in meta if "judge_error" in m)[:80])
        metrics = {"judge/parse_failures": float(n_parse), "judge/out_of_range": float(n_range),
                   "judge/answers": float(len(answers)),
                   "judge/failure_rate": (n_parse + n_range) / max(len(answers), 1)}
        return finalize_scores([s for s, _ in parsed], self.on_failure, self.default_score, meta, metrics)

    def prefer_batch(self, prompts: Sequence[Prompt], a: Sequence[Completion],
                     b: Sequence[Completion]) -> list[int | None]:
        asks = [render(self.pair_template, prompt=prompt_text(p), response_a=response_text(x),
                       response_b=response_text(y)) for p, x, y in zip(prompts, a, b)]
        out: list[int | None] = []
        answers = [a for a, _ in self._ask(asks)]
        for ans in answers:
            named = {m.group(1) for m in self.pair_regex.finditer(ans)}  # "Winner: A ... Winner: B": no verdict
            out.append(None if len(named) != 1 or not named <= {"A", "B"} else (0 if named == {"A"} else 1))
        self.last_pair_metrics = {"judge/pair_parse_failures": float(sum(o is None for o in out)),
                                  "judge/pair_first_wins": float(out.count(0))}
        self.warn_pairs(out, answers)
        return out

    def warn_pairs(self, out: list[int | None], answers: list[str]) -> None:
        """A warning for pairwise answers naming no single winner, and for a judge naming the same position in
        every one of at least `ONE_SIDED_MIN` decided comparisons (its preferences are then the caller's coin flips
        of the A/B order, not judgements)."""
        failed = [a for a, o in zip(answers, out) if o is None]
        if failed:
            logger.warning("judge: %d/%d pairwise answer(s) name no single winner (pair_pattern %r): those pairs give "
                           "no record; e.g. %r", len(failed), len(out), self.pair_pattern, failed[0][:80])
        decided = [o for o in out if o is not None]
        if len(decided) >= ONE_SIDED_MIN and len(set(decided)) == 1:
            side = "A, the response shown first" if decided[0] == 0 else "B, the response shown second"
            logger.warning("judge: named %s, in all %d decided comparison(s) of this batch: a judge that always "
                           "picks one position (position bias) gives preferences that are coin flips of the A/B "
                           "order; check the judge model and its pair_template", side, len(decided))

    def describe(self) -> dict[str, Any]:
        """What judged, for a round's manifest (a kept annotation is compared on it: `rounds.check_kept_annotation`)
        and a checkpoint's settings. The templates (as SHA-256: they are long), pair_pattern, chat and dtype were
        not in it: a round judged with another rubric was kept as this one's."""
        def sha(text: str) -> str:
            return hashlib.sha256(text.encode()).hexdigest()[:16]

        return {"type": self.name, "path": self.path, "pattern": self.pattern, "score_range": list(self.range),
                "normalize": self.normalize, "on_failure": self.on_failure, "default_score": self.default_score,
                "max_new_tokens": self.sampling.max_new_tokens, "template_sha256": sha(self.template),
                "pair_template_sha256": sha(self.pair_template), "pair_pattern": self.pair_pattern,
                "chat": self.chat, "dtype": str(getattr(self.model, "dtype", "")).removeprefix("torch.")}


__all__ = ["DEFAULT_PAIR_TEMPLATE", "DEFAULT_TEMPLATE", "JudgeAnnotator", "judge_chat", "prompt_text", "render"]
