"""A model folder's generation_config.json, as transformers reads it with from_pretrained, and what each generation
path of alignkit takes from it.

Stop tokens: Llama-3-Instruct-style folders list several `eos_token_id`s (`[<|end_of_text|>, <|eot_id|>]`) while the
tokenizer's eos_token is one of them. Every path stops at, and counts as an end, every id the folder names
(`generation.end_token_ids` is the one source): a generation that runs past `<|eot_id|>` is a run-on answer that
rewards and masks are then computed on."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig, end_token_ids, generate_responses


class _Says(torch.nn.Module):
    """An LM head that always prefers one token (the rest of the model runs as usual)."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], self.vocab)
        out[..., self.token] = 10.0
        return out


class DistributedDataParallel(torch.nn.Module):
    """Stands for torch's DDP wrapper (alignkit unwraps by type name): `.module` is the model, and attribute reads
    other than submodules / parameters do not reach it."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def folder_with(tiny_dir, tmp_path, **gen) -> str:
    """A copy of the tiny llama folder whose generation_config.json holds `gen` (over what it had)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), folder)
    path = folder / "generation_config.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **gen}))
    return str(folder)


@pytest.fixture
def eot(tokenizer):
    """An id standing for Llama-3's <|eot_id|>: neither the tokenizer's eos nor the chat template's turn end."""
    t = tokenizer("Hello")["input_ids"][-1]
    assert t not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return t


def test_every_path_stops_at_every_eos_id_the_folder_names(tiny_dir, tmp_path, tokenizer, eot):
    from alignkit.online.vllm_generation import generate_with
    from alignkit.serve.engine import default_end_ids

    model = load_model(folder_with(tiny_dir, tmp_path, eos_token_id=[tokenizer.eos_token_id, eot])).eval()
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, eot]  # transformers read the file
    model.lm_head = _Says(model.config.vocab_size, eot)
    cfg = SamplingConfig(do_sample=False, max_new_tokens=4)
    for lean in (None, False):  # alignkit's decode loop, transformers' generate
        (s,) = generate_responses(model, tokenizer, ["Hi"], cfg, lean=lean)
        assert (s.response_ids, s.finish_reason) == ([eot], "eos"), lean
    # a parallel wrapper (online training's policy under DDP) does not pass attribute reads on to the model
    wrapped = DistributedDataParallel(model)
    assert eot in end_token_ids(wrapped, tokenizer, cfg, chat=False)
    # vLLM's requests (stop_token_ids) and the finish reasons of what it returns
    seen = {}

    def complete(encoded, requests):
        seen["stop"] = requests[0]["stop_token_ids"]
        return [[[eot, 5, 6]] for _ in encoded]

    (v,) = generate_with(complete, tokenizer, ["Hi"], cfg, eos_source=wrapped)
    assert eot in seen["stop"] and (v.response_ids, v.finish_reason) == ([eot], "eos")
    # serve: alignkit's engine
    assert eot in default_end_ids(SimpleNamespace(model=wrapped, tokenizer=tokenizer), chat=False)


def test_local_chat_and_generation_report_stop_at_the_turn_end(tiny_lm, tokenizer):
    """`LocalChat` (augment / judge with a local model) and `generation_report` called model.generate with the
    model's generation_config EOS only: a chat-formatted answer ran past the template's turn end (<|im_end|>) to
    max_new_tokens (LocalChat then refused it as cut off; the report showed run-on text)."""
    from alignkit.augment.llm import LocalChat
    from alignkit.trainers.evaluation import generation_report

    model = tiny_lm("llama")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in (tokenizer.eos_token_id, model.generation_config.eos_token_id)
    model.lm_head = _Says(model.config.vocab_size, im_end)
    got = LocalChat(model, tokenizer, "tiny").chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert got == ""
    seen = []
    real = type(model).generate

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        seen.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    type(model).generate = spy
    try:
        generation_report(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=4,
                          base_model=model)
    finally:
        type(model).generate = real
    assert seen == [1, 1]  # stopped at the turn end (was 4 and 4)
