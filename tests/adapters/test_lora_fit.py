"""A LoRA folder that does not fit the base it is loaded onto, on every load path (`load_adapter` for lora and
reft+lora, serve's `--engine vllm` plan, `alignkit vllm-serve`'s POST /lora): peft's `from_pretrained` drops saved
tensors of modules the base lacks (compat row P14) and vLLM matches a module by its last name part only, so a LoRA of
a deeper base ran in part, silently; one of a narrower base failed with torch's multi-line size mismatch. Each is now
one line naming the folder and one tensor, before anything is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def refused_in_one_line(model, folder, pattern):
    """load_adapter(model, folder) is a ValueError of one line matching `pattern`, and the model is left unwrapped
    (the checks run before peft injects anything)."""
    with pytest.raises(ValueError) as e:
        load_adapter(model, folder)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.fullmatch(pattern, msg), msg
    assert adapter_of(model).kind == "full"  # nothing was wrapped around it


@pytest.mark.parametrize("row", LORA_ROWS, ids=lambda r: r.kind)
def test_a_lora_of_a_deeper_base_is_refused_by_load_adapter_naming_a_dropped_tensor(row, tiny_dir, tmp_path):
    """Before: load_adapter returned the 2-layer model with two thirds of the LoRA (peft dropped layer 2's 14
    tensors: 7 linear modules x A, B). Now one line naming the folder and a layer-2 tensor, and the model is left
    unwrapped (the check runs before peft injects anything)."""
    folder = deep_lora(row, tiny_dir, tmp_path / "deep")
    refused_in_one_line(load_model(tiny_dir("llama")), folder,
                        rf"{re.escape(str(folder))}: this LoRA adapter does not fit the base model .*: 14 saved "
                        r"tensor\(s\) fit no module of the base \(e\.g\. base_model\.model\.model\.layers\.2\.\S+"
                        r"lora_[AB]\.weight\), so only part of the adapter would run; use it with the base it was "
                        "trained on")
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


# a LoRA saved without alignkit_base.json (nothing records its base) trained on a base of hidden size 32, loaded
# onto the tiny base of 64:
# (arch, target_modules, the first tensor that does not fit, its saved shape, the shape the wide base's layer takes)
# peft's shapes (row P16): A (r, in), B (out, r); nn.Embedding: A (r, num_embeddings), B (embedding_dim, r);
# GPT-2's Conv1D: in, out = its weight's shape
WIDTH_CASES = [
    ("llama", "q_proj", r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight", [2, 32], [2, 64],
     r"model\.layers\.0\.self_attn\.q_proj \(Linear, in width 64\)"),
    ("llama", "down_proj", r"base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight", [2, 64], [2, 128],
     r"model\.layers\.0\.mlp\.down_proj \(Linear, in width 128\)"),  # intermediate size 2 x hidden
    ("llama", "embed_tokens", r"base_model\.model\.model\.embed_tokens\.lora_embedding_B", [32, 2], [64, 2],
     r"model\.embed_tokens \(Embedding, out width 64\)"),  # A (r, vocab 512) fits: the same vocabulary
    ("gpt2", "c_attn", r"base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight", [2, 32], [2, 64],
     r"transformer\.h\.0\.attn\.c_attn \(Conv1D, in width 64\)"),
]


@pytest.mark.parametrize("arch, target, tensor, saved, wanted, layer", WIDTH_CASES, ids=[c[1] for c in WIDTH_CASES])
def test_a_lora_of_a_narrower_base_is_refused_in_one_line_naming_the_tensor_and_both_shapes(
        arch, target, tensor, saved, wanted, layer, tiny_dir, tmp_path):
    """Before: load_adapter passed it to peft, which failed with torch's multi-line "Error(s) in loading state_dict
    for PeftModelForCausalLM: size mismatch for ..." (a RuntimeError). Now one line naming the folder, the tensor,
    its shape and the shape the base's layer takes, before peft touches the model; on its own base it loads."""
    from alignkit.adapters import AdapterConfig, LoraSettings

    narrow = tiny_dir(arch, hidden_size=32)
    lora = AdapterConfig(kind="lora", lora=LoraSettings(r=2, target_modules=[target]))
    folder = save_adapter(perturb(apply_adapter(load_model(narrow), lora)), tmp_path / "peft")
    (folder / "alignkit_base.json").unlink()  # as a peft adapter from elsewhere, or an older save
    refused_in_one_line(load_model(tiny_dir(arch)), folder,
                        rf"{re.escape(str(folder))}: saved LoRA tensor {tensor} has shape {re.escape(str(saved))} but "
                        rf"the base model .*'s {layer} takes {re.escape(str(wanted))}, so this adapter was trained "
                        "on a base of another width; use it with the base it was trained on")
    load_adapter(load_model(narrow), folder)  # on its own base it loads


def served_engine(base, workdir):
    """`alignkit vllm-serve`'s engine for the tiny `base` folder without vLLM: what `load_lora` reads (no LLM)."""
    from transformers import AutoConfig

    from alignkit.serve.vllm_serve import EngineSettings, VllmServeEngine

    engine = VllmServeEngine.__new__(VllmServeEngine)
    engine.settings = EngineSettings(model=str(base), enable_lora=True, max_lora_rank=16)
    engine.hf_config, engine.skeleton = AutoConfig.from_pretrained(str(base)), None
    engine.workdir, engine.lora_version, engine.weights_version, engine.lora_request = workdir, 0, 0, None
    return engine


def fake_vllm(monkeypatch):
    """vllm.lora.request.LoRARequest (its three fields, row V: test_vllm.py) where vLLM is not installed."""
    import sys
    import types

    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(lora_name=name, lora_int_id=int_id,
                                                                          lora_path=path)
    for name, module in (("vllm", types.ModuleType("vllm")), ("vllm.lora", types.ModuleType("vllm.lora")),
                         ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("pushed, why", [
    ({"num_layers": 3}, r"this LoRA adapter does not fit the base model \S+: 14 saved tensor\(s\) fit no module of "
                        r"the base \(e\.g\. base_model\.model\.model\.layers\.2\.\S+\.lora_[AB]\.weight\)"),
    ({"hidden_size": 32}, r"saved LoRA tensor base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight has "
                          r"shape \[4, 64\] but the base model \S+'s model\.layers\.0\.mlp\.down_proj \(Linear, in "
                          r"width 128\) takes \[4, 128\]"),
], ids=["deeper", "narrower"])
def test_vllm_serve_refuses_a_pushed_lora_that_does_not_fit_the_served_model(pushed, why, tiny_dir, tmp_path,
                                                                              monkeypatch):
    """An online run's policy LoRA pushed to `alignkit vllm-serve` (POST /lora -> VllmServeEngine.load_lora). vLLM's
    loader checks a LoRA module's last name part only and skips one the model lacks (vllm/lora/lora_model.py,
    model_manager.py). Before: the folder was saved and handed to vLLM as a new LoRARequest (a deeper base's LoRA ran
    without its last layer, silently). Now a 400 whose one line names POST /lora and a tensor, checked from the
    request's bytes: nothing is written (no folder, no temp file) and the versions are unchanged. A LoRA of the served
    base is served."""
    from alignkit.adapters import AdapterConfig, LoraSettings
    from alignkit.online.vllm_client import lora_blob
    from alignkit.serve.vllm_serve import RequestError

    fake_vllm(monkeypatch)
    base = tiny_dir("llama")
    engine = served_engine(base, tmp_path / "w")
    lora = AdapterConfig(kind="lora", lora=LoraSettings(r=4))
    with pytest.raises(RequestError) as e:
        engine.load_lora(lora_blob(perturb(apply_adapter(load_model(tiny_dir("llama", **pushed)), lora))))
    msg, folder = str(e.value), tmp_path / "w" / "lora-1"
    assert e.value.status == 400 and "\n" not in msg
    assert re.fullmatch(r"the pushed LoRA was not served \(nothing was written; the policy's base must be this "
                        rf"server's --model\): POST /lora: {why}, .*", msg), msg
    assert not (tmp_path / "w").exists() and engine.lora_version == 0 and engine.lora_request is None
    assert engine.load_lora(lora_blob(perturb(apply_adapter(load_model(base), lora))))["lora_version"] == 1
    assert engine.lora_request.lora_path == str(folder) and (folder / "adapter_model.safetensors").is_file()


def test_vllm_serve_never_damages_a_folder_of_the_pushed_loras_name(tiny_dir, tmp_path, monkeypatch):
    """A --workdir given again holds another run's lora-1. Before: a misfitting push wrote its files into lora-1 (over
    the old ones), then removed the whole folder. Now a refused push writes nothing there and leaves no temp file; a
    fitting one is written whole beside it under a unique name (lora-1.<random>), the old folder byte for byte as it
    was."""
    from alignkit.adapters import AdapterConfig, LoraSettings
    from alignkit.online.vllm_client import lora_blob
    from alignkit.serve.vllm_serve import RequestError

    fake_vllm(monkeypatch)
    base, workdir = tiny_dir("llama"), tmp_path / "w"
    theirs = workdir / "lora-1"
    theirs.mkdir(parents=True)
    (theirs / "adapter_config.json").write_text('{"r": 2}')
    (theirs / "adapter_model.safetensors").write_bytes(b"another run's weights")
    before = {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    engine = served_engine(base, workdir)
    lora = AdapterConfig(kind="lora", lora=LoraSettings(r=4))
    with pytest.raises(RequestError) as e:
        engine.load_lora(lora_blob(perturb(apply_adapter(load_model(tiny_dir("llama", num_layers=3)), lora))))
    assert sorted(p.name for p in workdir.iterdir()) == ["lora-1"]
    assert {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
    assert "nothing was written" in str(e.value)
    blob = lora_blob(perturb(apply_adapter(load_model(base), lora)))
    assert engine.load_lora(blob)["lora_version"] == 1
    served = Path(engine.lora_request.lora_path)
    assert served.parent == workdir and served.name.startswith("lora-1.") and not served.name.endswith(".tmp")
    assert (served / "adapter_model.safetensors").read_bytes() == blob
    assert json.loads((served / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == {"adapter_config.json": b'{"r": 2}',
                                                                  "adapter_model.safetensors": b"another run's weights"}
    assert sorted(p.name for p in workdir.iterdir()) == sorted(["lora-1", served.name])  # no temp file left


def test_vllm_serve_refuses_a_truncated_lora_body_before_writing(tiny_dir, tmp_path, monkeypatch):
    """A pushed body cut short (its header names tensors past its end): before, written to disk and refused by
    safetensors on reading it back; now a 400 from the request's bytes, the tensor bytes counted, nothing written."""
    from alignkit.adapters import AdapterConfig, LoraSettings
    from alignkit.online.vllm_client import lora_blob
    from alignkit.serve.vllm_serve import RequestError

    fake_vllm(monkeypatch)
    engine = served_engine(tiny_dir("llama"), tmp_path / "w")
    blob = lora_blob(perturb(apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora",
                                                                                        lora=LoraSettings(r=4)))))
    n = int.from_bytes(blob[:8], "little")
    with pytest.raises(RequestError, match=rf"not a whole safetensors blob: its header places tensors up to byte "
                                           rf"{len(blob) - 8 - n} of the data and the body holds {len(blob) - 8 - n - 5}"):
        engine.load_lora(blob[:-5])
    assert not (tmp_path / "w").exists() and engine.lora_version == 0


def test_serve_names_a_saved_module_of_another_shape_and_passes_other_errors_on(tiny_dir, tmp_path, monkeypatch):
    """serve's load_loras: a LoRA whose modules_to_save lm_head has 8 more rows (a base with a resized vocabulary)
    passes check_lora_fits and fails peft's load (row P17). Before: "(Error(s) in loading state_dict for
    PeftModelForCausalLM:)", naming no tensor; now the size-mismatch line (tensor, both shapes by hand). And a
    RuntimeError that is no misfit (out of memory) was reported as "does not fit the base model"; now it is raised
    as it is."""
    from safetensors.torch import load_file, save_file

    import alignkit.serve.stack as stack
    from alignkit.adapters import AdapterConfig, LoraSettings

    base = tiny_dir("llama")
    lora = AdapterConfig(kind="lora", lora=LoraSettings(r=2, modules_to_save=["lm_head"]))
    folder = save_adapter(perturb(apply_adapter(load_model(base), lora)), tmp_path / "a")
    (folder / "alignkit_base.json").unlink()  # a peft folder from elsewhere: no base recorded
    saved = load_file(str(folder / "adapter_model.safetensors"))
    vocab, width = saved["base_model.model.lm_head.weight"].shape
    saved["base_model.model.lm_head.weight"] = torch.zeros(vocab + 8, width)
    save_file(saved, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        stack.load_loras(load_model(base), {"a": folder}, base)
    assert str(e.value) == (
        f"{folder}: this LoRA adapter does not fit the base model {base} (size mismatch for "
        f"base_model.model.lm_head.modules_to_save.a.weight: copying a param with shape torch.Size([{vocab + 8}, "
        f"{width}]) from checkpoint, the shape in current model is torch.Size([{vocab}, {width}])); serve it with the "
        "base it was trained on")

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stack.PeftModel, "from_pretrained", oom)
    with pytest.raises(RuntimeError, match="^CUDA out of memory"):
        stack.load_loras(load_model(base), {"a": tmp_path / "a"}, base)
