"""Records -> token ids with completion masks, truncated by one stated policy, with counted drops.

Boundary. Each (prompt, completion) is formatted (`alignkit.data.chat`) and the full text is tokenized
once; the prompt text is tokenized too and its ids must be a prefix of the full ids. That prefix is the
prompt, the rest the completion. A record whose tokenized prompt is not a prefix (BPE merged across the
boundary, or a chat template rewrote earlier turns) is an ERROR naming the record, never a warning.

Multi-turn SFT (`loss_on`, SFT records only; TRL's `assistant_only_loss`, Open-Assistant's trainer):
- "all_assistant" (default): every assistant turn is trained, the final completion AND each assistant
  message inside a conversational prompt (with its end-of-turn marker, as the final turn), except the turns a
  conversation gave weight 0 (`records.UNTRAINED_TURNS`; "all" refuses such a record: it would train them) and where the
  row gave the prompt in a column of its own (`records.PROMPT_IS_CONTEXT`: TRL's prompt-completion rows, whose prompt
  TRL never trains: completion_only_loss): there the completion alone;
- "last_assistant": only the final completion (earlier assistant turns are context);
- "all": the whole sequence (prompt included), TRL's language-modelling loss.
An earlier assistant turn i is located in token space like the completion: the conversation up to turn i
with the generation prompt must tokenize to a prefix of the conversation through turn i, which must be a
prefix of the full prompt; a chat template that rewrites earlier turns is an ERROR naming the record (use
"last_assistant" there). `prompt_length` stays the length of the prompt before the final completion.

EOS. `add_eos=None` (default) appends `tokenizer.eos_token_id` to the completion unless the format ends
the turn itself (chat templates and the OASST format do; plain text does not: TRL's convention).
`True`/`False` force it. The appended EOS is part of the completion (it is trained on).
A tokenizer that appends its EOS to every text it encodes with special tokens (GPT-NeoX / Pythia post-processors,
Llama's `add_eos_token`: `chat.appended_eos`) has it left out of both encodings, so the prompt stays a prefix, a
prompt-only record's ids do not end in EOS, and a completion ends with exactly one EOS under `add_eos` (none under
`add_eos=False`). Other appended tokens (a BERT-style `[CLS] $A [SEP]`) follow the same one rule as ReFT's data
(`reft_data.encode_prompt_response`): a prompt (the prompt of a record, a prompt-only record, an earlier turn's
context) is left without them, since the tokenizer puts them after the whole text; the full sequence keeps them where
the tokenizer puts them, at the end of the completion (`[CLS] prompt | completion [SEP]`, what a reward model
reads and `add_eos` could not add back). A tokenizer without an EOS
token where one is to be appended is a DataError (before, nothing was appended, and the model never learned to stop).

Truncation policy, in order:
1. a prompt longer than `max_prompt_length` keeps its LAST `max_prompt_length` tokens (left-truncated:
   the end of the conversation matters most);
2. each completion is cut to `max_length - prompt_length` tokens, keeping its start (a cut completion
   loses its EOS);
3. a record with no room left for any completion token ("prompt_too_long") or a completion with no tokens
   ("empty_completion") is dropped, counted in `TokenizeStats` and logged with its id, never silently.

Outputs (plain Python lists; `alignkit.data.collators` pads them), by record kind:
- sft:        input_ids, completion_mask (1 on trained tokens, see `loss_on`), prompt_length, length, weight, id
- unpaired:   the sft keys + label (bool)
- preference: chosen_input_ids, chosen_completion_mask, rejected_input_ids, rejected_completion_mask,
              prompt_length (shared), length (= max of the two), weight, margin (float or None), id
- ranked:     input_ids / completion_mask (lists of K sequences, best first), ranks, prompt_length,
              length (= sum of the K lengths), weight, id
- prompt:     prompt_input_ids, length, prompt (the record's prompt, for generation/annotation), weight, id

The on-disk cache of these features (`tokenize_records(..., cache_dir=)`) is `alignkit.data.tokenize_cache`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from alignkit.data import chat
from alignkit.data import records as records_module
from alignkit.data.chat import Formatted, fast_chat_rendering, format_record
from alignkit.data.records import (
    Completion, DataError, PreferenceRecord, Prompt, PromptRecord, RankedRecord, Record, SFTRecord, UnpairedRecord,
)
from alignkit.data.tokenize_cache import cache_key, read_cache, write_cache
from alignkit.data.tokenize_stats import TokenizeStats

logger = logging.getLogger(__name__)


@dataclass
class TokenizeConfig:
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    formatter: str = "auto"
    add_eos: bool | None = None
    loss_on: str = "all_assistant"  # SFT: "all_assistant" | "last_assistant" | "all" (module docstring)
    max_dropped_fraction: float = 0.5  # over this share of records dropped by the limits: stop (prepare.check_dropped)

    def __post_init__(self) -> None:
        """DataError naming the key: an unknown `loss_on`; a length limit below 1 (0 or less kept no prompt token,
        `prompt_ids[len - 0:]`, so every completion trained with no prompt at all, and generation prompts were empty;
        the CLI's bounds refuse these, a trainer built in Python did not)."""
        if self.loss_on not in LOSS_ON:
            raise DataError(f"data.loss_on (TokenizeConfig.loss_on): unknown value {self.loss_on!r}; valid: "
                            f"{', '.join(LOSS_ON)}")
        for key in ("max_length", "max_prompt_length"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(f"data.{key} (TokenizeConfig.{key}, the trainers' {key}): must be an integer >= 1, "
                                f"or None for no limit; got {value!r}")
        share = self.max_dropped_fraction
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise DataError(f"data.max_dropped_fraction (TokenizeConfig.max_dropped_fraction, the trainers' "
                            f"max_dropped_fraction): must be a number in [0, 1] (1: any share of the records may be "
                            f"dropped); got {share!r}")


LOSS_ON = ("all_assistant", "last_assistant", "all")


class Unfit(Exception):
    """The record cannot fit the length limits; `reason` names why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Batch:
    """Formatted texts and their token ids for one chunk of records, filled by `_prefetch` with one batched
    tokenizer call per `add_special_tokens` value (a fast tokenizer encodes the batch in parallel, in Rust)
    and read by `_ids` / `_format`; anything not prefetched is computed on the spot, so the results never
    depend on the prefetch, only the speed does. `suffix`: the EOS the tokenizer appends to every text
    (`chat.appended_eos`), resolved once per chunk rather than per encoding; `prompt_suffix`: every token it appends
    (`chat.added_suffix`), left out of prompts."""

    def __init__(self, suffix: tuple[int, ...] = (), prompt_suffix: tuple[int, ...] = ()) -> None:
        self.ids: dict[tuple[str, bool], list[int]] = {}
        self.formats: dict[tuple[int, int, str], Formatted] = {}
        self.suffix, self.prompt_suffix = suffix, prompt_suffix


def new_batch(tokenizer: Any) -> _Batch:
    """An empty `_Batch` with the tokenizer's appended tokens resolved."""
    suffix = chat.added_suffix(tokenizer)  # probed once for both
    return _Batch(chat.appended_eos(tokenizer, suffix), suffix)


_BATCH: ContextVar[_Batch | None] = ContextVar("alignkit_tokenize_batch", default=None)
CHUNK = 2048  # records per prefetch: bounds the memo's size


@contextmanager
def records_batch(tokenizer: Any) -> Iterator[None]:
    """Within this block `tokenize_record` calls share what is resolved once per batch of records (`_Batch`: the
    EOS the tokenizer appends, `chat.appended_eos`), nothing prefetched; the tokenizer must not change inside. For a
    caller tokenizing its own batches one record at a time (`prepare._tokenize_batch`, one per datasets.map batch):
    before, each of a record's encodings probed the suffix again. Inside `tokenize_records`' chunk: its batch kept."""
    if _BATCH.get() is not None:
        yield
        return
    token = _BATCH.set(new_batch(tokenizer))
    try:
        yield
    finally:
        _BATCH.reset(token)


def _ids(tokenizer: Any, text: str, add_special_tokens: bool, prompt: bool = False) -> list[int]:
    """`text`'s ids (the prefetched batch's when it has them), without the EOS the tokenizer appends to every text
    (`chat.without_added_suffix`: it is added back by `add_eos`); a `prompt` without any token it appends
    (`chat.added_suffix`: they follow the whole text, after the completion)."""
    batch = _BATCH.get()
    hit = batch.ids.get((text, add_special_tokens)) if batch is not None else None
    ids = list(hit) if hit is not None else list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if not add_special_tokens:
        return ids
    if prompt:
        return chat.without_added_suffix(ids, tokenizer, batch.prompt_suffix if batch is not None else
                                         chat.added_suffix(tokenizer))
    return chat.without_added_suffix(ids, tokenizer, batch.suffix if batch is not None else None)


def _format(prompt: Prompt, completion: Completion | None, tokenizer: Any, formatter: str) -> Formatted:
    batch = _BATCH.get()
    key = (id(prompt), id(completion), formatter)
    if batch is not None and key in batch.formats:
        return batch.formats[key]
    f = format_record(prompt, completion, tokenizer, formatter)
    if batch is not None:
        batch.formats[key] = f
    return f


def _completions(record: Record) -> list[Completion | None]:
    if isinstance(record, PromptRecord):
        return [None]
    if isinstance(record, (SFTRecord, UnpairedRecord)):
        return [record.completion]
    if isinstance(record, PreferenceRecord):
        return [record.chosen, record.rejected]
    if isinstance(record, RankedRecord):
        return list(record.responses)
    return []


def _prefetch(records: list[Record], tokenizer: Any, cfg: TokenizeConfig, batch: _Batch) -> None:
    """Format every record of the chunk and tokenize all its distinct texts in batched calls. A chat prompt that is
    a string prefix of its full text is derived from the full text's encoding (`_derive_prompts`) instead of being
    encoded again, wherever that provably gives the same ids."""
    wanted: dict[bool, dict[str, None]] = {True: {}, False: {}}
    derivable: dict[str, str] = {}  # prompt text -> a full text it is a string prefix of (add_special_tokens=False)
    for r in records:
        try:
            for c in _completions(r):
                f = _format(r.prompt, c, tokenizer, cfg.formatter)
                flag = f.add_special_tokens
                if f.full is not None and (f.full, flag) not in batch.ids:
                    wanted[flag][f.full] = None
                if (f.prompt, flag) in batch.ids:
                    continue
                if not flag and f.full is not None and f.full.startswith(f.prompt):
                    derivable.setdefault(f.prompt, f.full)
                else:
                    wanted[flag][f.prompt] = None
        except DataError:
            continue  # raised again, with its record, by tokenize_record
    for p in [p for p in derivable if p in wanted[False]]:
        del derivable[p]  # encoded anyway
    with _rust_threads(sum(map(len, wanted.values())) + len(derivable)):
        for flag, texts in wanted.items():
            if not texts:
                continue
            texts = list(texts)
            encodings = _backend_encode(tokenizer, texts, flag, offsets=not flag and bool(derivable))
            all_ids = [e.ids for e in encodings] if encodings is not None else _wrapper_encode(tokenizer, texts, flag)
            for text, ids in zip(texts, all_ids):
                batch.ids[(text, flag)] = ids
            if not flag and encodings is not None and derivable:
                derived = _derive_prompts(tokenizer, derivable, dict(zip(texts, encodings)), dict(zip(texts, all_ids)))
                for p, ids in derived.items():
                    batch.ids[(p, False)] = ids
        rest = [p for p in derivable if (p, False) not in batch.ids]
        if rest:
            for text, ids in zip(rest, _encode_many(tokenizer, rest, False)):
                batch.ids[(text, False)] = ids


PARALLEL_MIN = 1024  # texts in one backend call worth the tokenizer's Rust thread pool
_FALSY = ("", "off", "false", "f", "no", "n", "0")  # what `tokenizers` reads as TOKENIZERS_PARALLELISM off


@contextmanager
def _rust_threads(n_texts: int) -> Iterator[None]:
    """Let the fast tokenizer's batched encode use every core for a batch of >= PARALLEL_MIN texts.

    `tokenizers` reads TOKENIZERS_PARALLELISM at every batched call; alignkit's CLI sets it to "false" so that
    DataLoader workers forked later never touch a Rust thread pool made before the fork. This turns it on for the
    duration of our own batched encodes only (in this process, before any worker exists) and restores it after,
    so the workers still see "false". Unset already means on; nothing to do then."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    if n_texts < PARALLEL_MIN or (os.cpu_count() or 1) < 2 or old is None or old.strip().lower() not in _FALSY:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = old


def _anchors(tokenizer: Any) -> dict[int, str]:
    """Added tokens a chat prompt can be cut after (`_derive_prompts`): id -> content, for those matched in the raw
    text before normalisation (`normalized=False`) with no whitespace stripping or word-boundary rule; {} when the
    backend's model is not deterministic (BPE dropout) or the added tokens cannot be read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if getattr(backend.model, "dropout", None) not in (None, 0, 0.0):
            return {}
        return {i: t.content for i, t in backend.get_added_tokens_decoder().items()
                if t.content and not (t.normalized or t.lstrip or t.rstrip or t.single_word)}
    except Exception:  # noqa: BLE001 - no such API: no derivation, every prompt is encoded
        return {}


def _derive_prompts(tokenizer: Any, derivable: dict[str, str], full_enc: dict[str, Any],
                    full_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    """Ids of chat prompts read off their full text's encoding instead of encoding the prompt again.

    `tokenizers` first splits the text on added tokens matched in the raw text (leftmost-longest), then
    normalises, pre-tokenises and runs the model on each piece between them independently; with
    add_special_tokens=False nothing is added around. Let P be a prompt that is a string prefix of its full text F,
    and X the last anchor added token (`_anchors`) whose text lies inside P, at P[s:e]. If F's encoding has X as
    its token j spanning exactly F[s:e], then P splits the same way up to X (P's candidate matches are a subset of
    F's, and X's match was leftmost-longest in F), so encode(P) = F's ids[:j+1] + the ids of the piece P[e:] as it
    follows X, which is what encode(X + P[e:]) gives after its first token (checked to be X spanning X). A chat
    template's generation prompt follows its last added token, so the re-encoded tail is short ("assistant\n").
    Prompts without such an anchor are left out (the caller encodes them). As a guard, the first few derived
    prompts of every call are also encoded directly and a single difference drops the derivation for the call."""
    anchors = _anchors(tokenizer)
    if not anchors:
        return {}
    by_content = {c: i for i, c in anchors.items()}
    cuts: dict[str, tuple[list[int], int, str]] = {}  # prompt -> (F's ids up to and with X, X's id, X + P[e:])
    for p, full in derivable.items():
        enc, ids = full_enc.get(full), full_ids.get(full)
        if enc is None or ids is None:
            continue
        at, x = max((p.rfind(c), c) for c in by_content)  # the last anchor's text inside P
        if at < 0:
            continue
        j = enc.char_to_token(at)
        if j is not None and ids[j] == by_content[x] and tuple(enc.token_to_chars(j)) == (at, at + len(x)):
            cuts[p] = (ids[:j + 1], ids[j], x + p[at + len(x):])
    if not cuts:
        return {}
    tails = list(dict.fromkeys((x, t) for _, x, t in cuts.values()))
    tail_enc = _backend_encode(tokenizer, [t for _, t in tails], False)
    if tail_enc is None:
        return {}
    tail_ids = {(x, t): enc.ids[1:] for (x, t), enc in zip(tails, tail_enc)
                if enc.ids and enc.ids[0] == x and enc.offsets[0] == (0, len(anchors[x]))}
    out = {p: head + tail_ids[(x, t)] for p, (head, x, t) in cuts.items() if (x, t) in tail_ids}
    sample = list(out)[:4]
    if sample and [out[p] for p in sample] != [e.ids for e in _backend_encode(tokenizer, sample, False) or []]:
        logger.debug("prompt ids read off the full text differ from encoding the prompt; encoding every prompt")
        return {}
    return out


def _backend_encode(tokenizer: Any, texts: list[str], add_special_tokens: bool,
                    offsets: bool = True) -> list[Any] | None:
    """The fast tokenizer's Rust backend encodings of `texts` (`backend_tokenizer.encode_batch`, public API of
    `tokenizers`: it skips the wrapper's per-text Python conversion; `encode_batch_fast`, the same without
    character offsets, when `offsets` is False), or None when there is no backend or its ids differ from the
    wrapper's (`tokenizer(text, add_special_tokens=...)`) on the first texts of the call. None too when the backend
    holds a truncation or padding setting (a tokenizer.json saved with one, loaded as it is: compat K10): the backend
    applies it, the wrapper clears it on its first call, so the first texts agreed and a longer one was cut to the
    saved max_length without a word (completion tokens lost, counted as no truncation). None as well while the
    backend's `encode_special_tokens` lags the wrapper's `split_special_tokens` (compat K13)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if getattr(backend, "truncation", None) is not None or getattr(backend, "padding", None) is not None:
        return None
    if getattr(backend, "encode_special_tokens", False) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None  # split_special_tokens set after loading: the backend learns it on the wrapper's next call (K13)
    encode_batch = backend.encode_batch if offsets else getattr(backend, "encode_batch_fast", backend.encode_batch)
    try:
        encodings = encode_batch(texts, add_special_tokens=add_special_tokens)
    except Exception:  # noqa: BLE001 - any backend trouble: the wrapper is the reference path
        return None
    if all(encodings[i].ids == list(tokenizer(texts[i], add_special_tokens=add_special_tokens)["input_ids"])
           for i in range(min(len(texts), 8))):
        return encodings
    logger.debug("the tokenizer's backend disagrees with its wrapper; tokenizing through the wrapper")
    return None


def _wrapper_encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _encode_many(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of `texts`, as `tokenizer(text, add_special_tokens=...)` gives them one at a time (the backend's
    batch when it agrees with the wrapper, else the wrapper's batched call)."""
    encodings = _backend_encode(tokenizer, texts, add_special_tokens, offsets=False)
    if encodings is not None:
        return [e.ids for e in encodings]
    return _wrapper_encode(tokenizer, texts, add_special_tokens)


def encode(prompt: Prompt, completions: list[Completion], tokenizer: Any, cfg: TokenizeConfig,
           rid: str) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [completion ids]) with the boundary checked in token space and EOS handled."""
    prompt_ids: list[int] | None = None
    outs = []
    for c in completions:
        f = _format(prompt, c, tokenizer, cfg.formatter)
        if prompt_ids is None:
            prompt_ids = _ids(tokenizer, f.prompt, f.add_special_tokens, prompt=True)
        full = _ids(tokenizer, f.full, f.add_special_tokens)
        n = len(prompt_ids)
        if full[:n] != prompt_ids:
            i = next((k for k in range(min(n, len(full))) if full[k] != prompt_ids[k]), min(n, len(full)))
            got = tokenizer.convert_ids_to_tokens(full[i:i + 2])
            want = tokenizer.convert_ids_to_tokens(prompt_ids[i:i + 2])
            raise DataError(
                f"{rid or 'record'}: the tokenized prompt is not a prefix of the tokenized prompt+completion "
                f"(they differ at token {i}: prompt alone gives {want}, with the completion {got}). The tokenizer "
                f"merged text across the boundary: end the prompt at a word boundary and start the completion with "
                f"its whitespace (or use a chat template / conversational records)")
        comp = full[n:]
        add_eos = cfg.add_eos if cfg.add_eos is not None else not f.ends_turn
        eos = tokenizer.eos_token_id if add_eos else None
        if add_eos and eos is None:  # else no EOS, without a word: the model never learns to stop
            said = "data.add_eos=true" if cfg.add_eos else "the plain-text format (data.add_eos unset)"
            raise DataError(f"{said} ends each completion with the tokenizer's EOS token, and "
                            f"{chat.tokenizer_name(tokenizer)} has none (eos_token is None); set the tokenizer's "
                            f"eos_token, or data.add_eos=false to train completions without one")
        if eos is not None and (not comp or comp[-1] != eos):
            comp.append(eos)
        outs.append(comp)
    return prompt_ids or [], outs


def truncate(prompt_ids: list[int], completions: list[list[int]], cfg: TokenizeConfig,
             stats: TokenizeStats, rid: str = "") -> tuple[list[int], list[list[int]]]:
    """Apply the truncation policy of the module docstring; raise `Unfit` if nothing trainable is left."""
    if any(len(c) == 0 for c in completions):
        raise Unfit("empty_completion")
    cut = cfg.max_prompt_length is not None and len(prompt_ids) > cfg.max_prompt_length
    if cut:
        prompt_ids = prompt_ids[len(prompt_ids) - cfg.max_prompt_length:]
    if cfg.max_length is not None and cfg.max_length - len(prompt_ids) <= 0:
        raise Unfit("prompt_too_long")  # dropped, counted as such (not as a kept record with a cut prompt)
    if cut:
        stats.note_prompt_truncated(rid)
    if cfg.max_length is not None:
        room = cfg.max_length - len(prompt_ids)
        if any(len(c) > room for c in completions):
            stats.completion_truncated += 1
            completions = [c[:room] for c in completions]
    return prompt_ids, completions


def _seq(prompt_ids: list[int], comp: list[int]) -> tuple[list[int], list[int]]:
    return prompt_ids + comp, [0] * len(prompt_ids) + [1] * len(comp)


def _prefix_or_error(short: list[int], long: list[int], rid: str, what: str) -> None:
    if long[:len(short)] != short:
        raise DataError(f"{rid or 'record'}: {what} does not tokenize to a prefix of the conversation (the chat "
                        f"template rewrites earlier turns), so the earlier assistant turns cannot be located; set "
                        f"data.loss_on=last_assistant (TokenizeConfig.loss_on) to train the final turn only")


def prompt_mask(prompt: Prompt, prompt_ids: list[int], tokenizer: Any, cfg: TokenizeConfig, rid: str,
                untrained: Iterable[int] = ()) -> list[int]:
    """1 on the prompt tokens trained under `cfg.loss_on` (earlier assistant turns but those `untrained`, or all),
    else 0."""
    if cfg.loss_on == "all":
        return [1] * len(prompt_ids)
    mask = [0] * len(prompt_ids)
    if cfg.loss_on == "last_assistant" or not isinstance(prompt, list):
        return mask
    untrained = set(untrained)
    for i, m in enumerate(prompt):
        if m["role"] != "assistant" or not m["content"] or i in untrained:
            continue
        f = format_record(prompt[:i], [m], tokenizer, cfg.formatter)
        before = _ids(tokenizer, f.prompt, f.add_special_tokens, prompt=True)
        through = _ids(tokenizer, f.full, f.add_special_tokens, prompt=True)  # a prefix of the prompt
        _prefix_or_error(before, through, rid, f"the conversation before assistant turn {i}")
        _prefix_or_error(through, prompt_ids, rid, f"the conversation through assistant turn {i}")
        for k in range(len(before), len(through)):
            mask[k] = 1
    return mask


def tokenize_record(record: Record, tokenizer: Any, cfg: TokenizeConfig, stats: TokenizeStats | None = None) -> dict:
    """One record -> a dict of token lists (keys in the module docstring). Raises `Unfit` or `DataError` (naming the
    record: a formatter's error, e.g. a chat template refusing the conversation, does not know it)."""
    try:
        return _tokenize_record(record, tokenizer, cfg, stats if stats is not None else TokenizeStats())
    except DataError as e:
        if not record.id or str(e).startswith(record.id):
            raise
        raise DataError(f"{record.id}: {e}") from None


def _tokenize_record(record: Record, tokenizer: Any, cfg: TokenizeConfig, stats: TokenizeStats) -> dict:
    comps = _completions(record)
    if not comps:
        raise DataError(f"cannot tokenize a {type(record).__name__}; expected one of the alignkit.data.records classes")
    base = {"weight": record.weight, "id": record.id}
    if isinstance(record.prompt, list) and any(m["role"] in chat.CONTEXT_ROLES for m in record.prompt):
        roles = chat.unrendered_roles(record.prompt, _format(record.prompt, comps[0], tokenizer, cfg.formatter).prompt)
        if roles:
            stats.note_system_unrendered(record.id, roles)
    if empty := chat.empty_context_roles(record.prompt, *comps):
        stats.note_empty_context(record.id, empty)
    if isinstance(record.prompt, list) and chat.resolved_formatter(record.prompt, cfg.formatter) == "chat-template":
        say_quoted_special_tokens(record, comps, tokenizer)
    if isinstance(record, PromptRecord):
        f = _format(record.prompt, None, tokenizer, cfg.formatter)
        ids = _ids(tokenizer, f.prompt, f.add_special_tokens, prompt=True)
        limit = cfg.max_prompt_length if cfg.max_prompt_length is not None else cfg.max_length
        if limit is not None and len(ids) > limit:
            ids = ids[len(ids) - limit:]
            stats.note_prompt_truncated(record.id)
        return {"prompt_input_ids": ids, "length": len(ids), "prompt": record.prompt, **base}
    full_prompt_ids, comp_ids = encode(record.prompt, comps, tokenizer, cfg, record.id)
    prompt_ids, comp_ids = truncate(full_prompt_ids, comp_ids, cfg, stats, record.id)
    seqs = [_seq(prompt_ids, c) for c in comp_ids]
    if isinstance(record, SFTRecord) and cfg.loss_on != "last_assistant" and not (
            cfg.loss_on == "all_assistant" and record.meta.get(records_module.PROMPT_IS_CONTEXT)):
        untrained = record.meta.get(records_module.UNTRAINED_TURNS, ())
        if untrained and cfg.loss_on == "all":
            raise DataError(f"{record.id or 'record'}: the conversation gives assistant turn(s) {list(untrained)} "
                            f"'weight' 0, and data.loss_on=all (TokenizeConfig.loss_on) trains every token, them "
                            f"included; set data.loss_on=all_assistant to leave them untrained, or drop their weights")
        pmask = prompt_mask(record.prompt, full_prompt_ids, tokenizer, cfg, record.id, untrained)
        pmask = pmask[len(pmask) - len(prompt_ids):]  # left-truncated with the prompt
        seqs = [(seqs[0][0], pmask + seqs[0][1][len(prompt_ids):])]
    if isinstance(record, PreferenceRecord):
        (ci, cm), (ri, rm) = seqs
        return {"chosen_input_ids": ci, "chosen_completion_mask": cm, "rejected_input_ids": ri,
                "rejected_completion_mask": rm, "prompt_length": len(prompt_ids), "length": max(len(ci), len(ri)),
                "margin": record.margin, **base}
    if isinstance(record, RankedRecord):
        return {"input_ids": [s[0] for s in seqs], "completion_mask": [s[1] for s in seqs], "ranks": list(record.ranks),
                "prompt_length": len(prompt_ids), "length": sum(len(s[0]) for s in seqs), **base}
    out = {"input_ids": seqs[0][0], "completion_mask": seqs[0][1], "prompt_length": len(prompt_ids),
           "length": len(seqs[0][0]), **base}
    if isinstance(record, UnpairedRecord):
        out["label"] = record.label
    return out


_QUOTED_SAID: set[tuple[int, str]] = set()


def say_quoted_special_tokens(record: Record, comps: list[Completion | None], tokenizer: Any) -> None:
    """One warning line per special token (and tokenizer, per process) that a conversation's messages quote
    (`chat.quoted_special_tokens`): its ids hold the token itself where the text was meant, naming the first record
    and the fix. Not a refusal: the text is the user's (a question about chat templates), and was trained so before."""
    messages = [*record.prompt, *(m for c in comps if isinstance(c, list) for m in c)]
    new = [t for t in chat.quoted_special_tokens(messages, tokenizer) if (id(tokenizer), t) not in _QUOTED_SAID]
    if not new:
        return
    _QUOTED_SAID.update((id(tokenizer), t) for t in new)
    logger.warning("%s: a message quotes %s, which %s reads as the special token itself (a turn marker inside the "
                   "turn), not as the text; the record is kept so (said once per token: other records are not "
                   "named); reword the quote (e.g. '<| im_end |>') or drop such records if the model must not learn "
                   "it", record.id or "a record", " / ".join(map(repr, new)), chat.tokenizer_name(tokenizer))


def warn_mixed_formats(records: list[Record], formatter: str) -> None:
    """One warning when `formatter` ("auto") formats the records two ways: a file whose prompts are plain text in
    some rows and conversations in others trains the plain ones as verbatim text and the others through the chat
    template, and the model learns two prompt formats where one was meant (most often a join or conversion that
    missed some rows). The counts, the first record of each and the fix."""
    first: dict[str, str] = {}
    counts: Counter = Counter()
    for r in records:
        name = chat.resolved_formatter(r.prompt, formatter)
        counts[name] += 1
        first.setdefault(name, r.id or "?")
    if len(counts) > 1:
        logger.warning("data.formatter=%s formats these records two ways: %s; give every prompt the same form "
                       "(all conversations, or all plain text), or set data.formatter=chat-template (a plain-text "
                       "prompt is then one user turn)", formatter,
                       "; ".join(f"{n} as {name!r} (e.g. {first[name]})" for name, n in sorted(counts.items())))


def tokenize_records(records: list[Record], tokenizer: Any, cfg: TokenizeConfig | None = None,
                     cache_dir: str | Path | None = None, **overrides: Any) -> tuple[list[dict], TokenizeStats]:
    """Tokenize every record; unfit ones are dropped, counted and logged (see `TokenizeStats.summary`).

    Records are formatted, then tokenized in batches (`_prefetch`), with exactly the ids of one call per
    text. With `cache_dir`, the features are kept there under a key of everything they depend on (the
    records, the tokenizer's vocabulary/template/specials, `cfg`, and the source of this module, the
    formatters and the cache: `tokenize_cache.cache_key`), so a second run with the same inputs reads them back
    instead of tokenizing again."""
    unknown = set(overrides) - set(TokenizeConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown tokenize option(s) {sorted(unknown)}; valid: "
                        f"{', '.join(TokenizeConfig.__dataclass_fields__)}")
    cfg = replace(cfg if cfg is not None else TokenizeConfig(), **overrides)  # checked by its __post_init__
    if cfg.max_length is not None and cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        logger.warning("max_prompt_length=%d >= max_length=%d: prompts may leave no room for completions",
                       cfg.max_prompt_length, cfg.max_length)
    warn_mixed_formats(records, cfg.formatter)
    key = cache_key(records, tokenizer, cfg) if cache_dir is not None else None
    if key is not None:
        cached = read_cache(Path(cache_dir), key, TokenizeStats.from_summary)
        if cached is not None:
            logger.info("tokenized features read from the cache (%s)", Path(cache_dir) / f"{key}.jsonl")
            (logger.warning if cached[1].warns else logger.info)("%s", cached[1].summary())
            return cached
    stats = TokenizeStats(total=len(records))
    out = []
    for lo in range(0, len(records), CHUNK):
        chunk = records[lo:lo + CHUNK]
        batch = new_batch(tokenizer)
        token = _BATCH.set(batch)
        try:
            with fast_chat_rendering(tokenizer):
                _prefetch(chunk, tokenizer, cfg, batch)
            for r in chunk:
                try:
                    out.append(tokenize_record(r, tokenizer, cfg, stats))
                except Unfit as e:
                    stats.drop(e.reason, r.id)
        finally:
            _BATCH.reset(token)
    stats.kept = len(out)
    (logger.warning if stats.warns else logger.info)("%s", stats.summary())
    if key is not None:
        write_cache(Path(cache_dir), key, out, stats.as_summary())
    return out, stats
