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


def test_mfu_by_hand(run_gpu):
    """N = 1e9 matmul parameters at 1e4 tokens/s on a 989 TFLOP/s GPU: 6e13 FLOP/s is 6.0667 % MFU. The hardware
    count: full DPO with its reference every step 8N, precomputed 6N, LoRA (frozen base) 4N (+2N with a reference)."""
    assert run_gpu.mfu(10**9, 1e4, 989.0, "full", "sft", None) == pytest.approx((6e13 / 989e12, 6e13 / 989e12))
    assert run_gpu.mfu(10**9, 1e4, 989.0, "full", "dpo", "auto")[1] == pytest.approx(8e13 / 989e12)
    assert run_gpu.mfu(10**9, 1e4, 989.0, "full", "dpo", "precomputed")[1] == pytest.approx(6e13 / 989e12)
    assert run_gpu.mfu(10**9, 1e4, 989.0, "lora", "dpo", "auto")[1] == pytest.approx(6e13 / 989e12)
    assert run_gpu.mfu(10**9, 1e4, 989.0, "lora", "dpo", "precomputed")[1] == pytest.approx(4e13 / 989e12)
    assert run_gpu.mfu(10**9, 1e4, None, "full", "sft", None) == (None, None)


def test_token_count_reads_a_shared_prompt_mask_as_no_count(run_gpu):
    """Shared-prompt DPO rows carry a (B, 1, T, T) mask: its sum is T^2 per row, not tokens. Two rows, pad id 0:
    3 + 2 = 5 tokens; a 2-D mask is summed as is."""
    import torch

    timer = run_gpu._Timer(torch.nn.Identity(), warmup=0, steps=1, sync=lambda: None)
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    timer._count(None, (), {"input_ids": ids, "attention_mask": torch.ones(2, 1, 4, 4, dtype=torch.bool)})
    assert timer.tokens == 5
    timer._count(None, (), {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert timer.tokens == 10


def test_dry_run_dpo_tokens_within_the_data(run_gpu, tmp_path):
    """dpo_full on CPU runs shared-prompt rows (4-D masks). Prompts and completions are 12 +- 25 %: 9..15 tokens.
    2 timed steps x 2 pairs: at most 2 x 2 x (15 + 15 + 15 + 15) = 240 tokens (prompt in both rows), at least
    2 x 2 x (9 + 9 + 9) = 108 (prompt once). Summing the 4-D masks counted 1646."""
    (r,) = run_gpu.main(["--dry-run", "--workloads", "dpo_full", "--out", str(tmp_path / "g.json"),
                         "--work-dir", str(tmp_path / "work")])
    assert 108 <= r["tokens"] <= 240, r["tokens"]
    assert r["param_dtypes"] == {"float32": r["param_dtypes"]["float32"]}  # the dry run is float32 throughout


def test_dry_run_grpo_names_the_knobs_it_does_not_apply(run_gpu, tmp_path, caplog):
    """--compile / --padding-free / --grad-ckpt are the offline workloads' knobs: the GRPO loop runs without them
    and its result says so, rather than standing in a --compile run's results as a compiled figure."""
    with caplog.at_level("WARNING"):
        (r,) = run_gpu.main(["--dry-run", "--workloads", "grpo_full", "--compile", "--padding-free", "--steps", "7",
                             "--out", str(tmp_path / "g.json"), "--work-dir", str(tmp_path / "work")])
    assert r["not_applied"] == ["--padding-free", "--compile"]
    assert "grpo_full: --padding-free --compile not applied" in caplog.text
    assert "--steps ignored" in caplog.text  # --dry-run's own sizes


def test_dry_run_grpo_vllm_skipped_without_vllm(run_gpu, tmp_path):
    """Where vLLM is not importable (alignkit's .venv), grpo_vllm is one skipped row naming why; the other workloads
    of the same run still run. (Its dry run with the engine: tests/vllm_backend/test_run_gpu_vllm.py, make test-vllm.)"""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/vllm_backend/test_run_gpu_vllm.py runs the workload")
    skipped, ran = run_gpu.main(["--dry-run", "--workloads", "grpo_vllm", "grpo_full", "--out", str(tmp_path / "g.json"),
                                 "--work-dir", str(tmp_path / "work")])
    assert skipped["workload"] == "grpo_vllm" and skipped["status"] == "skipped"
    assert skipped["reason"].startswith("skipped: generation_backend='vllm' needs vLLM in this Python")
    assert "\n" not in skipped["reason"] and not (tmp_path / "work" / "grpo_vllm").exists()
    assert ran["workload"] == "grpo_full" and ran["generation_backend"] == "transformers" and ran["generated_tokens"] > 0
    assert ran["generation_problems"] == [] and ran["generation"]["rows"] == 3 * 2 * 2  # 1 + 2 steps x 2 x 2


def test_grpo_vllm_engine_args(run_gpu, tmp_path):
    """The engine's arguments: the longest prompt (prompt_len x 1.25 words) + BOS + EOS room + completion_len for
    max_model_len; gpu_memory_utilization on a GPU only (on CPU vLLM reads it as a share of host memory)."""
    import argparse

    import torch

    model = run_gpu.build_model(run_gpu.TINY_HD64, torch.float32, "cpu", "sdpa")
    tok = run_gpu.bench_common.build_tokenizer(run_gpu.TINY_HD64["vocab_size"])
    args = argparse.Namespace(work_dir=str(tmp_path), prompt_len=256, completion_len=256, device="cpu",
                              vllm_gpu_memory=0.3)
    engine = run_gpu.vllm_engine("grpo_vllm", args, model, tok)
    assert engine["generation_backend"] == "vllm"
    assert engine["vllm"] == {"model": str(tmp_path / "grpo_vllm" / "base"), "max_model_len": 320 + 2 + 256}
    assert (tmp_path / "grpo_vllm" / "base" / "config.json").is_file()
    assert (tmp_path / "grpo_vllm" / "base" / "tokenizer.json").is_file()
    args.device = "cuda"
    assert run_gpu.vllm_engine("grpo_vllm", args, model, tok)["vllm"]["gpu_memory_utilization"] == 0.3
    assert run_gpu.TINY_HD64["hidden_size"] // run_gpu.TINY_HD64["num_attention_heads"] == 64
