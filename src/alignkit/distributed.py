"""Sharded training engines (FSDP2, DeepSpeed) chosen by `accelerate launch --config_file ...`.

`accelerate launch` with an FSDP or DeepSpeed config file starts one process per device and tells each,
through environment variables (ACCELERATE_USE_FSDP, FSDP_*; ACCELERATE_USE_DEEPSPEED), which engine to use.
On GPUs accelerate applies them. On a CPU-only machine accelerate 1.x silently drops FSDP: its state becomes
MULTI_CPU (gloo) and the FSDP plugin is only attached for GPU-like backends, so the run would be plain DDP
while its config says FSDP. `enable_sharding_on_cpu` attaches the plugin the environment asks for, so the
same `fully_shard` (FSDP2) code path runs on CPU processes with gloo: what the CPU tests exercise.

DeepSpeed (ZeRO-2 / ZeRO-3) on CPU processes: accelerate initialises DeepSpeed's communication (gloo on a
CPU, DeepSpeed's CPU accelerator) but then counts ONE process, because it found no GPU backend; the batch
size DeepSpeed is given would then be wrong. `deepspeed_on_cpu` corrects accelerate's process count from the
process group DeepSpeed started and re-derives the DeepSpeed config's "auto" values (what transformers
itself does for hyper-parameter searches). With `use_cpu=True` accelerate never starts DeepSpeed; that is
refused in one line instead of silently training with DDP.
"""

from __future__ import annotations

import atexit
import copy
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)


def exit_after_distributed_run(code: int) -> None:
    """End a process of a multi-process run (torchrun, `accelerate launch`) without Python's interpreter
    teardown, once everything it wrote is flushed. Returns at once when no process group is up.

    Why: a gloo collective's worker thread can still hold the last reference to a finished collective when
    the main thread returns; dropping it needs the GIL. If the main thread has begun finalising by then,
    CPython ends that thread inside a C++ destructor and the process aborts ("terminate called without an
    active exception", SIGABRT) after a run that succeeded, and torchrun reports the job as failed
    (torch 2.13, reproduced in tests/distributed/test_exit.py). Destroying the group does not help while
    DDP/accelerate objects still reference it. So: on success, wait until every rank is done (rank 0 may
    still be writing); destroy the group; run the atexit handlers (TensorBoard writers, logging) and flush
    the standard streams while the interpreter is whole; then leave with `os._exit(code)`."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to save
            pass
    os._exit(code)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_engine() -> str | None:
    """"fsdp" or "deepspeed" when `accelerate launch` asked for one (its environment variables), else None."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


# what `deepspeed.comm.init_distributed` reads from a launcher (torchrun, accelerate launch, deepspeed); without all of
# them, outside AzureML / SageMaker (whose variables it maps itself), it looks for MPI through mpi4py
DEEPSPEED_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
DEEPSPEED_CLOUD_ENV = ("AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV")


# what an MPI launcher (mpirun, accelerate launch --mpirun_hostfile) sets; accelerate reads the world size from them
MPI_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_process_count(world_size: int, owner: str) -> None:
    """ConfigError when the processes that will train are not those the launcher asked for (`world_size`: what
    this process's trainer counts). Two ways a run asked for N processes and trained otherwise, exit 0:
    - a launcher started N processes (torchrun / accelerate launch: WORLD_SIZE=N) and each trains ALONE (world
      size 1): TrainingArguments on CPU processes without use_cpu (train.use_cpu=false);
    - `accelerate launch --num_processes N` picked its simple launcher (for --cpu, or without --multi_gpu / a
      config file's distributed_type on a machine without GPUs), which starts ONE process: it sets MASTER_ADDR
      (only for N > 1) and ACCELERATE_USE_CPU, and no WORLD_SIZE / RANK, nor an MPI launcher's variables."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and world_size != launched:
        raise ConfigError(f"{owner}: the launcher started {launched} processes (WORLD_SIZE={launched}) but this one "
                          f"counts {world_size} (each process would run the whole training alone); on "
                          "CPU processes the training arguments need use_cpu=True: remove train.use_cpu=false "
                          "(alignkit sets use_cpu=true with gloo for CPU processes)")
    if ("ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
            and not any(k in os.environ for k in MPI_SIZE_ENV)):
        raise ConfigError(f"{owner}: accelerate launch was asked for several processes (--num_processes > 1) but "
                          "started ONE (its simple launcher, used for --cpu or without --multi_gpu / a config file's "
                          "distributed_type), so this run would train alone; use accelerate launch --config_file "
                          "configs/accelerate/ddp-cpu.yaml (CPU), --multi_gpu (GPUs) or torchrun --nproc_per_node N, "
                          "or --num_processes 1 for one process")


def deepspeed_cannot_start() -> bool:
    """True when DeepSpeed, asked for, would fail to start its communication when training begins: no launcher's
    environment (`DEEPSPEED_LAUNCH_ENV`), no cloud environment DeepSpeed maps itself, and mpi4py not installed."""
    return (not all(k in os.environ for k in DEEPSPEED_LAUNCH_ENV)
            and not any(k in os.environ for k in DEEPSPEED_CLOUD_ENV)
            and importlib.util.find_spec("mpi4py") is None)


def refuse_fsdp1_on_cpu() -> None:
    """ConfigError when `accelerate launch` asks for FSDP version 1 (FSDP_VERSION, "1" when its config names no
    fsdp_version) on a machine without CUDA: accelerate's FSDP1 stopped with "RuntimeError: There are currently no
    available devices found" (its plugin, with sync_module_states) or, without it, "Inconsistent compute device and
    `device_id`" when the model was prepared (unexpected errors); FSDP2 runs on CPU."""
    if requested_engine() == "fsdp" and not torch.cuda.is_available() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')} "
                          "(fsdp_version; 1 when the config names none), which needs a GPU, and this machine has "
                          "none; set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml): "
                          "alignkit runs FSDP2 on CPU processes")


def refuse_fsdp1_adapter(whole_model: bool, owner: str, *, online: bool = False) -> None:
    """ConfigError when `accelerate launch` asks for FSDP version 1 (FSDP_VERSION; "1" when the config names none) and
    the policy has an adapter (`whole_model` False: LoRA, ReFT, ReFT+LoRA), on any machine (CPU processes are refused
    FSDP1 anyway, `refuse_fsdp1_on_cpu`). alignkit gathers sharded weights only for FSDP2 (DTensor shards) and ZeRO-3
    (`full_parameters`); under FSDP1 the Trainer gathers a state dict that an adapter's save does not read
    (`save_adapter`: full finetuning only), so model/ and checkpoints would hold FSDP1's flattened per-process
    shards, and whether FSDP1 with use_orig_params: false trains only the adapter's weights was never run. Calls
    `refuse_fsdp1_on_cpu` first (its line wins on a machine without CUDA). `online` (the online loop): FSDP1 is
    refused with full finetuning too, as its model/ and checkpoints gather through `full_parameters` alone (it has no
    Trainer's FSDP1 state dict), which would save each process's flat shard."""
    refuse_fsdp1_on_cpu()
    if requested_engine() != "fsdp" or os.environ.get("FSDP_VERSION", "1") == "2":
        return
    if online:
        raise ConfigError(f"{owner}: the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')} "
                          "(fsdp_version; 1 when the config names none), which the online loop does not save under "
                          "(its model/ and checkpoints gather sharded weights under FSDP2 only, full finetuning and "
                          "adapters alike); set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp2.yaml)")
    if whole_model:
        return
    raise ConfigError(f"{owner}: the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')} "
                      "(fsdp_version; 1 when the config names none) with an adapter, which alignkit does not save or "
                      "check under FSDP1 (it gathers an adapter's sharded weights under FSDP2 and ZeRO-3 only); set "
                      "fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)")


def refuse_ignored_fsdp_settings(owner: str, activation_checkpointing: bool = False) -> None:
    """ConfigError when an accelerate FSDP config asks for what alignkit would not do, said before anything is written:
    - `fsdp_state_dict_type` other than FULL_STATE_DICT (FSDP_STATE_DICT_TYPE): alignkit's checkpoints and model/ are
      always full safetensors gathered on rank 0 (`full_parameters`), so SHARDED / LOCAL was ignored without a word
      (and rank 0 held the whole model where the config asked for per-process files); the variable is where the
      setting lives on CPU processes too (`accelerate launch`'s torchrun launcher writes it for an FSDP config with or
      without a GPU; `--cpu` writes no FSDP variable and starts one process, which check_process_count refuses: A31);
    - `fsdp_activation_checkpointing: true` with `activation_checkpointing` (train.activation_checkpointing): the
      Trainer refuses the pair, but alignkit applies its own checkpointing after turning the argument off, which
      hid that refusal: accelerate's checkpoint wrapper around alignkit's recomputed each layer twice;
    - `fsdp_offload_params: true` on a machine without CUDA: nothing to move, and torch's CPUOffloadPolicy pins memory,
      which needs a GPU (the model's preparation failed after the run folder was written)."""
    if requested_engine() != "fsdp":
        return
    kind = os.environ.get("FSDP_STATE_DICT_TYPE")
    if kind is not None and kind.strip().upper() not in ("FULL_STATE_DICT", "1"):  # StateDictType.FULL_STATE_DICT == 1
        raise ConfigError(f"{owner}: the accelerate config's fsdp_state_dict_type: {kind} would be ignored: alignkit "
                          "writes checkpoints and model/ as full safetensors gathered on rank 0 (loadable without "
                          "FSDP); set fsdp_state_dict_type: FULL_STATE_DICT (configs/accelerate/fsdp2.yaml)")
    if _flag("FSDP_OFFLOAD_PARAMS") and not torch.cuda.is_available():
        raise ConfigError(f"{owner}: the accelerate config's fsdp_offload_params: true on CPU processes: the "
                          "parameters are in CPU memory already, and the offload policy accelerate builds (torch's "
                          "CPUOffloadPolicy) pins memory, which needs a GPU: fully_shard stopped with \"Cannot access "
                          "accelerator device\" when the model was prepared, after the run folder was written; set "
                          "fsdp_offload_params: false (configs/accelerate/fsdp2.yaml)")
    if activation_checkpointing and _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError(f"{owner}: train.activation_checkpointing and the accelerate config's "
                          "fsdp_activation_checkpointing: true are both on, so each layer would be recomputed twice "
                          "(accelerate's checkpoint wrapper around alignkit's own checkpointing); keep one: remove "
                          "train.activation_checkpointing or set fsdp_activation_checkpointing: false")


def refuse_unmatched_wrap_classes(model: nn.Module, owner: str) -> None:
    """ConfigError, before anything is written, when an accelerate FSDP config's `fsdp_transformer_layer_cls_to_wrap`
    (FSDP_TRANSFORMER_CLS_TO_WRAP, split at commas as accelerate does) would not apply to `model`:
    - with `fsdp_auto_wrap_policy` other than TRANSFORMER_BASED_WRAP (NO_WRAP when not set), accelerate's plugin never
      reads it: the model was sharded as one unit (or by size), the named layers ignored without a word;
    - a name no module of `model` has: accelerate's `fsdp2_prepare_auto_wrap_policy` stopped with "Could not find the
      transformer layer class" when the model was prepared (offline: when training starts, after the run folder was
      written)."""
    given = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") if requested_engine() == "fsdp" else None
    if not given:
        return
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").upper()
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ConfigError(f"{owner}: the accelerate config's fsdp_transformer_layer_cls_to_wrap: {given} is read only "
                          f"with fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, and the policy is {policy}"
                          f"{' (the default when none is set)' if 'FSDP_AUTO_WRAP_POLICY' not in os.environ else ''}, "
                          "so it would be ignored; set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, or remove "
                          "fsdp_transformer_layer_cls_to_wrap")
    present = {type(m).__name__ for m in model.modules()}
    missing = [name for name in given.split(",") if name not in present]
    if missing:
        layers = [n for n in getattr(unwrap_parallel_base(model), "_no_split_modules", None) or [] if n in present]
        hint = f" (this model's layers: {', '.join(layers)})" if layers else ""
        raise ConfigError(f"{owner}: the accelerate config's fsdp_transformer_layer_cls_to_wrap names "
                          f"{', '.join(repr(n) for n in missing)}, a class no module of the model has, so accelerate "
                          f"would stop when the model is prepared, after the run folder is written; name the model's "
                          f"layer class{hint}, comma-separated without spaces, or remove the key (the model's "
                          "_no_split_modules are then wrapped)")


def unwrap_parallel_base(model: nn.Module) -> Any:
    """The innermost `PreTrainedModel`-like module of `model` (through peft / ReFT wrappers): the first module with
    `_no_split_modules`, else `model`."""
    return next((m for m in model.modules() if getattr(m, "_no_split_modules", None)), model)


def fsdp_activation_checkpointing() -> bool:
    """True when an accelerate FSDP launch asks for `fsdp_activation_checkpointing: true`
    (FSDP_ACTIVATION_CHECKPOINTING)."""
    return requested_engine() == "fsdp" and _flag("FSDP_ACTIVATION_CHECKPOINTING")


def take_over_activation_checkpointing(accelerator: Any, owner: str) -> bool:
    """Turn accelerate's FSDP activation checkpointing off before the model is prepared, so that the caller applies
    alignkit's own (transformers' per-layer checkpointing: the same recomputation in backward). Returns True when it
    did. Why: accelerate wraps each decoder layer in torch's `CheckpointWrapper`, whose parameter names carry
    `_checkpoint_wrapped_module.`; alignkit's gathered saving (`full_parameters` holds the FSDP units' state-dict
    hooks off, the wrapper's prefix-stripping one among them) wrote model/ and checkpoints under those names, which
    `from_pretrained` does not load (every layer silently re-initialised), and the offline trainers stopped at the
    first backward with torch's CheckpointError (tensors saved in forward and recomputation differ). ConfigError
    for `fsdp_activation_checkpointing_offload: true`, which alignkit's checkpointing would ignore."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or not getattr(plugin, "activation_checkpointing", False):
        return False
    if getattr(plugin, "activation_checkpointing_offload", False):
        raise ConfigError(f"{owner}: the accelerate config's fsdp_activation_checkpointing_offload: true would be "
                          "ignored: alignkit applies its own activation checkpointing (recomputed layers, nothing "
                          "offloaded) in place of accelerate's wrapper; set fsdp_activation_checkpointing_offload: "
                          "false")
    plugin.activation_checkpointing = False
    logger.info("fsdp_activation_checkpointing: alignkit's activation checkpointing applied in place of accelerate's "
                "checkpoint wrapper (parameter names stay the model's)")
    return True


def enable_sharding_on_cpu(accelerator: Any) -> bool:
    """Attach the FSDP plugin the launcher asked for when accelerate dropped it on CPU processes (see the
    module docstring). Returns True when it did. Call right after creating the `Accelerator`, before any
    `prepare`."""
    state = accelerator.state
    engine = requested_engine()
    if engine is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if engine == "deepspeed":
        raise RuntimeError("DeepSpeed was requested (accelerate config distributed_type: DEEPSPEED) but this "
                           "process runs with use_cpu / a CPU accelerator state, where accelerate skips DeepSpeed: "
                           "on CPU processes alignkit runs DeepSpeed for the offline trainers (sft, dpo, ...) only; "
                           "for the online loop use configs/accelerate/fsdp2.yaml")
    refuse_fsdp1_on_cpu()
    if getattr(state, "fsdp_plugin", None) is None:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
        state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP

    # every AcceleratorState() copies PartialState's fields again (accelerate 1.x), so both must say FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("FSDP%s on %d CPU process(es) (gloo): plugin attached from the launcher's environment",
                state.fsdp_plugin.fsdp_version, state.num_processes)
    return True


def deepspeed_on_cpu(args: Any) -> bool:
    """Make a DeepSpeed run on CPU processes count its processes (see the module docstring). Call with the
    `TrainingArguments` the Trainer will use, before it creates its `Accelerator`. Returns True when it
    corrected something. On GPUs, or without DeepSpeed, it changes nothing."""
    import torch.distributed as dist

    wants = bool(getattr(args, "deepspeed", None)) or requested_engine() == "deepspeed"
    if not wants or torch.cuda.is_available():
        return False
    if getattr(args, "use_cpu", False):
        raise ValueError("DeepSpeed was requested (train.deepspeed / accelerate config distributed_type: DEEPSPEED) "
                         "together with use_cpu=True, which makes accelerate skip DeepSpeed: leave use_cpu unset "
                         "(DeepSpeed runs on CPU processes by itself) or use configs/accelerate/fsdp2.yaml")

    state = PartialState()
    if not dist.is_initialized() or state.num_processes == dist.get_world_size():
        return False
    fields = dict(backend=dist.get_backend(), num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                  local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    PartialState._shared_state.update(fields)
    if AcceleratorState._shared_state:
        AcceleratorState._shared_state.update(fields)
    if getattr(args, "deepspeed", None):  # re-derive the "auto" batch sizes with the right process count
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
        args.hf_deepspeed_config.trainer_config_process(args)
        args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    logger.info("DeepSpeed on %d CPU process(es) (%s)", fields["num_processes"], fields["backend"])
    return True


def is_fsdp2(accelerator: Any) -> bool:
    state = accelerator.state
    return state.distributed_type == DistributedType.FSDP and getattr(state.fsdp_plugin, "fsdp_version", 1) == 2


def is_deepspeed(accelerator: Any) -> bool:
    return accelerator.state.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed run, else None."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when `model`'s parameters are ZeRO-3 partitions (DeepSpeed gathers each module's parameters only
    while its forward / backward runs)."""
    first = next(model.parameters(), None)  # ZeRO-3 partitions every parameter of a model it takes
    return first is not None and hasattr(first, "ds_id")


@contextmanager
def full_parameters(model: nn.Module, write_back: bool = False) -> Iterator[nn.Module]:
    """Inside, every sharded parameter of `model` (FSDP2 DTensor shards, DeepSpeed ZeRO-3 partitions) is a
    plain full tensor, so that ordinary saving code (`save_pretrained`, `save_adapter`, `state_dict()`)
    writes a normal safetensors folder. A collective: EVERY process must enter (each gathers its shards, in
    the same module order); only one needs to write. FSDP2's state-dict hooks (which would hand back the
    shards) are held off meanwhile; everything is put back on exit. Without sharded parameters it changes
    nothing (ZeRO-2 keeps whole parameters on every process). With `write_back`
    (FSDP2), what was loaded into the full tensors inside is copied back into each process's shards on a
    normal exit (rank 0's values; a collective too): how a checkpoint's plain files are resumed."""
    if is_zero3_partitioned(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model
        return
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    hooks: list[tuple[nn.Module, str, dict]] = []  # FSDP2's (load_)state_dict hooks, held off inside
    fulls: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(shard) -> (shard, full): tied weights stay tied
    try:
        for module in model.modules():
            owns = False
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    owns = True
                    if id(p) not in fulls:
                        fulls[id(p)] = (p, nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad))
                    module._parameters[name] = fulls[id(p)][1]
                    swapped.append((module, name, p))
            if type(module).__name__.startswith("FSDP") or owns:  # fully_shard's dynamic FSDP<Class> subclasses,
                #   and the modules whose parameters it shards (their load hook re-reads the shard)
                for attr in ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                             "_load_state_dict_post_hooks"):
                    hooks.append((module, attr, dict(getattr(module, attr))))
                    getattr(module, attr).clear()
        yield model
        if write_back:
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for shard, full in fulls.values():  # the same order on every process (module order)
                    local = distribute_tensor(full.detach(), shard.device_mesh, shard.placements).to_local()
                    shard.to_local().copy_(local)
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
        for module, attr, saved in hooks:
            getattr(module, attr).update(saved)


@contextmanager
def gathered_root(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the root FSDP2 unit's own parameters (embeddings, final norm, LM head; the decoder layers are
    units of their own) are gathered. Needed when a wrapper calls an inner module directly (peft's and
    ReFT's `generate` call the wrapped model, so the root's forward hooks never run). A collective; a no-op
    for a model that is not an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    # make `model` the root before anything runs (torch sets up roots lazily, at the first forward; a
    # nested unit called first would make itself a root)
    state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
    if state is not None and hasattr(state, "_lazy_init"):
        state._lazy_init()
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def shard_reference(ref_model: nn.Module, accelerator: Any) -> nn.Module:
    """The frozen reference, sharded by the engine the policy uses. Under DeepSpeed ZeRO-3: an inference
    engine of its own with the policy's ZeRO-3 settings (parameters partitioned over the processes, gathered
    module by module in its forwards); ZeRO-2 shards no parameters, so the reference stays whole there as the
    policy's parameters do. Under FSDP2: `fully_shard` on each
    decoder layer (the model's `_no_split_modules`) and then the root, over all processes, like the policy,
    so no process holds a whole copy; forwards all-gather layer by layer. Otherwise returned unchanged (under FSDP1,
    allowed for offline full finetuning alone, each process keeps a whole reference copy).
    Every process must then run the reference's forwards in step (the training loops do)."""
    if zero_stage(accelerator) == 3:
        return _zero3_reference(ref_model, accelerator)
    if not is_fsdp2(accelerator):
        return ref_model
    refuse_meta_reference(ref_model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plugin = accelerator.state.fsdp_plugin
    names = set(getattr(ref_model, "_no_split_modules", None) or [])
    if plugin.transformer_cls_names_to_wrap:
        names |= set(plugin.transformer_cls_names_to_wrap)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    layers = [m for m in ref_model.modules() if type(m).__name__ in names]
    for m in layers:
        fully_shard(m, mesh=mesh, reshard_after_forward=True)
    # the root (embeddings, final norm, LM head) stays gathered after its forward: the chunked LM head of
    # alignkit.losses reads lm_head.weight after the backbone's forward, outside FSDP's own forward
    fully_shard(ref_model, mesh=mesh, reshard_after_forward=False)
    logger.info("reference sharded with FSDP2 over %d process(es): %d layer unit(s) + root",
                accelerator.num_processes, len(layers))
    return ref_model


def refuse_meta_reference(ref_model: nn.Module) -> None:
    """ConfigError when the frozen reference holds parameters on the meta device on this process: `fully_shard` would
    shard them as they are, with no broadcast from rank 0 (accelerate broadcasts the policy's weights only). Under
    `fsdp_cpu_ram_efficient_loading`, transformers leaves the weights a checkpoint lacks unmaterialised on every
    process but local rank 0 when the model is loaded after the process group started."""
    meta = [n for n, p in ref_model.named_parameters() if p.is_meta]
    if meta:
        raise ConfigError(f"the frozen reference copy has {len(meta)} parameter(s) on the meta device on this process "
                          f"(e.g. {meta[0]}): weights missing from the checkpoint, left unloaded here (accelerate's "
                          "fsdp_cpu_ram_efficient_loading loads them on rank 0 only); load the model before the "
                          "process group starts (as the alignkit commands do), or set fsdp_cpu_ram_efficient_loading: "
                          "false")


def _zero3_reference(ref_model: nn.Module, accelerator: Any) -> nn.Module:
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = dict(cfg.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "steps_per_print": 10**9,
           **{k: cfg[k] for k in ("bf16", "fp16") if k in cfg and cfg[k].get("enabled") is True}}
    engine, *_ = deepspeed.initialize(model=ref_model, config=cfg)
    engine.eval()
    logger.info("reference partitioned with DeepSpeed ZeRO-3 over %d process(es)", accelerator.num_processes)
    return engine


def full_optimizer_state(model: nn.Module, optimizer: Any) -> dict:
    """FSDP2: the optimizer's full (unsharded) state keyed by parameter names, on the CPU of process 0
    (`torch.distributed.checkpoint.state_dict`; a collective, every process calls it; the others get an
    empty dict). Saved with `torch.save` (tensors and numbers only) and read back with `weights_only=True`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: Any, state: dict) -> None:
    """FSDP2: load a `full_optimizer_state` dict (every process passes the whole dict) into the sharded
    optimizer; each process keeps its shard. Optimizers without per-parameter state (plain SGD) get their
    groups' settings only (torch's loader needs per-parameter state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    if any(t.dim() > 0 for st in state.get("state", {}).values() for t in st.values() if isinstance(t, torch.Tensor)):
        set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))
    else:
        for group, saved_group in zip(inner.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def is_sharded(accelerator: Any) -> bool:
    return accelerator.state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every process's picklable `obj`, in rank order (`torch.distributed.all_gather_object`: a collective)."""
    import torch.distributed as dist

    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, obj)
    return rows


def storage_key(p: torch.Tensor) -> int:
    """What identifies a parameter's storage, so tied / shared tensors are counted once: its `data_ptr()`, or for
    an FSDP2 DTensor (whose data_ptr is not its own) its id."""
    from torch.distributed.tensor import DTensor

    return id(p) if isinstance(p, DTensor) else p.data_ptr()


def copy_full_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into parameter `p` (no grad); an FSDP2 DTensor keeps its shard of it (`distribute_tensor`:
    a collective, call it in the same parameter order on every process)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(p.device, p.dtype)
    with torch.no_grad():
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full)


__all__ = ["DEEPSPEED_LAUNCH_ENV", "MPI_SIZE_ENV", "check_process_count", "copy_full_into", "deepspeed_cannot_start",
           "deepspeed_on_cpu", "enable_sharding_on_cpu", "fsdp_activation_checkpointing", "full_optimizer_state",
           "full_parameters", "gather_objects", "gathered_root", "is_deepspeed", "is_fsdp2", "is_sharded",
           "load_full_optimizer_state", "refuse_fsdp1_adapter",
           "refuse_fsdp1_on_cpu", "refuse_ignored_fsdp_settings", "refuse_meta_reference",
           "refuse_unmatched_wrap_classes", "unwrap_parallel_base", "requested_engine", "shard_reference",
           "storage_key", "take_over_activation_checkpointing", "zero_stage"]
