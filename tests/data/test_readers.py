"""TRL-style column readers, source formats (JSONL, JSON, Parquet, Dataset, save_to_disk) and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkit.data import (READERS, DataError, PreferenceRecord, PromptRecord, RankedRecord, SFTRecord,
                           UnpairedRecord, load_records)

CONV_P = [{"role": "user", "content": "Hi"}]
ROWS = {
    "messages": ({"messages": CONV_P + [{"role": "assistant", "content": "Hello"}]},
                 SFTRecord(CONV_P, "Hello")),
    "prompt-completion": ({"prompt": "2+2=", "completion": " 4", "weight": 0.5}, SFTRecord("2+2=", " 4", weight=0.5)),
    "preference": ({"prompt": CONV_P, "chosen": [{"role": "assistant", "content": "Hello"}],
                    "rejected": [{"role": "assistant", "content": "Go away"}], "margin": 2},
                   PreferenceRecord(CONV_P, "Hello", "Go away", margin=2.0)),
    "preference-implicit": ({"chosen": "The answer is 4", "rejected": "The answer is 5"},
                            PreferenceRecord("The answer is", " 4", " 5")),
    "unpaired": ({"prompt": "Q", "completion": " A", "label": 0}, UnpairedRecord("Q", " A", False)),
    "ranked": ({"prompt": "Q", "responses": [" a", " b", " c"], "ranks": [0, 0, 2]},
               RankedRecord("Q", [" a", " b", " c"], ranks=[0, 0, 2])),
    "prompt": ({"prompt": "Tell me a joke"}, PromptRecord("Tell me a joke")),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", list(ROWS))
def test_column_conventions_detected(tmp_path, name):
    row, expected = ROWS[name]
    f = write_jsonl(tmp_path / "d.jsonl", [row, row])
    recs = load_records(f)
    assert recs == [expected, expected]
    assert recs[1].id == f"{f}:2"
    assert READERS[name].detect(row)


def test_implicit_conversational_prompt():
    chosen = CONV_P + [{"role": "assistant", "content": "Hello"}]
    rejected = CONV_P + [{"role": "assistant", "content": "Bye"}]
    (r,) = load_records([{"chosen": chosen, "rejected": rejected}])
    assert r.prompt == CONV_P and r.chosen == chosen[1:] and r.rejected == rejected[1:]
    (r,) = load_records([{"chosen": "Q: yes", "rejected": "Q: no"}])
    assert (r.prompt, r.chosen, r.rejected) == ("Q:", " yes", " no")


def test_sources_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(5)]
    want = [PreferenceRecord(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.parquet", tmp_path / "d.json",
                tmp_path / "saved", ds, rows):
        assert load_records(src) == want, src
    assert load_records(tmp_path / "d.parquet")[3].id == f"{tmp_path / 'd.parquet'} row 3"


def test_kind_conversion():
    row = {"prompt": "Q", "responses": [" a", " b", " c"]}
    pairs = load_records([row], kind="preference")
    assert [(p.chosen, p.rejected) for p in pairs] == [(" a", " b"), (" a", " c"), (" b", " c")]
    assert load_records([row], kind="sft") == [SFTRecord("Q", " a")]
    with pytest.raises(DataError, match="gives sft records, and none of them converts to 'preference'"):
        load_records([{"prompt": "Q", "completion": " a"}], kind="preference")
    # TRL's stepwise supervision (a process reward model's rows) or a prompt set, given to a training command: the line
    # said "reader 'prompt' gives prompt records", naming neither the missing responses nor TRL's format
    stepwise = {"prompt": "Q", "completions": [" step 1", " step 2"], "labels": [True, False]}
    for kind in ("sft", "preference", "unpaired"):
        with pytest.raises(DataError, match=rf"the rows have a prompt and none of the responses alignkit trains {kind} "
                                            r"records on \(columns completion, chosen, rejected, responses, messages\).* "
                                            r"TRL's stepwise-supervision rows \(completions \+ labels"):
            load_records([stepwise], kind=kind)


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": " b"}', '{"prompt": "a", "completion": '],
     r"d\.jsonl:2: broken JSON line .* fix or delete this line"),
    (['{"prompt": "a", "completion": " b"}', '', '{"prompt": "a", "completion": ""}'],
     r"d\.jsonl:3: 'completion' is empty"),
    (['{"prompt": "a", "chosen": " b", "rejected": 7}'],
     r"d\.jsonl:1: 'rejected' must be a string or a non-empty list of"),
    # OpenAI's tool-call turn (content null, tool_calls): was "must be a dict with string 'role' and 'content'"
    (['{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": null, "tool_calls": '
      '[{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]}, {"role": "tool", "content": "Sun"}, '
      '{"role": "assistant", "content": "Sunny."}]}'],
     r"d\.jsonl:1: messages\[1\] is a tool call \(content null, 'tool_calls' .*\), and records keep each message's "
     r"role and content only, so the call would be lost"),
    # a number where text goes, in the first row: was "unknown combination of columns ['completion', 'prompt']" and
    # every known format, though the columns are right
    (['{"prompt": 3, "completion": " b"}'], r"d\.jsonl:1: 'prompt' is int 3, not text or a list of messages, and with "
                                            r"text the row would be read by reader 'prompt-completion'; write the "
                                            r"value as text"),
    (['{"prompt": {"text": "q"}, "chosen": " a", "rejected": " b", "weight": 2}'],
     r"d\.jsonl:1: 'prompt' is dict \{'text': 'q'\}, not text .* reader 'preference'"),
    (['{"question": "a", "answer": " b"}'], r"d\.jsonl:1: unknown combination of columns \['answer', 'question'\]"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"d\.jsonl:1: the last message of 'messages' must be"),
    (['{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'],
     r"d\.jsonl:1: messages\[0\] must be a dict with string 'role' and 'content'"),
    (['{"prompt": "a", "completion": " b", "label": "yes"}'], r"d\.jsonl:1: 'label' must be true/false"),
    (['{"prompt": "a", "completion": " b", "weight": -1}'], r"d\.jsonl:1: 'weight' must be a finite number >= 0"),
    (['{"prompt": "a", "responses": [" x"]}'], r"d\.jsonl:1: 'responses' must be a list of at least 2"),
    (['{"chosen": "same", "rejected": "same more"}'], r"d\.jsonl:1: one of 'chosen'/'rejected' is a prefix"),
    (['[1, 2]'], r"d\.jsonl:1: expected a JSON object per line"),
    # TRL's vision rows: the images column was ignored with a warning and the text trained without its image
    (['{"images": ["cat.png"], "prompt": "What is in the image?", "completion": " A cat."}'],
     r"d\.jsonl:1: column 'images' holds images \(TRL's vision-language format\), and alignkit trains text-only "
     r"models, so the text would be trained without the images it refers to; .* drop the 'images' column"),
    (['{"prompt": "Describe it.", "chosen": " red", "rejected": " blue", "image": "x.png"}'],
     r"d\.jsonl:1: column 'image' holds images"),
    # TRL's chat-template columns: dropped with the general "ignored column" warning, the text rendered without them
    (['{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}], '
      '"tools": [{"type": "function", "function": {"name": "get_weather"}}]}'],
     r"d\.jsonl:1: column 'tools' holds a value TRL passes to the chat template \(apply_chat_template\(\.\.\., "
     r"tools=tools\)\), .* fold it into the messages .* or drop the 'tools' column$"),
    (['{"prompt": "Q", "completion": " A", "chat_template_kwargs": {"enable_thinking": false}}'],
     r"d\.jsonl:1: column 'chat_template_kwargs' holds a value TRL passes to the chat template "
     r"\(apply_chat_template\(\.\.\., \*\*chat_template_kwargs\)\)"),
    (['{"prompt": "Q", "tools": [{"type": "function", "function": {"name": "f"}}]}'],  # prompts for online training
     r"d\.jsonl:1: column 'tools' holds a value TRL passes"),
    # ShareGPT rows: a speaker with no chat role
    (['{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}'],
     r"d\.jsonl:1: conversations\[1\] has 'from' 'bot', not a ShareGPT speaker alignkit maps to a chat role "
     r"\(human -> user, .*\); change it to one of them, or give the message a 'role'$"),
    # a tool call (LLaMA-Factory's function_call) read as an assistant turn would train the bare call text
    (['{"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"}, '
      '{"from": "observation", "value": "Sunny"}, {"from": "gpt", "value": "Sunny."}]}'],
     r"d\.jsonl:1: conversations\[1\] has 'from' 'function_call', a tool call, .* write the call into an assistant "
     r"\('gpt'\) message as the model should output it, or drop the row$"),
    (['{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "messages": []}'],
     r"d\.jsonl:1: the row has both 'messages' and 'conversations'"),
    # a key given twice in one object: json.loads kept the last value without a word ("b" trained, "a" lost)
    (['{"prompt": "q", "completion": " a"}', '{"prompt": "a", "prompt": "b", "completion": " c"}'],
     r"d\.jsonl:2: an object holds the key 'prompt' twice, and only its last value would be read; keep one 'prompt' "
     r"in it \(the export that wrote the file repeated the key\)$"),
    (['{"messages": [{"role": "user", "content": "Hi", "content": "Hey"}, {"role": "assistant", "content": "x"}]}'],
     r"d\.jsonl:1: an object holds the key 'content' twice"),
    # a prompt ending on the assistant's message: TRL continues it (a prefill); alignkit rendered a new assistant turn
    # after it, for training rows and for the prompts of the online commands alike
    (['{"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>"}], '
      '"completion": [{"role": "assistant", "content": "4"}]}'],
     r"d\.jsonl:1: 'prompt' ends with an assistant message, which TRL reads as the start of the reply for the model "
     r"to continue \(a prefill\); alignkit renders no prefill, .* end the prompt with the user's turn"),
    (['{"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Let me think."}]}'],
     r"d\.jsonl:1: 'prompt' ends with an assistant message"),
    # content as a list of parts (OpenAI / TRL): text parts are read (joined as serving joins them); another part
    # was refused as "must be a dict with string 'role' and 'content'" even when all text, and is now named itself
    (['{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", '
      '"image_url": {"url": "x.png"}}]}, {"role": "assistant", "content": "A cat."}]}'],
     r"d\.jsonl:1: messages\[0\]\.content\[1\] is a 'image_url' part, and alignkit trains on text only .* remove the "
     r"non-text parts from the record's messages, or drop the record$"),
    (['{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}], '
      '"completion": [{"role": "assistant", "content": "A cat."}]}'],
     r"d\.jsonl:1: prompt\[0\]\.content\[0\] is a 'image' part"),
    (['{"prompt": "q", "completion": " a"}', '{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": '
      '"assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "input_audio", "input_audio": {}}]}]}'],
     r"d\.jsonl:2: completion\[0\]\.content\[1\] is a 'input_audio' part"),
    (['{"messages": [{"role": "user", "content": [{"text": "Hi"}]}, {"role": "assistant", "content": "Hello"}]}'],
     r"d\.jsonl:1: messages\[0\]\.content\[0\] must be a text part \{'type': 'text', 'text': str\}, got "
     r"\"\{'text': 'Hi'\}\"; fix the part or give the content as a string$"),
    # TRL's language-modeling rows: one line naming the format and the columns to give instead
    (['{"text": "The sky is blue."}'], r"d\.jsonl:1: a 'text' column is TRL's language-modeling format \(columns "
     r"\['text'\]\), which has no prompt .* give each row 'prompt' and 'completion' columns, or a 'messages'"),
])
def test_bad_input_names_file_and_line(tmp_path, lines, message):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_records(f)


def test_missing_field_and_skip(tmp_path, caplog):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "a"},
                                           {"prompt": "c", "completion": " d"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'completion' \(row has \['prompt'\]\)"):
        load_records(f)
    with caplog.at_level("WARNING"):
        recs = load_records(f, on_invalid="skip")
    assert [r.prompt for r in recs] == ["a", "c"]
    assert "skipped 1 invalid row" in caplog.text and "d.jsonl:2" in caplog.text
    with pytest.raises(DataError, match=r"field 'responses' is null \(no value\)"):  # present, null
        load_records([{"prompt": "a", "responses": None}], reader="ranked")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("reader, row, key, message", [
    ("prompt-completion", {"prompt": "Q", "completion": " A"}, "conversational",
     "data.reader_options.conversational: reader 'prompt-completion' takes no option 'conversational'; its options: "
     "none"),
    ("hh-rlhf", {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"},
     "conversation", "data.reader_options.conversation: reader 'hh-rlhf' takes no option 'conversation'; did you "
     "mean 'conversational'? its options: conversational"),
])
def test_an_option_the_reader_does_not_take_is_one_line_naming_the_key(tmp_path, reader, row, key, message):
    src = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as e:  # was TypeError: read() got an unexpected keyword argument
        load_records(str(src), reader=reader, **{key: True})
    assert str(e.value) == message


def test_a_split_a_single_split_source_does_not_have_is_refused(tmp_path):
    """`split=` (data.split / data.eval_split) was ignored by a .jsonl / .json / .parquet file and a saved single
    Dataset: split="test" read every row of the file (the training rows, for an eval split). Now a split other
    than the one such a source holds ("train", as datasets names a data file's rows) is a DataError naming it."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for src in (write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.parquet", tmp_path / "d.json",
                tmp_path / "saved"):
        with pytest.raises(DataError) as e:
            load_records(src, split="test")
        msg = str(e.value)
        assert str(src) in msg and "'test'" in msg and "data.split" in msg and "\n" not in msg, msg
        assert len(load_records(src, split="train")) == 3  # its one split, by the name datasets gives it
        assert len(load_records(src)) == 3


@pytest.mark.parametrize("column, rows, default", [
    ("weight", [{"prompt": "a", "completion": " b", "weight": 2.0}, {"prompt": "c", "completion": " d", "weight": None},
                {"prompt": "e", "completion": " f"}], "weigh 1 (the default)"),
    ("margin", [{"prompt": "p", "chosen": " a", "rejected": " b", "margin": 1.5},
                {"prompt": "p", "chosen": " c", "rejected": " d"}], "have margin 0 (the default)"),
])
def test_an_optional_column_given_in_some_rows_only_is_said_once(tmp_path, caplog, column, rows, default):
    """A weight / margin column present in some rows and missing (or null, as Parquet writes a lost value) in others:
    the rest take the default, which used to happen without a word."""
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING"):
        recs = load_records(f)
    assert len(recs) == len(rows)
    lines = [r.getMessage() for r in caplog.records if f"column '{column}'" in r.getMessage()]
    n = len(rows)
    assert lines == [f"{str(f)[:80]}: column '{column}' is given in 1 of {n} rows (the first: {f}:1); the other "
                     f"{n - 1} {default} (the first: {f}:2). Give every row a {column} if they should not"]
    caplog.clear()
    with caplog.at_level("WARNING"):  # every row, or none: nothing to say
        load_records(write_jsonl(tmp_path / "all.jsonl", [dict(r, **{column: 1.0}) for r in rows]))
        load_records(write_jsonl(tmp_path / "none.jsonl", [{k: v for k, v in r.items() if k != column} for r in rows]))
    assert not [r for r in caplog.records if "is given in" in r.getMessage()]


@pytest.mark.parametrize("content", [b"", b"not parquet at all\n", "truncated"], ids=["empty", "other", "truncated"])
def test_a_damaged_parquet_file_is_one_data_error_naming_it(tmp_path, capsys, content):
    """An empty, truncated or non-Parquet `.parquet` file stopped every command on "unexpected error: ArrowInvalid:
    ... (please report it)", exit 1, naming no file setting. Now a DataError naming the file (exit 2, one line),
    before the run folder exists; a complete file still reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignkit.cli import main

    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)]
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(rows), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content == "truncated" else content)
    with pytest.raises(DataError, match=rf"^{bad}: not a readable Parquet file \(.+\); the file is empty, truncated "
                                        r"or not Parquet: write it again"):
        load_records(bad, "sft")
    assert len(load_records(good, "sft")) == 20
    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    assert main(["-q", "sft", "--config", str(root / "configs" / "sft-tiny.yaml"), f"data.path={bad}",
                 f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: {bad}: not a readable Parquet file")
    assert not run.exists()


def test_message_keys_other_than_role_and_content_are_warned_once(tmp_path, caplog):
    """A message's other keys (`name`, `tool_calls`, ...) were dropped without a word: records keep role and
    content, so the chat template never saw them. Now one warning per file naming the keys and their counts; the
    records are read as before. A Parquet file pads every message of a struct column with the keys any message has
    (null): those say nothing, nor does a file of plain role / content messages."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    user = {"role": "user", "content": "Hi"}
    rows = [{"messages": [user, {"role": "assistant", "content": "Hello", "name": "bot"}]},
            {"messages": [{**user, "name": "ann"}, {"role": "assistant", "content": "Hey", "name": "bot"}]},
            {"messages": [user, {"role": "assistant", "content": "Yo"}]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        recs = load_records(f, "sft")
    assert [r.completion for r in recs] == [[{"role": "assistant", "content": c}] for c in ("Hello", "Hey", "Yo")]
    msgs = [r.getMessage() for r in caplog.records if "message key(s)" in r.getMessage()]
    assert msgs == [f"{f}: message key(s) ['name'] dropped (each message keeps its role and content only, so the chat "
                    "template never sees them; counts: name in 3 message(s)); fold what matters into the content, or "
                    "drop those keys from the data"]
    caplog.clear()
    pq.write_table(pa.Table.from_pylist([rows[2], rows[2]]), tmp_path / "plain.parquet")
    padded = [{"messages": [{**m, "name": None} for m in rows[2]["messages"]]}] * 2  # as a struct column reads back
    with caplog.at_level(logging.WARNING):
        assert len(load_records(tmp_path / "plain.parquet", "sft")) == len(load_records(padded, "sft")) == 2
        load_records([{"prompt": [user], "chosen": "a", "rejected": "b"}], "preference")
    assert "message key(s)" not in caplog.text


@pytest.mark.parametrize("row", [
    {"prompt": "2+2=", "completion": " 4", "solution": "4"},
    {"prompt": CONV_P, "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}], "solution": "4"},
    {"prompt": "2+2=", "completion": " 4", "label": True, "solution": "4"},
    {"prompt": "2+2=", "responses": [" 4", " 5"], "solution": "4"},
])
def test_prompts_from_trl_rows_keep_their_other_columns(tmp_path, row):
    """TRL's GRPOTrainer passes every column of a prompt's row but prompt and completion to the reward functions. Read
    for prompts, a row with responses was read as completions or pairs and cut to its prompt, so its 'solution' was
    dropped (one 'ignored column' warning) and a reward function taking it stopped the first step, after the run
    folder was written. Now such rows are read by the prompt reader, which keeps the other columns."""
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    (record,) = load_records(f, "prompt")
    assert record.prompt == row["prompt"]
    assert record.meta["columns"] == {k: v for k, v in row.items() if k != "prompt"}
    assert type(load_records(f)[0]) is not PromptRecord  # read for training, the row is what it was


def sharegpt(conversation):
    """A conversation of {"role", "content"} messages in ShareGPT's form (human / gpt / system speakers)."""
    speakers = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}
    return [{"from": speakers[m["role"]], "value": m["content"]} for m in conversation]


def test_sharegpt_rows_are_read_as_the_same_rows_in_messages(tmp_path, tokenizer):
    """ShareGPT rows (`conversations` of {"from", "value"} messages: most SFT sets on the Hub; TRL converts them) were
    refused ('unknown combination of columns'). Now they are read as the same rows written as `messages`, with
    human -> user, gpt -> assistant, system -> system, in every column that holds a conversation; the features are
    those of the `messages` rows (compared with rows written by hand, not converted by the code under test)."""
    from alignkit.data import tokenize_records

    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}],
             [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Calling the weather tool."},
              {"role": "tool", "content": "Sunny, 21C"}, {"role": "assistant", "content": "Sunny."}]]
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": sharegpt(c)} for c in convs])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    assert load_records(share) == load_records(chat) == [SFTRecord(c[:-1], [c[-1]]) for c in convs]
    got, want = tokenize_records(load_records(share), tokenizer)[0], tokenize_records(load_records(chat), tokenizer)[0]
    assert [{k: v for k, v in f.items() if k != "id"} for f in got] == \
        [{k: v for k, v in f.items() if k != "id"} for f in want]
    # the tool's result is rendered as the template's tool turn (the tiny ChatML template: role name, content)
    assert "<|im_start|>tool\nSunny, 21C<|im_end|>\n" in tokenizer.decode(got[2]["input_ids"])
    # "user" / "assistant" / "model" speakers too, LLaMA-Factory's "observation" (a tool's result), and pairs whose
    # conversations are in ShareGPT's form
    obs = [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "42"}, {"from": "gpt", "value": "Ok"}]
    assert load_records([{"conversations": obs}]) == [SFTRecord([*CONV_P, {"role": "tool", "content": "42"}], "Ok")]
    other = [{"from": "user", "value": "Hi"}, {"from": "model", "value": "Hello"}]
    assert load_records([{"conversations": other}]) == [SFTRecord(CONV_P, "Hello")]
    pair = {"chosen": sharegpt(convs[0]), "rejected": sharegpt(convs[0][:-1] + [{"role": "assistant", "content": "5"}])}
    assert load_records([pair]) == [PreferenceRecord(convs[0][:-1], "4", "5")]
    pair = {"prompt": sharegpt(convs[0][:-1]), "chosen": sharegpt(convs[0][-1:]), "rejected": [{"from": "gpt", "value": "5"}]}
    assert load_records([pair]) == [PreferenceRecord(convs[0][:-1], "4", "5")]


def test_columns_alignkit_writes_are_read_without_a_warning(tmp_path, caplog):
    """Reading alignkit's own records (annotate's records.jsonl: prompt, completion / chosen, rejected, weight, id,
    meta; augment's output: the row plus meta) warned "ignored column(s) ['id', 'meta']" on every file. Now those
    columns are skipped silently; a truly unknown column is still warned."""
    import logging

    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b", "margin": None, "weight": 1.0,
             "id": "prompts.jsonl:1 sample 0", "meta": {"scores": [1.0, 0.0]}},
            {"prompt": "Q2", "chosen": " c", "rejected": " d", "margin": None, "weight": 1.0,
             "id": "prompts.jsonl:2 sample 0", "meta": {"scores": [1.0, 0.0]}}]
    f = write_jsonl(tmp_path / "records.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        assert [(r.prompt, r.chosen) for r in load_records(f)] == [("Q", " a"), ("Q2", " c")]
        load_records(write_jsonl(tmp_path / "aug.jsonl", [{"prompt": "Q", "completion": " a", "meta": {"strategy": "x"}}]))
    assert "ignored column" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_records(write_jsonl(tmp_path / "other.jsonl", [dict(rows[0], source="web")]))
    assert "ignored column(s) ['source']" in caplog.text


@pytest.mark.parametrize("command, config, row", [
    ("sft", "sft-tiny.yaml", {"messages": CONV_P + [{"role": "assistant", "content": "Hello"}],
                              "tools": [{"type": "function", "function": {"name": "get_weather"}}]}),
    ("grpo", "grpo-tiny.yaml", {"prompt": CONV_P, "chat_template_kwargs": {"enable_thinking": False}}),
])
def test_chat_template_columns_stop_the_command_before_its_run_folder(tmp_path, capsys, command, config, row):
    """A `tools` / `chat_template_kwargs` column was dropped with the general "ignored column" warning and the run
    trained (or sampled) text rendered without them. Now the command stops with one line naming the row and column,
    before the run folder exists."""
    from alignkit.cli import main

    f = write_jsonl(tmp_path / "d.jsonl", [row] * 4)
    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    assert main(["-q", command, "--config", str(root / "configs" / config), f"data.path={f}",
                 f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    col = "tools" if "tools" in row else "chat_template_kwargs"
    assert len(err) == 1 and err[0].startswith(f"alignkit {command}: error: {f}:1: column {col!r} holds a value TRL "
                                               "passes to the chat template")
    assert not run.exists()


def test_json_lines_in_a_json_file_and_a_byte_order_mark_are_read(tmp_path):
    """`datasets.Dataset.to_json("d.json")` writes one object per line (and `datasets.load_dataset("json")` reads it
    back), but a `.json` file was read as one JSON value only: "broken JSON (Extra data)". A file saved by Notepad or
    Excel starts with a UTF-8 byte order mark: "broken JSON line (Unexpected UTF-8 BOM ...)". Both are now read; a
    broken file is still refused."""
    import datasets

    rows = [{"prompt": "Q", "completion": " A"}, {"prompt": "Q2", "completion": " B"}]
    want = [SFTRecord("Q", " A"), SFTRecord("Q2", " B")]
    datasets.Dataset.from_list(rows).to_json(tmp_path / "d.json")
    recs = load_records(tmp_path / "d.json")
    assert recs == want and recs[1].id == f"{tmp_path / 'd.json'}:2"
    bom = b"\xef\xbb\xbf"
    (tmp_path / "b.jsonl").write_bytes(bom + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "b.json").write_bytes(bom + json.dumps(rows).encode())
    assert load_records(tmp_path / "b.jsonl") == load_records(tmp_path / "b.json") == want
    datasets.Dataset.from_list(rows[:1]).to_json(tmp_path / "one.json")  # one row: one object, read as one row too
    assert load_records(tmp_path / "one.json") == want[:1]
    (tmp_path / "bad.json").write_text(json.dumps(rows) + "\n]")
    with pytest.raises(DataError, match=r"bad\.json:2: broken JSON \(Extra data\)"):
        load_records(tmp_path / "bad.json")


def test_a_key_given_twice_in_a_json_file_is_refused_naming_the_item(tmp_path):
    """In a `.json` list (or a `.json` of JSON lines, as Dataset.to_json writes) a repeated key was read as its last
    value too. Now one line names the item and its line, or the line; rows without a repeated key read as before."""
    good = '{"prompt": "q", "completion": " a"}'
    (tmp_path / "list.json").write_text(f'[{good},\n {good},\n {{"prompt": "q", "completion": " a", "completion": " b"}}]')
    with pytest.raises(DataError, match=rf"^{tmp_path / 'list.json'} item 2 \(line 3\): an object holds the key "
                                        r"'completion' twice"):
        load_records(tmp_path / "list.json")
    for bad_line in (1, 3):
        lines = [good] * 3
        lines[bad_line - 1] = '{"prompt": "q", "prompt": "r", "completion": " a"}'
        (tmp_path / "lines.json").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=rf"^{tmp_path / 'lines.json'}:{bad_line}: an object holds the key 'prompt'"):
            load_records(tmp_path / "lines.json")
    (tmp_path / "ok.json").write_text(f"[{good}, {good}]")
    assert load_records(tmp_path / "ok.json") == [SFTRecord("q", " a")] * 2


def test_a_key_given_twice_in_a_dataset_folder_is_refused_naming_file_line_and_key(tmp_path):
    """A folder is read by `datasets.load_dataset`, whose JSON builder kept the last value of a key given twice in a
    `.json` list without a word ("b" trained, "a" lost), and failed on one in a JSON line with "An error occurred
    while generating the dataset" (no file, line or key). The JSON data files of every split (load_dataset prepares
    them all) are now checked as our own files are: one line naming file, line (or item) and key."""
    good = '{"prompt": "q", "completion": " a"}'
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "train.json").write_text(f'[{good},\n {{"prompt": "a", "prompt": "b", "completion": " c"}}]')
    with pytest.raises(DataError, match=rf"^{listed / 'train.json'} item 1 \(line 2\): an object holds the key "
                                        r"'prompt' twice, and only its last value would be read"):
        load_records(listed)
    lines = tmp_path / "lines"
    (lines / "data").mkdir(parents=True)
    (lines / "data" / "train.jsonl").write_text(
        f"{good}\n{good}\n"
        '{"prompt": "q", "completion": " a", "completion": " b"}\n')
    (lines / "data" / "test.jsonl").write_text('{"prompt": "q", "prompt": "r", "completion": " a"}\n')
    with pytest.raises(DataError, match=rf"^{lines / 'data' / 'train.jsonl'}:3: an object holds the key 'completion' "
                                        r"twice"):
        load_records(lines)
    (lines / "data" / "train.jsonl").write_text(f"{good}\n{good}\n")
    with pytest.raises(DataError, match=rf"^{lines / 'data' / 'test.jsonl'}:1: an object holds the key 'prompt'"):
        load_records(lines)  # the train split's rows are fine, but load_dataset reads the test split's file too
    (lines / "data" / "test.jsonl").write_text(f"{good}\n")
    assert load_records(lines) == [SFTRecord("q", " a")] * 2 and load_records(lines, split="test") == [SFTRecord("q", " a")]


def test_a_dataset_folders_json_is_checked_once_while_unchanged_and_again_once_edited(tmp_path, monkeypatch):
    """check_json_data_files and run_commit.check_output_file share one memo (`files.UnchangedSinceChecked`, keyed by
    path, size and mtime_ns): an unchanged file is parsed once a process; an edit of the same size (a repeated key
    put in by hand) has another mtime and is checked, and refused, again."""
    import os

    from alignkit.data.readers import rows

    parsed = []
    real = rows._iter_jsonl
    monkeypatch.setattr(rows, "_iter_jsonl", lambda f, *a, **k: (parsed.append(Path(f).name), real(f, *a, **k))[1])
    folder = tmp_path / "set"
    folder.mkdir()
    path = folder / "train.jsonl"
    path.write_text('{"prompt": "q", "completion": " a"}\n')
    rows.check_json_data_files(folder)
    rows.check_json_data_files(folder)
    assert parsed == ["train.jsonl"]
    stat = path.stat()
    path.write_text('{"prompt": "q", "prompt": " a"}\n'.ljust(stat.st_size - 1) + "\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert path.stat().st_size == stat.st_size
    with pytest.raises(DataError, match=r"train\.jsonl:1: an object holds the key 'prompt' twice"):
        rows.check_json_data_files(folder)
    assert parsed == ["train.jsonl", "train.jsonl"]


def test_text_parts_are_read_as_the_text_serving_renders(tmp_path, tokenizer):
    """A message whose content is a list of text parts (the OpenAI / TRL convention) trains on the parts joined by
    a newline, the text the server renders for a request with the same parts (row V13), so the model is trained on
    the prompt it is served; the record equals the one written with string contents."""
    from alignkit.data import tokenize_records
    from alignkit.serve.parsing import chat_prompt

    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    rows = [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [
        {"type": "text", "text": "4"}]}]},
            {"messages": [{"role": "user", "content": "What is\n2+2?"}, {"role": "assistant", "content": "4"}]}]
    with_parts, with_strings = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert with_parts.prompt == with_strings.prompt == [{"role": "user", "content": "What is\n2+2?"}]
    assert with_parts.completion == with_strings.completion == [{"role": "assistant", "content": "4"}]
    (f,), _ = tokenize_records([with_parts], tokenizer)
    served = chat_prompt({"messages": [{"role": "user", "content": parts}]}, tokenizer)
    assert f["input_ids"][:f["prompt_length"]] == served == tokenizer(
        "<|im_start|>user\nWhat is\n2+2?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("reader, rows", [
    ("prompt-completion", [{"prompt": "a", "completion": " b", "weight": 2.0}, {"prompt": "c", "completion": " d",
                                                                              "weight": None}]),
    ("hh-rlhf", [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b", "weight": 2.0},
                 {"chosen": "\n\nHuman: r\n\nAssistant: a", "rejected": "\n\nHuman: r\n\nAssistant: b",
                  "weight": None}]),
])
@pytest.mark.parametrize("as_dataset", [True, False])
def test_a_warning_about_a_dataset_or_list_is_one_line_naming_its_type(caplog, reader, rows, as_dataset):
    """A `datasets.Dataset` (or a list of rows) was named in the readers' warnings by its text cut at 80 characters:
    the Dataset's repr broke the line in three ("Dataset({\\n    features: [...],\\n    num_rows: column 'weight' is
    given in ...", its row count cut away) and a list was named by its first row's text. Both are now named by
    type, as the readers' errors name them ("<Dataset> row 1")."""
    from datasets import Dataset

    source = Dataset.from_list(rows) if as_dataset else rows
    name = "<Dataset>" if as_dataset else "<list>"
    row = (lambda i: f"<Dataset> row {i}") if as_dataset else (lambda i: f"<list>[{i}]")
    with caplog.at_level("WARNING"):
        assert len(load_records(source, reader=reader)) == 2
    lines = [r.getMessage() for r in caplog.records if "is given in" in r.getMessage()]
    assert lines == [f"{name}: column 'weight' is given in 1 of 2 rows (the first: {row(0)}); the other 1 weigh 1 "
                     f"(the default) (the first: {row(1)}). Give every row a weight if they should not"]


def _dataset_dict():
    from datasets import Dataset, DatasetDict

    return DatasetDict({"train": Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]),
                        "test": Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])})


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


H, A = "\n\nHuman: ", "\n\nAssistant: "
# data as people have it, gone wrong: (case, source builder, load_records options, the one line expected)
BAD_IN_MEMORY = [
    ("DatasetDict, no split", _dataset_dict, {},
     r"^<DatasetDict>: is a DatasetDict with splits \['train', 'test'\]; pass split=<one of them> \(data\.split\)$"),
    # before: answered as if no split had been given, not naming 'validation'
    ("DatasetDict, a split it lacks", _dataset_dict, {"split": "validation"},
     r"^<DatasetDict>: .*splits \['train', 'test'\], and split 'validation' \(data\.split, .*\) is not one of them"),
    # before: "prompt[0] must be a dict with string 'role' and 'content', got '1'"
    ("token ids for text", lambda: [{"prompt": [1, 2, 3], "chosen": "a", "rejected": "b"}], {},
     r"^<list>\[0\]: 'prompt' is a list of 3 integers \(token ids\?\), and alignkit reads text or .* messages here"),
    # before: "unknown combination of columns ['chosen', 'prompt', 'rejected']; no reader recognises it" + every format
    ("a null in the first row", lambda: _dataset([{"prompt": None, "chosen": "a", "rejected": "b"}]), {},
     r"^<Dataset> row 0: column\(s\) \['prompt'\] are null .* the row would be read by reader 'preference'; give "),
    # before: "missing field 'chosen' (row has ['chosen', 'prompt', 'rejected'])"
    ("a null in a later row", lambda: _dataset([{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                {"prompt": "p", "chosen": None, "rejected": "b"}]), {},
     r"^<Dataset> row 1: field 'chosen' is null \(no value\); every row of this file needs 'chosen'"),
    ("a null HH dialogue", lambda: _dataset([{"chosen": H + "q" + A + "a", "rejected": H + "q" + A + "b"},
                                             {"chosen": H + "q" + A + "a", "rejected": None}]), {},
     r"^<Dataset> row 1: field 'rejected' is null \(no value\); add 'rejected'"),
    ("a weight column of strings", lambda: _dataset([{"prompt": "p", "chosen": "a", "rejected": "b", "weight": "2"}]),
     {}, r"^<Dataset> row 0: 'weight' must be a finite number >= 0, got '2'"),
]


@pytest.mark.parametrize("case, source, options, message", BAD_IN_MEMORY, ids=[c[0] for c in BAD_IN_MEMORY])
def test_bad_in_memory_inputs_are_refused_in_one_line_naming_the_row(case, source, options, message):
    with pytest.raises(DataError) as e:
        load_records(source(), **options)
    assert "\n" not in str(e.value) and re.search(message, str(e.value)), str(e.value)


def test_a_trainer_given_a_dataset_dict_asks_for_one_split(tokenizer):
    """A DatasetDict as train_dataset (TRL users pass load_dataset(...) whole by mistake) stopped on the readers' "pass
    split=<one of them>", which a trainer has no way to pass; now it names the argument and the fix."""
    from alignkit.data.prepare import prepare_dataset

    with pytest.raises(DataError, match=r"^train_dataset: a DatasetDict with splits \['train', 'test'\], and a trainer "
                                        r"takes one split; pass train_dataset=dataset\['train'\]"):
        prepare_dataset(_dataset_dict(), tokenizer, ["preference"])


@pytest.mark.parametrize("value,layout", [
    ({"prompt": ["Q1", "Q2"], "completion": ["a", "b"]}, "lists"),
    ({"prompt": [[{"role": "user", "content": "Q"}]], "completion": [[{"role": "assistant", "content": "a"}]]},
     "lists"),
    ({"prompt": {"0": "Q1", "1": "Q2"}, "completion": {"0": "a", "1": "b"}}, "index"),
    ({"prompt": ["Q1"], "completion": ["a", "b"]}, "lists"),  # unequal: still columns (refused naming the sizes)
    # rows, not columns: a conversation, a conversational pair, token ids, a ranked row
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}]}, None),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, None),
    ({"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}, None),
    ({"prompt": "Q", "responses": ["a", "b"]}, None),
])
def test_column_layout_tells_a_dict_of_columns_from_a_row(value, layout, tmp_path):
    import json

    from alignkit.data.readers.rows import column_layout, iter_rows

    assert column_layout(value) == layout
    path = tmp_path / "data.json"
    path.write_text(json.dumps(value))
    if layout is not None:
        with pytest.raises(DataError, match=r"data\.json: holds a dict of columns .*write one object per row"):
            list(iter_rows(path))
    else:
        assert [row for row, _ in iter_rows(path)] == [value]


@pytest.mark.parametrize("form", ["jsonl", "parquet", "saved", "dataset", "list"])
@pytest.mark.parametrize("role", ["user", "assistant"])
def test_an_empty_user_or_assistant_message_is_refused_in_every_source(form, role, tmp_path):
    """The same row, refused the same way (its place, the message's index and role) from every kind of source; before,
    only HH text was checked and a `messages` row with an empty turn trained a lost question or an empty reply."""
    from datasets import Dataset

    from alignkit.data import load_records

    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "more" if role == "assistant" else " "},
                        {"role": "assistant", "content": "b" if role == "user" else ""}]}
    rows = [good, bad]
    if form == "jsonl":
        source, where = tmp_path / "d.jsonl", f"{tmp_path / 'd.jsonl'}:2"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif form == "parquet":
        source, where = tmp_path / "d.parquet", f"{tmp_path / 'd.parquet'} row 1"
        Dataset.from_list(rows).to_parquet(str(source))
    elif form == "saved":
        source, where = tmp_path / "saved", f"{tmp_path / 'saved'} row 1"
        Dataset.from_list(rows).save_to_disk(str(source))
    else:
        source = Dataset.from_list(rows) if form == "dataset" else rows
        where = "<Dataset> row 1" if form == "dataset" else "<list>[1]"
    index = 2 if role == "user" else 3
    with pytest.raises(DataError, match=rf"^{re.escape(where)}: messages\[{index}\] is an empty '{role}' message"):
        load_records(source, "sft")
    assert len(load_records(source, "sft", on_invalid="skip")) == 1


@pytest.mark.parametrize("column", ["sample_weight", "loss_weight", "sampleWeight", "example weights"])
@pytest.mark.parametrize("row", [{"prompt": "q", "completion": " a"}, {"prompt": "q", "chosen": " a", "rejected": " b"},
                                 {"prompt": "q", "responses": [" a", " b"]}, {"prompt": "q"},
                                 {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
def test_a_weight_column_under_another_name_is_refused_naming_the_row(tmp_path, row, column):
    """A per-record weight given as `sample_weight` (scikit-learn's name), `loss_weight`, ...: too far from `weight`
    for the did-you-mean of a misspelt column, it was counted among the ignored columns, and every record trained with
    weight 1 after one warning. Now refused at its row, naming the column and the one alignkit reads."""
    f = write_jsonl(tmp_path / "d.jsonl", [row, {**row, column: 2.0}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:2: unknown column '{column}' \(did you mean 'weight'\?\); "
                                        r"alignkit reads a record's weight from the 'weight' column only"):
        load_records(f)


def test_columns_that_only_hold_the_word_weight_inside_a_word_are_still_ignored(tmp_path, caplog):
    """`heavyweight`: no word of the name is `weight`, so they stay ignored columns (one warning)."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": " a", "heavyweight": 2, "score": 3}])
    with caplog.at_level("WARNING"):
        assert load_records(f)[0].weight == 1.0
    assert any("ignored column(s) ['heavyweight', 'score']" in r.getMessage() for r in caplog.records)


def test_a_saved_dataset_of_no_rows_is_one_line_and_an_empty_split_leaves_the_others_readable(tmp_path):
    """`save_to_disk` of a Dataset of 0 rows writes no data file, and `load_from_disk` stopped on an IndexError ('list
    index out of range', the CLI's 'unexpected error'), for a saved DatasetDict whatever split was asked for. Now an
    empty Dataset is the one line other empty sources give, and the splits of a DatasetDict are loaded alone."""
    from datasets import Dataset, DatasetDict

    full = Dataset.from_list([{"prompt": "q", "completion": " a"}, {"prompt": "r", "completion": " b"}])
    empty = full.select([])
    empty.save_to_disk(str(tmp_path / "empty"))
    DatasetDict({"train": full, "test": empty}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'empty'))}: no rows; the source is empty"):
        load_records(tmp_path / "empty")
    assert [r.prompt for r in load_records(tmp_path / "dict")] == ["q", "r"]  # train, the default split
    assert [r.prompt for r in load_records(tmp_path / "dict", split="train")] == ["q", "r"]
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'dict'))}: split 'test': no rows; the source "
                                        r"is empty"):
        load_records(tmp_path / "dict", split="test")
    with pytest.raises(DataError, match=r"is a DatasetDict with splits \['train', 'test'\], and split 'valid'"):
        load_records(tmp_path / "dict", split="valid")


def test_the_rows_of_a_dataset_dicts_other_split_are_named_with_it(tmp_path):
    """A saved DatasetDict's test split named its rows as the train split's ('<folder> row 0'), so a bad weight in
    the test split's row 0 was said to be in 'row 0' of the folder: the train split's, read by default. Now a split
    other than train is named beside the folder; train rows keep their names (ids of runs already written)."""
    from datasets import Dataset, DatasetDict

    good = Dataset.from_list([{"prompt": "q", "completion": " a", "weight": 1.0}])
    bad = Dataset.from_list([{"prompt": "q", "completion": " a", "weight": -1.0}])
    DatasetDict({"train": good, "test": bad}).save_to_disk(str(tmp_path / "dict"))
    assert [r.id for r in load_records(tmp_path / "dict")] == [f"{tmp_path / 'dict'} row 0"]
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'dict'))} \[test\] row 0: 'weight' must be"):
        load_records(tmp_path / "dict", split="test")
