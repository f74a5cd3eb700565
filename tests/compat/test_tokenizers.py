"""Tokenizer behaviour alignkit relies on (rows K1-K13 of the table in docs/architecture.md)."""

from __future__ import annotations

import json

import transformers

from alignkit.models.loading import load_tokenizer
from alignkit.models.tiny import CHAT_TEMPLATE, build_tiny_tokenizer
from alignkit.trainers.reference import stable_tokenizer_fingerprint

from .guards import check, guard

TF = "transformers"


def test_saved_fast_tokenizer_loads_as_itself(tiny_dir):
    """`load_tokenizer` keeps a generic fast tokenizer generic when tokenizer_config.json declares
    "TokenizersBackend" / "PreTrainedTokenizerFast"; AutoTokenizer would build the architecture's own class
    (for Qwen2 one that adds a token, so ids and the embedding size would no longer match)."""
    where = "alignkit/models/loading.py:load_tokenizer"
    folder = tiny_dir("qwen2")
    declared = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    check(declared in ("TokenizersBackend", "PreTrainedTokenizerFast"), TF, f"save_pretrained now declares "
          f"tokenizer_class={declared!r} for a generic fast tokenizer", where)
    built = build_tiny_tokenizer()
    tok = load_tokenizer(folder)
    text = "Hello! <|im_start|>user\nwhat is 12?<|im_end|>"
    check(len(tok) == len(built) and tok(text)["input_ids"] == built(text)["input_ids"], TF,
          "a saved tiny tokenizer loads back with a different vocabulary or ids", where,
          f"{type(tok).__name__}: len {len(tok)} vs {len(built)}")


def test_chat_template_renders_text(tokenizer):
    where = "alignkit/data/chat.py:chat_template, data/reft_data.py:format_prompt_response"
    msgs = [{"role": "user", "content": "hi"}]
    with guard(TF, "apply_chat_template(tokenize=False, add_generation_prompt=...) changed", where):
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "yo"}], tokenize=False)
    check(tokenizer.chat_template == CHAT_TEMPLATE, TF, "the chat template did not survive save/load", where)
    check(prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", TF,
          "apply_chat_template(tokenize=False, add_generation_prompt=True) no longer returns the rendered text",
          where, repr(prompt))
    check(full == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n", TF,
          "apply_chat_template(tokenize=False) no longer returns the rendered conversation", where, repr(full))


def test_fast_tokenizer_offsets_and_special_ids(tokenizer):
    where = "alignkit/data/reft_data.py:encode_prompt_response, data/tokenize.py"
    text = "Hello world"
    with guard(TF, "tokenizer(..., return_offsets_mapping=True) failed", where):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [tuple(o) for o in enc["offset_mapping"]]
    pieces = "".join(text[a:b] for a, b in spans)
    check(tokenizer.is_fast and spans and pieces == text and spans[-1][1] == len(text), TF,
          "fast-tokenizer offsets are no longer character spans covering the text", where, str(spans))
    check(tokenizer.eos_token_id in tokenizer.all_special_ids and tokenizer.pad_token_id in tokenizer.all_special_ids,
          TF, "all_special_ids no longer lists eos/pad", where)
    check(tokenizer.convert_ids_to_tokens(enc["input_ids"][:1])[0] == "Hello", TF,
          "convert_ids_to_tokens changed", where)


def test_fingerprint_inputs_are_stable(tiny_dir):
    """The reference-log-prob cache key hashes `backend_tokenizer.to_str()`, `special_tokens_map` and the chat
    template: the same tokenizer loaded twice must hash the same."""
    where = "alignkit/trainers/reference.py:stable_tokenizer_fingerprint"
    a, b = load_tokenizer(tiny_dir("llama")), load_tokenizer(tiny_dir("llama"))
    check(hasattr(a, "backend_tokenizer") and isinstance(a.special_tokens_map, dict), TF,
          "fast tokenizers no longer expose backend_tokenizer / special_tokens_map", where)
    check(stable_tokenizer_fingerprint(a) == stable_tokenizer_fingerprint(b), TF, "the same tokenizer loaded twice "
          "fingerprints differently (the reference cache would never hit)", where)
    check(hasattr(transformers, "PreTrainedTokenizerFast"), TF, "transformers.PreTrainedTokenizerFast is gone",
          "alignkit/models/tiny.py:build_tiny_tokenizer, models/loading.py")


def test_backend_encode_batch_equals_the_wrapper(tokenizer):
    """Tokenization takes the ids from the Rust backend's `encode_batch(texts, add_special_tokens=)` when they equal
    the wrapper's `tokenizer(text, add_special_tokens=)` (checked on each batch's first texts): if they drift apart
    the fast path is silently dropped."""
    where = "alignkit/data/tokenize.py:_encode_many"
    texts = ["Hello! How can I help you today?", "<|im_start|>user\nwhat is 12?<|im_end|>\n", " leading space", ""]
    for special in (False, True):
        with guard("tokenizers", "backend_tokenizer.encode_batch(texts, add_special_tokens=...) failed", where):
            fast = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=special)]
        slow = [list(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
        check(fast == slow, "tokenizers", f"the backend's encode_batch ids differ from the transformers wrapper's "
              f"(add_special_tokens={special}): batched tokenization falls back to the slow path", where,
              f"{fast} vs {slow}")


def test_added_tokens_split_the_text_into_independent_pieces(tokenizer):
    """Chat prompt ids are read off the full text's encoding up to the last added token inside the prompt, plus
    the tail re-encoded after that token (`_derive_prompts`). That rests on `tokenizers` splitting the raw text on
    added tokens first and encoding the pieces between them independently, on `Encoding.char_to_token` /
    `token_to_chars` and on the `AddedToken` flags from `get_added_tokens_decoder()`; `encode_batch_fast` must give
    `encode_batch`'s ids."""
    where = "alignkit/data/tokenize.py:_derive_prompts, _anchors, _backend_encode"
    backend = tokenizer.backend_tokenizer
    with guard("tokenizers", "get_added_tokens_decoder() / AddedToken flags changed", where):
        added = {t.content: (i, t.normalized, t.lstrip, t.rstrip, t.single_word)
                 for i, t in backend.get_added_tokens_decoder().items()}
    check(added.get("<|im_start|>", (None,))[1:] == (False, False, False, False), "tokenizers",
          "the tiny tokenizer's <|im_start|> no longer reads as a raw-text added token", where, str(added))
    head, tail = "<|im_start|>user\nhi there<|im_end|>\n", "<|im_start|>assistant\n"
    for full in (head + tail + "ok<|im_end|>\n", head + tail + " a space", head + tail):
        prompt = head + tail
        with guard("tokenizers", "Encoding.char_to_token / token_to_chars failed", where):
            enc = backend.encode_batch([full], add_special_tokens=False)[0]
            j = enc.char_to_token(len(head))
            span = tuple(enc.token_to_chars(j))
        check(span == (len(head), len(head) + len("<|im_start|>")) and enc.ids[j] == added["<|im_start|>"][0],
              "tokenizers", "char_to_token/token_to_chars no longer locate an added token by its characters", where,
              f"{span}, {enc.ids[j]}")
        alone = backend.encode(prompt, add_special_tokens=False).ids
        after = backend.encode(tail, add_special_tokens=False).ids
        check(alone == enc.ids[:j] + after, "tokenizers", "the pieces around an added token are no longer encoded "
              "independently (prompt ids != the full text's ids up to the token + the tail's)", where,
              f"{alone} vs {enc.ids[:j]} + {after}")
    texts = ["Hello! How can I help you today?", head + tail, " leading space", ""]
    with guard("tokenizers", "encode_batch_fast failed", where):
        fast = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    check(fast == [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)], "tokenizers",
          "encode_batch_fast ids differ from encode_batch's", where)


def with_added_ends(tokenizer):
    """A copy of `tokenizer` whose post-processor adds a token before and one after each text (BOS ... EOS)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    return tok


def test_truncation_cuts_the_texts_own_ids_between_the_added_ones(tokenizer):
    """ClassificationReftDataset encodes each text once, whole, and cuts an over-long one itself
    (`TruncationAsTokenizer`): the text's own ids cut to max_length less the tokens the tokenizer adds, on its
    truncation_side, with the added ones (read off a probe) around them. That must be what
    `tokenizer(text, truncation=True, max_length=L)` gives, for a tokenizer adding nothing and one adding BOS + EOS,
    on both sides; where no text token would be left the tokenizer cuts it itself."""
    import copy

    from alignkit.data.reft_data import TruncationAsTokenizer

    where = "alignkit/data/reft_data.py:TruncationAsTokenizer (ClassificationReftDataset)"
    text = "0 1 2 3 4 5 6 7 8 9 Hello world, what is 12?"
    for tok, added in ((copy.deepcopy(tokenizer), 0), (with_added_ends(tokenizer), 2)):
        whole = tok(text)["input_ids"]
        cut = TruncationAsTokenizer(tok)
        check(cut.ends() is not None and len(cut.ends()[0]) + len(cut.ends()[1]) == added, TF, "the ids a tokenizer "
              f"adds around a text can no longer be read off a probe (read {cut.ends()}, {added} expected)", where)
        for side in ("right", "left"):
            tok.truncation_side = side
            for max_length in range(1, len(whole)):
                with guard(TF, "tokenizer(text, truncation=True, max_length=) failed", where):
                    want = tok(text, truncation=True, max_length=max_length)["input_ids"]
                got = cut(text, whole, max_length)
                check(got == want, TF, f"truncation_side={side!r}, max_length={max_length}, {added} added token(s): "
                      f"the tokenizer keeps {want}, the cut {got}", where)
    ends = with_added_ends(tokenizer)("0 1")["input_ids"]
    assert (ends[0], ends[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id) and tokenizer("0 1")["input_ids"] \
        == ends[1:-1]


def test_a_saved_truncation_stays_on_the_backend_until_the_wrapper_runs(tokenizer, tmp_path):
    """A tokenizer.json saved with a truncation setting loads with it on the Rust backend, whose `encode_batch`
    applies it; the wrapper's first call (`set_truncation_and_padding`) clears it. Batched tokenization therefore
    skips the backend while it holds a truncation or padding setting (`_backend_encode`)."""
    import copy

    where = "alignkit/data/tokenize.py:_backend_encode"
    saved = copy.deepcopy(tokenizer)
    saved.backend_tokenizer.enable_truncation(max_length=4)
    saved.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "one two three four five six seven"
    with guard("tokenizers", "backend_tokenizer.truncation / encode_batch changed", where):
        held = tok.backend_tokenizer.truncation
        cut = tok.backend_tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
    check(held is not None and held.get("max_length") == 4 and len(cut) == 4, "tokenizers", "a saved truncation "
          "setting no longer reaches the loaded backend (or its encode_batch ignores it)", where, f"{held} {cut}")
    full = tok(text, add_special_tokens=False)["input_ids"]
    after = tok.backend_tokenizer.truncation
    check(len(full) > 4 and after is None, TF, "the wrapper no longer clears the backend's saved truncation on a call "
          "without truncation", where, f"{len(full)} {after}")


def test_post_processor_state_keys_the_suffix_probe(tokenizer):
    """`chat.added_suffix` probes once per tokenizer, keyed by `backend_tokenizer.post_processor.__getstate__()` (the
    processor as JSON) and `add_eos_token`: setting `add_eos_token` must rebuild the backend's post-processor (so
    encode appends EOS, wrapper and backend alike) and change that state, or a changed tokenizer keeps its old
    probe."""
    import copy

    where = "alignkit/data/chat.py:added_suffix"
    tok = copy.deepcopy(tokenizer)
    with guard("tokenizers", "post_processor.__getstate__() failed", where):
        before = tok.backend_tokenizer.post_processor.__getstate__()
    tok.add_eos_token = True
    eos = tok.eos_token_id
    with guard(TF, "setting add_eos_token failed", where):
        after = tok.backend_tokenizer.post_processor.__getstate__()
        wrapper = list(tok("hi there", add_special_tokens=True)["input_ids"])
        backend = tok.backend_tokenizer.encode_batch(["hi there"], add_special_tokens=True)[0].ids
        bare = list(tok("hi there", add_special_tokens=False)["input_ids"])
    check(before != after, "tokenizers", "the post-processor's state did not change with add_eos_token", where)
    check(wrapper == backend and wrapper[-1] == eos and bare[-1:] != [eos], TF, "add_eos_token=True no longer makes "
          "encode (with special tokens only) append EOS on the backend", where, f"{wrapper} / {backend} / {bare}")


def test_split_special_tokens_is_a_wrapper_setting_the_backend_json_lacks(tiny_dir):
    """K12: `split_special_tokens` (a load option) is the wrapper's attribute of that name, absent from
    `backend_tokenizer.to_str()`, and it changes the ids of a text quoting a special token (the token vs ordinary
    pieces), so the cache keys read the attribute; `padding_side` changes no unpadded ids. K13: the backend keeps the
    setting it encodes by as `encode_special_tokens`, which the wrapper sets on each call: one set after loading
    reaches the backend only then, so `_backend_encode` skips a backend whose flag lags the wrapper's."""
    from transformers import AutoTokenizer

    keys = "alignkit/data/tokenize_cache.py:tokenizer_fingerprint, trainers/reference.py:stable_tokenizer_fingerprint"
    folder = tiny_dir("llama")
    plain, split = (AutoTokenizer.from_pretrained(folder, split_special_tokens=s) for s in (False, True))
    text = "say <|im_start|> aloud"
    a, b = (list(t(text, add_special_tokens=False)["input_ids"]) for t in (plain, split))
    im_start = plain.convert_tokens_to_ids("<|im_start|>")
    check(split.split_special_tokens is True and plain.split_special_tokens is False, TF,
          "the load option split_special_tokens is no longer kept as the wrapper's attribute of that name", keys)
    check(im_start in a and im_start not in b, TF, "split_special_tokens=True no longer encodes a special token in "
          "the text as ordinary pieces", keys, f"{a} / {b}")
    check(plain.backend_tokenizer.to_str() == split.backend_tokenizer.to_str(), TF, "the backend JSON now holds "
          "split_special_tokens (the keys still read the attribute: harmless, update K12)", keys)
    plain.padding_side = "left"
    check(list(plain(text, add_special_tokens=False)["input_ids"]) == a, TF, "padding_side changes unpadded ids", keys)
    where = "alignkit/data/tokenize.py:_backend_encode"
    backend = plain.backend_tokenizer
    check(getattr(backend, "encode_special_tokens", None) is False, "tokenizers", "the backend no longer exposes "
          "encode_special_tokens", where)
    plain.split_special_tokens = True  # set after loading: the backend learns it on the wrapper's next call
    lagging = backend.encode_special_tokens
    plain(text, add_special_tokens=False)
    check(lagging is False and backend.encode_special_tokens is True, TF, "the wrapper no longer syncs the backend's "
          "encode_special_tokens on each call (or now does when the attribute is set)", where)
