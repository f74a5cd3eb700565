"""accelerate behaviour and torch module internals alignkit relies on (rows A1-A18 and D3 of the table in
docs/architecture.md; the other datasets rows are in test_datasets.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alignkit.data.readers.rows import iter_rows
from alignkit.interventions import ReftConfig
from alignkit.interventions.attach import ReftModel, get_reft_model
from alignkit.adapters.base import _PARALLEL_WRAPPERS, unwrap_parallel
from alignkit.trainers.reference import attach_reference

from .guards import check, guard, params

ACC = "accelerate"


def test_unwrap_model_returns_our_wrapper(tiny_lm):
    where = "alignkit/trainers/checkpointing.py:Checkpointing._save/_load_from_checkpoint, online/trainer.py:policy"
    from accelerate import Accelerator

    reft = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0], "loreft", low_rank_dimension=2))
    acc = Accelerator(cpu=True)
    with guard(ACC, "Accelerator.prepare / unwrap_model on a ReftModel failed", where):
        prepared = acc.prepare(reft)
        back = acc.unwrap_model(prepared)
    check(isinstance(back, ReftModel) and back is reft, ACC, "Accelerator.unwrap_model no longer returns the "
          "ReftModel it prepared", where, type(back).__name__)
    dp = nn.DataParallel(reft)
    from accelerate.utils import extract_model_from_parallel

    check(unwrap_parallel(dp) is reft and extract_model_from_parallel(dp) is reft, ACC, "DataParallel unwrapping "
          "disagrees with accelerate's", "alignkit/adapters/base.py:unwrap_parallel")


def test_parallel_wrapper_class_names():
    """`unwrap_parallel` strips wrappers by class name (no import of deepspeed needed)."""
    where = "alignkit/adapters/base.py:_PARALLEL_WRAPPERS"
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for cls in (DistributedDataParallel, nn.DataParallel, FullyShardedDataParallel):
        check(cls.__name__ in _PARALLEL_WRAPPERS and "module" in (cls.__init__.__code__.co_varnames), "torch",
              f"{cls.__module__}.{cls.__name__} is not among the wrapper names alignkit strips", where)


def test_accelerator_calls_alignkit_makes():
    where = "alignkit/trainers/base.py (_clip_grad_norm, log, compute_loss_context_manager), online/trainer.py"
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    check(all(hasattr(DistributedType, n) for n in ("FSDP", "DEEPSPEED", "XLA", "NO")), ACC,
          "DistributedType lost FSDP / DEEPSPEED / XLA / NO", where)
    acc = Accelerator(cpu=True)
    check(params(acc.clip_grad_norm_)[:2] == ["parameters", "max_norm"], ACC,
          f"Accelerator.clip_grad_norm_ now takes {params(acc.clip_grad_norm_)}", where)
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    with guard(ACC, "Accelerator.clip_grad_norm_/reduce/gather/autocast failed on one CPU process", where):
        norm = acc.clip_grad_norm_([p], 1.0)
        with acc.autocast():
            pass
        red = acc.reduce(torch.tensor([1.0, 2.0]), reduction="sum")
        gat = acc.gather(torch.tensor([5.0]))
    check(math.isclose(float(norm), 5.0, rel_tol=1e-6) and torch.allclose(p.grad, torch.tensor([0.6, 0.8])), ACC,
          "clip_grad_norm_ no longer returns the pre-clip norm and clips in place", where, f"{norm}, {p.grad}")
    check(torch.equal(red, torch.tensor([1.0, 2.0])) and torch.equal(gat, torch.tensor([5.0])), ACC,
          "reduce / gather on one process no longer return the input", where)
    check(acc.is_main_process and acc.device.type == "cpu", ACC, "Accelerator(cpu=True) is not the main CPU process",
          where)
    from accelerate import Accelerator as A

    got = params(A.__init__)
    check(all(n in got for n in ("cpu", "log_with", "project_dir")), ACC, "Accelerator() no longer takes cpu= / "
          "log_with= / project_dir=", "alignkit/online/trainer.py", str(got))
    for name in ("init_trackers", "log", "end_training", "wait_for_everyone"):  # decorated: (*args, **kwargs)
        check(callable(getattr(A, name, None)), ACC, f"Accelerator.{name} is gone", "alignkit/online/trainer.py")


def test_a_started_tracker_appended_to_trackers_is_logged_to(tmp_path):
    """The online loop opens TensorBoard itself (`TensorBoardTracker(run_name, logging_dir, **SummaryWriter
    kwargs)`: events in <logging_dir>/<run_name>) and appends it to `accelerator.trackers`, which
    `Accelerator.log` writes to."""
    where = "alignkit/online/metrics.py:ProcessMetrics.start_trackers"
    from accelerate import Accelerator
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, get_available_trackers

    check({"tensorboard", "wandb"} <= set(LOGGER_TYPE_TO_CLASS), ACC, "accelerate.tracking.LOGGER_TYPE_TO_CLASS no "
          "longer maps tracker names (report_to: all keeps the names it holds)", where, str(list(LOGGER_TYPE_TO_CLASS)))
    names = {str(getattr(t, "value", t)) for t in get_available_trackers()}  # runs.py:trackers (installed or not)
    check("tensorboard" in names and names <= set(LOGGER_TYPE_TO_CLASS), ACC, "accelerate.tracking."
          "get_available_trackers no longer lists the installed trackers by LOGGER_TYPE_TO_CLASS's names",
          "alignkit/runs.py:trackers", str(names))
    with guard(ACC, "TensorBoardTracker(run_name, logging_dir, purge_step=) / init_trackers / log moved", where):
        acc = Accelerator(cpu=True, project_dir=str(tmp_path))
        acc.init_trackers("my-run")
        tracker = TensorBoardTracker("tensorboard", str(tmp_path), purge_step=0)
        tracker.start()
        acc.trackers.append(tracker)
        acc.log({"x": 1.0}, step=0)
        tracker.finish()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    check(len(events) == 1 and events[0].stat().st_size > 0, ACC, "a tracker appended to accelerator.trackers is "
          "not written to by Accelerator.log, or TensorBoardTracker writes elsewhere", where, str(events))


def test_accelerate_state_internals_for_cpu_fsdp(monkeypatch):
    """On CPU processes alignkit attaches the FSDP plugin accelerate drops: it sets `state.fsdp_plugin`, builds
    `FullyShardedDataParallelPlugin()` from the launcher's FSDP_* variables, and writes `distributed_type` into the
    private `PartialState._shared_state`, because every `AcceleratorState()` copies PartialState's fields again."""
    where = "alignkit/distributed.py:enable_sharding_on_cpu/is_fsdp2"
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    check(acc.state.distributed_type == DistributedType.NO and "distributed_type" in PartialState._shared_state, ACC,
          "PartialState._shared_state['distributed_type'] is gone", where)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with guard(ACC, "FullyShardedDataParallelPlugin() no longer builds from the FSDP_* environment", where):
        plugin = FullyShardedDataParallelPlugin()
    check(getattr(plugin, "fsdp_version", None) == 2, ACC, "FullyShardedDataParallelPlugin() ignores FSDP_VERSION",
          where, f"fsdp_version={getattr(plugin, 'fsdp_version', None)}")
    saved = PartialState._shared_state["distributed_type"], AcceleratorState._shared_state.get("distributed_type")
    try:
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        seen = AcceleratorState().distributed_type
    finally:
        PartialState._shared_state["distributed_type"] = saved[0]
        AcceleratorState._shared_state["distributed_type"] = saved[1]
    check(seen == DistributedType.FSDP, ACC, "AcceleratorState() no longer copies PartialState's fields (alignkit's "
          "write to PartialState._shared_state would be pointless, or needed elsewhere)", where, str(seen))


def test_accelerate_state_internals_for_cpu_deepspeed(tmp_path):
    """DeepSpeed on CPU processes: alignkit rewrites the process count in the private `PartialState._shared_state`
    (and `AcceleratorState`'s) and rebuilds the DeepSpeed config from `args.deepspeed` with transformers'
    `HfTrainerDeepSpeedConfig.trainer_config_process`, which fills "auto" batch sizes from `args.world_size`."""
    where = "alignkit/distributed.py:deepspeed_on_cpu"
    import pytest

    pytest.importorskip("deepspeed")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    Accelerator(cpu=True)
    fields = ("backend", "num_processes", "process_index", "local_process_index")
    check(all(f in PartialState._shared_state for f in fields), ACC, "PartialState._shared_state lost one of "
          f"{fields}", where, str(sorted(PartialState._shared_state)))
    check(isinstance(AcceleratorState._shared_state, dict), ACC, "AcceleratorState._shared_state is not a dict", where)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             use_cpu=True, report_to=[])
    with guard("transformers", "HfTrainerDeepSpeedConfig(dict).trainer_config_process(args) failed", where):
        cfg = HfTrainerDeepSpeedConfig({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                        "zero_optimization": {"stage": 2}})
        cfg.trainer_config_process(args)
    check(cfg.config["train_batch_size"] == 6 * args.world_size and cfg.config["train_micro_batch_size_per_gpu"] == 3,
          "transformers", "trainer_config_process no longer fills 'auto' batch sizes from the arguments", where,
          str(cfg.config))
    with guard(ACC, "DeepSpeedPlugin(hf_ds_config=...) failed", where):
        plugin = DeepSpeedPlugin(hf_ds_config=cfg)
    check(plugin.deepspeed_config.get("train_batch_size") == 6 * args.world_size, ACC,
          "DeepSpeedPlugin(hf_ds_config=...) does not carry the filled config", where)

def test_torch_module_internals_for_full_parameters():
    """`full_parameters` swaps FSDP2's DTensor shards for full tensors in `module._parameters` and holds off the
    module's `_state_dict_pre_hooks` / `_state_dict_hooks`, recognising fully_shard's classes by the "FSDP" name
    prefix it gives them."""
    import inspect

    where = "alignkit/distributed.py:full_parameters"
    m = nn.Linear(2, 2)
    check(isinstance(m._parameters, dict) and isinstance(m._state_dict_pre_hooks, dict)
          and isinstance(m._state_dict_hooks, dict), "torch", "nn.Module._parameters / _state_dict_pre_hooks / "
          "_state_dict_hooks are no longer dicts", where)
    with guard("torch", "torch.distributed.fsdp.fully_shard / DTensor moved", where):
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
        from torch.distributed.fsdp._fully_shard import _fully_shard as impl
        from torch.distributed.tensor import DTensor  # noqa: F401
    check('"FSDP"' in inspect.getsource(impl), "torch", "fully_shard no longer names its dynamic classes "
          "FSDP<Class> (use isinstance(module, FSDPModule) instead of the name)", where)


def test_deepspeed_needs_a_launcher_or_mpi4py(monkeypatch):
    """`deepspeed.comm.init_distributed` (called when training begins) without every one of a launcher's variables
    (`DEEPSPEED_LAUNCH_ENV`), outside AzureML / SageMaker (`DEEPSPEED_CLOUD_ENV`, which it maps itself), looks for
    MPI by importing mpi4py: what `deepspeed_cannot_start` predicts before the run folder is written."""
    where = "alignkit/distributed.py:deepspeed_cannot_start (trainers/checks.py:refuse_ignored_arguments)"
    import importlib.util
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("deepspeed")
    from deepspeed.comm import comm

    from alignkit.distributed import DEEPSPEED_CLOUD_ENV, DEEPSPEED_LAUNCH_ENV

    for name, fn in zip(DEEPSPEED_CLOUD_ENV, (comm.in_aml, comm.in_aws_sm)):
        monkeypatch.setenv(name, "1")
        check(fn(), "deepspeed", f"{fn.__name__}() no longer reads {name}", where)
        monkeypatch.delenv(name)
    if importlib.util.find_spec("mpi4py") is not None:
        pytest.skip("mpi4py is installed: DeepSpeed would use MPI")
    env = {k: v for k, v in os.environ.items() if k not in (*DEEPSPEED_LAUNCH_ENV, *DEEPSPEED_CLOUD_ENV)}
    code = ("import deepspeed.comm as c\ntry:\n    c.init_distributed(dist_backend='gloo')\n"
            "except ImportError as e:\n    print('ImportError', e.name)\nelse:\n    print('started')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    check(proc.stdout.strip().splitlines()[-1:] == ["ImportError mpi4py"], "deepspeed", "init_distributed without a "
          "launcher's variables no longer stops at `import mpi4py`", where, proc.stdout[-500:] + proc.stderr[-1500:])


def test_accelerate_simple_launcher_environment():
    """`accelerate launch --cpu --num_processes 2` (and --num_processes 2 without --multi_gpu on a machine without
    GPUs) uses the simple launcher: ONE process, whose environment has ACCELERATE_USE_CPU and, for N > 1, MASTER_ADDR
    / MASTER_PORT, and no WORLD_SIZE / RANK: the signature `check_process_count` refuses."""
    where = "alignkit/distributed.py:check_process_count"
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    for argv, master in ((["--cpu", "--num_processes", "2"], True), (["--cpu", "--num_processes", "1"], False)):
        with guard(ACC, "accelerate launch's argument parsing / simple launcher environment changed", where):
            args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "train.py"]))
            cmd, env = prepare_simple_launcher_cmd_env(args)
        check(cmd[-1] == "train.py" and cmd.count("train.py") == 1 and "torch.distributed.run" not in " ".join(cmd),
              ACC, "the simple launcher no longer starts the script once, directly", where, str(cmd))
        check("ACCELERATE_USE_CPU" in env and ("MASTER_ADDR" in env) == master, ACC, "the simple launcher's "
              "environment no longer marks a multi-process request (ACCELERATE_USE_CPU, MASTER_ADDR)", where, str(argv))


def test_accelerate_fsdp_version_defaults_to_one():
    """An FSDP launch whose config names no fsdp_version gets FSDP_VERSION=1 (accelerate's default), which
    `refuse_fsdp1_on_cpu` reads: accelerate's FSDP1 does not run on CPU processes (its plugin needs a device with
    sync_module_states, 'no available devices'; without it FSDP1 stops at 'Inconsistent compute device and
    device_id' when the model is prepared: both seen under accelerate launch, tests/cli/test_distributed.py)."""
    where = "alignkit/distributed.py:refuse_fsdp1_on_cpu"
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    with guard(ACC, "accelerate launch's FSDP environment changed", where):
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
            ["--use_fsdp", "--num_processes", "2", "train.py"]))
        env = prepare_multi_gpu_env(args)
    check(env.get("ACCELERATE_USE_FSDP") == "true" and env.get("FSDP_VERSION") == "1", ACC, "an FSDP launch without "
          "fsdp_version no longer sets FSDP_VERSION=1", where, str({k: env.get(k) for k in ("ACCELERATE_USE_FSDP",
                                                                                          "FSDP_VERSION")}))


def test_module_hooks_are_where_restate_looks():
    """Every hook torch's public API registers on a module (forward, forward-pre, full backward, backward-pre, with
    kwargs or always_call) lands in the module's `_forward_hooks` / `_forward_pre_hooks` / `_backward_hooks` /
    `_backward_pre_hooks`, and the global ones (`register_module_*`) in `torch.nn.modules.module._global_*`: what
    `has_hooks` / `global_hooks` read before a decode step or the last layer is re-stated instead of called."""
    from alignkit.models.restate import global_hooks, has_hooks

    where = "alignkit/models/restate.py:has_hooks/global_hooks (online/fast_step.py, models/last_layer.py)"
    noop = lambda *a, **k: None  # noqa: E731
    registrations = {"register_forward_hook": {}, "register_forward_pre_hook": {},
                     "register_full_backward_hook": {}, "register_full_backward_pre_hook": {},
                     "register_forward_hook(with_kwargs, always_call)": dict(with_kwargs=True, always_call=True),
                     "register_forward_pre_hook(with_kwargs)": dict(with_kwargs=True)}
    for label, kw in registrations.items():
        m = nn.Linear(2, 2)
        check(not has_hooks(m), "torch", "a fresh module reads as hooked", where)
        handle = getattr(m, label.split("(")[0])(noop, **kw)
        check(has_hooks(m), "torch", f"a hook from Module.{label} is not in the hook dicts alignkit reads", where)
        handle.remove()
        check(not has_hooks(m), "torch", f"a removed Module.{label} hook still reads as registered", where)
    mm = torch.nn.modules.module
    check(not global_hooks(), "torch", "global module hooks read as registered with none registered", where)
    for name in ("register_module_forward_hook", "register_module_forward_pre_hook",
                 "register_module_full_backward_hook", "register_module_full_backward_pre_hook"):
        handle = getattr(mm, name)(noop)
        try:
            check(global_hooks(), "torch", f"a hook from torch.nn.modules.module.{name} is not in the global hook "
                  "dicts alignkit reads", where)
        finally:
            handle.remove()
        check(not global_hooks(), "torch", f"a removed {name} hook still reads as registered", where)


def test_compiled_and_offloaded_modules_are_marked():
    """`nn.Module.compile()` sets the module's `_compiled_call_impl` (None before) and accelerate's
    `add_hook_to_module` (device maps, offload) sets `_hf_hook`, removed by `remove_hook_from_module`: how the ReFT
    prefix cache and the last-layer re-statement see layers they must not skip or re-state."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    where = "alignkit/interventions/prefix_cache.py:unusable_reason, models/last_layer.py:unusable_reason"
    m = nn.Linear(2, 2)
    check(getattr(m, "_compiled_call_impl", "missing") is None, "torch", "a module that is not compiled no longer "
          "has _compiled_call_impl = None", where)
    m.compile()
    check(getattr(m, "_compiled_call_impl", None) is not None, "torch", "Module.compile() no longer sets "
          "_compiled_call_impl (a compiled layer would be skipped or re-stated)", where)
    m = nn.Linear(2, 2)
    add_hook_to_module(m, ModelHook())
    check(isinstance(getattr(m, "_hf_hook", None), ModelHook), ACC, "add_hook_to_module no longer sets the module's "
          "_hf_hook (an offloaded layer would be skipped or re-stated)", where)
    remove_hook_from_module(m)
    check(getattr(m, "_hf_hook", None) is None, ACC, "remove_hook_from_module leaves _hf_hook set", where)


def test_in_place_parameter_updates_bump_the_version_counter():
    """The ReFT prefix cache drops its cached states when the sum of the frozen layers' `Parameter._version`
    changes: an optimizer step (per-tensor and foreach), `load_state_dict` and an in-place op under `no_grad` must
    each bump it. (A write through `.data` does not; alignkit writes no parameter that way.)"""
    where = "alignkit/interventions/prefix_cache.py:PrefixCache._state/around"

    def bumped(m: nn.Linear, update) -> bool:
        before = m.weight._version
        update(m)
        return m.weight._version > before

    def step(foreach: bool):
        def run(m: nn.Linear) -> None:
            opt = torch.optim.AdamW(m.parameters(), lr=0.1, foreach=foreach)
            m(torch.ones(1, 2)).sum().backward()
            opt.step()
        return run

    def no_grad_mul(m: nn.Linear) -> None:
        with torch.no_grad():
            m.weight.mul_(2.0)

    updates = {"AdamW.step (per tensor)": step(False), "AdamW.step (foreach)": step(True),
               "load_state_dict": lambda m: m.load_state_dict({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}),
               "an in-place op under no_grad": no_grad_mul}
    for label, update in updates.items():
        check(bumped(nn.Linear(2, 2), update), "torch", f"{label} no longer bumps the parameter's _version (the "
              "prefix cache would serve states of the old weights)", where)


def test_fsdp2_root_state_can_be_initialised_early():
    """`full_parameters` makes an FSDP2 module its root before anything runs: `FSDPModule._get_fsdp_state()` gives
    the module's state and `FSDPState._lazy_init()` takes no argument. Both are read through `hasattr` there, so a
    rename would skip the early root set-up without a word (a nested unit called first makes itself the root)."""
    where = "alignkit/distributed.py:full_parameters"
    with guard("torch", "FSDP2's module / state classes moved", where):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    check(callable(getattr(FSDPModule, "_get_fsdp_state", None)) and params(FSDPModule._get_fsdp_state) == [],
          "torch", "FSDPModule._get_fsdp_state() is gone or takes arguments", where)
    check(callable(getattr(FSDPState, "_lazy_init", None)) and params(FSDPState._lazy_init) == [], "torch",
          "FSDPState._lazy_init() is gone or takes arguments", where)


def test_deepspeeds_cpu_notice_is_dropped_by_its_logger_filter():
    """With DeepSpeed installed and no CUDA, importing it prints "Setting accelerator to CPU ..." on stdout through
    its own "DeepSpeed" logger; the CLI adds a filter on that logger that drops that notice (by its text) and nothing
    else. (Moved here from tests/cli/test_startup.py: it pins DeepSpeed's logger name and message.)"""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("deepspeed")
    where = "alignkit/cli/__init__.py:quiet_deepspeed_cpu_notice (DEEPSPEED_CPU_NOTICE)"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import logging; from alignkit.cli import quiet_deepspeed_cpu_notice as q; q(); import deepspeed; "
            "logging.getLogger('DeepSpeed').warning('another DeepSpeed warning')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    check(out.returncode == 0, "deepspeed", "importing deepspeed after the CLI's logger filter failed", where,
          out.stderr[-2000:])
    text = out.stdout + out.stderr
    check("another DeepSpeed warning" in text, "deepspeed", "the 'DeepSpeed' logger no longer prints (the filter "
          "sits on a logger DeepSpeed does not use)", where, text[-2000:])
    check("Setting accelerator to CPU" not in text, "deepspeed", "DeepSpeed's CPU notice now bypasses the 'DeepSpeed' "
          "logger's filter (printed amid alignkit's output)", where, text[-2000:])
    import torch

    if not torch.cuda.is_available():  # the notice this filter exists for is still what DeepSpeed prints
        bare = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, timeout=300,
                              env=env)
        check("Setting accelerator to CPU" in bare.stdout + bare.stderr, "deepspeed", "DeepSpeed's CPU notice has "
              "another text: DEEPSPEED_CPU_NOTICE no longer matches it", where, (bare.stdout + bare.stderr)[-2000:])


def test_progress_bar_switches_quiet_progress_flips_and_restores():
    """`--quiet` turns off the progress bars of transformers, huggingface_hub and datasets for one command and puts
    their process-wide switches back after: transformers' `disable_progress_bar()` also turns off huggingface_hub's
    (its state is the dict `huggingface_hub.utils.tqdm.progress_bar_states`, restored by clear + update), and
    datasets' `disable_progress_bars` / `are_progress_bars_disabled` / `enable_progress_bars` round-trip."""
    import importlib

    where = "alignkit/cli/__init__.py:quiet_progress"
    with guard("transformers", "the progress-bar switches moved", where):
        tf_logging = importlib.import_module("transformers.utils.logging")
        hub = importlib.import_module("huggingface_hub.utils.tqdm")
        ds = importlib.import_module("datasets.utils.tqdm")
        saved, tf_on, ds_off = dict(hub.progress_bar_states), tf_logging.is_progress_bar_enabled(), \
            ds.are_progress_bars_disabled()
    try:
        tf_logging.enable_progress_bar()
        hub.progress_bar_states.clear()
        hub.progress_bar_states.update({"_global": True})
        forced = hub.HF_HUB_DISABLE_PROGRESS_BARS is True  # the user's environment turns them off for good
        check(forced or not hub.are_progress_bars_disabled(), "huggingface_hub", "progress_bar_states is no longer "
              "the state are_progress_bars_disabled() reads (restoring it would not restore the bars)", where)
        tf_logging.disable_progress_bar()
        check(hub.are_progress_bars_disabled(), "transformers", "disable_progress_bar() no longer turns off "
              "huggingface_hub's progress bars (download / 'Writing model shards' bars under --quiet)", where)
        check(not tf_logging.is_progress_bar_enabled(), "transformers", "is_progress_bar_enabled() does not follow "
              "disable_progress_bar()", where)
        ds.enable_progress_bars()
        check(not ds.are_progress_bars_disabled() or ds.HF_DATASETS_DISABLE_PROGRESS_BARS is True, "datasets",
              "enable_progress_bars() / are_progress_bars_disabled() no longer round-trip", where)
        ds.disable_progress_bars()
        check(ds.are_progress_bars_disabled(), "datasets", "disable_progress_bars() no longer turns off datasets' "
              "bars (map bars under --quiet)", where)
    finally:
        (tf_logging.enable_progress_bar if tf_on else tf_logging.disable_progress_bar)()
        hub.progress_bar_states.clear()
        hub.progress_bar_states.update(saved)
        (ds.disable_progress_bars if ds_off else ds.enable_progress_bars)()


def test_a_zero3_partitioned_parameter_has_a_ds_id_and_empty_data():
    """DeepSpeed ZeRO-3 (a model partitioned at load under HfDeepSpeedConfig / zero.Init, or by the engine) leaves each
    parameter with a `ds_id` and an empty `.data` (free_param; the shard in `ds_tensor`): how `is_sharded` tells a
    base whose embedding cannot be read here, whose fingerprint is then read from its folder. Checked in DeepSpeed's
    source (a real partition needs a process group); a real ZeRO-3 load was compared by hand."""
    import inspect

    import pytest

    pytest.importorskip("deepspeed")
    where = "alignkit/adapters/base.py:is_sharded (base_fingerprint, sharded_fingerprint)"
    with guard("deepspeed", "deepspeed.runtime.zero.partition_parameters moved", where):
        from deepspeed.runtime.zero import partition_parameters as pp
    source = inspect.getsource(pp)  # free_param itself is wrapped (instrument_w_nvtx)
    check(callable(pp.free_param) and "param.data = torch.empty(0, dtype=param.dtype" in source, "deepspeed",
          "free_param no longer empties a partitioned parameter's .data", where)
    check("param.ds_id = " in source, "deepspeed", "ZeRO-3 parameters no longer get a ds_id", where)


def test_a_hub_name_resolves_to_its_cached_snapshot_offline(tiny_dir, hub_cache):
    """huggingface_hub's cache layout, as `hub_cache_snapshot` reads it for a ZeRO-3 base named by Hub id: with
    `models--org--name/refs/main` naming a commit and `snapshots/<commit>/` its files, `try_to_load_from_cache(name,
    "config.json")` gives that snapshot's file without the network (and None for a name not cached), and
    transformers' `from_pretrained(name)` reads the same snapshot (huggingface_hub's HF_HUB_CACHE) and sets
    `config.name_or_path` to the name."""
    where = "alignkit/models/hub_cache.py:hub_cache_snapshot (sharded_fingerprint)"
    snapshot = hub_cache("org/a-cached-model", tiny_dir("llama"))
    with guard("huggingface_hub", "try_to_load_from_cache moved or changed", where):
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache("org/a-cached-model", "config.json")
        missing = try_to_load_from_cache("org/not-cached", "config.json")
    check(got == str(snapshot / "config.json") and missing is None, "huggingface_hub",
          "the cache's refs/main -> snapshots/<commit>/ layout is no longer what try_to_load_from_cache reads", where,
          f"got {got!r}, {missing!r}")
    with guard("transformers", "from_pretrained no longer reads huggingface_hub's cache", where):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained("org/a-cached-model", local_files_only=True)
    check(config.name_or_path == "org/a-cached-model", "transformers",
          "from_pretrained(hub name) no longer sets config.name_or_path to the name", where, config.name_or_path)


def test_a_model_loaded_at_another_revision_records_none(tiny_dir, hub_cache, tmp_path):
    """What `hub_cache_snapshot` cannot tell: transformers' `from_pretrained(name, revision=r)` reads `refs/<r>`'s
    snapshot from the cache, and neither the model nor its config records r or its commit (config.name_or_path is
    the bare name; no `_commit_hash`), so the snapshot a ZeRO-3 base was loaded from is not known when the cache holds
    several (one `snapshots/<commit>/` per revision fetched): alignkit then takes no fingerprint rather than main's."""
    import json
    import shutil

    where = "alignkit/models/hub_cache.py:hub_cache_snapshot, cached_snapshots (sharded_fingerprint)"
    main = hub_cache("org/two-revisions", tiny_dir("llama"))
    other = main.parent / ("f" * 40)
    shutil.copytree(main, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.125  # tells the two snapshots apart
    (other / "config.json").write_text(json.dumps(cfg))
    (main.parents[1] / "refs" / "v1").write_text("f" * 40)
    with guard("transformers", "from_pretrained(name, revision=) no longer reads the cache offline", where):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained("org/two-revisions", revision="v1", local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained("org/two-revisions", revision="v1", local_files_only=True)
    check(config.rms_norm_eps == 0.125 and model.config.rms_norm_eps == 0.125, "transformers",
          "from_pretrained(name, revision='v1') did not read refs/v1's snapshot", where, str(config.rms_norm_eps))
    recorded = [k for k, v in {**vars(config), **vars(model.config)}.items() if "f" * 40 in str(v) or v == "v1"]
    check(config.name_or_path == "org/two-revisions" and not hasattr(config, "_commit_hash") and not recorded,
          "transformers", "a loaded model now records its revision: hub_cache_snapshot could read that snapshot "
          "instead of taking no fingerprint", where, f"{config.name_or_path!r}, {recorded}")
