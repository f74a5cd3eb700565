"""accelerate's FSDP2 activation checkpointing and DeepSpeed optimizer offload, as alignkit relies on them
(rows A19, A20, A24, A25, A27, A28, A30, A31 of docs/architecture.md's table)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn


def test_accelerates_fsdp2_checkpoint_wrapper_is_gated_by_the_plugin_flag_and_renames_parameters(monkeypatch):
    """alignkit turns `fsdp_plugin.activation_checkpointing` off before `prepare` and applies its own checkpointing
    (distributed.py:take_over_activation_checkpointing): accelerate must read the flag at prepare time, and the
    wrapper it would apply must be the one whose names carry `_checkpoint_wrapped_module.`."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    source = inspect.getsource(Accelerator._prepare_fsdp2)
    assert "self.state.fsdp_plugin.activation_checkpointing" in source and "fsdp2_apply_ac(" in source
    from accelerate.utils import fsdp_utils

    assert "checkpoint_wrapper(layer" in inspect.getsource(fsdp_utils.fsdp2_apply_ac)
    model = nn.Sequential(nn.Linear(2, 2))
    model[0] = checkpoint_wrapper(model[0])
    assert [n for n, _ in model.named_parameters()] == ["0._checkpoint_wrapped_module.weight",
                                                        "0._checkpoint_wrapped_module.bias"]
    # the plugin reads both settings from the launcher's environment (`accelerate launch --config_file`)
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "true")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert plugin.activation_checkpointing is True and plugin.activation_checkpointing_offload is True


def test_an_offloaded_optimizer_is_swapped_for_deepspeeds_cpu_optimizer_whatever_it_was(monkeypatch):
    """accelerate hands DeepSpeed `map_pytorch_optim_to_deepspeed(optimizer)` when zero_optimization.offload_optimizer
    names a device and zero_force_ds_cpu_optimizer is not false: AdamW -> DeepSpeedCPUAdam in AdamW mode, Adagrad ->
    DeepSpeedCPUAdagrad, SGD (any other) -> DeepSpeedCPUAdam in Adam mode (trainers/checks.py:refuse_optimizer_offload).
    DeepSpeed's classes are replaced by stand-ins here: the real ones compile a C++ extension when built."""
    pytest.importorskip("deepspeed")
    import deepspeed.ops.adagrad
    import deepspeed.ops.adam
    from accelerate import Accelerator
    from accelerate.utils.deepspeed import map_pytorch_optim_to_deepspeed

    source = inspect.getsource(Accelerator._prepare_deepspeed)
    assert '.get("offload_optimizer", {}).get(' in source and 'get("zero_force_ds_cpu_optimizer", True)' in source
    assert "optimizer = map_pytorch_optim_to_deepspeed(optimizer)" in source

    class Stand:
        def __init__(self, groups, **kw):
            self.kw = kw

    class CPUAdam(Stand):
        pass

    class CPUAdagrad(Stand):
        pass

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", CPUAdam)
    monkeypatch.setattr(deepspeed.ops.adagrad, "DeepSpeedCPUAdagrad", CPUAdagrad)
    params = [nn.Parameter(torch.zeros(2))]
    sgd = map_pytorch_optim_to_deepspeed(torch.optim.SGD(params, lr=0.1))
    assert type(sgd) is CPUAdam and sgd.kw["adamw_mode"] is False  # SGD became Adam
    adamw = map_pytorch_optim_to_deepspeed(torch.optim.AdamW(params, lr=0.1))
    assert type(adamw) is CPUAdam and adamw.kw["adamw_mode"] is True
    assert type(map_pytorch_optim_to_deepspeed(torch.optim.Adagrad(params, lr=0.1))) is CPUAdagrad


def test_deepspeed_reads_offload_param_only_under_zero3_and_nvme_only_there():
    """What trainers/zero_checks.py:refuse_unapplied_offload refuses as ignored or unusable (row A21): the ZeRO
    stage 1/2 optimizer takes no parameter-offload config and counts any optimizer offload device but none as CPU
    offload (no NVMe swapping); ZeRO is off (no ZeRO optimizer reads either section) at stage 0; stage 3 takes both
    and swaps to NVMe under nvme_path with the async_io op; accelerate writes nvme_path "none" when its config names
    no path, and passes offload_param through whatever the stage."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime import config as ds_config, engine
    from deepspeed.runtime.swap_tensor import partitioned_optimizer_swapper, partitioned_param_swapper
    from deepspeed.runtime.zero import stage_1_and_2, stage3

    assert "offload_param_config" not in inspect.signature(stage_1_and_2.DeepSpeedZeroOptimizer).parameters
    assert {"offload_param_config", "offload_optimizer_config"} <= set(
        inspect.signature(stage3.DeepSpeedZeroOptimizer_Stage3).parameters)
    source = inspect.getsource(stage_1_and_2)
    assert not [word for word in ("nvme_path", "swap", "AsyncIOBuilder") if word in source]  # no NVMe swapping
    assert ("if offload_optimizer_config is not None and offload_optimizer_config.device != OffloadDeviceEnum.none:\n"
            "            self.cpu_offload = True") in source
    assert "self.zero_enabled = self.zero_optimization_stage > 0" in inspect.getsource(ds_config.DeepSpeedConfig)
    check = inspect.getsource(engine.DeepSpeedEngine._do_optimizer_sanity_check)
    assert "zero_enabled = self.zero_optimization()" in check and "return ZERO_OPTIMIZATION" in check
    assert "os.path.join(offload_optimizer_config.nvme_path, 'zero_stage_3')" in inspect.getsource(stage3)
    assert "self.swap_config.nvme_path" in inspect.getsource(partitioned_param_swapper)
    for module in (partitioned_param_swapper, partitioned_optimizer_swapper):
        assert "AsyncIOBuilder().load(" in inspect.getsource(module)
    zero = DeepSpeedPlugin(zero_stage=2, offload_param_device="cpu", offload_optimizer_device="nvme"
                           ).deepspeed_config["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "nvme_path": None}
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "none"}


def test_accelerate_reads_layer_classes_to_wrap_only_under_the_transformer_policy(monkeypatch):
    """What distributed.py:refuse_unmatched_wrap_classes relies on (row A22): accelerate's FSDP plugin reads
    FSDP_TRANSFORMER_CLS_TO_WRAP (split at commas, not stripped) only when FSDP_AUTO_WRAP_POLICY is
    TRANSFORMER_BASED_WRAP, NO_WRAP when not set; its FSDP2 wrap policy raises for a class the model does not have."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Linear, ReLU")
    monkeypatch.delenv("FSDP_AUTO_WRAP_POLICY", raising=False)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert plugin.auto_wrap_policy is None and plugin.transformer_cls_names_to_wrap is None
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    assert FullyShardedDataParallelPlugin(fsdp_version=2).transformer_cls_names_to_wrap is None
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert plugin.transformer_cls_names_to_wrap == ["Linear", " ReLU"]
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="Could not find the transformer layer class  ReLU in the model"):
        fsdp2_prepare_auto_wrap_policy(plugin, model)
    plugin.transformer_cls_names_to_wrap = ["Linear"]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy(model[0]) is True and policy(model[1]) is False


def test_accelerates_fsdp2_parameter_offload_pins_memory(monkeypatch):
    """What distributed.py:refuse_ignored_fsdp_settings relies on to refuse fsdp_offload_params on CPU processes (row
    A23): accelerate's plugin turns FSDP_OFFLOAD_PARAMS=true into torch's CPUOffloadPolicy with pin_memory on (and hands
    it to fully_shard), torch's FSDP2 pins the offloaded shards, and pinning needs an accelerator."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils import fsdp_utils
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory is True
    assert '"offload_policy": fsdp2_plugin.cpu_offload' in inspect.getsource(fsdp_utils)
    assert ".pin_memory()" in inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="Cannot access accelerator device when none is available"):
            torch.zeros(2).pin_memory()


def test_deepspeed_validates_the_zero_section_with_pydantic_and_drops_auto_values():
    """What trainers/zero_checks.py:refuse_invalid_zero_section relies on (row A24): DeepSpeed's `DeepSpeedZeroConfig`
    (pydantic, extra keys forbidden, built by `DeepSpeedConfig` in `deepspeed.initialize`) rejects an unknown key and
    an unknown device with a ValidationError whose `errors()` name the key's location; its non-strict models drop
    "auto" values, so stage "auto" is stage 0 (ZeRO off); transformers fills no zero_optimization.stage."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    assert "get_zero_config(param_dict)" in inspect.getsource(DeepSpeedConfig)
    with pytest.raises(ValidationError) as e:
        DeepSpeedZeroConfig(stage=2, offload_parm={"device": "cpu"})
    assert e.value.errors()[0]["type"] == "extra_forbidden" and e.value.errors()[0]["loc"] == ("offload_parm",)
    with pytest.raises(ValidationError) as e:
        DeepSpeedZeroConfig(stage=3, offload_param={"device": "gpu"})
    assert e.value.errors()[0]["loc"] == ("offload_param", "device")
    assert int(DeepSpeedZeroConfig(stage="auto").stage) == 0
    assert DeepSpeedZeroConfig(stage=3, offload_param={"device": "auto"}).offload_param.device == "none"
    nested = DeepSpeedZeroConfig.model_fields["offload_param"].annotation.__args__  # Optional[<its config model>]
    assert any("pin_memory" in getattr(a, "model_fields", {}) for a in nested)
    assert '"zero_optimization.stage"' not in inspect.getsource(HfTrainerDeepSpeedConfig)


def test_pad_across_processes_pads_an_empty_tensor_with_the_pad_index(monkeypatch):
    """What online/grpo.py:GRPOTrainer.entropy_keep relies on (row A25): a process's zero-weight filler pass sends no
    entropies, a (0,) tensor, and accelerate's `pad_across_processes` pads it along dim 0 to the largest process's
    size with `pad_index` (-1e9, dropped after the gather), so the collectives still match and the filler adds none.
    Two processes are faked through the size gather accelerate makes inside it."""
    import accelerate.utils.operations as ops

    monkeypatch.setattr(ops, "gather", lambda t: torch.tensor([[0], [3]]))  # this process 0 values, the other 3
    out = ops.pad_across_processes(torch.empty(0), dim=0, pad_index=-1e9)
    assert out.tolist() == [-1e9] * 3 and out.dtype == torch.float32
    monkeypatch.setattr(ops, "gather", lambda t: torch.tensor([[2], [3]]))
    assert ops.pad_across_processes(torch.tensor([0.5, 0.25]), dim=0, pad_index=-1e9).tolist() == [0.5, 0.25, -1e9]


def test_fsdp_state_dict_type_reaches_the_plugin_through_its_environment_variable(monkeypatch):
    """A27: `accelerate launch` writes an FSDP config's `fsdp_state_dict_type` into FSDP_STATE_DICT_TYPE as its name
    (`prepare_multi_gpu_env`: str of the value), and `FullyShardedDataParallelPlugin` reads it from there (FULL /
    SHARDED / LOCAL_STATE_DICT; torch's `StateDictType.FULL_STATE_DICT` is 1): alignkit's
    refuse_ignored_fsdp_settings reads the same variable and refuses anything but FULL_STATE_DICT (or 1), since it
    always writes full safetensors gathered on rank 0."""
    from accelerate.utils import FullyShardedDataParallelPlugin, launch
    from torch.distributed.fsdp import StateDictType

    where = "alignkit/distributed.py:refuse_ignored_fsdp_settings"
    source = inspect.getsource(launch.prepare_multi_gpu_env)
    assert 'current_env["FSDP_STATE_DICT_TYPE"] = str(args.fsdp_state_dict_type)' in source, (
        f"accelerate: the launcher no longer writes fsdp_state_dict_type into FSDP_STATE_DICT_TYPE ({where})")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for name in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        monkeypatch.setenv("FSDP_STATE_DICT_TYPE", name)
        got = FullyShardedDataParallelPlugin().state_dict_type
        assert got == StateDictType[name], (
            f"accelerate: FullyShardedDataParallelPlugin no longer reads FSDP_STATE_DICT_TYPE={name} ({where}): {got}")
    assert StateDictType.FULL_STATE_DICT.value == 1, f"torch: StateDictType.FULL_STATE_DICT is no longer 1 ({where})"


def test_deepspeed_says_whether_its_async_io_op_is_prebuilt_or_buildable():
    """A28: DeepSpeed's `git_version_info.installed_ops` holds an "async_io" flag (prebuilt), and
    `get_accelerator().create_op_builder("AsyncIOBuilder")` gives an instance of
    `deepspeed.ops.op_builder.AsyncIOBuilder` (the class stage 3's NVMe swappers load) whose
    `is_compatible(verbose=False)` says, as a bool, whether it can be built here: alignkit's async_io_usable asks
    both before an NVMe offload under ZeRO-3 is let through (loading the op is not tried: without libaio it may hang
    in the JIT build)."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import AsyncIOBuilder

    where = "alignkit/trainers/zero_checks.py:async_io_usable"
    assert isinstance(installed_ops.get("async_io"), bool), (
        f"deepspeed: git_version_info.installed_ops no longer holds an async_io flag ({where}): {installed_ops}")
    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    assert isinstance(builder, AsyncIOBuilder), (
        f"deepspeed: create_op_builder('AsyncIOBuilder') is no longer the AsyncIOBuilder stage 3 loads ({where}): "
        f"{type(builder)}")
    assert isinstance(builder.is_compatible(verbose=False), bool), (
        f"deepspeed: AsyncIOBuilder.is_compatible(verbose=False) no longer answers a bool ({where})")


@pytest.mark.parametrize("cpu", [False, True])
def test_accelerate_launch_routes_an_fsdp_config_through_its_torchrun_launcher_without_a_gpu(cpu, tmp_path,
                                                                                           monkeypatch):
    """A31: `accelerate launch --config_file <distributed_type: FSDP>` picks its launcher from the config and the flags
    only, never from the devices: without --cpu it is `multi_gpu_launcher` (torchrun, one process per
    num_processes) on a machine without a GPU as well, whose `prepare_multi_gpu_env` writes ACCELERATE_USE_FSDP and
    FSDP_STATE_DICT_TYPE from the config's fsdp_state_dict_type (so alignkit's refuse_ignored_fsdp_settings sees the
    setting on CPU processes, where accelerate's state is MULTI_CPU); with --cpu it is `simple_launcher`, which
    writes neither (FSDP dropped): ONE process with MASTER_ADDR and no WORLD_SIZE, which check_process_count refuses
    (tests/cli/test_distributed.py)."""
    from accelerate.commands import launch as cmd
    from accelerate.utils import launch

    where = "alignkit/distributed.py:refuse_ignored_fsdp_settings / check_process_count"
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n"
                      "num_machines: 1\nmachine_rank: 0\ngpu_ids: all\nmixed_precision: 'no'\n"
                      "fsdp_config:\n  fsdp_version: 2\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    chosen = []
    monkeypatch.setattr(cmd, "multi_gpu_launcher", lambda args: chosen.append(("torchrun", args)))
    monkeypatch.setattr(cmd, "simple_launcher", lambda args: chosen.append(("simple", args)))
    argv = [*(["--cpu"] if cpu else []), "--config_file", str(config), "--main_process_port", "0", "train.py"]
    cmd.launch_command(cmd.launch_command_parser().parse_args(argv))
    assert [c[0] for c in chosen] == ["simple" if cpu else "torchrun"], (
        f"accelerate: an FSDP config {'with' if cpu else 'without'} --cpu went to {[c[0] for c in chosen]} ({where})")
    args = chosen[0][1]
    if cpu:
        _, env = launch.prepare_simple_launcher_cmd_env(args)
        assert "ACCELERATE_USE_FSDP" not in env and "WORLD_SIZE" not in env and env["ACCELERATE_USE_CPU"] == "True"
        assert env["MASTER_ADDR"] == "127.0.0.1", (
            f"accelerate: --cpu with 2 processes no longer sets MASTER_ADDR ({where})")
        return
    monkeypatch.setattr(launch, "is_port_in_use", lambda port: False)
    env = launch.prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2" and args.nproc_per_node == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT", (
        f"accelerate: the torchrun launcher no longer passes the config's fsdp_state_dict_type on ({where})")


@pytest.mark.parametrize("rows, batch, drop_last", [(10, 2, False), (10, 2, True), (9, 2, False), (12, 2, False),
                                                    (7, 3, True)])
def test_each_process_gets_its_share_of_the_batches_as_planned_steps_counts_it(rows, batch, drop_last):
    """A30: accelerate's BatchSamplerShard (a prepared map-style dataloader, split_batches off, even_batches on) gives
    each of 2 processes ceil(batches / 2) batches (floor(batches / 2) with drop_last), batches = ceil(rows / batch)
    (floor with drop_last): trainers/checks.py:planned_steps counts an epoch-based run's optimizer steps so (the
    Trainer's schedule and warm-up read that length)."""
    import math

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    batches = rows // batch if drop_last else math.ceil(rows / batch)
    share = batches // 2 if drop_last else math.ceil(batches / 2)
    for rank in (0, 1):
        shard = BatchSamplerShard(BatchSampler(SequentialSampler(range(rows)), batch, drop_last), num_processes=2,
                                  process_index=rank, split_batches=False, even_batches=True)
        assert len(shard) == share == len(list(shard))
