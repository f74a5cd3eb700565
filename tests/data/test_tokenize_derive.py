"""`tokenize_records` reads a chat prompt's ids off its full text's encoding (cut after the last added token
inside the prompt, the short tail re-encoded after that token) instead of encoding the prompt again, and lets the
Rust encoder use every core for large batches. References here are independent of that path: the tokenizer
called on each text alone, and `tokenize_record` one record at a time outside any batch (apply_chat_template,
one tokenizer call per text)."""

from __future__ import annotations

import copy
import os

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import alignkit.data.tokenize as tk
from alignkit.data.chat import format_record
from alignkit.data.records import PreferenceRecord, PromptRecord, RankedRecord, SFTRecord
from alignkit.data.tokenize import TokenizeConfig, tokenize_records

from .test_tokenize_batched import one_at_a_time as _one_at_a_time


def one_at_a_time(records, tokenizer, cfg):
    return _one_at_a_time(records, tokenizer, cfg)[0]

CHATML_GEN_AT_TOKEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>' }}{% else %}"
                       "{{ '<|im_start|>' + m['role'] + '\n' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
INST = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
SEP = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' <sep> ' }}{% endfor %}"
       "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


def metaspace_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-like BPE (Metaspace, prefix "▁" on the first piece only), `[INST]` an added token matched
    in the raw text and `<sep>` one that strips the whitespace after it (so it is no anchor)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["the user asks what is two plus two and the assistant answers four", "name a red fruit: an apple",
              "[INST] hello there [/INST] general kenobi", "user: hi assistant: hello"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.add_tokens([AddedToken("[INST]", normalized=False), AddedToken("<sep>", normalized=False, rstrip=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    return fast


def conversations():
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is two plus two"}]
    tricky = [{"role": "user", "content": "  spaces before, and a typed <|im_end|> and [INST] inside \n"}]
    return [
        SFTRecord(prompt=[{"role": "user", "content": "name a red fruit"}],
                  completion=[{"role": "assistant", "content": "an apple"}], id="sft"),
        SFTRecord(prompt=tricky, completion=[{"role": "assistant", "content": " four\n"}], id="tricky"),
        SFTRecord(prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "the answer?"}],
                  completion=[{"role": "assistant", "content": "four"}], id="multi-turn"),
        PreferenceRecord(prompt=sys_user, chosen=[{"role": "assistant", "content": "four"}],
                         rejected=[{"role": "assistant", "content": "five, the user asks"}], id="pref"),
        RankedRecord(prompt=sys_user[1:], responses=[[{"role": "assistant", "content": r}] for r in ("4", "four", "5")],
                     ranks=[0, 0, 1], id="ranked"),
        PromptRecord(prompt=sys_user[1:], id="prompt-only"),
        SFTRecord(prompt="plain text prompt\n", completion=" plain answer", id="plain"),
    ]


def tokenizers_under_test(tokenizer):
    chatml_gen_at_token = copy.deepcopy(tokenizer)
    chatml_gen_at_token.chat_template = CHATML_GEN_AT_TOKEN  # the generation prompt IS an added token: empty tail
    inst = metaspace_tokenizer(INST)  # no generation prompt: the prompt ends with " [/INST]"
    return {"chatml": tokenizer, "chatml-gen-at-token": chatml_gen_at_token, "metaspace-inst": inst,
            "metaspace-sep": metaspace_tokenizer(SEP)}


@pytest.mark.parametrize("name", ["chatml", "chatml-gen-at-token", "metaspace-inst", "metaspace-sep"])
def test_features_equal_one_record_at_a_time(tokenizer, name):
    tok = tokenizers_under_test(tokenizer)[name]
    cfg = TokenizeConfig(max_length=None, max_prompt_length=None, loss_on="all_assistant")
    recs = conversations()
    assert tokenize_records(recs, tok, cfg)[0] == one_at_a_time(recs, tok, cfg)


@pytest.mark.parametrize("name", ["chatml", "chatml-gen-at-token", "metaspace-inst"])
def test_derived_prompt_ids_equal_the_tokenizer_on_the_prompt_alone(tokenizer, name):
    tok = tokenizers_under_test(tokenizer)[name]
    pairs = {}
    for r in conversations():
        if isinstance(r, SFTRecord) and isinstance(r.prompt, list) and r.id != "multi-turn":
            f = format_record(r.prompt, r.completion, tok)
            assert f.full.startswith(f.prompt)
            pairs[f.prompt] = f.full
    fulls = list(pairs.values())
    encodings = tok.backend_tokenizer.encode_batch(fulls, add_special_tokens=False)
    derived = tk._derive_prompts(tok, pairs, dict(zip(fulls, encodings)), {f: e.ids for f, e in zip(fulls, encodings)})
    assert set(derived) == set(pairs)  # every prompt here has an anchor: none was left to encode
    for p, ids in derived.items():
        assert ids == tok(p, add_special_tokens=False)["input_ids"], p


def test_tokens_that_strip_whitespace_are_no_anchors():
    tok = metaspace_tokenizer(SEP)
    anchors = set(tk._anchors(tok).values())
    assert "[INST]" in anchors and "<sep>" not in anchors
    f = format_record([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}], tok)
    enc = tok.backend_tokenizer.encode_batch([f.full], add_special_tokens=False)
    assert tk._derive_prompts(tok, {f.prompt: f.full}, {f.full: enc[0]}, {f.full: enc[0].ids}) == {}


def test_large_batches_use_rust_threads_and_restore_the_setting(tokenizer, monkeypatch):
    seen = []
    real = tk._backend_encode

    def spy(tok, texts, flag, offsets=True):
        seen.append((len(texts), os.environ.get("TOKENIZERS_PARALLELISM")))
        return real(tok, texts, flag, offsets)

    monkeypatch.setattr(tk, "_backend_encode", spy)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    recs = [SFTRecord(prompt=[{"role": "user", "content": f"question {i} " * (i % 5 + 1)}],
                      completion=[{"role": "assistant", "content": f"answer {i}"}], id=f"r{i}")
            for i in range(tk.PARALLEL_MIN // 2 + 8)]  # fulls + derivable prompts >= PARALLEL_MIN
    cfg = TokenizeConfig(max_length=None, max_prompt_length=None)
    got = tokenize_records(recs, tokenizer, cfg)[0]
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert seen and all(v == "true" for _, v in seen)  # every batched call of this input ran with the threads on
    monkeypatch.setattr(tk, "_backend_encode", real)
    assert got == one_at_a_time(recs, tokenizer, cfg)


@pytest.mark.parametrize("before", [None, "false", "true"])
def test_rust_threads_context(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    with tk._rust_threads(tk.PARALLEL_MIN - 1):
        assert os.environ.get("TOKENIZERS_PARALLELISM") == before  # small batch: untouched
    with tk._rust_threads(tk.PARALLEL_MIN):
        want = "true" if before == "false" and (os.cpu_count() or 1) > 1 else before
        assert os.environ.get("TOKENIZERS_PARALLELISM") == want
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before
