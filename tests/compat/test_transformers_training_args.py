"""TrainingArguments, optimizer / scheduler resolution, callbacks, NEFTune and accelerator set-up of
transformers.Trainer as alignkit relies on them (most rows from T10 of the table in docs/architecture.md; split from
test_transformers_trainer.py, whose helpers this file repeats).
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


# T11 -----------------------------------------------------------------------------------------------------

# TrainingArguments fields alignkit passes, replaces (dataclasses.replace) or reads
ARG_FIELDS = ("activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
              "remove_unused_columns", "train_sampling_strategy", "eval_strategy", "save_strategy", "use_cpu",
              "ddp_backend", "dataloader_pin_memory", "report_to", "disable_tqdm", "data_seed", "seed", "max_grad_norm",
              "average_tokens_across_devices",
              "output_dir", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
              "lr_scheduler_type", "warmup_steps", "weight_decay", "logging_steps", "dataloader_num_workers",
              "num_train_epochs", "gradient_accumulation_steps", "bf16")
ARG_PROPERTIES = ("world_size", "train_batch_size", "should_save")


def test_training_arguments_fields(tmp_path):
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = [f for f in ARG_FIELDS if f not in fields]
    check(not missing, TF, f"TrainingArguments lost field(s) {missing}",
          "alignkit/trainers/base.py:AlignTrainer.__init__, "
          "cli/train.py:training_arguments, demos/pipeline.py:_args")
    a = args(tmp_path, activation_checkpointing=True)
    missing = [p for p in ARG_PROPERTIES if not hasattr(a, p)]
    check(not missing, TF, f"TrainingArguments lost attribute(s) {missing}", "alignkit/trainers/base.py")
    with guard(TF, "TrainingArguments no longer survives dataclasses.replace / to_json_string",
               "alignkit/trainers/base.py:AlignTrainer.__init__ and _save"):
        b = dataclasses.replace(a, remove_unused_columns=False, activation_checkpointing=False,
                                gradient_checkpointing=False)
        assert json.loads(b.to_json_string())["remove_unused_columns"] is False


# T12 -----------------------------------------------------------------------------------------------------

def test_callbacks_and_public_trainer_names():
    where = "alignkit/runs.py:MetricsJsonl, runs.py:trackers, cli/train.py, demos/pipeline.py:_quiet, demos/reft.py"
    with guard(TF, "a callback class or helper alignkit imports moved", where):
        from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed  # noqa: F401
        from transformers.integrations import TensorBoardCallback, get_available_reporting_integrations
        from transformers.trainer_callback import PrinterCallback as P2, TrainerState
        from transformers.utils import is_sagemaker_mp_enabled  # noqa: F401
        from transformers.utils import logging as hf_logging

        assert P2 is PrinterCallback
        assert "tensorboard" in get_available_reporting_integrations()  # runs.py:trackers expands report_to all
        assert callable(hf_logging.set_verbosity_error)
    check(params(TrainerCallback.on_log)[:3] == ["args", "state", "control"], TF,
          f"TrainerCallback.on_log now takes {params(TrainerCallback.on_log)}", where)
    check("tb_writer" in params(TensorBoardCallback.__init__), TF, "TensorBoardCallback no longer takes tb_writer=",
          "alignkit/cli/train.py:training_arguments")
    check("processing_class" in params(Trainer.__init__), TF, "Trainer(...) no longer takes processing_class=",
          "alignkit/cli/train.py:train, demos/*")
    check(params(Trainer.set_initial_training_values)[:2] == ["args", "dataloader"], TF,
          "Trainer.set_initial_training_values no longer takes (args, dataloader)",
          "alignkit/trainers/base.py:AlignTrainer.planned_steps")
    for name in ("remove_callback", "add_callback", "is_world_process_zero", "create_optimizer"):
        check(callable(getattr(Trainer, name, None)), TF, f"Trainer.{name} is gone", where)
    state_fields = {f.name for f in dataclasses.fields(TrainerState)}
    need = {"global_step", "max_steps", "log_history", "best_model_checkpoint", "best_metric", "is_world_process_zero",
            "epoch"}
    check(need <= state_fields, TF, f"TrainerState lost {sorted(need - state_fields)}", where)
    check(transformers.__version__.split(".")[0] == "5", TF, "major version is no longer 5 (pyproject allows <6)",
          "pyproject.toml")


# T14 -----------------------------------------------------------------------------------------------------

def test_optimizer_is_resolved_from_the_arguments_alone(tmp_path):
    """`Trainer.get_optimizer_cls_and_kwargs(args)` (a static method, no model) gives the optimizer's keyword
    arguments with `optim_args` applied by the names the optimizer reads, and raises ImportError for a package it
    needs and lacks: alignkit's check_optimizer refuses both cases by asking it before the run folder is written."""
    where = "alignkit/trainers/checks.py:check_optimizer"
    with guard(TF, "Trainer.get_optimizer_cls_and_kwargs(args) no longer works without a model", where):
        _, sgd = Trainer.get_optimizer_cls_and_kwargs(args(tmp_path, optim="sgd", optim_args="momentum=0.5"))
        _, adamw = Trainer.get_optimizer_cls_and_kwargs(args(tmp_path, optim="adamw_torch", optim_args="momentum=0.5"))
    check(sgd.get("momentum") == 0.5 and "momentum" not in adamw, TF, "optim_args no longer reach the optimizer's "
          "keyword arguments by the names it reads (sgd: momentum; adamw_torch: none)", where, f"{sgd} / {adamw}")
    if importlib.util.find_spec("bitsandbytes") is None:
        try:
            Trainer.get_optimizer_cls_and_kwargs(args(tmp_path, optim="adamw_bnb_8bit"))
        except ImportError:
            pass
        else:
            fail(TF, "get_optimizer_cls_and_kwargs no longer raises ImportError for adamw_bnb_8bit without "
                 "bitsandbytes", where)
    if importlib.util.find_spec("grokadamw") is None:  # some optimizers say a missing package as a ValueError
        try:
            Trainer.get_optimizer_cls_and_kwargs(args(tmp_path, optim="grokadamw"))
        except ValueError as e:
            check("install" in str(e).lower(), TF, "get_optimizer_cls_and_kwargs's ValueError for grokadamw without "
                  "its package no longer says 'install' (check_optimizer would let the run start and fail later)",
                  where, str(e))
        else:
            fail(TF, "get_optimizer_cls_and_kwargs no longer raises ValueError ('Please install ...') for grokadamw "
                 "without grokadamw (check_optimizer reads that text)", where)


# T15 -----------------------------------------------------------------------------------------------------

def test_schedule_is_built_by_get_scheduler_from_the_arguments(tiny_dir, tokenizer, sft_features, tmp_path):
    """`Trainer.create_scheduler` builds `transformers.get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=
    args.get_warmup_steps(n), num_training_steps=n, scheduler_specific_kwargs=args.lr_scheduler_kwargs)`, which takes
    the kwargs as the schedule's keyword arguments and drops them for `constant`: alignkit's check_scheduler tries the
    same call on a one-parameter optimizer before the run folder is written."""
    where = "alignkit/trainers/checks.py:check_scheduler"
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, learning_rate=1.0, warmup_steps=0,
                          lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 0.25})
    with guard(TF, "Trainer.create_optimizer_and_scheduler(num_training_steps) failed", where):
        trainer.create_optimizer_and_scheduler(num_training_steps=4)
        for _ in range(4):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
    lr = trainer.optimizer.param_groups[0]["lr"]
    check(abs(lr - 0.25) < 1e-9, TF, "Trainer.create_scheduler no longer passes args.lr_scheduler_kwargs to the "
          "schedule (cosine_with_min_lr ended away from min_lr)", where, f"lr after 4 of 4 steps: {lr}")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        transformers.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=4,
                                   scheduler_specific_kwargs={"alignkit_probe": 1})
    except TypeError:
        pass
    else:
        fail(TF, "get_scheduler no longer passes scheduler_specific_kwargs to the schedule as keyword arguments", where)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    transformers.get_scheduler("constant", opt, num_warmup_steps=3, num_training_steps=4)
    check(opt.param_groups[0]["lr"] == 1.0, TF, "get_scheduler('constant') now reads num_warmup_steps (alignkit's "
          "check_warmup refuses a warm-up with it as ignored)", where, f"lr at step 0: {opt.param_groups[0]['lr']}")


@pytest.mark.parametrize("batch, accumulate, drop_last, epochs", [(3, 2, False, 1), (3, 1, True, 2), (5, 2, False, 1.5)])
def test_an_epoch_based_run_plans_the_steps_the_trainer_runs(batch, accumulate, drop_last, epochs, tiny_dir,
                                                              tokenizer, sft_features, tmp_path):
    """T30: an epoch-based run (max_steps -1) runs `Trainer.set_initial_training_values`' ceil(epochs x max(ceil(
    batches / accumulation), 1)) optimizer steps over one process's dataloader, and `get_warmup_steps(n)` is
    ceil(n x fraction): alignkit's planned_steps / check_warmup refuse a warm-up as long as the run with them."""
    from alignkit.trainers.checks import planned_steps

    where = "alignkit/trainers/checks.py:planned_steps"
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, max_steps=-1, num_train_epochs=epochs,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                          dataloader_drop_last=drop_last, eval_strategy="no")
    trainer.train()
    planned = planned_steps(trainer.args, sft_features)
    check(trainer.state.global_step == planned, TF, "an epoch-based run no longer runs the optimizer steps of "
          "set_initial_training_values' formula", where, f"ran {trainer.state.global_step}, planned {planned}")
    fraction = args(tmp_path, warmup_steps=0.5)
    check(fraction.get_warmup_steps(5) == 3, TF, "TrainingArguments.get_warmup_steps no longer turns a fraction into "
          "ceil(steps x fraction) warm-up steps", where, f"0.5 of 5 steps: {fraction.get_warmup_steps(5)}")


def test_neftune_noise_follows_the_embedding_modules_training_flag(tiny_dir):
    """T16: the NEFTune hook the Trainer adds (`activate_neftune`) perturbs the embeddings while the embedding module
    trains, and not when only that module is put in eval mode (what `embeddings_at_rest` does for the reference)."""
    from transformers.integrations.neftune import activate_neftune

    model = load_model(tiny_dir("llama")).train()
    ids = torch.tensor([[5, 6, 7, 8]])
    emb = model.get_input_embeddings()
    plain = emb(ids)
    handle = activate_neftune(model, 5.0)
    try:
        assert (emb(ids) - plain).abs().max() > 1e-4  # noise while training
        emb.training = False
        torch.testing.assert_close(emb(ids), plain, rtol=0, atol=0)  # none with the module at rest
    finally:
        handle.remove()


def test_neftune_noise_is_scaled_by_the_row_length(tiny_dir):
    """T34: the NEFTune hook's noise is uniform in +-alpha / sqrt(row length x width), the row length being the
    embedded batch's dim 1: one packed row of 4 sequences of 8 tokens gets half the bound of 4 padded rows of 8
    (sqrt(32 / 8)), which is why trainers/packing.py keeps padded batches under NEFTune."""
    from transformers.integrations.neftune import activate_neftune

    model = load_model(tiny_dir("llama")).train()
    emb = model.get_input_embeddings()
    width, alpha = emb.weight.shape[1], 5.0
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (4, 8))
    plain = emb(ids)
    handle = activate_neftune(model, alpha)
    try:
        for rows in (ids, ids.reshape(1, 32)):
            noise = (emb(rows) - plain.reshape(rows.shape[0], rows.shape[1], width)).abs()
            bound = alpha / math.sqrt(rows.shape[1] * width)
            assert noise.max() <= bound * (1 + 1e-5), (rows.shape, float(noise.max()), bound)
            assert noise.max() > 0.9 * bound, (rows.shape, float(noise.max()), bound)  # uniform: reaches near it
    finally:
        handle.remove()


# T17 -----------------------------------------------------------------------------------------------------

def test_several_gpus_in_one_process_mean_data_parallel(tmp_path, monkeypatch):
    """A process without a launcher that sees several GPUs: `n_gpu` is `torch.cuda.device_count()`, `parallel_mode`
    NOT_DISTRIBUTED, the batch `per_device_train_batch_size x n_gpu`, and `_wrap_model` puts the model in
    `nn.DataParallel`: what trainers/checks.py:refuse_ignored_arguments refuses by `parallel_mode`."""
    from transformers.training_args import ParallelMode

    if torch.cuda.is_available():
        pytest.skip("the fake GPU count is for a machine without CUDA")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    where = "alignkit/trainers/checks.py:refuse_ignored_arguments"
    a = TrainingArguments(str(tmp_path / "out"), report_to=[], per_device_train_batch_size=4)
    with guard(TF, "several GPUs in one process no longer read as NOT_DISTRIBUTED (DataParallel)", where):
        assert (a.n_gpu, a.parallel_mode, a.train_batch_size) == (2, ParallelMode.NOT_DISTRIBUTED, 8)
        wrapped = Trainer(model=torch.nn.Linear(2, 2), args=a)._wrap_model(torch.nn.Linear(2, 2))
        assert isinstance(wrapped, torch.nn.DataParallel)
    one = TrainingArguments(str(tmp_path / "out"), report_to=[], use_cpu=True)
    check(one.parallel_mode == ParallelMode.NOT_PARALLEL and one.n_gpu == 0, TF,
          "use_cpu no longer means one process without DataParallel", where)


# T18 -----------------------------------------------------------------------------------------------------

class _Off:
    """A false value that is recognisably ours."""

    def __bool__(self) -> bool:
        return False


def test_accelerator_is_built_by_create_accelerator_and_postprocess(tmp_path):
    """`Trainer.__init__` builds its accelerator by calling `self.create_accelerator_and_postprocess()` once, which
    sets `self.is_fsdp_enabled`, and nothing later in `__init__` sets that flag again: alignkit's override attaches
    the FSDP plugin on CPU processes after the Trainer's and then sets the flag the Trainer reads."""
    where = "alignkit/trainers/base.py:AlignTrainer.create_accelerator_and_postprocess (distributed.py:enable_sharding_on_cpu)"
    seen: list = []
    off = _Off()

    class Probe(Trainer):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            seen.append((hasattr(self, "accelerator"), vars(self).get("is_fsdp_enabled", "unset")))
            self.is_fsdp_enabled = off

    with guard(TF, "a Trainer whose create_accelerator_and_postprocess is overridden could not be built", where):
        trainer = Probe(model=torch.nn.Linear(2, 2), args=args(tmp_path))
    check(len(seen) == 1, TF, "Trainer.__init__ no longer calls self.create_accelerator_and_postprocess() once",
          where, f"calls: {len(seen)}")
    check(seen[0] == (True, False), TF, "create_accelerator_and_postprocess no longer builds self.accelerator and "
          "sets self.is_fsdp_enabled (False on one CPU process)", where, f"(has accelerator, is_fsdp_enabled): {seen[0]}")
    check(trainer.is_fsdp_enabled is off, TF, "Trainer.__init__ sets is_fsdp_enabled again after "
          "create_accelerator_and_postprocess (alignkit's value would be overwritten)", where,
          f"is_fsdp_enabled: {trainer.is_fsdp_enabled!r}")


# T19 -----------------------------------------------------------------------------------------------------

def test_scheduler_and_optimizer_names_are_the_enums_training_arguments_takes(tmp_path):
    """The config check validates `train.lr_scheduler_type` / `train.optim` (with a "did you mean") against
    `transformers.trainer_utils.SchedulerType` and `transformers.training_args.OptimizerNames`, read by those module
    paths: `TrainingArguments` must convert the two fields to exactly those enums and refuse a name outside them."""
    import importlib

    where = "alignkit/settings/bounds.py:check_bounds/_check_choice"
    with guard(TF, "SchedulerType / OptimizerNames are no longer at the module paths alignkit reads", where):
        sched = importlib.import_module("transformers.trainer_utils").SchedulerType
        optim = importlib.import_module("transformers.training_args").OptimizerNames
    a = args(tmp_path, optim="adamw_torch", lr_scheduler_type="cosine")
    check(isinstance(a.lr_scheduler_type, sched) and isinstance(a.optim, optim), TF, "TrainingArguments no longer "
          "converts lr_scheduler_type / optim to SchedulerType / OptimizerNames (alignkit would refuse valid names "
          "or pass invalid ones)", where, f"{type(a.lr_scheduler_type)}, {type(a.optim)}")
    for field in ("optim", "lr_scheduler_type"):
        try:
            args(tmp_path, **{field: "not_a_known_name"})
        except ValueError:
            continue
        fail(TF, f"TrainingArguments accepts a {field} outside its enum (alignkit's check would refuse a name the "
             "Trainer takes)", where)


# T20 -----------------------------------------------------------------------------------------------------

def test_training_fields_are_arguments_the_checkpoint_records(tmp_path):
    """`check_resumable` compares the checkpoint's `training_args.json` with this run's arguments on the names in
    `trainers/checks.py:TRAINING_FIELDS`: each must be a `TrainingArguments` field that `to_json_string()` writes
    (a renamed field would silently drop out of the comparison). And the premise of the check: the resumed Trainer's
    scheduler state brings back the checkpoint's learning rate (`LambdaLR.load_state_dict` restores `base_lrs`),
    not the one this run asks for."""
    import json

    from alignkit.trainers.checks import TRAINING_FIELDS
    from transformers import get_scheduler

    where = "alignkit/trainers/checks.py:TRAINING_FIELDS/training_changes"
    written = json.loads(args(tmp_path).to_json_string())
    missing = [k for k in TRAINING_FIELDS if k not in written]
    check(not missing, TF, "TrainingArguments no longer has (or no longer writes to JSON) fields a resume compares",
          where, f"missing: {missing}")

    def schedule(lr):
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)
        return opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)

    _, old = schedule(1e-3)
    old.step()
    opt, new = schedule(5e-4)
    new.load_state_dict(old.state_dict())
    new.step()
    check(abs(opt.param_groups[0]["lr"] - 1e-3 * 8 / 10) < 1e-12, TF, "a loaded scheduler state no longer brings "
          "back the checkpoint's learning rate (the resume check's reason would be wrong)", where,
          f"lr after two steps: {opt.param_groups[0]['lr']}")


# T21 -----------------------------------------------------------------------------------------------------

def test_trainer_reads_no_script_flags_and_hub_fields_are_the_ones_alignkit_checks():
    """alignkit refuses `train.do_train: false`, `train.do_predict: true` and a `train.do_eval` the data contradicts
    as "not read (transformers' Trainer leaves it to scripts)": no module of the Trainer may read them (only the Ray
    Tune search, which alignkit does not run). Its Hub fields must be `HUB_KEYS` (with push_to_hub), which the offline
    run takes out of TrainingArguments and checks (settings/train.py), and `hub_strategy` the four HubStrategy values
    whose 'end' is what alignkit's one upload after the last step does."""
    import dataclasses
    import importlib
    import inspect
    import re

    from alignkit.settings.train import HUB_KEYS

    where = "alignkit/settings/train.py:refuse_unread_train_keys, settings/sections.py:refuse_do_eval"
    names = ("trainer", "trainer_callback", "trainer_utils", "trainer_pt_utils", "trainer_optimizer", "trainer_seq2seq")
    for name in names:
        try:
            source = inspect.getsource(importlib.import_module(f"transformers.{name}"))
        except ModuleNotFoundError:
            continue
        reads = re.findall(r"\.(do_train|do_eval|do_predict)\b", source)
        check(not reads, TF, f"transformers.{name} now reads {sorted(set(reads))} (alignkit refuses them as never read)",
              where)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    hub = {n for n in fields if n.startswith("hub_")}
    check(hub == set(HUB_KEYS), TF, "TrainingArguments' hub_* fields changed (each must be honoured or refused by "
          "alignkit's upload)", where, f"fields {sorted(hub)}, HUB_KEYS {sorted(HUB_KEYS)}")
    check({"do_train", "do_eval", "do_predict", "push_to_hub"} <= fields, TF, "TrainingArguments lost a script flag "
          "or push_to_hub", where)
    with guard(TF, "transformers.trainer_utils.HubStrategy is gone", where):
        values = {s.value for s in importlib.import_module("transformers.trainer_utils").HubStrategy}
    check(values == {"end", "every_save", "checkpoint", "all_checkpoints"}, TF, "HubStrategy's values changed",
          where, str(sorted(values)))


# T26 -----------------------------------------------------------------------------------------------------

def test_on_step_end_follows_each_optimizer_step_before_its_checkpoint(tiny_dir, tokenizer, sft_features, tmp_path):
    """`TrainerCallback.on_step_end` runs once per optimizer step (not per micro-batch), after `global_step` counts
    that step and before the step's checkpoint is saved: ref_sync's mix at steps tau, 2 tau, ... and its reference in
    that checkpoint rest on both."""
    from transformers import TrainerCallback

    seen: list = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((state.global_step, (tmp_path / "out" / f"checkpoint-{state.global_step}").exists()))

    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, kind="full", max_steps=3,
                          per_device_train_batch_size=1, gradient_accumulation_steps=2, save_strategy="steps",
                          save_steps=1)
    trainer.add_callback(Record())
    trainer.train()
    where = "alignkit/trainers/ref_sync.py:RefSyncCallback.on_step_end"
    check([s for s, _ in seen] == [1, 2, 3], TF, "on_step_end is no longer called once per optimizer step after "
          "global_step is counted (ref_sync would mix at other steps)", where, f"steps seen {seen}")
    check(not any(saved for _, saved in seen), TF, "the step's checkpoint is saved before on_step_end (it would hold "
          "the reference before that step's sync)", where, f"{seen}")


# T28 -----------------------------------------------------------------------------------------------------

def test_set_seed_seeds_numpy_whose_range_bounds_train_seed():
    """`transformers.set_seed(seed)` seeds numpy too, whose `np.random.seed` takes only [0, 2**32 - 1]: a negative or
    larger train.seed stopped every command at its first set_seed ('unexpected error'); settings/bounds.py's
    TRAIN_BOUNDS refuses it with the key when the config loads."""
    import numpy as np

    where = "alignkit/settings/bounds.py:TRAIN_BOUNDS (seed)"
    transformers.set_seed(2 ** 32 - 1)
    first = np.random.rand()
    transformers.set_seed(2 ** 32 - 1)
    check(np.random.rand() == first, TF, "set_seed no longer seeds numpy's global generator", where)
    for bad in (-1, 2 ** 32):
        try:
            transformers.set_seed(bad)
        except ValueError:
            continue
        fail(TF, f"set_seed({bad}) no longer raises ValueError: train.seed's bound [0, 2**32 - 1] may be too narrow",
             where)


# T31 -----------------------------------------------------------------------------------------------------

def test_report_to_names_are_the_keys_of_integration_to_callback(tiny_dir, tokenizer, sft_features, tmp_path,
                                                                  monkeypatch):
    """The Trainer takes its `report_to` names from
    `transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK` (`get_reporting_integration_callbacks`: a
    name outside it is a ValueError when the Trainer is built, a name in it
    adds its callback): alignkit's check_report_to refuses the others when the config loads, and runs.py:trackers
    asks transformers' availability only for its keys."""
    from transformers.integrations import integration_utils
    from transformers.trainer_callback import TrainerCallback

    where = "alignkit/settings/load.py:check_report_to, alignkit/runs.py:trackers"

    class Probe(TrainerCallback):
        pass

    with guard(TF, "get_reporting_integration_callbacks no longer takes every key of INTEGRATION_TO_CALLBACK", where):
        got = integration_utils.get_reporting_integration_callbacks(list(integration_utils.INTEGRATION_TO_CALLBACK))
    check(got == list(integration_utils.INTEGRATION_TO_CALLBACK.values()), TF, "get_reporting_integration_callbacks "
          "no longer maps each name to its INTEGRATION_TO_CALLBACK entry", where, f"{got}")
    check("tensorboard" in integration_utils.INTEGRATION_TO_CALLBACK, TF, "INTEGRATION_TO_CALLBACK no longer names "
          "tensorboard (alignkit's default tracker)", where)
    try:
        sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, report_to=["alignkit_probe"])
    except ValueError as e:
        check("alignkit_probe" in str(e), TF, "the Trainer's refusal of an unknown report_to name no longer names "
              "it", where, str(e))
    else:
        fail(TF, "the Trainer no longer refuses a report_to name outside INTEGRATION_TO_CALLBACK (check_report_to "
             "would refuse names it takes)", where)
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "alignkit_probe", Probe)
    with guard(TF, "the Trainer no longer takes a report_to name INTEGRATION_TO_CALLBACK holds", where):
        trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path, report_to=["alignkit_probe"])
    check(any(isinstance(c, Probe) for c in trainer.callback_handler.callbacks), TF, "the Trainer no longer builds "
          "its report_to callbacks from INTEGRATION_TO_CALLBACK", where,
          f"{[type(c).__name__ for c in trainer.callback_handler.callbacks]}")


# T32 -----------------------------------------------------------------------------------------------------

def test_optimizer_and_scheduler_states_are_saved_under_the_names_check_resumable_reads(
        tiny_dir, tokenizer, sft_features, tmp_path):
    """The Trainer's `_save_optimizer_and_scheduler(output_dir)` writes `transformers.trainer.OPTIMIZER_NAME` and
    `SCHEDULER_NAME` into the checkpoint, and `_load_optimizer_and_scheduler(checkpoint)` returns without a word for a
    checkpoint without them (the optimizer and schedule restart from zero): alignkit's check_resumable refuses such a
    checkpoint by those names, and Checkpointing writes / reads them itself under FSDP2."""
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    where = "alignkit/trainers/checks.py:check_resumable, trainers/checkpointing.py:Checkpointing"
    trainer = sft_trainer(tiny_dir, tokenizer, sft_features, tmp_path)
    folder, empty = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    folder.mkdir()
    empty.mkdir()
    with guard(TF, "Trainer._save_optimizer_and_scheduler(output_dir) failed", where):
        trainer.create_optimizer_and_scheduler(num_training_steps=4)
        trainer._save_optimizer_and_scheduler(str(folder))
    names = sorted(p.name for p in folder.iterdir())
    check(OPTIMIZER_NAME in names and SCHEDULER_NAME in names, TF, "the Trainer no longer saves the optimizer and "
          "scheduler states under OPTIMIZER_NAME / SCHEDULER_NAME (check_resumable would refuse every checkpoint)",
          where, f"{OPTIMIZER_NAME}, {SCHEDULER_NAME} vs written {names}")
    with guard(TF, "Trainer._load_optimizer_and_scheduler no longer passes over a checkpoint without the states "
               "(check_resumable's refusal may now be the Trainer's)", where):
        trainer._load_optimizer_and_scheduler(str(empty))


def test_trainer_init_creates_the_output_dir(tiny_dir, tmp_path):
    """T43: `Trainer.__init__` makes `output_dir` (parents too) before training; alignkit's trainers remove it again
    when a check after `super().__init__` refuses (trainers/checkpointing.py:removes_new_output_dir)."""
    where = "trainers/checkpointing.py:removes_new_output_dir"
    folder = tmp_path / "a" / "out"
    with guard(TF, "Trainer(model, args) runs on a tiny model", where):
        Trainer(model=load_model(tiny_dir("llama")), args=args(tmp_path, output_dir=str(folder)))
    check(folder.is_dir() and not any(folder.iterdir()), TF, "Trainer.__init__ no longer creates args.output_dir "
          "(empty): removes_new_output_dir then has nothing to remove (harmless; update T43)", where)
