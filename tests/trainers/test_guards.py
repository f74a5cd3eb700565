"""Non-finite guard of AlignTrainer (issue 12, finding 1): the first NaN loss / gradient stops the run at that
step, names the step and the batch's records, keeps earlier checkpoints, writes no NaN weights, logs NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.guards import NonFiniteError
from alignkit.runs import MetricsJsonl
from alignkit.trainers import SFTTrainer

from .conftest import fast_args


class NaNAtStep(SFTTrainer):
    """SFT whose loss turns NaN on optimizer step `bad_step` (1-based)."""

    bad_step = 3

    def objective(self, model, inputs):
        out = super().objective(model, inputs)
        if self.state.global_step + 1 == self.bad_step:
            out.losses = out.losses * float("nan")
        return out


def test_nan_loss_stops_at_its_step_keeps_last_good_checkpoint(make_model, features, collators, tmp_path):
    model = make_model("lora")
    args = fast_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    trainer = NaNAtStep(model, args, train_dataset=features["sft"], data_collator=collators["sft"],
                        callbacks=[MetricsJsonl(tmp_path / "metrics.jsonl")])
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    assert err.value.step == 3 and "optimizer step 3" in str(err.value)
    assert len(err.value.record_ids) == 2 and all(i.startswith("s") for i in err.value.record_ids)  # the batch's ids
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert all(bool(p.isfinite().all()) for p in model.parameters())  # the NaN update was never applied
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert math.isnan(rows[-1]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[:-1])  # NaN logged as NaN


def test_saving_refuses_non_finite_weights(make_model, features, collators, tmp_path):
    model = make_model("lora")
    trainer = SFTTrainer(model, fast_args(tmp_path), train_dataset=features["sft"], data_collator=collators["sft"])
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="trainable weight"):
        trainer.save_model(str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()


class ZeroGradAt(SFTTrainer):
    """SFT whose gradient is exactly 0 (the loss stays positive) on the optimizer steps in `dead`."""

    dead: set = set()

    def objective(self, model, inputs):
        out = super().objective(model, inputs)
        if self.state.global_step + 1 in self.dead:
            out.losses = out.losses.detach() + 0.0 * out.losses  # same value, no gradient signal
        return out


def test_zero_gradient_with_positive_loss_stops_after_patience(make_model, features, collators, tmp_path, caplog):
    from alignkit.guards import ZERO_GRAD_PATIENCE, StalledTrainingError

    assert ZERO_GRAD_PATIENCE == 3
    model = make_model("lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = ZeroGradAt(model, fast_args(tmp_path, max_steps=6), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    trainer.dead = {1, 2, 3, 4, 5, 6}
    with caplog.at_level("WARNING"), pytest.raises(StalledTrainingError) as err:
        trainer.train()
    assert (err.value.first, err.value.last) == (1, 3) and err.value.loss > 0
    assert "optimizer steps 1-3" in str(err.value) and "train.learning_rate" in str(err.value)
    assert any("exactly 0 at optimizer step 1" in r.getMessage() for r in caplog.records)  # warned first
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert not (tmp_path / "out" / "model").exists()


def test_a_short_zero_gradient_spell_only_warns(make_model, features, collators, tmp_path, caplog):
    trainer = ZeroGradAt(make_model("lora"), fast_args(tmp_path, max_steps=5), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    trainer.dead = {2, 3, 5}  # two in a row, then one: never three
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 5
    warned = [r.getMessage() for r in caplog.records if "exactly 0 at optimizer step" in r.getMessage()]
    assert len(warned) == 2 and "step 2" in warned[0] and "step 5" in warned[1]
