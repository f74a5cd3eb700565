"""The README's "Using it" section runs as written: every python snippet, in order, in one namespace, with
"path/to/model" pointing at a tiny model saved locally."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def using_it_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Using it"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_python_snippets_run(tiny_dir, tmp_path, monkeypatch):
    snippets = using_it_snippets()
    assert len(snippets) >= 2
    monkeypatch.chdir(tmp_path)
    model = tiny_dir("llama", num_layers=5)  # the ReFT snippet intervenes on layers 2 and 4
    ns: dict = {}
    for code in snippets:
        exec(compile(code.replace("path/to/model", str(model)), str(README), "exec"), ns)
    assert ns["trainer"].state.global_step == 2
    assert (tmp_path / "runs" / "readme-dpo").exists()


# The shell lines of this section (and of every doc) are checked by tests/test_docs_commands.py.
