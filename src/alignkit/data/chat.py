"""Chat formatting: prompt (+ completion) -> the text the model reads, through a formatter registry.

A formatter returns `Formatted(prompt, full, add_special_tokens, ends_turn)`: `prompt` is the text up to
where the completion starts (for chat formats: including the generation prompt that opens the
assistant turn), `full` is prompt + completion (None for prompt-only records), `add_special_tokens` is
what to pass to the tokenizer (False when the format already writes BOS or its own markers), and
`ends_turn` says whether the format already ends the completion with an end-of-turn marker (the
tokenizer then does not append EOS by default; see `tokenize.TokenizeConfig.add_eos`).

| name            | for                                   | text                                                       |
|-----------------|---------------------------------------|------------------------------------------------------------|
| "chat-template" | conversations (text: one user turn)   | `tokenizer.apply_chat_template` (or `fast_chat_rendering`) |
| "oasst"         | both                                  | `<|prompter|>q<eos><|assistant|>a<eos>` (Open-Assistant)  |
| "plain"         | plain-text records                    | prompt + completion, verbatim                              |
| "auto"          | -                                     | "chat-template" for conversations, "plain" for text        |

(`fast_chat_rendering`: the chat template's same text, rendered directly.)

A plain-text prompt or completion holding what the chat template writes to open a turn (`<|im_start|>user`: text
formatted already) is a DataError under "chat-template" (`check_not_templated`): it would be templated twice; "plain"
takes such text as it is, except a leading BOS token when the tokenizer adds its own (`check_no_second_bos`: two BOS).
A message of a conversation is the user's text, which the template renders: a marker in it is quoted (a user asking
about chat templates), not refused; the tokenizer reads a special token written there as the token itself, which
`tokenize` warns of, naming the record (`quoted_special_tokens`). A tokenizer loaded with `split_special_tokens=True`
is refused under "chat-template" (`check_split_special_tokens`): it splits the template's own markers too; and
under "oasst" (its `<|prompter|>` / `<|assistant|>` and EOS).

The string `prompt` need not be a string prefix of `full`; the tokenizer checks the boundary in token
space (the prompt's token ids must be a prefix of the full sequence's).

A trained model folder records the formats its prompts had (`alignkit_prompt_format.json`: resolved formatter -> record
count, written by training: `alignkit.runs.write_prompt_formats`). Generation, evaluation, sampling, online training and
serving compare the format they are about to use with it and warn when the model never saw that format
(`check_prompt_formats`): a model trained on "plain" HH text and then asked through a chat template answers quietly
worse, which is the commonest way a good model looks broken.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from alignkit.data.records import Completion, DataError, Message, Prompt

logger = logging.getLogger(__name__)
PROMPT_FORMAT_FILE = "alignkit_prompt_format.json"


@dataclass(frozen=True)
class Formatted:
    prompt: str
    full: str | None
    add_special_tokens: bool
    ends_turn: bool


Formatter = Callable[[Prompt, "Completion | None", Any], Formatted]
FORMATTERS: dict[str, Formatter] = {}


def register_formatter(name: str) -> Callable[[Formatter], Formatter]:
    def deco(fn: Formatter) -> Formatter:
        FORMATTERS[name] = fn
        return fn
    return deco


def as_messages(prompt: Prompt, completion: Completion | None) -> tuple[list[Message], list[Message]]:
    """Prompt and completion as message lists (plain text -> one user / one assistant message)."""
    p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if completion is None:
        return p, []
    c = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return p, c


@register_formatter("chat-template")
def chat_template(prompt: Prompt, completion: Completion | None, tokenizer: Any) -> Formatted:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"formatter 'chat-template': {type(tokenizer).__name__} has no chat_template; set "
                        f"tokenizer.chat_template, or use formatter='oasst' or plain-text records")
    check_generation_prompt(tokenizer)
    p, c = as_messages(prompt, completion)
    # text given as a string (one turn made of it) may be formatted already; a message of a conversation is the
    # user's text, which we template: a marker in it is quoted (`quoted_special_tokens` warns of the ids)
    check_not_templated((p if isinstance(prompt, str) else []) + (c if isinstance(completion, str) else []), tokenizer)
    check_split_special_tokens(tokenizer)
    renderer = _RENDERER.get()
    render = renderer.render if renderer is not None and renderer.serves(tokenizer, p + c) else _apply_chat_template
    try:
        prompt_text = render(tokenizer, p, True)
        full = render(tokenizer, p + c, False) if c else None
    except Exception as e:  # the template's own refusal (raise_exception): a DataError the caller names the record in
        if not any(c.__name__ == "TemplateError" and c.__module__.startswith("jinja2") for c in type(e).__mro__):
            raise  # jinja2's TemplateError and its kinds (jinja2 comes with transformers, not imported here)
        raise DataError(f"formatter 'chat-template': the chat template of {tokenizer_name(tokenizer)} refuses this "
                        f"conversation ({e}); change the record's messages to what the template takes (e.g. roles "
                        f"alternating user/assistant, a system message folded into the first user message), or "
                        f"use data.formatter=oasst") from None
    return Formatted(prompt_text, full, add_special_tokens=False, ends_turn=True)


_MARKERS: dict[tuple[int, int, str], tuple[str, ...]] = {}


def template_markers(tokenizer: Any) -> tuple[str, ...]:
    """What the chat template writes to open a user turn and an assistant turn (the generation prompt), as text
    (`<|im_start|>user`, `<|im_start|>assistant`, `<|start_header_id|>assistant<|end_header_id|>`), those of the two
    that hold one of the tokenizer's special tokens (a BOS before the user turn left out): text no one types by chance.
    () when the template cannot render the probe. Kept per tokenizer and template."""
    key = (id(tokenizer), len(tokenizer), tokenizer.chat_template)
    if key not in _MARKERS:
        specials = [t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str) and len(t) > 1]
        user = [{"role": "user", "content": _CONTENT_PROBE}]
        try:
            with_prompt, without = (_apply_chat_template(tokenizer, user, gen) for gen in (True, False))
        except Exception as e:  # noqa: BLE001 - a template that cannot render the probe: the records will say more
            logger.debug("chat template could not render the marker probe (%s)", e)
            with_prompt = without = ""
        opener = without[:max(without.find(_CONTENT_PROBE), 0)]
        bos = getattr(tokenizer, "bos_token", None)
        opener = opener.replace(bos, "") if isinstance(bos, str) and bos else opener
        header = with_prompt[len(without):] if with_prompt.startswith(without) else ""
        _MARKERS[key] = tuple(m for m in dict.fromkeys((opener.strip(), header.strip()))
                              if m and any(t in m for t in specials))
    return _MARKERS[key]


def check_not_templated(messages: list[Message], tokenizer: Any) -> None:
    """A message made of text given as a string (a plain-text prompt or completion: the chat-template formatter
    passes only those; a conversation's messages are the user's text, a marker there quoted) whose text holds what
    the chat template writes to open a turn (`template_markers`) is text that was formatted already (a prompt
    column exported after apply_chat_template, or a whole chat written as one string): rendered through the template
    it is templated twice, the model trained on a conversation inside one turn. A DataError naming the message, the
    token and the fix (the caller names the record)."""
    markers = template_markers(tokenizer)
    for i, m in enumerate(messages):
        found = next((t for t in markers if t in m["content"]), None)
        if found is not None:
            raise DataError(f"formatter 'chat-template': message {i} (a {m['role']!r} turn) holds {found!r}, which "
                            f"the chat template of {tokenizer_name(tokenizer)} writes to open a turn, so the text "
                            f"looks formatted already and would be templated twice (a conversation trained inside one "
                            f"turn); give the raw conversation (each message's text alone), or set data.formatter="
                            f"plain to use pre-formatted text as it is")


def check_split_special_tokens(tokenizer: Any) -> None:
    """A tokenizer loaded with `split_special_tokens=True` encodes every special token written in a text as ordinary
    pieces, the chat template's own turn markers included (`<|im_start|>` never becomes its token): each record would
    be trained on a chat format the model never reads. A DataError naming the setting and the fix, for a template
    that writes special tokens (`template_markers`)."""
    if getattr(tokenizer, "split_special_tokens", False) and template_markers(tokenizer):
        raise DataError(f"formatter 'chat-template': {tokenizer_name(tokenizer)} was loaded with "
                        f"split_special_tokens=True, which encodes the chat template's own "
                        f"{template_markers(tokenizer)[0]!r} as ordinary text pieces, not its special tokens; load it "
                        f"without split_special_tokens (a special token quoted inside a message is then read as the "
                        f"token: a warning names the record)")


_SPECIALS: dict[tuple[int, int], tuple[str, ...]] = {}


def quoted_special_tokens(messages: Iterable[Message], tokenizer: Any) -> list[str]:
    """The special tokens (`all_special_tokens`, e.g. `<|im_end|>`, `<|im_start|>`) written inside the content of
    `messages`, which a chat template renders as they are: the tokenizer then reads each as the token itself (a turn
    marker inside a turn), not as the text the user quoted (transformers' `apply_chat_template(...,
    sanitize_control_tokens=True)` can encode them as text; alignkit's formatters render text, then tokenize it).
    [] under `split_special_tokens` (refused with a template that writes special tokens: `check_split_special_tokens`).
    The tokens are kept per tokenizer (its size)."""
    if getattr(tokenizer, "split_special_tokens", False):
        return []
    key = (id(tokenizer), len(tokenizer))
    if key not in _SPECIALS:
        _SPECIALS[key] = tuple(t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str) and t)
    specials = _SPECIALS[key]
    return sorted({t for m in messages for t in specials if t in m["content"]})


SYSTEM_ROLES = ("system", "developer")


# roles a chat template may leave out without refusing (one that renders only user and assistant turns, e.g. with
# `if role == 'user' ... elif role == 'assistant'`): what such a message says never reaches the model
CONTEXT_ROLES = (*SYSTEM_ROLES, "tool")


def unrendered_roles(prompt: Prompt, text: str) -> list[str]:
    """The roles of `CONTEXT_ROLES` (system, developer, tool) of the conversation `prompt` with a non-blank message
    whose text is not in `text`, its rendering, as written or JSON-escaped (Llama 3.1's template renders a tool's
    result with `tojson`): the chat template dropped it, and the model never reads it."""
    if not isinstance(prompt, list):
        return []
    return sorted({m["role"] for m in prompt if m["role"] in CONTEXT_ROLES and (t := m["content"].strip())
                   and t not in text and json.dumps(t, ensure_ascii=False)[1:-1] not in text})


def empty_context_roles(*conversations: Any) -> list[str]:
    """The roles of `CONTEXT_ROLES` (system, developer, tool) with an empty (blank) message in `conversations`
    (message lists; text and None are skipped): kept and rendered as they are (`records.EMPTY_REFUSED` refuses only
    empty user / assistant turns), and counted (`TokenizeStats.note_empty_context`) so that a dataset whose system
    prompts were all blanked is seen."""
    return sorted({m["role"] for c in conversations if isinstance(c, list) for m in c
                   if m["role"] in CONTEXT_ROLES and not m["content"].strip()})


def tokenizer_name(tokenizer: Any) -> str:
    """The tokenizer's folder or hub name (its class name when it has none), for messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _apply_chat_template(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_PROBES = ([{"role": "user", "content": "Hi there"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
           [{"role": "user", "content": "q"}, {"role": "assistant", "content": " a <b>&amp;\n"}])


class _Renderer:
    """One tokenizer's chat template compiled once and rendered directly, for many records.

    `tokenizer.apply_chat_template(messages, tokenize=False)` spends most of its time around the render (template
    lookup, copying and normalising every message, the compile cache); for our records (plain {"role": str,
    "content": str} dicts) all of that is the identity, and what remains is transformers' compiled template
    (`chat_template_utils._compile_jinja_template`: its sandboxed environment with `raise_exception`, `tojson`,
    `namespace`, ...) rendered with `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the
    tokenizer's special tokens, as `render_jinja_template` does. This depends on transformers internals, so it is
    only used when proven equal: the renderer is built only if it renders probe conversations exactly as
    `apply_chat_template` does (tests/compat/test_chat_render.py pins a table of templates), and only for a
    single-string template, a non-empty conversation of plain messages; anything else goes to
    `apply_chat_template`. Built per `fast_chat_rendering` block, during which the tokenizer must not change."""

    def __init__(self, tokenizer: Any, template: str, compiled: Any):
        self.tokenizer, self.template, self.compiled = tokenizer, template, compiled
        self.specials = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                         for k, v in tokenizer.special_tokens_map.items()}

    @classmethod
    def build(cls, tokenizer: Any) -> "_Renderer | None":
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str):
            return None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            renderer = cls(tokenizer, template, _compile_jinja_template(template))
            for conv in _PROBES:
                for gen in (True, False):
                    if renderer.render(tokenizer, conv, gen) != _apply_chat_template(tokenizer, conv, gen):
                        logger.debug("compiled chat template renders differently from apply_chat_template")
                        return None
        except Exception as e:  # noqa: BLE001 - transformers moved, or the template rejects a probe: no fast path
            logger.debug("chat template not rendered directly (%s): using apply_chat_template", e)
            return None
        return renderer

    def serves(self, tokenizer: Any, messages: list[Message]) -> bool:
        return (tokenizer is self.tokenizer and tokenizer.chat_template is self.template and bool(messages)
                and all(type(m) is dict and len(m) == 2 and type(m.get("role")) is str
                        and type(m.get("content")) is str for m in messages))

    def render(self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
        return self.compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.specials)


_RENDERER: ContextVar[_Renderer | None] = ContextVar("alignkit_chat_renderer", default=None)


@contextmanager
def fast_chat_rendering(tokenizer: Any) -> Iterator[None]:
    """Within this block the "chat-template" formatter renders `tokenizer`'s template directly (`_Renderer`), with
    exactly `apply_chat_template`'s text; the tokenizer (its template, special tokens) must not change inside."""
    token = _RENDERER.set(_Renderer.build(tokenizer) if getattr(tokenizer, "chat_template", None) else None)
    try:
        yield
    finally:
        _RENDERER.reset(token)


_HEADER_PROBE = "alignkitAssistantProbe"
_CHECKED_TEMPLATES: set[str] = set()


def check_generation_prompt(tokenizer: Any) -> None:
    """A chat template that writes an assistant header before each assistant turn (`<|im_start|>assistant\n`) but
    renders nothing for `add_generation_prompt=True` puts that header inside every completion: training learns it
    as part of the answer and prompts for generation lack it, silently. DataError naming the header; checked once
    per template string. Templates without a header (`[INST] q [/INST] a`) pass."""
    template = tokenizer.chat_template
    if template in _CHECKED_TEMPLATES:
        return
    check_string_content(tokenizer)
    user = [{"role": "user", "content": "hi"}]
    try:
        with_prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _HEADER_PROBE}], tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that cannot render the probe: the records will say more
        logger.debug("chat template could not render the generation-prompt probe (%s)", e)
        return
    at = full.find(_HEADER_PROBE)
    if with_prompt == without and at >= 0 and full.startswith(with_prompt) and full[len(with_prompt):at].strip():
        raise DataError(f"formatter 'chat-template': the chat template of the tokenizer {tokenizer_name(tokenizer)} "
                        f"writes {full[len(with_prompt):at]!r} before an assistant turn but nothing for "
                        f"add_generation_prompt=True, so that header would be trained as part of every completion "
                        f"and be missing from generation prompts; add {{% if add_generation_prompt %}}"
                        f"{full[len(with_prompt):at]!r}{{% endif %}} at the end of the template (chat_template.jinja "
                        f"/ tokenizer_config.json of the model), or use data.formatter=plain or oasst")
    _CHECKED_TEMPLATES.add(template)


_CONTENT_PROBE = "alignkitContentProbe"


def check_string_content(tokenizer: Any) -> None:
    """Records hold each message's content as a string (text parts are joined: `records.content_text`). A template
    written for content as a list of parts (`{% for part in message['content'] %}{{ part['text'] }}`) renders a
    string's characters as parts with no text: every message would be trained and generated EMPTY, without an
    error. DataError naming the template when a probe's string content is missing from the rendering but the same
    text given as a text part is there. Called by `check_generation_prompt` (once per template)."""
    def rendered(content: Any) -> bool:
        conv = [{"role": "user", "content": content}]
        return _CONTENT_PROBE in tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    try:
        if rendered(_CONTENT_PROBE) or not rendered([{"type": "text", "text": _CONTENT_PROBE}]):
            return
    except Exception as e:  # noqa: BLE001 - a template that cannot render a probe: the records will say more
        logger.debug("chat template could not render the content probe (%s)", e)
        return
    raise DataError(f"formatter 'chat-template': the chat template of the tokenizer {tokenizer_name(tokenizer)} "
                    f"renders a message's content only as a list of parts ([{{'type': 'text', 'text': ...}}]), and "
                    f"alignkit gives it strings, so every message would be rendered empty; make the template take "
                    f"string content too ({{% if message['content'] is string %}}{{{{ message['content'] }}}}"
                    f"{{% else %}}...{{% endif %}}), or use data.formatter=plain or oasst")


OASST_ROLES = {"user": "<|prompter|>", "assistant": "<|assistant|>", "system": "<|system|>"}


@register_formatter("oasst")
def oasst(prompt: Prompt, completion: Completion | None, tokenizer: Any) -> Formatted:
    vocab = tokenizer.get_vocab()
    missing = [t for t in OASST_ROLES.values() if t not in vocab]
    if missing or tokenizer.eos_token is None:
        raise DataError(f"formatter 'oasst': the tokenizer lacks {missing or 'an eos token'}; add them with "
                        f"tokenizer.add_special_tokens(...) and resize the model's embeddings")
    if getattr(tokenizer, "split_special_tokens", False):  # as `check_split_special_tokens` under chat-template
        raise DataError(f"formatter 'oasst': {tokenizer_name(tokenizer)} was loaded with split_special_tokens=True, "
                        f"which encodes the format's own {OASST_ROLES['user']!r} / {OASST_ROLES['assistant']!r} and "
                        f"{tokenizer.eos_token!r} as ordinary text pieces, not their tokens; load it without "
                        f"split_special_tokens")
    p, c = as_messages(prompt, completion)

    def turn(m: Message) -> str:
        if m["role"] not in OASST_ROLES:
            raise DataError(f"formatter 'oasst': unknown role {m['role']!r}; valid: {', '.join(OASST_ROLES)}")
        return OASST_ROLES[m["role"]] + m["content"] + tokenizer.eos_token

    head = "".join(turn(m) for m in p)
    prompt_text = head + OASST_ROLES["assistant"]
    full = head + "".join(turn(m) for m in c) if c else None
    return Formatted(prompt_text, full, add_special_tokens=False, ends_turn=True)


@register_formatter("plain")
def plain(prompt: Prompt, completion: Completion | None, tokenizer: Any) -> Formatted:
    if not isinstance(prompt, str) or not (completion is None or isinstance(completion, str)):
        raise DataError("formatter 'plain' takes plain-text records; use 'chat-template' or 'oasst' for conversations")
    check_no_second_bos(prompt, tokenizer)
    return Formatted(prompt, None if completion is None else prompt + completion, add_special_tokens=True,
                     ends_turn=False)


def check_no_second_bos(text: str, tokenizer: Any) -> None:
    """Plain text is tokenized with the tokenizer's special tokens: a text that starts with the BOS token itself (data
    written for a tokenizer that adds none, or exported with it) was read with two BOS tokens, without a word. A
    DataError naming the token and the fix (the caller names the record)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not isinstance(bos, str) or not bos or not text.startswith(bos) or not reads_two_bos(tokenizer):
        return
    raise DataError(f"formatter 'plain': the prompt starts with {bos!r}, the BOS token, and "
                    f"{tokenizer_name(tokenizer)} adds its own BOS to plain text, so the model would read two; "
                    f"remove the leading {bos!r} from the data")


_TWO_BOS: "weakref.WeakKeyDictionary[Any, dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def reads_two_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` reads a text that starts with its BOS token as two BOS tokens: it adds its own BOS in front
    and reads the text's as the token (not when it adds none, e.g. GPT-NeoX, whose BOS is its EOS and which appends it;
    not under `split_special_tokens`, which reads the text's as words). Cached per tokenizer (and its BOS and split
    setting)."""
    key = (tokenizer.bos_token, tokenizer.bos_token_id, getattr(tokenizer, "split_special_tokens", False))
    try:
        seen = _TWO_BOS.setdefault(tokenizer, {})
    except TypeError:  # not weakly referable: probed each time
        seen = {}
    if key not in seen:
        ids = tokenizer(tokenizer.bos_token + "x", add_special_tokens=True)["input_ids"]
        seen[key] = list(ids[:2]) == [tokenizer.bos_token_id] * 2
    return seen[key]


_SUFFIX: "weakref.WeakKeyDictionary[Any, dict[tuple, tuple[int, ...]]]" = weakref.WeakKeyDictionary()
_SUFFIX_PROBES = ("a", "alignkit suffix probe")


def added_suffix(tokenizer: Any) -> tuple[int, ...]:
    """The token ids `tokenizer` appends after every text it encodes with `add_special_tokens=True` (its
    post-processor: GPT-NeoX / Pythia-style `$A <|endoftext|>`, a Llama tokenizer saved with `add_eos_token`); ()
    when it appends none, or when the probe cannot tell (the probe text's ids do not occur once, unchanged, inside its
    encoding with special tokens, or two probes disagree). Probed once per tokenizer, its specials and post-processor
    (a changed `add_eos_token` or post-processor is probed again)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:  # a fast tokenizer's appended ids are its backend post-processor's (ids included in its state): cheap key
        key: tuple = ("backend", backend.post_processor.__getstate__() if backend.post_processor is not None else None)
    except Exception:  # noqa: BLE001 - no backend, or a processor not serialisable: the specials key the probe
        key = (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))
    key += (getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
    try:  # get first: setdefault makes a new weak reference on every call
        seen = _SUFFIX.get(tokenizer)
        if seen is None:
            seen = _SUFFIX.setdefault(tokenizer, {})
    except TypeError:  # not weakly referable: probed each time
        seen = {}
    if key not in seen:
        found = set()
        for text in _SUFFIX_PROBES:
            bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            at = [k for k in range(len(full) - len(bare) + 1) if bare and full[k:k + len(bare)] == bare]
            found.add(tuple(full[at[0] + len(bare):]) if len(at) == 1 else None)
        suffix = found.pop() if len(found) == 1 else None
        seen[key] = suffix or ()
        if suffix:
            eos = getattr(tokenizer, "eos_token_id", None)
            tokens = tokenizer.convert_ids_to_tokens(list(suffix))
            if suffix == (eos,):
                logger.info("%s appends its EOS %s to every text it encodes; alignkit leaves it out of plain-text "
                            "prompts and ends completions with EOS by data.add_eos", tokenizer_name(tokenizer), tokens)
            else:
                logger.info("%s appends %s to every text it encodes (not its EOS alone); alignkit keeps them where "
                            "the tokenizer puts them", tokenizer_name(tokenizer), tokens)
    return seen[key]


def appended_eos(tokenizer: Any, suffix: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """`(eos_token_id,)` when what `tokenizer` appends to every text (`added_suffix`) is its EOS alone: the one suffix
    alignkit leaves out, since `add_eos` adds it back where a completion ends; () otherwise (nothing appended, or other
    tokens, e.g. a BERT-style classifier's `[CLS] $A [SEP]`, whose [SEP] stays where the tokenizer puts it: the
    reward model was trained reading it, and `add_eos` could not add it back)."""
    suffix = added_suffix(tokenizer) if suffix is None else suffix  # (`suffix`: the caller's added_suffix; eos_token_id
    #   is read only for a one-token suffix: ~3.5 us a read)
    return suffix if len(suffix) == 1 and suffix == (getattr(tokenizer, "eos_token_id", None),) else ()


def without_added_suffix(ids: list[int], tokenizer: Any, suffix: tuple[int, ...] | None = None) -> list[int]:
    """`ids` (of one text encoded with `add_special_tokens=True`) without the EOS the tokenizer appends to every text
    (`appended_eos`, or `suffix` when the caller resolved it already): a prompt's ids a prefix of its
    prompt+completion's, a generation prompt not ending in EOS. Any other appended token is kept."""
    suffix = appended_eos(tokenizer) if suffix is None else suffix
    n = len(suffix)
    return ids[:len(ids) - n] if n and tuple(ids[len(ids) - n:]) == suffix else ids


def prompt_ids(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` as a prompt the model continues: with `add_special_tokens`, without any token the tokenizer
    appends to every text (`added_suffix`: its EOS, a BERT-style [SEP]; in training they follow the completion), as
    training's prompts (`data.tokenize`, ReFT's `encode_prompt_response`). One rule for `alignkit generate` / online
    prompts (`online.generation.encode_prompt`) and `alignkit serve`'s text prompts (`serve.parsing`)."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return without_added_suffix(ids, tokenizer, added_suffix(tokenizer)) if add_special_tokens else ids


_TURN_PROBE = "alignkitTurnEndProbe"


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The special token a tokenizer's chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, ...), read from the template itself; [] without a template, or when what follows the turn is
    not a special token. A model trained through the chat template ends its answers with this token and no EOS
    (`ends_turn`), so generation must stop on it as on EOS."""
    if getattr(tokenizer, "chat_template", None) is None:
        return []
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(conv, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that cannot render this probe: EOS alone ends generation
        logger.debug("chat template could not render the turn-end probe (%s): no turn-end token", e)
        return []
    at = text.rfind(_TURN_PROBE)
    if at < 0:
        return []
    rest = tokenizer(text[at + len(_TURN_PROBE):], add_special_tokens=False)["input_ids"]
    return [int(rest[0])] if rest and rest[0] in set(tokenizer.all_special_ids) else []


def resolved_formatter(prompt: Prompt, formatter: str = "auto") -> str:
    """The formatter `format_record` applies to `prompt` ("auto": chat-template for conversations, plain for text)."""
    if formatter == "auto":
        return "chat-template" if isinstance(prompt, list) else "plain"
    return formatter


def prompt_formats(prompts: Iterable[Prompt], formatter: str = "auto") -> dict[str, int]:
    """Resolved formatter -> how many of `prompts` it formats."""
    return dict(Counter(resolved_formatter(p, formatter) for p in prompts))


def trained_prompt_formats(folder: str | Path | None) -> dict[str, int] | None:
    """The formats a model folder was trained on; None when it records none (a base model, an older folder, a
    hub name)."""
    if folder is None or not (Path(folder) / PROMPT_FORMAT_FILE).is_file():
        return None
    try:
        formats = json.loads((Path(folder) / PROMPT_FORMAT_FILE).read_text()).get("formats")
    except (OSError, ValueError, AttributeError):
        return None
    return formats if isinstance(formats, dict) else None


def format_mismatch(trained: dict[str, int] | None, used: dict[str, int]) -> list[str]:
    """The formats in `used` that the model was not trained on (empty when it records none)."""
    return [] if not trained else sorted(f for f in used if f not in trained)


def check_prompt_formats(folder: str | Path | None, used: dict[str, int], key: str = "data.formatter") -> list[str]:
    """Warn (once per call) when prompts are about to be formatted in a way the model in `folder` never saw in
    training. Returns the unseen formats."""
    trained = trained_prompt_formats(folder)
    unseen = format_mismatch(trained, used)
    if unseen:
        n = sum(used[f] for f in unseen)
        logger.warning("%s: %d prompt(s) will be formatted as %s, but the model in %s was trained on prompts "
                       "formatted as %s (%s): it never saw this format and may answer worse; set %s=%s (or give "
                       "prompts in the form the training data had)", key, n, " / ".join(map(repr, unseen)), folder,
                       " / ".join(map(repr, sorted(trained))), PROMPT_FORMAT_FILE, key, sorted(trained)[0])
    return unseen


def format_record(prompt: Prompt, completion: Completion | None, tokenizer: Any,
                  formatter: str = "auto") -> Formatted:
    """Format with the named formatter ("auto": chat-template for conversations, plain for text)."""
    formatter = resolved_formatter(prompt, formatter)
    if formatter not in FORMATTERS:
        raise DataError(f"unknown formatter {formatter!r}; valid: auto, {', '.join(FORMATTERS)}")
    return FORMATTERS[formatter](prompt, completion, tokenizer)
