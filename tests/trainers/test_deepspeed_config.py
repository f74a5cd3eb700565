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
