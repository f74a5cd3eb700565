"""Tokenizers that append tokens to every text they encode (GPT-NeoX / Pythia post-processors `$A <|endoftext|>`,
Llama saved with `add_eos_token`): prompt/completion records tokenize with the prompt a prefix, one EOS at the end
and the completion and that EOS trained. The tokenizers are built here from a word-level vocabulary, so every
expected id below is read off `VOCAB` by hand."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import alignkit.data.tokenize as tk
from alignkit.data import chat
from alignkit.data.records import PreferenceRecord, PromptRecord, RankedRecord, SFTRecord, UnpairedRecord
from alignkit.data.tokenize import TokenizeConfig, TokenizeStats, tokenize_record, tokenize_records

VOCAB = {"<unk>": 0, "<eos>": 1, "<bos>": 2, "Q": 3, ":": 4, "hi": 5, "A": 6, "yes": 7, "no": 8, "maybe": 9}
EOS, BOS = 1, 2
PROMPT = "Q : hi A :"  # -> 3 4 5 6 4


def word_tokenizer(single: str | None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB; `single` is its post-processor's template ("$A <eos>": appends EOS; None:
    adds nothing)."""
    t = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if single is not None:
        t.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B:1",
                                                         special_tokens=[("<eos>", EOS), ("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


@pytest.fixture
def neox():
    tok = word_tokenizer("$A <eos>")
    assert tok(PROMPT)["input_ids"] == [3, 4, 5, 6, 4, EOS]  # the tokenizer appends EOS itself
    return tok


def test_sft_with_a_tokenizer_that_appends_eos(neox):
    """Before: every plain-text prompt/completion record was a DataError ("the tokenized prompt is not a prefix",
    the prompt's own appended EOS against the completion's first token). Now the prompt's ids leave the appended EOS
    out, the sequence ends with exactly one EOS (not two under add_eos=true), and the completion and that EOS are
    trained; add_eos=false ends without one. Fails without the fix: yes (the DataError)."""
    want = {"input_ids": [3, 4, 5, 6, 4, 7, EOS], "completion_mask": [0, 0, 0, 0, 0, 1, 1], "prompt_length": 5,
            "length": 7}
    for add_eos in (None, True):
        (f,), _ = tokenize_records([SFTRecord(PROMPT, " yes", id="r1")], neox, add_eos=add_eos)
        assert {k: f[k] for k in want} == want
    (g,), _ = tokenize_records([SFTRecord(PROMPT, " yes", id="r1")], neox, add_eos=False)
    assert (g["input_ids"], g["completion_mask"]) == ([3, 4, 5, 6, 4, 7], [0, 0, 0, 0, 0, 1])
    # the same features as a tokenizer that appends nothing (EOS appended by add_eos)
    (h,), _ = tokenize_records([SFTRecord(PROMPT, " yes", id="r1")], word_tokenizer(None))
    assert {k: h[k] for k in want} == want


def test_bos_and_eos_template_and_a_completion_ending_in_eos_text(neox):
    """Llama with add_eos_token: `<bos> $A <eos>`. BOS stays in front, one EOS at the end; a completion whose text
    ends with the EOS token itself still gets one EOS, not two (nor three with the appended one). Fails without the
    fix: yes."""
    llama = word_tokenizer("<bos> $A <eos>")
    assert chat.added_suffix(llama) == (EOS,)
    (f,), _ = tokenize_records([SFTRecord(PROMPT, " yes", id="r1")], llama)
    assert (f["input_ids"], f["completion_mask"], f["prompt_length"]) == (
        [BOS, 3, 4, 5, 6, 4, 7, EOS], [0, 0, 0, 0, 0, 0, 1, 1], 6)
    (g,), _ = tokenize_records([SFTRecord(PROMPT, " yes <eos>", id="r1")], neox, add_eos=True)
    assert (g["input_ids"], g["completion_mask"]) == ([3, 4, 5, 6, 4, 7, EOS], [0, 0, 0, 0, 0, 1, 1])


def test_preference_unpaired_ranked_and_prompt_records(neox):
    """Chosen and rejected share the prompt (5 tokens, no EOS inside), each ends with one EOS, trained; a prompt-only
    record (the prompt generation starts from) does not end in EOS. Fails without the fix: yes (DataError; the
    prompt-only record's ids ended [..., 4, EOS])."""
    records = [PreferenceRecord(PROMPT, " yes", " no", id="p"), UnpairedRecord(PROMPT, " no", label=False, id="u"),
               RankedRecord(PROMPT, [" yes", " maybe no"], ranks=[0, 1], id="k"), PromptRecord(PROMPT, id="g")]
    (p, u, k, g), _ = tokenize_records(records, neox)
    assert (p["chosen_input_ids"], p["rejected_input_ids"], p["prompt_length"]) == (
        [3, 4, 5, 6, 4, 7, EOS], [3, 4, 5, 6, 4, 8, EOS], 5)
    assert p["chosen_completion_mask"] == p["rejected_completion_mask"] == [0, 0, 0, 0, 0, 1, 1]
    assert (u["input_ids"], u["completion_mask"]) == ([3, 4, 5, 6, 4, 8, EOS], [0, 0, 0, 0, 0, 1, 1])
    assert k["input_ids"] == [[3, 4, 5, 6, 4, 7, EOS], [3, 4, 5, 6, 4, 9, 8, EOS]]
    assert k["completion_mask"] == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert (g["prompt_input_ids"], g["length"]) == ([3, 4, 5, 6, 4], 5)


def test_chat_template_path_is_unaffected(neox):
    """A chat template writes its own markers and is encoded without special tokens, so the post-processor's EOS is
    never added there: the template's own end of turn is the one EOS (ends_turn: nothing appended)."""
    neox.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q : {{ m['content'] }} {% else %}"
                          "A : {{ m['content'] }} <eos> {% endif %}{% endfor %}{% if add_generation_prompt %}A :"
                          "{% endif %}")
    conv = [{"role": "user", "content": "hi"}]
    (f,), _ = tokenize_records([SFTRecord(conv, [{"role": "assistant", "content": "yes"}], id="c")], neox)
    assert (f["input_ids"], f["completion_mask"]) == ([3, 4, 5, 6, 4, 7, EOS], [0, 0, 0, 0, 0, 1, 1])


def test_batched_backend_path_equals_one_record_at_a_time(neox, monkeypatch):
    """The prefetch encodes through the Rust backend's encode_batch (post-processor included); stripping happens
    after, so its features are those of the wrapper one record at a time (no batch). The backend path is checked to
    have been taken, for the texts with special tokens."""
    taken = []
    real = tk._backend_encode

    def spy(tokenizer, texts, add_special_tokens, offsets=True):
        out = real(tokenizer, texts, add_special_tokens, offsets)
        taken.append((add_special_tokens, out is not None))
        return out

    monkeypatch.setattr(tk, "_backend_encode", spy)
    monkeypatch.setattr(tk, "CHUNK", 3)
    records = [SFTRecord(PROMPT, " yes", id="a"), PreferenceRecord(PROMPT, " yes", " no", id="b"),
               PromptRecord("Q : hi", id="c"), UnpairedRecord("hi :", " maybe", label=True, id="d"),
               RankedRecord(PROMPT, [" no", " yes"], ranks=[0, 1], id="e"), SFTRecord("A", " <eos>", id="f")]
    cfg = TokenizeConfig()
    got, _ = tokenize_records(records, neox, cfg)
    assert (True, True) in taken
    want = [tokenize_record(r, neox, cfg, TokenizeStats()) for r in records]
    assert got == want
    assert want[0]["input_ids"] == [3, 4, 5, 6, 4, 7, EOS] and want[2]["prompt_input_ids"] == [3, 4, 5]
    assert want[5]["input_ids"] == [6, EOS] and want[5]["completion_mask"] == [0, 1]


def test_suffix_is_probed_once_and_again_when_the_post_processor_changes(neox):
    calls = []
    real = type(neox).__call__

    def counted(self, text, *a, **kw):
        calls.append(text)
        return real(self, text, *a, **kw)

    type(neox).__call__ = counted
    try:
        for _ in range(3):
            tokenize_records([SFTRecord(PROMPT, " yes")], neox)
    finally:
        type(neox).__call__ = real
    assert calls.count("a") == 2  # the probe text, with and without special tokens: once
    neox.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", BOS)])
    assert chat.added_suffix(neox) == ()
    (f,), _ = tokenize_records([SFTRecord(PROMPT, " yes")], neox)
    assert f["input_ids"] == [BOS, 3, 4, 5, 6, 4, 7, EOS]
    assert chat.added_suffix(word_tokenizer(None)) == ()


def test_the_tiny_llama_tokenizer_with_add_eos_token(tokenizer):
    """The repo's tiny Llama tokenizer with `add_eos_token = True` (transformers rebuilds its post-processor): SFT and
    preference records tokenize to the ids without the setting, each completion ending with one EOS, and a
    prompt-only record's ids do not end in it. Fails without the fix: yes (prefix DataError)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_eos_token = True
    eos = tok.eos_token_id
    assert tok("Q: hi")["input_ids"][-1] == eos and tokenizer("Q: hi")["input_ids"][-1] != eos
    records = [SFTRecord("Q: hi\nA:", " yes", id="s"), PreferenceRecord("Q: hi\nA:", " yes", " no", id="p"),
               PromptRecord("Q: hi\nA:", id="g")]
    got, _ = tokenize_records(records, tok)
    want, _ = tokenize_records(records, tokenizer)
    assert got == want
    assert got[0]["input_ids"][-1] == eos and got[0]["input_ids"].count(eos) == 1
    assert got[2]["prompt_input_ids"] == tokenizer("Q: hi\nA:")["input_ids"]


def test_generation_prompts_and_reward_scores_read_what_training_read(tokenizer, tiny_dir):
    """Before: with a tokenizer that appends EOS, online / generate prompts ended in EOS (the model asked to continue
    after its end of text), and the reward-model annotator scored `... EOS` even under add_eos=false, where the
    reward trainer now trains without it. Now both leave the appended EOS out: the prompt is the tokenizer's ids
    without the setting, the annotator's ids equal the reward trainer's features. Fails without the fix: yes."""
    import copy

    from alignkit.models.loading import load_model
    from alignkit.online.annotators import RewardModelAnnotator
    from alignkit.online.generation import encode_prompt

    tok = copy.deepcopy(tokenizer)
    tok.add_eos_token = True
    eos, plain = tok.eos_token_id, tokenizer("Q: hi\nA: yes")["input_ids"]
    assert encode_prompt("Q: hi\nA:", tok) == tokenizer("Q: hi\nA:")["input_ids"]
    model = load_model(tiny_dir("llama", classifier=True, num_labels=1), task="classifier")
    for add_eos, want in ((None, plain + [eos]), (True, plain + [eos]), (False, plain)):
        (f,), _ = tokenize_records([SFTRecord("Q: hi\nA:", " yes")], tok, add_eos=add_eos)
        rm = RewardModelAnnotator(model, tok, add_eos=add_eos)
        assert f["input_ids"] == want and rm.encode("Q: hi\nA:", " yes") == (want, "")


def test_reft_generation_prompt_is_the_training_prompt(tokenizer):
    """ReFT (pyreft-style data): with a tokenizer that appends EOS, training's prompt is the tokens before the
    response (the appended EOS comes after it), but `encode_prompts` gave generation `prompt + EOS`, so the last
    position ("l1") intervened on EOS and generation continued after an end of text. Now generation's prompt ids are
    training's `ids[:prompt_length]`. Fails without the fix: yes."""
    import copy

    from alignkit.data.reft_data import encode_prompt_response, encode_prompts

    tok = copy.deepcopy(tokenizer)
    tok.add_eos_token = True
    ids, n = encode_prompt_response(tok, "Question: what?", " Answer: Paris.")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    enc = encode_prompts(tok, ["Question: what?"])
    assert enc["input_ids"][0].tolist() == ids[:n] == tokenizer("Question: what?")["input_ids"]


SEP_VOCAB = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "Q": 4, ":": 5, "hi": 6, "A": 7, "yes": 8, "no": 9}


def sep_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style classifier tokenizer (`[CLS] $A [SEP]`, no EOS token: TRL's distilbert reward models), built over
    SEP_VOCAB: `PROMPT` -> [CLS] 4 5 6 7 5 [SEP]."""
    t = Tokenizer(models.WordLevel(SEP_VOCAB, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                     special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def test_a_classifier_tokenizers_sep_is_kept_in_reward_scores(tiny_dir):
    """Before (this session's EOS strip): any appended suffix was left out, so a `[CLS] $A [SEP]` reward model scored
    [CLS] ... yes without its [SEP] (eos None: add_eos could not add it back), ids it was never trained on. Only an
    appended EOS alone is left out now: the score reads [1, 4, 5, 6, 7, 5, 8, 2], as before this session. Fails
    without the fix: yes ([1, 4, 5, 6, 7, 5, 8])."""
    from alignkit.models.loading import load_model
    from alignkit.online.annotators import RewardModelAnnotator

    tok = sep_tokenizer()
    rm = RewardModelAnnotator(load_model(tiny_dir("llama", classifier=True, num_labels=1), task="classifier"), tok)
    assert rm.encode(PROMPT, " yes") == ([1, 4, 5, 6, 7, 5, 8, 2], "")
    assert tok.eos_token_id is None and chat.added_suffix(tok) == (2,) and chat.appended_eos(tok) == ()


def test_a_classifier_tokenizers_sep_follows_the_completion_as_in_reft_data():
    """One rule for a tokenizer appending a token other than its EOS (`[CLS] $A [SEP]`), as ReFT's
    `encode_prompt_response` (session 26): before, tokenize_records refused every plain-text prompt/completion record
    ("appends ['[SEP]'] (not its EOS alone)": the prompt's [SEP] is no prefix of prompt+completion) while ReFT's data
    trained `[CLS] Q : hi A : | yes [SEP]`, and a prompt-only record (and `encode_prompt`: generate / online / serve)
    ended in the [SEP] that training's prompts never have. Now a prompt leaves out what the tokenizer appends to
    every text, and the full sequence keeps it where the tokenizer puts it, after the completion (what the reward
    model scores: `RewardModelAnnotator.encode` gives the same chosen ids). Fails without the fix: yes (the records
    refused; the prompt-only ids ended in 2)."""
    from alignkit.data.reft_data import encode_prompt_response
    from alignkit.online.generation import encode_prompt

    tok = sep_tokenizer()
    (g,), _ = tokenize_records([PromptRecord(PROMPT, id="g")], tok)
    assert g["prompt_input_ids"] == [1, 4, 5, 6, 7, 5]
    assert encode_prompt(PROMPT, tok) == [1, 4, 5, 6, 7, 5]
    (s, p), _ = tokenize_records([SFTRecord(PROMPT, " yes", id="s"), PreferenceRecord(PROMPT, " yes", " no", id="p")],
                                 tok, add_eos=False)
    assert s["input_ids"] == [1, 4, 5, 6, 7, 5, 8, 2] and s["completion_mask"] == [0] * 6 + [1, 1]
    assert (p["chosen_input_ids"], p["rejected_input_ids"]) == ([1, 4, 5, 6, 7, 5, 8, 2], [1, 4, 5, 6, 7, 5, 9, 2])
    for view in (tok, _SlowView(tok)):  # ReFT's data, both of its paths: the same ids and prompt length
        assert encode_prompt_response(view, PROMPT, " yes", add_eos=False) == (s["input_ids"], 6)
    with pytest.raises(tk.DataError, match="has none \\(eos_token is None\\)"):  # plain text's default add_eos
        tokenize_records([SFTRecord(PROMPT, " yes", id="s")], tok)


def test_a_ptx_document_keeps_the_appended_sep():
    """A pretraining document (`as_ptx_features`' strings) is a whole text, not a prompt: its [SEP] stays where the
    tokenizer puts it (only an appended EOS is left out and added once); `chat.prompt_ids` now leaves any appended
    token out of prompts, so ptx reads the ids itself. Fails without the fix: yes (with the prompt rule alone: no 2)."""
    from alignkit.online.ptx import as_ptx_features

    assert as_ptx_features([PROMPT + " yes"], sep_tokenizer())[0]["input_ids"] == [1, 4, 5, 6, 7, 5, 8, 2]


class _SlowView:
    """The tokenizer read through `encode_prompt_response`'s other path (no offsets: `is_fast` False)."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *a, **kw):
        return self._tok(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_reft_training_ids_follow_add_eos_as_tokenize_records(tokenizer, path):
    """Before: ReFT's `encode_prompt_response` with a tokenizer that appends EOS (tiny Llama, add_eos_token=True)
    kept the appended EOS under add_eos=False, so ReFT trained on an EOS that tokenize_records' features do not have.
    Now the appended EOS is left out first and add_eos alone decides: add_eos=False gives the ids of the tokenizer
    without the setting (no EOS), add_eos=True one EOS; the same prompt length, on the offsets path and the other.
    Fails without the fix: yes (add_eos=False ended in EOS, both paths)."""
    import copy

    from alignkit.data.reft_data import encode_prompt_response

    tok = copy.deepcopy(tokenizer)
    tok.add_eos_token = True
    view = tok if path == "fast" else _SlowView(tok)
    plain = tokenizer("Question: what? Answer: Paris.")["input_ids"]
    n_prompt = len(tokenizer("Question: what?")["input_ids"])
    assert plain[-1] != tok.eos_token_id
    assert encode_prompt_response(view, "Question: what?", " Answer: Paris.", add_eos=False) == (plain, n_prompt)
    assert encode_prompt_response(view, "Question: what?", " Answer: Paris.") == (plain + [tok.eos_token_id], n_prompt)
    (f,), _ = tokenize_records([SFTRecord("Question: what?", " Answer: Paris.")], tok, add_eos=False)
    assert f["input_ids"] == plain


def test_the_appended_eos_is_resolved_once_per_chunk_not_per_encoding(neox, monkeypatch):
    """Before: `_ids` asked `chat.added_suffix` on every encoding with special tokens (2 per SFT record, 3 per
    preference record; ~7 us each, ~20 % of tokenize_records on 20k SFT records). Now `tokenize_records` resolves it
    once per chunk (`_Batch.suffix`): 7 records in chunks of 3 ask 3 times, with the same features. Fails without the
    fix: yes (15 asks: 4 x 2 + 2 x 3 + 1)."""
    calls = []
    real = chat.added_suffix
    monkeypatch.setattr(chat, "added_suffix", lambda tok: calls.append(1) or real(tok))
    monkeypatch.setattr(tk, "CHUNK", 3)
    records = [SFTRecord(PROMPT, " yes", id=f"s{i}") for i in range(4)]
    records += [PreferenceRecord(PROMPT, " yes", " no", id=f"p{i}") for i in range(2)] + [PromptRecord(PROMPT)]
    got, _ = tokenize_records(records, neox)
    assert len(calls) == 3
    assert got[0]["input_ids"] == [3, 4, 5, 6, 4, 7, EOS] and got[4]["rejected_input_ids"] == [3, 4, 5, 6, 4, 8, EOS]
    assert got[6]["prompt_input_ids"] == [3, 4, 5, 6, 4]


def test_serve_text_prompts_are_generates_prompts(tokenizer):
    """Before: `alignkit serve`'s /v1/completions encoded a text prompt with add_special_tokens=True as it came, so with
    a tokenizer that appends EOS (tiny Llama, add_eos_token=True) the served prompt ended in EOS, which `alignkit
    generate` and training's prompts leave out: the model continued from a context it never saw. Now both go through
    `chat.prompt_ids`: the ids of the tokenizer without the setting; add_special_tokens=false as before (nothing
    appended). Fails without the fix: yes (the served ids ended in EOS)."""
    import copy

    from alignkit.online.generation import encode_prompt
    from alignkit.serve.parsing import completion_prompts

    tok = copy.deepcopy(tokenizer)
    tok.add_eos_token = True
    want = tokenizer("Q: hi\nA:")["input_ids"]
    assert want[-1] != tok.eos_token_id and tok("Q: hi\nA:")["input_ids"] == want + [tok.eos_token_id]
    assert completion_prompts({"prompt": ["Q: hi\nA:", "Q: hi\nA:"]}, tok) == [want, want]
    assert encode_prompt("Q: hi\nA:", tok) == want
    bare = tokenizer("Q: hi\nA:", add_special_tokens=False)["input_ids"]
    assert completion_prompts({"prompt": "Q: hi\nA:", "add_special_tokens": False}, tok) == [bare]


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_reft_training_ids_with_an_appended_sep_agree_on_both_paths(path):
    """Session 25 (reviewed, no fix): `encode_prompt_response`'s path without offsets strips any appended suffix from
    the prompt (`added_suffix`) but only an appended EOS from the full sequence (`appended_eos`). With `[CLS] $A
    [SEP]` the prompt [CLS] Q : hi A : is then a prefix of [CLS] Q : hi A : yes [SEP] (the [SEP] kept where the
    tokenizer puts it) and the prompt length is the offsets path's: 6, both paths."""
    from alignkit.data.reft_data import encode_prompt_response

    tok = sep_tokenizer()
    view = tok if path == "fast" else _SlowView(tok)
    assert encode_prompt_response(view, PROMPT, " yes", add_eos=False) == ([1, 4, 5, 6, 7, 5, 8, 2], 6)


def test_reft_generation_prompt_leaves_out_any_appended_token():
    """ReFT trains `[CLS] Q : hi A : | yes [SEP]` with `[CLS] $A [SEP]` (prompt_length 6: the [SEP] follows the
    response), but `encode_prompts` gave generation `[CLS] ... : [SEP]` (as at 851e83a), so the last position ("l1")
    intervened on [SEP] instead of training's last prompt token. Now generation's prompt is training's
    ids[:prompt_length]: [1, 4, 5, 6, 7, 5]. Fails without the fix: yes ([1, 4, 5, 6, 7, 5, 2])."""
    from alignkit.data.reft_data import encode_prompt_response, encode_prompts

    tok = sep_tokenizer()
    ids, n = encode_prompt_response(tok, PROMPT, " yes", add_eos=False)
    assert (ids, n) == ([1, 4, 5, 6, 7, 5, 8, 2], 6)
    assert encode_prompts(tok, [PROMPT])["input_ids"][0].tolist() == [1, 4, 5, 6, 7, 5]


def test_prepare_dataset_resolves_the_appended_eos_once_per_map_batch(neox, monkeypatch):
    """`prepare_dataset` tokenizes each datasets.map batch one record at a time: before, every encoding resolved the
    appended EOS again (`chat.appended_eos`: 2 per record here, 12 for 6 rows); now once per map batch (`records_batch`),
    with the same features: one EOS at the end, the completion and it trained. Fails without the fix: yes (12 calls)."""
    from datasets import Dataset

    from alignkit.data.prepare import prepare_dataset

    calls = []
    real = chat.appended_eos
    monkeypatch.setattr(chat, "appended_eos", lambda tok, *a: calls.append(1) or real(tok, *a))
    rows = [{"prompt": PROMPT, "completion": c} for c in (" yes", " no", " maybe", " yes", " no", " maybe")]
    out, kind = prepare_dataset(Dataset.from_list(rows), neox, ["sft"], TokenizeConfig(max_length=None,
                                                                                        max_prompt_length=None))
    assert kind == "sft" and len(calls) == 1
    ids = {" yes": 7, " no": 8, " maybe": 9}
    assert [r["input_ids"] for r in out] == [[3, 4, 5, 6, 4, ids[c["completion"]], EOS] for c in rows]
    assert [r["completion_mask"] for r in out] == [[0, 0, 0, 0, 0, 1, 1]] * 6
