"""What the docs show runs as written: every command and config key a reader can copy from README.md,
docs/*.md and bench/README.md is checked mechanically, without training.

- fenced ```bash blocks: every `alignkit <command> ...` line (also behind `accelerate launch ... -m alignkit`,
  `torchrun ... -m alignkit`, `.venv-vllm/bin/alignkit`) names a real command, and its flags parse; a config
  command (and `serve`) answers `--dry-run` from the repository root, so its config file, dotted keys and
  registry names are real, and so are its data paths and model folders (the dry run checks them; not for a line
  whose inputs lie under runs/ or are absolute, which an earlier step of the docs writes or the reader supplies); `make <target>` names a Makefile target,
  `pip install 'alignkit[x]'` a real extra,
  a script or config file named on the line exists, and `python bench/x.py --flag` uses flags the script
  defines. bench/README.md's indented command lines are read the same way.
- fenced ```python blocks compile (the README's "Using it" snippets also run: tests/test_readme.py);
  ```json blocks parse; ```yaml blocks parse and load as the config of the command their `command:` names.
- every backticked dotted key (`train.max_steps`, `method.vllm_mode=server`, `model.check_base: false`) is a
  key of the settings vocabulary (some command's `--help` lists it, or a `transformers.TrainingArguments`
  field under `train.`), or an old spelling the docs say is refused, which must then be refused.

A block that is deliberately partial, or needs a GPU / a server / files of the reader's own, carries the marker
`<!-- docs-check: skip: <why> -->` on the line before its fence, and a single line the trailing comment
`# docs-check: skip: <why>`: its commands are still parsed (command and flags), not run. No block is skipped
without a marker.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")), "bench/README.md"]
SKIP = re.compile(r"docs-check: skip: (\S.*?)\s*(?:-->)?\s*$")


@dataclasses.dataclass
class Block:
    doc: str
    line: int  # of the opening fence (1-based)
    lang: str
    body: str
    skip: str | None  # the marker's reason


def blocks(doc: str, text: str | None = None) -> list[Block]:
    """Fenced blocks of `doc` (and, in bench/README.md, 4-space indented command blocks as `bash`)."""
    lines = (ROOT / doc).read_text().splitlines() if text is None else text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if m:
            start, indent, body = i, len(m.group(1)), []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:])
                i += 1
            marker = SKIP.search(lines[start - 1]) if start and "<!--" in lines[start - 1] else None
            out.append(Block(doc, start + 1, m.group(2) or "text", "\n".join(body), marker and marker.group(1)))
        elif doc.startswith("bench/") and lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            out.append(Block(doc, start + 1, "bash", "\n".join(body).strip("\n"), None))
            continue
        i += 1
    return out


def config_comment_blocks(path: Path) -> list[Block]:
    """The command lines in a config file's comments (`#   alignkit ...`, `#   then: alignkit ...`), as bash."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^#\s+(?:then: |Train it first: |.*?: )?((?:alignkit|accelerate launch|pip install) .*)$", line)
        if m and not re.search(r"alignkit (corrects|config|gathers|copies)", m.group(1)):
            text = re.split(r"\s{3,}\((?!.*docs-check)", m.group(1))[0]  # "   (same output_dir)": prose after the command
            out.append(Block(str(path.relative_to(ROOT)), n - 1, "bash", text, None))
    return out


@dataclasses.dataclass
class Command:
    where: str  # doc:line
    text: str
    argv: list[str]
    skip: str | None



def inline_commands() -> list[Block]:
    """Backticked commands in the docs' prose (`alignkit demo --reft`, `make test-newest`,
    `python bench/tokenize_speed.py --rows 20000`), as bash blocks marked to be parsed, not run; spans with a
    placeholder (`<command>`, `...`, `N`) are left out."""
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for m in re.finditer(r"`((?:alignkit|make|python|\.venv/bin/python) [^`]*)`", text):
            span = m.group(1)
            if re.search(r"<|\.\.\.| N\b| / | -c$", span) or (span.startswith(("python", ".venv")) and " bench/" not in span):
                continue
            out.append(Block(doc, text[:m.start()].count("\n"), "bash", span, "inline mention: parsed, not run"))
    return out


def commands(every: list[Block] | None = None) -> list[Command]:
    """Every command line of every bash block (of the docs and the configs' comments): continuations joined,
    comments and a trailing `&` dropped."""
    if every is None:
        every = [b for doc in DOCS for b in blocks(doc)]
        every += [b for path in sorted((ROOT / "configs").rglob("*.yaml")) for b in config_comment_blocks(path)]
        every += inline_commands()
    out = []
    for block in (b for b in every if b.lang in ("bash", "sh", "shell")):
        lines = block.body.splitlines()
        n = 0
        while n < len(lines):
            first, text = n, lines[n]
            while text.rstrip().endswith("\\") and n + 1 < len(lines):
                n += 1
                text = text.rstrip()[:-1] + " " + lines[n].strip()
            n += 1
            marker = SKIP.search(text)
            words = shlex.split(text, comments=True)
            if words and words[-1] == "&":
                words.pop()
            if words:
                out.append(Command(f"{block.doc}:{block.line + 1 + first}", text.strip(), words,
                                   block.skip or (marker and marker.group(1))))
    return out


def alignkit_argv(words: list[str]) -> list[str] | None:
    """The arguments given to alignkit, for `alignkit ...`, `<venv>/bin/alignkit ...` and `... -m alignkit ...`."""
    if Path(words[0]).name == "alignkit":
        return words[1:]
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] == "alignkit":
            return words[i + 2:]
    return None


def script_flags(path: Path) -> set[str]:
    """Every `--flag` an argparse script defines (`add_argument("--x", ...)` string arguments), its own and those
    of the bench modules it imports (`import common`: common.parse_args)."""
    tree = ast.parse(path.read_text())
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (path.parent / f"{alias.name}.py").is_file():
                    flags |= script_flags(path.parent / f"{alias.name}.py")
    return flags


ALL = commands()


def test_the_docs_hold_commands_of_every_kind():
    """The extraction finds what the docs show (so a parser change cannot make the checks below vacuous)."""
    argvs = [alignkit_argv(c.argv) for c in ALL]
    named = {a[0] for a in argvs if a}
    assert {"sft", "dpo", "grpo", "sample", "ls", "serve", "augment", "vllm-serve", "annotate", "eval"} <= named, named
    assert sum(len(c.argv) > 1 and c.argv[1].startswith("bench/") for c in ALL) >= 10
    assert sum(c.where.startswith("configs/") for c in ALL) >= 20


def test_the_skip_marker_is_honoured_and_needs_a_reason():
    text = ("<!-- docs-check: skip: needs a GPU -->\n```bash\nalignkit dpo --config my.yaml\n```\n\n"
            "```bash\nalignkit sft --config mine.yaml   # docs-check: skip: your own config\nalignkit ls\n```\n")
    found = commands(blocks("README.md", text))
    assert [(alignkit_argv(c.argv)[:1], c.skip) for c in found] == [
        (["dpo"], "needs a GPU"), (["sft"], "your own config"), (["ls"], None)]
    assert all(c.skip for c in ALL if "docs-check" in c.text)


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: c.where)
def test_a_shell_line_names_real_things(cmd, monkeypatch, capsys):
    """Each line's program, files, flags and (for alignkit) config resolve; alignkit's config commands pass
    `--dry-run` from the repository root unless the line is marked."""
    monkeypatch.chdir(ROOT)
    words = cmd.argv
    for word in words:  # files the line names that a fresh checkout has
        value = word.split("=", 1)[-1]
        if re.match(r"^(configs|bench|src|tests)/\S+\.(ya?ml|py|sh|json)$", value):
            assert (ROOT / value).is_file(), f"{cmd.where}: {value} does not exist: {cmd.text}"
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(words[1:]) <= targets, f"{cmd.where}: no Makefile target {set(words[1:]) - targets}"
        return
    if words[:2] == ["pip", "install"]:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in words[2:]:
            m = re.match(r"alignkit\[(.*)\]$", spec)
            assert spec == "deepspeed" or (m and set(m.group(1).split(",")) <= set(extras)), \
                f"{cmd.where}: {spec}: alignkit's extras are {sorted(extras)}"
        return
    if words[0] == "bash":
        return
    script = next((w for w in words[:3] if w.startswith("bench/") and w.endswith(".py")), None)
    if script is not None:
        flags = script_flags(ROOT / script)
        used = {w.split("=")[0] for w in words[words.index(script) + 1:] if w.startswith("--")}
        assert used <= flags, f"{cmd.where}: {script} has no {sorted(used - flags)}: {cmd.text}"
        return
    if words[0].endswith("python") and words[1:2] == ["-c"]:
        compile(words[2], cmd.where, "exec")
        return
    argv = alignkit_argv(words)
    assert argv is not None, f"{cmd.where}: a command this test does not know how to check: {cmd.text}"
    from alignkit.cli import COMMANDS, build_parser, main
    from alignkit.cli.flags import translate_argv
    from alignkit.cli.helptext import CONFIG_COMMANDS

    parser = build_parser(argv)
    if cmd.skip and cmd.skip.startswith("inline"):  # a mention (`alignkit demo --reft`, `alignkit --help`): its
        sub = parser._subparsers._group_actions[0].choices.get(argv[0]) if argv and argv[0] in COMMANDS else None
        options = {o for p in (parser, sub) if p for a in p._actions for o in a.option_strings}
        flags = {w for w in argv if w.startswith("-")}
        assert (sub or argv == ["--help"]) and flags <= options, f"{cmd.where}: {cmd.text}: {sorted(flags - options)}"
        return
    assert argv and argv[0] in COMMANDS, f"{cmd.where}: no alignkit command {argv[:1]}: {cmd.text}"
    try:  # as main() parses: TRL-style flags become overrides, then argparse (an unknown flag: SystemExit(2))
        args, extra = parser.parse_known_args(translate_argv(parser, argv))
    except SystemExit as e:
        pytest.fail(f"{cmd.where}: alignkit {argv[0]} refuses the flags: {cmd.text}\n{capsys.readouterr().err}"
                    if e.code else f"{cmd.where}: {cmd.text} exits at parse time")
    assert not [x for x in extra if x.startswith("-") or "=" not in x], f"{cmd.where}: unknown {extra}: {cmd.text}"
    if cmd.skip or not (argv[0] in CONFIG_COMMANDS or argv[0] == "serve"):
        return
    skip_earlier_step_checks(argv, monkeypatch)
    rc = main([*argv, "--dry-run"])
    assert rc == 0, (cmd.where, cmd.text, capsys.readouterr())


EARLIER_STEP = re.compile(r"(?:^|[\s=])['\"]?(?:runs/|/[\w.])")  # a path an earlier documented step writes (runs/...)


def skip_earlier_step_checks(argv: list[str], monkeypatch) -> None:
    """A line whose inputs an earlier step of the docs writes (runs/..., in its words or its config's values other
    than output_dir; annotate's round folder, written by `alignkit sample`) or the reader supplies (/data/...): they
    are not in a checkout, so the dry run's data check and the command's own checks (model / adapter / annotator
    folders, round folder; serve's folders) are off for it; its config, keys and registry names are still checked."""
    words = [w for w in argv if not w.startswith("output_dir=")]
    config = next((argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--config", "-c")), None)
    if config is not None and (ROOT / config).is_file():
        words += [line.split("#")[0] for line in (ROOT / config).read_text().splitlines()
                  if not line.lstrip().startswith(("#", "output_dir"))]
    import alignkit.cli.runfolder

    if "--resume" in argv:  # the run folder it continues is the previous line's
        monkeypatch.setattr(alignkit.cli.runfolder, "check_output", lambda cfg, args: "(the previous line's run)")
    if argv[0] != "annotate" and not any(EARLIER_STEP.search(w) for w in words):
        return
    import alignkit.cli.serve
    import alignkit.serve.vllm_server

    monkeypatch.setattr(alignkit.cli.runfolder, "check_sources", lambda ds, kind: [])
    monkeypatch.setattr(alignkit.cli.runfolder, "command_checks", lambda cfg, args, dry: [])
    monkeypatch.setattr(alignkit.cli.serve, "check_folders", lambda cfg: None)
    monkeypatch.setattr(alignkit.cli.serve, "vllm_config_checks", lambda cfg: [])  # the base's config.json
    monkeypatch.setattr(alignkit.serve.vllm_server, "check_adapters", lambda adapters: {})


# ---------------------------------------------------------------------------------------------- other blocks

def every_block(lang: str) -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc) if b.lang == lang]


def test_python_json_and_yaml_blocks_parse(tmp_path):
    """```python blocks compile, ```json blocks parse, ```yaml blocks load as the config their `command:` names
    (unless marked: a deliberately partial block)."""
    from alignkit.settings import ConfigError, load_config

    assert len(every_block("python")) >= 3 and every_block("json")
    for block in every_block("python"):
        compile(block.body, f"{block.doc}:{block.line}", "exec")
    for block in every_block("json"):
        for line in block.body.splitlines():
            json.loads(line)
    for block in every_block("yaml"):
        data = yaml.safe_load(block.body)
        if block.skip:
            continue
        assert isinstance(data, dict) and "command" in data, f"{block.doc}:{block.line}: a config names its command"
        path = tmp_path / "block.yaml"
        path.write_text(block.body)
        try:
            load_config(path, command=data["command"])
        except ConfigError as e:
            pytest.fail(f"{block.doc}:{block.line}: {e}")


def test_the_augment_example_writes_what_the_readme_shows(tmp_path, monkeypatch):
    """README "Augmenting data": `alignkit augment --config configs/augment-code-bugs.yaml` writes 20 records from
    5 bundled functions, and the line shown is one of them (its source path shortened to `...`)."""
    from alignkit.cli import main

    text = (ROOT / "README.md").read_text()
    assert "alignkit augment --config configs/augment-code-bugs.yaml          # 20 records from 5 bundled functions" \
        in text
    [block] = [b for b in every_block("json") if "code_bugs" in b.body]
    shown = json.loads(block.body)
    monkeypatch.chdir(ROOT)
    assert main(["-q", "augment", "--config", "configs/augment-code-bugs.yaml", f"output_dir={tmp_path}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "augmented.jsonl").read_text().splitlines()]
    assert len(records) == 20 and len({r["meta"]["source"].rsplit(":", 1)[0] for r in records}) == 1
    assert len({r["meta"]["source"] for r in records}) == 5
    for r in records:
        r["meta"]["source"] = ".../alignkit/" + r["meta"]["source"].split("/alignkit/", 1)[1]
    assert shown in records


# ---------------------------------------------------------------------------------------------- inline names

SECTIONS = ("model", "data", "adapter", "method", "train", "sampling", "generation", "annotator", "llm", "filters",
            "options")
# backticked dotted names that start like a config section but are Python attributes, not config keys
NOT_CONFIG = {"model.generate", "model.load_weights", "model.base_model", "adapter.route",
              "data.collators.shared_prefix_layout", "generation.shared_prompt_cache"}
# misspelt keys the docs quote with their error message: the config that gives it
QUOTED_ERRORS = {"adapter.reft.config.representations[0].layr": {
    "model": {"path": "tiny:llama"}, "data": {"path": "bundled:data/hh_rlhf_sample.jsonl"},
    "adapter": {"kind": "reft", "reft": {"config": {"representations": [{"layr": 1}]}}}}}


def inline_keys() -> list[tuple[str, str, str]]:
    """(doc:line, key, what follows it) of every backticked `section.key` (alone, `=value`, `: value`)."""
    pattern = re.compile(r"`((?:%s)\.[A-Za-z_][\w.\[\]]*)([=:][^`]*)?`" % "|".join(SECTIONS))
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        out += [(f"{doc}:{text[:m.start()].count(chr(10)) + 1}", m.group(1).rstrip("."), m.group(2) or "")
                for m in pattern.finditer(text)]
    return out


def test_every_config_key_the_docs_name_is_in_the_vocabulary_or_refused_as_old():
    """A dotted key in the docs is one some command's `--help` lists (or a TrainingArguments field under train:,
    or a key inside a mapping-valued key such as method.vllm / model.rope_scaling, or a section prefix such as
    adapter.reft.config); otherwise it must be an old spelling that every command with the section refuses in one
    line naming the new key (the docs list those on purpose)."""
    import transformers

    from alignkit.cli.helptext import settable_keys
    from alignkit.settings import CONFIG_CLASSES, ConfigError, config_from_dict, load_config

    vocab = {c: {k for k, _, _ in settable_keys(c)} for c in CONFIG_CLASSES}
    known = set().union(*vocab.values()) | {f"train.{f.name}" for f in dataclasses.fields(transformers.TrainingArguments)}
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    keys = inline_keys()
    assert len(keys) >= 50
    bad = []
    for where, key, rest in keys:
        parts = key.split(".")
        if key in QUOTED_ERRORS:  # the docs quote the error: it is the loader's
            with pytest.raises(ConfigError) as e:
                config_from_dict(QUOTED_ERRORS[key], "sft")
            assert f"{key}{' '.join(rest.split())}" in str(e.value), (where, str(e.value))
            continue
        if key in NOT_CONFIG or key in known or key in prefixes or any(
                ".".join(parts[:i]) in known for i in range(1, len(parts))):
            continue
        command = "grpo" if parts[0] == "method" else "sft"  # online method keys are where the old ones lived
        base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", "annotator.kind=function",
                "annotator.function=alignkit.rewards:digit_fraction"][:4 if command == "grpo" else 2]
        try:
            load_config(None, [*base, f"{key}=1"], command=command)
            bad.append(f"{where}: {key} is accepted by {command} but no command's --help lists it")
        except ConfigError as e:
            if not re.search(r"renamed; use |removed ", str(e)):
                bad.append(f"{where}: {key} is no config key: {e}")
    assert not bad, "\n".join(bad)


def test_names_the_docs_cite_exist():
    """`tests/x.py::test_y` (or `test_x.py::test_y` in docs/architecture.md's compat table) names a test that exists;
    `alignkit.module.name` / `alignkit.module:function` resolves."""
    import importlib

    bad = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for m in re.finditer(r"(?<![\w/])((?:tests/[\w/]+/)?test_\w+\.py)(?:::(\w+))?", text):
            path, name = m.groups()
            files = [ROOT / path] if path.startswith("tests/") else list((ROOT / "tests").rglob(path))
            if not any(f.is_file() for f in files):
                bad.append(f"{doc}: {path} does not exist")
            elif name and not any(name in {n.name for n in ast.walk(ast.parse(f.read_text()))
                                           if isinstance(n, (ast.FunctionDef, ast.ClassDef))} for f in files):
                bad.append(f"{doc}: {path}::{name} does not exist")
        for m in re.finditer(r"`(alignkit(?:\.\w+)+(?::\w+)?)", text):
            parts = m.group(1).replace(":", ".").split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    obj = getattr(obj, attr, None)
                if obj is None:
                    bad.append(f"{doc}: {m.group(1)} does not resolve")
                break
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------- --help texts

@pytest.mark.parametrize("command, config", [
    ("sft", "sft-tiny"), ("rm", "rm-tiny"), ("dpo", "dpo-tiny"), ("kto", "kto-tiny"), ("eval", "eval-dpo-tiny"),
    ("generate", "generate-tiny"), ("online-dpo", "online-dpo-tiny"), ("grpo", "grpo-tiny"), ("rloo", "rloo-tiny"),
    ("ppo", "ppo-tiny"), ("sample", "sample-tiny"), ("annotate", "annotate-tiny"), ("serve", "serve"),
    ("augment", "augment-code-bugs")])
def test_the_help_example_overrides_work_for_their_command(command, config, monkeypatch, capsys):
    """`alignkit <command> --help` shows `key=value` examples; they are keys of that command (it showed
    method.beta=0.05 train.learning_rate=1e-4 to every command: eval, generate, sample, annotate, serve and augment
    refused them as unknown keys)."""
    from alignkit.cli import build_parser, main

    monkeypatch.chdir(ROOT)
    text = " ".join(build_parser([command]).format_help().split())
    assert command in text
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    example = re.search(r"dotted overrides parsed as YAML scalars, e\.g\. (.*?) (?:-|options:|keys )", help_text)
    assert example, help_text[:500]
    overrides = example.group(1).split()
    assert len(overrides) == 2 and all("=" in o for o in overrides), overrides
    skip_earlier_step_checks([command, "--config", f"configs/{config}.yaml"], monkeypatch)
    assert main([command, "--config", f"configs/{config}.yaml", *overrides, "--dry-run"]) == 0, capsys.readouterr()
