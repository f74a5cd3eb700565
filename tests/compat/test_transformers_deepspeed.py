"""transformers' DeepSpeed integration (transformers/integrations/deepspeed.py) as alignkit relies on it: what a
DeepSpeed config's own sections replace and what transformers compares with the training arguments."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments


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
