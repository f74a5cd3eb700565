"""Batched tokenization gives exactly the features of one record at a time, and the on-disk feature cache is
keyed by everything the features depend on (records, tokenizer, settings, code) and never trusts a damaged
entry."""

from __future__ import annotations

import copy
import json

import pytest

import alignkit.data.tokenize as tk
from alignkit.data.records import PreferenceRecord, PromptRecord, RankedRecord, SFTRecord, UnpairedRecord
from alignkit.data.tokenize import TokenizeConfig, TokenizeStats, Unfit, tokenize_record, tokenize_records


def corpus():
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a red animal"}]
    return [
        SFTRecord(prompt="Tell me a fact.\n", completion=" Cats purr.", id="plain"),
        SFTRecord(prompt=chat, completion=[{"role": "assistant", "content": "A fox."}], id="multi-turn"),
        PreferenceRecord(prompt="Q: 2+2?\n", chosen=" 4", rejected=" 5", id="pref"),
        PreferenceRecord(prompt=chat[:1], chosen=[{"role": "assistant", "content": "Hi"}],
                         rejected=[{"role": "assistant", "content": "Go away"}], id="pref-chat"),
        UnpairedRecord(prompt="Say yes.\n", completion=" yes", label=True, id="kto"),
        RankedRecord(prompt="Best colour?\n", responses=[" blue", " red", " green"], ranks=[0, 1, 1], id="ranked"),
        PromptRecord(prompt=chat[:1], id="prompt-only"),
        SFTRecord(prompt="word " * 80, completion=" end", id="too-long"),  # dropped: prompt_too_long
        SFTRecord(prompt="Same text\n", completion=" again", id="dup-1"),
        SFTRecord(prompt="Same text\n", completion=" again", id="dup-2"),  # identical texts share memo entries
    ]


def one_at_a_time(records, tokenizer, cfg):
    stats, out = TokenizeStats(total=len(records)), []
    for r in records:
        try:
            out.append(tokenize_record(r, tokenizer, cfg, stats))
        except Unfit as e:
            stats.drop(e.reason, r.id)
    return out, stats


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_batched_features_equal_one_record_at_a_time(tokenizer, monkeypatch, chunk):
    monkeypatch.setattr(tk, "CHUNK", chunk)
    cfg = TokenizeConfig(max_length=80, max_prompt_length=None)
    want, want_stats = one_at_a_time(corpus(), tokenizer, cfg)
    got, stats = tokenize_records(corpus(), tokenizer, cfg)
    assert got == want
    assert stats.summary() == dataclass_summary(want_stats, len(want))
    assert [f["id"] for f in got] == [r.id for r in corpus() if r.id != "too-long"]


def dataclass_summary(stats, kept):
    stats.kept = kept
    return stats.summary()


def test_backend_disagreeing_with_the_wrapper_falls_back_to_the_wrapper(tokenizer, monkeypatch):
    class Liar:  # a backend whose ids are wrong: the check on the first texts must catch it
        def encode_batch(self, texts, add_special_tokens):
            return [type("E", (), {"ids": [7, 7, 7]})() for _ in texts]

    fake = copy.copy(tokenizer)
    monkeypatch.setattr(type(fake), "backend_tokenizer", property(lambda self: Liar()), raising=False)
    texts = ["hello world", "a b c"]
    assert tk._encode_many(fake, texts, False) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_a_tokenizer_saved_with_truncation_cuts_no_completion(tokenizer, tmp_path):
    """A tokenizer.json saved with a truncation setting loads with it on the Rust backend (compat K10), and the
    wrapper clears it on its first call only. Batched tokenization encoded through the backend first: its first
    texts were short (they agreed with the wrapper) and a later, longer one came back cut to the saved max_length,
    counted as no truncation. Checked to fail without the fix: the long record had 13 ids instead of 2 + 40 + EOS."""
    from alignkit.models.loading import load_tokenizer

    saved = copy.deepcopy(tokenizer)
    saved.backend_tokenizer.enable_truncation(max_length=12)
    saved.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    records = [SFTRecord(f"hi {i}", " yo", id=f"short-{i}") for i in range(9)]
    records.append(SFTRecord("a b", " w" * 40, id="long"))
    feats, stats = tokenize_records(records, tok, TokenizeConfig(max_length=None, max_prompt_length=None))
    want = tokenizer("a b" + " w" * 40)["input_ids"] + [tokenizer.eos_token_id]
    assert len(want) > 40 and feats[-1]["input_ids"] == want
    assert stats.completion_truncated == 0


def test_cache_hit_miss_and_damage(tokenizer, tmp_path, monkeypatch):
    cfg = TokenizeConfig(max_length=80, max_prompt_length=None)
    first, s1 = tokenize_records(corpus(), tokenizer, cfg, cache_dir=tmp_path)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".jsonl")

    calls = []
    monkeypatch.setattr(tk, "_prefetch", lambda *a: calls.append(1))  # a hit must not tokenize at all
    again, s2 = tokenize_records(corpus(), tokenizer, cfg, cache_dir=tmp_path)
    assert again == first and calls == [] and s2.summary() == s1.summary()
    monkeypatch.undo()

    # any input that changes the features changes the key: settings, records, tokenizer
    keys = {tk.cache_key(corpus(), tokenizer, cfg), tk.cache_key(corpus(), tokenizer, TokenizeConfig(max_length=81, max_prompt_length=None)),
            tk.cache_key(corpus()[:-1], tokenizer, cfg)}
    edited = corpus()
    edited[0] = SFTRecord(prompt="Tell me a fact.\n", completion=" Dogs bark.", id="plain")
    keys.add(tk.cache_key(edited, tokenizer, cfg))
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    keys.add(tk.cache_key(corpus(), other, cfg))
    assert len(keys) == 5

    # a damaged entry (truncated features) is recomputed, not trusted
    feats = next(tmp_path.glob("*.jsonl"))
    feats.write_text("\n".join(feats.read_text().splitlines()[:3]) + "\n")
    fixed, _ = tokenize_records(corpus(), tokenizer, cfg, cache_dir=tmp_path)
    assert fixed == first
    assert len(feats.read_text().splitlines()) == len(first)  # rewritten whole
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["kept"] == len(first)


def test_a_user_registered_formatter_is_in_the_cache_key(tokenizer, tmp_path, monkeypatch):
    """A formatter registered by the user (`register_formatter`) lives outside the modules whose source keys the cache:
    before, the second run below (another function under the same name, as after an edit) hit the features of the
    first and trained on text the formatter no longer gives. Its code is now in the key: a miss, new features."""
    from alignkit.data import FORMATTERS, Formatted, register_formatter

    monkeypatch.setitem(FORMATTERS, "mine", None)  # restored (removed) after the test

    def shouting(prompt, completion, tok):
        return Formatted(prompt.upper(), prompt.upper() + completion, add_special_tokens=False, ends_turn=False)

    def quiet(prompt, completion, tok):
        return Formatted(prompt.lower(), prompt.lower() + completion, add_special_tokens=False, ends_turn=False)

    records = [SFTRecord(prompt="Say Hi: ", completion="hi", id="r")]
    cfg = TokenizeConfig(formatter="mine", max_length=64, max_prompt_length=None)
    register_formatter("mine")(shouting)
    first, _ = tokenize_records(records, tokenizer, cfg, cache_dir=tmp_path)
    assert first[0]["input_ids"][:first[0]["prompt_length"]] == tokenizer("SAY HI: ", add_special_tokens=False)["input_ids"]
    register_formatter("mine")(quiet)
    second, _ = tokenize_records(records, tokenizer, cfg, cache_dir=tmp_path)
    assert second[0]["input_ids"][:second[0]["prompt_length"]] == tokenizer("say hi: ", add_special_tokens=False)["input_ids"]
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # two entries: the second run missed
    register_formatter("mine")(quiet)
    assert tokenize_records(records, tokenizer, cfg, cache_dir=tmp_path)[0] == second  # the same code: a hit
    assert len(list(tmp_path.glob("*.jsonl"))) == 2


@pytest.mark.parametrize("change", [{"max_length": 79}, {"max_prompt_length": 20}, {"formatter": "plain"},
                                    {"add_eos": False}, {"add_eos": True}, {"loss_on": "last_assistant"},
                                    {"loss_on": "all"}])
def test_every_tokenize_setting_is_in_the_cache_key(tokenizer, change):
    """Each setting that changes the features (data.max_length, max_prompt_length, formatter, add_eos, loss_on)
    changes the key: a run with another value never reads the features of the first."""
    base = TokenizeConfig(max_length=80, max_prompt_length=None)
    records = corpus()
    assert tk.cache_key(records, tokenizer, base) != tk.cache_key(records, tokenizer, TokenizeConfig(
        **{"max_length": 80, "max_prompt_length": None, **change}))


def test_a_trainers_dataset_from_files_is_tokenized_again_when_a_registered_formatter_changes(tokenizer, tmp_path,
                                                                                            monkeypatch):
    """A trainer's dataset read from files is tokenized with `Dataset.map`, whose cache keyed on the map function and
    its arguments only: after another function was registered under the formatter's name (as after an edit), the
    second run read the first run's features back. The code is now hashed into the map's arguments (compat D6)."""
    import datasets

    from alignkit.data import FORMATTERS, Formatted, register_formatter
    from alignkit.data.prepare import prepare_dataset

    monkeypatch.setitem(FORMATTERS, "mine", None)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "Say Hi: ", "completion": "hi"}) + "\n")
    cfg = TokenizeConfig(formatter="mine", max_length=64, max_prompt_length=None)
    got = []
    for case in (str.upper, str.lower):
        register_formatter("mine")(lambda prompt, completion, tok, case=case: Formatted(
            case(prompt), case(prompt) + completion, add_special_tokens=False, ends_turn=False))
        ds = datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=str(tmp_path / "cache"))
        out, _ = prepare_dataset(ds, tokenizer, ["sft"], cfg)
        got.append(out[0]["input_ids"][:out[0]["prompt_length"]])
    assert got == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("SAY HI: ", "say hi: ")]


@pytest.mark.parametrize("setting", ["do_basic_tokenize", "do_lower_case", "never_split"])
def test_a_slow_tokenizer_setting_changed_after_loading_misses_the_cache(setting, tmp_path):
    """A tokenizer without a Rust backend (transformers 5's PythonBackend / SentencePieceBackend: bert legacy, byt5,
    marian, siglip, ...) was keyed by its vocabulary alone: switching a setting that changes its ids
    (`do_basic_tokenize`: no split on spaces and punctuation first; `basic_tokenizer.do_lower_case`) hit the features of
    the first run, silently wrong tokens. Now the second run misses and its ids are the tokenizer's own."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "Hello", "!"]) + "\n")
    tok = BertTokenizerLegacy(str(vocab), do_lower_case=False, eos_token="[SEP]")
    assert not tok.is_fast and getattr(tok, "backend_tokenizer", None) is None
    records = [SFTRecord(prompt="Hello", completion=" world!", id="r")]
    cfg = TokenizeConfig(max_length=32, max_prompt_length=None, formatter="plain")
    cache = tmp_path / "cache"
    first, _ = tokenize_records(records, tok, cfg, cache_dir=cache)
    if setting == "do_basic_tokenize":
        tok.do_basic_tokenize = False  # " world!" is one word piece: [UNK]
    elif setting == "do_lower_case":
        tok.basic_tokenizer.do_lower_case = True  # "Hello" -> "hello"
    else:  # a list / set setting (was left out of the key: a stale hit); "world!" kept whole: [UNK]
        tok.basic_tokenizer.never_split = {"world!"}
    want = tok("Hello world!")["input_ids"]
    second, _ = tokenize_records(records, tok, cfg, cache_dir=cache)
    assert second != first and second[0]["input_ids"][:len(want) - 1] == want[:-1]
    assert len(list(cache.glob("*.jsonl"))) == 2  # the second run missed


def test_a_fast_tokenizer_add_eos_token_is_in_the_key(tokenizer):
    """A fast tokenizer's add_bos_token / add_eos_token live in its post-processor, part of the backend JSON the key
    hashes: switching one changes the ids ([.., eos] at the end) and the key."""
    cfg = TokenizeConfig(max_length=80, max_prompt_length=None)
    other = copy.deepcopy(tokenizer)
    other.add_eos_token = True
    assert other("hi")["input_ids"] == tokenizer("hi")["input_ids"] + [tokenizer.eos_token_id]
    assert tk.cache_key(corpus(), other, cfg) != tk.cache_key(corpus(), tokenizer, cfg)


def test_every_module_the_features_come_from_keys_the_cache():
    """The cache key hashes the source of `FEATURE_MODULES`; a module tokenize.py or chat.py (the formatters, the
    suffix / BOS probes) takes code from and that is missing there can change the features or the stats read back
    without changing the key (a stale hit). Before: alignkit.data.tokenize_stats (TokenizeStats, moved out of
    tokenize.py this session: its summary is what the cache stores and rebuilds) was missing. Fails without the fix:
    yes."""
    import inspect

    from alignkit.data import chat
    from alignkit.data.tokenize_cache import FEATURE_MODULES

    used = set()
    for module in (tk, chat):
        for value in vars(module).values():
            name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(name, str) and name.startswith("alignkit.data."):
                used.add(name)
    assert "alignkit.data.tokenize_stats" in used and "alignkit.data.records" in used  # the scan sees them
    assert used - set(FEATURE_MODULES) == set()


def test_split_special_tokens_is_in_the_key(tokenizer, tiny_dir, tmp_path):
    """`split_special_tokens=True` (a load option the wrapper holds, not the backend JSON the key hashed) encodes a
    quoted "<|im_start|>" as ordinary pieces: before, both settings had one key, and the second run read the first
    one's ids back (the special token where the text was meant). Now each setting has its own entry, whose ids are a
    direct encode's. Fails without the fix: yes (the key was the same, the second run a stale hit)."""
    from transformers import AutoTokenizer

    from alignkit.data.tokenize_cache import tokenizer_fingerprint
    from alignkit.trainers.reference import stable_tokenizer_fingerprint

    folder = tiny_dir("llama")
    plain, split = (AutoTokenizer.from_pretrained(folder, split_special_tokens=s) for s in (False, True))
    prompt, completion = "What does <|im_start|> mean?\n", " It opens a turn."
    records = [SFTRecord(prompt=prompt, completion=completion, id="quote")]
    cfg = TokenizeConfig(max_length=None, max_prompt_length=None, formatter="plain")
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(split)
    assert tk.cache_key(records, plain, cfg) != tk.cache_key(records, split, cfg)
    assert stable_tokenizer_fingerprint(plain) != stable_tokenizer_fingerprint(split)
    assert stable_tokenizer_fingerprint(plain) == stable_tokenizer_fingerprint(tokenizer)  # keys stored before: kept
    im_start = plain.convert_tokens_to_ids("<|im_start|>")
    for tok in (plain, split, plain, split):  # each run after the other setting's: a stale hit would show
        (f,), _ = tokenize_records(records, tok, cfg, cache_dir=tmp_path)
        want = tok(prompt + completion)["input_ids"] + [tok.eos_token_id]  # (this tokenizer appends no EOS)
        assert f["input_ids"] == want
        assert (im_start in f["input_ids"]) is (tok is plain)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2


def test_split_special_tokens_set_after_loading_reaches_the_batched_ids(tokenizer):
    """`tokenizer.split_special_tokens = True` after loading reaches the Rust backend (`encode_special_tokens`) only on
    the wrapper's next call: before, a batch whose first texts (the ones checked against the wrapper) held no special
    token took the backend's ids, and a later text quoting "<|im_start|>" got the special token. Now a backend whose
    flag lags is not used. Fails without the fix: yes."""
    tok = copy.deepcopy(tokenizer)
    tok.split_special_tokens = True
    texts = ["hello world"] * 8 + ["say <|im_start|> aloud"]
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # (this call syncs the backend: undo it)
    tok.backend_tokenizer.encode_special_tokens = False
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in want[-1]
    assert tk._encode_many(tok, texts, False) == want
