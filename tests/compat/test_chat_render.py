"""alignkit renders chat templates directly (`alignkit.data.chat._Renderer`: transformers' compiled template,
rendered with the arguments `apply_chat_template` passes) while tokenizing many records. That leans on
transformers internals (`chat_template_utils._compile_jinja_template`, what `render_jinja_template` passes to
the template), so this table pins that the direct rendering equals `tokenizer.apply_chat_template` for the
kinds of templates models ship, and that anything the renderer cannot reproduce goes to `apply_chat_template`."""

from __future__ import annotations

import copy

import jinja2
import pytest

from alignkit.data import chat
from alignkit.data.chat import fast_chat_rendering, format_record
from alignkit.data.records import DataError

from .guards import check

TF = "transformers"
WHERE = "alignkit/data/chat.py:_Renderer (tokenize_records' chat formatting)"

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen-2-like: a default system prompt when the conversation has none; tools only when given
DEFAULT_SYSTEM = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + tools | tojson + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2-like: bos/eos from the special tokens, a folded system prompt, raise_exception on bad role order
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
# namespace, loop controls, whitespace control, filters, a role mapping and a generation prompt
GEMMA_LIKE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.n = ns.n + 1 %}{% continue %}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' -}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

TEMPLATES = {"chatml": CHATML, "default-system": DEFAULT_SYSTEM, "llama2": LLAMA2, "gemma-like": GEMMA_LIKE}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": " q2 \n"}],
    [{"role": "user", "content": "<b>&amp; \"quotes\" 'single' {{ not a tag }} ünïcödé\n\n"}],
]


@pytest.fixture
def tok(tokenizer):
    return copy.deepcopy(tokenizer)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_direct_rendering_equals_apply_chat_template(tok, name):
    tok.chat_template = TEMPLATES[name]
    with fast_chat_rendering(tok):
        renderer = chat._RENDERER.get()
        check(renderer is not None, TF, f"the {name} template is no longer rendered directly (the probe renderings "
              f"differ from apply_chat_template, or _compile_jinja_template moved)", WHERE)
        for conv in CONVERSATIONS:
            for gen in (True, False):
                want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                got = renderer.render(tok, conv, gen)
                check(got == want, TF, f"direct rendering of the {name} template differs from apply_chat_template",
                      WHERE, f"{got!r} != {want!r}")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_formatter_text_is_the_same_with_and_without_direct_rendering(tok, name):
    tok.chat_template = TEMPLATES[name]
    prompt = [{"role": "user", "content": "Name a red fruit"}]
    completion = [{"role": "assistant", "content": "An apple."}]
    want = (tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
            tok.apply_chat_template(prompt + completion, tokenize=False))
    with fast_chat_rendering(tok):
        f = format_record(prompt, completion, tok)
    assert (f.prompt, f.full) == want


def test_raise_exception_surfaces_the_same_error(tok):
    tok.chat_template = LLAMA2
    bad = [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]
    with pytest.raises(jinja2.exceptions.TemplateError) as want:
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(DataError) as plain:  # the formatter turns the template's refusal into a DataError
        format_record(bad[:1], bad[1:], tok)
    with fast_chat_rendering(tok):
        assert chat._RENDERER.get() is not None
        with pytest.raises(DataError) as got:
            format_record(bad[:1], bad[1:], tok)
    assert str(got.value) == str(plain.value) and f"({want.value})" in str(got.value)


def test_template_rejecting_the_probes_falls_back_to_apply_chat_template(tok):
    tok.chat_template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}" \
                        + CHATML
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    with fast_chat_rendering(tok):
        assert chat._RENDERER.get() is None  # the user-only probe raises: no direct rendering
        f = format_record(conv, None, tok)
    assert f.prompt == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_a_renderer_differing_from_apply_chat_template_is_not_used(tok, monkeypatch):
    """If the direct rendering stopped matching apply_chat_template (say transformers started passing the template
    another variable; simulated here by a render that drops the generation prompt), the probes catch it and the
    renderer is not built: every record goes through apply_chat_template."""
    real = chat._Renderer.render
    monkeypatch.setattr(chat._Renderer, "render", lambda self, t, m, gen: real(self, t, m, False))
    tok.chat_template = CHATML
    with fast_chat_rendering(tok):
        assert chat._RENDERER.get() is None
        f = format_record([{"role": "user", "content": "u"}], None, tok)
    assert f.prompt.endswith("<|im_start|>assistant\n")


def test_what_the_renderer_does_not_serve(tok):
    tok.chat_template = CHATML
    with fast_chat_rendering(tok):
        r = chat._RENDERER.get()
        assert r.serves(tok, [{"role": "user", "content": "x"}])
        assert not r.serves(tok, [])  # apply_chat_template raises its own error on an empty conversation
        assert not r.serves(tok, [{"role": "user", "content": "x", "name": "bob"}])  # extra keys: normalised there
        assert not r.serves(tok, [{"role": "user", "content": None}])  # None values are dropped there
        other = copy.deepcopy(tok)
        assert not r.serves(other, [{"role": "user", "content": "x"}])  # built for one tokenizer only
        tok.chat_template = CHATML + " "
        assert not r.serves(tok, [{"role": "user", "content": "x"}])  # the template changed
    tok.chat_template = {"default": CHATML}  # several named templates: apply_chat_template picks one
    with fast_chat_rendering(tok):
        assert chat._RENDERER.get() is None
    assert chat._RENDERER.get() is None  # the block's renderer does not outlive it



# A template written for OpenAI content parts only: it iterates message['content'] and prints each part's 'text'.
PARTS_ONLY = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}\n"
              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_parts_only_template_drops_string_content_without_an_error(tokenizer):
    """transformers renders chat templates in a non-strict jinja2 environment: a template that reads a string
    `content` as parts iterates its characters, whose `['text']` is undefined and renders as nothing, so the message's
    text is dropped and nothing is raised. alignkit's server passes every message's text as a string (parts joined),
    so `serve.template.check_chat_template` looks for its probe text in the rendering (not for an error)."""
    from alignkit.serve.template import TEMPLATE_PROBES, check_chat_template

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = PARTS_ONLY
    where = "alignkit/serve/template.py:check_chat_template (serve: at load and --dry-run)"
    text = tok.apply_chat_template([{"role": "user", "content": TEMPLATE_PROBES[0]}], tokenize=False,
                                   add_generation_prompt=True)
    check(TEMPLATE_PROBES[0] not in text and text.startswith("user: "), TF, "a parts-only template renders a string content as nothing, no error",
          where, repr(text))
    parts = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": TEMPLATE_PROBES[0]}]}],
                                    tokenize=False, add_generation_prompt=True)
    check(TEMPLATE_PROBES[0] in parts, TF, "content parts reach the template as given", where, repr(parts))
    with pytest.raises(ValueError, match="renders a user message without its text"):
        check_chat_template(tok, "base x")
    tok.chat_template = CHATML
    assert "renders a message's text" in check_chat_template(tok, "base x")
