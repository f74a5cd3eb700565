"""The small JSON files alignkit reads (a ReFT adapter's reft_config.json, a pyreft config.json, a tokenizer's
tokenizer_config.json, an online round's manifest) are read by one reader (`alignkit.files.read_json_object`): a
damaged one is one line naming the file, where json stopped and the fix, in the caller's error class."""

from __future__ import annotations

import pytest

from alignkit.files import DataError
from alignkit.interventions.io import CONFIG_NAME, saved_reft_config
from alignkit.interventions.pyreft_compat import read_pyreft_folder
from alignkit.models.loading import load_tokenizer
from alignkit.online.rounds import MANIFEST_FILE, read_manifest

READERS = {
    "reft": (CONFIG_NAME, saved_reft_config, ValueError, "save the adapter again"),
    "pyreft": ("config.json", read_pyreft_folder, ValueError, "re-save it with pyreft"),
    "tokenizer": ("tokenizer_config.json", load_tokenizer, ValueError, "re-save the tokenizer with save_pretrained"),
    "round": (MANIFEST_FILE, read_manifest, DataError, "delete it to redo the round"),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("content, said", [
    (b'{"a": 1,, "b": 2}', "not valid JSON at line 1, column 9 (Expecting property name enclosed in double quotes)"),
    (b'{"a": "\xff"}', "not valid JSON (not UTF-8 text at byte 7)"),
    (b"[1, 2]", "holds a JSON list, not an object"),
])
def test_a_damaged_json_file_is_one_line_naming_it_where_and_the_fix(reader, content, said, tmp_path):
    """Before, each reader worded it its own way ("not valid JSON (Expecting ... (char 8))"), and a file that is not
    UTF-8 (reft, tokenizer, round) or holds a list (tokenizer: AttributeError 'list' object has no attribute 'get';
    round: a list returned as the manifest) went through unexplained."""
    name, read, error, fix = READERS[reader]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error) as e:
        read(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / name}: {said}") and msg.endswith(f"the file is damaged; {fix}")
