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


def test_readme_shell_commands_check(monkeypatch, capsys):
    """Every `alignkit ...` line of the section's shell block, from the repository root, passes the command's own
    checks with --dry-run (configs, dotted keys, registry names); `alignkit ls` runs. The launcher lines
    (accelerate) name a config of the reader's own and are not run."""
    import shlex

    from alignkit.cli import main

    text = README.read_text()
    section = text[text.index("## Using it"):]
    section = section[:section.index("\n## ", 1)]
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("alignkit ")]
    assert len(commands) >= 5 and ["ls"] in commands
    monkeypatch.chdir(README.parent)
    for args in commands:
        rc = main(args if args == ["ls"] else [*args, "--dry-run"])
        assert rc == 0, (args, capsys.readouterr())
