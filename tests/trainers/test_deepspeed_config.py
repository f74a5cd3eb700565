"""A DeepSpeed config (train.deepspeed, or an accelerate config's deepspeed_config_file) whose settings would silently
differ from the run's: refused in one line when the trainer is built, before anything is written."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import TrainingArguments

from alignkit.settings import ConfigError
from alignkit.trainers.checks import deepspeed_replacements, refuse_deepspeed_mismatches

# what DeepSpeed-Chat's and many cluster templates' ds_config.json carry
CHAT_STYLE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}}}


def fake_trainer(config: dict, args: TrainingArguments, mismatches=()):
    ds = SimpleNamespace(config=config, mismatches=list(mismatches))
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(hf_ds_config=ds))
    return SimpleNamespace(is_deepspeed_enabled=True, accelerator=SimpleNamespace(state=state), args=args)


@pytest.fixture
def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], optim="sgd", lr_scheduler_type="cosine")


def test_optimizer_and_scheduler_sections_name_what_they_replace(args):
    said = deepspeed_replacements(CHAT_STYLE, args)
    assert len(said) == 2
    assert "\"optimizer\" section (type AdamW)" in said[0] and "train.optim=sgd" in said[0]
    assert "weight-decay groups" in said[0]
    assert "\"scheduler\" section (type WarmupDecayLR)" in said[1] and "train.lr_scheduler_type=cosine" in said[1]
    assert deepspeed_replacements({k: v for k, v in CHAT_STYLE.items() if k != "scheduler"}, args) == [said[0]]
    assert deepspeed_replacements({"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"}, args) == []


def test_a_deepspeed_json_with_its_own_optimizer_is_refused_in_one_line_naming_the_file(args, monkeypatch):
    """Before: transformers built DeepSpeed's AdamW with weight decay on every parameter and its WarmupDecayLR in
    place of train.optim / lr_scheduler_type, without a word (it compares only lr, betas, eps, weight_decay)."""
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "/cluster/ds_config.json")
    with pytest.raises(ConfigError) as e:
        refuse_deepspeed_mismatches(fake_trainer(CHAT_STYLE, args))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("the accelerate config's deepspeed_config_file (/cluster/ds_config.json): ")
    assert "train.optim=sgd" in message and "train.lr_scheduler_type=cosine" in message
    assert "remove the section(s)" in message


def test_an_accelerate_config_without_a_file_is_named_as_the_source(args, monkeypatch):
    """Before: a refusal for an accelerate config's deepspeed_config keys (no deepspeed_config_file) named "the
    DeepSpeed config", which the user never wrote."""
    from alignkit.trainers.checks import deepspeed_config_source

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert deepspeed_config_source(args) == "the accelerate config's deepspeed_config"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert deepspeed_config_source(args) == "the DeepSpeed config"


def test_train_deepspeed_is_named_as_the_source(args):
    args.deepspeed = "ds.json"
    with pytest.raises(ConfigError, match=r"^train\.deepspeed \(ds\.json\): its \"optimizer\" section"):
        refuse_deepspeed_mismatches(fake_trainer({"optimizer": {"type": "Adam"}}, args))


def test_value_mismatches_come_first_and_a_config_of_auto_values_passes(args):
    with pytest.raises(ConfigError, match="ds gradient_clipping=1.0 vs train.max_grad_norm=0.5"):
        refuse_deepspeed_mismatches(fake_trainer(CHAT_STYLE, args, ["- ds gradient_clipping=1.0 vs hf max_grad_norm=0.5"]))
    refuse_deepspeed_mismatches(fake_trainer({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}, args))
    refuse_deepspeed_mismatches(SimpleNamespace(is_deepspeed_enabled=False, accelerator=None, args=args))


def test_a_precision_mismatch_from_accelerates_mixed_precision_says_where_it_came_from(args, monkeypatch):
    """An accelerate config `mixed_precision: bf16` (ACCELERATE_MIXED_PRECISION) with train.bf16 unset: accelerate
    writes bf16.enabled=true into a DeepSpeed config that names none, so "set it to 'auto'" alone was no fix."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError) as e:
        refuse_deepspeed_mismatches(fake_trainer({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, args,
                                                 ["- ds bf16.enabled=True vs hf bf16|bf16_full_eval=False"]))
    message = str(e.value)
    assert "\n" not in message
    assert ("ds bf16.enabled=True vs train.bf16|bf16_full_eval=False (accelerate's mixed_precision: bf16 turned it on)"
            in message)
    assert message.endswith("set train.bf16=true, or mixed_precision: 'no' in the accelerate config (or "
                            "--mixed_precision no)")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a JSON's own bf16.enabled: only the general advice
    with pytest.raises(ConfigError) as e:
        refuse_deepspeed_mismatches(fake_trainer({}, args, ["- ds bf16.enabled=True vs hf bf16|bf16_full_eval=False"]))
    assert "mixed_precision" not in str(e.value)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_an_offloaded_optimizer_on_cpu_processes_is_refused_before_the_cpu_adam_build(args, device):
    """Before: accelerate swapped the optimizer for DeepSpeedCPUAdam, whose C++ build started with the first step
    (minutes, after the run folder was written; a killed build left a lock that hung the next run), to move optimizer
    state to the CPU where it already was; and train.optim=sgd silently became Adam (tests/compat A19)."""
    from alignkit.trainers.checks import refuse_optimizer_offload

    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": device}}}
    with pytest.raises(ConfigError) as e:
        refuse_optimizer_offload(config, args, cuda=False)
    message = str(e.value)
    assert "\n" not in message and "zero_optimization.offload_optimizer.device is " + device in message
    if device == "cpu":  # nothing to move on CPU processes
        assert "on CPU processes" in message and "set it to none" in message
    else:  # nvme offload is real on a CPU too, but sgd would become Adam
        assert "replace train.optim=sgd with DeepSpeedCPUAdam" in message
    # through the trainer's check, as the accelerate config's deepspeed_config becomes (ZeRO-3 too)
    with pytest.raises(ConfigError, match="offload_optimizer.device is cpu"):
        refuse_deepspeed_mismatches(fake_trainer({"zero_optimization": {"stage": 3, "offload_optimizer":
                                                                        {"device": "cpu"}}}, args))


def test_an_offloaded_optimizer_on_gpus_is_refused_only_for_an_optimizer_accelerate_would_replace(args):
    from alignkit.trainers.checks import refuse_optimizer_offload

    config = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match=r"would replace train\.optim=sgd with DeepSpeedCPUAdam \(Adam\)"):
        refuse_optimizer_offload(config, args, cuda=True)
    for optim in ("adamw_torch", "adamw_torch_fused", "adagrad"):  # kept: AdamW mode / CPU Adagrad
        refuse_optimizer_offload(config, TrainingArguments(output_dir="x", report_to=[], optim=optim), cuda=True)
    refuse_optimizer_offload({**config, "zero_force_ds_cpu_optimizer": False}, args, cuda=True)  # no swap at all
    for off in ({"device": "none"}, {}, {"device": "auto"}):
        refuse_optimizer_offload({"zero_optimization": {"stage": 2, "offload_optimizer": off}}, args, cuda=False)
    refuse_optimizer_offload({"zero_optimization": {"stage": 2}}, args, cuda=False)
    # a JSON's "offload_optimizer": null (DeepSpeed: no offload) stopped the check with an AttributeError
    refuse_optimizer_offload({"zero_optimization": {"stage": 2, "offload_optimizer": None}}, args, cuda=False)
    refuse_deepspeed_mismatches(fake_trainer({"zero_optimization": {"stage": 2, "offload_optimizer": None,
                                                                    "offload_param": None}}, args))


def refusal(config, where="train.deepspeed (ds.json)", aio=True):
    from alignkit.trainers.zero_checks import refuse_unapplied_offload

    with pytest.raises(ConfigError) as e:
        refuse_unapplied_offload(config, where, aio_usable=lambda: aio)
    assert "\n" not in str(e.value) and str(e.value).startswith(where + ": ")
    return str(e.value)


def zero(stage, **sections):
    return {"zero_optimization": {"stage": stage, **{k: v for k, v in sections.items()}}}


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_parameter_offload_below_zero3_is_refused_as_ignored(stage, device):
    """Before: DeepSpeed's stage 0-2 engines never read offload_param (row A21): the parameters stayed on the device
    that the config said they would leave, without a word (a run sized for offload then ran out of memory, or not)."""
    message = refusal(zero(stage, offload_param={"device": device, "nvme_path": "/tmp"}))
    assert f"zero_optimization.offload_param.device is {device} under zero_optimization.stage {stage}" in message
    assert "so it would be ignored" in message and "offload_param_device: none" in message


def test_optimizer_offload_under_zero0_and_nvme_under_zero12_are_refused():
    """Before: under stage 0 no optimizer read offload_optimizer (accelerate still swapped in DeepSpeedCPUAdam); under
    stage 1/2, device nvme was CPU offload, nvme_path never read (row A21)."""
    message = refusal(zero(0, offload_optimizer={"device": "cpu"}))
    assert "offload_optimizer.device is cpu under zero_optimization.stage 0 (ZeRO off)" in message
    for stage in (1, 2):
        message = refusal(zero(stage, offload_optimizer={"device": "nvme", "nvme_path": "/tmp"}))
        assert f"offload_optimizer.device is nvme under zero_optimization.stage {stage}, whose optimizer has no NVMe " \
               "swapping" in message and f"set the device to cpu (what stage {stage} does)" in message


@pytest.mark.parametrize("section", ["offload_param", "offload_optimizer"])
def test_nvme_offload_under_zero3_needs_a_writable_folder_and_async_io(section, tmp_path):
    """Before: a missing nvme_path (accelerate writes "none" for it), a file in its place, or DeepSpeed's async_io op
    that cannot be built (no libaio) failed only when training started, after the run folder was written."""
    for path in (None, "none", ""):
        message = refusal(zero(3, **{section: {"device": "nvme", "nvme_path": path}}))
        assert f"zero_optimization.{section}.nvme_path is not set" in message
        assert f"accelerate config: {section}_nvme_path" in message
    a_file = tmp_path / "swap"
    a_file.write_text("")
    message = refusal(zero(3, **{section: {"device": "nvme", "nvme_path": str(a_file)}}))
    assert f"nvme_path={str(a_file)!r} is not a folder" in message
    message = refusal(zero(3, **{section: {"device": "nvme", "nvme_path": str(tmp_path / "new")}}), aio=False)
    assert "async_io op, which cannot be built here" in message and "libaio" in message
    from alignkit.trainers.zero_checks import refuse_unapplied_offload

    refuse_unapplied_offload(zero(3, **{section: {"device": "nvme", "nvme_path": str(tmp_path / "new")}}), "x",
                             aio_usable=lambda: True)  # a folder it can create, and the op: accepted


def test_offloads_deepspeed_applies_pass_and_the_trainer_check_runs_them(args):
    from alignkit.trainers.zero_checks import refuse_unapplied_offload

    never = lambda: pytest.fail("async_io asked without an NVMe offload")  # noqa: E731
    for config in (zero(3, offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"}),
                   zero(2, offload_optimizer={"device": "cpu"}), zero(1, offload_optimizer={"device": "cpu"}),
                   zero(2, offload_param={"device": "none"}), zero(2, offload_param={}), zero(2),
                   {}):
        refuse_unapplied_offload(config, "x", aio_usable=never)
    args.optim = "adamw_torch"  # past refuse_optimizer_offload's own checks
    with pytest.raises(ConfigError, match=r"^train\.deepspeed \(ds\.json\): zero_optimization\.offload_param\.device "
                                          r"is cpu under zero_optimization\.stage 2"):
        args.deepspeed = "ds.json"
        refuse_deepspeed_mismatches(fake_trainer(zero(2, offload_param={"device": "cpu"}), args))


@pytest.mark.parametrize("section, said", [
    ({"stage": 2, "offload_parm": {"device": "cpu"}},
     "zero_optimization.offload_parm is not a key DeepSpeed knows (did you mean 'offload_param'?)"),
    ({"stage": 3, "stage3_gather_16bit_weight_on_model_save": True},
     "zero_optimization.stage3_gather_16bit_weight_on_model_save is not a key DeepSpeed knows (did you mean "
     "'stage3_gather_16bit_weights_on_model_save'?)"),
    ({"stage": 3, "offload_param": {"device": "cpu", "pin_memry": False}},
     "zero_optimization.offload_param.pin_memry is not a key DeepSpeed knows (did you mean 'pin_memory'?)"),
    ({"stage": 3, "offload_param": {"device": "gpu"}},
     "zero_optimization.offload_param.device is rejected by DeepSpeed: Input should be 'none', 'cpu' or 'nvme'"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
     "zero_optimization is rejected by DeepSpeed: Partial offloading only supported for ZeRO Stage 3"),
    ({"stage": "auto"}, "zero_optimization.stage is \"auto\", which nothing fills"),
])
def test_a_zero_section_deepspeed_would_reject_or_run_as_stage_0_is_refused_when_the_trainer_is_built(section, said):
    """Before: DeepSpeed validates zero_optimization only in deepspeed.initialize, once training started (after the run
    folder was written), and drops "auto" values: stage "auto", which transformers does not fill, ran with ZeRO off."""
    pytest.importorskip("deepspeed")
    message = refusal({"zero_optimization": section})
    assert message.startswith(f"train.deepspeed (ds.json): {said}")
    if "auto" not in said:
        assert message.endswith("DeepSpeed would refuse it only once it starts (after the run folder is written); fix "
                                "or remove it")
    else:
        assert "so ZeRO would be off (stage 0); set zero_optimization.stage to 1, 2 or 3" in message


def test_a_valid_zero_section_with_auto_values_passes():
    from alignkit.trainers.zero_checks import refuse_unapplied_offload

    refuse_unapplied_offload({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "overlap_comm": True,
                                                    "stage3_prefetch_bucket_size": "auto",
                                                    "stage3_gather_16bit_weights_on_model_save": True,
                                                    "offload_param": {"device": "cpu", "pin_memory": True}}}, "x")
