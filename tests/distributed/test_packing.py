"""The packed layouts, defaults on CPU, under a distributed engine (two CPU processes, gloo, LoRA, 2 SGD steps).

The layout is resolved when the trainer is built (`alignkit.trainers.packing`), before accelerate wraps the model,
and a packed row runs through the model's own forward, so DDP and FSDP2 take the packed defaults as one process
does: SFT padding-free rows, DPO shared-prompt rows. Checked: each run resolved the layout it says, and the packed
layouts (SFT default; DPO default and padding_free=True) give the padded layout's loss at both steps and its
trained weights, up to rounding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import torchrun

sys.path.insert(0, str(Path(__file__).parent))
from packing_worker import CASES  # noqa: E402

WORKER = Path(__file__).with_name("packing_worker.py")
RESOLVED = {"sft-default": (True, False), "sft-padded": (False, False), "dpo-default": (False, True),
            "dpo-packed": (True, False), "dpo-padded": (False, False)}  # (padding_free, share_prompt)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_ranks(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"packing-{request.param}")
    proc = torchrun([str(WORKER), str(tiny_dir("llama")), str(out), request.param], timeout=600)
    assert proc.returncode == 0, proc.failure()
    return request.param, out


def _run(out: Path, case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / f"{case}.json").read_text()), load_file(str(out / f"{case}.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("-padded")])
def test_packed_layouts_equal_the_padded_one_under_two_ranks(case, two_ranks):
    engine, out = two_ranks
    padded_case = case.split("-")[0] + "-padded"
    info, params = _run(out, case)
    ref, ref_params = _run(out, padded_case)
    for name, got in ((case, info), (padded_case, ref)):
        assert got["world"] == 2 and got["distributed_type"].endswith("FSDP" if engine == "fsdp" else "MULTI_CPU")
        assert (got["padding_free"], got["share_prompt"]) == RESOLVED[name], name
    assert len(info["losses"]) == len(ref["losses"]) == 2 and ref["losses"][0] != ref["losses"][1], ref["losses"]
    assert info["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert params.keys() == ref_params.keys() and params
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-4, atol=1e-6, msg=n)
