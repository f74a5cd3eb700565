"""transformers' DeepSpeed integration (transformers/integrations/deepspeed.py) as alignkit relies on it: what a
DeepSpeed config's own sections replace and what transformers compares with the training arguments."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from .guards import check, guard


def test_a_deepspeed_optimizer_or_scheduler_section_replaces_the_trainers_unchecked(tmp_path):
    """T25: with an "optimizer" / "scheduler" section, `deepspeed_optim_sched` hands the engine accelerate's
    DummyOptim / DummyScheduler and never calls the Trainer's create_optimizer / create_scheduler (alignkit's
    weight-decay groups, train.optim, lr_scheduler_type); `trainer_config_process` compares lr, betas, eps and
    weight_decay but not the optimizer's or the schedule's type, so an SGD or WarmupLR section against
    adamw_torch / linear records no mismatch."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DummyOptim, DummyScheduler
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, deepspeed_optim_sched

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], optim="adamw_torch", lr_scheduler_type="linear")
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "optimizer": {"type": "SGD", "params": {"lr": "auto"}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    ds = HfTrainerDeepSpeedConfig(config)
    ds.trainer_config_process(args)
    assert ds.mismatches == []  # the types are not compared

    class Trainer:
        def create_optimizer(self):
            raise AssertionError("the Trainer's optimizer was built")

        def create_scheduler(self, **kw):
            raise AssertionError("the Trainer's schedule was built")

    import torch

    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer, scheduler = deepspeed_optim_sched(Trainer(), ds, args, 10, params)
    assert isinstance(optimizer, DummyOptim) and isinstance(scheduler, DummyScheduler)
    assert scheduler.lr_scheduler_callable is None  # DeepSpeed's WarmupLR, not the Trainer's schedule


def test_deepspeed_mismatches_are_ds_key_vs_hf_key_lines_on_the_plugins_config(tmp_path):
    """T33: `HfTrainerDeepSpeedConfig.trainer_config_process(args)` lists each DeepSpeed value that disagrees with a
    training argument in `mismatches` as "- ds <key>=<value> vs hf <argument>=<value>" (the Trainer raises them only
    at train()); accelerate's `DeepSpeedPlugin(hf_ds_config=...)` keeps that object as `hf_ds_config`; and its
    `set_mixed_precision("bf16")` (accelerate's mixed_precision) writes `bf16: {enabled: true}` into a config that
    names none. alignkit's refuse_deepspeed_mismatches reads those lines from the plugin before anything is written,
    rewords them (" vs hf " -> " vs train.") and names accelerate's mixed_precision when a "ds bf16.enabled" /
    "ds fp16.enabled" line is its doing."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    where = "alignkit/trainers/checks.py:refuse_deepspeed_mismatches"
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}
    with guard("accelerate", "DeepSpeedPlugin(hf_ds_config=...).set_mixed_precision('bf16') failed", where):
        plugin = DeepSpeedPlugin(hf_ds_config=config)
        plugin.set_mixed_precision("bf16")
    check(plugin.deepspeed_config.get("bf16") == {"enabled": True}, "accelerate", "set_mixed_precision('bf16') no "
          "longer writes bf16.enabled=true into a DeepSpeed config that names no bf16 section", where,
          f"{plugin.deepspeed_config.get('bf16')}")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], bf16=False, learning_rate=1e-3, use_cpu=True)
    ds = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    with guard("transformers", "HfTrainerDeepSpeedConfig.trainer_config_process(args) failed", where):
        ds.trainer_config_process(args)
    lines = list(getattr(ds, "mismatches", None) or [])
    check(any(m.startswith("- ds bf16.enabled=True vs hf ") for m in lines)
          and "- ds optimizer.params.lr=0.5 vs hf learning_rate=0.001" in lines, "transformers",
          "trainer_config_process no longer lists mismatches as '- ds <key>=<value> vs hf <argument>=<value>'", where,
          f"{lines}")
    check(DeepSpeedPlugin(hf_ds_config=ds).hf_ds_config is ds, "accelerate", "DeepSpeedPlugin no longer keeps the "
          "HfTrainerDeepSpeedConfig it is given as hf_ds_config (where alignkit reads the mismatches)", where)
