"""Python's standard library, where alignkit uses private names (rows S1, S2 of docs/architecture.md's table)."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import textwrap

WHERE = f"Python {platform.python_version()}"


def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)


def test_argparse_lists_the_subcommands_action_and_each_commands_option_strings():
    """cli/flags.py:translate_argv finds the subcommands in `parser._actions` (the action whose class is named
    `_SubParsersAction`, its `choices` the command parsers) and a command's own options in that parser's
    `_option_string_actions`: an option missing there would be rewritten into a `key=value` override."""
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--top")
    sub = parser.add_subparsers(dest="command")
    cmd = sub.add_parser("run")
    cmd.add_argument("--resume", "-r", action="store_true")
    found = _subparsers(parser)
    assert found is sub, f"{WHERE}: argparse's subcommands action is no longer in parser._actions as " \
                         f"'_SubParsersAction' (alignkit relies on it in cli/flags.py:translate_argv)"
    assert found.choices["run"] is cmd
    options = cmd._option_string_actions
    assert set(options) == {"-h", "--help", "--resume", "-r"}, \
        f"{WHERE}: ArgumentParser._option_string_actions is {sorted(options)} (cli/flags.py:translate_argv)"
    assert options["--resume"] is options["-r"] and options["--resume"].dest == "resume"


def test_translate_argv_keeps_a_commands_own_flags_and_rewrites_the_others():
    """The same, end to end on alignkit's own parser: `--resume` is sft's flag (kept as is), `--learning_rate` is
    not (TRL's spelling of `train.learning_rate`, rewritten)."""
    from alignkit.cli import build_parser
    from alignkit.cli.flags import translate_argv

    argv = ["sft", "c.yaml", "--resume", "--learning_rate", "1e-4"]
    assert translate_argv(build_parser(), argv) == ["sft", "c.yaml", "--resume", "train.learning_rate=1e-4"]


def test_atexit_run_exitfuncs_runs_the_handlers_before_os_exit(tmp_path):
    """distributed.py:exit_after_distributed_run runs `atexit._run_exitfuncs()` (TensorBoard writers, logging handlers) and then
    leaves with `os._exit(code)`, which runs no handler: every registered handler must run there, last registered
    first, once, and the exit code must be the one given."""
    out = tmp_path / "ran.txt"
    script = textwrap.dedent(f"""
        import atexit, os
        def note(name):
            with open({str(out)!r}, "a") as f:
                f.write(name + "\\n")
        atexit.register(note, "first")
        atexit.register(note, "second")
        atexit._run_exitfuncs()
        os._exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert out.read_text().split() == ["second", "first"], \
        f"{WHERE}: atexit._run_exitfuncs() no longer runs the registered handlers (distributed.py:exit_after_distributed_run)"


def test_atexit_run_exitfuncs_clears_the_handlers(tmp_path):
    """After `atexit._run_exitfuncs()` an interpreter that still exits normally does not run the handlers again
    (a writer closed twice)."""
    out = tmp_path / "ran.txt"
    script = textwrap.dedent(f"""
        import atexit
        atexit.register(lambda: open({str(out)!r}, "a").write("x"))
        atexit._run_exitfuncs()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "x", f"{WHERE}: atexit handlers ran {len(out.read_text())} times"
