"""bench/run_gpu.py's grpo_vllm workload (one GRPO step with a colocated vLLM engine generating) in its CPU dry run:
a tiny Llama with head_dim 64, 1 warm-up + 2 timed steps of 2 prompts x 2 samples x up to 12 tokens, in a subprocess
(the engine lives in the process that starts it; ~30 s of start-up)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import PYTHON, run_env

RUN_GPU = Path(__file__).resolve().parents[2] / "bench" / "run_gpu.py"


def test_dry_run_grpo_vllm(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([PYTHON, str(RUN_GPU), "--dry-run", "--workloads", "grpo_vllm", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], env=run_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r.get("status") not in ("error", "skipped"), r
    assert r["workload"] == "grpo_vllm" and r["generation_backend"] == "vllm" and r["steps"] == 2
    # every row a real generation: 3 steps x 2 prompts x 2 samples, each to 12 tokens or ending with EOS
    assert r["generation"]["rows"] == 12 and r["generation_problems"] == [], r["generation"]
    assert 0 < r["generated_tokens"] <= 2 * 2 * 2 * 12  # timed steps x prompts x samples x max_new_tokens
    # the weights pushed before each of the 3 generations; the engine started in the warm-up, before the timed window
    assert r["vllm_sync_s"] > 0 and r["vllm"]["max_model_len"] == 15 + 2 + 12
    assert r["total_s"] >= r["seconds"] + r["first_generation_s"]
    assert r["steps_per_s"] > 0 and 0 < r["generation_share"] < 1
