"""`alignkit serve --output-dir`: the server's metrics.jsonl, TensorBoard scalars and plots, checked against what the
test itself counted from the responses (tokens generated, requests per model), and a restart that keeps the rows
of the previous start."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.serve.engine import Engine, EngineConfig, SamplingParams
from alignkit.serve.log import ServeLog


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_serve_log_counts_what_was_served(serve_stack, tmp_path):
    engine = Engine(serve_stack, EngineConfig(max_prompt_tokens=64, max_new_tokens=16)).start()
    out = tmp_path / "serve-log"
    try:
        log = ServeLog(engine, out, every=3600).start()  # rows only when the test asks (start, one sample, stop)
        ids = serve_stack.tokenizer("Hello there")["input_ids"]
        got = [engine.generate(m, ids, SamplingParams(max_tokens=t, temperature=0.0))
               for m, t in (("base", 5), ("polite", 7), ("base", 3))]
        mid = log.sample()
        plots = log.stop()
        assert log.stop() == plots  # once only: the server's `finally` after its shutdown hook adds no second row
    finally:
        engine.stop()
    served = sum(len(c["token_ids"]) for r in got for c in r["choices"])
    assert served > 0
    rows = _rows(out)
    assert [r.get("event") for r in rows] == ["start", None, "stop"]
    assert rows[0]["requests"] == 0 and rows[0]["generated_tokens"] == 0 and "tokens_per_second" not in rows[0]
    assert mid == rows[1] and mid["requests"] == 3 and mid["requests/base"] == 2 and mid["requests/polite"] == 1
    assert mid["generated_tokens"] == served
    assert mid["tokens/polite"] == len(got[1]["choices"][0]["token_ids"])
    dt = mid["uptime_s"] - rows[0]["uptime_s"]
    assert mid["tokens_per_second"] == pytest.approx(served / dt, rel=1e-3)
    assert 0 < mid["mean_ttft_s"] <= mid["mean_latency_s"] <= dt
    assert mid["errors"] == mid["timeouts"] == mid["rejected"] == 0
    assert rows[2]["tokens_per_second"] == 0 and "mean_latency_s" not in rows[2]  # nothing happened after the sample
    assert {p.name for p in plots} >= {"serve-throughput.png", "serve-latency.png", "serve-load.png"}
    assert all(p.stat().st_size > 1000 for p in plots)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / "serve"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("serve/generated_tokens")] == [0, served, served]
    assert [e.value for e in acc.Scalars("serve/requests/polite")] == [1, 1]
    # start, sample and stop within one second: they took step 0 all three (TensorBoard showed one of them at
    # step 0); now each row its own step, the next one when they share a second
    assert [e.step for e in acc.Scalars("serve/generated_tokens")] == [0, 1, 2]


def test_a_restart_appends_and_keeps_the_previous_rows(serve_stack, tmp_path):
    engine = Engine(serve_stack, EngineConfig()).start()
    try:
        ServeLog(engine, tmp_path, every=3600).start().stop()
        before = (tmp_path / "metrics.jsonl").read_text()
        ServeLog(engine, tmp_path, every=3600).start().stop()
    finally:
        engine.stop()
    after = (tmp_path / "metrics.jsonl").read_text()
    assert after.startswith(before) and [r.get("event") for r in _rows(tmp_path)] == ["start", "stop"] * 2


def _two_starts(serve_stack, folder, monkeypatch, starts):
    """ServeLog started and stopped into `folder` at the test's clock times `starts` ((start, stop), ...); returns
    the TensorBoard steps of serve/queue_depth and the rows the last stop drew its plots from."""
    import alignkit.serve.log as log_module

    clock = {"t": 0.0}
    monkeypatch.setattr(log_module.time, "time", lambda: clock["t"])
    drawn = []
    real_plot = log_module.plot_metrics

    def plot(rows, *a, **k):
        drawn.append(rows)
        return real_plot(rows, *a, **k)

    monkeypatch.setattr(log_module, "plot_metrics", plot)
    engine = Engine(serve_stack, EngineConfig()).start()
    try:
        for start, stop in starts:
            clock["t"] = start
            log = ServeLog(engine, folder, every=3600).start()
            clock["t"] = stop
            log.stop()
    finally:
        engine.stop()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard" / "serve"), size_guidance={"scalars": 0})
    acc.Reload()
    return sorted(e.step for e in acc.Scalars("serve/queue_depth")), drawn[-1]


def test_a_restart_continues_the_tensorboard_steps_and_the_plots(serve_stack, tmp_path, monkeypatch):
    """TensorBoard steps were seconds since each start, so a restart into the same folder wrote its rows at steps
    0, 1, ... again beside the previous start's (TensorBoard shows two values per step), and the plots were drawn
    from the last start's rows alone, over the previous start's. The clock is the test's: a start at t=1000 that
    stops at 1010, a restart at 1100 that stops at 1105; steps count from the folder's first row (0, 10, 100, 105)
    and the plots hold all four rows."""
    steps, drawn = _two_starts(serve_stack, tmp_path, monkeypatch, ((1000.0, 1010.0), (1100.0, 1105.0)))
    assert steps == [0, 10, 100, 105]
    assert [r["elapsed_s"] for r in drawn] == [0, 10, 100, 105]


def test_rows_in_one_second_take_one_tensorboard_step_each_across_a_restart(serve_stack, tmp_path, monkeypatch):
    """The step was the row's whole second since the first start, so rows less than a second apart (a stop right
    after the start, a restart in the second the previous start stopped) shared a step: several values at one step.
    Clock: a start at t=1000.2 stopping at 1000.4, a restart at 1000.6 stopping at 1003.0: steps 0, 1, 2, 3."""
    steps, _ = _two_starts(serve_stack, tmp_path, monkeypatch, ((1000.2, 1000.4), (1000.6, 1003.0)))
    assert steps == [0, 1, 2, 3]


def test_output_dir_with_the_vllm_engine_is_refused(capsys):
    assert main(["serve", "--base", "tiny:llama", "--engine", "vllm", "--output-dir", "/tmp/x"]) == 2
    assert "output_dir: the serve log" in capsys.readouterr().err


@pytest.mark.parametrize("every", ["0", "0.5"])
def test_log_every_must_be_a_second_or_more(capsys, every):
    """Rows closer than a second would share the TensorBoard steps (whole seconds): 0.5 was accepted."""
    assert main(["serve", "--base", "tiny:llama", f"log_every={every}", "--dry-run"]) == 2
    assert "log_every: must be >= 1 second" in capsys.readouterr().err
    assert main(["serve", "--base", "tiny:llama", "log_every=1", "--dry-run"]) == 0


def test_serving_an_adapter_trained_without_the_chat_template_is_warned(serve_dirs, tmp_path, caplog):
    """The chat endpoint formats with the tokenizer's chat template; an adapter whose training prompts were all
    'plain' text never saw it: one warning at start naming the adapter and the endpoint to use instead."""
    import logging
    import shutil

    from alignkit.serve.stack import load_stack

    plain, chat = tmp_path / "plain", tmp_path / "chat"
    for folder, formats in ((plain, {"plain": 5}), (chat, {"chat-template": 5, "plain": 1})):
        shutil.copytree(serve_dirs["adapters"]["terse"], folder)
        (folder / "alignkit_prompt_format.json").write_text(json.dumps({"formats": formats}))
    with caplog.at_level(logging.WARNING, logger="alignkit.serve.stack"):
        load_stack(serve_dirs["base"], {"p": plain, "c": chat, "old": serve_dirs["adapters"]["polite"]})
    msgs = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("serve: 'p' was trained on prompts formatted as 'plain'")
    assert "/v1/completions" in msgs[0]


def test_an_output_dir_holding_another_runs_metrics_is_refused(serve_stack, tmp_path):
    """`serve --output-dir <a training run's folder>` appended the server's rows to the run's metrics.jsonl: two
    runs' rows in one file, read back as one (final metrics, plots, a --resume's cut). Now refused before the log
    writes anything, naming the file and another folder to use; the serve log's own file is still appended to."""
    from alignkit.settings import ConfigError

    training = '{"step": 1, "epoch": 0.5, "loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text(training)
    engine = Engine(serve_stack, EngineConfig())
    with pytest.raises(ConfigError, match=rf"^output_dir: {tmp_path / 'metrics.jsonl'} holds rows that are not the "
                                          rf"serve log's .*choose another --output-dir \(e\.g\. {tmp_path / 'serve'}\)"):
        ServeLog(engine, tmp_path, every=3600)
    assert (tmp_path / "metrics.jsonl").read_text() == training
    assert not (tmp_path / "tensorboard").exists()
    engine.start()
    try:
        ServeLog(engine, tmp_path / "serve", every=3600).start().stop()
        ServeLog(engine, tmp_path / "serve", every=3600).start().stop()  # its own rows: appended
    finally:
        engine.stop()
    assert [r.get("event") for r in _rows(tmp_path / "serve")] == ["start", "stop"] * 2


@pytest.mark.parametrize("previous", ["rows", "none"])
def test_a_row_cut_by_a_kill_is_dropped_at_the_next_start(serve_stack, tmp_path, caplog, previous):
    """A kill (or a full disk) while a row was appended left it without its newline; the next start's first row ran
    on from it: one line holding both, unreadable, so that start's "start" row was lost to every reader (and a cut
    FIRST row made the next start refuse the folder as another run's). Now the cut row is dropped with one warning
    and every earlier byte is kept."""
    import logging

    engine = Engine(serve_stack, EngineConfig()).start()
    try:
        if previous == "rows":
            ServeLog(engine, tmp_path, every=3600).start().stop()
        whole = (tmp_path / "metrics.jsonl").read_bytes() if previous == "rows" else b""
        cut = b'{"time": 1764680000.5, "uptime_s": 0.0, "event": "sta'  # what the kill left of the next row
        (tmp_path / "metrics.jsonl").write_bytes(whole + cut)
        with caplog.at_level(logging.WARNING, logger="alignkit.serve.log"):
            ServeLog(engine, tmp_path, every=3600).start().stop()
    finally:
        engine.stop()
    after = (tmp_path / "metrics.jsonl").read_bytes()
    assert after.startswith(whole) and cut not in after
    events = ["start", "stop"] * (2 if previous == "rows" else 1)
    assert [r.get("event") for r in _rows(tmp_path)] == events
    said = [r.getMessage() for r in caplog.records if "cut part-way" in r.getMessage()]
    assert len(said) == 1 and f"({len(cut)} byte(s) without a newline" in said[0]


def test_a_row_write_that_fails_part_way_is_cut_back(serve_stack, tmp_path, monkeypatch):
    """A full disk part-way through a row (the sampling thread logs the OSError and goes on) left half a row; the
    next row ran on from it. Now the failed write is cut back to the rows before it."""
    import alignkit.serve.log as log_module

    engine = Engine(serve_stack, EngineConfig()).start()
    try:
        log = ServeLog(engine, tmp_path, every=3600).start()
        before = (tmp_path / "metrics.jsonl").read_bytes()
        real_open = open

        class HalfFull:  # writes half of what it is given, then the disk is full
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[:len(text) // 2])
                self.f.flush()
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(log_module, "open", lambda *a, **k: HalfFull(real_open(*a, **k)), raising=False)
        with pytest.raises(OSError):
            log.sample()
        monkeypatch.undo()
        assert (tmp_path / "metrics.jsonl").read_bytes() == before
        log.stop()
    finally:
        engine.stop()
    assert [r.get("event") for r in _rows(tmp_path)] == ["start", "stop"]


def test_each_prompt_shorter_than_a_reft_adapters_positions_is_counted_and_logged(serve_stack, tmp_path, caplog):
    """A prompt shorter than a ReFT adapter's positions is edited at fewer positions, as training edits it (its
    short prompts are kept, with one warning for the data set: interventions/positions.py), so it is answered (200);
    but the server said it once per process, and every later short request went without a trace. Now each one is
    a warning naming the request, the model, its length and the spec's minimum, and is counted per model in
    /metrics and in the serve log's rows. 'polite' is f1+l2 with share_weights: 1 + 2 = 3 tokens at least."""
    from alignkit.serve.api import prometheus_text

    engine = Engine(serve_stack, EngineConfig(max_new_tokens=8)).start()
    try:
        log = ServeLog(engine, tmp_path / "serve-log", every=3600).start()
        with caplog.at_level("WARNING"):
            for model, ids in (("polite", [5]), ("polite", [5, 6]), ("polite", [5, 6, 7]), ("base", [5]),
                               ("terse", [5]), ("both", [5, 6])):
                got = engine.generate(model, ids, SamplingParams(max_tokens=2, temperature=0.0), timeout=60)
                assert len(got["choices"][0]["token_ids"]) >= 1
        row = log.sample()
        log.stop()
        text = prometheus_text(engine)
    finally:
        engine.stop()
    said = [r.getMessage() for r in caplog.records if "ReFT positions" in r.getMessage()]
    assert len(said) == 3, said  # polite twice ([5], [5, 6]), both ([5, 6]: f1+l2 too): one line each
    assert "model 'polite' has a prompt of 1 token(s), and its ReFT positions 'f1+l2' need at least 3" in said[0]
    assert "model 'polite' has a prompt of 2 token(s)" in said[1] and "model 'both'" in said[2]
    assert 'alignkit_short_reft_prompts_total{model="polite"} 2' in text
    assert 'alignkit_short_reft_prompts_total{model="both"} 1' in text
    assert 'alignkit_short_reft_prompts_total{model="base"} 0' in text
    assert row["short_reft_prompts"] == 3 and row["short_reft_prompts/polite"] == 2


def test_a_second_start_of_the_same_log_samples_again(tmp_path):
    """`start()` did not clear the event `stop()` set: a second start() on the same ServeLog wrote its "start" row,
    then its sampling thread saw the event and ended at once, so no row came until stop (the stats went unlogged).
    A stub engine (counters only); rows every 0.05 s; each start must be followed by periodic rows (event None)."""
    import time
    from types import SimpleNamespace

    from alignkit.serve.stats import EngineStats

    engine = SimpleNamespace(stats=EngineStats(), queue_depth=0, running_rows=0)
    log = ServeLog(engine, tmp_path, every=0.05)

    def periodic_rows_after_start() -> int:
        events = [r.get("event") for r in _rows(tmp_path)]
        return events[len(events) - 1 - events[::-1].index("start"):].count(None)

    for _ in range(2):
        log.start()
        deadline = time.monotonic() + 10
        while periodic_rows_after_start() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        log.stop()
        assert periodic_rows_after_start() >= 2, [r.get("event") for r in _rows(tmp_path)]
    events = [r.get("event") for r in _rows(tmp_path)]
    assert events.count("start") == events.count("stop") == 2 and events[-1] == "stop"
