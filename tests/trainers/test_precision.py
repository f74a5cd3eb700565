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


def test_adamw_state_in_float16_loses_small_squared_gradients():
    """The physics of the refusal, with torch itself: a float16 weight with gradient 1e-4 keeps exp_avg_sq 0 (1e-8 is
    under float16's smallest number, 2^-24 ~ 6e-8); the per-tensor loop's first step is then -inf (m / (0 + eps), eps
    1e-8 being 0 in float16). In bfloat16 (float32's exponent range) the same state is 1e-11 and the step finite."""
    for dtype, finite in ((torch.float16, False), (torch.bfloat16, True)):
        p = nn.Parameter(torch.tensor([0.5], dtype=dtype))
        opt = torch.optim.AdamW([p], lr=1e-3, eps=1e-8, foreach=False)
        p.grad = torch.tensor([1e-4], dtype=dtype)
        opt.step()
        assert (opt.state[p]["exp_avg_sq"].item() == 0.0) == (not finite)
        assert bool(torch.isfinite(p).all()) == finite


def test_float16_weights_with_adamw_are_refused_before_the_run_folder(tmp_path, capsys):
    """model.dtype=float16 on sft-tiny (full finetuning, AdamW): losses 6.06, 6.02, 6.14, 49.1, then nan at step 5,
    after the run folder was written, and the warning named only rounding. Now one line before anything is written;
    bfloat16 and a LoRA on a float16 base (peft keeps its weights float32) still train."""
    out = tmp_path / "r"
    assert main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", "model.dtype=float16",
                 "train.max_steps=1", "train.eval_strategy=no"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("alignkit")]
    assert len(lines) == 1 and "model.dtype: 129,216 trainable weights would be float16" in lines[0], err
    assert "train.optim=adamw_torch_fused" in lines[0] and "model.dtype=float32" in lines[0], err
    assert not out.exists()
    assert main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'lora'}",
                 "model.dtype=float16", "adapter.kind=lora", "train.max_steps=1", "train.eval_strategy=no"]) == 0


def test_float16_weights_are_refused_by_the_online_loop_too(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["-q", "grpo", "-c", str(CONFIGS / "grpo-tiny.yaml"), f"output_dir={out}", "model.dtype=float16",
                 "adapter.kind=full", "adapter.lora=null", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "trainable weights would be float16 with optimizer=adamw_fused" in err, err
    assert "mixed precision" not in err and "model.dtype=bfloat16" in err, err  # the online loop runs none
    assert not out.exists()
