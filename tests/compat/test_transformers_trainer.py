"""transformers.Trainer internals alignkit overrides or calls (rows T1-T9, T12, T13 of the table in
docs/architecture.md; the other T rows are in test_transformers_training_args.py and test_transformers_config.py).

Each test checks the signature alignkit assumes AND that the Trainer still reaches alignkit's code at run
time (a spy on the override during a one-step run on a tiny model), because a renamed private method keeps
every signature check green while the Trainer silently stops calling the override.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

from alignkit.compat import TRAINER_METHODS, trainer_problems
from alignkit.data import SFTCollator, SFTRecord, tokenize_records
from alignkit.data.batching import LengthGroupedSampler
from alignkit.interventions.training import ReftTrainer
from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter
from alignkit.models.loading import load_model
from alignkit.trainers import SFTTrainer
from alignkit.trainers.base import AlignTrainer

from .guards import check, fail, guard, params

TF = "transformers"
PROMPTS = ["Question: what is the capital of France?", "Hello! How can I help you", "def add(a, b):",
           "The quick brown fox", "Please answer politely", "0 1 2 3 4", "user assistant", "Thank you very"]
ANSWERS = [" Answer: Paris.", " today?", "\n    return a + b\n", " jumps over the lazy dog.", " and briefly.",
           " 5 6 7 8 9 10 11", " system human", " much!"]


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.fixture(scope="module")
def sft_features(tokenizer):
    feats, _ = tokenize_records([SFTRecord(p, a, id=str(i)) for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))],
                                tokenizer, max_length=32)
    return feats


def model_of(tiny_dir, kind: str):
    torch.manual_seed(0)
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}, positions="l1")
    return apply_adapter(load_model(tiny_dir("llama")),
                         AdapterConfig(kind=kind, lora=LoraSettings(r=2) if "lora" in kind else LoraSettings(),
                                       reft=reft if "reft" in kind else None))


def sft_trainer(tiny_dir, tokenizer, feats, tmp_path, kind="lora", **kw):
    return SFTTrainer(model_of(tiny_dir, kind), args(tmp_path, **kw), train_dataset=feats, eval_dataset=feats,
                      data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer)


def spy(trainer, name: str) -> list:
    """Record each call of `trainer.<name>` (still calling the real method)."""
    calls: list = []
    real = getattr(trainer, name)

    def wrapped(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    setattr(trainer, name, wrapped)
    return calls


# T1 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [AlignTrainer, ReftTrainer], ids=lambda c: c.__name__)
def test_private_trainer_methods_keep_their_signatures(cls):
    problems = trainer_problems(cls)
    if problems:
        fail(TF, "; ".join(problems), f"{cls.__module__}.{cls.__name__}")


def test_a_mixins_overrides_are_checked_too(monkeypatch):
    """AlignTrainer's sampler overrides sit in a mixin (trainers/sampling.py): a moved `_get_eval_sampler` must still
    be reported for AlignTrainer (a check over Trainer subclasses alone would skip the mixin)."""
    monkeypatch.setitem(TRAINER_METHODS, "_get_eval_sampler", ("a_renamed_parameter",))
    assert any("_get_eval_sampler" in p for p in trainer_problems(AlignTrainer))


# T2 ------------------------------------------------------------------------------------------------------

def test_save_model_goes_through_our_save(tiny_dir, tokenizer, sft_features, tmp_path):
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, kind="reft")
    calls = spy(trainer, "_save")
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    where = "alignkit/trainers/checkpointing.py:Checkpointing._save"
    check(calls, TF, "Trainer.save_model no longer calls self._save(output_dir, ...)", where)
    files = sorted(p.name for p in out.iterdir())
    check("alignkit_adapter.json" in files and "interventions.safetensors" in files, TF,
          "save_model did not write alignkit's adapter files", where, f"files: {files}")
    check("training_args.bin" not in files and "model.safetensors" not in files, TF,
          "save_model wrote the Trainer's own files (pickled training_args.bin / the full model)", where,
          f"files: {files}")


def test_reft_trainer_save_writes_only_interventions(tiny_dir, tokenizer, tmp_path):
    from alignkit.data.reft_data import make_last_position_supervised_data_module
    from alignkit.interventions import ReftConfig
    from alignkit.interventions.attach import get_reft_model

    torch.manual_seed(0)
    reft = get_reft_model(load_model(tiny_dir("llama")), ReftConfig.uniform([0], "loreft", low_rank_dimension=2))
    data = make_last_position_supervised_data_module(tokenizer, PROMPTS[:4], ANSWERS[:4])
    trainer = ReftTrainer(model=reft, args=args(tmp_path), processing_class=tokenizer, **data)
    calls = spy(trainer, "_save")
    trainer.save_model(str(tmp_path / "reft"))
    files = sorted(p.name for p in (tmp_path / "reft").iterdir())
    where = "alignkit/trainers/checkpointing.py:Checkpointing._save (ReftTrainer is an SFTTrainer)"
    check(calls, TF, "Trainer.save_model no longer calls self._save", where)
    check("interventions.safetensors" in files and "training_args.bin" not in files, TF,
          "ReftTrainer.save_model did not write only the interventions", where, f"files: {files}")


# T3, T4 ----------------------------------------------------------------------------------------------------

def test_resume_and_best_model_go_through_our_loaders(tiny_dir, tokenizer, sft_features, tmp_path):
    kw = dict(save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
              metric_for_best_model="loss", greater_is_better=False, per_device_eval_batch_size=8)
    first = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, **kw)
    best_calls = spy(first, "_load_best_model")
    with guard(TF, "a one-step run with checkpoints and load_best_model_at_end failed",
               "alignkit/trainers/checkpointing.py:Checkpointing._save/_load_best_model"):
        first.train()
    check(best_calls, TF, "Trainer.train(load_best_model_at_end=True) no longer calls self._load_best_model()",
          "alignkit/trainers/checkpointing.py:Checkpointing._load_best_model")
    ckpt = tmp_path / "out" / "checkpoint-1"
    check((ckpt / "alignkit_adapter.json").is_file(), TF, "checkpoints are no longer written through self._save",
          "alignkit/trainers/checkpointing.py:Checkpointing._save", f"{ckpt}: {sorted(p.name for p in ckpt.iterdir())}")
    second = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, max_steps=2)
    load_calls = spy(second, "_load_from_checkpoint")
    with guard(TF, "resuming from an alignkit checkpoint failed", "alignkit/trainers/checkpointing.py:Checkpointing._load_from_checkpoint"):
        second.train(resume_from_checkpoint=str(ckpt))
    check(load_calls and str(load_calls[0][0][0]) == str(ckpt), TF,
          "Trainer.train(resume_from_checkpoint=...) no longer calls self._load_from_checkpoint(path)",
          "alignkit/trainers/checkpointing.py:Checkpointing._load_from_checkpoint", f"calls: {load_calls}")


def test_checkpoints_are_staged_then_rotated(tiny_dir, tokenizer, sft_features, tmp_path):
    """alignkit's `_save_checkpoint` redirects the Trainer's own `_save_checkpoint` into a staging folder through
    `_get_output_dir(trial)` (the Trainer writes `<_get_output_dir()>/checkpoint-<global_step>`), renames it into
    place with `alignkit_complete.json`, and rotates with `trainer_utils.rotate_checkpoints(output_dir=,
    save_total_limit=, best_model_checkpoint=, use_mtime=)`."""
    where = "alignkit/trainers/checkpointing.py:Checkpointing._save_checkpoint/_get_output_dir"
    from transformers import trainer_utils
    from transformers.trainer_callback import TrainerState

    check(callable(getattr(trainer_utils, "rotate_checkpoints", None)) and
          params(trainer_utils.rotate_checkpoints)[:4] == ["output_dir", "save_total_limit", "best_model_checkpoint",
                                                           "use_mtime"], TF,
          "transformers.trainer_utils.rotate_checkpoints moved or changed its parameters", where)
    check(getattr(trainer_utils, "PREFIX_CHECKPOINT_DIR", None) == "checkpoint", TF, "checkpoint folders are no "
          "longer named checkpoint-N", where + ", run_commit.py:CHECKPOINT_PREFIX")
    check("best_global_step" in {f.name for f in dataclasses.fields(TrainerState)}, TF,
          "TrainerState.best_global_step is gone", where)
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, max_steps=3, save_strategy="steps", save_steps=1,
                          save_total_limit=2)
    with guard(TF, "a 3-step run with checkpoints every step failed", where):
        trainer.train()
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    check(names == ["checkpoint-2", "checkpoint-3"], TF, "checkpoints are not staged, renamed and rotated as alignkit "
          "expects (Trainer._save_checkpoint no longer writes under self._get_output_dir(trial)?)", where, str(names))
    check(all((out / n / "alignkit_complete.json").is_file() for n in names), TF,
          "a checkpoint lacks alignkit_complete.json (it was not written through alignkit's staging)", where)


# T5 ------------------------------------------------------------------------------------------------------

def test_length_grouped_sampler_is_used(tiny_dir, tokenizer, sft_features, tmp_path):
    trainer = SFTTrainer(model_of(tiny_dir, "lora"), args(tmp_path), train_dataset=sft_features,
                         data_collator=SFTCollator(tokenizer.pad_token_id), group_by_length=True)
    seen: list = []
    real = trainer._get_train_sampler

    def wrapped(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    trainer._get_train_sampler = wrapped
    trainer.get_train_dataloader()
    check(seen and isinstance(seen[0], LengthGroupedSampler), TF,
          "Trainer.get_train_dataloader no longer asks self._get_train_sampler(dataset) for its sampler "
          "(group_by_length would be ignored)", "alignkit/trainers/sampling.py:BatchSampling._get_train_sampler",
          f"seen: {seen}")


def test_train_dataloader_goes_through_get_dataloader(tiny_dir, tokenizer, sft_features, tmp_path):
    """alignkit wraps the collator inside `_get_dataloader(...)` so training batches carry their records' ids (named
    in non-finite errors)."""
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path)
    calls = spy(trainer, "_get_dataloader")
    where = "alignkit/trainers/sampling.py:BatchSampling._get_dataloader"
    with guard(TF, "get_train_dataloader() failed through alignkit's _get_dataloader override", where):
        batch = next(iter(trainer.get_train_dataloader()))
    check(calls and calls[0][1].get("is_training") is True, TF, "get_train_dataloader no longer builds its loader with "
          "self._get_dataloader(..., is_training=True)", where, str([c[1] for c in calls]))
    check("record_ids" in batch, TF, "training batches lost their record ids", where, str(sorted(batch)))


# T6 ------------------------------------------------------------------------------------------------------

def test_accumulation_count_reaches_compute_loss_unscaled(tiny_dir, tokenizer, sft_features, tmp_path):
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, gradient_accumulation_steps=2)
    collate = SFTCollator(tokenizer.pad_token_id)
    b1, b2 = collate(sft_features[:4]), collate(sft_features[4:])
    # hand count: completion tokens that are predicted (position 0 never is)
    want = sum(sum(f["completion_mask"][1:]) for f in sft_features)
    where = "alignkit/trainers/base.py:AlignTrainer._get_num_items_in_batch"
    with guard(TF, "Trainer.get_batch_samples(iterator, n, device) changed", where):
        batches, n = trainer.get_batch_samples(iter([b1, b2]), 2, torch.device("cpu"))
    check(n is not None and float(n) == float(want), TF,
          "Trainer.get_batch_samples no longer takes the optimizer step's item count from "
          "self._get_num_items_in_batch (gradient accumulation would be normalised per micro-batch)", where,
          f"got {n}, want {want} completion tokens")
    trainer.model.train()
    trainer.model_accepts_loss_kwargs = False  # so only alignkit's flag stands between the loss and a division
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets
    with guard(TF, "Trainer.training_step(model, inputs, num_items_in_batch) changed",
               "alignkit/trainers/base.py:AlignTrainer.compute_loss"):
        step_loss = trainer.training_step(trainer.model, dict(b1), num_items_in_batch=n)
        direct = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(b1)), num_items_in_batch=n)
    check(torch.allclose(step_loss.detach(), direct.detach(), rtol=1e-6), TF,
          "Trainer.training_step rescaled alignkit's loss: `loss_is_scaled_for_ga = True` is no longer honoured "
          "(the loss would be divided by gradient_accumulation_steps twice)",
          "alignkit/trainers/base.py:AlignTrainer.loss_is_scaled_for_ga", f"{step_loss.item()} vs {direct.item()}")


# T7 ------------------------------------------------------------------------------------------------------

def test_step_hooks_are_called(tiny_dir, tokenizer, sft_features, tmp_path):
    """One optimiser step goes through `training_step(model, inputs, num_items_in_batch)` (alignkit's non-finite
    guard), `_clip_grad_norm(model)` (its fast clipping) and `_get_grad_norm(model, grad_norm=)` (its non-finite
    guard on the norm)."""
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, max_grad_norm=1.0)
    calls = {name: spy(trainer, name) for name in ("training_step", "_clip_grad_norm", "_get_grad_norm")}
    trainer.train()
    where = "alignkit/trainers/base.py:AlignTrainer._clip_grad_norm"
    check(len(calls["_clip_grad_norm"]) == 1, TF, "the training loop no longer clips through "
          "self._clip_grad_norm(model)", where, f"{len(calls['_clip_grad_norm'])} call(s) in one step")
    check(len(calls["training_step"]) == 1 and len(calls["_get_grad_norm"]) == 1, TF, "the training loop no longer "
          "calls self.training_step(model, inputs, n) and self._get_grad_norm(model, grad_norm=) once per step (a NaN "
          "loss or gradient would no longer stop the run)", "alignkit/trainers/base.py:AlignTrainer.training_step/"
          "_get_grad_norm", f"{ {k: len(v) for k, v in calls.items()} }")
    check(trainer._clip_params_ok is True, TF, "AlignTrainer's clipping fell back to the Trainer's path on a "
          "plain CPU run (Trainer._has_mixed_mesh_grads or accelerate's DistributedType moved?)", where)


# T8 ------------------------------------------------------------------------------------------------------

def test_evaluation_goes_through_prediction_step_and_log(tiny_dir, tokenizer, sft_features, tmp_path):
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, per_device_eval_batch_size=8)
    calls = spy(trainer, "prediction_step")
    logged = spy(trainer, "log")
    metric_calls: list = []
    trainer.compute_metrics = lambda p: metric_calls.append(p) or {}  # set after __init__, which refuses it
    with guard(TF, "Trainer.evaluate() failed through AlignTrainer.prediction_step (Trainer._prepare_inputs?)",
               "alignkit/trainers/base.py:AlignTrainer.prediction_step"):
        metrics = trainer.evaluate()
    check(calls, TF, "Trainer.evaluate no longer calls self.prediction_step", "alignkit/trainers/base.py:AlignTrainer.prediction_step")
    ours = [k for k in metrics if k.startswith("eval_") and k not in ("eval_loss", "eval_runtime", "eval_samples_per_second",
                                                                       "eval_steps_per_second")]
    check("eval_loss" in metrics and ours, TF, "Trainer.evaluate no longer passes its metrics through self.log(logs, "
          "start_time) (alignkit's eval_ metrics are missing)", "alignkit/trainers/base.py:AlignTrainer.log",
          f"metrics: {sorted(metrics)}")
    check(any(a and a[0] is metrics for a, _ in logged), TF, "Trainer.evaluate no longer logs the metrics dict it "
          "returns (self.log(metrics)): the eval_loss AlignTrainer.log computes over the whole evaluation set would "
          "not be the one evaluate() returns (metric_for_best_model reads that)", "alignkit/trainers/base.py:AlignTrainer.log")
    check(not metric_calls, TF, "Trainer.evaluate now calls compute_metrics without logits / labels from "
          "prediction_step: AlignTrainer refuses compute_metrics as never called, which is no longer true",
          "alignkit/trainers/checks.py:refuse_metric_functions")


# T9 ------------------------------------------------------------------------------------------------------

def test_loss_context_and_flops(tiny_dir, tokenizer, sft_features, tmp_path):
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path)
    stack = Trainer.compute_loss_context_manager(trainer)
    check(isinstance(stack, contextlib.ExitStack), TF, "Trainer.compute_loss_context_manager() no longer returns an "
          "ExitStack", "alignkit/trainers/base.py:AlignTrainer.compute_loss_context_manager", type(stack).__name__)
    stack.close()
    batch = SFTCollator(tokenizer.pad_token_id)(sft_features[:2])
    n = sum(p.numel() for name, p in trainer.model.named_parameters() if "embed_tokens" not in name)
    check(trainer.floating_point_ops(batch) == 6 * batch["input_ids"].numel() * n, TF,
          "the Trainer's FLOP estimate is no longer 6 x tokens x non-embedding parameters",
          "alignkit/trainers/base.py:AlignTrainer.floating_point_ops",
          f"{trainer.floating_point_ops(batch)} vs Trainer's {Trainer.floating_point_ops(trainer, batch)}")


# T10 -----------------------------------------------------------------------------------------------------

def test_reft_trainer_keeps_rotations_out_of_weight_decay(tiny_dir, tokenizer, tmp_path):
    from alignkit.data.reft_data import make_last_position_supervised_data_module
    from alignkit.interventions import ReftConfig
    from alignkit.interventions.attach import get_reft_model

    torch.manual_seed(0)
    reft = get_reft_model(load_model(tiny_dir("llama")), ReftConfig.uniform([0], "loreft", low_rank_dimension=2))
    data = make_last_position_supervised_data_module(tokenizer, PROMPTS[:4], ANSWERS[:4])
    trainer = ReftTrainer(model=reft, args=args(tmp_path, weight_decay=0.1), **data)
    where = "alignkit/trainers/base.py:AlignTrainer.get_decay_parameter_names (ReftTrainer is an SFTTrainer)"
    with guard(TF, "Trainer.create_optimizer() failed", where):
        opt = trainer.create_optimizer()
    names = {id(p): n for n, p in reft.named_parameters()}
    decayed = [names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    rot = [n for n in names.values() if n.endswith("parametrizations.weight.original")]
    check(rot, "torch", "no orthogonal parametrization found in a LoReFT", where)
    check(decayed and not set(rot) & set(decayed), TF, "Trainer.create_optimizer no longer takes its decay list from "
          "self.get_decay_parameter_names(model): weight decay reaches the rotations' Householder parameters", where,
          f"decayed: {decayed}")


# T44 -----------------------------------------------------------------------------------------------------

def test_evaluate_hands_the_whole_eval_dataloader_to_evaluation_loop(tiny_dir, tokenizer, tmp_path):
    """T44: `Trainer.evaluate` calls `self.evaluation_loop(eval_dataloader, description=...)` once per evaluation set
    with the whole set's dataloader, whose batches then reach `prediction_step` / `compute_loss`:
    `PreferenceTrainer.evaluation_loop` counts a chosen-NLL term's N / T over that dataloader first
    (`eval_nll_scale`), so every evaluation batch uses the set's N / T (eval figures independent of the eval batch
    size)."""
    from alignkit.data import PreferenceCollator, PreferenceRecord
    from alignkit.trainers import PreferenceTrainer

    problems = trainer_problems(PreferenceTrainer)
    if problems:
        fail(TF, "; ".join(problems), "alignkit.trainers.preference.PreferenceTrainer.evaluation_loop")
    feats, _ = tokenize_records([PreferenceRecord(p, a, " no", id=str(i)) for i, (p, a) in
                                 enumerate(zip(PROMPTS[:5], ANSWERS))], tokenizer, max_length=32)
    trainer = PreferenceTrainer(model_of(tiny_dir, "lora"), args(tmp_path, per_device_eval_batch_size=2),
                                train_dataset=feats, eval_dataset=feats, loss_type="sft",
                                data_collator=PreferenceCollator(tokenizer.pad_token_id))
    counted, scales = spy(trainer, "eval_nll_scale"), []
    real = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: (scales.append(trainer._eval_nll_scale), real(*a, **k))[1]
    trainer.evaluate()
    if len(counted) != 1 or sum(b["input_ids"].shape[0] // 2 for b in counted[0][0][0]) != len(feats):
        fail(TF, "Trainer.evaluate no longer hands evaluation_loop one dataloader over the whole evaluation set",
             "alignkit.trainers.preference.PreferenceTrainer.evaluation_loop")
    if len(scales) != 3 or any(s is None for s in scales):  # 2 + 2 + 1 pairs, each with the set's N / T
        fail(TF, f"the evaluation batches no longer run inside evaluation_loop ({scales})",
             "alignkit.trainers.preference.PreferenceTrainer.compute_loss")


# M21 -----------------------------------------------------------------------------------------------------

def test_full_eval_precision_casts_the_model_in_place_outside_training_only(tiny_dir, tokenizer, sft_features, tmp_path):
    """`fp16_full_eval` / `bf16_full_eval`: `Trainer.evaluation_loop` casts the model itself (in place, the trainer's
    own module) when called outside `train()`, and leaves it as it is during training. alignkit refuses both keys on a
    training run (settings/train.py:refuse_full_eval): the final evaluation of a run with eval_strategy no would save
    model/ in float16. Were the Trainer to stop casting (or cast a copy), the refusal's reason would be wrong."""
    where = "alignkit/settings/train.py:refuse_full_eval"
    for key, dtype in (("fp16_full_eval", torch.float16), ("bf16_full_eval", torch.bfloat16)):
        trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, "full", **{key: True})
        trainer.is_in_train = True  # as during train(): an evaluation at eval_steps
        with guard(TF, f"evaluate() with {key} during training failed", where):
            trainer.evaluate()
        during = {p.dtype for p in trainer.model.parameters()}
        check(during == {torch.float32}, TF, f"{key} now changes the model's dtype during training", where,
              f"dtypes: {during}")
        trainer.is_in_train = False  # as after train(): the run's final evaluation
        with guard(TF, f"evaluate() with {key} after training failed", where):
            trainer.evaluate()
        after = {p.dtype for p in trainer.model.parameters()}
        check(after == {dtype}, TF, f"{key} no longer casts the trainer's model in place in an evaluation outside "
              "train()", where, f"dtypes: {after}")
