"""An accelerate FSDP config (its FSDP_* variables, as `accelerate launch --config_file` sets them) whose keys alignkit
would override without a word: refused in one line when the trainer is built, before anything is written."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

from alignkit.distributed import refuse_ignored_fsdp_settings, take_over_activation_checkpointing
from alignkit.settings import ConfigError
from alignkit.trainers import SFTTrainer

from .conftest import fast_args

FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.fixture
def fsdp_env(monkeypatch):
    for k, v in FSDP2.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FSDP_STATE_DICT_TYPE", raising=False)
    monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING", raising=False)
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("kind", ["SHARDED_STATE_DICT", "LOCAL_STATE_DICT", "3"])
def test_a_state_dict_type_other_than_full_is_refused(kind, fsdp_env):
    fsdp_env.setenv("FSDP_STATE_DICT_TYPE", kind)
    with pytest.raises(ConfigError) as e:
        refuse_ignored_fsdp_settings("OnlineTrainer")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"OnlineTrainer: the accelerate config's fsdp_state_dict_type: {kind} ")
    assert "set fsdp_state_dict_type: FULL_STATE_DICT" in message


@pytest.mark.parametrize("kind", ["FULL_STATE_DICT", "full_state_dict", "1", None])
def test_full_or_unset_state_dict_type_passes(kind, fsdp_env):
    if kind is not None:
        fsdp_env.setenv("FSDP_STATE_DICT_TYPE", kind)
    refuse_ignored_fsdp_settings("SFTTrainer", activation_checkpointing=True)  # FSDP's own checkpointing unset


def test_no_fsdp_launch_reads_no_fsdp_variable(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    refuse_ignored_fsdp_settings("SFTTrainer", activation_checkpointing=True)


def test_both_activation_checkpointings_are_refused(fsdp_env):
    fsdp_env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    refuse_ignored_fsdp_settings("SFTTrainer", activation_checkpointing=False)  # FSDP's alone: alignkit applies its own
    with pytest.raises(ConfigError, match=r"^SFTTrainer: train\.activation_checkpointing and the accelerate config's "
                                          r"fsdp_activation_checkpointing: true are both on.*keep one"):
        refuse_ignored_fsdp_settings("SFTTrainer", activation_checkpointing=True)


def lora_sft(make_model, features, collators, tmp_path, **args) -> SFTTrainer:
    """An SFTTrainer on a LoRA tiny model and the SFT features, with `fast_args(tmp_path, **args)`."""
    return SFTTrainer(make_model("lora"), fast_args(tmp_path, **args), train_dataset=features["sft"],
                      data_collator=collators["sft"])


def test_an_alignkit_trainer_refuses_at_construction(fsdp_env, make_model, features, collators, tmp_path):
    """Before: the Trainer's own refusal of the pair never fired (alignkit turns activation_checkpointing off before
    building it and applies its own), and a SHARDED_STATE_DICT config trained and saved full files on rank 0."""
    fsdp_env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ConfigError, match="are both on"):
        lora_sft(make_model, features, collators, tmp_path, activation_checkpointing=True)
    fsdp_env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    fsdp_env.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    with pytest.raises(ConfigError, match="fsdp_state_dict_type: SHARDED_STATE_DICT would be ignored"):
        lora_sft(make_model, features, collators, tmp_path)
    assert not (tmp_path / "out").exists()


def test_fsdp_activation_checkpointing_alone_is_alignkits_own(fsdp_env, make_model, features, collators, tmp_path):
    """Before: accelerate wrapped each layer in its CheckpointWrapper (parameter names `..._checkpoint_wrapped_module.`
    in model/ and checkpoints, which from_pretrained does not load; the offline step stopped with CheckpointError).
    Now the trainer applies transformers' per-layer checkpointing itself (tests/distributed/test_fsdp.py: 2 ranks)."""
    fsdp_env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    model = make_model("lora")
    SFTTrainer(model, fast_args(tmp_path), train_dataset=features["sft"], data_collator=collators["sft"])
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert not any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())


def test_accelerates_wrapper_is_turned_off_and_its_offload_refused():
    plugin = SimpleNamespace(activation_checkpointing=True, activation_checkpointing_offload=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    assert take_over_activation_checkpointing(accelerator, "GRPOTrainer") is True
    assert plugin.activation_checkpointing is False  # accelerate's prepare reads it (tests/compat A20)
    assert take_over_activation_checkpointing(accelerator, "GRPOTrainer") is False
    assert take_over_activation_checkpointing(SimpleNamespace(state=SimpleNamespace()), "GRPOTrainer") is False
    plugin = SimpleNamespace(activation_checkpointing=True, activation_checkpointing_offload=True)
    with pytest.raises(ConfigError) as e:
        take_over_activation_checkpointing(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), "GRPOTrainer")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("GRPOTrainer: the accelerate config's fsdp_activation_checkpointing_offload: true "
                                   "would be ignored")


def test_a_reference_with_meta_weights_is_refused_before_it_is_sharded():
    """Before: `fully_shard` sharded the copy as it was on this process; a weight left on the meta device (transformers
    under fsdp_cpu_ram_efficient_loading, model loaded after the process group started, off rank 0) has no value and
    nothing broadcasts the reference's from rank 0 (accelerate does the policy's only)."""
    import torch
    from accelerate.utils import DistributedType
    from torch import nn

    from alignkit.distributed import shard_reference

    ref = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ref[1].weight = nn.Parameter(torch.empty(2, 2, device="meta"))
    state = SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    with pytest.raises(ConfigError) as e:
        shard_reference(ref, SimpleNamespace(state=state))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("the frozen reference copy has 1 parameter(s) on the meta device on this process "
                                   "(e.g. 1.weight)")
    assert "set fsdp_cpu_ram_efficient_loading: false" in str(e.value)


def test_layer_classes_to_wrap_are_refused_when_unread_or_not_in_the_model(fsdp_env, make_model):
    """Before: fsdp_transformer_layer_cls_to_wrap under fsdp_auto_wrap_policy NO_WRAP (accelerate's default) or
    SIZE_BASED_WRAP was never read (the model sharded as one unit or by size, without a word), and a class the model
    does not have stopped accelerate's prepare ("Could not find the transformer layer class") when training started,
    after the run folder was written (tests/compat A22)."""
    from alignkit.distributed import refuse_unmatched_wrap_classes

    model = make_model("lora")  # a peft-wrapped tiny llama: its layers are LlamaDecoderLayer
    fsdp_env.delenv("FSDP_AUTO_WRAP_POLICY", raising=False)
    fsdp_env.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    with pytest.raises(ConfigError) as e:
        refuse_unmatched_wrap_classes(model, "SFTTrainer")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("SFTTrainer: the accelerate config's fsdp_transformer_layer_cls_to_wrap: "
                                   "LlamaDecoderLayer is read only with fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
                                   "and the policy is NO_WRAP (the default when none is set), so it would be ignored")
    fsdp_env.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    with pytest.raises(ConfigError, match=r"and the policy is SIZE_BASED_WRAP, so it would be ignored"):
        refuse_unmatched_wrap_classes(model, "SFTTrainer")
    fsdp_env.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    refuse_unmatched_wrap_classes(model, "SFTTrainer")  # the model's layer class: accepted
    for given, missing in (("GPT2Block", "'GPT2Block'"), ("LlamaDecoderLayer, LlamaMLP", "' LlamaMLP'")):
        fsdp_env.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", given)
        with pytest.raises(ConfigError) as e:
            refuse_unmatched_wrap_classes(model, "GRPOTrainer")
        assert "\n" not in str(e.value)
        assert str(e.value).startswith(f"GRPOTrainer: the accelerate config's fsdp_transformer_layer_cls_to_wrap names "
                                       f"{missing}, a class no module of the model has")
        assert "(this model's layers: LlamaDecoderLayer)" in str(e.value)
    fsdp_env.delenv("ACCELERATE_USE_FSDP")  # no FSDP launch: the variable is not read
    refuse_unmatched_wrap_classes(model, "SFTTrainer")


def test_an_unmatched_layer_class_is_refused_when_the_trainer_is_built(fsdp_env, make_model, features, collators,
                                                                       tmp_path):
    fsdp_env.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    fsdp_env.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen2DecoderLayer")
    with pytest.raises(ConfigError, match="names 'Qwen2DecoderLayer', a class no module of the model has"):
        lora_sft(make_model, features, collators, tmp_path)
    assert not (tmp_path / "out").exists()


def test_parameter_offload_on_cpu_processes_is_refused(fsdp_env, monkeypatch):
    """Before: fsdp_offload_params: true on CPU processes reached torch's fully_shard with CPUOffloadPolicy, which
    pins memory: "Cannot access accelerator device when none is available" when the model was prepared, after the run
    folder was written (tests/compat A23). On GPUs it is left to accelerate."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fsdp_env.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError) as e:
        refuse_ignored_fsdp_settings("GRPOTrainer")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("GRPOTrainer: the accelerate config's fsdp_offload_params: true on CPU processes")
    assert str(e.value).endswith("set fsdp_offload_params: false (configs/accelerate/fsdp2.yaml)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refuse_ignored_fsdp_settings("GRPOTrainer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fsdp_env.setenv("FSDP_OFFLOAD_PARAMS", "false")
    refuse_ignored_fsdp_settings("GRPOTrainer")


@pytest.mark.parametrize("version", ["1", None])
def test_fsdp1_with_an_adapter_is_refused_on_a_gpu_machine_too(version, fsdp_env, make_model, features, collators,
                                                              tmp_path):
    """Before: on a machine with CUDA an FSDP1 launch (fsdp_version: 1, or none: accelerate's default) with a LoRA /
    ReFT policy was accepted, though alignkit gathers an adapter's sharded weights for model/ and checkpoints only
    under FSDP2 and ZeRO-3 (under FSDP1 the Trainer's gathered state dict is read for full finetuning only); now one
    line, before the Trainer's Accelerator and before anything is written. Full finetuning and FSDP2 pass."""
    import torch

    from alignkit.distributed import refuse_fsdp1_adapter

    fsdp_env.setattr(torch.cuda, "is_available", lambda: True)  # past refuse_fsdp1_on_cpu: a GPU machine's path
    if version is None:
        fsdp_env.delenv("FSDP_VERSION")
    else:
        fsdp_env.setenv("FSDP_VERSION", version)
    with pytest.raises(ConfigError) as e:
        lora_sft(make_model, features, collators, tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith("SFTTrainer: the accelerate config asks for FSDP version 1 ")
    assert "with an adapter" in message and "set fsdp_version: 2" in message
    assert not (tmp_path / "out").exists()
    refuse_fsdp1_adapter(True, "SFTTrainer")  # full finetuning: the Trainer's gathered state dict is what is saved
    fsdp_env.setenv("FSDP_VERSION", "2")
    refuse_fsdp1_adapter(False, "SFTTrainer")  # FSDP2: alignkit's own gathering
    fsdp_env.delenv("ACCELERATE_USE_FSDP")
    fsdp_env.setenv("FSDP_VERSION", "1")
    refuse_fsdp1_adapter(False, "SFTTrainer")  # no FSDP launch: the variable is not read
