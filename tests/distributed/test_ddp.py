"""DDP on CPU (gloo, two processes under torchrun): one optimizer step over a global batch split across
two ranks must equal the same step in one process. This checks the trainer base's global normaliser:
token counts (SFT) and pair counts (DPO) are summed across processes, so examples of different lengths
on different ranks are weighted exactly as in one process; and that ReFT locations and the adapter-off
reference still work when `Trainer` wraps the model in `DistributedDataParallel`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import torchrun

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import train_one  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")
# dpo_sft: DPO + the chosen NLL (TRL's rpo_alpha mixture), whose token mean needs the chosen-token count summed over
# both ranks (each rank's own N / T made it the mean of the ranks' token means: the chosen lengths differ by rank)
CASES = [("full", "sft"), ("reft", "sft"), ("lora", "dpo"), ("reft", "dpo"), ("lora", "dpo_sft")]


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun([str(WORKER), str(tiny_dir("llama")), str(out), *(f"{k}:{o}" for k, o in CASES)], timeout=300)
    assert proc.returncode == 0, proc.failure()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind,objective", CASES)
def test_two_ranks_equal_one_process(kind, objective, two_ranks, tiny_dir, tmp_path):
    two = load_file(str(two_ranks / f"{kind}-{objective}.safetensors"))
    one = train_one(str(tiny_dir("llama")), str(tmp_path / "one"), kind, objective)
    init = _initial(tiny_dir("llama"), kind)
    assert one.keys() == two.keys() and one
    assert any(not torch.equal(one[n], init[n]) for n in one), "the step changed nothing"
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=0, atol=5e-6, msg=n)


def _initial(model_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter
    from alignkit.models.loading import load_model

    torch.manual_seed(0)
    reft = ReftSettings(config={"representations": [{"layer": 1, "low_rank_dimension": 2}]}, positions="f1+l1")
    model = apply_adapter(load_model(model_dir), AdapterConfig(kind=kind, lora=LoraSettings(r=2, alpha=4.0) if "lora" in kind else LoraSettings(),
                                                               reft=reft if "reft" in kind else None))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
