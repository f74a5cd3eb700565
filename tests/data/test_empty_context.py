"""Empty system / developer / tool messages are kept (sound data may hold them: an export's blank system prompt, a
tool that returned nothing; `EMPTY_REFUSED` refuses only empty user / assistant turns), but before they were kept
silently: a dataset whose every system prompt had been blanked by its export trained without a word. Now the records
holding one are counted, with their roles and first ids, in the tokenization summary the CLI logs (`TokenizeStats`)
and in the line a trainer's `prepare_dataset` logs."""

from __future__ import annotations

import logging

from alignkit.cli.data import tokenize
from alignkit.data import PreferenceRecord, PromptRecord, SFTRecord, TokenizeConfig
from alignkit.data.prepare import prepare_dataset
from alignkit.settings import DataSettings

USER = {"role": "user", "content": "Hi"}


def test_records_with_an_empty_system_or_tool_message_are_counted_in_the_cli_summary(tokenizer, caplog):
    """5 records by hand: 1 empty system (""), 3 whitespace-only system / developer / tool messages, 1 with a
    non-empty system message and 1 plain: 4 records counted (d:1, d:2, d:3, d:4), roles developer, system, tool."""
    recs = [SFTRecord([{"role": "system", "content": ""}, USER], "Hello", id="d:1"),
            PreferenceRecord([{"role": "system", "content": "  \n"}, USER], "Hello", "Bye", id="d:2"),
            SFTRecord([{"role": "developer", "content": " "}, USER], "Hello", id="d:3"),
            PromptRecord([USER, {"role": "assistant", "content": "Calling."}, {"role": "tool", "content": ""},
                          {"role": "user", "content": "So?"}], id="d:4"),
            SFTRecord([{"role": "system", "content": "Be brief."}, USER], "Hello", id="d:5"),
            SFTRecord([USER], "Hello", id="d:6")]
    with caplog.at_level(logging.INFO, logger="alignkit.cli.data"):  # the summary line the CLI logs
        features, stats = tokenize(recs, tokenizer, DataSettings(), "data.path")
    assert len(features) == 6  # all kept
    assert (stats.empty_context, stats.empty_context_ids, stats.empty_context_roles) == (
        4, ["d:1", "d:2", "d:3", "d:4"], ["developer", "system", "tool"])
    assert ("4 of 6 record(s) have an empty developer or system or tool message (kept, rendered as it is), "
            "e.g. ['d:1', 'd:2', 'd:3', 'd:4']") in caplog.text


def test_a_dataset_whose_every_system_prompt_is_empty_says_so_through_prepare_dataset(tokenizer, caplog):
    """A trainer's raw `messages` rows, 3 of 3 with an empty system prompt: the count reaches prepare_dataset's
    summary line (from the map's note column: the same with its cache)."""
    rows = [{"messages": [{"role": "system", "content": ""}, USER, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(3)]
    for _ in range(2):  # the second call: datasets' cache, where the batch function does not run
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="alignkit.data.prepare"):
            out, _ = prepare_dataset(rows, tokenizer, ("sft",), TokenizeConfig())
        assert len(out) == 3
        assert ("3 of 3 record(s) have an empty system message (kept, rendered as it is), e.g. ['train_dataset row "
                "0', 'train_dataset row 1', 'train_dataset row 2']") in caplog.text, caplog.text
