"""Generation from the current policy, inside training: prompts -> `Sample`s.

    samples = generate_responses(model, tokenizer, prompts, SamplingConfig(num_samples=4, max_new_tokens=64))

Prompts are `PromptRecord`s (or any record: its prompt is used), plain strings, or conversations (lists of
{"role", "content"} messages). Each is formatted with `alignkit.data.chat.format_record` (formatter "auto":
the tokenizer's chat template for conversations, verbatim text for strings), tokenized on its own, and, if
longer than `max_prompt_length`, keeps its LAST tokens (as `alignkit.data.tokenize` does for prompts; counted
and warned about, `encode_prompts`).

Batches are left-padded and generated with Hugging Face `generate` (KV cache on), or with `decode.lean_generate`
(generate's loop with less work per step; its default inverse-CDF sampler draws from the same distribution with
far less CPU, `sampler="multinomial"` gives generate's exact tokens) where every option of the call is one it
supports.
The `num_samples` rows of a prompt share one prefill (`shared_prompt_cache`: the prompt's KV cache is computed
once and copied to its rows; not for a ReftModel, whose edits happen in the prompt pass). The same call works for a
plain transformers model, a `peft` model, and a `ReftModel`: for a ReftModel the prompt tokens named by
`positions` ("l1", "f3+l3", ... see `alignkit.data.positions`) are intervened on, exactly as in training
(locations built from each row's non-pad span); `intervene_on_generated=True` also edits generated tokens.
The model is put in eval mode during generation and given back in the mode it had.

Ordering: `num_samples` responses per prompt, prompt-major and contiguous: sample j of prompt i is at
index `i * num_samples + j` (`Sample.group == i`, `Sample.index == j`), the layout the group advantages of
`alignkit.losses.policy` expect.

Finish reasons (`Sample.finish_reason`):
- "eos":    the model emitted an end token (the generation config's / tokenizer's EOS, or one of
            `SamplingConfig.stop_token_ids`). `response_ids` end WITH that token (the policy chose it;
            it is part of the action sequence to score); `response` text never contains it.
- "stop":   a stop string appeared first. `response_ids` are cut after the token that completed the
            stop string (the shortest prefix whose decoding contains it); `response` is cut just before
            the stop string (or after it, with `include_stop_str_in_output`).
- "length": `max_new_tokens` reached with neither.

Sampling distribution: temperature, top_p and top_k are passed explicitly (top_k=None disables top-k rather
than taking transformers' default of 50; repetition penalty is pinned to 1.0), so what is sampled is the
policy's distribution at `temperature`, what an on-policy trainer must score. The model folder's
generation_config.json: its eos_token_id list ends generation (`end_token_ids`); its do_sample / temperature / top_p
/ top_k / repetition_penalty are not used (`overridden_options`); its options beyond them (no_repeat_ngram_size,
min_new_tokens, suppress_tokens, ...) are applied by model.generate (the decode loop hands such calls to it),
refused for online training (`check_on_policy_options`) and named in a warning elsewhere (`note_generation_config`).
`seed` makes a call reproducible without touching the global RNG (its state is forked and restored); vary it per
round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from alignkit.adapters import unwrap_lm
from alignkit.compat import cache_keyword
from alignkit.data.chat import format_record, prompt_ids, resolved_formatter, turn_end_ids
from alignkit.data.collators import pad
from alignkit.data.positions import Positions, locations_from_mask
from alignkit.data.records import DataError, Prompt, PromptRecord
from alignkit.guards import NonFiniteLogitsError
from alignkit.interventions.attach import ReftModel
from alignkit.online.decode import (generation_options, inference_context, lean_generate, lean_unsupported,
                                   preallocated_cache, sharded_over_processes)
from alignkit.models.rope import check_context
from alignkit.settings.sampling import SamplingConfig  # torch-free: the settings use it
from alignkit.settings.typed import ConfigError

logger = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class Sample:
    """One generated response. Token ids are plain lists (prompt unpadded, response without padding).
    `group`/`index`: prompt index and sample number; `prompt_id`, `weight`, `meta`: from the prompt record
    (e.g. a reference answer in `meta` for a verifiable-reward function)."""

    prompt: Prompt
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str
    group: int = 0
    index: int = 0
    prompt_id: str = ""
    weight: float = 1.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "sample") -> "Sample":
        missing = [k for k in ("prompt", "response", "prompt_ids", "response_ids", "finish_reason") if k not in d]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; a sample needs prompt, response, prompt_ids, "
                            f"response_ids and finish_reason (write samples with Sample.to_dict)")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def as_prompt_records(prompts: Sequence[Any]) -> list[PromptRecord]:
    """Records (their prompt and weight are used), strings or conversations -> `PromptRecord`s."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, PromptRecord):
            out.append(p)
        elif hasattr(p, "prompt") and hasattr(p, "kind"):
            out.append(PromptRecord(p.prompt, weight=p.weight, id=p.id, meta=dict(p.meta)))
        elif isinstance(p, (str, list)):
            out.append(PromptRecord(p, id=f"prompt[{i}]"))
        else:
            raise DataError(f"prompt[{i}]: expected a record, a string or a list of messages, got {type(p).__name__}")
    return out


def prompts_fingerprint(prompts: Sequence[PromptRecord]) -> dict[str, Any]:
    """The count and a SHA-256 of the records' prompts, in order: what a checkpoint's prompt order indexes, and what
    a kept round's samples were made from."""
    digest = hashlib.sha256(json.dumps([r.prompt for r in prompts], sort_keys=True, default=str).encode()).hexdigest()
    return {"count": len(prompts), "sha256": digest}


def encode_prompt(prompt: Prompt, tokenizer: Any, formatter: str = "auto",
                  max_prompt_length: int | None = None) -> list[int]:
    """Token ids of the formatted prompt (with the generation prompt), left-truncated to `max_prompt_length`; without
    the EOS a tokenizer appends to every text itself (`chat.prompt_ids`: training's prompts have none either)."""
    f = format_record(prompt, None, tokenizer, formatter)
    ids = prompt_ids(tokenizer, f.prompt, f.add_special_tokens)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[len(ids) - max_prompt_length:]
    return ids


_warned_truncation: set[tuple[str, int]] = set()


def encode_prompts(records: Sequence[PromptRecord], tokenizer: Any, formatter: str = "auto",
                   max_prompt_length: int | None = None) -> list[list[int]]:
    """`encode_prompt` of each record; a prompt with no tokens is a DataError naming it. Prompts cut to their last
    `max_prompt_length` tokens are counted: a warning the first time a tokenizer's prompts are cut to that limit in
    this process (the start of a prompt, e.g. its system message or the template's first tokens, is lost), INFO on
    later calls (an online run samples every step)."""
    encoded, cut = [], []
    for r in records:
        ids = encode_prompt(r.prompt, tokenizer, formatter)
        if not ids:
            raise DataError(f"{r.id or 'prompt'}: the formatted prompt has no tokens; fill in the prompt")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            cut.append((r.id or f"prompt {len(encoded)}", len(ids)))
            ids = ids[len(ids) - max_prompt_length:]
        encoded.append(ids)
    if cut:
        key = (str(getattr(tokenizer, "name_or_path", "")), int(max_prompt_length))
        first = key not in _warned_truncation
        _warned_truncation.add(key)
        (logger.warning if first else logger.info)(
            "%d of %d prompt(s) are longer than max_prompt_length=%d tokens and keep only their last %d (their start "
            "is lost), e.g. %s of %d tokens; raise max_prompt_length (data.max_prompt_length on the command line) "
            "to keep whole prompts", len(cut), len(records), max_prompt_length, max_prompt_length, cut[0][0], cut[0][1])
    return encoded


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def uses_chat_template(records: Sequence[PromptRecord], formatter: str) -> bool:
    """Whether any of `records` is formatted by the chat template (then its turn-end token ends generation)."""
    return any(resolved_formatter(r.prompt, formatter) == "chat-template" for r in records)


def end_token_ids(model: Any, tokenizer: Any, cfg: SamplingConfig, chat: bool = True) -> list[int]:
    """EOS ids of the model's generation config (every one of a list: Llama-3-Instruct folders name
    `[<|end_of_text|>, <|eot_id|>]`) and the tokenizer, plus `cfg.stop_token_ids`; with `chat` (prompts formatted
    by the chat template) also the template's turn-end token (`data.chat.turn_end_ids`: a model trained through the
    template ends its answers with it, not EOS). Plain-text prompts do not stop there: the token means nothing
    outside the template. The one source of the end tokens of every generation path (the decode loop,
    model.generate, vLLM's stop_token_ids, serve, `LocalChat`, `generation_report`); `model` may be wrapped (DDP,
    ReFT, peft: its transformers model's generation config is read) or None (the tokenizer's alone)."""
    ids: list[int] = []
    gen = getattr(transformers_model(model), "generation_config", None)
    for v in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id, turn_end_ids(tokenizer) if chat else [],
              list(cfg.stop_token_ids)):
        for i in ([v] if isinstance(v, int) else (v or [])):
            if i not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("no end-of-sequence token: neither the model's generation_config nor the tokenizer has "
                         "an eos_token_id; set one or pass SamplingConfig(stop_token_ids=[...])")
    return ids


def _generation_kwargs(cfg: SamplingConfig, tokenizer: Any, eos: list[int]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, use_cache=True,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0,
                              num_beams=1)
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or 0)
    if cfg.stop:
        kw["stop_strings"] = list(cfg.stop)  # stops each row early; the cut itself is ours (finish_response)
    out: dict[str, Any] = {"generation_config": GenerationConfig(**kw)}
    if cfg.stop:
        out["tokenizer"] = tokenizer
    return out


class NonFiniteWatch(LogitsProcessor):
    """For `model.generate` (the fallback of `generate_responses`): stops the call on a row whose next-token scores
    are NaN / +inf or all -inf, as the lean loop does. Greedy decoding would otherwise take argmax over NaN (the
    first NaN's index) and write garbage as an answer; sampling would stop inside torch.multinomial with an error
    that names no row. Warpers' -inf entries (top-k / top-p) are not flagged while one entry is finite."""

    def __init__(self, do_sample: bool) -> None:
        self.how = "sampling, model.generate" if do_sample else "greedy, model.generate"

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)  # (B,)
        if bool(bad.any()):  # generate reads its stopping criteria every step too: no new kind of sync
            raise NonFiniteLogitsError(int(bad.nonzero()[0, 0]), self.how)
        return scores


def check_sampler(cfg: SamplingConfig, why_not: str | None, section: str = "sampling") -> None:
    """`sampling.sampler=inverse_cdf` where the call samples with `model.generate` (`why_not`: the lean loop's
    reason not to run, `decode.lean_unsupported`) would be set and not used: one line instead. `section`: the
    config section the line names (`generation` in `alignkit generate`)."""
    if why_not and cfg.sampler == "inverse_cdf" and cfg.do_sample:
        raise ValueError(f"{section}.sampler=inverse_cdf: this policy samples with model.generate ({why_not}), which "
                         f"draws with torch.multinomial; remove {section}.sampler (or set it to multinomial)")


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special tokens' texts and ids (`<|im_end|>` -> 4): text decoded without special tokens never
    holds them, so a stop string holding one cannot match it (`check_stop_strings`; serve's `special_stop_ids`)."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "all_special_tokens", ()) if t}


def special_token_in(special: dict[str, int], text: str) -> str | None:
    """The first special token (of `special_tokens`) whose text is in `text`, or None."""
    return next((t for t in special if t in text), None)


def check_stop_strings(tokenizer: Any, cfg: SamplingConfig, section: str = "sampling") -> None:
    """ConfigError for a stop string holding a special token's text (`<|im_end|>`, `</s>`, ...): responses are
    decoded without special tokens (`finish_response`), so it never matches the text, while `model.generate`'s
    stop-string criterion, which reads token strings, halts the row on that token: the row was reported 'length'
    with the token kept in `response_ids`. The token's id belongs in `stop_token_ids` (finish reason 'eos')."""
    special = special_tokens(tokenizer)
    for s in cfg.stop:
        held = special_token_in(special, s)
        if held is not None:
            raise ConfigError(f"{section}.stop: {s!r} holds the special token {held!r} (id {special[held]}), and "
                             "responses are decoded without special tokens, so it would never match; put its id in "
                             f"{section}.stop_token_ids (e.g. {section}.stop_token_ids=[{special[held]}]) and remove "
                             f"it from {section}.stop")


def lean_reason(model: Any, tokenizer: Any, cfg: SamplingConfig) -> str | None:
    """Why `generate_responses` would sample this model with `model.generate` rather than the lean loop (None: it
    would not)."""
    return lean_unsupported(model, _generation_kwargs(cfg, tokenizer, [])["generation_config"])


def model_generation_options(model: Any, tokenizer: Any, cfg: SamplingConfig) -> list[tuple[str, Any]]:
    """(option, value) that transformers generation of `model` with `cfg` applies beyond `cfg`'s own settings: the
    model's generation_config fields `cfg` leaves unset (min_new_tokens, no_repeat_ngram_size, min_p, ...;
    `decode.generation_options`), without the stop strings `cfg.stop` asks for."""
    return [(k, v) for k, v in generation_options(model, _generation_kwargs(cfg, tokenizer, [])["generation_config"])
            if k != "stop_strings"]


# generation_config fields that change how model.generate runs (cache, compilation), not what it draws
HOW_IT_RUNS = frozenset({"cache_implementation", "cache_config", "compile_config", "disable_compile", "max_cache_len",
                         "prefill_chunk_size"})
# sampling fields alignkit always sets on the call (`_generation_kwargs`), so a generation_config's values are unused
OVERRIDDEN = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
_noted: set[tuple[str, str]] = set()  # warnings given once: `note_generation_config`, batch-dependent samples


def transformers_model(model: Any) -> Any:
    """The transformers model behind `model` (DDP, ReFT, peft wrappers: `unwrap_lm`), whose generation config and
    folder name are read; anything that is not a module (None, a stand-in) as it is."""
    return unwrap_lm(model) if isinstance(model, torch.nn.Module) else model


def generation_config_source(model: Any) -> str:
    """Where `model`'s generation config came from, for messages: `<folder>/generation_config.json` (the folder it was
    loaded from), else "the model's generation_config"."""
    path = getattr(transformers_model(model), "name_or_path", "") or ""
    return f"{path}/generation_config.json" if path else "the model's generation_config"


def overridden_options(model: Any, tokenizer: Any, cfg: SamplingConfig) -> list[tuple[str, Any]]:
    """(field, value) of the model's generation config that `generate_responses` with `cfg` does not use because
    alignkit's own setting is passed on the call (`OVERRIDDEN`; sampling fields only while `cfg` samples: greedy
    reads none of them)."""
    gen = getattr(transformers_model(model), "generation_config", None)
    ours = _generation_kwargs(cfg, tokenizer, [])["generation_config"]
    out = []
    for k in OVERRIDDEN:
        theirs, used = getattr(gen, k, None), getattr(ours, k, None)
        if theirs is not None and theirs != used and (k in ("do_sample", "repetition_penalty") or cfg.do_sample):
            out.append((k, theirs))
    return out


def listed(options: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options)


def note_generation_config(model: Any, tokenizer: Any, cfg: SamplingConfig, section: str = "sampling") -> None:
    """Logs once per process (per source and fields) what the model's generation config sets that `generate_responses`
    with `cfg` treats otherwise than `model.generate(**its defaults)` would: sampling fields alignkit's `section`
    settings replace, and options beyond them that model.generate applies (`model_generation_options`)."""
    src = generation_config_source(model)
    over, extra = overridden_options(model, tokenizer, cfg), model_generation_options(model, tokenizer, cfg)
    key = (src, repr((over, extra)))
    if key in _noted or not (over or extra):
        return
    _noted.add(key)
    if over:
        logger.warning("%s sets %s, which alignkit does not use: the %s settings are passed on every call instead "
                       "(%s); set them in %s to sample that way", src, listed(over), section,
                       listed((k, getattr(_generation_kwargs(cfg, tokenizer, [])["generation_config"], k))
                              for k, _ in over), section)
    if extra:
        logger.warning("%s sets %s, which model.generate applies to every response (alignkit's decode loop does not "
                       "implement it, so these samples use model.generate); remove it from %s to sample without it",
                       src, listed(extra), src)


def check_on_policy_options(model: Any, tokenizer: Any, cfg: SamplingConfig, backend: str = "transformers") -> None:
    """ConfigError for options of the model's generation config that would make an online run's samples come from
    another distribution than the policy whose log-probs the loss uses (`model_generation_options`, less
    `HOW_IT_RUNS`): model.generate applies them (no_repeat_ngram_size, min_new_tokens, suppress_tokens, min_p, ...),
    and vLLM's sampling (sampling.* only) would not, so the two backends would also differ."""
    extra = [(k, v) for k, v in model_generation_options(model, tokenizer, cfg) if k not in HOW_IT_RUNS]
    if not extra:
        return
    src = generation_config_source(model)
    how = ("transformers generation applies and vLLM's sampling (sampling.* only) would ignore, so the two backends "
           "would sample differently" if backend == "vllm" else "model.generate would apply to every sample, so the "
           "samples would come from another distribution than the policy whose log-probs the loss uses")
    raise ConfigError(f"generation_backend={backend!r}: {src} sets {listed(extra)}, which {how}; remove "
                      f"{'it' if len(extra) == 1 else 'them'} from {src} (online training samples with sampling.* "
                      "settings only)")


def finish_response(ids: list[int], tokenizer: Any, eos: Sequence[int],
                    cfg: SamplingConfig) -> tuple[list[int], str, str]:
    """Generated ids of one row -> (response ids, response text, finish reason); rules in the module docstring."""
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if cut is None else ids[:cut]

    def decode(x: list[int]) -> str:
        return tokenizer.decode(x, skip_special_tokens=True)

    text = decode(body)
    if cfg.stop:
        hits = [(text.find(s), s) for s in cfg.stop if s in text]
        if hits:
            start, stop = min(hits)
            lo, hi = 1, len(body)  # smallest k with a stop string in decode(body[:k]); monotone in k
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in decode(body[:mid]) for s in cfg.stop):
                    hi = mid
                else:
                    lo = mid + 1
            end = start + len(stop) if cfg.include_stop_str_in_output else start
            return body[:lo], text[:end], "stop"
    if cut is not None:
        return ids[:cut + 1], text, "eos"
    return list(ids), text, "length"


@torch.no_grad()
def shared_prompt_cache(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        rows: torch.Tensor, capacity: int = 0) -> Any:
    """A KV cache of each distinct prompt's tokens but its last, computed once and copied to its samples' rows.

    `input_ids`, `attention_mask` (U, T): the distinct prompts, left-padded; `rows` (B,): the prompt of each
    generated row. `generate` then runs only the last prompt token and the new ones (prefix caching), so K
    samples of a prompt cost one prefill instead of K. Position ids as `generate` counts them (from each row's
    first attended token). `capacity`: positions to allocate per row (`decode.preallocated_cache`)."""
    cache = preallocated_cache(model, capacity)
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # (U, T)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=pos[:, :-1],
          use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    cache.batch_select_indices(rows)
    return cache


def _check_call(model: Any, tokenizer: Any, batch_size: int, positions: str | Positions | None,
                share_weights: bool, intervene_on_generated: bool) -> None:
    """`generate_responses`' arguments that make no call possible, or that it would not apply: one line each."""
    given = (("positions", positions, None), ("share_weights", share_weights, True),
             ("intervene_on_generated", intervene_on_generated, False))
    placing = [f"{k}={v!r}" for k, v, default in given if v != default]
    if placing and not isinstance(model, ReftModel):
        raise ValueError(f"generate_responses: {', '.join(placing)} place ReFT interventions, and this "
                         f"{type(model).__name__} is not a ReftModel, so they would be ignored; remove them (or pass "
                         "the ReftModel)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
    if (isinstance(model, ReftModel) and positions is None
            and not any(c.positions for c in model.adapter_configs.values())):
        raise ValueError("this ReftModel has no saved position spec: pass the one it was trained with, "
                         "e.g. positions='l1' or 'f3+l3' (see alignkit.interventions.positions)")


def _sampling_path(model: Any, tokenizer: Any, cfg: SamplingConfig, gen_kwargs: dict[str, Any],
                   lean: bool | None) -> str | None:
    """Why the call samples with `model.generate` (None: with `decode.lean_generate`), after checking that `lean`
    and `cfg.sampler` / `cfg.stop` can be honoured (see `generate_responses`)."""
    why_not = lean_unsupported(model, gen_kwargs["generation_config"]) if lean is not False else "lean=False"
    if lean and why_not:
        raise ValueError(f"generate_responses(lean=True): the lean loop does not support this call: {why_not}")
    if why_not and lean is None:
        logger.debug("sampling with model.generate: %s", why_not)
    check_sampler(cfg, why_not)
    check_stop_strings(tokenizer, cfg)
    return why_not


def _generate_batch(model: Any, tokenizer: Any, encoded: list[list[int]], groups: list[int], cfg: SamplingConfig,
                    gen_kwargs: dict[str, Any], why_not: str | None, reft: dict[str, Any] | None,
                    generators: list | None = None) -> list[list[int]]:
    """The new token ids of one batch: row r samples prompt `encoded[groups[r]]`, left-padded with the others. Rows
    of one prompt share its prefill (`shared_prompt_cache`; not a ReftModel's). `why_not` None: the lean loop, in
    `inference_context` (`generators`: one per row, `row_generators`); else `model.generate`. `reft`: a ReftModel's
    intervention arguments (None: not one)."""
    device = model_device(model)
    ids = [encoded[g] for g in groups]
    input_ids = pad(ids, tokenizer.pad_token_id, side="left").to(device)  # (B, T)
    attention_mask = pad([[1] * len(x) for x in ids], 0, side="left").to(device)  # (B, T)
    extra: dict[str, Any] = {}
    if reft is not None:  # without `positions`, the adapters' saved specs place the edits (ReftModel.generate)
        if reft["positions"] is not None:
            extra["intervention_locations"] = locations_from_mask(
                reft["positions"], attention_mask, model.num_interventions, reft["share_weights"])  # (B, I, P)
        extra["intervene_on_generated"] = reft["intervene_on_generated"]
    uniq = list(dict.fromkeys(groups))
    # the lean path runs in inference mode in one process (less dispatch work per op; its tensors never
    # meet autograd; not with FSDP2 / ZeRO-3, which update gathered parameters in place)
    with inference_context(model) if why_not is None else contextlib.nullcontext():
        if reft is None and len(uniq) < len(groups) and input_ids.shape[1] > 1:  # samples share prompts
            u_ids = pad([encoded[g] for g in uniq], tokenizer.pad_token_id, side="left").to(device)
            u_mask = pad([[1] * len(encoded[g]) for g in uniq], 0, side="left").to(device)  # (U, T)
            of_row = torch.tensor([uniq.index(g) for g in groups], device=device)  # (B,) row -> its prompt
            extra[cache_keyword(model)] = shared_prompt_cache(model, u_ids, u_mask, of_row,
                                                              input_ids.shape[1] + cfg.max_new_tokens)
        if why_not is None:
            out = lean_generate(model, input_ids, attention_mask, gen_kwargs["generation_config"],
                                cache=extra.get(cache_keyword(model)), sampler=cfg.sampler or "inverse_cdf",
                                generators=generators)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **gen_kwargs,
                                 logits_processor=LogitsProcessorList([NonFiniteWatch(cfg.do_sample)]))
        return out[:, input_ids.shape[1]:].tolist()  # (B, <= max_new_tokens)


@torch.no_grad()
def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: SamplingConfig | None = None, *,
                       batch_size: int = 8, positions: str | Positions | None = None, share_weights: bool = True,
                       intervene_on_generated: bool = False, formatter: str = "auto",
                       max_prompt_length: int | None = None, lean: bool | None = None,
                       progress: bool = False, row_seed: int | None = None, first_prompt: int = 0) -> list[Sample]:
    """Sample `cfg.num_samples` responses per prompt from `model` (see the module docstring).

    `batch_size` counts generated rows (prompt x sample) per `generate` call. `positions` overrides a
    `ReftModel`'s saved position spec (the one it was trained with); `share_weights` its layout (both, and
    `intervene_on_generated`, are refused for a model that is not a ReftModel: nothing would apply them). `lean`: sample
    with `decode.lean_generate` (`generate`'s loop with less work per step) where the call's options allow it
    (None: whenever they do; False: always `model.generate`; True: raise where they do not). There it draws with
    `cfg.sampler` (None: the inverse-CDF sampler, same distribution, other draws than `generate`; "multinomial":
    `generate`'s own draws under the same seed). `progress`: a progress bar over the batches (`alignkit sample`).
    `row_seed`: sample j of prompt i draws from its own generator seeded from (row_seed, first_prompt + i, j)
    (`row_generators`), so its tokens do not depend on `batch_size` or the other rows (`alignkit generate` /
    `sample`; the decode loop only: a call that samples with model.generate draws for the whole batch, a warning).
    """
    cfg = cfg if cfg is not None else SamplingConfig()
    _check_call(model, tokenizer, batch_size, positions, share_weights, intervene_on_generated)
    records = as_prompt_records(prompts)
    encoded = encode_prompts(records, tokenizer, formatter, max_prompt_length)
    check_context(getattr(unwrap_lm(model), "config", None), max(map(len, encoded), default=0) + cfg.max_new_tokens,
                  "generation (longest prompt + max_new_tokens)", "lower max_new_tokens / the prompt length")
    eos = end_token_ids(model, tokenizer, cfg, chat=uses_chat_template(records, formatter))
    gen_kwargs = _generation_kwargs(cfg, tokenizer, eos)
    if sharded_over_processes(model):  # every forward is a collective: no rank may stop decoding before the others
        gen_kwargs["synced_gpus"] = True
    why_not = _sampling_path(model, tokenizer, cfg, gen_kwargs, lean)
    reft = (dict(positions=positions, share_weights=share_weights, intervene_on_generated=intervene_on_generated)
            if isinstance(model, ReftModel) else None)
    rows = [(g, k) for g in range(len(records)) for k in range(cfg.num_samples)]
    device = model_device(model)
    per_row = row_seed is not None and cfg.do_sample
    if per_row and why_not is not None and ("batch", why_not) not in _noted:
        _noted.add(("batch", why_not))
        logger.warning("these samples depend on the batch size: they are drawn with model.generate (%s), which draws "
                       "for the whole batch from one generator; the same batch size and seed give the same samples",
                       why_not)
    samples: list[Sample] = []
    was_training = model.training
    model.eval()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=cfg.seed is not None)
    try:
        with rng:
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            for s in tqdm(range(0, len(rows), batch_size), desc="sampling", unit="batch", disable=not progress):
                chunk = rows[s:s + batch_size]
                gens = row_generators(row_seed, first_prompt, chunk, device) if per_row and why_not is None else None
                new = _generate_batch(model, tokenizer, encoded, [g for g, _ in chunk], cfg, gen_kwargs, why_not, reft,
                                      gens)
                for (g, k), row in zip(chunk, new):
                    resp_ids, text, reason = finish_response(row, tokenizer, eos, cfg)
                    r = records[g]
                    samples.append(Sample(r.prompt, text, list(encoded[g]), resp_ids, reason, group=g, index=k,
                                          prompt_id=r.id, weight=r.weight, meta=dict(r.meta)))
    finally:
        model.train(was_training)
    reasons = {k: sum(x.finish_reason == k for x in samples) for k in FINISH_REASONS}
    logger.info("generated %d response(s) for %d prompt(s); finish reasons %s", len(samples), len(records), reasons)
    return samples


def row_generators(seed: int, first_prompt: int, rows: Sequence[tuple[int, int]],
                   device: torch.device) -> list[torch.Generator]:
    """One `torch.Generator` per (prompt, sample) row, seeded from (seed, first_prompt + prompt, sample) (SHA-256,
    63 bits): a row's draws are the same whatever batch it is in."""
    out = []
    for g, k in rows:
        key = hashlib.sha256(f"{int(seed)}/{first_prompt + g}/{k}".encode()).digest()
        out.append(torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1))
    return out


def generation_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Mean response length (tokens) and the fraction of each finish reason."""
    n = max(len(samples), 1)
    out = {"generation/response_length": sum(len(s.response_ids) for s in samples) / n}
    for k in FINISH_REASONS:
        out[f"generation/finish_{k}"] = sum(s.finish_reason == k for s in samples) / n
    return out


__all__ = ["SamplingConfig", "Sample", "FINISH_REASONS", "generate_responses", "as_prompt_records", "encode_prompt",
           "encode_prompts", "prompts_fingerprint", "finish_response", "end_token_ids", "check_sampler",
           "check_stop_strings", "special_token_in", "special_tokens", "lean_reason", "model_generation_options",
           "check_on_policy_options", "generation_config_source", "note_generation_config", "overridden_options",
           "uses_chat_template", "model_device", "generation_metrics", "row_generators",
           "transformers_model"]
