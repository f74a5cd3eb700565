"""TR-DPO reference syncing (`ref_sync`, alignkit.trainers.ref_sync): the reference copy becomes
alpha * policy + (1 - alpha) * reference after exactly the optimizer steps tau, 2 tau, ... (gradient accumulation's
micro-batches do not count), the weights checked against the mix computed here from snapshots; a checkpoint holds
the synced reference and a resume loads it (the same final weights as the uninterrupted run, exactly); what
cannot be synced is refused in one line before training."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.run_commit import CheckpointError
from alignkit.settings import ConfigError
from alignkit.trainers import KTOTrainer, PreferenceTrainer
from alignkit.trainers.ref_sync import REFERENCE_FILE, SyncsReference

PREF_ROWS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
             {"prompt": "Grass is", "chosen": " green.", "rejected": " loud."}]
KTO_ROWS = [{"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": "Grass is", "completion": " loud.", "label": False}] * 2


def _args(out, **over):
    base = dict(max_steps=4, per_device_train_batch_size=1, gradient_accumulation_steps=2, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True,
                learning_rate=5e-2, seed=0)
    return TrainingArguments(str(out), **{**base, **over})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Snapshots(TrainerCallback):
    """At each step's end, before the trainer's sync: the policy's weights and the reference's."""

    def __init__(self):
        self.trainer, self.policy, self.ref = None, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        self.policy[state.global_step] = _params(t.accelerator.unwrap_model(t.model))
        self.ref[state.global_step] = _params(t.reference.model)


def _mix(theta, ref, alpha):
    return {n: alpha * theta[n] + (1 - alpha) * ref[n] for n in ref}


def _close(a, b):
    return all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-7) for n in a)


@pytest.mark.parametrize("cls, rows", [(PreferenceTrainer, PREF_ROWS), (KTOTrainer, KTO_ROWS)])
def test_the_reference_is_mixed_at_steps_tau_and_2tau(cls, rows, tiny_dir, tmp_path):
    path = tiny_dir("llama")
    snaps, alpha = Snapshots(), 0.25
    kw = {"per_device_train_batch_size": 2} if cls is KTOTrainer else {}  # KTO's KL pairs need 2 rows per batch
    t = cls(load_model(path), _args(tmp_path, **kw), train_dataset=rows, processing_class=load_tokenizer(path),
            ref_sync={"alpha": alpha, "steps": 2}, callbacks=[snaps])
    snaps.trainer = t
    ref0 = _params(t.reference.model)
    assert _close(ref0, _params(t.model))  # the copy of the initial policy
    t.train()
    p, r = snaps.policy, snaps.ref
    assert not _close(p[2], ref0)  # the policy moved: a mix differs from either side
    assert _close(r[1], ref0) and _close(r[2], ref0)  # nothing after step 1 (not at micro-batch 2 either)
    after2 = _mix(p[2], ref0, alpha)
    assert _close(r[3], after2) and _close(r[4], after2)  # synced after step 2, not after 3
    assert _close(_params(t.reference.model), _mix(p[4], after2, alpha))  # and after step 4
    assert t.ref_syncs == 2


def test_a_run_resumed_after_a_sync_ends_as_the_uninterrupted_one(tiny_dir, tmp_path, monkeypatch):
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    sync = {"alpha": 0.5, "steps": 2}

    def run(out, resume=None):
        t = PreferenceTrainer(load_model(path), _args(out, save_strategy="steps", save_steps=1),
                              train_dataset=PREF_ROWS, processing_class=tok, ref_sync=sync)
        t.train(resume_from_checkpoint=resume)
        return _params(t.model), _params(t.reference.model)

    whole, whole_ref = run(tmp_path / "a")
    ck = tmp_path / "a" / "checkpoint-3"  # after the sync of step 2
    assert (ck / REFERENCE_FILE).is_file()
    resumed, resumed_ref = run(tmp_path / "b", str(ck))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)  # CPU fp32: exactly
    assert all(torch.equal(whole_ref[n], resumed_ref[n]) for n in whole_ref)
    # the same resume with the initial model as reference (what a resume without the file would score against)
    monkeypatch.setattr(SyncsReference, "load_reference", lambda self, checkpoint: None)
    stale, _ = run(tmp_path / "c", str(ck))
    assert not all(torch.equal(whole[n], stale[n]) for n in whole)


def test_a_checkpoint_without_the_reference_is_refused_under_ref_sync(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    PreferenceTrainer(load_model(path), _args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1),
                      train_dataset=PREF_ROWS, processing_class=tok).train()
    ck = tmp_path / "a" / "checkpoint-1"
    t = PreferenceTrainer(load_model(path), _args(tmp_path / "b"), train_dataset=PREF_ROWS, processing_class=tok,
                          ref_sync={"alpha": 0.5, "steps": 2})
    with pytest.raises(CheckpointError) as err:
        t.train(resume_from_checkpoint=str(ck))
    msg = str(err.value)
    assert "\n" not in msg and f"holds no {REFERENCE_FILE}, and ref_sync is on" in msg, msg
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").glob("checkpoint-*"))


def _lora(path):
    return apply_adapter(load_model(path), AdapterConfig(kind="lora", lora=LoraSettings(r=2, target_modules=["q_proj"])))


# (what, the model, trainer keywords, what the one line names)
REFUSED = {
    "lora": (_lora, {}, "adapter switched off"),
    "lora with a ref_model": (_lora, {"ref_model": "copy"}, "this policy has an adapter"),
    "precomputed": (load_model, {"reference": "precomputed", "reference_cache_dir": "cache"}, "stale after"),
    "reference-free": (load_model, {"loss_type": "simpo"}, "nothing to sync"),
    "alpha 0": (load_model, {"ref_sync": {"alpha": 0.0, "steps": 2}}, "method.ref_sync.alpha: 0.0 is not in (0, 1]"),
    "steps 0": (load_model, {"ref_sync": {"alpha": 0.5, "steps": 0}}, "method.ref_sync.steps: 0 is not an integer"),
    "unknown key": (load_model, {"ref_sync": {"mixup": 0.5}}, "unknown key(s) ['mixup']"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_synced_is_refused(case, tiny_dir, tmp_path):
    make, kw, named = REFUSED[case]
    path = tiny_dir("llama")
    model = make(path)
    kw = {"ref_sync": {"alpha": 0.5, "steps": 2}, **kw}
    if kw.get("ref_model") == "copy":
        kw["ref_model"] = load_model(path)
    if "reference_cache_dir" in kw:
        kw["reference_cache_dir"] = str(tmp_path / "cache")
    with pytest.raises(ConfigError) as err:
        PreferenceTrainer(model, _args(tmp_path / "out"), train_dataset=PREF_ROWS,
                          processing_class=load_tokenizer(path), **kw)
    assert named in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "cache").exists()  # refused before the reference log-probs were computed


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_ref_sync_under_a_sharding_engine_is_refused(engine):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from alignkit.settings.sections import RefSync
    from alignkit.trainers.ref_sync import refuse_sharded_ref_sync

    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, engine))
    with pytest.raises(ConfigError, match=r"^PreferenceTrainer: ref_sync under \w+ is not supported: the reference is "
                                          r"sharded by the engine") as err:
        refuse_sharded_ref_sync(RefSync(0.5, 2), accelerator, "PreferenceTrainer")
    assert "\n" not in str(err.value)
    refuse_sharded_ref_sync(None, accelerator, "PreferenceTrainer")  # off: nothing to refuse
    refuse_sharded_ref_sync(RefSync(0.5, 2), SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), "x")


@pytest.mark.parametrize("alpha", [0.6, 0.1])
def test_a_bf16_reference_is_mixed_in_float32_and_rounded_once(alpha):
    """bf16 reference, fp32 policy 1e-3 away: the mix equals (1 - a) ref + a policy in float64 rounded once to bf16
    (before: ref * (1 - a) rounded, then + a policy rounded again, off for many entries)."""
    from alignkit.trainers.ref_sync import mix_into_reference

    torch.manual_seed(0)
    ref = torch.nn.Linear(200, 200, bias=False).to(torch.bfloat16)
    pol = torch.nn.Linear(200, 200, bias=False)
    with torch.no_grad():
        pol.weight.copy_(ref.weight.float() + 1e-3 * torch.randn_like(pol.weight))
    exact = (1 - alpha) * ref.weight.double() + alpha * pol.weight.double()
    mix_into_reference(pol, ref, alpha)
    assert ref.weight.dtype == torch.bfloat16
    mismatched = (ref.weight.double() != exact.to(torch.bfloat16).double()).float().mean()
    assert mismatched < 1e-3, f"{float(mismatched):.3f} of the entries differ from the one-rounding mix"
