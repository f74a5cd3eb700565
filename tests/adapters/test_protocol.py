"""Generic tests of the adapter protocol, one run per row of the ADAPTERS table (`table.py`): the registry
holds exactly the table's kinds; `apply_adapter` trains only what the kind trains; switched off = the base
model; save -> load (and the model card's loading snippet) reproduce the outputs; serving routes follow the
kind's parts."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing

import pytest
import torch

from alignkit.adapters import (KINDS, Adapter, AdapterConfig, adapter_for, adapter_in, adapter_of, apply_adapter, load_adapter,
                               reference_off, register_adapter, registry, save_adapter)
from alignkit.adapters.config import LoraSettings, ReftSettings
from alignkit.interventions.config import Positions
from alignkit.models.loading import load_model, load_tokenizer

from .table import ADAPTERS, REFT_KINDS, ROWS, SWITCHABLE, perturb

IDS = [row.kind for row in ADAPTERS]
INPUTS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=INPUTS, attention_mask=torch.ones_like(INPUTS)).logits


def test_registry_holds_exactly_the_table():
    assert set(registry()) == set(KINDS) == set(ROWS)
    assert set(typing.get_args(typing.get_type_hints(AdapterConfig)["kind"])) == set(KINDS)  # the typed choices
    assert set(SWITCHABLE) == {"lora", "reft", "reft+lora"} and set(REFT_KINDS) == {"reft", "reft+lora"}


def test_register_refuses_a_kind_without_its_row_and_a_second_class_for_a_kind():
    class Odd(Adapter):
        kind = "odd"

    class SecondLora(Adapter):
        kind = "lora"

    with pytest.raises(ValueError, match=r"'odd': add its row to alignkit.adapters.config.KINDS"):
        register_adapter(Odd)
    with pytest.raises(ValueError, match=r"'lora' is registered twice \(alignkit.adapters.lora and "):
        register_adapter(SecondLora)
    assert registry()["lora"].__name__ == "Lora" and "odd" not in registry()


@pytest.mark.parametrize("row", ADAPTERS, ids=IDS)
def test_apply_trains_only_the_adapter(row, tiny_lm):
    base_names = {n for n, _ in tiny_lm("llama").named_parameters()}
    model = apply_adapter(tiny_lm("llama"), row.config())
    adapter = adapter_of(model)
    assert (adapter.kind, adapter.can_switch_off, adapter.saves_whole_model) == (row.kind, row.can_switch_off,
                                                                                  row.whole_model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if row.whole_model:
        assert set(trainable) == base_names
    else:  # only LoRA matrices and interventions; every base weight frozen
        assert trainable and all("lora_" in n or n.startswith("interventions.") for n in trainable), trainable
        assert any("lora_" in n for n in trainable) == row.lora
        assert any(n.startswith("interventions.") for n in trainable) == row.reft
    table = adapter.describe(model)
    assert table["kind"] == row.kind
    assert table["trainable parameters"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert ("lora.r" in table, "reft.positions" in table) == (row.lora, row.reft)


@pytest.mark.parametrize("row", ADAPTERS, ids=IDS)
def test_switched_off_is_the_base_model(row, tiny_lm):
    want = _logits(tiny_lm("llama"))
    model = perturb(apply_adapter(tiny_lm("llama"), row.config()))
    assert (_logits(model) - want).abs().max() > 1e-3  # the adapter changes the outputs
    if not row.can_switch_off:
        with pytest.raises(ValueError, match="frozen copy"):
            with reference_off(model):
                pass
        return
    with reference_off(model):
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    assert (_logits(model) - want).abs().max() > 1e-3  # and it is back on after the block


@pytest.mark.parametrize("row", ADAPTERS, ids=IDS)
def test_save_then_load_and_the_card_snippet_reproduce_outputs(row, tiny_lm, tiny_dir, tmp_path):
    model = perturb(apply_adapter(tiny_lm("llama"), row.config()))
    want = _logits(model)
    folder = save_adapter(model, tmp_path / "saved", tokenizer=load_tokenizer(tiny_dir("llama")))
    assert set(row.files) <= {p.name for p in folder.iterdir()}
    adapter = adapter_in(folder)
    assert adapter.kind == row.kind
    if row.whole_model:
        with pytest.raises(ValueError, match="load_model"):
            load_adapter(load_model(tiny_dir("llama")), folder)
        loaded = load_model(folder).eval()
    else:
        loaded = load_adapter(load_model(tiny_dir("llama")).eval(), folder)
        assert adapter_of(loaded).kind == row.kind
        assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-6)
    scope: dict = {}
    exec(adapter.how_to_load(str(folder), str(tiny_dir("llama")), False), scope)  # the model card's snippet
    torch.testing.assert_close(_logits(scope["model"].eval()), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row", ADAPTERS, ids=IDS)
def test_serving_route_follows_the_parts(row):
    adapter = adapter_for(row.config(positions="f2+l1"))
    if row.whole_model:
        with pytest.raises(ValueError, match="own --base"):
            adapter.route("x")
        return
    route = adapter.route("x")
    assert (route.name, route.kind, route.lora, route.reft) == ("x", row.kind, "x" if row.lora else None,
                                                                "x" if row.reft else None)
    assert route.positions == (Positions.parse("f2+l1") if row.reft else None)


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_an_adapter_on_another_base_with_the_same_shapes_is_refused(row, tiny_dir, tmp_path):
    """Two tiny Llamas with the same config but different seeds have identical shapes, so peft and ReFT load
    an adapter trained on one onto the other without a word and compute something else. The saved
    alignkit_base.json (shapes + an embedding probe) makes that an error; the same base in bf16 is accepted;
    check_base=False lets a user do it on purpose; folders saved before the file existed still load."""
    from alignkit.adapters import BASE_FINGERPRINT_NAME

    base, other = tiny_dir("llama"), tiny_dir("llama", seed=1)
    folder = save_adapter(perturb(apply_adapter(load_model(base), row.config())), tmp_path / "a")
    assert (folder / BASE_FINGERPRINT_NAME).is_file()
    with pytest.raises(ValueError, match="trained on a different base model .its input embedding weights differ"):
        load_adapter(load_model(other), folder)
    load_adapter(load_model(base, dtype="bfloat16"), folder)  # the same weights, rounded: not a different base
    load_adapter(load_model(other), folder, check_base=False)
    (folder / BASE_FINGERPRINT_NAME).unlink()
    load_adapter(load_model(other), folder)  # an older folder: nothing to check against


def finetuned_copy(base, folder):
    """`base` saved to `folder` after a small finetune of its final norm (the embedding's probed rows untouched)."""
    tuned = load_model(base)
    with torch.no_grad():
        tuned.model.norm.weight.add_(1e-3)
    tuned.save_pretrained(folder)
    load_tokenizer(base).save_pretrained(folder)
    return folder


def zero3_partitioned(model):
    """What DeepSpeed ZeRO-3 leaves in a process of a model it partitioned at load (from_pretrained under
    HfDeepSpeedConfig or ZeRO-3 TrainingArguments: zero.Init): every parameter has a `ds_id` and an empty `.data`
    (deepspeed's free_param; the shard lives in `ds_tensor`), config.name_or_path the folder it was loaded from."""
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
        p.data = torch.empty(0, dtype=p.dtype)
    return model


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_a_base_partitioned_at_load_by_zero3_is_fingerprinted_from_its_folder(row, tiny_dir, tmp_path, caplog):
    """A base ZeRO-3 partitioned at load had no fingerprint (its embedding reads empty), without a word: adapters
    saved from it recorded no alignkit_base.json and adapters loaded onto it were not checked. Now it is read from
    the folder the base was loaded from: the loaded weights' values exactly, so an adapter trained on a finetuned
    copy is refused on it as on the unsharded base. Loaded from no local folder: one warning saying what is not
    checked."""
    from alignkit.adapters import base_fingerprint, base_mismatch

    base = tiny_dir("llama")
    assert base_fingerprint(zero3_partitioned(load_model(base))) == base_fingerprint(load_model(base))
    tuned_dir = finetuned_copy(base, tmp_path / "tuned")
    folder = save_adapter(perturb(apply_adapter(load_model(tuned_dir), row.config())), tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a different base model .its final norm weights differ"):
        load_adapter(zero3_partitioned(load_model(base)), folder)
    saved = json.loads((folder / "alignkit_base.json").read_text())
    assert base_mismatch(saved, base_fingerprint(zero3_partitioned(load_model(tuned_dir)))) is None  # its own base

    hub = zero3_partitioned(load_model(base))
    hub.config.name_or_path = "org/a-hub-model"  # not a local folder, not cached: nothing to read the probes from
    with caplog.at_level("WARNING", logger="alignkit.adapters.base"):
        assert base_fingerprint(hub) is None and base_fingerprint(hub) is None
    said = [r.getMessage() for r in caplog.records if "fingerprint is not taken" in r.getMessage()]
    assert len(said) == 1 and "'org/a-hub-model'" in said[0] and "is not checked" in said[0]


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_a_zero3_base_named_by_hub_id_is_fingerprinted_from_the_local_cache(row, tiny_dir, tmp_path, hub_cache,
                                                                            caplog):
    """A ZeRO-3 base loaded by Hub name (from_pretrained("org/name"), read from the local Hugging Face cache) was only
    warned about: adapters saved from it recorded no base, an adapter trained on another base loaded onto it without
    a word. Now its cached snapshot (no network) is read like a local folder: the same probes as the unsharded base,
    the Hub name recorded, and an adapter trained on a finetuned copy refused; no warning."""
    from alignkit.adapters import base_fingerprint

    base = tiny_dir("llama")
    hub_cache("org/a-cached-model", base)
    hub = zero3_partitioned(load_model(base))
    hub.config.name_or_path = "org/a-cached-model"  # what from_pretrained("org/a-cached-model") sets
    with caplog.at_level("WARNING", logger="alignkit.adapters.base"):
        found = base_fingerprint(hub)
    assert found is not None and found.pop("name_or_path") == "org/a-cached-model"
    want = base_fingerprint(load_model(base))
    want.pop("name_or_path")
    assert found == want
    assert not [r for r in caplog.records if "fingerprint is not taken" in r.getMessage()]
    folder = save_adapter(perturb(apply_adapter(load_model(finetuned_copy(base, tmp_path / "tuned")), row.config())),
                          tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a different base model .its final norm weights differ"):
        load_adapter(hub, folder)


def test_a_zero3_base_whose_hub_name_is_cached_at_several_revisions_gets_no_fingerprint(tiny_dir, tmp_path, hub_cache,
                                                                                         caplog):
    """A ZeRO-3 base loaded by Hub name at another revision (from_pretrained("org/name", revision="v1")) was
    fingerprinted from main's cached snapshot (transformers records no revision): an adapter trained on v1 refused on
    v1, one trained on main accepted on it. With several snapshots cached it now takes none, with one warning naming
    the snapshots and the fix; one snapshot is read as before (the test above)."""
    import shutil

    from alignkit.adapters import base_fingerprint

    base = tiny_dir("llama")
    main = hub_cache("org/two-revisions", base)
    shutil.copytree(finetuned_copy(base, tmp_path / "v1"), main.parent / ("f" * 40))  # revision v1: other weights
    (main.parents[1] / "refs" / "v1").write_text("f" * 40)
    hub = zero3_partitioned(load_model(tmp_path / "v1"))  # loaded at v1
    hub.config.name_or_path = "org/two-revisions"  # what from_pretrained("org/two-revisions", revision="v1") sets
    with caplog.at_level("WARNING", logger="alignkit.adapters.base"):
        assert base_fingerprint(hub) is None and base_fingerprint(hub) is None
    said = [r.getMessage() for r in caplog.records if "fingerprint is not taken" in r.getMessage()]
    assert len(said) == 1 and "'org/two-revisions' is in the local Hugging Face cache at 2 revisions" in said[0]
    assert f"(snapshots {main.name[:12]}, ffffffffffff; main: {main.name[:12]})" in said[0], said[0]
    assert "snapshot_download(name, revision=...)" in said[0]


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_an_adapter_trained_on_a_finetuned_copy_of_the_base_is_refused_on_the_base(row, tiny_dir, tmp_path):
    """The embedding probe reads 3 rows (0, V/2, V-1): tokens a finetune may never see, so a fully finetuned copy of a
    base passed as the base (a ReFT trained on the base served on the SFT model without a word). The final norm,
    which full finetuning moves at every step and adapters leave frozen, is probed too: read in one dtype it must be
    the same bits; across dtypes, within bf16 rounding."""
    base = tiny_dir("llama")
    tuned_dir = finetuned_copy(base, tmp_path / "tuned")
    folder = save_adapter(perturb(apply_adapter(load_model(tuned_dir), row.config())), tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a different base model .its final norm weights differ"):
        load_adapter(load_model(base), folder)
    load_adapter(load_model(tuned_dir), folder)  # its own base
    load_adapter(load_model(tuned_dir, dtype="bfloat16"), folder)  # the same weights, rounded


def test_base_mismatch_names_the_shape_that_differs():
    from alignkit.adapters import base_mismatch

    saved = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 512,
             "probe_rows": [0, 256, 511], "embedding_probe": [0.5, -0.25]}
    assert base_mismatch(saved, dict(saved)) is None
    assert base_mismatch(saved, {**saved, "vocab_size": 520}) == "vocab_size 520 here, 512 when trained"
    assert base_mismatch(saved, {**saved, "embedding_probe": [0.503, -0.2505]}) is None  # bf16 rounding
    assert "embedding weights differ" in base_mismatch(saved, {**saved, "embedding_probe": [0.6, -0.25]})
    normed = {**saved, "norm_probe": [1.0, 0.5], "norm_dtype": "float32"}
    assert base_mismatch(normed, dict(normed)) is None
    assert base_mismatch(normed, saved) is None and base_mismatch(saved, normed) is None  # a folder saved before it
    # one dtype: 1e-6 relative + 1e-7; 1.0 + 2e-6 is another weight, 1.0 + 5e-7 the same one re-read
    assert "final norm weights differ" in base_mismatch(normed, {**normed, "norm_probe": [1.000002, 0.5]})
    assert base_mismatch(normed, {**normed, "norm_probe": [1.0000005, 0.5]}) is None
    # across dtypes (trained in bf16, loaded in float32): bf16's rounding of 0.5 + 1e-3 is 0.5 (8 mantissa bits)
    assert base_mismatch(normed, {**normed, "norm_probe": [1.0, 0.501], "norm_dtype": "bfloat16"}) is None
    assert "final norm" in base_mismatch(normed, {**normed, "norm_probe": [1.0, 0.53], "norm_dtype": "bfloat16"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_an_adapter_holding_a_non_finite_weight_is_refused_at_load(row, value, tiny_dir, tmp_path):
    """save_adapter writes what it is given; loaded, one NaN / inf made every eval metric NaN (and eval then stopped
    on 'The histogram is empty') and generate emit garbage. One line naming the folder and the weight instead."""
    model = perturb(apply_adapter(load_model(tiny_dir("llama")), row.config()))
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = value
    folder = save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError) as e:
        load_adapter(load_model(tiny_dir("llama")), folder)
    assert str(e.value).startswith(f"{folder}: adapter weight ")
    assert "holds 1 non-finite value(s) (NaN or inf)" in str(e.value)
    assert name.split(".")[-2:] == str(e.value).split("'")[1].split(".")[-2:]  # the poisoned tensor is named
    with torch.no_grad():
        param.view(-1)[0] = 0.0
    load_adapter(load_model(tiny_dir("llama")), save_adapter(model, tmp_path / "b"))  # finite again: loads


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
@pytest.mark.parametrize("other", [{"hidden_size": 96}, {"arch": "gpt2"}], ids=["hidden-96", "gpt2"])
def test_an_adapter_on_a_base_of_another_shape_is_refused_in_one_line_before_loading(row, other, tiny_dir, tmp_path):
    """Before: check_base ran after peft / ReFT had loaded the folder, so a LoRA on a wider base failed first with
    peft's multi-line "size mismatch for base_model.model...", one on a GPT-2 with NoMatchingPeftModuleError, and a
    ReFT with its own wording. Now every kind says the same, before loading: what differs and which base the folder
    was trained on (the fingerprint records its path), and the base model is left unwrapped."""
    base = tiny_dir("llama")
    folder = save_adapter(apply_adapter(load_model(base), row.config()), tmp_path / "a")
    wrong = load_model(tiny_dir(other.get("arch", "llama"), **{k: v for k, v in other.items() if k != "arch"}))
    want = "hidden_size 96 here, 64 when trained" if "hidden_size" in other else "model_type gpt2 here, llama when trained"
    with pytest.raises(ValueError) as e:
        load_adapter(wrong, folder)
    assert str(e.value) == (f"{folder}: this adapter was trained on a different base model ({want}; it was trained on "
                            f"{base}); load it on the base it was trained with (the training run's base_model/ or "
                            "model.path), or pass check_base=False (model.check_base: false) if that is what you mean")
    assert adapter_of(wrong).kind == "full"  # nothing was wrapped around it


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_a_folder_missing_one_of_its_files_is_refused_naming_it(row, tiny_dir, tmp_path):
    """Each file of the row (reft_config.json, adapter_config.json, the weights) is required by the kind's
    `weight_files`. Before: a ReFT folder without reft_config.json failed inside load_reft, a LoRA folder without
    adapter_config.json inside peft (huggingface_hub's repo-id error), after the base had loaded."""
    saved = save_adapter(apply_adapter(load_model(tiny_dir("llama")), row.config()), tmp_path / "saved")
    for name in row.files:
        folder = tmp_path / f"without-{name}"
        shutil.copytree(saved, folder)
        (folder / name).unlink()
        with pytest.raises(FileNotFoundError) as e:
            adapter_in(folder).require_files(folder)
        assert str(e.value).startswith(f"{folder} has no {name} ("), str(e.value)
        with pytest.raises(FileNotFoundError, match=f"has no {name} "):
            load_adapter(load_model(tiny_dir("llama")), folder)
    adapter_in(saved).require_files(saved)  # the whole folder passes


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_an_adapter_that_trains_the_embedding_names_the_base_it_started_from(row, tiny_dir, tmp_path):
    """alignkit_base.json was taken at save time, after training, so an adapter training the input embedding (LoRA's
    modules_to_save [embed_tokens]; a ReFT head) recorded its trained embedding: loaded, the check compared that with
    the trained copy it had just loaded, and passed on any base of the same shapes (here one of another seed). The
    fingerprint is now the base's, taken before wrapping: the own base loads (same logits), the other is refused."""
    cfg = row.config()
    if row.lora:  # the LoRA part trains the extra modules (in reft+lora too)
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, modules_to_save=["embed_tokens"]))
    else:
        cfg = dataclasses.replace(cfg, reft=dataclasses.replace(cfg.reft, modules_to_save=["model.embed_tokens"]))
    model = perturb(apply_adapter(load_model(tiny_dir("llama")), cfg), scale=0.5)
    assert any("embed_tokens" in n for n, p in model.named_parameters() if p.requires_grad)
    want = _logits(model)
    folder = save_adapter(model, tmp_path / "a")
    loaded = load_adapter(load_model(tiny_dir("llama")), folder)
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="trained on a different base model .its input embedding weights differ"):
        load_adapter(load_model(tiny_dir("llama", seed=1)), folder)
    again = save_adapter(loaded, tmp_path / "b")  # re-saved from a loaded model: still the base's fingerprint
    assert (again / "alignkit_base.json").read_text() == (folder / "alignkit_base.json").read_text()


def _probe(folder):
    """The embedding probe alignkit_base.json should hold for the tiny base in `folder`, read off its weights."""
    w = load_model(folder).get_input_embeddings().weight.detach()
    rows = [0, w.shape[0] // 2, w.shape[0] - 1]
    return rows, [round(float(x), 6) for x in w[rows, :8].float().flatten()]


def test_a_lora_wrapped_by_hand_that_trains_the_embedding_names_the_base_it_started_from(tiny_dir, tmp_path):
    """peft's get_peft_model by hand (no apply_adapter, so no fingerprint recorded before wrapping) with
    modules_to_save [embed_tokens]: alignkit_base.json was taken at save time from the wrapper's `.weight`, the
    trained copy, so the folder was refused on its own base ('its input embedding weights differ'). Now the
    fingerprint reads peft's frozen original_module: the own base loads (same logits), another seed is refused."""
    import json

    from peft import LoraConfig, get_peft_model

    base = tiny_dir("llama")
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    perturb(model, scale=0.5)
    want = _logits(model)
    folder = save_adapter(model, tmp_path / "a")
    saved = json.loads((folder / "alignkit_base.json").read_text())
    assert (saved["probe_rows"], saved["embedding_probe"]) == _probe(base)
    torch.testing.assert_close(_logits(load_adapter(load_model(base), folder)), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="trained on a different base model .its input embedding weights differ"):
        load_adapter(load_model(tiny_dir("llama", seed=1)), folder)


def test_a_reft_wrapped_by_hand_that_trains_the_embedding_records_its_base_or_says_it_cannot(tiny_dir, tmp_path,
                                                                                               caplog):
    """get_reft_model by hand, with the input embedding made trainable: the fingerprint taken at save time probed
    the trained embedding, which names no base. With record_base before training (what alignkit's trainers now do
    with a model they are given) the folder names the base it started from; without it, the save warns and records
    the shapes only (an embedding probe of a trained copy would refuse the own base)."""
    import json

    from alignkit.adapters import record_base
    from alignkit.interventions.attach import get_reft_model
    from alignkit.interventions.config import ReftConfig

    base = tiny_dir("llama")

    def by_hand():
        rc = dataclasses.replace(ReftConfig.uniform([0], intervention="loreft", low_rank_dimension=2), positions="f1+l1")
        m = get_reft_model(load_model(base), rc)
        m.model.get_input_embeddings().weight.requires_grad_(True)
        return m

    recorded = by_hand()
    record_base(recorded)
    folder = save_adapter(perturb(recorded, scale=0.5), tmp_path / "recorded")
    saved = json.loads((folder / "alignkit_base.json").read_text())
    assert (saved["probe_rows"], saved["embedding_probe"]) == _probe(base)
    unknown = save_adapter(perturb(by_hand(), scale=0.5), tmp_path / "unknown")
    saved = json.loads((unknown / "alignkit_base.json").read_text())
    assert "embedding_probe" not in saved and saved["vocab_size"] == load_model(base).config.vocab_size
    said = [r.getMessage() for r in caplog.records if "alignkit_base.json records its shapes only" in r.getMessage()]
    assert len(said) == 1 and "record_base(model)" in said[0]


def test_a_trainer_records_the_base_of_a_model_wrapped_by_hand(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from alignkit.trainers import SFTTrainer

    base = tiny_dir("llama")
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"]))
    SFTTrainer(model=model, args=TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]),
               train_dataset=[{"prompt": "a", "completion": "b"}], processing_class=load_tokenizer(base))
    got = model.alignkit_base_fingerprint
    assert (got["probe_rows"], got["embedding_probe"]) == _probe(base)


def test_an_online_trainer_records_the_base_of_a_model_wrapped_by_hand(tiny_dir):
    """The online trainers, as the offline ones: a model wrapped by hand gets its base's fingerprint when the trainer
    is built, before an update can change a trained embedding (else alignkit_base.json would probe the trained copy)."""
    from peft import LoraConfig, get_peft_model

    from alignkit.online.grpo import GRPOConfig, GRPOTrainer

    base = tiny_dir("llama")
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    assert getattr(model, "alignkit_base_fingerprint", None) is None
    GRPOTrainer(model, load_tokenizer(base), ["a", "b"], {"type": "function", "fn": lambda prompts, responses, **k: [0.0] * len(prompts)},
                GRPOConfig(steps=1, prompts_per_step=2, report_to="none", progress_bar=False, save_at_end=False))
    got = model.alignkit_base_fingerprint
    assert (got["probe_rows"], got["embedding_probe"]) == _probe(base)


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_resuming_from_a_checkpoint_of_another_base_is_refused(row, tiny_dir, tmp_path):
    """load_adapter_weights (checkpoint resume, the best model at the end) copied a folder's weights into the model
    without looking at alignkit_base.json, so a checkpoint trained on another base of the same shapes resumed
    without a word. Now the folder's base is compared with the one the model was built on, and the kind's files are
    required, before anything is copied; the model's own checkpoint still loads (same logits)."""
    from alignkit.adapters import load_adapter_weights

    model = perturb(apply_adapter(load_model(tiny_dir("llama")), row.config()))
    want = _logits(model)
    own = save_adapter(model, tmp_path / "own")
    other = save_adapter(perturb(apply_adapter(load_model(tiny_dir("llama", seed=1)), row.config()), seed=2),
                         tmp_path / "other")
    with pytest.raises(ValueError, match="trained on a different base model .its input embedding weights differ"):
        load_adapter_weights(model, other)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)  # nothing was copied
    fresh = apply_adapter(load_model(tiny_dir("llama")), row.config())
    load_adapter_weights(fresh, own)
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=1e-6)
    shutil.copytree(own, tmp_path / "partial")
    (tmp_path / "partial" / row.files[0]).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {row.files[0]} "):
        load_adapter_weights(fresh, tmp_path / "partial")


def test_a_save_that_records_no_base_removes_the_base_an_earlier_save_left(tiny_dir, tmp_path):
    """save_adapter into a folder an earlier save wrote: a save that records no base (a whole model) left the
    earlier adapter's alignkit_base.json beside it, read on load as this folder's base. It is removed now."""
    from alignkit.adapters import BASE_FINGERPRINT_NAME

    part = next(row for row in ADAPTERS if not row.whole_model)
    whole = next(row for row in ADAPTERS if row.whole_model)
    folder = save_adapter(apply_adapter(load_model(tiny_dir("llama")), part.config()), tmp_path / "a")
    assert (folder / BASE_FINGERPRINT_NAME).is_file()
    save_adapter(apply_adapter(load_model(tiny_dir("llama")), whole.config()), folder)
    assert not (folder / BASE_FINGERPRINT_NAME).exists()


@pytest.mark.parametrize("row", ADAPTERS, ids=IDS)
def test_apply_refuses_reft_settings_the_kind_would_ignore(row, tiny_lm):
    """README's ReFT snippet with kind="lora" (or "full") and its reft=ReftSettings(...) left in: apply_adapter
    wrapped the kind and dropped the ReFT settings without a word (the CLI refused adapter.reft there). Now the
    CLI's line; a kind with a ReFT part takes them, and refuses those it would not read (share_weights=False
    with one group of positions; modules_to_save beside a LoRA part, which trains them)."""
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}, positions="f1+l1")
    if not row.reft:  # refused where the config is built (dataclasses.replace runs __post_init__), as apply_adapter
        with pytest.raises(ValueError, match=rf"^adapter.reft: read only by adapter.kind reft or reft\+lora, and kind "
                                             rf"is '{re.escape(row.kind)}', so it would be ignored"):
            apply_adapter(tiny_lm("llama"), dataclasses.replace(row.config(), reft=reft))
        return
    cfg = dataclasses.replace(row.config(), reft=reft)
    assert adapter_of(apply_adapter(tiny_lm("llama"), cfg)).kind == row.kind
    one_group = dataclasses.replace(cfg, reft=dataclasses.replace(reft, positions="l1", share_weights=False))
    with pytest.raises(ValueError, match=r"^adapter.reft.share_weights: false splits"):
        apply_adapter(tiny_lm("llama"), one_group)
    if row.lora:
        with pytest.raises(ValueError, match=r"^adapter.reft.modules_to_save: with adapter.kind 'reft\+lora'"):
            apply_adapter(tiny_lm("llama"), dataclasses.replace(cfg, reft=dataclasses.replace(
                reft, modules_to_save=["model.norm"])))


def test_saves_of_other_kinds_into_one_folder_leave_only_the_last_save(tiny_lm, tiny_dir, tmp_path):
    """save_adapter into a folder an earlier save of another kind (or part set) wrote left the earlier weight files
    beside the new ones: a LoRA then a ReFT left adapter_model.safetensors, which a later whole-model save then
    carried (transformers' from_pretrained loads a folder's adapter_config.json as a peft adapter). Each save now
    removes the earlier save's files it did not write, and nothing else (a user's README, metrics, TensorBoard)."""
    folder = tmp_path / "out"
    folder.mkdir()
    mine = {"README.md": "my notes\n", "metrics.jsonl": '{"step": 1}\n', "events.out.tfevents.1.host": "tb"}
    for name, text in mine.items():
        (folder / name).write_text(text)
    every = {f for row in ADAPTERS for f in row.files} | {"modules_to_save.safetensors", "generation_config.json"}
    for seed, kind in enumerate(("lora", "reft", "reft+lora", "full", "lora", "reft"), start=1):
        row = ROWS[kind]
        model = perturb(apply_adapter(tiny_lm("llama"), row.config()), seed=seed)
        want = _logits(model)
        save_adapter(model, folder)
        left = {p.name for p in folder.iterdir()} & every
        assert left - {"generation_config.json"} == set(row.files), kind
        assert adapter_in(folder).kind == kind
        if row.whole_model:
            loaded = load_model(folder).eval()
        else:
            loaded = load_adapter(load_model(tiny_dir("llama")).eval(), folder)
            assert adapter_of(loaded).kind == kind
        torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-6)
    readme = (folder / "README.md").read_text()  # peft's save_pretrained adds its model card to a README.md
    assert "my notes\n" in readme and {n: (folder / n).read_text() for n in mine if n != "README.md"} == {
        n: t for n, t in mine.items() if n != "README.md"}


def test_a_reft_save_without_a_head_removes_the_head_an_earlier_reft_save_left(tiny_classifier, tmp_path):
    reft = ROWS["reft"]
    save_adapter(apply_adapter(tiny_classifier(), reft.config()), tmp_path / "out")
    assert (tmp_path / "out" / "modules_to_save.safetensors").is_file()  # a classifier's ReFT trains its head
    both = ROWS["reft+lora"]  # its LoRA part trains the head (peft's modules_to_save), in adapter_model.safetensors
    save_adapter(apply_adapter(tiny_classifier(), both.config()), tmp_path / "out")
    assert not (tmp_path / "out" / "modules_to_save.safetensors").exists()
    assert set(both.files) <= {p.name for p in (tmp_path / "out").iterdir()}


def test_a_folder_holding_another_tools_save_or_an_unreadable_alignkit_save_is_refused(tiny_lm, tmp_path):
    """A folder with peft's files and no alignkit_adapter.json (a save by peft itself) was written into, its files
    mixed with this save's. Refused in one line now, before anything is written; so is a folder whose earlier
    alignkit_adapter.json cannot be read (which files it wrote is unknown)."""
    from peft import LoraConfig, get_peft_model

    theirs = tmp_path / "theirs"
    get_peft_model(tiny_lm("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    model = apply_adapter(tiny_lm("llama"), ROWS["reft"].config())
    with pytest.raises(ValueError, match=r"^save_adapter: .*theirs holds adapter_config.json, "
                                         r"adapter_model.safetensors but no alignkit_adapter.json, so not an "
                                         r"alignkit save.*; save into an empty or new folder"):
        save_adapter(model, theirs)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    broken = save_adapter(model, tmp_path / "broken")
    (broken / "alignkit_adapter.json").write_text("{")
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    with pytest.raises(ValueError, match=r"alignkit_adapter.json cannot be read \(.*not valid JSON"):
        save_adapter(model, broken)
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before


@pytest.mark.parametrize("row", ADAPTERS, ids=IDS)
def test_apply_refuses_lora_settings_the_kind_would_ignore(row, tiny_lm):
    """`AdapterConfig(kind="reft" or "full", lora=LoraSettings(r=16))` in Python: the CLI refused adapter.lora there,
    but apply_adapter checked only the ReFT settings, so it trained a ReFT adapter (or the whole model) with no LoRA
    and dropped r=16 without a word. Now the CLI's line; a kind with a LoRA part uses them (rank 16 on its peft
    modules)."""
    if not row.lora:  # refused where the config is built (dataclasses.replace runs __post_init__), as apply_adapter
        with pytest.raises(ValueError, match=rf"^adapter.lora: read only by adapter.kind lora or reft\+lora, and kind "
                                             rf"is '{re.escape(row.kind)}', so it would be ignored; set adapter.kind"):
            apply_adapter(tiny_lm("llama"), dataclasses.replace(row.config(), lora=LoraSettings(r=16, alpha=32.0)))
        return
    model = apply_adapter(tiny_lm("llama"), dataclasses.replace(row.config(), lora=LoraSettings(r=16, alpha=32.0)))
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {16}, ranks


@pytest.mark.parametrize("row", [r for r in ADAPTERS if r.reft], ids=lambda r: r.kind)
@pytest.mark.parametrize("edit, key, said, runs", [
    (lambda reft: reft.update(positions="l2"), "positions", "'l2'", "'f1+l1'"),
    (lambda reft: reft["config"]["representations"][1].update(layer=0), "config.representations[1].layer", "0", "1"),
    (lambda reft: reft["config"]["representations"][0].update(low_rank_dimension=4),
     "config.representations[0].low_rank_dimension", "4", "2"),
    (lambda reft: reft["config"]["representations"].pop(), "config.representations", "'1 representation(s)'",
     "'2 representation(s)'"),
])
def test_reft_settings_that_disagree_with_the_saved_interventions_are_refused_at_load(row, edit, key, said, runs,
                                                                                      tiny_dir, tmp_path):
    """alignkit_adapter.json (what serving routes by: `route().positions`, and what the run summary reports) and
    reft_config.json (what the weights were saved with and what the loaded model runs) from different saves, or one
    edited. Before: the folder loaded without a word, generate edited f1+l1 while serve routed the edited 'l2'."""
    folder = save_adapter(apply_adapter(load_model(tiny_dir("llama")), row.config()), tmp_path / "saved")
    loaded = load_adapter(load_model(tiny_dir("llama")), folder)  # the folder as saved loads
    assert adapter_of(loaded).route("a").positions == Positions.parse("f1+l1")
    settings = json.loads((folder / "alignkit_adapter.json").read_text())
    edit(settings["reft"])
    (folder / "alignkit_adapter.json").write_text(json.dumps(settings))
    base = load_model(tiny_dir("llama"))
    with pytest.raises(ValueError) as e:
        load_adapter(base, folder)
    assert str(e.value).startswith(f"{folder}: alignkit_adapter.json says adapter.reft.{key}={said} but "
                                   f"reft_config.json, which the weights were saved with, says {runs}"), str(e.value)
    assert "\n" not in str(e.value) and "save the adapter again" in str(e.value)
    assert adapter_of(base).kind == "full"  # refused before the model was wrapped
