"""Kill and crash safety of what the one-shot commands (sample, annotate, augment, generate, eval, serve) write
over an earlier run's files: the earlier file stays byte-equal, or the new one is whole; never a cut file.

A full disk is stood in for by RLIMIT_FSIZE in a child process (a write past the limit fails with EFBIG, as one
past the free space fails with ENOSPC); a kill by SIGKILL of a real `alignkit augment` child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

FULL_DISK = """
import resource, signal, sys
from alignkit.settings import load_config, save_config
cfg = load_config(sys.argv[1], ["batch_size=3"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an OSError, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_config(cfg, sys.argv[2])
except OSError as e:
    print("OSError", e.errno)
    sys.exit(3)
"""


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing catches it on the way out."""


def child_env() -> dict[str, str]:
    src = str(Path(__import__("alignkit").__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_FSIZE: Linux")
def test_a_config_write_that_fails_half_way_leaves_the_previous_config_whole(tmp_path):
    """save_config wrote config.yaml (eval / generate / augment) and sample.yaml / annotate.yaml in place: a write
    that failed part-way (a full disk) left the previous run's file cut to what fitted, read back as a config with
    keys missing. Now through the atomic writer: the previous file is byte-equal and no temporary file is left."""
    from alignkit.settings import load_config, save_config

    target = tmp_path / "config.yaml"
    save_config(load_config(CONFIGS / "generate-tiny.yaml"), target)
    before = target.read_bytes()
    assert len(before) > 64  # the limit cuts the new write part-way
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(CONFIGS / "generate-tiny.yaml"), str(target)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr  # the write failed, loudly
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def cache_entries(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.glob("cache/*/*.json"))}


def test_augment_killed_while_asking_keeps_the_previous_run_and_its_rerun_equals_an_unkilled_one(tmp_path):
    """A real SIGKILL of `alignkit augment` over a finished run in the same output_dir, while it is asking the LLM
    (its cache has grown by an entry and the next answer is held): the previous run's augmented.jsonl, summary.json
    and config.yaml are byte-equal, every cache entry is whole JSON, and the rerun (answered from the cache for what
    the killed run had paid for) writes what an unkilled run into a fresh folder writes."""
    import threading

    from tests.augment.fake_openai import serving
    from tests.augment.test_augment_cli import fake_answer, run_llm

    gate = threading.Event()
    answered = {"n": 0, "hold_after": None}
    lock = threading.Lock()

    def responder(messages):
        with lock:
            answered["n"] += 1
            held = answered["hold_after"] is not None and answered["n"] > answered["hold_after"]
        if held:
            gate.wait(120)  # until the child has been killed
        return fake_answer(messages)

    out, fresh = tmp_path / "out", tmp_path / "fresh"
    data = "data.path=bundled:data/seed_tasks.jsonl"
    with serving(responder) as (fake, url):
        assert run_llm(out, url, "paraphrase", "bundled:data/seed_tasks.jsonl", "options.n=2") == 0
        before = {n: (out / n).read_bytes() for n in ("augmented.jsonl", "summary.json", "config.yaml")}
        cached = cache_entries(out)
        with lock:
            answered["hold_after"] = answered["n"] + 1  # the killed run: one new answer cached, the next one held
        llm = f"llm={{kind: openai, base_url: '{url}', model: fake, concurrency: 1}}"
        child = subprocess.Popen([sys.executable, "-m", "alignkit", "-q", "augment", "strategy=paraphrase", data,
                                  f"output_dir={out}", llm, "options.n=3"], env=child_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while len(cache_entries(out)) <= len(cached):
                assert child.poll() is None, child.stdout.read().decode()
                assert time.monotonic() < deadline, "the child never wrote a cache entry"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(60)
            gate.set()
        assert child.returncode == -signal.SIGKILL
        assert {n: (out / n).read_bytes() for n in before} == before
        entries = cache_entries(out)
        assert len(entries) == len(cached) + 1 and all(entries[k] == v for k, v in cached.items())
        assert all(json.loads(v)["content"] for v in entries.values())
        paid = len(fake.requests)
        assert run_llm(out, url, "paraphrase", "bundled:data/seed_tasks.jsonl", "options.n=3") == 0
        assert json.loads((out / "summary.json").read_text())["cache_hits"] == len(entries)  # nothing asked twice
        assert run_llm(fresh, url, "paraphrase", "bundled:data/seed_tasks.jsonl", "options.n=3") == 0
        assert len(fake.requests) - paid == 24 + 24 - len(entries)  # 8 rows x 3, once each run, less the cached
    assert (out / "augmented.jsonl").read_bytes() == (fresh / "augmented.jsonl").read_bytes()


def first_rows(n: int) -> list[str]:
    return (ROOT / "src/alignkit/resources/data/hh_rlhf_sample.jsonl").read_text().splitlines()[:n]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, config, extra", [
    ("generate", "generate-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null", "generation.max_new_tokens=4"]),
    ("eval", "eval-rm-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null"]),
    ("sample", "sample-tiny.yaml", ["sampling.num_samples=2", "sampling.max_new_tokens=4", "overwrite=true"]),
])
def test_a_bad_record_half_way_leaves_the_previous_run_byte_equal(tmp_path, capsys, command, config, extra):
    """A rerun over a finished run whose input breaks at row 3: one line naming the file and line (exit 2), and
    every file the previous run wrote byte-equal (nothing is written before the whole input is read)."""
    from alignkit.cli import main

    rows = first_rows(4)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(rows) + "\n")
    bad.write_text("\n".join([*rows[:2], rows[2][:40], rows[3]]) + "\n")  # row 3 cut: not JSON
    out = tmp_path / "out"
    base = ["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", *extra]
    assert main([*base, f"data.path={good}"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main([*base, f"data.path={bad}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{bad}:3" in err[0], err
    assert snapshot(out) == before


@pytest.mark.parametrize("command, config, file, old, new", [
    ("sample", "sample-tiny.yaml", "samples.jsonl", "sampling.seed=0", "sampling.seed=1"),
    ("annotate", "annotate-tiny.yaml", "records.jsonl", "annotator.kwargs.target=24", "annotator.kwargs.target=100"),
])
def test_a_stage_killed_before_its_settings_are_written_is_redone_not_kept_as_the_old_ones(
        tmp_path, monkeypatch, command, config, file, old, new):
    """`alignkit sample` / `annotate` overwrite=true wrote samples.jsonl / records.jsonl and its manifest entry, then
    sample.yaml / annotate.yaml: killed between, the round was complete with the NEW file under the OLD settings
    file, so a rerun with the old settings kept it as the old settings' (exit 0: another seed's samples, records
    without the old run's weights). Now the settings file is written before the manifest entry: the killed stage is
    incomplete, and the rerun makes what the old settings give, byte-equal."""
    import alignkit.cli.rounds as cli_rounds
    from alignkit.cli import main

    rows = first_rows(4)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "round"
    sampling = ["-q", "sample", "--config", str(CONFIGS / "sample-tiny.yaml"), f"output_dir={out}",
                f"data.path={data}", "sampling.num_samples=2", "sampling.max_new_tokens=6", "sampling.do_sample=true"]
    assert main([*sampling, "sampling.seed=0"]) == 0
    base = sampling if command == "sample" else ["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}"]
    assert main([*base, old]) == 0  # (sample: the same settings again, the stage kept)
    first = (out / file).read_bytes()

    def killed(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(cli_rounds, "save_config", killed)
    with pytest.raises(Killed):
        main([*base, new, "overwrite=true"])
    monkeypatch.undo()
    assert (out / file).read_bytes() != first, f"the test needs {new} to make another {file}"
    assert main([*base, old]) == 0
    assert (out / file).read_bytes() == first
