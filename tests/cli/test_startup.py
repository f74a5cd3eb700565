"""`alignkit --help` is built from the command table alone (no torch, transformers or peft import), and that
table says exactly what the command modules register."""

from __future__ import annotations

import subprocess
import sys

from alignkit.cli import COMMANDS, build_parser


def _subparsers(parser):
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


def test_command_table_matches_what_the_modules_register():
    sub = _subparsers(build_parser())  # every module registers fully
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert list(helps) == list(COMMANDS)
    for command, (module, text) in COMMANDS.items():
        assert helps[command] == text, f"alignkit.cli.COMMANDS[{command!r}] help differs from alignkit.cli.{module}"
        assert sub.choices[command].get_default("func").__module__ == f"alignkit.cli.{module}", command


def test_top_level_help_imports_no_heavy_library():
    code = ("import sys\nfrom alignkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nheavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', "
            "'datasets') if m in sys.modules)\nprint('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    for command in COMMANDS:
        assert command in out.stdout  # every command listed with its help line


def test_a_command_loads_only_its_module():
    parser = build_parser(["-q", "ls"])
    sub = _subparsers(parser)
    assert sub.choices["ls"].get_default("func").__module__ == "alignkit.cli.listing"
    assert sub.choices["dpo"].get_default("func") is None  # a stub: its module was not imported for `ls`


def test_command_help_imports_no_heavy_library_and_lists_the_keys():
    code = ("import sys\nfrom alignkit.cli import main\ntry:\n    main(['dpo', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nheavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', "
            "'datasets') if m in sys.modules)\nprint('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    lines = out.stdout.splitlines()
    assert any(line.split() == ["train.learning_rate", "float", "=", "1e-06"] for line in lines)
    assert any(line.split() == ["method.beta", "float", "=", "0.1"] for line in lines)


def test_serve_demo_ls_help_import_no_heavy_library_and_show_types_and_defaults():
    code = ("import contextlib, io, sys\nfrom alignkit.cli import main\nfor c in ('serve', 'demo', 'ls'):\n"
            "    out = io.StringIO()\n    with contextlib.redirect_stdout(out):\n        try:\n"
            "            main([c, '--help'])\n        except SystemExit as e:\n            assert e.code == 0, e.code\n"
            "    print(f'=== {c}'); print(out.getvalue())\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    serve, demo, ls = (part.split("\n", 1)[1] for part in out.stdout.split("=== ")[1:])
    flat = " ".join(serve.split())
    assert "(int, default 8000)" in flat and "(float, default 120.0)" in flat and "(str, default '127.0.0.1')" in flat
    assert any(line.split() == ["max_batch_rows", "int", "=", "32"] for line in serve.splitlines())  # the key list
    flat = " ".join(demo.split())
    assert "--seed INT random seed (int, default 0)" in flat and "(int, default 300)" in flat
    assert "SECTION" in ls and "default: every section" in " ".join(ls.split())


def test_augment_strategies_import_no_heavy_library():
    """AugmentConfig's checks import alignkit.augment.strategies, which imports augment.llm: its module-level import
    of alignkit.data.chat ran alignkit/data/__init__ (collators: torch), 0.2 s -> 3 s and torch in every HTTP-backend
    augment run. Only llm.kind local's LocalChat imports torch, when it answers. Fails without the fix: yes."""
    code = ("import sys\nfrom alignkit.augment.strategies import STRATEGIES\nimport alignkit.augment.llm\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
