"""A model trained through a chat template ends its answers with the template's turn-end token and no EOS
(`Formatted.ends_turn`). Generation used to stop on EOS only: such a model's answers ran on past `<|im_end|>` to
`max_new_tokens` (rewards then scored the run-on text), while `serve` stopped there. Both now read the turn end
from the template itself."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.chat import turn_end_ids
from alignkit.online.generation import SamplingConfig, end_token_ids, generate_responses


@pytest.mark.parametrize("template,token", [
    (None, None),  # the tiny tokenizer's own template: ChatML, turns end with <|im_end|>
    ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|eos|>{% endfor %}", "<|eos|>"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", ""),  # ends with text: none
])
def test_turn_end_is_read_from_the_template(tokenizer, template, token):
    if template is not None:
        tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
        tokenizer.chat_template = template
    want = [] if token == "" else [tokenizer.convert_tokens_to_ids(token or "<|im_end|>")]
    assert turn_end_ids(tokenizer) == want


def test_no_template_no_turn_end(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    assert turn_end_ids(tok) == []


class Says(torch.nn.Module):
    """An LM head that always prefers one token (the rest of the model runs as usual; test_generation_config too)."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], self.vocab)
        out[..., self.token] = 10.0
        return out


def test_generation_stops_at_the_turn_end_token(tiny_lm, tokenizer):
    model = tiny_lm("llama")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id and model.generation_config.eos_token_id != im_end
    model.lm_head = Says(model.config.vocab_size, im_end)
    assert im_end in end_token_ids(model, tokenizer, SamplingConfig())
    (got,) = generate_responses(model, tokenizer, [[{"role": "user", "content": "Hi"}]],
                                SamplingConfig(do_sample=False, max_new_tokens=5))
    assert got.response_ids == [im_end] and got.finish_reason == "eos" and got.response == ""
    # a plain-text prompt is not formatted by the template: its turn-end token means nothing there, no stop
    (plain,) = generate_responses(model, tokenizer, ["Hi"], SamplingConfig(do_sample=False, max_new_tokens=5))
    assert plain.response_ids == [im_end] * 5 and plain.finish_reason == "length"
    assert im_end not in end_token_ids(model, tokenizer, SamplingConfig(), chat=False)

