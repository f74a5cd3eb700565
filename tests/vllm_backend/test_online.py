"""vLLM generation in the online loop (colocated engine): GRPO on a tiny Llama (head_dim 64, vLLM's CPU attention
needs >= 64) for full and LoRA policies, each run in a subprocess (`grpo_worker.py`). Checked:
(a) after a sync, vLLM's greedy tokens equal transformers' greedy tokens for the UPDATED policy (and they are not
    the initial policy's: the sync carried new weights);
(b) the mean reward (measured with transformers sampling, fixed seed) rises with vLLM generation as it does with
    transformers generation, by more than MIN_GAIN each (a random policy scores ~0.04).
(The one-line refusal of ReFT policies needs no vLLM: tests/online/test_vllm_backend.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, run_env

MIN_GAIN = 0.08
WORKER = Path(__file__).with_name("grpo_worker.py")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_grpo_with_vllm_generation(kind, tmp_path):
    out = tmp_path / "row.json"
    proc = subprocess.run([PYTHON, str(WORKER), kind, str(out)], env=run_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(out.read_text())
    print(json.dumps(row))
    assert row["greedy_vllm"] == row["greedy_hf"], row
    assert row["greedy_hf"] != row["greedy_initial"], "training did not change the greedy tokens; (a) tests nothing"
    # sampling: prompt-major layout as generate_responses, seeded calls repeat, a group's samples are not copies
    assert row["sampled_layout"] == [[g, k] for g in range(4) for k in range(8)]
    assert row["sampled_repeat_equal"] and max(row["sampled_distinct"]) > 1, row["sampled_distinct"]
    assert row["vllm"]["syncs"] == 9  # one before each of the 8 steps' generation, one after the last step
    for backend in ("transformers", "vllm"):
        r = row[backend]
        assert r["before"] < 0.1 and r["after"] - r["before"] > MIN_GAIN, (backend, r)
