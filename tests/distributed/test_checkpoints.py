"""`train.save_steps` checkpoints of the offline trainers on two CPU processes (torchrun, gloo).

FSDP2: a checkpoint is an ordinary folder (gathered safetensors, the full optimizer state by parameter
names in optimizer.pt, no pickled second copy of the model), and a run resumed from checkpoint-2 gives the
uninterrupted run's step 3 (loss and parameters; AdamW moments and the linear schedule restored), full and
LoRA. Before this, the second process left `_save_checkpoint` early and the next step's collective hung
(any engine, DDP too). ZeRO-3: the checkpoint holds the gathered model folder, none of DeepSpeed's pickled
`global_stepN/` files, and resuming from it is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import torchrun

WORKER = Path(__file__).with_name("checkpoint_worker.py")
CASES = {"fsdp": ["full:sft", "lora:dpo"], "zero3": ["full:sft", "ds-mismatch", "ds-optimizer", "ds-precision"]}
_RUNS: dict = {}


def run_two_ranks(engine: str, model_dir, tmp_path_factory) -> Path:
    if engine not in _RUNS:
        out = tmp_path_factory.mktemp(f"checkpoints-{engine}")
        proc = torchrun([str(WORKER), engine, str(model_dir), str(out), *CASES[engine]],
                        env={"DS_ACCELERATOR": "cpu"}, timeout=600)
        assert proc.returncode == 0, proc.failure()
        _RUNS[engine] = out
    return _RUNS[engine]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES["fsdp"])
def test_fsdp2_checkpoint_is_plain_and_resumes_to_the_same_step(case, tiny_dir, tmp_path_factory):
    out = run_two_ranks("fsdp", tiny_dir("llama"), tmp_path_factory)
    name = case.replace(":", "-")
    run = json.loads((out / f"{name}.json").read_text())
    assert run["world"] == 2 and run["distributed_type"].endswith("FSDP")
    files = set(run["checkpoint_files"])
    weights = "model.safetensors" if case.startswith("full") else "adapter_model.safetensors"
    assert {weights, "optimizer.pt", "scheduler.pt", "trainer_state.json", "alignkit_complete.json"} <= files
    assert not [f for f in files if "fsdp" in f or f.endswith(".bin")], files  # no pickled FSDP model copy
    a, b = run["a"], run["b"]
    assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in b] == [1, 2, 3]  # b: 1, 2 from the checkpoint
    assert run["a_steps_run"] == 3 and run["b_steps_run"] == 1  # b really resumed: it trained step 3 only
    assert a[2]["loss"] != a[1]["loss"] != a[0]["loss"]  # step 3 depends on the restored weights and AdamW moments
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], rel=1e-5, abs=1e-7)
    pa, pb = load_file(str(out / f"{name}-a.safetensors")), load_file(str(out / f"{name}-b.safetensors"))
    assert pa.keys() == pb.keys() and pa
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], rtol=1e-5, atol=1e-6, msg=n)
    # the checkpoint's optimizer state is full (not a shard): every trainable tensor's AdamW moment whole
    optim = torch.load(out / f"{name}-a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in optim["state"].values())
    assert shapes == sorted(tuple(t.shape) for t in pa.values())


@pytest.mark.slow
def test_zero3_checkpoint_holds_the_gathered_model_and_resume_is_refused(tiny_dir, tmp_path_factory):
    pytest.importorskip("deepspeed")
    from alignkit.models.loading import load_model

    out = run_two_ranks("zero3", tiny_dir("llama"), tmp_path_factory)
    run = json.loads((out / "full-sft.json").read_text())
    assert run["world"] == 2 and run["distributed_type"].endswith("DEEPSPEED")
    files = set(run["checkpoint_files"])
    assert {"model.safetensors", "trainer_state.json", "alignkit_complete.json"} <= files
    assert not [f for f in files if f.startswith("global_step") or f.endswith((".pt", ".bin")) and "rng" not in f]
    # the gathered step-2 weights, not empty ZeRO-3 partitions
    ckpt = dict(load_model(out / "full-sft-a" / "checkpoint-2").named_parameters())
    base = dict(load_model(tiny_dir("llama")).named_parameters())
    assert all(p.shape == base[n].shape for n, p in ckpt.items())
    assert any(not torch.equal(p, base[n]) for n, p in ckpt.items())
    assert "resuming under DeepSpeed is not supported" in run["refused"] and "\n" not in run["refused"]


@pytest.mark.slow
def test_deepspeed_config_value_against_the_training_settings_is_refused_at_construction(tiny_dir, tmp_path_factory):
    """accelerate's `deepspeed_config: {gradient_accumulation_steps: 4}` against train.gradient_accumulation_steps
    1: one line naming both when the trainer is built (transformers raised a multi-line ValueError only when
    training started, after the CLI had written the run folder)."""
    pytest.importorskip("deepspeed")
    out = run_two_ranks("zero3", tiny_dir("llama"), tmp_path_factory)
    message = json.loads((out / "ds-mismatch.json").read_text())["refused"]
    assert message is not None and message.startswith("ConfigError") and "\n" not in message
    assert "ds gradient_accumulation_steps=4 vs train.gradient_accumulation_steps=1" in message and "'auto'" in message


@pytest.mark.slow
def test_a_deepspeed_json_with_its_own_optimizer_and_schedule_is_refused_at_construction(tiny_dir, tmp_path_factory):
    """A DeepSpeed JSON (accelerate's deepspeed_config_file) with "optimizer" / "scheduler" sections, as launched:
    transformers would have trained with DeepSpeed's AdamW (weight decay on every parameter) and WarmupLR in place of
    train.optim / lr_scheduler_type, without a word; now one line naming the file and both sections."""
    pytest.importorskip("deepspeed")
    out = run_two_ranks("zero3", tiny_dir("llama"), tmp_path_factory)
    message = json.loads((out / "ds-optimizer.json").read_text())["refused"]
    assert message is not None and message.startswith("ConfigError") and "\n" not in message
    assert f"deepspeed_config_file ({out}/ds_config.json)" in message
    assert "\"optimizer\" section (type AdamW)" in message and "train.optim=adamw_torch" in message
    assert "\"scheduler\" section (type WarmupLR)" in message and "train.lr_scheduler_type=linear" in message


@pytest.mark.slow
def test_accelerates_mixed_precision_against_train_bf16_names_its_source_and_fix(tiny_dir, tmp_path_factory):
    """accelerate's `mixed_precision: bf16` with train.bf16 unset: accelerate writes bf16.enabled=true into the
    DeepSpeed config, and the refusal said only "set those DeepSpeed values to 'auto'", a key the user never wrote."""
    pytest.importorskip("deepspeed")
    out = run_two_ranks("zero3", tiny_dir("llama"), tmp_path_factory)
    message = json.loads((out / "ds-precision.json").read_text())["refused"]
    assert message is not None and message.startswith("ConfigError") and "\n" not in message
    assert "ds bf16.enabled=True vs train.bf16|bf16_full_eval=False (accelerate's mixed_precision: bf16" in message
    assert "set train.bf16=true, or mixed_precision: 'no' in the accelerate config" in message
