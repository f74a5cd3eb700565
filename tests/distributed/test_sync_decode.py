"""Generation with parameters sharded over processes (FSDP2 / ZeRO-3) stays in step across ranks.

Every forward of a sharded model is a collective (each layer's parameters are all-gathered), so all ranks must run
the same number of decode steps. A rank whose rows all reached EOS / a stop token used to leave the decode loop
(alignkit's lean loop, and `model.generate`, which syncs only for models transformers itself sharded), and the
other rank then waited forever in its next all-gather: an online GRPO / online DPO run under FSDP hung as soon as
one rank's samples all ended early. Checked here on two CPU ranks: rank 0's answer ends after one token, rank 1's
runs on; both finish, and each rank's tokens are what one unsharded process generates greedily."""

from __future__ import annotations

import json

import pytest

from alignkit.models.loading import load_model, load_tokenizer
from alignkit.online.generation import SamplingConfig, generate_responses
from tests.distributed.launch import torchrun

from pathlib import Path

WORKER = Path(__file__).with_name("sync_decode_worker.py")
CANDIDATES = ["Hello!", "The quick brown fox", "What is 2 + 2?", "Please answer", "def add(a, b):", "Name a colour."]


def _greedy(model, tok, prompt, stop=()):
    cfg = SamplingConfig(num_samples=1, max_new_tokens=8, do_sample=False, stop_token_ids=list(stop))
    return generate_responses(model, tok, [prompt], cfg)[0].response_ids


@pytest.mark.slow
@pytest.mark.parametrize("lean", ["auto", "off"])
def test_ranks_that_finish_early_keep_decoding_with_the_others(lean, tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir("llama")), load_tokenizer(tiny_dir("llama"))
    free = {p: _greedy(model, tok, p) for p in CANDIDATES}
    # a stop token that ends prompt A's answer at its first token and never appears in prompt B's 8 tokens
    pick = next(((a, b, free[a][0]) for a in CANDIDATES for b in CANDIDATES
                 if a != b and len(free[b]) == 8 and free[a][0] not in free[b]), None)
    assert pick is not None, free
    a, b, stop = pick
    expected = [_greedy(model, tok, a, [stop]), _greedy(model, tok, b, [stop])]
    assert len(expected[0]) == 1 and len(expected[1]) == 8
    run = torchrun([str(WORKER), str(tiny_dir("llama")), str(tmp_path), str(stop), lean, a, b], timeout=180)
    assert run.returncode == 0, run.failure()
    got = [json.loads((tmp_path / f"rank{r}.json").read_text())[0] for r in (0, 1)]
    assert got == expected
