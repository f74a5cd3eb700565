"""The vLLM rows of the online suite (`bench/online_cpu.py --vllm`): which sides run, in which environment, and the
check that a side's generations are real.

On the "small_hd64" scenario (the "small" model with 2 heads of 64 and 1 KV head: vLLM's CPU attention needs
head_dim >= 64), the same prompts, reward, sampling and steps as the other rows:
- alignkit-hd64: alignkit with transformers generation, in vLLM's environment (so the transformers version, 5.19,
  is the engine's too);
- alignkit-vllm: the same with `generation_backend: vllm` (a colocated engine; it starts in the first generation
  call, inside the warm-up steps, so the timed steps do not include it);
- trl-hd64: TRL at its fastest knobs here (checkpointing off, float32) on the same model, in the TRL env.

Each alignkit side tallies its rows (`GenerationTally`): a row of a real generation either runs to max_new_tokens
(finish "length") or ends with an end token (finish "eos"); `generation_problems` names what is not so (no rows,
rows cut short without an end token, rows over the budget, copies of one another, a non-finite loss), and such a
pair gets no ratio (`common.work_mismatches` via online_cpu.same_work).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENARIO = "small_hd64"
# (library, variant) -> (environment: "vllm" | "trl", extra arguments of the side script)
SIDES: dict[tuple[str, str], tuple[str, list[str]]] = {
    ("alignkit", "hd64"): ("vllm", []),
    ("alignkit", "vllm"): ("vllm", ["--generation-backend", "vllm"]),
    ("trl", "hd64"): ("trl", ["--grad-ckpt", "off", "--precision", "fp32"]),
}
# the rows: (side a, side b); ratio = a / b (steps/s) and b's CPU s / a's CPU s
ROWS: list[tuple[tuple[str, str], tuple[str, str]]] = [
    (("alignkit", "vllm"), ("alignkit", "hd64")),  # vLLM generation / transformers generation, both alignkit
    (("alignkit", "hd64"), ("trl", "hd64")),
    (("alignkit", "vllm"), ("trl", "hd64")),
]
MIN_DISTINCT = 0.5  # sampled at temperature 1 from a random model, nearly every row differs from the others


def default_python() -> Path:
    """vLLM's environment (`make vllm-env`): .venv-vllm of this checkout (another one: --vllm-python)."""
    return REPO / ".venv-vllm" / "bin" / "python"


def env_extra() -> dict[str, str]:
    """What a side in vLLM's environment runs with: this checkout's src first (the env has alignkit installed from
    its own checkout), a 1 GB KV cache on CPU, vLLM quiet."""
    src = str(REPO / "src")
    return {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "TRANSFORMERS_OFFLINE": "1"}


class GenerationTally:
    """Rows an online run generated (all steps) and how each ended, for `generation_problems`."""

    def __init__(self, max_new_tokens: int, eos_ids: set[int]):
        self.max_new_tokens, self.eos_ids = max_new_tokens, set(eos_ids)
        self.rows = self.at_limit = self.ended_eos = self.short_no_eos = self.over = 0
        self.distinct: set[tuple[int, ...]] = set()

    def add(self, samples) -> None:
        for s in samples:
            ids = list(s.response_ids)
            self.rows += 1
            self.distinct.add(tuple(ids))
            if len(ids) > self.max_new_tokens:
                self.over += 1
            elif len(ids) == self.max_new_tokens and s.finish_reason == "length":
                self.at_limit += 1
            elif ids and s.finish_reason == "eos" and ids[-1] in self.eos_ids:
                self.ended_eos += 1
            else:
                self.short_no_eos += 1

    def result(self) -> dict:
        return {"rows": self.rows, "rows_at_max_new_tokens": self.at_limit, "rows_ended_eos": self.ended_eos,
                "rows_short_without_eos": self.short_no_eos, "rows_over_max_new_tokens": self.over,
                "distinct_rows": len(self.distinct), "max_new_tokens": self.max_new_tokens}


def tally_problems(r: dict) -> list[str]:
    """Why the rows one ok run generated are not real generations ([] = they are, or the run has no tally: TRL's
    side): see the module docstring."""
    lib, g = f"{r.get('library', '?')}/{r.get('generation_backend', 'transformers')}", r.get("generation")
    if g is None:
        return []
    if not g["rows"]:
        return [f"{lib}: no rows generated"]
    out = []
    if g["rows_short_without_eos"]:
        out.append(f"{lib}: {g['rows_short_without_eos']} of {g['rows']} rows ended before max_new_tokens "
                   f"({g['max_new_tokens']}) without an end token")
    if g["rows_over_max_new_tokens"]:
        out.append(f"{lib}: {g['rows_over_max_new_tokens']} of {g['rows']} rows longer than max_new_tokens")
    if g["distinct_rows"] < MIN_DISTINCT * g["rows"]:
        out.append(f"{lib}: only {g['distinct_rows']} distinct rows of {g['rows']} (sampled at temperature 1)")
    return out


def generation_problems(r: dict) -> list[str]:
    """`tally_problems`, plus a non-finite or missing final loss and no generated tokens in the timed steps."""
    lib, loss = f"{r.get('library', '?')}/{r.get('generation_backend', 'transformers')}", r.get("final_loss")
    out = [f"{lib}: final loss {loss}"] if loss is None or not math.isfinite(loss) else []
    if not r.get("generated_tokens"):
        out.append(f"{lib}: no tokens generated in the timed steps")
    return out + tally_problems(r)
