"""`--dry-run` of every command checks what its run checks before it writes (output folder, data paths and their
first rows, model / adapter folders, the annotator, annotate's round folder, augment's sources and LLM, serve's
folders and chat template), writes nothing, and ends with one line saying what was checked; the first problem is
one line naming the file or key and the fix (exit 2).

Before: the dry run printed the config after checking the config keys and (for the commands reading records) the
data paths: annotate and augment checked no input at all, a missing model folder, a --resume with nothing to resume,
an output_dir holding a previous run, a reward model path that was not a reward model, a round folder without
samples passed (exit 0), and the run then stopped at them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CORPUS = Path(__file__).resolve().parents[1] / "reliability" / "corpus"
TINY = ["model.path=tiny:llama", "model.adapter_path=null"]  # (eval / generate configs name a trained run's model)

SAMPLE = {"prompt": "Q", "response": "a", "prompt_ids": [1, 2], "response_ids": [3], "finish_reason": "stop"}


def write_round(folder: Path, first_line: str | None = None, manifest: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text((first_line if first_line is not None else json.dumps(SAMPLE)) + "\n")
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"samples": {"metrics": {}}}))


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["-q", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# (case, command, config, overrides ({tmp}: the test's folder), setup(tmp), what the one line must contain)
def _held(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("command: sft\n")


def _foreign_staging(tmp: Path) -> None:
    _held(tmp)
    (tmp / ".run.staging").mkdir()
    (tmp / ".run.staging" / "mine.txt").write_text("the user's")


REFUSALS = [
    ("output_dir holds a run", "sft", "sft-tiny", [], _held, ["output_dir:", "already holds files", "--overwrite"]),
    ("--overwrite, a foreign staging folder", "sft", "sft-tiny", ["--overwrite"], _foreign_staging,
     [".run.staging is in the way and was not made by alignkit"]),
    ("output_dir is a file", "augment", "augment-code-bugs", [],
     lambda t: (t / "run").write_text("x"), ["output_dir:", "is a file"]),
    ("--resume without a run", "dpo", "dpo-tiny", ["--resume"], None, ["--resume:", "holds no run to resume"]),
    ("model.path missing", "dpo", "dpo-tiny", ["model.path={tmp}/no-model"], None,
     ["model.path:", "no-model does not exist"]),
    ("model.adapter_path missing", "generate", "generate-tiny", ["model.path=tiny:llama",
                                                                 "model.adapter_path={tmp}/no-adapter"], None,
     ["model.adapter_path:", "no-adapter does not exist"]),
    ("reward model missing", "grpo", "grpo-tiny", ["annotator.kind=reward_model", "annotator.function=null",
                                                   "annotator.path={tmp}/no-rm"], None,
     ["annotator.path:", "no-rm does not exist"]),
    ("function module not found", "grpo", "grpo-tiny", ["--allow-code",
                                                        "annotator.function=no_such_module_xyz:score"], None,
     ["annotator.function:", "no module 'no_such_module_xyz'"]),
    ("eval's own reference", "eval", "eval-dpo-tiny", TINY, None, ["would be its own reference"]),
    ("annotate without samples", "annotate", "annotate-tiny", [], lambda t: (t / "run").mkdir(),
     ["output_dir:", "has no samples.jsonl", "alignkit sample"]),
    ("annotate, sampling unfinished", "annotate", "annotate-tiny", [],
     lambda t: write_round(t / "run", manifest=False), ["samples.jsonl is not complete", "alignkit sample"]),
    ("annotate, broken first sample", "annotate", "annotate-tiny", [],
     lambda t: write_round(t / "run", '{"prompt": '), ["samples.jsonl:1: broken JSON line"]),
    ("annotate, not a sample", "annotate", "annotate-tiny", [],
     lambda t: write_round(t / "run", '{"prompt": "Q"}'), ["samples.jsonl:1: missing key(s)"]),
    ("augment data missing", "augment", "augment-code-bugs", ["data.path={tmp}/nope.jsonl"], None,
     ["nope.jsonl: no such data file or folder"]),
    ("augment column missing", "augment", "augment-paraphrase", [f"data.path={CORPUS / 'good_pairs.jsonl'}",
                                                                 "options.field=question"], None, ["question"]),
    ("augment local LLM missing", "augment", "augment-paraphrase", ["llm.kind=local", "llm.path={tmp}/no-llm",
                                                                    "llm.base_url=null", "llm.model=null",
                                                                    "llm.requests_per_minute=null"], None,
     ["llm.path:", "no-llm does not exist"]),
    ("augment API key unset", "augment", "augment-paraphrase", ["llm.api_key_env=ALIGNKIT_TEST_UNSET_KEY"], None,
     ["llm.api_key_env:", "ALIGNKIT_TEST_UNSET_KEY is not set"]),
]


@pytest.mark.parametrize("case,command,config,overrides,setup,needles", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_dry_run_refuses_what_the_run_stops_at(case, command, config, overrides, setup, needles, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.delenv("ALIGNKIT_TEST_UNSET_KEY", raising=False)
    if setup is not None:
        setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [command, "--config", str(CONFIGS / f"{config}.yaml"), f"output_dir={tmp_path / 'run'}",
            *(o.replace("{tmp}", str(tmp_path)) for o in overrides)]
    rc, out, err = run_cli(capsys, [*args, "--dry-run"])
    assert rc == 2 and err.count("\n") == 1, (out, err)
    assert all(n in err for n in needles), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    if command not in ("grpo",) and "--resume" not in overrides:  # the run stops at the same input, saying the same
        rc, out, err = run_cli(capsys, args)
        assert rc == 2 and all(n in err for n in needles), err


OK_CASES = {"sft": ("sft-tiny", []), "dpo": ("dpo-tiny", []), "grpo": ("grpo-tiny", []),
            "eval": ("eval-rm-tiny", TINY), "generate": ("generate-tiny", TINY), "sample": ("sample-tiny", []),
            "annotate": ("annotate-tiny", []), "augment": ("augment-code-bugs", [])}


@pytest.mark.parametrize("command", sorted(OK_CASES))
def test_dry_run_says_what_it_checked_and_writes_nothing(command, tmp_path, capsys):
    import yaml

    config, overrides = OK_CASES[command]
    out_dir = tmp_path / "run"
    if command == "annotate":
        write_round(out_dir)
    before = sorted(tmp_path.rglob("*"))
    rc, out, err = run_cli(capsys, [command, "--config", str(CONFIGS / f"{config}.yaml"), f"output_dir={out_dir}",
                                    *overrides, "--dry-run"])
    assert rc == 0, err
    assert yaml.safe_load(out)["command"] == command  # the comments leave the config loadable
    lines = out.strip().splitlines()
    assert lines[-1].startswith("# --dry-run: OK, ") and "nothing was written" in lines[-1], lines[-1]
    assert f"# --dry-run checked output_dir {out_dir}" in out
    if command not in ("annotate", "augment"):
        assert "# --dry-run checked model.path" in out, out
    if command in ("grpo", "annotate"):
        assert "# --dry-run checked annotator.function: alignkit.rewards:" in out, out
    assert sorted(tmp_path.rglob("*")) == before


def test_dry_run_finds_allowed_code_without_importing_it(tmp_path, capsys, monkeypatch):
    """--allow-code: the function's module is found on sys.path (a misspelt one is refused above) and not imported."""
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    trace = tmp_path / "imported.txt"
    (pkg / "__init__.py").write_text(f"from pathlib import Path\nPath({str(trace)!r}).write_text('x')\n")
    (pkg / "rewards.py").write_text(f"from pathlib import Path\nPath({str(trace)!r}).write_text('x')\n"
                                    "def score(prompt, response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={tmp_path / 'run'}", "--allow-code"]
    rc, out, err = run_cli(capsys, [*base, "annotator.function=my_pkg.rewards:score", "--dry-run"])
    assert rc == 0 and "annotator.function: my_pkg.rewards:score found" in out, err
    rc, out, err = run_cli(capsys, [*base, "annotator.function=my_pkg.nope:score", "--dry-run"])
    assert rc == 2 and "no module 'my_pkg.nope'" in err, err
    assert not trace.exists()


def test_dry_run_of_overwrite_leaves_the_old_run_and_its_staging_folder(tmp_path, capsys):
    """plan_run's dry form: --overwrite --dry-run neither removes a leftover staging folder nor completes a swap."""
    _held(tmp_path)
    staging = tmp_path / ".run.staging"
    staging.mkdir()
    (staging / ".alignkit-staging").write_text("")
    before = sorted(tmp_path.rglob("*"))
    rc, out, err = run_cli(capsys, ["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                                    "--overwrite", "--dry-run"])
    assert rc == 0, err
    assert "replaced as a whole when the new run finishes" in out
    assert sorted(tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------- serve

PARTS_ONLY = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}\n"
              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def base_with_template(tiny_dir, tmp_path):
    """Factory: a copy of the tiny llama folder whose tokenizer has chat template `template`."""
    import shutil

    from alignkit.models.loading import load_tokenizer

    def make(template: str) -> Path:
        folder = tmp_path / "base"
        shutil.copytree(tiny_dir("llama"), folder)
        tok = load_tokenizer(folder)
        tok.chat_template = template
        tok.save_pretrained(folder)
        return folder

    return make


def test_serve_dry_run_refuses_a_template_that_drops_string_content(base_with_template, tmp_path, capsys):
    base = base_with_template(PARTS_ONLY)
    rc, out, err = run_cli(capsys, ["serve", "--base", str(base), "--output-dir", str(tmp_path / "log"), "--dry-run"])
    assert rc == 2 and err.count("\n") == 1, (out, err)
    assert f"base {base}: its chat template renders a user message without its text" in err
    assert "/v1/completions" in err and not (tmp_path / "log").exists()


def test_serve_dry_run_checks_folders_and_template(base_with_template, tmp_path, capsys):
    base = base_with_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    rc, out, err = run_cli(capsys, ["serve", "--base", str(base), "--output-dir", str(tmp_path / "log"), "--dry-run"])
    assert rc == 0, err
    assert f"# --dry-run checked base {base}: its chat template renders a message's text" in out
    assert out.strip().splitlines()[-1].startswith("# --dry-run: OK, 3 check(s) passed")
    assert not (tmp_path / "log").exists()
    rc, out, err = run_cli(capsys, ["serve", "--base", str(tmp_path / "nothing"), "--dry-run"])
    assert rc == 2 and "base:" in err and "does not exist" in err, err


def test_served_base_with_a_parts_only_template_is_refused_at_load(base_with_template):
    """The server itself (not only its dry run) refuses such a base before loading the model."""
    from alignkit.serve.stack import load_stack

    with pytest.raises(ValueError, match="renders a user message without its text"):
        load_stack(base_with_template(PARTS_ONLY), {})


@pytest.mark.parametrize("flags, demo", [([], "pipeline"), (["--reft", "--max-steps", "5"], "reft")])
def test_demo_dry_run_checks_its_options_and_writes_nothing(flags, demo, tmp_path, capsys, monkeypatch):
    """`alignkit demo` had no --dry-run (argparse refused the flag). Now it checks what the demo checks before it
    writes (options, --output-dir, --reft's pairs file), prints what it would run through the shared printer and
    writes nothing: neither --output-dir nor the default runs/ folder of the working directory."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    rc, stdout, err = run_cli(capsys, ["demo", *flags, "--output-dir", str(out), "--dry-run"])
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert f"demo: {demo}" in lines and f"# --dry-run checked output_dir {out}: created when the demo starts" in lines
    assert lines[-1].startswith("# --dry-run: OK, ") and "nothing was written" in lines[-1], lines[-1]
    if demo == "reft":
        assert "max_steps: 5" in lines and "# --dry-run checked pairs: the bundled pairs, 12 (prompt, response) " \
                                           "record(s)" in lines, stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setup, flags, needle", [
    ("foreign", [], "which the demo does not write"),
    ("pairs", ["--reft"], "line 1: expected a JSON object with 'prompt' and 'response'"),
    (None, ["--scale", "0"], "--scale 0.0: must be a finite number > 0")])
def test_demo_dry_run_refuses_what_the_demo_stops_at(setup, flags, needle, tmp_path, capsys):
    out = tmp_path / "demo"
    if setup == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if setup == "pairs":
        (tmp_path / "pairs.jsonl").write_text("not json\n")
        flags = [*flags, "--pairs", str(tmp_path / "pairs.jsonl")]
    rc, stdout, err = run_cli(capsys, ["demo", *flags, "--output-dir", str(out), "--dry-run"])
    said = [line for line in err.splitlines() if line.startswith("alignkit ")]
    assert rc == 2 and len(said) == 1 and needle in said[0], err
    assert not stdout and sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        {"foreign": ["demo", "notes.txt"], "pairs": ["pairs.jsonl"], None: []}[setup])
