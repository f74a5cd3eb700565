"""Trainable weights stored in bf16 lose updates smaller than half their spacing: measured before training, said once."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from alignkit.cli import main
from alignkit.trainers.precision import low_precision_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_an_adam_step_of_lr_moves_a_bf16_weight_only_where_spacing_allows():
    """The physics the report counts, checked with torch itself: weights 1.0 and 0.001 in bf16, one AdamW step of
    lr 1e-3 (an Adam step moves each weight by ~lr): 1.0 (half spacing 2^-9 ~ 0.00195 > 1e-3) stays, 0.001 moves.
    The report says 50 %; in float32 nothing is reported."""
    layer = nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.001]]))
    text = low_precision_report(layer, 1e-3)
    assert text is not None and "2 trainable weights are stored in bfloat16" in text and "for 50% of them" in text
    assert "the loss barely moves" in text
    before = layer.weight.detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.0)
    layer(torch.ones(1, 2, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    after = layer.weight.detach()
    assert after[0, 0] == before[0, 0] and after[0, 1] != before[0, 1]
    assert low_precision_report(layer.float(), 1e-3) is None
    frozen = nn.Linear(2, 1).to(torch.bfloat16).requires_grad_(False)
    assert low_precision_report(frozen, 1e-3) is None  # only what the optimizer updates counts


def test_training_a_bf16_model_warns_with_the_fix(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.trainers.precision"):
        assert main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'r'}",
                     "model.dtype=bfloat16", "train.max_steps=1", "train.eval_strategy=no",
                     "train.learning_rate=1e-5"]) == 0
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "alignkit.trainers.precision"]
    assert "stored in bfloat16" in msg and "learning rate 1e-05" in msg and "model.dtype=float32" in msg
    share = int(msg.split("no change for ")[1].split("%")[0])
    # by hand: weights ~ N(0, 0.02) (initializer_range); an update of 1e-5 is lost where |w| > 1e-5 * 2^9 = 0.00512,
    # i.e. |z| > 0.256: P = 2 (1 - Phi(0.256)) = 0.80 (norm weights, 1.0, are lost too but are few)
    assert 75 <= share <= 85, msg
    card = (tmp_path / "r" / "README.md").read_text()  # the card said only `bf16` False / `mixed precision` no
    assert "| `trainable weights` | bfloat16 |" in card and "| `mixed precision` | no |" in card, card


def test_the_card_records_the_weights_dtypes_of_a_lora_on_a_bf16_base(tiny_dir):
    """peft keeps a LoRA's weights in float32 on a bf16 base (autocast_adapter_dtype): the card says both."""
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
    from alignkit.models.loading import load_model
    from alignkit.trainers.precision import weight_dtypes

    model = apply_adapter(load_model(tiny_dir("llama"), dtype="bfloat16"), AdapterConfig(kind="lora",
                                                                                          lora=LoraSettings(r=2)))
    assert weight_dtypes(model) == {"trainable weights": "float32", "frozen weights": "bfloat16"}
    assert weight_dtypes(load_model(tiny_dir("llama"))) == {"trainable weights": "float32"}


def test_a_share_no_update_loses_is_not_called_a_flat_loss():
    """Weights 0.001 and -0.002 in bf16 at lr 1e-3: half their spacing (|w| x 2^-9: ~2e-6 and ~4e-6) is far below
    1e-3, so no update of that size is lost (0%). The warning said "rounds to no change for 0% of them and the loss
    barely moves" (seen on the sft-tiny example with model.dtype=bfloat16): it now says what is at stake instead."""
    layer = nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.001, -0.002]]))
    text = low_precision_report(layer, 1e-3)
    assert text is not None and "for 0% of them" in text, text
    assert "barely moves" not in text and "a learning rate decaying below it" in text, text
