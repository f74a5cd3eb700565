"""A few GRPO steps on a tiny Llama (head_dim 64) with vLLM generation, and the same run with transformers
generation; run by test_online.py in a subprocess (vLLM's engine lives in the process that starts it):

    python tests/vllm_backend/grpo_worker.py KIND OUT.json        # KIND: full | lora

Writes one JSON object: each backend's mean reward before/after (measured with transformers sampling, fixed
seed), per-step rewards, and, after the vLLM run, the greedy tokens of vLLM (after a sync) and of transformers
for the updated policy, plus the greedy tokens of the initial policy.
"""

from __future__ import annotations

import json
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Hello!", "The quick brown fox", "What is 2 + 2?", "Please answer"]
LR = {"full": 1e-2, "lora": 3e-2}
HEAD_SCALE = 8.0  # as tests/online/toy.py: a random tiny head is too flat for adapters to make a policy peak


def digit_fraction(prompt, response: str) -> float:
    return sum(c in string.digits for c in response) / max(len(response), 1)


def mean_reward(model, tok) -> float:
    from alignkit.online.generation import SamplingConfig, generate_responses

    samples = generate_responses(model, tok, PROMPTS, SamplingConfig(num_samples=32, max_new_tokens=3, seed=1234),
                                 batch_size=128)
    return statistics.mean(digit_fraction(None, s.response) for s in samples)


def greedy(samples) -> list[list[int]]:
    return [s.response_ids for s in samples]


def main(kind: str, out: str) -> None:
    import torch

    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.models.tiny import save_tiny
    from alignkit.online.generation import SamplingConfig, generate_responses
    from alignkit.online.grpo import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    folder = save_tiny(Path(tempfile.mkdtemp(prefix="vllm-grpo-")) / "base", "llama", hidden_size=128, num_heads=2)
    model = load_model(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(folder)  # the folder vLLM loads holds the policy's (frozen, for LoRA) base
    tok = load_tokenizer(folder)
    greedy_cfg = SamplingConfig(do_sample=False, max_new_tokens=8)
    row: dict = {"kind": kind}
    for backend in ("transformers", "vllm"):
        torch.manual_seed(0)
        policy = apply_adapter(load_model(folder), AdapterConfig(kind=kind, lora=LoraSettings(r=4, alpha=8.0) if "lora" in kind else LoraSettings()))
        if backend == "vllm":
            row["greedy_initial"] = greedy(generate_responses(policy, tok, PROMPTS, greedy_cfg))
        before = mean_reward(policy, tok)
        cfg = GRPOConfig(steps=8, prompts_per_step=4, learning_rate=LR[kind], seed=0, kl_coef=0.0, epochs_per_step=2,
                         sampling=SamplingConfig(num_samples=8, max_new_tokens=3), generation_backend=backend,
                         progress_bar=False, report_to="none",
                         vllm={"max_model_len": 128} if backend == "vllm" else {})  # vllm.LLM arguments: vLLM only
        t0 = time.perf_counter()
        trainer = GRPOTrainer(policy, tok, PROMPTS, {"type": "function", "fn": digit_fraction}, cfg)
        history = trainer.train()
        row[backend] = {"before": before, "after": mean_reward(trainer.policy, tok),
                        "step_rewards": [h["reward"] for h in history], "train_s": time.perf_counter() - t0}
        if backend == "vllm":
            gen = trainer.vllm_generator
            gen.sync(trainer.policy)  # the weights of the last optimizer step
            row["greedy_vllm"] = greedy(gen.generate(PROMPTS, greedy_cfg, eos_source=trainer.policy))
            row["greedy_hf"] = greedy(generate_responses(trainer.policy, tok, PROMPTS, greedy_cfg))
            sampled = SamplingConfig(num_samples=8, max_new_tokens=8, seed=5, temperature=2.0)  # vLLM: T <= 2
            a = gen.generate(PROMPTS, sampled, eos_source=trainer.policy)
            b = gen.generate(PROMPTS, sampled, eos_source=trainer.policy)
            row["sampled_layout"] = [[s.group, s.index] for s in a]
            row["sampled_distinct"] = [len({tuple(s.response_ids) for s in a if s.group == g}) for g in range(4)]
            row["sampled_repeat_equal"] = [s.response_ids for s in a] == [s.response_ids for s in b]
            row["vllm"]["syncs"] = gen.version
            row["vllm"]["sync_s"] = gen.sync_seconds
            gen.close()
    Path(out).write_text(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
