"""`merge_adapter` (session 26; before, neither the library nor the CLI could fold a trained adapter into a model
folder): a merged LoRA's folder loads with `from_pretrained` as a plain model whose logits are the adapted model's,
holds no adapter file, and the model given is left adapted; a ReFT (alone or with LoRA) is refused in one line with
nothing written; an out_dir holding files is refused and left as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.adapters import apply_adapter, merge_adapter, reference_off
from alignkit.models.loading import load_model

from .table import ADAPTERS, LORA_FILES, REFT_FILES, perturb

ADAPTER_FILES = {*LORA_FILES, *REFT_FILES, "alignkit_adapter.json", "alignkit_base.json"}
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 7]])


def adapted(tiny_dir, kind: str, classifier: bool = False):
    torch.manual_seed(0)
    base = load_model(tiny_dir("llama", classifier=classifier, num_labels=1) if classifier else tiny_dir("llama"),
                      task="classifier" if classifier else "causal_lm", num_labels=1 if classifier else None)
    row = next(r for r in ADAPTERS if r.kind == kind)
    return perturb(apply_adapter(base, row.config())).eval()


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.reft], ids=lambda r: r.kind)
@pytest.mark.parametrize("classifier", [False, True], ids=["causal_lm", "classifier"])
def test_a_merged_folder_gives_the_adapted_models_logits(row, classifier, tiny_dir, tokenizer, tmp_path):
    model = adapted(tiny_dir, row.kind, classifier)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    out = merge_adapter(model, tmp_path / "merged", tokenizer)
    names = {p.name for p in out.iterdir()}
    assert not names & ADAPTER_FILES and {"config.json", "model.safetensors", "tokenizer.json"} <= names, names
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    loaded = auto.from_pretrained(out).eval()
    assert not hasattr(loaded, "peft_config")
    with torch.no_grad():
        got = loaded(input_ids=IDS).logits
        again = model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want)  # the model given is still the adapted one
    if row.can_switch_off:  # ... with its adapter, which does something (else the test proves nothing)
        with torch.no_grad(), reference_off(model):
            assert (model(input_ids=IDS).logits - want).abs().max() > 1e-3


@pytest.mark.parametrize("row", [r for r in ADAPTERS if r.reft], ids=lambda r: r.kind)
def test_a_reft_is_refused_in_one_line(row, tiny_dir, tmp_path):
    with pytest.raises(ValueError) as e:
        merge_adapter(adapted(tiny_dir, row.kind), tmp_path / "merged")
    assert f"a {row.kind} adapter cannot be merged" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_holding_files_is_refused_and_kept(tiny_dir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        merge_adapter(adapted(tiny_dir, "lora"), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
