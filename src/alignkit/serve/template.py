"""A served base's chat template against the messages `alignkit serve` gives it (`parsing.chat_prompt`: every
message's text as a string, content parts joined with `PART_SEPARATOR`). Apart from parsing.py, which imports the
engine's request module (and so stack.py, which checks the base with this when it loads it)."""

from __future__ import annotations

from typing import Any

from alignkit.data.records import PART_SEPARATOR

TEMPLATE_PROBES = ("alignkit-probe-first-part", "alignkit-probe-second-part")  # check_chat_template's message text


def check_chat_template(tokenizer: Any, where: str) -> str:
    """ValueError when the chat template of `tokenizer` does not render what `chat_prompt` gives it: a user message
    whose `content` is a string (a request's content parts joined by `parsing.content_text`). A template written for
    content parts only (`{% for part in message['content'] %}{{ part['text'] }}`) rendered such a message without
    its text, silently: every chat request reached the model without what the user wrote. Checked when the server
    loads the base and by `alignkit serve --dry-run`. Returns one line saying what was checked."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return f"{where}: no chat template (/v1/chat/completions refuses requests; /v1/completions serves)"
    # a request with two text parts, as `parsing.content_text` passes it on: the parts joined into one string
    messages = [{"role": "user", "content": PART_SEPARATOR.join(TEMPLATE_PROBES)}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        if not type(e).__module__.startswith("jinja2"):
            raise
        raise ValueError(f"{where}: its chat template fails on one user message whose content is a string ({e}), "
                         "the form this server passes every message in (content parts joined with a newline); fix "
                         "the template, or send prompts to /v1/completions") from None
    missing = [p for p in TEMPLATE_PROBES if p not in text]
    if missing:
        raise ValueError(f"{where}: its chat template renders a user message without its text (it reads content as "
                         "a list of parts, while this server passes a message's text as a string, parts joined with "
                         "a newline as vLLM does for string templates), so chat requests would reach the model "
                         "without what the user wrote; make the template print message['content'] when it is a "
                         "string, or send prompts to /v1/completions")
    return f"{where}: its chat template renders a message's text given as a string or as text parts"


__all__ = ["TEMPLATE_PROBES", "check_chat_template"]
