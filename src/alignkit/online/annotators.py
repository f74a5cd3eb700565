"""Annotators: feedback on (prompt, response) pairs from a reward model, a Python function or an LLM judge.

One interface, `Annotator.annotate(prompts, responses, metas=None) -> Scores`:

    scores.values   FloatTensor (N,)  the score of each item; NaN = no score (failed, policy "skip")
    scores.failed   BoolTensor  (N,)  the annotator could not score the item (unparseable judge answer,
                                      out-of-range score, function returned None)
    scores.meta     list of N dicts   per-item facts (e.g. the judge's raw answer)
    scores.metrics  dict[str, float]  e.g. judge/parse_failures (a count)

Failure policy (`on_failure`): "skip" leaves NaN (feedback builders drop the item), "default" puts
`default_score` (in the annotator's output scale) in its place; `failed` is set either way.

Pairwise judgement, `prefer_batch(prompts, a, b) -> list[0 | 1 | None]` (0: a is better, 1: b is better,
None: cannot tell) and `prefer(prompt, a, b)`: pointwise annotators compare their two scores (ties: None);
the LLM judge asks its pairwise template. Callers randomise the A/B order first (see `feedback.judge_pairs`).

| name           | class                  | scores                                                        |
|----------------|------------------------|---------------------------------------------------------------|
| "reward_model" | RewardModelAnnotator   | the logit of a 1-label sequence classifier, batched           |
| "function"     | FunctionAnnotator      | Python functions (TRL's or alignkit's signature), weighted    |
| "judge"        | JudgeAnnotator         | a local causal LM's answer to a rubric, parsed with a regex  |
|                |                        | (`alignkit.online.judge`: templates, verdict parsing)         |

`ANNOTATORS` (a name -> class registry, listed by `alignkit ls`) and `build_annotator({"type": ..., ...})`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Callable, Sequence

import torch

from alignkit.data.chat import format_record, without_added_suffix
from alignkit.data.collators import pad
from alignkit.data.records import Completion, DataError, Prompt
from alignkit.losses.registry import Registry
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.online.digests import model_files_digest
from alignkit.models.rope import trained_context
from alignkit.naming import CODE_DIGEST_VERSION, source_digest, stable_name
from alignkit.online.generation import model_device
from alignkit.online.scores import AnnotatorError, Scores, check_lengths, check_policy, finalize_scores

logger = logging.getLogger(__name__)

ANNOTATORS = Registry("annotator")


class AnnotatorArgumentError(ValueError):
    """A constructor argument an annotator refuses. `key` is the argument's name, which is also the key of the CLI's
    `annotator:` section (so the CLI names `annotator.<key>` without a check of its own); `reason` says why and how
    to fix it. The message: '<owner>: <key>: <reason>'."""

    def __init__(self, owner: str, key: str, reason: str) -> None:
        super().__init__(f"{owner}: {key}: {reason}")
        self.owner, self.key, self.reason = owner, key, reason


def response_text(response: Completion) -> str:
    """A response as text (a conversation's message contents joined)."""
    return response if isinstance(response, str) else "\n".join(m["content"] for m in response)


class Annotator:
    """Base class: subclasses implement `annotate`; pairwise judges also override `prefer_batch`, and may report
    counts of their last `prefer_batch` call in `last_pair_metrics` (logged by online DPO's "judge_pairs")."""

    name = "annotator"
    last_pair_metrics: dict[str, float] = {}  # read-only default; a judge assigns its own dict
    # a model annotator loaded from a path: `online.digests.model_files_digest` of it, taken when loaded; None: no
    # such files. Checkpoints record `online.digests.annotator_model_digest`: this, else (a model object given in
    # Python) the digest of its weights, kept in `weights_digest` once taken. A resume warns of a model changed
    model_files: str | None = None
    weights_digest: str | None = None

    def annotate(self, prompts: Sequence[Prompt], responses: Sequence[Completion],
                 metas: Sequence[dict] | None = None) -> Scores:
        raise NotImplementedError

    def prefer_batch(self, prompts: Sequence[Prompt], a: Sequence[Completion],
                     b: Sequence[Completion]) -> list[int | None]:
        """0 where `a` scores higher, 1 where `b` does, None on a tie or a missing score."""
        n = len(prompts)
        s = self.annotate(list(prompts) * 2, list(a) + list(b)).values
        out: list[int | None] = []
        for sa, sb in zip(s[:n].tolist(), s[n:].tolist()):
            out.append(None if math.isnan(sa) or math.isnan(sb) or sa == sb else (0 if sa > sb else 1))
        return out

    def prefer(self, prompt: Prompt, a: Completion, b: Completion) -> int | None:
        return self.prefer_batch([prompt], [a], [b])[0]

    def describe(self) -> dict[str, Any]:
        """What this annotator is, for a round's manifest."""
        return {"type": self.name}

    def source(self) -> str:
        """This annotator in a message: its kind and what it runs (the reward function(s), the model's path)."""
        d = self.describe()
        what = d.get("fn") or d.get("path")
        if d.get("type") in (None, Annotator.name):  # a subclass of the caller's own, not registered
            return f"the annotator {type(self).__name__}"
        return f"the {d['type']} annotator" + (f" {str(what)!r}" if what else "")

    def check_prompts(self, prompts: Sequence[Any], where: str) -> None:
        """Before the run folder: refuse prompt records (with `.prompt`, `.id`) this annotator could not annotate.
        Nothing by default; a reward model formats each with its own tokenizer (a DataError naming the record)."""

    def check_columns(self, columns: set[str], where: str) -> None:
        """A ValueError when scoring prompts whose rows have `columns` (their extra dataset columns, as the `prompt`
        reader keeps them) would fail on every batch; `where` names the data. Nothing to check here."""


# ---------------------------------------------------------------------------------------------- reward model

@ANNOTATORS.register("reward_model")
class RewardModelAnnotator(Annotator):
    """A trained reward model (sequence classifier with one label) scores each (prompt, response).

    Text is built as the reward trainer builds it (`alignkit.data.tokenize`): `format_record(prompt, response)`'s
    full text, tokenized with the format's `add_special_tokens`, plus EOS when the format does not end the turn
    itself (`add_eos=None`; force with True/False). A sequence over `max_length` (or over the model's positions,
    if fewer) keeps its last tokens, with one warning per call (a cut response is scored on its end; metrics
    reward_model/truncated and reward_model/response_truncated). Batches
    are right-padded with the model config's `pad_token_id` (what transformers pools by: the rightmost token that
    is not it), so a batch scores as one response at a time; a config without one scores one at a time (warned).
    The score is the model's own pooled logit. `device` may differ from the policy's.
    """

    name = "reward_model"

    def __init__(self, model: str | Path | torch.nn.Module, tokenizer: Any = None, *, device: str | None = None,
                 batch_size: int = 8, formatter: str = "auto", max_length: int | None = 1024,
                 add_eos: bool | None = None, dtype: str = "float32"):
        self.path = str(model) if isinstance(model, (str, Path)) else None
        if self.path is not None:
            model = load_model(self.path, task="classifier", dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.path)
            self.model_files = model_files_digest(self.path)
        if tokenizer is None:
            raise ValueError("RewardModelAnnotator: pass the reward model's tokenizer along with a model object")
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ValueError(f"RewardModelAnnotator: the reward model {self.path or type(model).__name__} has "
                             f"num_labels={labels}; a reward model has one output (train it with the reward "
                             f"trainer, or load a sequence classifier with num_labels=1)")
        self.model = model.to(device) if device is not None else model
        self.model.eval()
        self.tokenizer, self.batch_size, self.formatter = tokenizer, batch_size, formatter
        self.max_length, self.add_eos = max_length, add_eos
        # a sequence past the model's positions was scored anyway (RoPE: positions it never saw; GPT-2: IndexError)
        positions = trained_context(getattr(model, "config", None))
        self.limit = min(x for x in (max_length, positions) if x is not None) if (max_length or positions) else None
        by_length = positions is None or (max_length is not None and max_length <= positions)
        self.limit_name = "annotator.max_length" if by_length else "the reward model's max_position_embeddings"
        # transformers pools at the last token that is not the CONFIG's pad id: padding with another id (the
        # tokenizer's) made it pool on a pad of every shorter row (other scores than one at a time, silently), and
        # a config without one cannot pool a padded batch at all (ValueError at the first annotation)
        self.pad_id = getattr(model.config, "pad_token_id", None)
        if self.pad_id is None and batch_size > 1:
            logger.warning("reward model %s: its config has no pad_token_id, so transformers cannot find the last "
                           "token of a padded row: it scores one response at a time (set pad_token_id in its "
                           "config.json to score in batches)", self.path or type(model).__name__)

    def check_prompts(self, prompts: Sequence[Any], where: str) -> None:
        for r in prompts:
            try:
                format_record(r.prompt, "", self.tokenizer, self.formatter)
            except DataError as e:
                raise DataError(f"{where}: record {r.id or '?'}: the reward model's tokenizer refuses it: "
                                f"{e}") from None

    def encode(self, prompt: Prompt, response: Completion) -> tuple[list[int], str]:
        """(token ids, what was cut: "" none, "prompt" the prompt's start, "response" the prompt and the
        response's start) of one item: a sequence over `self.limit` keeps its last tokens."""
        f = format_record(prompt, response, self.tokenizer, self.formatter)
        def text_ids(text: str) -> list[int]:  # as the reward trainer: no EOS the tokenizer appends itself (add_eos's)
            out = list(self.tokenizer(text, add_special_tokens=f.add_special_tokens)["input_ids"])
            return without_added_suffix(out, self.tokenizer) if f.add_special_tokens else out
        ids = text_ids(f.full)
        eos = self.tokenizer.eos_token_id
        add_eos = self.add_eos if self.add_eos is not None else not f.ends_turn
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if self.limit is None or len(ids) <= self.limit:
            return ids, ""
        cut = len(ids) - self.limit
        return ids[cut:], ("response" if cut > len(text_ids(f.prompt)) else "prompt")

    def warn_truncated(self, cuts: list[str]) -> None:
        """One warning for the items `encode` cut (a score of a cut response is of its end alone)."""
        n = sum(bool(c) for c in cuts)
        if not n:
            return
        resp = [i for i, c in enumerate(cuts) if c == "response"]
        what = (f"in {len(resp)} of them (e.g. item {resp[0]}) the response itself was cut, so its score is of the "
                "response's end alone" if resp else "the prompts' starts were cut, every response is whole")
        logger.warning("reward model %s: %d of %d item(s) longer than %d tokens (%s) were scored on their last %d "
                       "tokens; %s; raise annotator.max_length (up to the reward model's positions) or lower "
                       "sampling.max_new_tokens", self.path or type(self.model).__name__, n, len(cuts), self.limit,
                       self.limit_name, self.limit, what)

    @torch.no_grad()
    def annotate(self, prompts: Sequence[Prompt], responses: Sequence[Completion],
                 metas: Sequence[dict] | None = None) -> Scores:
        check_lengths(prompts, responses, "RewardModelAnnotator")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        device = model_device(self.model)
        values: list[float] = []
        size = self.batch_size if self.pad_id is not None else 1  # see __init__
        for s in range(0, len(encoded), size):
            ids = [e[0] for e in encoded[s:s + size]]
            input_ids = pad(ids, self.pad_id if self.pad_id is not None else 0, side="right").to(device)  # (B, T)
            mask = pad([[1] * len(x) for x in ids], 0, side="right").to(device)  # (B, T)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # (B, 1)
            values.extend(logits[:, 0].float().cpu().tolist())
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:  # NaN would be dropped as a failed score (weight 0) without a word, inf would win every group
            raise AnnotatorError(
                f"reward model {self.path or type(self.model).__name__} scored {values[bad[0]]} for response "
                f"{bad[0]} of {len(values)} ({len(bad)} non-finite in all; response "
                f"{response_text(responses[bad[0]])[:60]!r}): "
                "its scores mean nothing; check the reward model's weights and how it was trained, or load it in "
                "float32 if it ran in float16 (overflow)")
        cuts = [e[1] for e in encoded]
        self.warn_truncated(cuts)
        return finalize_scores(values, "skip", None, metrics={
            "reward_model/truncated": float(sum(bool(c) for c in cuts)),
            "reward_model/response_truncated": float(cuts.count("response"))})

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "path": self.path, "formatter": self.formatter, "max_length": self.max_length}


# ---------------------------------------------------------------------------------------------- function

def load_function(spec: str) -> Callable:
    """Import "package.module:function" (or "package.module:Class.method")."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward function {spec!r} must be written 'module:function', e.g. 'my_rewards:exact_match'")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({e}); is it on "
                         f"PYTHONPATH / installed?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _as_score(value: Any, who: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()  # a numpy scalar or 0-d array (np.bool_ is no numbers.Real): its Python value, as TRL
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):  # numpy scalars too, as TRL
        raise AnnotatorError(f"{who} returned {value!r} for {where}; return a finite number (or None when the "
                             f"response cannot be scored)")
    return float(value)


def returned_scores(out: Any, n: int, who: str) -> list[float | None]:
    """A batch reward function's return value -> n scores (None = cannot score); anything but a sequence of n
    numbers is an `AnnotatorError` naming `who` (a string or a mapping was iterated as characters or keys)."""
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Iterable):
        raise AnnotatorError(f"{who} returned a {type(out).__name__}, not a list of {n} score(s), one per item; "
                             "return a list")
    out = list(out)
    if len(out) != n:
        raise AnnotatorError(f"{who} returned {len(out)} scores for {n} item(s); return one per item")
    return [_as_score(v, who, f"item {i}") for i, v in enumerate(out)]


def reward_convention(fn: Callable, kwargs: dict | None = None, spec: str = "") -> str:
    """Which calling convention `fn` follows: "trl" or "alignkit" (see `FunctionAnnotator`); a signature that
    fits neither is a ValueError naming the function and both conventions."""
    kwargs = dict(kwargs or {})
    who = spec or stable_name(fn)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "alignkit"  # a builtin or C callable: called positionally as before
    params = sig.parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    positional = [p for p in params.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if "completions" in params or (var_kw and not positional):
        return "trl"
    meta = {k: None for k in ("meta", "metas") if k in params}
    try:
        sig.bind(None, None, **meta, **kwargs)
        return "alignkit"
    except TypeError as e:
        raise ValueError(
            f"reward function {who}{sig} fits neither convention: TRL's fn(prompts, completions, **kwargs) "
            f"(a parameter named 'completions'; called with keyword lists, dataset columns as keyword arguments) "
            f"nor alignkit's fn(prompt, response, **kwargs) (two positional arguments, per item or batched) "
            f"with kwargs {sorted(kwargs)} ({e}); rename its parameters to one of them") from None


def metric_names(specs: list[str]) -> list[str]:
    """Each function's name in its rewards/<name>/... metrics: TRL's (the function's name); where two share it, the
    module-qualified spec ("pkg.mod.score"), numbered "_k" where one spec is given twice (one overwrote the other)."""
    short = [s.split(":", 1)[-1] for s in specs]
    names = [n if short.count(n) == 1 else s.replace(":", ".") for n, s in zip(short, specs)]
    return [n if names.count(n) == 1 else f"{n}_{names[:i + 1].count(n)}" for i, n in enumerate(names)]


@dataclass
class _RewardFn:
    spec: str
    fn: Callable
    convention: str  # "trl" | "alignkit"
    meta_arg: str | None
    accepts: set | None  # keyword names a TRL-style function takes (None: **kwargs, everything)


def _spec(fn: str | Callable) -> str:
    """The function's name in messages, metrics and checkpoints: the same in every process (`stable_name`: a partial
    or callable object with its arguments; its repr held a memory address, so a resume with it was always refused)."""
    return stable_name(fn)


@ANNOTATORS.register("function")
class FunctionAnnotator(Annotator):
    """Python reward functions ("module:function" or callables) score each response: verifiable rewards.

    Two calling conventions, detected from each function's signature (`reward_convention`):

    - **TRL's** (a parameter named `completions`, or keyword arguments only), exactly as TRL's GRPOTrainer
      calls it: `fn(prompts=[...], completions=[...], **columns) -> list[float | None]`, all keyword
      arguments, one list entry per item. `completions` are strings for plain-text prompts and
      `[{"role": "assistant", "content": text}]` for conversational ones (TRL's format). Every extra column
      of the prompt's dataset row (e.g. `answer`; kept by the `prompt` reader in `meta["columns"]`) is
      passed as a keyword list. A function without `**kwargs` gets only the keywords it names. TRL's
      `completion_ids`, `trainer_state` and `log_metric` are not passed.
    - **alignkit's**: per item (default) `fn(prompt, response, **kwargs) -> float | bool | None`;
      `batched=True`: `fn(prompts, responses, **kwargs) -> sequence of N such values`. A function with a
      `meta` (or `metas`) parameter also gets each prompt record's meta (e.g. the reference answer).

    Several functions (`fn` a list) with `weights` (default 1 each) give, like TRL, the weighted sum of the
    scores that are not None (NaN-sum; logged at INFO); an item every function failed on is failed (a warning
    per call). Metrics report each
    function's mean and std over the items it scored, under TRL's names (`rewards/<name>/mean`, `.../std`).
    Weights must be finite numbers (a NaN one made every score NaN, dropped as unscored), not all 0; a 0 weight logs
    a function without rewarding it, a negative one penalises its score (both as TRL). A score may be a Python
    or numpy number or bool, or a one-element tensor; None = cannot score (the failure policy applies); an
    exception, a non-number, NaN / inf, or a batch result that is not a list of one score per item is an
    `AnnotatorError` naming the function and the item; a signature that fits neither convention is a ValueError
    when the annotator is built.
    """

    name = "function"

    def __init__(self, fn: str | Callable | Sequence[str | Callable], *, batched: bool = False,
                 kwargs: dict | None = None, on_failure: str = "skip", default_score: float | None = None,
                 weights: Sequence[float] | None = None):
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        if not fns:
            raise ValueError("function annotator: give at least one reward function")
        self.spec = ", ".join(_spec(f) for f in fns)
        check_policy(on_failure, default_score, f"function annotator {self.spec}")
        if weights is not None and (len(weights) != len(fns) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
            # a NaN weight made every score NaN, dropped as unscored without a word; inf stopped blaming the score
            raise ValueError(f"function annotator {self.spec}: weights must be {len(fns)} finite number(s), one per "
                             f"function, got {list(weights)!r}")
        if weights is not None and not any(weights):  # every reward 0: no signal at any step
            raise ValueError(f"function annotator {self.spec}: weights {list(weights)!r} are all 0, so every reward "
                             "would be 0; give a nonzero weight (a 0 weight logs a function without rewarding it)")
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(fns)
        self.batched, self.kwargs = batched, dict(kwargs or {})
        self.on_failure, self.default_score = on_failure, default_score
        self.fns: list[_RewardFn] = []
        for f in fns:
            spec = _spec(f)
            call = load_function(f) if isinstance(f, str) else f
            conv = reward_convention(call, self.kwargs, spec)
            try:
                params = inspect.signature(call).parameters
            except (TypeError, ValueError):
                params = {}
            var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            self.fns.append(_RewardFn(spec, call, conv, next((k for k in ("metas", "meta") if k in params), None),
                                      None if var_kw else set(params)))
        self.fn = self.fns[0].fn  # the (first) function, as before
        self.metric_names = metric_names([f.spec for f in self.fns])
        self.meta_arg = self.fns[0].meta_arg

    def _trl(self, f: _RewardFn, prompts: list, responses: list, texts: list[str], metas: list[dict]) -> list:
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        columns: dict[str, list] = {}
        for m in metas:
            for k in (m.get("columns") or {}):
                columns.setdefault(k, None)
        cols = {k: [(m.get("columns") or {}).get(k) for m in metas] for k in columns
                if k not in ("prompt", "prompts", "completion", "completions")}
        args = {"prompts": list(prompts), "completions": completions, **cols, **self.kwargs}
        if f.accepts is not None:
            args = {k: v for k, v in args.items() if k in f.accepts}
        who = f"reward function {f.spec}"
        try:
            out = f.fn(**args)
        except TypeError as e:
            raise AnnotatorError(f"{who} (TRL convention) failed on a batch of {len(texts)} item(s): {e!r}; the "
                                 f"prompt rows have columns {sorted(cols)}") from e
        except Exception as e:
            raise AnnotatorError(f"{who} failed on a batch of {len(texts)} item(s): {e!r}") from e
        return returned_scores(out, len(texts), who)

    def _alignkit(self, f: _RewardFn, prompts: list, texts: list[str], metas: list[dict]) -> list:
        who = f"reward function {f.spec}"
        if self.batched:
            extra = {f.meta_arg: metas} if f.meta_arg else {}
            try:
                out = f.fn(list(prompts), texts, **extra, **self.kwargs)
            except Exception as e:
                raise AnnotatorError(f"{who} failed on a batch of {len(texts)} item(s): {e!r}") from e
            return returned_scores(out, len(texts), who)
        raw = []
        for i, (p, t, m) in enumerate(zip(prompts, texts, metas)):
            extra = {f.meta_arg: m} if f.meta_arg else {}
            where = f"item {i} (prompt {str(p)[:60]!r}, response {t[:60]!r})"
            try:
                v = f.fn(p, t, **extra, **self.kwargs)
            except Exception as e:
                raise AnnotatorError(f"{who} failed on {where}: {e!r}") from e
            raw.append(_as_score(v, who, where))
        return raw

    def annotate(self, prompts: Sequence[Prompt], responses: Sequence[Completion],
                 metas: Sequence[dict] | None = None) -> Scores:
        check_lengths(prompts, responses, f"reward function {self.spec}")
        metas = list(metas) if metas is not None else [{} for _ in prompts]
        prompts = list(prompts)
        texts = [response_text(r) for r in responses]
        per_fn = [self._trl(f, prompts, list(responses), texts, metas) if f.convention == "trl"
                  else self._alignkit(f, prompts, texts, metas) for f in self.fns]
        metrics: dict[str, float] = {}
        moments: dict[str, tuple[float, float, float]] = {}
        if len(self.fns) == 1:
            raw = per_fn[0]
        else:
            raw = []
            for i in range(len(texts)):
                vals = [(w, col[i]) for w, col in zip(self.weights, per_fn) if col[i] is not None]
                raw.append(sum(w * v for w, v in vals) if vals else None)
        for name, col in zip(self.metric_names, per_fn):  # TRL's rewards/<function>/mean, /std (unweighted, scored)
            ok = [float(v) for v in col if v is not None]
            mean = sum(ok) / len(ok) if ok else float("nan")
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = (math.sqrt(sum((v - mean) ** 2 for v in ok) / (len(ok) - 1))
                                              if len(ok) > 1 else float("nan"))
            moments[f"rewards/{name}"] = (float(len(ok)), sum(ok), sum(v * v for v in ok))
        metrics["function/failures"] = float(sum(r is None for r in raw))
        self.log_missing(per_fn, raw)
        scores = finalize_scores(raw, self.on_failure, self.default_score, metrics=metrics,
                                 who=f"reward function {self.spec}")
        scores.moments = moments
        rows = [[float("nan") if v is None else float(v) for v in row] for row in zip(*per_fn)]
        scores.per_function = torch.tensor(rows, dtype=torch.float32).reshape(len(texts), len(self.fns))  # 0 items too
        return scores

    def log_missing(self, per_fn: list[list], raw: list) -> None:
        """A warning for items no function scored (as TRL's "All reward functions returned None"), an INFO line
        for items only some of several functions scored (their reward: the weighted sum of the others)."""
        failed = [i for i, r in enumerate(raw) if r is None]
        if failed:
            fate = ("left out of the feedback" if self.on_failure == "skip"
                    else f"scored default_score {self.default_score}")
            logger.warning("reward function %s: %d of %d item(s) (e.g. item %d) got None from every reward function "
                           "(cannot score); on_failure %r: %s", self.spec, len(failed), len(raw), failed[0],
                           self.on_failure, fate)
        if len(per_fn) > 1:
            partial = [i for i, r in enumerate(raw) if r is not None and any(col[i] is None for col in per_fn)]
            if partial:
                i = partial[0]
                none = [f.spec for f, col in zip(self.fns, per_fn) if col[i] is None]
                logger.info("reward functions: %d of %d item(s) scored by only some of the %d reward functions "
                            "(e.g. item %d: None from %s): their reward is the weighted sum of the others (TRL's "
                            "NaN-skipping sum)", len(partial), len(raw), len(per_fn), i, ", ".join(none))

    def check_columns(self, columns: set[str], where: str) -> None:
        """A TRL-style function with a required parameter that neither TRL's call (prompts, completions), the
        rows' columns nor annotator.kwargs give (a dataset column the data lacks, or TRL's completion_ids /
        trainer_state, not passed here) fails on every batch: a ValueError now, before a run folder is written."""
        given = {"prompts", "completions", *columns, *self.kwargs}
        for f in self.fns:
            if f.convention != "trl":
                continue
            try:
                params = inspect.signature(f.fn).parameters.values()
            except (TypeError, ValueError):
                continue
            needed = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in given
                      and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
            if needed:
                raise ValueError(f"reward function {f.spec} takes {', '.join(map(repr, needed))}, which the prompt "
                                 f"rows of {where} do not have (their other columns: {sorted(columns) or 'none'}; "
                                 "TRL's completion_ids and trainer_state are not passed), so the first step would "
                                 "stop; add the column to the data, give the parameter a default, or set it in "
                                 "annotator.kwargs")

    def code_digest(self, version: int = CODE_DIGEST_VERSION) -> str:
        """Checkpoints record it: a resume warns of a function (or a helper it calls) edited under its name."""
        return source_digest((f.fn for f in self.fns), version)

    def describe(self) -> dict[str, Any]:
        out = {"type": self.name, "fn": self.spec, "batched": self.batched, "on_failure": self.on_failure,
               "conventions": [f.convention for f in self.fns], "kwargs": self.kwargs,
               "default_score": self.default_score}
        if len(self.fns) > 1:
            out["weights"] = self.weights
        return out


def build_annotator(spec: dict[str, Any] | Annotator | Callable) -> Annotator:
    """An annotator from a config mapping: {"type": "reward_model", "model": "path", ...} (see ANNOTATORS);
    a plain Python callable `fn(prompt, response) -> float` becomes a per-item `FunctionAnnotator`."""
    if isinstance(spec, Annotator):
        return spec
    if callable(spec) and not isinstance(spec, dict):
        return FunctionAnnotator(spec)
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"annotator spec must be a mapping with a 'type' (one of {sorted(ANNOTATORS)}), got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    cls = ANNOTATORS[spec["type"]]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"annotator {spec['type']!r}: bad arguments {sorted(kwargs)} ({e}); see "
                         f"{cls.__name__}'s docstring") from e


__all__ = ["ANNOTATORS", "Annotator", "AnnotatorArgumentError", "AnnotatorError", "Scores", "check_lengths",
           "check_policy", "finalize_scores", "metric_names", "RewardModelAnnotator", "FunctionAnnotator",
           "load_function", "build_annotator", "response_text"]
