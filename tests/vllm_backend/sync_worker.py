"""Run by test_sync.py in a subprocess: a colocated vLLM engine over a tiny full policy; greedy tokens for one long
prompt (several KV blocks, so vLLM's prefix cache holds it), the policy's weights changed, `sync`, the same prompt
again. Writes the engine's tokens and transformers' own greedy tokens of the changed policy to the JSON file argv[1]."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from alignkit.models.loading import load_model, load_tokenizer
from alignkit.models.tiny import save_tiny
from alignkit.online.vllm_generation import VllmGenerator

MAX_TOKENS = 6


def greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def main() -> None:
    base = save_tiny(Path(tempfile.mkdtemp(prefix="vllm-sync-")) / "base", "llama", hidden_size=128, num_heads=2)
    policy, tok = load_model(base), load_tokenizer(base)
    ids = [5 + (i * 7) % 400 for i in range(400)]  # > one 128-token block: vLLM caches its prefix blocks
    gen = VllmGenerator(policy, tok, max_model_len=512, kv_cache_memory_bytes=64 * 2**20)
    request = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
    try:
        before = gen._complete([ids], [request])[0][0]
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        gen.sync(policy)
        after = gen._complete([ids], [request])[0][0]
    finally:
        gen.close()
    Path(sys.argv[1]).write_text(json.dumps({"before": before, "after": after, "policy": greedy(policy.eval(), ids),
                                             "old_policy": greedy(load_model(base).eval(), ids)}))


if __name__ == "__main__":
    main()
