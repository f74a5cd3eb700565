"""Tokenization: token-space prompt/completion boundary, EOS switch, truncation policy, counted drops."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from alignkit.data import (DataError, PreferenceRecord, PromptRecord, RankedRecord, SFTRecord, UnpairedRecord,
                           tokenize_records)

CONV = [{"role": "user", "content": "Hi"}]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_text_sft_appends_eos(tokenizer):
    (f,), stats = tokenize_records([SFTRecord("2+2=", " 4", weight=0.5, id="r1")], tokenizer)
    p = ids(tokenizer, "2+2=")
    assert f["input_ids"] == ids(tokenizer, "2+2= 4") + [tokenizer.eos_token_id]
    assert f["completion_mask"] == [0] * len(p) + [1] * (len(f["input_ids"]) - len(p))
    assert (f["prompt_length"], f["length"], f["weight"], f["id"]) == (len(p), len(f["input_ids"]), 0.5, "r1")
    assert stats.kept == stats.total == 1
    (g,), _ = tokenize_records([SFTRecord("2+2=", " 4")], tokenizer, add_eos=False)
    assert g["input_ids"] == ids(tokenizer, "2+2= 4")


@pytest.mark.parametrize("add_eos", [True, None])
def test_an_eos_to_append_with_a_tokenizer_that_has_none_is_an_error(tokenizer, add_eos):
    """add_eos=true (or a plain-text record, which gets EOS by default) with a tokenizer whose eos_token is None
    appended nothing, without a word: the model never learned to stop. Now a DataError naming the record, the
    setting and the fix; add_eos=false still trains without one. Checked to fail without the fix (ids came back
    without EOS)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(DataError, match=r"^r1: data.add_eos=true ends each completion with the tokenizer's EOS token"
                       if add_eos else r"^r1: the plain-text format \(data.add_eos unset\) ends each completion"):
        tokenize_records([SFTRecord("2+2=", " 4", id="r1")], tok, add_eos=add_eos)
    (f,), _ = tokenize_records([SFTRecord("2+2=", " 4", id="r1")], tok, add_eos=False)
    assert f["input_ids"] == ids(tokenizer, "2+2= 4")


def test_chat_template_boundary_and_eos_switch(tokenizer):
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    full = prompt + "Hello<|im_end|>\n"
    (f,), _ = tokenize_records([SFTRecord(CONV, "Hello")], tokenizer)
    assert f["input_ids"] == ids(tokenizer, full)  # the template ends the turn: no EOS added
    assert f["prompt_length"] == len(ids(tokenizer, prompt))
    assert sum(f["completion_mask"]) == len(ids(tokenizer, full)) - len(ids(tokenizer, prompt))
    (g,), _ = tokenize_records([SFTRecord(CONV, "Hello")], tokenizer, add_eos=True)
    assert g["input_ids"] == ids(tokenizer, full) + [tokenizer.eos_token_id]


def test_template_without_a_generation_prompt_is_an_error(tokenizer):
    """A template that writes `<|im_start|>assistant\n` before assistant turns but ignores add_generation_prompt:
    before, the header was silently trained as part of every completion (and missing from generation prompts).
    Now one DataError naming the header and the fix; a template with no header at all (`[INST] q [/INST] a`) and
    one with the generation prompt are fine."""
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(DataError, match=r"writes '<\|im_start\|>assistant\\n' before an assistant turn but nothing "
                                        r"for add_generation_prompt=True.*\{% if add_generation_prompt %\}"):
        tokenize_records([SFTRecord(CONV, "Hello", id="r1")], tok)
    with pytest.raises(DataError, match="add_generation_prompt"):
        tokenize_records([PromptRecord(CONV, id="p1")], tok)  # generation prompts too
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                         "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    (f,), _ = tokenize_records([SFTRecord(CONV, "Hello", id="r2")], tok)
    assert tok.decode([i for i, m in zip(f["input_ids"], f["completion_mask"]) if m]).strip() == "Hello</s>"


def test_oasst_format(tokenizer):
    eos = tokenizer.eos_token
    (f,), _ = tokenize_records([SFTRecord(CONV, "Hello")], tokenizer, formatter="oasst")
    assert f["input_ids"] == ids(tokenizer, f"<|prompter|>Hi{eos}<|assistant|>Hello{eos}")
    assert f["prompt_length"] == len(ids(tokenizer, f"<|prompter|>Hi{eos}<|assistant|>"))


def test_oasst_with_split_special_tokens_is_refused(tokenizer, tiny_dir):
    """Before: a tokenizer loaded with split_special_tokens=True passed under formatter 'oasst', which encoded its
    <|prompter|> / <|assistant|> and the EOS as ordinary text pieces (as chat-template's ChatML markers, refused
    there): records trained on a format the model never reads, silently. Now one line naming the setting (fails
    without the fix: yes, seen)."""
    from transformers import AutoTokenizer

    split = AutoTokenizer.from_pretrained(tiny_dir("llama"), split_special_tokens=True)
    split.add_special_tokens({"additional_special_tokens": ["<|prompter|>", "<|assistant|>"]})
    assert tokenizer.convert_tokens_to_ids("<|prompter|>") not in split(
        "<|prompter|>Hi", add_special_tokens=False)["input_ids"]  # what would have been trained: the marker split
    with pytest.raises(DataError, match=r"^o: formatter 'oasst': .* split_special_tokens=True, which encodes the "
                                        r"format's own '<\|prompter\|>' / '<\|assistant\|>'"):
        tokenize_records([SFTRecord(CONV, "Hello", id="o")], split, formatter="oasst")
    (f,), _ = tokenize_records([SFTRecord(CONV, "Hello")], tokenizer, formatter="oasst")  # not split: as before
    assert tokenizer.convert_tokens_to_ids("<|prompter|>") in f["input_ids"]


def test_prompt_not_a_token_prefix_is_an_error(tokenizer):
    # "3 " + "4": alone the prompt ends with a lone-space token, joined " 4" is one token
    with pytest.raises(DataError, match=r"bad-1: the tokenized prompt is not a prefix .* differ at token 4"):
        tokenize_records([SFTRecord("0 1 2 3 ", "4", id="bad-1")], tokenizer)


def test_truncation_policy(tokenizer):
    prompt, completion = "0 1 2 3 4 5 6 7 8 9", " 10 11 12 13 14 15 16 17 18 19 20"
    p = ids(tokenizer, prompt)
    c = ids(tokenizer, prompt + completion)[len(p):] + [tokenizer.eos_token_id]
    assert len(p) == 10 and len(c) == 12
    (f,), stats = tokenize_records([SFTRecord(prompt, completion)], tokenizer, max_prompt_length=4, max_length=9)
    assert f["input_ids"] == p[-4:] + c[:5]  # prompt keeps its end, completion its start
    assert f["completion_mask"] == [0] * 4 + [1] * 5
    assert (stats.prompt_truncated, stats.completion_truncated) == (1, 1)
    (g,), stats = tokenize_records([SFTRecord(prompt, completion)], tokenizer, max_prompt_length=None, max_length=100)
    assert g["input_ids"] == p + c and stats.prompt_truncated == stats.completion_truncated == 0


def test_unfit_records_are_counted_and_logged(tokenizer, caplog):
    recs = [SFTRecord("0 1 2 3 4 5 6 7 8 9", " 10", id="long"), SFTRecord("2+2=", " 4", id="ok"),
            PreferenceRecord("0 1 2 3 4 5 6 7 8 9", " 10", " 11", id="long-pair")]
    with caplog.at_level(logging.WARNING):
        out, stats = tokenize_records(recs, tokenizer, max_prompt_length=None, max_length=8)
    assert [f["id"] for f in out] == ["ok"]
    assert stats.dropped == {"prompt_too_long": 2} and stats.dropped_ids["prompt_too_long"] == ["long", "long-pair"]
    assert "dropped 2 (prompt_too_long)" in caplog.text and "long-pair" in caplog.text


def test_preference_shares_the_prompt(tokenizer):
    (f,), _ = tokenize_records([PreferenceRecord(CONV, "Hello", "Hi there", margin=1.5)], tokenizer)
    n = f["prompt_length"]
    assert f["chosen_input_ids"][:n] == f["rejected_input_ids"][:n] == ids(
        tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert f["rejected_input_ids"] == ids(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                                     "Hi there<|im_end|>\n")
    assert f["chosen_completion_mask"] == [0] * n + [1] * (len(f["chosen_input_ids"]) - n)
    assert f["length"] == max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) and f["margin"] == 1.5


def test_ranked_unpaired_prompt_outputs(tokenizer):
    (r,), _ = tokenize_records([RankedRecord("2+2=", [" 4", " 5", " 22"], ranks=[0, 1, 1])], tokenizer)
    assert len(r["input_ids"]) == 3 and r["ranks"] == [0, 1, 1]
    assert r["input_ids"][2] == ids(tokenizer, "2+2= 22") + [tokenizer.eos_token_id]
    assert r["length"] == sum(len(x) for x in r["input_ids"])
    (u,), _ = tokenize_records([UnpairedRecord("2+2=", " 5", False)], tokenizer)
    assert u["label"] is False and u["input_ids"] == ids(tokenizer, "2+2= 5") + [tokenizer.eos_token_id]
    (q,), stats = tokenize_records([PromptRecord("0 1 2 3 4 5 6 7 8 9")], tokenizer, max_prompt_length=3)
    assert q["prompt_input_ids"] == ids(tokenizer, "0 1 2 3 4 5 6 7 8 9")[-3:] and stats.prompt_truncated == 1
    assert q["prompt"] == "0 1 2 3 4 5 6 7 8 9"


def test_oasst_sample_tokenizes_with_chat_template(tokenizer):
    trees = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "oasst" / "oasst_en_trees_sample.jsonl"
    if not trees.exists():
        pytest.skip(f"OASST samples not found at {trees} (CI puts shared/ beside the repo clone)")
    from alignkit.data import load_records
    recs = load_records(trees, kind="preference")
    out, stats = tokenize_records(recs, tokenizer, max_length=512, max_prompt_length=256)
    assert stats.total == len(recs) and stats.kept + sum(stats.dropped.values()) == len(recs)
    assert all(len(f["chosen_input_ids"]) <= 512 and len(f["rejected_input_ids"]) <= 512 for f in out)


def test_a_chat_template_refusing_a_record_is_a_data_error_naming_it(tokenizer):
    """A template's own refusal (`raise_exception`: Gemma's 'System role not supported', Llama-2's alternating
    roles) escaped as jinja2's TemplateError: the CLI printed 'unexpected error ... please report it' (exit 1) and
    named no record. Now a DataError naming the record, the template's reason and the fix, with or without the
    direct renderer (a conversation without a system message still works)."""
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tokenizer.chat_template)
    system = [{"role": "system", "content": "Be brief."}] + CONV
    ok = SFTRecord(CONV, "Hello", id="ok.jsonl:1")
    for recs in ([SFTRecord(system, "Hello", id="data.jsonl:2")], [ok, SFTRecord(system, "Hello", id="data.jsonl:2")]):
        with pytest.raises(DataError, match=r"^data\.jsonl:2: formatter 'chat-template': the chat template of .* "
                                            r"refuses this conversation \(System role not supported\); .*first user"):
            tokenize_records(recs, tok)
    with pytest.raises(DataError, match=r"^p:1: .*System role not supported"):
        tokenize_records([PromptRecord(system, id="p:1")], tok)  # generation prompts too
    (f,), _ = tokenize_records([ok], tok)
    assert f["input_ids"] == ids(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")


def test_a_system_message_the_template_drops_is_counted_and_warned(tokenizer, caplog):
    """A chat template that renders only user and assistant turns (Gemma-like, here with `continue` on system)
    dropped a record's system message without a word: the model never read the instruction the data gave it. Now
    the records are kept (the template's choice, the same at inference) and counted, with one warning naming
    them and the fix; a template that renders the system message (the tiny ChatML one) counts nothing."""
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    system = [{"role": "system", "content": "Answer in French."}] + CONV
    recs = [SFTRecord(system, "Bonjour", id="d.jsonl:1"), SFTRecord(CONV, "Hello", id="d.jsonl:2"),
            PreferenceRecord(system, "Bonjour", "Hello", id="d.jsonl:3"), PromptRecord(system, id="d.jsonl:4")]
    with caplog.at_level(logging.WARNING):
        out, stats = tokenize_records(recs, tok)
    assert len(out) == 4 and out[0]["input_ids"] == ids(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                                             "Bonjour<|im_end|>\n")  # rendered without it
    assert stats.system_unrendered == 3 and stats.system_unrendered_ids == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:4"]
    assert "3 record(s) have a system message the formatter" in caplog.text and "first user message" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, stats = tokenize_records(recs, tokenizer)
    assert stats.system_unrendered == 0 and not caplog.text


def test_a_tool_message_the_template_drops_is_counted_and_warned(tokenizer, caplog):
    """A tool's result (role "tool": a `messages` row's, or ShareGPT's tool / observation speaker) that a chat template
    renders no branch for (Phi-3-like: `if user ... elif assistant`) was dropped without a word, the answer trained
    after a result the model never read. Now counted and warned like a system message; the tiny ChatML template and
    a template writing the result JSON-escaped (Llama 3.1's `tojson`) count nothing."""
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    body = "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    tail = "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tool = [*CONV, {"role": "assistant", "content": "Calling."}, {"role": "tool", "content": "Sunny,\n21C"},
            {"role": "user", "content": "So?"}]
    recs = [SFTRecord(tool, "Sunny.", id="d.jsonl:1"), SFTRecord(CONV, "Hello", id="d.jsonl:2")]
    tok.chat_template = "{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}" + body + "{% endif %}" + tail
    with caplog.at_level(logging.WARNING):
        out, stats = tokenize_records(recs, tok)
    assert "Sunny,\n21C" not in tok.decode(out[0]["input_ids"])  # dropped by the template
    assert "1 record(s) have a tool message the formatter" in caplog.text
    assert (stats.system_unrendered, stats.system_unrendered_ids, stats.unrendered_roles) == (1, ["d.jsonl:1"], ["tool"])
    caplog.clear()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>tool\n{{ m['content'] | tojson }}"
                         "<|im_end|>\n{% else %}" + body + "{% endif %}" + tail)
    with caplog.at_level(logging.WARNING):
        _, stats = tokenize_records(recs, tok)
        _, plain = tokenize_records(recs, tokenizer)
    assert stats.system_unrendered == plain.system_unrendered == 0 and not caplog.text


@pytest.mark.parametrize("key, value", [("max_prompt_length", 0), ("max_prompt_length", -2), ("max_length", 0),
                                        ("max_length", 2.5)])
def test_a_length_limit_below_one_is_refused_naming_the_key(tokenizer, key, value):
    """max_prompt_length=0 kept `prompt_ids[len - 0:]`, no prompt token: every completion trained with no prompt
    and generation prompts were empty, exit 0 (the CLI's bounds refuse it; TokenizeConfig and the trainers' keyword
    did not). Now a DataError naming the key, from TokenizeConfig itself (so a trainer refuses when built)."""
    from alignkit.data import TokenizeConfig
    with pytest.raises(DataError, match=rf"data\.{key} \(TokenizeConfig\.{key}.*>= 1, or None.*got {value}"):
        tokenize_records([SFTRecord("0 1 2 3", " 4"), PromptRecord("0 1 2 3")], tokenizer, **{key: value})
    with pytest.raises(DataError, match=rf"data\.{key}"):
        TokenizeConfig(**{key: value})
    (f, p), _ = tokenize_records([SFTRecord("0 1 2 3", " 4"), PromptRecord("0 1 2 3")], tokenizer,
                                 max_prompt_length=1, max_length=None)  # the smallest limit keeps one token
    assert p["prompt_input_ids"] == ids(tokenizer, "0 1 2 3")[-1:] and f["prompt_length"] == 1


def test_prompts_plain_in_some_records_and_conversations_in_others_are_warned(tokenizer, caplog):
    """With data.formatter=auto, a file mixing plain-text prompts and conversations was trained in two formats
    (verbatim text for some rows, the chat template for the others) without a word. Now one warning with the
    counts, the first record of each and the fix; one form alone, or an explicit formatter, says nothing."""
    mixed = [SFTRecord("Hi", " Hello", id="m.jsonl:1"), SFTRecord(CONV, "Hello", id="m.jsonl:2"),
             SFTRecord(CONV, "Hi", id="m.jsonl:3")]
    with caplog.at_level(logging.WARNING):
        out, _ = tokenize_records(mixed, tokenizer)
    assert out[0]["input_ids"] == ids(tokenizer, "Hi Hello") + [tokenizer.eos_token_id]  # still trained as before
    assert ("formats these records two ways: 2 as 'chat-template' (e.g. m.jsonl:2); 1 as 'plain' (e.g. m.jsonl:1)"
            in caplog.text and "data.formatter=chat-template" in caplog.text)
    for recs, kw in ((mixed[1:], {}), (mixed, {"formatter": "chat-template"})):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            tokenize_records(recs, tokenizer, **kw)
        assert "two ways" not in caplog.text


def test_most_prompts_cut_by_max_prompt_length_are_warned(tokenizer, caplog, monkeypatch):
    """data.max_prompt_length (512 by default; TRL's SFT and DPO have none) cut the start of most prompts with only an
    info line among the counts, while cut completions were warned; multi-turn SFT lost its first turns silently. Now
    a warning when more than half of the records lose the start of their prompt, as for completions."""
    from alignkit.cli.data import tokenize
    from alignkit.settings.sections import DataSettings

    monkeypatch.setenv("ALIGNKIT_CACHE", "off")
    long_prompt = " ".join(["word"] * 12)  # 12 words: more than 4 tokens whatever the tokenizer merges
    records = [SFTRecord(long_prompt, " yes", id="a"), SFTRecord(long_prompt + " again", " no", id="b"),
               SFTRecord("hi", " ok", id="c")]
    said = lambda: [r.getMessage() for r in caplog.records if "lose the start of their prompt" in r.getMessage()]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="alignkit.cli.data"):
        tokenize(records, tokenizer, DataSettings(max_length=64, max_prompt_length=4), "data.path")
    assert said() == ["data.path: 2 of 3 record(s) lose the start of their prompt to data.max_prompt_length=4 (each "
                      "keeps its last tokens, so the model trains without the beginning of the conversation: system "
                      "message, first turns; TRL's SFT and DPO have no prompt limit); raise data.max_prompt_length, or "
                      "set it to null to cut only at data.max_length"], said()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignkit.cli.data"):
        tokenize(records[1:], tokenizer, DataSettings(max_length=64, max_prompt_length=4), "data.path")  # 1 of 2
        tokenize(records, tokenizer, DataSettings(max_length=64, max_prompt_length=None), "data.path")
    assert said() == []


PARTS_ONLY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
                       "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_renders_content_only_as_parts_is_refused(tokenizer, monkeypatch):
    """A multimodal-style template reads message['content'] as a list of parts; given alignkit's string contents it
    iterates characters, finds no text part and renders every message empty (hand-checked below), and training went
    on with prompts and completions of template markers only. Now a DataError naming the record and the fix."""
    from alignkit.data import chat

    monkeypatch.setattr(tokenizer, "chat_template", PARTS_ONLY_TEMPLATE)
    monkeypatch.setattr(chat, "_CHECKED_TEMPLATES", set())
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == (
        "<|im_start|>user\n<|im_end|>\n")
    with pytest.raises(DataError, match=r"^r-1: formatter 'chat-template': the chat template of the tokenizer .* "
                                        r"renders a message's content only as a list of parts .* rendered empty; make "
                                        r"the template take string content too"):
        tokenize_records([SFTRecord([{"role": "user", "content": "Hi"}], "Hello", id="r-1")], tokenizer)


def test_a_record_dropped_for_its_prompt_is_not_also_counted_as_a_cut_prompt(tokenizer):
    """max_prompt_length=4 >= max_length=4: the ten-token prompt is cut to 4 tokens and leaves no room, so the
    record is dropped (prompt_too_long); it was also counted as a kept record whose prompt was cut (1 of 1 cut while
    0 were kept), which the ReFT warning about cut prompts then quoted."""
    (kept,), stats = tokenize_records([SFTRecord("0 1 2 3 4 5 6 7 8 9", " 10", id="fits")], tokenizer,
                                      max_prompt_length=4, max_length=6)
    assert kept["id"] == "fits" and (stats.prompt_truncated, stats.prompt_truncated_ids) == (1, ["fits"])
    out, stats = tokenize_records([SFTRecord("0 1 2 3 4 5 6 7 8 9", " 10", id="long")], tokenizer,
                                  max_prompt_length=4, max_length=4)
    assert out == [] and stats.dropped == {"prompt_too_long": 1}
    assert (stats.prompt_truncated, stats.prompt_truncated_ids) == (0, [])


@pytest.mark.parametrize("where", ["prompt", "completion"])
def test_text_formatted_already_is_not_templated_twice(tokenizer, where):
    """A prompt (or completion) exported after apply_chat_template, given to the chat-template formatter, was
    rendered as ONE user turn holding the whole formatted conversation: templated twice, the model trained on chat
    markers inside a turn. Now a DataError naming the record, the marker and the fix (data.formatter=plain takes
    such text as it is). A marker typed alone (a user asking about <|im_end|>) is still text. Checked to fail without
    the fix."""
    pre = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    prompt, completion = (pre, "Hello") if where == "prompt" else ("Hi", "<|im_start|>assistant\nHello")
    marker = "<|im_start|>user" if where == "prompt" else "<|im_start|>assistant"
    with pytest.raises(DataError, match=rf"^r1: formatter 'chat-template': message \d \(a '(user|assistant)' turn\) "
                                        rf"holds '{re.escape(marker)}', which the chat template .* writes to open a "
                                        rf"turn, .*data.formatter=plain"):
        tokenize_records([SFTRecord(prompt, completion, id="r1")], tokenizer, formatter="chat-template")
    (f,), _ = tokenize_records([SFTRecord(pre, "Hello<|im_end|>\n", id="r2")], tokenizer, formatter="plain")
    assert f["input_ids"][:len(ids(tokenizer, pre))] == ids(tokenizer, pre)
    typed = [{"role": "user", "content": "What does <|im_end|> do?"}]
    (g,), _ = tokenize_records([SFTRecord(typed, "It ends a turn.", id="r3")], tokenizer)
    assert g["input_ids"] == ids(tokenizer, tokenizer.apply_chat_template(
        typed + [{"role": "assistant", "content": "It ends a turn."}], tokenize=False))


def test_plain_text_that_starts_with_bos_is_not_given_a_second_one(tokenizer):
    """Plain text is tokenized with the tokenizer's special tokens; a prompt that starts with the BOS token itself
    (Llama-style exports: '<s>[INST] ...') was read with two BOS tokens, without a word. Now a DataError naming the
    record and the fix; a tokenizer that adds no BOS reads such text as it is. Checked to fail without the fix (ids
    began [bos, bos, ...])."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos, bos_id = tok.bos_token, tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                              special_tokens=[(bos, bos_id)])
    assert tok("x")["input_ids"][0] == bos_id
    for record in (SFTRecord(f"{bos}Q:", " A", id="r1"), PromptRecord(f"{bos}Q:", id="r1")):
        with pytest.raises(DataError, match=rf"^r1: formatter 'plain': the prompt starts with '{re.escape(bos)}', "
                                            rf"the BOS token, .* adds its own BOS .*remove the leading"):
            tokenize_records([record], tok)
    (f,), _ = tokenize_records([SFTRecord(f"{bos}Q:", " A", id="r2")], tokenizer)  # adds no BOS: text as it is
    assert f["input_ids"].count(bos_id) == 1 and tokenizer("x")["input_ids"][0] != bos_id


def test_a_tokenizer_whose_bos_is_its_appended_eos_reads_a_leading_bos_once(tokenizer):
    """GPT-NeoX / Pythia: BOS = EOS, a post-processor that appends it and adds no BOS. A prompt starting with that
    token is read with one BOS (ids [bos, ...]), yet it was refused because the BOS id was anywhere in tokenizer("")
    (checked to fail before the fix). Under split_special_tokens the text's BOS is read as words: no second BOS
    either. A tokenizer that adds its BOS is still refused, and probed once for many records."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    tok.bos_token = tok.eos_token
    eos, eid = tok.eos_token, tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                              special_tokens=[(eos, eid)])
    assert tok("")["input_ids"] == [eid] and tok(f"{eos}Q:")["input_ids"][:2].count(eid) == 1
    (f,), _ = tokenize_records([PromptRecord(f"{eos}Q:", id="r1")], tok)
    assert f["prompt_input_ids"][0] == eid and f["prompt_input_ids"][1] != eid

    adds = copy.deepcopy(tokenizer)
    bos, bos_id = adds.bos_token, adds.bos_token_id
    adds.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                               special_tokens=[(bos, bos_id)])
    split = copy.deepcopy(adds)
    split.split_special_tokens = True
    assert split(f"{bos}Q:")["input_ids"].count(bos_id) == 1
    tokenize_records([SFTRecord(f"{bos}Q:", " A", id="r1")], split)

    calls = []
    real = type(adds).__call__

    def counted(self, text, *a, **kw):
        calls.append(text)
        return real(self, text, *a, **kw)

    type(adds).__call__ = counted
    try:
        for i in range(3):
            with pytest.raises(DataError, match=rf"^r{i}: formatter 'plain': the prompt starts with"):
                tokenize_records([SFTRecord(f"{bos}Q:", " A", id=f"r{i}")], adds)
    finally:
        type(adds).__call__ = real
    assert calls.count(f"{bos}x") == 1


def test_a_conversation_quoting_a_turn_marker_is_kept_and_warned_of(tokenizer, tiny_dir, monkeypatch, caplog):
    """A user message asking about ChatML ("what does <|im_start|>user mean?") was refused as "formatted already",
    though a conversation's messages are text we template (a false refusal: fails without the fix, seen); a quoted
    <|im_end|> passed without a word, its ids the special token itself. Now both are kept, with the ids the template's
    rendering tokenizes to (the token, where the text was meant) and ONE warning per token naming the first record;
    a plain-text prompt formatted already is still refused (test above). A tokenizer loaded with
    split_special_tokens=True is refused under chat-template: it split the template's own markers too (no
    <|im_start|> id in any record, silently)."""
    import alignkit.data.tokenize as tk
    from transformers import AutoTokenizer

    monkeypatch.setattr(tk, "_QUOTED_SAID", set())
    asked = [{"role": "user", "content": "What does <|im_start|>user mean in ChatML?"}]
    answer = [{"role": "assistant", "content": "It opens a user turn; <|im_end|> closes it."}]
    records = [SFTRecord(asked, answer, id=f"q{i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="alignkit.data.tokenize"):
        feats, _ = tokenize_records(records, tokenizer)
    want = ids(tokenizer, tokenizer.apply_chat_template(asked + answer, tokenize=False))
    im_start, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert [f["input_ids"] for f in feats] == [want] * 3
    assert want.count(im_start) == 3 and want.count(im_end) == 3  # 2 + 1 quoted, 2 + 1 quoted
    said = [r.getMessage() for r in caplog.records if "reads as the special token" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("q0: a message quotes '<|im_end|>' / '<|im_start|>', which ")

    split = AutoTokenizer.from_pretrained(tiny_dir("llama"), split_special_tokens=True)
    with pytest.raises(DataError, match=r"^s: formatter 'chat-template': .* split_special_tokens=True, which encodes "
                                        r"the chat template's own '<\|im_start\|>user' as ordinary text pieces"):
        tokenize_records([SFTRecord([{"role": "user", "content": "Hi"}], "Hello", id="s")], split)
    (g,), _ = tokenize_records([SFTRecord("Say <|im_start|> aloud.", " Done.", id="p")], split)  # plain: as asked
    assert im_start not in g["input_ids"]
