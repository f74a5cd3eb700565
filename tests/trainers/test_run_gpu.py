"""bench/run_gpu.py stays runnable without a GPU: peak table lookup, the 6N parameter count by hand, and a
`--dry-run` of one workload (tiny config, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run_gpu.py"


@pytest.fixture(scope="module")
def run_gpu():
    spec = importlib.util.spec_from_file_location("run_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_lookup(run_gpu):
    assert run_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert run_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert run_gpu.peak_tflops("NVIDIA H200") == 989.0
    assert run_gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert run_gpu.peak_tflops("Some Future GPU") is None


def test_matmul_params_by_hand(run_gpu):
    """TINY: per layer q 64x64 + k, v 64x32 + o 64x64 + MLP 3 x 64x128 + 2 norms of 64; final norm 64;
    the tied 512 x 64 embedding counted once, as the LM head."""
    import torch

    model = run_gpu.build_model(run_gpu.TINY, torch.float32, "cpu", "sdpa")
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert run_gpu.matmul_params(model) == 2 * per_layer + 64 + 512 * 64
    one_b = dict(run_gpu.LLAMA_1B)
    assert one_b["hidden_size"] == 2048 and one_b["num_hidden_layers"] == 16  # Llama-3.2-1B shape (1.24 B)


def test_dry_run_one_workload(run_gpu, tmp_path):
    out = tmp_path / "gpu.json"
    res = run_gpu.main(["--dry-run", "--workloads", "dpo_lora_precomputed", "--out", str(out),
                        "--work-dir", str(tmp_path / "work")])
    assert len(res) == 1 and res[0].get("status") != "error", res
    r = res[0]
    assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None  # no GPU: no peak, no MFU
    assert r["model_tflops_per_s"] == pytest.approx(6 * r["params_matmul"] * r["tokens_per_s"] / 1e12)
    assert json.loads(out.read_text())["results"][0]["workload"] == "dpo_lora_precomputed"


def test_dry_run_liger_check_reports_what_is_missing(run_gpu, tmp_path):
    """No GPU here: the Liger check says so in alignkit's own words, and the workload still runs without kernels."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check runs for real")
    res = run_gpu.main(["--dry-run", "--kernels", "liger", "--workloads", "sft_full", "--out", str(tmp_path / "g.json"),
                        "--work-dir", str(tmp_path / "work")])
    check, workload = res
    assert check["check"] == "liger" and check["status"] == "unavailable"
    assert check["reason"].startswith("model.kernels: liger needs ") and "a CUDA GPU" in check["reason"]
    assert workload["workload"] == "sft_full" and workload["kernels"] is None and workload["tokens"] > 0


def test_dry_run_grpo_step(run_gpu, tmp_path):
    """The GRPO workload: generation + scoring + one update per step, timed; generated tokens counted."""
    res = run_gpu.main(["--dry-run", "--workloads", "grpo_full", "--out", str(tmp_path / "g.json"),
                        "--work-dir", str(tmp_path / "work")])
    assert len(res) == 1 and res[0].get("status") != "error", res
    r = res[0]
    assert r["objective"] == "grpo" and r["steps"] == 2 and r["samples_per_prompt"] == 2
    assert 0 < r["generated_tokens"] <= 2 * 2 * 2 * 12  # steps x prompts x samples x max_new_tokens
    assert r["steps_per_s"] > 0 and 0 < r["generation_share"] < 1
