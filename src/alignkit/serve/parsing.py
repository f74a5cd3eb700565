"""Request parsing of `alignkit serve`'s OpenAI-compatible API (`serve/api.py` is the HTTP app): a JSON body's
fields checked one by one into engine inputs (prompt token ids, `SamplingParams`), every refusal an `ApiError` (400)
naming the field; fields the engine does not implement are refused unless at their neutral value
(`IGNORED_UNLESS_NEUTRAL`, `NOT_SUPPORTED`); chat messages rendered as vLLM's OpenAI server renders them (text parts
joined with a newline, developer messages: rows V13 of docs/architecture.md)."""

from __future__ import annotations

import json
from typing import Any

from alignkit.data.chat import prompt_ids
from alignkit.data.records import PART_SEPARATOR  # what joins a message's text parts (row V13), as in training data
from alignkit.serve.request import SEED_MAX, SEED_MIN, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _num(body: dict, key: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise ApiError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}, got "
                            f"{json.dumps(v)[:40]}",
                       param=key)
    if (lo is not None and not v >= lo) or (hi is not None and not v <= hi):  # NaN too (JSON's NaN parses)
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {v}", param=key)
    return kind(v)


# Request fields of the OpenAI API (and vLLM's extensions, which OpenAI clients send through extra_body) that would
# change the answer but that this engine does not implement: accepted only at their neutral value (first None).
IGNORED_UNLESS_NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "top_logprobs": (None, 0), "response_format": (None, {"type": "text"}),
    "tools": (None, []), "functions": (None, []), "top_k": (None, -1, 0), "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0), "ignore_eos": (None, False),
    "stop_token_ids": (None, []), "include_stop_str_in_output": (None, False), "use_beam_search": (None, False),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "skip_special_tokens": (None, True),
    # tools are refused above, so "auto" / "none" choose nothing; "required" or a named function would
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "bad_words": (None, []), "allowed_token_ids": (None,), "length_penalty": (None, 1, 1.0),
    "logits_processors": (None, []), "structured_outputs": (None,), "return_tokens_as_token_ids": (None, False),
    "prompt_embeds": (None,), "modalities": (None, ["text"]), "audio": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None, "medium"), "structural_tag": (None,),
    "return_token_ids": (None, False),  # vLLM: the answer's token ids beside its text (this server sends text only)
    # the chat prompt is the tokenizer's own template with the generation prompt, as given
    "add_generation_prompt": (None, True), "continue_final_message": (None, False), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "documents": (None,),
    # vLLM 0.32's: end on repeated n-grams, cap reasoning tokens, watermark the draw, custom extensions' arguments;
    # logprobs of given ids, character offsets of tokens, the templated prompt text (this server sends none of them)
    "repetition_detection": (None,), "thinking_token_budget": (None,), "watermarking": (None, False),
    "vllm_xargs": (None, {}), "logprob_token_ids": (None,), "return_token_offsets": (None, False),
    "return_prompt_text": (None, False),
}
# stream_options besides include_usage, accepted only at these values: vLLM's continuous_usage_stats (usage in every
# chunk) and OpenAI's include_obfuscation (a random padding field in every chunk, against length side channels)
STREAM_OPTIONS_NEUTRAL: dict[str, tuple] = {"continuous_usage_stats": (None, False),
                                            "include_obfuscation": (None, False)}
# logprobs (completions: an integer, 0 included; chat: a boolean), best_of and echo: accepted only at these values
NOT_SUPPORTED: dict[str, tuple] = {"logprobs": (None, False), "best_of": (None, 1), "echo": (None, False)}


# the request fields this server reads (beside IGNORED_UNLESS_NEUTRAL, NOT_SUPPORTED), and those of OpenAI's API and
# vLLM's that change nothing in the answer (bookkeeping, caching, scheduling): any other field is ignored, as vLLM
# ignores it (its requests allow extra fields: a debug log), with a warning in the server's log naming it
# (tests/serve/test_read_fields.py: READ_FIELDS is exactly the keys parsing.py and api.py read from a body)
READ_FIELDS = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "stop", "seed", "n", "stream", "stream_options", "add_special_tokens"})
NO_EFFECT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction",
                              "safety_identifier", "prompt_cache_key", "request_id", "priority", "cache_salt",
                              "kv_transfer_params", "mm_processor_kwargs"})


def unread_fields(body: dict, chat: bool) -> list[str]:
    """The fields of a request body this server neither reads, refuses, nor knows to change nothing: a client's typo
    (`max_new_tokens` for `max_tokens`), another server's extension, or the other endpoint's input (`prompt` sent to
    /v1/chat/completions, `messages` to /v1/completions), answered without it."""
    known = (READ_FIELDS | NO_EFFECT_FIELDS | IGNORED_UNLESS_NEUTRAL.keys() | NOT_SUPPORTED.keys()
             | {"messages" if chat else "prompt"})
    return sorted(k for k in body if k not in known)


def not_unicode(body: Any) -> str | None:
    """The path (`messages[0].content`) of the first string in a parsed JSON body that UTF-8 cannot encode: JSON's
    escapes can write a lone surrogate (`"\\ud83d"`, half an emoji: a UTF-16 string cut inside a character), which
    Python's json takes and the tokenizer then refuses with a TypeError. None when every string is text. Walked
    without recursion (a deeply nested body is no reason for a RecursionError)."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            if _not_text(value):
                return where or "body"
        elif isinstance(value, dict):
            for k in reversed(list(value)):
                path = f"{where}.{k}" if where else k
                if _not_text(k):
                    return path
                todo.append((path, value[k]))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def _not_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def sampling_params(body: dict) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ApiError(400, f"'{key}' must be an integer, got {json.dumps(v)[:40]}", param=key)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:  # an explicit null max_completion_tokens beside max_tokens: max_tokens
        max_tokens = body.get("max_tokens")
    if None not in (body.get("max_tokens"), body.get("max_completion_tokens")) \
            and body["max_tokens"] != body["max_completion_tokens"]:
        raise ApiError(400, f"'max_completion_tokens' ({body['max_completion_tokens']}) and 'max_tokens' "
                            f"({body['max_tokens']}) disagree; send one of them", param="max_completion_tokens")
    for key, allowed in NOT_SUPPORTED.items():  # identity, not ==: logprobs 0 (== False) asks for logprobs
        if not any(body.get(key) is a or (a is not None and type(body.get(key)) is type(a) and body.get(key) == a)
                   for a in allowed):
            raise ApiError(400, f"'{key}' is not supported by this server; remove it", param=key)
    for key, neutral in IGNORED_UNLESS_NEUTRAL.items():
        if body.get(key) not in neutral:
            raise ApiError(400, f"'{key}' is not supported by this server (the answer would silently be sampled "
                                f"without it); remove it" + (f" or set it to {json.dumps(neutral[1])}"
                                                                    if len(neutral) > 1 else ""), param=key)
    return SamplingParams(max_tokens=max_tokens, temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
                          top_p=_top_p(body), stop=stop, seed=_num(body, "seed", None, int, SEED_MIN, SEED_MAX),
                          n=_num(body, "n", 1, int, 1, 16))


def _top_p(body: dict) -> float:
    top_p = _num(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    return top_p


def request_model(body: dict) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise ApiError(400, "'model' is required: the name of a served model (GET /v1/models)", param="model")
    return m


def _add_special_tokens(body: dict, default: bool) -> bool:
    """vLLM's `add_special_tokens` (BOS and the like around a text prompt): completions default true, chat false
    (the template writes them)."""
    v = body.get("add_special_tokens")
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'add_special_tokens' must be true or false, got {json.dumps(v)[:40]}",
                       param="add_special_tokens")
    return v


def completion_prompts(body: dict, tokenizer: Any) -> list[list[int]]:
    special = _add_special_tokens(body, True)
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    if not isinstance(p, list) or not p or len(p) > 16:
        raise ApiError(400, "'prompt' must be a string, a list of 1-16 strings, or a list of token ids", param="prompt")
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            out.append(prompt_ids(tokenizer, x, special))  # as `alignkit generate` (no appended EOS)
            if not out[-1]:
                raise ApiError(400, f"'prompt'{f'[{i}]' if len(p) > 1 else ''} is empty (no tokens): send the text "
                                    "to continue", param="prompt")
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            if any(t < 0 or t >= len(tokenizer) for t in x):
                raise ApiError(400, f"'prompt'{f'[{i}]' if len(p) > 1 else ''}: token ids must be in "
                                    f"[0, {len(tokenizer)})", param="prompt")
            out.append(list(x))
        else:
            raise ApiError(400, "'prompt' must be a string, a list of 1-16 strings, or a list of token ids",
                           param="prompt")
    return out




def content_text(content: Any, i: int) -> str:
    """The text of `messages[i].content`: a string as is, a list of text parts (`{"type": "text", "text": ...}`)
    joined with a newline as vLLM's OpenAI server joins them for a template that reads content as a string
    (`PART_SEPARATOR`), so one request renders one prompt on either engine; ApiError 400 naming the message for
    anything else (other part types: images, audio, ... are not served)."""
    if isinstance(content, list):
        if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                   for x in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
        return PART_SEPARATOR.join(x["text"] for x in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}]")
    return content


def developer_as_system(messages: list[dict], template: Any) -> list[dict]:
    """The messages as vLLM's OpenAI server gives them to a chat template (row V13 of docs/architecture.md): with a
    `developer` message and a template that does not name the role (neither 'developer' nor "developer" in its
    text), developer messages become system messages, and then every system message is merged into one at the
    front, their non-empty contents joined with a blank line, when one is not first or there are several (some
    templates take a system message first only). Otherwise as given: a template that names the role gets it."""
    text = template if isinstance(template, str) else json.dumps(template)
    if not any(m["role"] == "developer" for m in messages) or "'developer'" in text or '"developer"' in text:
        return messages
    msgs = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    system = [i for i, m in enumerate(msgs) if m["role"] == "system"]
    if system == [0]:
        return msgs
    merged = {"role": "system", "content": "\n\n".join(msgs[i]["content"] for i in system if msgs[i]["content"])}
    return [merged, *(m for m in msgs if m["role"] != "system")]


def chat_prompt(body: dict, tokenizer: Any) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: needs 'role' (system, developer, user or assistant) and 'content'",
                           param=f"messages[{i}]")
        c = content_text(m.get("content"), i)
        for key in ("tool_calls", "function_call"):  # tools are not served: the template would render these
            if m.get(key):
                raise ApiError(400, f"messages[{i}].{key}: tool calls are not supported by this server; remove them",
                               param=f"messages[{i}]")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, f"messages[{i}].name must be a string", param=f"messages[{i}]")
        clean.append({"role": m["role"], "content": c, **({"name": name} if name else {})})  # a template may use name
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    clean = developer_as_system(clean, tokenizer.chat_template)
    try:
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own refusal (raise_exception), e.g. roles that must alternate
        if not type(e).__module__.startswith("jinja2"):  # jinja2.TemplateError and its kinds; anything else is ours
            raise
        raise ApiError(400, f"this model's chat template refuses these messages: {e}", param="messages") from None
    return prompt_ids(tokenizer, text, _add_special_tokens(body, False))


__all__ = ["IGNORED_UNLESS_NEUTRAL", "NOT_SUPPORTED", "NO_EFFECT_FIELDS", "READ_FIELDS", "PART_SEPARATOR",
           "STREAM_OPTIONS_NEUTRAL", "ApiError", "chat_prompt", "completion_prompts", "content_text",
           "developer_as_system", "not_unicode", "request_model", "sampling_params", "unread_fields"]
