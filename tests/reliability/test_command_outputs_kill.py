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
        child = subprocess.Popen([sys.executable, "-m", "alignkit", "-q", "augment", "--overwrite",
                                  "strategy=paraphrase", data, f"output_dir={out}", llm, "options.n=3"],
                                 env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        from alignkit.data import load_records
        load_records(out / "augmented.jsonl")  # killed before its first write: the previous set is still finished
        entries = cache_entries(out)
        assert len(entries) == len(cached) + 1 and all(entries[k] == v for k, v in cached.items())
        assert all(json.loads(v)["content"] for v in entries.values())
        paid = len(fake.requests)
        assert run_llm(out, url, "paraphrase", "bundled:data/seed_tasks.jsonl", "options.n=3", "--overwrite") == 0
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
    assert main([*base, f"data.path={bad}", *(["--overwrite"] if command != "sample" else [])]) == 2
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


KILL_BETWEEN_WRITES = """
import os, signal, sys
import importlib
module = importlib.import_module(sys.argv[1])
setattr(module, sys.argv[2], lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
from alignkit.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("command, extra, results, killed_at, other", [
    ("generate", ["--config", str(CONFIGS / "generate-tiny.yaml"), "model.path=tiny:llama", "model.adapter_path=null",
                  "generation.max_new_tokens=4"],
     "generations.jsonl", ("alignkit.cli.generate", "atomic_write_text"), "generation_metrics.json"),
    ("eval", ["--config", str(CONFIGS / "eval-rm-tiny.yaml"), "model.path=tiny:llama", "model.adapter_path=null"],
     "metrics.json", ("alignkit.cli.evaluate", "write_command_outputs"), "plots/eval-margin.png"),
    ("augment", ["--config", str(CONFIGS / "augment-code-bugs.yaml")],
     "augmented.jsonl", ("alignkit.cli.augment", "atomic_write_text"), "summary.json"),
])
def test_a_command_killed_between_two_writes_leaves_a_set_its_readers_refuse(tmp_path, capsys, command, extra,
                                                                              results, killed_at, other):
    """generate / eval / augment wrote their files one by one, each atomically: a real SIGKILL after the results
    file and before the next one left the new results beside the previous run's files (generation_metrics.json /
    summary.json counting other rows), and a command reading the results (data.path=<out>/generations.jsonl) took
    them silently. Now the set's manifest is unfinished: reading the results is refused with one line naming the
    manifest and the rerun, and the rerun makes a finished set that reads again."""
    from alignkit.cli import main
    from alignkit.data.readers import iter_rows
    from alignkit.files import DataError
    from alignkit.run_commit import check_output_file

    def read(path: Path) -> None:  # how alignkit reads a data file (metrics.json is no rows: only its check)
        list(iter_rows(path)) if path.suffix == ".jsonl" else check_output_file(path)

    out = tmp_path / "out"
    base = ["-q", command, *extra, f"output_dir={out}"]
    assert main([*base, "data.max_records=3"]) == 0
    before = {n: (out / n).read_bytes() for n in (results, other)}
    read(out / results)  # a finished set reads
    child = subprocess.run([sys.executable, "-c", KILL_BETWEEN_WRITES, *killed_at, *base, "data.max_records=2",
                            "--overwrite"],
                           env=child_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert (out / results).read_bytes() != before[results]  # the new results ...
    assert (out / other).read_bytes() == before[other]  # ... beside the previous run's
    with pytest.raises(DataError, match=f"alignkit_{command}_outputs.json.*rerun `alignkit {command}`"):
        read(out / results)
    if command != "eval":  # a command reading it: one line, exit 2
        capsys.readouterr()
        assert main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), "model.path=tiny:llama",
                     "model.adapter_path=null", f"data.path={out / results}", f"output_dir={tmp_path / 'g'}"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"{out / results}" in err[0] and "did not finish" in err[0], err
    assert main([*base, "data.max_records=2"]) == 0  # the rerun finishes the set (an unfinished one: no --overwrite)
    read(out / results)


STOPPED_IN_WRITE = """
import os, signal, sys, time
from alignkit.files import atomic_write

def stop(fd):
    print("in write", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)

os.fsync = stop
atomic_write(sys.argv[1], b"new")
"""


def test_a_write_killed_part_way_leaves_a_temp_file_the_next_write_removes_once_its_process_is_gone(tmp_path):
    """atomic_write's temporary file was `.<name>.<random>.tmp`: a process killed inside the write left it beside
    the target forever, and nothing told it from another process's write in progress. Now it is named for the host
    and pid: the next write to the target removes the leftover of a dead process on this host, and keeps a live
    process's and another host's."""
    from alignkit.files import atomic_write

    target = tmp_path / "summary.json"
    atomic_write(target, b"old")
    dead = subprocess.run([sys.executable, "-c", STOPPED_IN_WRITE, str(target), "kill"], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert dead.returncode == -signal.SIGKILL and "in write" in dead.stdout, dead.stdout + dead.stderr
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and target.read_bytes() == b"old"
    dead_pid = left[0].name.split(".")[-3]  # .summary.json.<host>.<pid>.<random>.tmp (old code: no pid)
    other_host = tmp_path / f".summary.json.some-other-host.{dead_pid}.abcdefgh.tmp"  # that pid, on another host
    other_host.write_bytes(b"x")
    live = subprocess.Popen([sys.executable, "-c", STOPPED_IN_WRITE, str(target), "hold"], env=child_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "in write"
        held = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p not in left and p != other_host]
        assert len(held) == 1 and f".{live.pid}." in held[0].name
        atomic_write(target, b"newer")
        assert target.read_bytes() == b"newer"
        assert not left[0].exists()  # the killed process's leftover
        assert held[0].exists() and other_host.exists()  # a live write in progress, another host's
    finally:
        live.kill()
        live.wait(60)


def test_a_finished_sets_file_edited_after_the_run_reads_with_a_warning(tmp_path, caplog):
    """A hand-edited augmented.jsonl is legitimate data: read (by the library's `load_records` as by a command),
    with one warning that summary.json and config.yaml beside it describe what augment wrote, not this file."""
    import logging

    from alignkit.cli import main
    from alignkit.data import load_records

    out = tmp_path / "out"
    assert main(["-q", "augment", "--config", str(CONFIGS / "augment-code-bugs.yaml"), f"output_dir={out}"]) == 0
    with caplog.at_level(logging.WARNING, logger="alignkit.run_commit"):
        load_records(out / "augmented.jsonl")
        assert not caplog.records
        rows = (out / "augmented.jsonl").read_text().splitlines()
        (out / "augmented.jsonl").write_text("\n".join(rows[:2]) + "\n")  # kept two records by hand
        assert len(load_records(out / "augmented.jsonl")) == 2  # the first row, then every row: one warning
    assert len(caplog.records) == 1 and "changed after `alignkit augment` wrote it" in caplog.records[0].message


def test_the_librarys_reader_refuses_a_file_of_an_unfinished_output_set(tmp_path):
    """`alignkit.data.load_records` (the library's reader) did not look at the output set a file belongs to: only
    the CLI's data_path did, so a script reading generations.jsonl from a set a kill left mixed (new generations
    beside the previous run's generation_metrics.json) read it without a word. Now every read of a file checks it:
    refused with one line naming the manifest and the rerun; the finished set reads."""
    from alignkit.data import load_records
    from alignkit.files import DataError
    from alignkit.run_commit import output_set

    out = tmp_path / "gen"
    out.mkdir()
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with output_set(out, "generate", ["generations.jsonl", "generation_metrics.json"]) as outs:
        outs.add(out / "generations.jsonl")
    assert len(load_records(out / "generations.jsonl")) == 2
    with pytest.raises(Killed), output_set(out, "generate", ["generations.jsonl", "generation_metrics.json"]) as outs:
        (out / "generations.jsonl").write_text(json.dumps(rows[0]) + "\n")
        outs.add(out / "generations.jsonl")
        raise Killed  # before generation_metrics.json: the set is unfinished
    with pytest.raises(DataError, match=r"generations.jsonl: the `alignkit generate` that wrote it did not finish "
                                        r".*alignkit_generate_outputs.json.*rerun `alignkit generate`"):
        load_records(out / "generations.jsonl")
    with pytest.raises(DataError, match="did not finish"):
        load_records(str(out / "generations.jsonl"), "sft")


def test_an_old_form_temp_file_left_by_an_older_alignkit_is_removed_once_over_a_day_old(tmp_path):
    """Before temp files named host and pid, atomic_write's was `.<name>.<mkstemp's 8 characters>.tmp`: one left by
    an older alignkit's crash was never removed (no pid to test). Now one over a day old is removed by the next write
    to its target; a newer one (a write may be in progress), another target's and a name of another form stay."""
    from alignkit.files import atomic_write

    target = tmp_path / "summary.json"
    names = {"old": ".summary.json.k3x_9qaz.tmp", "new": ".summary.json.a1b2c3d4.tmp",
             "other target": ".metrics.json.k3x_9qaz.tmp", "other form": ".summary.json.K3X-9QAZ.tmp",
             "seven characters": ".summary.json.k3x_9qa.tmp"}
    two_days = time.time() - 2 * 24 * 3600
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"half")
        if key != "new":
            os.utime(tmp_path / name, (two_days, two_days))
    atomic_write(target, b"x")
    left = {key for key, name in names.items() if (tmp_path / name).exists()}
    assert left == {"new", "other target", "other form", "seven characters"} and target.read_bytes() == b"x"
