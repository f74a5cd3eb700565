"""The small JSON files of an adapter or base folder are read by one reader, `alignkit.files.read_json_object`: a
damaged one is one line naming the file, what it is, where json stopped (line, column) and the fix, the same shape on
every path (before: "<path>: not valid JSON (<json's text>); ...", "<path> is not valid JSON (...)" and
"<path> (<what>) is not valid JSON (...): the file is damaged; ..." on three paths)."""

from __future__ import annotations

import re

import pytest

from alignkit.adapters import AdapterConfig, adapter_in, apply_adapter, read_adapter_config, save_adapter
from alignkit.adapters.lora import check_lora_fits
from alignkit.files import parse_json_object, read_json_object
from alignkit.serve.stack import check_base_json, check_json_files

TRUNCATED = '{"r": 4,'  # json stops after the comma: 8 characters read, so line 1, column 9


def shape(path, what, fix):
    return (rf"{re.escape(str(path))} \({re.escape(what)}\): not valid JSON at line 1, column 9 \(Expecting property "
            rf"name enclosed in double quotes\): the file is damaged; {fix}")


def test_the_reader_names_line_and_column_and_refuses_a_non_object(tmp_path):
    """By hand: '{\\n  "a": 1,\\n' stops at the start of line 3; '[1]' is a list; a byte 0xff is no UTF-8 text."""
    with pytest.raises(ValueError, match=r"^x\.json \(a thing\): not valid JSON at line 3, column 1 \(.*\): the file "
                                         r"is damaged; fix it$"):
        parse_json_object(b'{\n  "a": 1,\n', "x.json", "fix it", "a thing")
    with pytest.raises(ValueError, match=r"^x\.json: holds a JSON list, not an object: the file is damaged; fix it$"):
        parse_json_object(b"[1]", "x.json", "fix it")
    with pytest.raises(ValueError, match=r"^x\.json: not valid JSON \(not UTF-8 text at byte 1\)"):
        parse_json_object(b'{\xff}', "x.json", "fix it")
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json_object(tmp_path / "ok.json", "fix it") == {"a": [1, 2]}


def test_each_adapter_folder_reader_gives_the_same_line_for_a_truncated_file(tiny_lm, tmp_path):
    """read_adapter_config (alignkit_adapter.json), check_lora_fits (peft's adapter_config.json, before the LoRA
    loads), serve's check_json_files (the same file, before the base loads) and check_base_json (a base's
    config.json): one line each, the same shape, naming the file and line 1, column 9."""
    model = tiny_lm("llama")
    folder = save_adapter(apply_adapter(tiny_lm("llama"), AdapterConfig(kind="lora")), tmp_path / "lora")
    (folder / "alignkit_adapter.json").write_text(TRUNCATED)
    with pytest.raises(ValueError) as e:
        read_adapter_config(folder)
    assert re.fullmatch(shape(folder / "alignkit_adapter.json", "alignkit's adapter config",
                              "save the adapter again"), str(e.value)), str(e.value)
    (folder / "alignkit_adapter.json").write_text('{"kind": "lora"}')
    adapter = adapter_in(folder)
    (folder / "adapter_config.json").write_text(TRUNCATED)
    with pytest.raises(ValueError) as e:
        check_lora_fits(model, folder, "base")
    assert re.fullmatch(shape(folder / "adapter_config.json", "peft's LoRA config", "save the adapter again"),
                        str(e.value)), str(e.value)
    with pytest.raises(ValueError) as e:
        check_json_files(adapter, folder)
    assert re.fullmatch(shape(folder / "adapter_config.json", "peft's LoRA config",
                              r"save the adapter again \(or copy it again from where it came from\)"),
                        str(e.value)), str(e.value)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(TRUNCATED)
    with pytest.raises(ValueError) as e:
        check_base_json(base)
    assert re.fullmatch(shape(base / "config.json", "a file of the base model",
                              r"save the base model again \(or copy it again from where it came from\)"),
                        str(e.value)), str(e.value)
