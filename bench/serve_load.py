"""Load test of `alignkit serve` on loopback: requests/s, output tokens/s, time to first token, latency, errors.

    .venv/bin/python bench/serve_load.py                       # all scenarios, 1/8/32 clients
    .venv/bin/python bench/serve_load.py --clients 1 8 --max-tokens 16 --time-cap 60

Builds a tiny Llama (hidden 256, 4 layers, vocab 512; random weights, built locally) and eight adapters
on it (four LoReFT, four LoRA with non-zero B), then for each scenario starts `alignkit serve` as a
subprocess bound to 127.0.0.1 and drives it with N concurrent streaming clients (plain asyncio HTTP/1.1
on loopback; nothing else is contacted), a fixed number of requests per run and a wall-clock cap:

1. one adapter            every request to the same ReFT adapter
2. four ReFT mixed        requests round-robin over four ReFT adapters (mixed rows in every forward)
3. four LoRA mixed        round-robin over four LoRA adapters (peft mixed-adapter batches)
4. naive                  one request at a time with Hugging Face `generate` (KV cache) on the one-adapter
                          model, in this process: its throughput does not depend on the client count.

Greedy decoding, `max_tokens` new tokens per request (a random model seldom ends early; the real count is
reported). TTFT = first streamed token; latency = last byte. All three servers stay up and the rounds
interleave the scenarios (`--repeats`, medians reported, ratios paired within a round), because a shared
machine's load drifts. Output: a table on stdout and `bench/results/serve-<stamp>.json` (every run).
The servers and the naive baseline run with the same torch thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello! How can I help you today?", "The quick brown fox jumps over the lazy dog.",
           "Question: what is the capital of France? Answer:", "def add(a, b):\n    return",
           "0 1 2 3 4 5 6 7 8 9 10 11 12", "Please answer politely and briefly.", "user assistant system",
           "Thank you very much! The lazy dog"]


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------

def build_models(root: Path) -> dict[str, Path]:
    import torch

    from alignkit.interventions import ReftConfig
    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model
    from alignkit.models.tiny import save_tiny

    base = root / "base"
    if not (base / "config.json").exists():
        save_tiny(base, "llama", hidden_size=256, num_layers=4, num_heads=4)
    out = {"base": base}
    for i in range(4):
        for kind in ("reft", "lora"):
            name = f"{kind}{i}"
            folder = root / name
            out[name] = folder
            if (folder / "alignkit_adapter.json").exists():
                continue
            torch.manual_seed(100 + i)
            reft = ReftSettings(config=ReftConfig.uniform([1, 3], "loreft", low_rank_dimension=4).to_dict(),
                                positions="f1+l1") if kind == "reft" else None
            model = apply_adapter(load_model(base), AdapterConfig(kind=kind, lora=LoraSettings(r=8), reft=reft))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)
            save_adapter(model, folder)
    return out


# ----------------------------------------------------------------------------------------------------
# A minimal streaming HTTP client (loopback only)
# ----------------------------------------------------------------------------------------------------

async def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = (await reader.readline()).decode()
    ttft, tokens, buf, ok = None, 0, b"", status.split()[1:2] == ["200"]
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
        if ttft is None and b'"text": "' in buf and b"data: " in buf:
            ttft = time.perf_counter() - t0
    writer.close()
    text = buf.decode(errors="replace")
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith("data: {"):
            d = json.loads(line[6:])
            if d.get("error"):
                ok = False
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
    lat = time.perf_counter() - t0
    return {"ok": ok and "data: [DONE]" in text, "ttft": ttft if ttft is not None else lat, "latency": lat,
            "tokens": tokens}


async def drive(port: int, models: list[str], clients: int, requests: int, max_tokens: int, cap: float) -> dict:
    jobs = [(models[k % len(models)], PROMPTS[k % len(PROMPTS)]) for k in range(requests)]
    results: list[dict] = []
    start = time.perf_counter()
    nxt = 0

    async def client() -> None:
        nonlocal nxt
        while nxt < len(jobs) and time.perf_counter() - start < cap:
            m, p = jobs[nxt]
            nxt += 1
            try:
                results.append(await one_request(port, m, p, max_tokens))
            except OSError:
                results.append({"ok": False, "ttft": 0.0, "latency": 0.0, "tokens": 0})

    await asyncio.gather(*(client() for _ in range(clients)))
    return summarize(results, time.perf_counter() - start, requests, max_tokens)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


def summarize(results: list[dict], wall: float, asked: int, max_tokens: int) -> dict:
    """One run's figures; `asked` requests of `max_tokens` new tokens each were to be sent (`same_work` reads
    `asked`, `requests`, `errors` and `short`: requests that ended before max_tokens)."""
    good = [r for r in results if r["ok"]]
    lat, ttft = [r["latency"] for r in good], [r["ttft"] for r in good]
    return {"asked": asked, "requests": len(results), "errors": len(results) - len(good),
            "short": sum(r["tokens"] != max_tokens for r in good), "wall_s": round(wall, 3),
            "req_per_s": round(len(good) / wall, 3), "out_tok_per_s": round(sum(r["tokens"] for r in good) / wall, 2),
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "ttft_p99": pct(ttft, 99),
            "lat_p50": pct(lat, 50), "lat_p95": pct(lat, 95), "lat_p99": pct(lat, 99)}


# ----------------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------------

def start_server(dirs: dict[str, Path], names: list[str], port: int, threads: int, max_rows: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "alignkit", "-q", "serve", "--base", str(dirs["base"]), "--base-name", "base",
           "--port", str(port), "--max-batch-rows", str(max_rows), "--max-queue", "1024", "--device", "cpu"]
    for n in names:
        cmd += ["--adapter", f"{n}={dirs[n]}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up in 120 s")


def naive(dirs: dict[str, Path], name: str, requests: int, max_tokens: int, threads: int, cap: float) -> dict:
    """One request at a time with `generate` (KV cache, greedy), on base + the one adapter."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from alignkit.data.positions import locations_from_spans
    from alignkit.adapters import load_adapter, read_adapter_config
    from alignkit.models.loading import load_model, load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(dirs["base"])
    model = load_adapter(load_model(dirs["base"]).eval(), dirs[name]).eval()
    cfg = read_adapter_config(dirs[name])

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    results = []
    start = time.perf_counter()
    for k in range(requests):
        if time.perf_counter() - start > cap:
            break
        ids = torch.tensor([tok(PROMPTS[k % len(PROMPTS)])["input_ids"]])
        extra = {}
        if "reft" in cfg.kind:
            extra["intervention_locations"] = locations_from_spans(cfg.reft.positions, torch.tensor([0]),
                                                                   torch.tensor([ids.shape[1]]),
                                                                   model.num_interventions)
        streamer = FirstToken()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, streamer=streamer, **extra)
        lat = time.perf_counter() - t0
        results.append({"ok": True, "ttft": (streamer.first or time.perf_counter()) - t0, "latency": lat,
                        "tokens": out.shape[1] - ids.shape[1]})
    return summarize(results, time.perf_counter() - start, requests, max_tokens)


def same_work(a: dict, b: dict) -> list[str]:
    """Why two runs' tokens/s do not compare the same work ([] = they do): a run with failed requests (its tok/s
    counts only the others), one stopped by --time-cap before it sent what it was asked, or requests that ended
    before max_tokens (another amount of decoding per request)."""
    out = []
    for r in (a, b):
        name = f"{r['scenario']} x{r['clients']}"
        if r["errors"]:
            out.append(f"{name}: {r['errors']} of {r['requests']} requests failed")
        if r["requests"] < r["asked"]:
            out.append(f"{name}: {r['requests']} of {r['asked']} requests sent before --time-cap")
        if r["short"]:
            out.append(f"{name}: {r['short']} request(s) ended before max_tokens")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=0, help="requests per run (default max(32, 4 x clients))")
    ap.add_argument("--naive-requests", type=int, default=16, help="requests per naive run")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--time-cap", type=float, default=120.0, help="seconds per run; no new request after it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the servers and the naive baseline")
    ap.add_argument("--port", type=int, default=18431, help="first of three loopback ports")
    ap.add_argument("--scenarios", nargs="+", default=["one", "reft4", "lora4", "naive"])
    ap.add_argument("--workdir", default=None, help="where the tiny model and adapters are built (kept)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="alignkit-serve-bench-"))
    dirs = build_models(work)
    adapters = {"one": ["reft0"], "reft4": ["reft0", "reft1", "reft2", "reft3"],
                "lora4": ["lora0", "lora1", "lora2", "lora3"]}
    served = [sc for sc in args.scenarios if sc != "naive"]
    # every server is up for the whole run; rounds interleave the scenarios, so slow phases of a shared
    # machine hit all of them alike (an idle server's engine thread sleeps on a condition variable)
    servers = {sc: (args.port + i, start_server(dirs, adapters[sc], args.port + i, args.threads, max(args.clients)))
               for i, sc in enumerate(served)}
    runs: list[dict] = []
    try:
        for sc, (port, _) in servers.items():
            asyncio.run(drive(port, adapters[sc], 4, 8, args.max_tokens, 30))  # warm-up
        for rep in range(args.repeats):
            order = served[rep % max(len(served), 1):] + served[:rep % max(len(served), 1)]
            if "naive" in args.scenarios:
                r = naive(dirs, "reft0", args.naive_requests, args.max_tokens, args.threads, args.time_cap)
                runs.append({"scenario": "naive", "clients": 1, "repeat": rep, **r})
                print(json.dumps(runs[-1]), flush=True)
            for c in args.clients:
                for sc in order:
                    port = servers[sc][0]
                    n = args.requests or max(32, 4 * c)
                    r = asyncio.run(drive(port, adapters[sc], c, n, args.max_tokens, args.time_cap))
                    runs.append({"scenario": sc, "clients": c, "repeat": rep, **r})
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)
    keys = ["requests", "errors", "short", "req_per_s", "out_tok_per_s", "ttft_p50", "ttft_p95", "ttft_p99", "lat_p50",
            "lat_p95", "lat_p99"]
    rows = []
    for sc in args.scenarios:
        for c in ([1] if sc == "naive" else args.clients):
            rs = [r for r in runs if r["scenario"] == sc and r["clients"] == c]
            if rs:
                rows.append({"scenario": sc, "clients": c, "runs": len(rs),
                             **{k: (sum(r[k] for r in rs) if k in ("requests", "errors", "short")
                                    else statistics.median(r[k] for r in rs)) for k in keys}})
    print(f"\nmedians over {args.repeats} interleaved rounds, {args.max_tokens} new tokens per request")
    print(f"{'scenario':<10}{'clients':>8}{'req':>6}{'err':>5}{'req/s':>8}{'tok/s':>9}"
          f"{'TTFT p50/95/99 ms':>22}{'latency p50/95/99 ms':>25}")
    for r in rows:
        ms = lambda a, b, c: f"{a * 1e3:.0f}/{b * 1e3:.0f}/{c * 1e3:.0f}"  # noqa: E731
        print(f"{r['scenario']:<10}{r['clients']:>8}{r['requests']:>6}{r['errors']:>5}{r['req_per_s']:>8.2f}"
              f"{r['out_tok_per_s']:>9.1f}{ms(r['ttft_p50'], r['ttft_p95'], r['ttft_p99']):>22}"
              f"{ms(r['lat_p50'], r['lat_p95'], r['lat_p99']):>25}")
    ratios = {}

    notes = []

    def paired(a: str, b: str, c: int, cb: int | None = None) -> float | None:
        """Median over the rounds of a's tok/s over b's, from the rounds where both did the same work (`same_work`);
        the others are named in a NOT COMPARABLE line."""
        xs = []
        for ra, rb in [(ra, rb) for ra in runs for rb in runs
                       if ra["scenario"] == a and ra["clients"] == c and rb["scenario"] == b
                       and rb["clients"] == (c if cb is None else cb) and ra["repeat"] == rb["repeat"]]:
            why = same_work(ra, rb)
            if why:
                notes.append(f"  NOT COMPARABLE {a} / {b}, round {ra['repeat']} (left out): {'; '.join(why)}")
            elif rb["out_tok_per_s"]:
                xs.append(ra["out_tok_per_s"] / rb["out_tok_per_s"])
        return round(statistics.median(xs), 3) if xs else None

    for c in args.clients:
        for sc in ("reft4", "lora4"):
            if sc in served and "one" in served:
                ratios[f"{sc}/one tok/s, {c} clients"] = paired(sc, "one", c)
    for sc in served if "naive" in args.scenarios else []:
        ratios[f"{sc} at {max(args.clients)} clients / naive tok/s"] = paired(sc, "naive", max(args.clients), 1)
    print("\npaired ratios (median over the rounds where both sides did the same work):")
    for k, v in ratios.items():
        print(f"  {k}: {'n/c (no round did the same work)' if v is None else v}")
    for line in notes:
        print(line)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    import torch
    import transformers

    path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
                                "load_average_end": os.getloadavg(), "rows": rows, "ratios": ratios, "not_comparable": notes, "runs": runs},
                               indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
