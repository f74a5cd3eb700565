"""`turn_off_dropout` leaves no dropout in training mode: nn.Dropout modules (peft's lora_dropout among them) and the
dropout rates transformers' attention modules apply functionally (`attention_dropout`; compat row T35)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter, load_adapter
from alignkit.models.loading import load_model
from alignkit.trainers import PreferenceTrainer, turn_off_dropout

from .conftest import fast_args

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 15, 17], [4, 6, 8, 10, 12, 14, 16, 18]])
ARCHS = ["Llama", "Qwen2", "Mistral", "Gemma", "Qwen3", "Phi3"]


def tiny(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(**TINY, **kw)
    return getattr(transformers, f"{arch}ForCausalLM")(cfg)


def twice(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits, model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_dropout_is_off_in_training_mode(arch):
    """Before: only nn.Dropout modules got p = 0, and these attention modules apply `self.attention_dropout`
    functionally in training mode, so with attention_dropout=0.5 two forwards of the same batch differed (the
    policy and its reference, or an online step's old and new log-probs, were not one network). Now identical; the
    config keeps its value (it is saved with the model)."""
    model = tiny(arch, attention_dropout=0.5)
    a, b = twice(model)
    assert not torch.equal(a, b)  # the dropout is real before
    turn_off_dropout(model)
    a, b = twice(model)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5


def test_lora_dropout_and_attention_dropout_together():
    model = get_peft_model(tiny("Llama", attention_dropout=0.5),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # lora_B = 0 would hide lora_dropout
    a, b = twice(model)
    assert not torch.equal(a, b)
    turn_off_dropout(model)
    a, b = twice(model)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_reft_trained_with_dropout_turned_off_saves_and_reloads_its_configured_rate(tiny_dir, features, collators,
                                                                                      tokenizer, tmp_path):
    """Before: `Intervention.spec()` wrote the live `nn.Dropout.p`, which DPO's default `disable_dropout`
    (turn_off_dropout) sets to 0, so a ReFT configured with dropout 0.05 saved `"dropout": 0.0`, and that folder was
    then refused by load_adapter (its reft_config said 0.05, its interventions 0.0). Now the spec keeps the
    constructor's rate: the folder says 0.05, and the reloaded interventions train with 0.05."""
    reps = [{"layer": 0, "low_rank_dimension": 2, "dropout": 0.05}, {"layer": 1, "low_rank_dimension": 2,
                                                                      "dropout": 0.05}]
    config = AdapterConfig(kind="reft", reft=ReftSettings(config={"representations": reps}, positions="f1+l1"))
    model = apply_adapter(load_model(tiny_dir("llama")), config)
    trainer = PreferenceTrainer(model, fast_args(tmp_path, max_steps=1), train_dataset=features["preference"],
                                data_collator=collators["preference"], processing_class=tokenizer, loss_type="sigmoid")
    assert [iv.dropout.p for iv in model.interventions["default"]] == [0.0, 0.0]  # the sweep did turn it off
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    meta = json.loads((tmp_path / "saved" / "reft_config.json").read_text())
    assert [item["spec"]["dropout"] for item in meta["interventions"]] == [0.05, 0.05]
    again = load_adapter(load_model(tiny_dir("llama")), tmp_path / "saved")
    assert [iv.dropout.p for iv in again.interventions["default"]] == [0.05, 0.05]


def test_a_dropout_rate_read_from_the_config_in_forward_is_named_and_the_config_kept(caplog):
    """falcon's decoder layer reads `config.hidden_dropout` / `config.attention_dropout` inside forward (compat T36).
    Before: turn_off_dropout left them on without a word (the docstring only said "not covered"), so a DPO policy
    and its reference were two random networks. The config is saved with the model, so alignkit does not zero it:
    now one warning names each rate and the fix, and the config keeps the user's values."""
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.5,
        attention_dropout=0.25))
    with caplog.at_level("WARNING", logger="alignkit.trainers.base"):
        turn_off_dropout(model)
    assert "FalconDecoderLayer: config.hidden_dropout=0.5, FalconDecoderLayer: config.attention_dropout=0.25" \
        in caplog.text and "set these to 0 in the model's config" in caplog.text
    assert (model.config.hidden_dropout, model.config.attention_dropout) == (0.5, 0.25)
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignkit.trainers.base"):
        turn_off_dropout(tiny("Llama", attention_dropout=0.5))  # read from a module attribute: turned off, no word
    assert caplog.text == ""
