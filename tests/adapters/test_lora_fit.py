"""A LoRA folder that does not fit the base it is loaded onto, on every load path (`load_adapter` for lora and
reft+lora, serve's `--engine vllm` plan): peft's `from_pretrained` drops saved tensors of modules the base lacks
(compat row P14) and vLLM matches a module by its last name part only, so a LoRA of a deeper base ran in part,
silently. Each is now one line naming the folder and one tensor, before anything is loaded."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignkit.adapters import adapter_of, apply_adapter, load_adapter, save_adapter
from alignkit.models.loading import load_model
from alignkit.settings import ConfigError

from .table import ADAPTERS, perturb

LORA_ROWS = [r for r in ADAPTERS if r.lora]


def deep_lora(row, tiny_dir, folder):
    """A LoRA (row's kind) trained on a 3-layer tiny Llama, saved without its alignkit_base.json (a peft adapter
    from elsewhere, or an older save): nothing records that its base had a third layer."""
    folder = save_adapter(perturb(apply_adapter(load_model(tiny_dir("llama", num_layers=3)), row.config())), folder)
    (folder / "alignkit_base.json").unlink()
    return folder


@pytest.mark.parametrize("row", LORA_ROWS, ids=lambda r: r.kind)
def test_a_lora_of_a_deeper_base_is_refused_by_load_adapter_naming_a_dropped_tensor(row, tiny_dir, tmp_path):
    """Before: load_adapter returned the 2-layer model with two thirds of the LoRA (peft dropped layer 2's 14
    tensors: 7 linear modules x A, B). Now one line naming the folder and a layer-2 tensor, and the model is left
    unwrapped (the check runs before peft injects anything)."""
    folder = deep_lora(row, tiny_dir, tmp_path / "deep")
    shallow = load_model(tiny_dir("llama"))
    with pytest.raises(ValueError) as e:
        load_adapter(shallow, folder)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.fullmatch(rf"{re.escape(str(folder))}: this LoRA adapter does not fit the base model .*: 14 saved "
                        r"tensor\(s\) fit no module of the base \(e\.g\. base_model\.model\.model\.layers\.2\.\S+"
                        r"lora_[AB]\.weight\), so only part of the adapter would run; use it with the base it was "
                        "trained on", msg), msg
    assert adapter_of(shallow).kind == "full"  # nothing was wrapped around it
    load_adapter(load_model(tiny_dir("llama", num_layers=3)), folder)  # on its own base it loads


@pytest.mark.parametrize("row", LORA_ROWS, ids=lambda r: r.kind)
def test_a_lora_with_a_rank_other_than_its_config_says_is_refused_in_one_line(row, tiny_dir, tmp_path):
    """adapter_config.json saying r=4 over tensors of rank 2 (a config copied from another run): peft failed with
    torch's multi-line "Error(s) in loading state_dict ... size mismatch". Now one line naming the tensor, its rank
    and the config's."""
    base = tiny_dir("llama")
    folder = save_adapter(perturb(apply_adapter(load_model(base), row.config(lora_r=2))), tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(ValueError) as e:
        load_adapter(load_model(base), folder)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.fullmatch(rf"{re.escape(str(folder))}: saved LoRA tensor base_model\.model\.model\.layers\.0\.\S+"
                        r"\.lora_A\.weight has rank 2 \(shape \[2, \d+\]\) but adapter_config\.json gives "
                        r"model\.layers\.0\.\S+ r=4, so peft would build layers it cannot fill; use the "
                        r"adapter_config\.json saved with these weights", msg), msg


def test_a_lora_missing_the_tensors_of_modules_it_targets_is_refused_after_peft_loads_it(tiny_dir, tmp_path):
    """A weights file lacking layer 1's tensors (a damaged or hand-edited file) under a config targeting every
    linear layer: peft made those LoRA layers and left them at their initial value (B = 0: no LoRA there) without a
    word. Now `check_lora_placed` names one of them."""
    base = tiny_dir("llama")
    row = next(r for r in LORA_ROWS if not r.reft)
    folder = save_adapter(perturb(apply_adapter(load_model(base), row.config())), tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(str(weights)).items() if ".layers.1." not in k}
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"a: this LoRA adapter does not fit the base model .*: 14 LoRA tensor\(s\) of "
                                         r"the base's modules are not in it \(e\.g\. \S+layers\.1\.\S+\), so only part"):
        load_adapter(load_model(base), folder, check_base=False)


def test_serve_with_vllm_refuses_a_lora_of_a_deeper_base_before_writing_its_folder(tiny_dir, tmp_path):
    """vLLM's LoRA loader checks a saved module's last name part only ("q_proj"), so a 3-layer LoRA on the 2-layer
    base was handed to vLLM and its third layer dropped (vllm/lora/model_manager.py: a model module with no LoRA
    weights is skipped, a LoRA module with no model module never looked at). Before: `prepare` wrote the plan. Now a
    ConfigError naming the adapter, its folder and a dropped tensor; no vLLM folder is written."""
    from alignkit.serve.vllm_server import prepare

    row = next(r for r in LORA_ROWS if not r.reft)
    folder = deep_lora(row, tiny_dir, tmp_path / "deep")
    with pytest.raises(ConfigError) as e:
        prepare(tiny_dir("llama"), {"deep": folder}, "base", tmp_path / "w")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"adapter 'deep': {folder}: this LoRA adapter does not fit the base model ")
    assert re.search(r"14 saved tensor\(s\) fit no module of the base \(e\.g\. \S+layers\.2\.", msg), msg
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("row", LORA_ROWS, ids=lambda r: r.kind)
def test_resuming_from_a_lora_checkpoint_of_a_deeper_base_is_refused_naming_a_tensor(row, tiny_dir, tmp_path):
    """load_adapter_weights (checkpoint resume) of a checkpoint of a 3-layer base without its alignkit_base.json:
    before, peft's unplaced keys were reported as "peft has changed" (compat.check_peft_load), blaming the library
    for a checkpoint of another base. Now the same line as load_adapter, naming a layer-2 tensor, and nothing is
    copied into the model."""
    import torch

    from alignkit.adapters import load_adapter_weights

    folder = deep_lora(row, tiny_dir, tmp_path / "deep")
    model = perturb(apply_adapter(load_model(tiny_dir("llama")), row.config()))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}: this LoRA adapter does not fit the base model "
                                         r".*: 14 saved tensor\(s\) fit no module of the base \(e\.g\. \S+layers\.2\."):
        load_adapter_weights(model, folder)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_fit_check_asks_no_hub_and_accepts_saved_embedding_weights(tiny_dir, tmp_path, monkeypatch):
    """A plain peft folder whose adapter_config.json names a Hub id as its base (the usual case for an adapter
    trained from a Hub model), saved with save_embedding_layers=True (its embedding weights in the file, which peft
    loads). Before: check_lora_placed called peft's get_peft_model_state_dict at save_embedding_layers="auto", which
    asks the Hub whether the base's config.json exists (a network call on every load, a wait offline) and left the
    saved embedding weights out of the tensors it expected, so the folder was refused as not fitting. Now: no Hub
    call, the folder passes and its embedding weights are the model's."""
    import peft.utils.save_and_load as peft_save_load
    from peft import LoraConfig, PeftModel, get_peft_model

    from alignkit.adapters.lora import check_lora_placed

    base = tiny_dir("llama")
    trained = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"]))
    emb = trained.get_input_embeddings().weight
    with torch.no_grad():
        emb.add_(0.5)
    folder = tmp_path / "peft"
    trained.save_pretrained(folder, save_embedding_layers=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "someorg/some-model"}))
    asked = []
    monkeypatch.setattr(peft_save_load, "check_file_exists_on_hf_hub", lambda *a, **k: asked.append(a) or None)
    served = PeftModel.from_pretrained(load_model(base), str(folder), adapter_name="a", is_trainable=False)
    assert asked == []  # peft's own load asks nothing
    check_lora_placed(served, "a", folder, base)  # what serve's load_loras and Lora.load call after peft's load
    assert asked == []
    assert torch.equal(served.get_input_embeddings().weight, emb)
