"""A32 and A33 of docs/architecture.md's table: what a resume's TrainerState holds and how the Trainer sums its
losses, which trainers/checkpointing.py:ResumedStepSettings and Checkpointing.run_train_loss correct (their
integration tests: tests/reliability/test_resume_changes.py)."""

from __future__ import annotations

import inspect

from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import DefaultFlowCallback

from alignkit.trainers.checkpointing import ResumedStepSettings


def test_a_resumed_state_keeps_the_checkpoints_intervals_until_train_begin(tmp_path):
    """A32: `Trainer._init_training_state` replaces the state with the checkpoint's `trainer_state.json` (its
    logging / eval / save steps the first run's) before `on_train_begin`; `DefaultFlowCallback` reads the state's
    `save_steps` and `logging_steps`, not the arguments'; `TrainerState.compute_steps(args, max_steps)` sets them
    from the arguments (a fraction below 1: of max_steps, rounded up)."""
    first = TrainingArguments(output_dir=str(tmp_path), save_strategy="steps", save_steps=2, logging_steps=1,
                              report_to=[])
    state = TrainerState()
    state.compute_steps(first, 10)
    state.save_to_json(str(tmp_path / TRAINER_STATE_NAME))
    loaded = TrainerState.load_from_json(str(tmp_path / TRAINER_STATE_NAME))
    assert (loaded.save_steps, loaded.logging_steps) == (2, 1)

    now = TrainingArguments(output_dir=str(tmp_path), save_strategy="steps", save_steps=3, logging_steps=0.2,
                            report_to=[])
    flow = DefaultFlowCallback()
    loaded.global_step = 4  # a step the checkpoint's save_steps=2 saves at and the new save_steps=3 does not
    assert flow.on_step_end(now, loaded, TrainerControl()).should_save  # the state's interval, not the args'
    loaded.max_steps = 10
    ResumedStepSettings().on_train_begin(now, loaded, TrainerControl())
    assert (loaded.save_steps, loaded.logging_steps) == (3, 2)  # 0.2 of 10 steps
    assert not flow.on_step_end(now, loaded, TrainerControl()).should_save

    source = inspect.getsource(Trainer._init_training_state)
    assert "TrainerState.load_from_json" in source and "TRAINER_STATE_NAME" in source
    loop = inspect.getsource(Trainer._inner_training_loop)
    assert loop.index("self._init_training_state(") < loop.index("on_train_begin(")


def test_the_trainers_loss_sums_are_what_loss_sum_so_far_reads():
    """A33: the Trainer sums the step losses of the current `train()` call in `_total_loss_scalar` (a float: each
    logged interval's sum, added when it is logged, before that step's checkpoint is saved) and `_tr_loss` (a tensor:
    the steps not logged yet, zeroed at each log), and its summary `train_loss` is their sum over the steps trained in
    this call (trainers/checkpointing.py:Checkpointing.loss_sum_so_far / run_train_loss)."""
    source = inspect.getsource(Trainer._inner_training_loop)
    assert "self._tr_loss = torch.tensor(0.0" in source and "self._total_loss_scalar = 0.0" in source
    logged = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert "self._total_loss_scalar += tr_loss_scalar" in logged and "tr_loss -= tr_loss" in logged
    assert logged.index("self._total_loss_scalar += tr_loss_scalar") < logged.index("self._save_checkpoint(")
    final = inspect.getsource(Trainer._finalize_training)
    assert "self._total_loss_scalar += self._tr_loss.item()" in final
    assert "num_steps_trained = self.state.global_step - self._initial_global_step" in final
    assert "train_loss = self._total_loss_scalar / max(num_steps_trained" in final
    assert 'metrics["train_loss"] = train_loss' in final and final.index("train_loss = ") < final.index("self.log(")
