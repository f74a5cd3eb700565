"""The one `Reference` object: every mode gives the log-probs of an independently computed reference (a base
model loaded separately from disk, scored with the full (B, T, V) logits), and the online loop's per-token path
and the offline trainers' per-sequence path agree on the same rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.adapters import unwrap_lm
from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.online.rollout import sequence_sums
from alignkit.trainers import KTOTrainer, PreferenceTrainer, build_reference, completion_logps

from tests.adapters.table import perturb

from .conftest import fast_args


def _naive(model, batch):
    """(rows,) summed completion log-probs from the FULL logits: log_softmax, gather, mask (right padding)."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (logp * (batch["completion_mask"][:, 1:] * att[:, 1:])).sum(-1)


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=2e-4)


@pytest.fixture
def pairs(features, collators):
    return collators["preference"](features["preference"][:4])  # 8 rows: 4 chosen, then 4 rejected


@pytest.mark.parametrize("kind", ["lora", "reft", "reft+lora"])
def test_adapter_off_is_the_base_model(kind, make_model, tiny_dir, pairs):
    policy = make_model(kind)
    ref = build_reference(policy)
    assert ref.mode == "adapter_off" and ref.model is None
    perturb(policy, seed=3)
    want = _naive(load_model(tiny_dir("llama")), pairs)  # the base, loaded on its own
    with torch.no_grad():
        assert (completion_logps(policy, pairs)[0] - want).abs().max() > 1e-2  # the policy itself differs
    _close(ref.logps(policy, pairs), want)


@pytest.mark.parametrize("kind", ["lora", "reft", "reft+lora"])
def test_adapter_off_reference_takes_no_neftune_noise(kind, make_model, tiny_dir, pairs):
    """NEFTune (`neftune_noise_alpha`) hooks the input embeddings and adds noise while they train: the "adapter_off"
    reference, taken with the policy in training mode, was the base model plus fresh noise on every call (DPO's
    step-0 loss was not log 2; a "copy" reference, in eval mode, had none). It is the base model; the policy's own
    forward keeps its noise."""
    from transformers.integrations.neftune import activate_neftune

    policy = make_model(kind).train()
    ref = build_reference(policy)
    want = _naive(load_model(tiny_dir("llama")), pairs)
    handle = activate_neftune(unwrap_lm(policy), 5.0)
    try:
        _close(ref.logps(policy, pairs), want)
        with torch.no_grad():
            assert (completion_logps(policy, pairs)[0] - completion_logps(policy, pairs)[0]).abs().max() > 1e-4
    finally:
        handle.remove()
    assert unwrap_lm(policy).get_input_embeddings().training  # restored


def test_copy_is_the_initial_model_and_a_passed_model_is_used(make_model, tiny_dir, pairs):
    policy = make_model("full")
    ref = build_reference(policy).place("cpu")
    assert ref.mode == "copy" and not any(p.requires_grad for p in ref.model.parameters())
    perturb(policy, 0.02, seed=3)  # full finetuning: every weight moves; the copy keeps the initial ones
    base = load_model(tiny_dir("llama"))
    want = _naive(base, pairs)
    assert (_naive(policy, pairs) - want).abs().max() > 1e-2
    _close(ref.logps(policy, pairs), want)

    other = load_model(tiny_dir("llama"))
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    passed = build_reference(make_model("lora"), ref_model=other)  # "auto" with a model: that model
    assert passed.mode == "copy" and passed.model is other
    _close(passed.logps(policy, pairs), _naive(other, pairs))


def test_precomputed_gives_the_cached_base_values(make_model, tiny_dir, features, collators, tokenizer, tmp_path):
    policy = make_model("lora")
    perturb(policy, seed=3)
    ref = build_reference(policy, cache_dir=tmp_path / "cache")
    assert ref.mode == "precomputed"
    feats, col = features["preference"], collators["preference"]
    data = ref.cached_dataset(policy, feats, col, "train", tokenizer=tokenizer, batch_size=3)
    assert (tmp_path / "cache" / "train.safetensors").is_file()
    batch = ref.collator(col)(data[:4])
    del policy  # the values come from the batch, not from a model
    _close(ref.logps(None, batch), _naive(load_model(tiny_dir("llama")), col(feats[:4])))


def test_none_and_refusals(make_model, pairs):
    lora, full = make_model("lora"), make_model("full")
    assert build_reference(lora, reference_free=True).logps(lora, pairs) is None
    with pytest.raises(ValueError, match="needs an adapter"):
        build_reference(full, "adapter_off")
    with pytest.raises(ValueError, match="KTOTrainer supports reference 'adapter_off' or 'copy', not 'precomputed'"):
        build_reference(lora, "precomputed", cache_dir="x", supports=("adapter_off", "copy"), owner="KTOTrainer")
    with pytest.raises(ValueError, match="per-sequence sums"):
        build_reference(lora, cache_dir="x").logps(lora, pairs, score=lambda m, b: b["input_ids"])


def _zero(prompts, responses, **kw):
    return [0.0] * len(responses)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_online_and_offline_paths_agree(kind, make_model, tiny_dir, tokenizer, features, collators, pairs, tmp_path):
    """The same rows through the online loop's reference (per-token, summed) and the offline DPO and KTO
    trainers' (per-sequence) equal the separately loaded base model's log-probs."""
    policy = make_model(kind)
    online = GRPOTrainer(policy, tokenizer, ["a", "b"], {"type": "function", "fn": _zero},
                         GRPOConfig(steps=1, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2)))
    dpo = PreferenceTrainer(policy, fast_args(tmp_path), train_dataset=features["preference"],
                            data_collator=collators["preference"])
    kto = KTOTrainer(policy, fast_args(tmp_path), train_dataset=features["unpaired"],
                     data_collator=collators["unpaired"])
    assert online.reference_mode == dpo.reference_mode == kto.reference_mode == (
        "copy" if kind == "full" else "adapter_off")
    perturb(policy, 0.02 if kind == "full" else 0.2, seed=3)
    want = _naive(load_model(tiny_dir("llama")), pairs)
    rows = {k: pairs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    per_token = online.reference.logps(online.policy, rows, online.reference_token_logps)  # (2B, T-1)
    mask = (rows["completion_mask"][:, 1:] & rows["attention_mask"][:, 1:]).bool()
    _close(sequence_sums(per_token, mask), want)
    _close(dpo.reference.logps(policy, pairs), want)
    _close(kto.reference.logps(policy, pairs), want)


@pytest.mark.parametrize("mode, loss_type, says", [
    ("auto", "simpo", r"ref_model is given, and the loss reads no reference \(reference-free\), so it would never be "
                      r"used; leave ref_model out$"),
    ("none", "sigmoid", r"ref_model is given, and reference='none' scores none \(TRL's reference_free\), so it would "
                        r"never be used; pass reference='copy'"),
    ("adapter_off", "sigmoid", r"ref_model is given, and reference='adapter_off' scores the policy with its adapter "
                               r"switched off, so it would never be used")])
def test_a_ref_model_the_reference_never_scores_is_refused(mode, loss_type, says, make_model, tiny_dir, features,
                                                           collators, tmp_path):
    """PreferenceTrainer(loss_type='simpo', ref_model=m) (a TRL user's DPOTrainer(model, ref_model, ...) habit), or
    ref_model beside reference='none' / 'adapter_off', built a reference that never read that model: the run trained
    reference-free or against the policy with its adapter off, without a word. Now one line when the trainer is built;
    reference_cache_dir beside reference='copy' likewise. ref_model with 'copy' (or 'auto') still scores that model."""
    other = load_model(tiny_dir("llama"))
    build = lambda **kw: PreferenceTrainer(make_model("lora"), fast_args(tmp_path),  # noqa: E731
                                           train_dataset=features["preference"],
                                           data_collator=collators["preference"], **kw)
    with pytest.raises(ValueError, match=rf"^PreferenceTrainer: {says}"):
        build(reference=mode, loss_type=loss_type, ref_model=other)
    with pytest.raises(ValueError, match=r"^PreferenceTrainer: reference_cache_dir is read only with "
                                         r"reference='precomputed', and the reference is 'copy', so it would be ignored"):
        build(reference="copy", reference_cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "out").exists()
    assert build(ref_model=other).reference.model is other


def _reft_with_trained_head(tiny_dir, kind="reft"):
    """A ReFT (or ReFT+LoRA) LM that also trains lm_head whole: the ReFT part's modules_to_save (reft), or peft's
    (reft+lora, which keeps the base's copy)."""
    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]},
                        modules_to_save=["lm_head"] if kind == "reft" else None)
    lora = LoraSettings(r=2, modules_to_save=["lm_head"]) if kind == "reft+lora" else LoraSettings()
    torch.manual_seed(0)
    return apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind=kind, lora=lora, reft=reft))


def test_adapter_off_of_a_reft_that_trains_a_module_in_place_is_refused(tiny_dir, features, collators, tokenizer,
                                                                        pairs, tmp_path):
    """A ReFT with adapter.reft.modules_to_save [lm_head] trains lm_head in the model itself; switching the adapter
    off turns the interventions off only, so the 'adapter_off' reference of DPO / KTO / the online loop scored the
    trained lm_head: it moved with the policy (after 3 DPO steps its log-probs were several nats off the base's) and
    the run exited 0. Now refused when the trainer is built (auto too); 'precomputed' (scored before training) equals
    the base; a caller that can load the base (alignkit eval: make_copy) gets a 'copy'; ReFT+LoRA, whose
    modules_to_save is peft's (the base's copy kept), still switches off to the base."""
    policy = _reft_with_trained_head(tiny_dir)
    for cls, data, extra in ((PreferenceTrainer, "preference", {"loss_type": "sigmoid"}), (KTOTrainer, "unpaired", {})):
        for reference in ("auto", "adapter_off"):
            with pytest.raises(ValueError, match=rf"^{cls.__name__}: the reference is the policy with its adapter "
                                                 r"switched off, and the ReFT adapter trains lm_head whole in place "
                                                 r"\(adapter.reft.modules_to_save\), .* the reference would move "):
                cls(policy, fast_args(tmp_path), train_dataset=features[data], data_collator=collators[data],
                    reference=reference, **extra)
    with torch.no_grad():  # as if trained: the head away from the base's
        unwrap_lm(policy).lm_head.weight.add_(0.5 * torch.randn_like(unwrap_lm(policy).lm_head.weight))
    base = load_model(tiny_dir("llama"))
    copy = build_reference(policy, make_copy=lambda: load_model(tiny_dir("llama")), supports=("adapter_off", "copy"))
    assert copy.mode == "copy"
    _close(copy.logps(policy, pairs), _naive(base, pairs))
    fresh = _reft_with_trained_head(tiny_dir)
    trainer = PreferenceTrainer(fresh, fast_args(tmp_path, max_steps=1), train_dataset=features["preference"],
                                data_collator=collators["preference"], loss_type="sigmoid",
                                reference_cache_dir=str(tmp_path / "cache"), padding_free=False, share_prompt=False)
    batch = trainer.reference.collator(collators["preference"])(list(trainer.train_dataset)[:4])
    _close(trainer.reference.logps(None, batch), _naive(base, pairs))
    stacked = _reft_with_trained_head(tiny_dir, "reft+lora")
    with torch.no_grad():
        for n, p in stacked.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    assert build_reference(stacked).mode == "adapter_off"
    _close(build_reference(stacked).logps(stacked, pairs), _naive(base, pairs))
