"""Records -> token ids with completion masks, truncated by one stated policy, with counted drops.

Boundary. Each (prompt, completion) is formatted (`alignkit.data.chat`) and the full text is tokenized
once; the prompt text is tokenized too and its ids must be a prefix of the full ids. That prefix is the
prompt, the rest the completion. A record whose tokenized prompt is not a prefix (BPE merged across the
boundary, or a chat template rewrote earlier turns) is an ERROR naming the record, never a warning.

Multi-turn SFT (`loss_on`, SFT records only; TRL's `assistant_only_loss`, Open-Assistant's trainer):
- "all_assistant" (default): every assistant turn is trained, the final completion AND each assistant
  message inside a conversational prompt (with its end-of-turn marker, as the final turn);
- "last_assistant": only the final completion (earlier assistant turns are context);
- "all": the whole sequence (prompt included), TRL's language-modelling loss.
An earlier assistant turn i is located in token space like the completion: the conversation up to turn i
with the generation prompt must tokenize to a prefix of the conversation through turn i, which must be a
prefix of the full prompt; a chat template that rewrites earlier turns is an ERROR naming the record (use
"last_assistant" there). `prompt_length` stays the length of the prompt before the final completion.

EOS. `add_eos=None` (default) appends `tokenizer.eos_token_id` to the completion unless the format ends
the turn itself (chat templates and the OASST format do; plain text does not: TRL's convention).
`True`/`False` force it. The appended EOS is part of the completion (it is trained on).

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
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from alignkit.data.chat import format_record
from alignkit.data.records import (Completion, DataError, PreferenceRecord, Prompt, PromptRecord, RankedRecord,
                                   Record, SFTRecord, UnpairedRecord)

logger = logging.getLogger(__name__)


@dataclass
class TokenizeConfig:
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    formatter: str = "auto"
    add_eos: bool | None = None
    loss_on: str = "all_assistant"  # SFT: "all_assistant" | "last_assistant" | "all" (module docstring)


LOSS_ON = ("all_assistant", "last_assistant", "all")


@dataclass
class TokenizeStats:
    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_ids: dict = field(default_factory=dict)  # reason -> first ids (up to 5)

    def drop(self, reason: str, rid: str) -> None:
        self.dropped[reason] += 1
        self.dropped_ids.setdefault(reason, [])
        if len(self.dropped_ids[reason]) < 5:
            self.dropped_ids[reason].append(rid)

    def summary(self) -> str:
        s = (f"tokenized {self.kept}/{self.total} record(s); prompt truncated: {self.prompt_truncated}, "
             f"completion truncated: {self.completion_truncated}")
        for reason, n in self.dropped.items():
            s += f"; dropped {n} ({reason}), e.g. {self.dropped_ids[reason]}"
        return s


class Unfit(Exception):
    """The record cannot fit the length limits; `reason` names why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode(prompt: Prompt, completions: list[Completion], tokenizer: Any, cfg: TokenizeConfig,
           rid: str) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [completion ids]) with the boundary checked in token space and EOS handled."""
    prompt_ids: list[int] | None = None
    outs = []
    for c in completions:
        f = format_record(prompt, c, tokenizer, cfg.formatter)
        if prompt_ids is None:
            prompt_ids = _ids(tokenizer, f.prompt, f.add_special_tokens)
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
        eos = tokenizer.eos_token_id
        if add_eos and eos is not None and (not comp or comp[-1] != eos):
            comp.append(eos)
        outs.append(comp)
    return prompt_ids or [], outs


def truncate(prompt_ids: list[int], completions: list[list[int]], cfg: TokenizeConfig,
             stats: TokenizeStats) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation policy of the module docstring; raise `Unfit` if nothing trainable is left."""
    if any(len(c) == 0 for c in completions):
        raise Unfit("empty_completion")
    if cfg.max_prompt_length is not None and len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - cfg.max_prompt_length:]
        stats.prompt_truncated += 1
    if cfg.max_length is not None:
        room = cfg.max_length - len(prompt_ids)
        if room <= 0:
            raise Unfit("prompt_too_long")
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


def prompt_mask(prompt: Prompt, prompt_ids: list[int], tokenizer: Any, cfg: TokenizeConfig, rid: str) -> list[int]:
    """1 on the prompt tokens trained under `cfg.loss_on` (earlier assistant turns, or all), else 0."""
    if cfg.loss_on == "all":
        return [1] * len(prompt_ids)
    mask = [0] * len(prompt_ids)
    if cfg.loss_on == "last_assistant" or not isinstance(prompt, list):
        return mask
    for i, m in enumerate(prompt):
        if m["role"] != "assistant" or not m["content"]:
            continue
        f = format_record(prompt[:i], [m], tokenizer, cfg.formatter)
        before = _ids(tokenizer, f.prompt, f.add_special_tokens)
        through = _ids(tokenizer, f.full, f.add_special_tokens)
        _prefix_or_error(before, through, rid, f"the conversation before assistant turn {i}")
        _prefix_or_error(through, prompt_ids, rid, f"the conversation through assistant turn {i}")
        for k in range(len(before), len(through)):
            mask[k] = 1
    return mask


def tokenize_record(record: Record, tokenizer: Any, cfg: TokenizeConfig, stats: TokenizeStats | None = None) -> dict:
    """One record -> a dict of token lists (keys in the module docstring). Raises `Unfit` or `DataError`."""
    stats = stats if stats is not None else TokenizeStats()
    base = {"weight": record.weight, "id": record.id}
    if isinstance(record, PromptRecord):
        f = format_record(record.prompt, None, tokenizer, cfg.formatter)
        ids = _ids(tokenizer, f.prompt, f.add_special_tokens)
        limit = cfg.max_prompt_length if cfg.max_prompt_length is not None else cfg.max_length
        if limit is not None and len(ids) > limit:
            ids = ids[len(ids) - limit:]
            stats.prompt_truncated += 1
        return {"prompt_input_ids": ids, "length": len(ids), "prompt": record.prompt, **base}
    if isinstance(record, (SFTRecord, UnpairedRecord)):
        comps = [record.completion]
    elif isinstance(record, PreferenceRecord):
        comps = [record.chosen, record.rejected]
    elif isinstance(record, RankedRecord):
        comps = list(record.responses)
    else:
        raise DataError(f"cannot tokenize a {type(record).__name__}; expected one of the alignkit.data.records classes")
    full_prompt_ids, comp_ids = encode(record.prompt, comps, tokenizer, cfg, record.id)
    prompt_ids, comp_ids = truncate(full_prompt_ids, comp_ids, cfg, stats)
    seqs = [_seq(prompt_ids, c) for c in comp_ids]
    if isinstance(record, SFTRecord) and cfg.loss_on != "last_assistant":
        pmask = prompt_mask(record.prompt, full_prompt_ids, tokenizer, cfg, record.id)
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


def tokenize_records(records: list[Record], tokenizer: Any, cfg: TokenizeConfig | None = None,
                     **overrides: Any) -> tuple[list[dict], TokenizeStats]:
    """Tokenize every record; unfit ones are dropped, counted and logged (see `TokenizeStats.summary`)."""
    unknown = set(overrides) - set(TokenizeConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown tokenize option(s) {sorted(unknown)}; valid: "
                        f"{', '.join(TokenizeConfig.__dataclass_fields__)}")
    cfg = replace(cfg if cfg is not None else TokenizeConfig(), **overrides)
    if cfg.loss_on not in LOSS_ON:
        raise DataError(f"data.loss_on (TokenizeConfig.loss_on): unknown value {cfg.loss_on!r}; valid: "
                        f"{', '.join(LOSS_ON)}")
    if cfg.max_length is not None and cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        logger.warning("max_prompt_length=%d >= max_length=%d: prompts may leave no room for completions",
                       cfg.max_prompt_length, cfg.max_length)
    stats = TokenizeStats(total=len(records))
    out = []
    for r in records:
        try:
            out.append(tokenize_record(r, tokenizer, cfg, stats))
        except Unfit as e:
            stats.drop(e.reason, r.id)
    stats.kept = len(out)
    (logger.warning if stats.dropped else logger.info)("%s", stats.summary())
    return out, stats
