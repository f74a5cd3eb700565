"""`turn_off_dropout` leaves no dropout in training mode: nn.Dropout modules (peft's lora_dropout among them) and the
dropout rates transformers' attention modules apply functionally (`attention_dropout`; compat row T35)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from alignkit.trainers import turn_off_dropout

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
