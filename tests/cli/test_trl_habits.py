"""A TRL user's habits on the command line: per-objective defaults (shown in --help), short runs that still
write metrics, TRL-style --flags, and a local dataset folder as data.path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.settings import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("command, lr", [("sft", 2e-5), ("dpo", 1e-6), ("kto", 1e-6), ("rm", 1e-4)])
def test_train_defaults_per_objective(command, lr):
    # TRL 1.9's SFTConfig / DPOConfig / KTOConfig / RewardConfig learning rates, logging_steps 10
    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    cfg = load_config(None, base, command=command)
    assert cfg.train == {"learning_rate": lr, "logging_steps": 10}
    cfg = load_config(None, base + ["train.learning_rate=0.5"], command=command)
    assert cfg.train["learning_rate"] == 0.5 and cfg.train["logging_steps"] == 10


@pytest.mark.parametrize("command, lr", [("online-dpo", 5e-7), ("grpo", 1e-6), ("rloo", 1e-6), ("ppo", 3e-6)])
def test_online_defaults(command, lr):
    from alignkit.settings import CONFIG_CLASSES

    cfg = load_config(None, ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl",
                             "annotator.kind=function", "annotator.function=alignkit.rewards:digit_fraction"],
                      command=command)
    assert cfg.train["learning_rate"] == lr  # TRL 1.9's OnlineDPOConfig / GRPOConfig / RLOOConfig / PPOConfig
    assert cfg.trainer_config().learning_rate == lr


def test_dpo_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"train\.learning_rate +float = 1e-06\n", out) and re.search(r"train\.logging_steps .* = 10\n", out)
    assert re.search(r"method\.beta +float = 0\.1\n", out)
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"train\.learning_rate +float = 2e-05\n", out)
    assert re.search(r"data\.loss_on +one of .* = 'all_assistant'\n", out)


SHORT = """command: sft
model: {path: "tiny:llama"}
data: {path: "bundled:data/hh_rlhf_sample.jsonl", max_length: 64, max_prompt_length: 32}
train: {max_steps: 3, per_device_train_batch_size: 2, save_strategy: "no"}
"""


def test_short_run_writes_metrics(tmp_path):
    # 3 steps with the default logging_steps=10: the last step is logged anyway, and a plot is written
    out = tmp_path / "run"
    (tmp_path / "short.yaml").write_text(SHORT)
    assert main(["-q", "sft", "--config", str(tmp_path / "short.yaml"), f"output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 3 and "loss" in r for r in rows), rows
    assert list((out / "plots").glob("*.png"))


def test_trl_flags_become_overrides():
    from alignkit.cli.flags import translate

    known = {"--config", "-c", "--dry-run", "-h", "--help"}
    argv = ["--config", "x.yaml", "--learning_rate", "1e-4", "--per_device_train_batch_size=2",
            "--gradient_checkpointing", "--beta", "0.2", "method.loss_type=ipo", "--model_name_or_path", "m/",
            "--use_peft", "--lora_r", "8", "--max_length", "-1", "--dry-run"]
    assert translate(argv, "dpo", known) == [
        "--config", "x.yaml", "train.learning_rate=1e-4", "train.per_device_train_batch_size=2",
        "train.gradient_checkpointing=true", "method.beta=0.2", "method.loss_type=ipo", "model.path=m/",
        "adapter.kind=lora", "adapter.lora.r=8", "data.max_length=-1", "--dry-run"]
    # online commands: the same train keys
    assert translate(["--learning_rate", "1e-5", "--num_samples", "8"], "grpo", known) == [
        "train.learning_rate=1e-5", "sampling.num_samples=8"]


def test_unknown_flag_is_one_line_exit_2(capsys):
    assert main(["dpo", "--config", str(CONFIGS / "dpo-tiny.yaml"), "--learnin_rate", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "--learnin_rate: not a setting of alignkit dpo" in err and "did you mean --learning_rate" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command,config,flags,says", [
    ("sft", "sft-tiny.yaml", ["--num-processes", "2"],
     ["--num_processes: accelerate launch's flag", "`accelerate launch --num_processes 2 -m alignkit sft ...`"]),
    ("dpo", "dpo-tiny.yaml", ["--nproc_per_node=2"], ["`torchrun --nproc_per_node 2 -m alignkit dpo ...`"]),
    ("kto", "kto-tiny.yaml", ["--multi_gpu", "--dry-run"], ["`accelerate launch --multi_gpu -m alignkit kto ...`"]),
    ("rm", "rm-tiny.yaml", ["--mixed_precision", "bf16"], ["alignkit's mixed precision is train.bf16=true"]),
    ("grpo", "grpo-tiny.yaml", ["--mixed_precision", "bf16"], ["runs no mixed precision", "model.dtype=bfloat16"]),
])
def test_a_launchers_flag_names_the_launcher(command, config, flags, says, capsys):
    """`alignkit sft --num-processes 2` was 'not a setting of alignkit sft (TRL-style flags name a key of train, ...)'
    with no word of where the process count goes: alignkit starts no processes, the launcher does."""
    assert main([command, "--config", str(CONFIGS / config), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for s in says:
        assert s in err, err


def test_padding_free_only_where_supported():
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", "train.padding_free=true"]
    assert load_config(None, base + ["train.group_by_length=true"], command="dpo").train["padding_free"]
    assert load_config(None, base, command="rm").train["padding_free"]
    with pytest.raises(ConfigError, match=r"train\.padding_free: not available for kto"):
        load_config(None, base, command="kto")


def test_share_prompt_only_for_rm_and_dpo_and_passed_to_the_trainer():
    from alignkit.cli.train import batching_kwargs
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", "train.share_prompt=true"]
    for command in ("rm", "dpo"):
        train = load_config(None, base, command=command).train
        assert batching_kwargs(command, train) == {"share_prompt": True}
    with pytest.raises(ConfigError, match=r"train\.share_prompt: not available for sft"):
        load_config(None, base, command="sft")
    with pytest.raises(ConfigError, match=r"two different layouts"):
        load_config(None, base + ["train.padding_free=true"], command="dpo")


def test_local_dataset_folder_with_trl_flags_and_batching(tmp_path, monkeypatch):
    # a dataset repository folder as datasets.load_dataset takes it: split files named train / test
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = tmp_path / "my-dataset"
    repo.mkdir()
    chat = lambda i: {"messages": [{"role": "user", "content": f"Say {i}"},  # noqa: E731
                                   {"role": "assistant", "content": f"{i} {i} {i}"}]}
    (repo / "train.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(6)))
    (repo / "test.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(6, 8)))
    from alignkit.data import load_records

    train = load_records(str(repo), "sft")  # split "train" by default
    test = load_records(str(repo), "sft", split="test")
    assert (len(train), len(test)) == (6, 2) and train[0].completion[0]["content"] == "0 0 0"
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text("command: sft\nmodel: {path: 'tiny:llama'}\n")
    rc = main(["-q", "sft", "--config", str(tmp_path / "c.yaml"), "--dataset_name", str(repo), "--output_dir", str(out),
               "--max_steps", "2", "--per_device_train_batch_size", "3", "--learning_rate", "1e-3", "--packing",
               "--group_by_length", "--save_strategy", "no"])
    assert rc == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["path"] == str(repo) and saved["train"]["padding_free"] and saved["train"]["group_by_length"]
    assert saved["train"]["learning_rate"] == 1e-3 and saved["train"]["per_device_train_batch_size"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 and "loss" in r for r in rows)


@pytest.mark.parametrize("key, says", [
    ("f_divergence_type=js_divergence", "method.loss_type=fdpo_js"),
    ("f_divergence_type=forward_kl", "with loss_type sigmoid; TRL 1.16 applies it to hinge, ipo, robust, exo_pair, "
                                     "discopop and sigmoid_norm too: those have no f-divergence form here"),
    ("f_divergence_type=reverse_kl", "is DPO itself (method.loss_type=sigmoid); remove it"),
    ("f_alpha_divergence_coef=0.3", "method.f_alpha=0.7 (1 - 0.3) with method.loss_type=fdpo_alpha"),
    ("f_alpha_divergence_coef=0.8", "method.f_alpha=0.2 (1 - 0.8)")])
def test_trls_f_divergence_keys_name_the_loss_types(key, says):
    """TRL's DPOConfig sets f-DPO with f_divergence_type; here they are loss types: one line that says which. TRL 1.16's
    alpha_divergence coefficient a is 1 - method.f_alpha (see test_trls_alpha_divergence_is_one_minus_f_alpha): the
    line used to say "use method.f_alpha", and f_alpha=0.3 trained TRL's a=0.7."""
    from alignkit.settings import ConfigError

    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^method.{name}: unknown key here \({name} is TRL's name\); alignkit: "
                                          rf".*{re.escape(says)}"):
        load_config(None, ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", f"method.{key}"],
                    command="dpo")


def test_trls_alpha_divergence_is_one_minus_f_alpha():
    """TRL 1.16's DPOTrainer, f_divergence_type alpha_divergence, coefficient a (dpo_trainer.py, written out here in
    plain floats): score(rho) = (exp((a - 1) rho) - 1) / (a - 1), loss = -log sigmoid(beta (score(rho_w) -
    score(rho_l))). alignkit's fdpo_alpha with f_alpha = 1 - a gives the same loss; with f_alpha = a it does not."""
    import math

    import torch

    from alignkit.losses import PreferenceParams
    from alignkit.losses.preference import PreferenceBatch, fdpo_alpha_loss

    a, beta, rw, rl = 0.3, 0.1, 0.4, -0.2  # log-ratios: policy 0.4 above the reference on chosen, 0.2 below on rejected
    score = lambda rho: (math.exp((a - 1) * rho) - 1) / (a - 1)  # noqa: E731
    trl = -math.log(1 / (1 + math.exp(-beta * (score(rw) - score(rl)))))
    batch = PreferenceBatch(torch.tensor([rw], dtype=torch.float64), torch.tensor([rl], dtype=torch.float64),
                            torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    ours = fdpo_alpha_loss(batch, PreferenceParams(beta=beta, f_alpha=1 - a)).losses.item()
    assert ours == pytest.approx(trl, abs=1e-12)
    assert fdpo_alpha_loss(batch, PreferenceParams(beta=beta, f_alpha=a)).losses.item() != pytest.approx(trl, abs=1e-6)


@pytest.mark.parametrize("command, key, says", [
    ("sft", "train.max_length=2048", "data.max_length"),
    ("sft", "train.completion_only_loss=true", "data.loss_on"),
    ("sft", "train.packing=true", "train.padding_free"),
    ("dpo", "method.rpo_alpha=0.5", "method.loss_type=[sigmoid, sft] with method.loss_weights=[1, <rpo_alpha>]"),
    ("dpo", "method.precompute_ref_log_probs=true", "method.reference=precomputed"),
    ("kto", "method.precompute_ref_log_probs=true", "kto has none: its KL pairs depend on how batches are drawn"),
    ("dpo", "method.sync_ref_model=true", "method.ref_sync: {alpha: <ref_model_mixup_alpha>, steps:"),
    ("grpo", "method.ref_model_sync_steps=8", "online-dpo, grpo, rloo and ppo with full finetuning"),
    ("dpo", "model.torch_dtype=bfloat16", "model.dtype"),
    ("grpo", "method.num_generations=8", "sampling.num_samples"),
    ("grpo", "method.beta=0.04", "method.kl_coef"),
    ("grpo", "method.epsilon=0.3", "method.clip_eps"),
    ("grpo", "method.loss_type=dapo", "method.aggregation"),
    ("grpo", "method.loss_type=cispo", "for TRL's loss_type cispo, method.cispo_max=<TRL's epsilon_high> with "
                                       "method.aggregation=token_sum"),
    # TRL 1.16's loss types without an equivalent: each says which, and why, in its own words (was: the generic list)
    ("grpo", "method.loss_type=sapo", "for TRL's loss_type sapo, alignkit has no equivalent (TRL's SAPO gates"),
    ("grpo", "method.loss_type=luspo", "for TRL's loss_type luspo, method.aggregation=sequence_sum with "
                                       "method.importance_sampling=sequence"),
    ("rloo", "method.loss_type=vespo", "for TRL's loss_type vespo, alignkit has no equivalent (TRL's VESPO weights"),
    ("grpo", "method.sapo_temperature_neg=1.05", "a parameter of TRL's loss_type sapo, which has none here"),
    ("grpo", "method.entropy_target=0.2", "alignkit has no equivalent (TRL's adaptive entropy control, Skywork-OR1"),
    ("rloo", "method.use_adaptive_entropy=true", "method.entropy_coef is a fixed coefficient; remove it"),
    ("grpo", "method.epsilon_high=5.0", "method.clip_eps_high (with TRL's loss_type cispo: method.cispo_max)"),
    ("grpo", "method.scale_rewards=false", "method.scale_by_std"),
    ("grpo", "method.missing_eos_penalty=1.0", "alignkit has no equivalent"),
    # TRL 1.16's sampling and loss keys without an equivalent: the lines say why (what the loss scores)
    ("grpo", "sampling.min_p=0.1", "alignkit has no equivalent (samples come from the policy at sampling.temperature"),
    ("grpo", "sampling.repetition_penalty=1.1", "pinned to 1: a penalised sample is not drawn from the policy"),
    ("grpo", "method.delta=4.0", "method.dual_clip (TRL's min(ratio, delta) before the min bounds"),
    ("grpo", "method.importance_sampling_level=sequence", "method.importance_sampling (token or sequence: GSPO's"),
    ("rloo", "method.loss_type=dr_grpo", "for TRL's loss_type dr_grpo, method.aggregation=max_length_mean (sequences "
                                         "x sampling.max_new_tokens"),
    ("rloo", "method.normalize_advantages=true", "rloo's leave-one-out advantages are not rescaled per batch"),
    ("grpo", "method.vllm_importance_sampling_correction=true", "pi_old is the trainer's own log-probs"),
    ("rloo", "method.use_vllm=true", "method.generation_backend=vllm"),
    ("online-dpo", "train.beta=0.2", "method.beta for dpo, kto and online-dpo")])
def test_trls_config_names_say_what_alignkit_has_instead(command, key, says):
    """A TRL config key alignkit spells otherwise (or lacks) was refused as 'unknown key' with the list of valid ones,
    naming nothing a TRL user could map it to; now one line saying it is TRL's name and alignkit's equivalent."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    if command in ("grpo", "rloo", "online-dpo"):
        base.append("annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}")
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(name)}: unknown key here \({name.split('.')[1]} is TRL's "
                                          rf"name\); alignkit: .*{re.escape(says)}") as e:
        load_config(None, [*base, key], command=command)
    assert "\n" not in str(e.value) and "Valid keys" not in str(e.value)


def test_trl_flags_alignkit_spells_otherwise_say_what_it_has():
    from alignkit.cli.flags import translate
    from alignkit.settings import ConfigError

    with pytest.raises(ConfigError, match=r"^--num_generations: not a setting of alignkit grpo \(num_generations is "
                                          r"TRL's name\); alignkit: sampling.num_samples"):
        translate(["--num_generations", "8"], "grpo", set())
    with pytest.raises(ConfigError, match=r"^--f_alpha_divergence_coef: .*alignkit: method.f_alpha=0.75 \(1 - 0.25\)"):
        translate(["--f_alpha_divergence_coef=0.25"], "dpo", set())
    # the names alignkit shares with TRL still resolve
    assert translate(["--beta", "0.2", "--max_length", "512"], "dpo", set()) == ["method.beta=0.2",
                                                                                   "data.max_length=512"]


@pytest.mark.parametrize("command", ["dpo", "online-dpo"])
@pytest.mark.parametrize("key, reader", [("cpo_alpha=0.5", "cpo"), ("f_alpha=0.3", "fdpo_alpha"),
                                         ("orpo_lambda=0.2", "orpo"), ("discopop_tau=0.1", "discopop")])
def test_a_loss_parameter_no_chosen_loss_reads_is_refused(command, key, reader):
    """Each of these is read by one loss alone: set with loss_type sigmoid it used to be accepted and ignored."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    if command == "online-dpo":
        base.append("annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}")
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"method.{name}: only loss_type {reader} reads it, and loss_type is "
                                          r"\['sigmoid'\], so it would be ignored"):
        load_config(None, [*base, f"method.{key}"], command=command)
    load_config(None, [*base, f"method.{key}", f"method.loss_type=[sigmoid, {reader}]"], command=command)


@pytest.mark.parametrize("command", ["dpo", "online-dpo"])
@pytest.mark.parametrize("loss", ["ipo", "hinge", "nca_pair", "apo_zero", "orpo", "slic", "discopop"])
def test_label_smoothing_beside_a_loss_that_never_reads_it_is_refused(command, loss):
    """method.label_smoothing=0.1 with loss_type ipo (or hinge, nca_pair, ...) was accepted and ignored: those losses
    have no smoothing term, so the run trained plain IPO while config.yaml said 0.1."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    if command == "online-dpo":
        base.append("annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}")
    with pytest.raises(ConfigError, match=rf"method.label_smoothing: only loss_type sigmoid / robust / .* reads it, "
                                          rf"and loss_type is \['{loss}'\], so it would be ignored"):
        load_config(None, [*base, "method.label_smoothing=0.1", f"method.loss_type={loss}"], command=command)
    # a combination with a loss that smooths reads it; every smoothing loss reads it alone
    load_config(None, [*base, "method.label_smoothing=0.1", f"method.loss_type=[{loss}, sigmoid]"], command=command)
    for reader in ("sigmoid", "robust", "exo_pair", "simpo", "cpo", "fdpo_js", "fdpo_forward_kl", "fdpo_alpha"):
        load_config(None, [*base, "method.label_smoothing=0.1", f"method.loss_type={reader}"], command=command)


def test_beta_with_orpo_names_orpo_lambda():
    """TRL's ORPOConfig.beta is ORPO's lambda; here that is method.orpo_lambda and ORPO never reads method.beta, so
    'method.beta=0.2 method.loss_type=orpo' trained with lambda 0.1 while config.yaml said beta 0.2."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", "method.loss_type=orpo"]
    with pytest.raises(ConfigError, match=r"method.beta: loss_type orpo does not read it .* set "
                                          r"method.orpo_lambda=0.2 instead"):
        load_config(None, [*base, "method.beta=0.2"], command="dpo")
    cfg = load_config(None, [*base, "method.orpo_lambda=0.2"], command="dpo")
    assert cfg.method.orpo_lambda == 0.2
    load_config(None, [*base, "method.beta=0.2", "method.loss_type=[orpo, sigmoid]"], command="dpo")


def test_reward_keys_of_the_other_loss_are_refused():
    """rm-tiny.yaml with method.ranked=true trained the K-wise loss with its center_rewards_coefficient 0.01 ignored;
    method.l2_coefficient without method.ranked was ignored by the pair loss. Each is one line now."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    with pytest.raises(ConfigError, match=r"method.center_rewards_coefficient: 0.01 is read only by the Bradley-Terry "
                                          r"pair loss, and method.ranked is true"):
        load_config(None, [*base, "method.ranked=true", "method.center_rewards_coefficient=0.01"], command="rm")
    with pytest.raises(ConfigError, match=r"method.l2_coefficient: 0.01 is read only by the K-wise ranking loss"):
        load_config(None, [*base, "method.l2_coefficient=0.01"], command="rm")
    load_config(None, [*base, "method.ranked=true", "method.l2_coefficient=0.01"], command="rm")
    load_config(None, [*base, "method.center_rewards_coefficient=0.01"], command="rm")


@pytest.mark.parametrize("loss", ["simpo", "orpo", "cpo", "[simpo, sft]"])
def test_a_reference_for_a_reference_free_loss_is_refused(loss):
    """loss_type simpo with method.reference=copy built a frozen second model and scored it every step for a loss that
    never reads it (memory and compute for nothing, exit 0); a reference_cache_dir was ignored the same way."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl", f"method.loss_type={loss}"]
    with pytest.raises(ConfigError, match=r"method.reference: 'copy', and loss_type .* reads no reference"):
        load_config(None, [*base, "method.reference=copy"], command="dpo")
    with pytest.raises(ConfigError, match=r"method.reference_cache_dir: loss_type .* reads no reference"):
        load_config(None, [*base, "method.reference_cache_dir=/tmp/cache"], command="dpo")
    load_config(None, [*base, "method.reference=none"], command="dpo")
    load_config(None, [*base, f"method.loss_type=[{loss.strip('[]')}, sigmoid]", "method.reference=copy"],
                command="dpo")


@pytest.mark.parametrize("command", ["dpo", "online-dpo"])
def test_loss_weights_of_another_length_than_loss_type_are_refused_before_the_run_folder(command, tmp_path, capsys):
    """method.loss_weights=[1, 2] with one loss type was accepted; the run folder (config.yaml, base_model/,
    tensorboard/) was written and the first step stopped with "unexpected error: ValueError: preference_loss: 1 loss
    types ['sigmoid'] but 2 loss_weights". Now one line when the config is read, and nothing written."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    if command == "online-dpo":
        base.append("annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}")
    with pytest.raises(ConfigError, match=r"method.loss_weights: 2 weight\(s\) for the 1 loss type\(s\) \['sigmoid'\] "
                                          r"of method.loss_type"):
        load_config(None, [*base, "method.loss_weights=[1.0, 2.0]"], command=command)
    load_config(None, [*base, "method.loss_weights=[1.0, 2.0]", "method.loss_type=[sigmoid, sft]"], command=command)
    out = tmp_path / "run"
    capsys.readouterr()
    config = {"dpo": "dpo-tiny.yaml", "online-dpo": "online-dpo-tiny.yaml"}[command]
    assert main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}",
                 "method.loss_weights=[1.0, 2.0]"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert len(err) == 1 and "method.loss_weights" in err[0], err
    assert not out.exists()


def test_docs_for_trl_users_list_every_trl_name():
    """docs/trl.md is the table users read: every TRL name the settings answer for is in it, with alignkit's key."""
    from alignkit.settings.trl_names import TRL_LOSS_TYPES, TRL_NAMES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "trl.md").read_text()
    missing = [k for k, v in {**TRL_NAMES, **TRL_LOSS_TYPES}.items() if f"| `{k}` | {v.replace('|', '/')} |" not in doc]
    assert not missing, f"docs/trl.md lacks (or states otherwise) {missing}"


# TRL 1.16's fields of each config beyond transformers.TrainingArguments' (read from its source: trl/trainer/*_config.py)
TRL_CONFIG_FIELDS = {
    "SFTConfig": ("model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "chat_template_path",
        "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "eos_token", "max_length", "truncation_mode",
        "shuffle_dataset", "packing", "packing_strategy", "padding_free", "pad_to_multiple_of", "eval_packing",
        "completion_only_loss", "assistant_only_loss", "loss_type", "activation_offloading", "pad_token"),
    "DPOConfig": ("model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "disable_dropout",
        "dataset_num_proc", "max_length", "truncation_mode", "padding_free", "pad_to_multiple_of",
        "precompute_ref_log_probs", "precompute_ref_batch_size", "loss_type", "loss_weights", "ld_alpha",
        "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing", "beta", "use_weighting", "discopop_tau",
        "activation_offloading", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "pad_token"),
    "RewardConfig": ("model_init_kwargs", "trust_remote_code", "chat_template_path", "disable_dropout",
        "dataset_num_proc", "eos_token", "max_length", "pad_to_multiple_of", "center_rewards_coefficient",
        "activation_offloading", "pad_token"),
    "KTOConfig": ("model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "disable_dropout",
        "dataset_num_proc", "max_length", "pad_to_multiple_of", "precompute_ref_log_probs",
        "precompute_ref_batch_size", "loss_type", "beta", "desirable_weight", "undesirable_weight",
        "activation_offloading", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"),
}


@pytest.mark.parametrize("config, trainer", [("SFTConfig", "SFTTrainer"), ("DPOConfig", "PreferenceTrainer"),
                                             ("RewardConfig", "RewardTrainer"), ("KTOConfig", "KTOTrainer")])
def test_every_field_of_trls_configs_given_as_args_is_refused_not_dropped(config, trainer):
    """A TRL config given as a trainer's args (a TrainingArguments subclass) with any of its own fields set: refused in
    one line naming the keyword, the loss parameter or alignkit's equivalent. DPOConfig's label_smoothing /
    discopop_tau and eight others (pad_to_multiple_of, activation_offloading, ...) were only warned about and dropped."""
    import dataclasses

    from transformers import TrainingArguments

    import alignkit.trainers as trainers
    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import refuse_unread_fields

    owner = getattr(trainers, trainer)
    for name in TRL_CONFIG_FIELDS[config]:
        cls = dataclasses.make_dataclass(config, [(name, object, None)], bases=(TrainingArguments,))
        args = cls(output_dir="unused", report_to=[], use_cpu=True, **{name: "set"})
        with pytest.raises(ConfigError, match=rf"^{trainer}: args.{name}='set' is a field of {config}, which "
                                              r"alignkit never reads .*(; pass it|alignkit's equivalent)") as e:
            refuse_unread_fields(args, owner)
        assert "\n" not in str(e.value)


def test_margins_in_dpo_data_are_said_to_be_ignored(tmp_path, caplog):
    """A preference file with a margin column (the same file as for alignkit rm) trained alignkit dpo with the margins
    read into every record and never used, without a word: the DPO losses take no margin (TRL's neither). Now one
    warning naming how many pairs have one; rm, whose pair loss reads them, says nothing."""
    import logging

    rows = [{"prompt": f"{i}+{i}=", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}", "margin": 1.5}
            for i in range(4)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = lambda: [r.getMessage() for r in caplog.records if "have a margin" in r.getMessage()]  # noqa: E731
    for command in ("dpo", "rm"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit.cli.data"):
            assert main(["-q", command, "model.path=tiny:llama", f"data.path={f}", f"output_dir={tmp_path / command}",
                         "train.max_steps=1", "train.per_device_train_batch_size=2", "train.save_strategy=no"]) == 0
        if command == "dpo":
            assert said() == ["data: 4 of 4 pair(s) have a margin (e.g. " + f"{f}:1, {f}:2, {f}:3), and alignkit dpo's "
                              "losses do not read margins (only alignkit rm's pair loss does, with method.use_margin), "
                              "so they are ignored; drop the margin column if that is not meant to be"], said()
        else:
            assert said() == []


@pytest.mark.parametrize("command, value, says", [
    ("dpo", "kto_pair", "alignkit kto (preference rows are read as desirable chosen / undesirable rejected"),
    ("dpo", "[sigmoid, aot]", "alignkit has no equivalent (AOT"),
    ("online-dpo", "aot_unpaired", "alignkit has no equivalent (AOT"),
    ("sft", "dft", "alignkit has no equivalent (TRL's SFT loss_type dft); use nll")])
def test_trls_loss_types_alignkit_lacks_say_so(command, value, says):
    """TRL's loss_type kto_pair was 'not registered (did you mean 'exo_pair'?)': a neighbour's name, not alignkit's
    equivalent (alignkit kto on the same rows). TRL's loss types alignkit lacks now say what it has instead."""
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    if command == "online-dpo":
        base.append("annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}")
    name = value.strip("[]").split(", ")[-1]
    with pytest.raises(ConfigError, match=rf"^method.loss_type(\[1\])?: '{name}' is TRL's loss type, not registered "
                                          rf"here; alignkit: {re.escape(says)}") as e:
        load_config(None, [*base, f"method.loss_type={value}"], command=command)
    assert "did you mean" not in str(e.value)


def test_trls_lora_target_modules_flag_takes_module_names():
    """TRL's --lora_target_modules takes names (nargs, a list): `q_proj v_proj` stopped at argparse ("unrecognized
    arguments: ... adapter.lora.target_modules=q_proj v_proj"), and one name (`q_proj`, or `q_proj,v_proj`) reached
    peft as a regex over the full module path, "Target modules q_proj not found". Names are now a list; a pattern
    or all-linear stays as given (peft's string)."""
    from alignkit.cli.flags import translate

    known = {"--config", "--dry-run"}
    assert translate(["--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "16"], "sft", known) == [
        "adapter.kind=lora", "adapter.lora.target_modules=[q_proj, v_proj]", "adapter.lora.r=16"]
    assert translate(["--lora_target_modules", "q_proj", "method.loss_type=nll"], "sft", known) == [
        "adapter.lora.target_modules=[q_proj]", "method.loss_type=nll"]
    assert translate(["--lora_target_modules=q_proj,o_proj", "--dry-run"], "sft", known) == [
        "adapter.lora.target_modules=[q_proj, o_proj]", "--dry-run"]
    for given in ("all-linear", r".*\.(q|v)_proj"):
        assert translate(["--lora_target_modules", given], "dpo", known) == [f"adapter.lora.target_modules={given}"]


def test_trls_lora_flags_train_those_modules_and_say_where_defaults_differ(tmp_path, caplog):
    """`--use_peft` gave alignkit's LoRA defaults (r 8, alpha 16, dropout 0, all-linear) where TRL's ModelConfig
    has r 16, alpha 32, dropout 0.05 and peft's targets for the model, without a word: now one warning names each
    default not given as a flag, and the flags given train exactly the modules named."""
    import logging

    from alignkit.adapters.config import LoraSettings

    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "The sky is", "completion": " blue."}) + "\n")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        rc = main(["-q", "sft", "--model_name_or_path", "tiny:llama", "--dataset_name", str(tmp_path / "d.jsonl"),
                   "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "1",
                   "--save_strategy", "no", "--report_to", "none", "--use_peft", "--lora_r", "16",
                   "--lora_target_modules", "q_proj", "v_proj"])
    assert rc == 0
    saved = json.loads((out / "model" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["r"] == 16
    assert (saved["lora_alpha"], saved["lora_dropout"]) == (LoraSettings.alpha, LoraSettings.dropout)
    said = [r.getMessage() for r in caplog.records if "--use_peft" in r.getMessage()]
    assert len(said) == 1
    assert ("alignkit's defaults, which are not TRL's ModelConfig ones: adapter.lora.alpha 16.0 (TRL's lora_alpha 32); "
            "adapter.lora.dropout 0.0 (TRL's lora_dropout 0.05); pass --lora_alpha 32 --lora_dropout 0.05" in said[0])
    assert "lora_r" not in said[0] and "target_modules" not in said[0]  # given as flags: TRL's meaning, no word


@pytest.mark.parametrize("key, says", [
    ("model_name_or_path", "alignkit: model.path, nested in its section (model: {path: ...})"),
    ("lora_r", "alignkit: adapter.lora.r, nested in its section (adapter: {lora: {r: ...}})"),
    ("use_peft", "alignkit: adapter.kind, nested in its section (adapter: {kind: lora})")])
def test_a_flat_trl_config_names_where_its_keys_go(tmp_path, capsys, key, says):
    """A flat TRL config (`trl sft --config sft.yaml`: every key at the top level) stopped at its first key with
    "model_name_or_path: unknown key. Valid keys: model, data, ...", naming neither alignkit's key nor the layout."""
    cfg = tmp_path / "trl.yaml"
    cfg.write_text(f"{key}: x\nlearning_rate: 1.0e-4\n")
    assert main(["sft", "--config", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{key}: unknown key at the top level ({key} is TRL's name" in err and says in err
    assert "or give TRL's names as flags" in err


@pytest.mark.parametrize("command", ["dpo", "online-dpo"])
def test_a_loss_type_listed_twice_is_refused_in_one_line(command, tmp_path, capsys):
    """method.loss_type=[sigmoid, sigmoid] was accepted: the DPO loss was added twice (doubled) and logged once
    (loss/sigmoid). Now one line naming the repeated loss type, nothing written; a weight says what the repeat meant
    (method.loss_weights scales each loss type). The Python API (preference_loss, the trainers' check) refuses it too."""
    from alignkit.losses import PreferenceBatch, PreferenceParams, check_loss_weights, preference_loss
    from alignkit.settings import ConfigError

    base = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
    if command == "online-dpo":
        base.append("annotator={kind: function, function: 'alignkit.rewards:digit_fraction'}")
    with pytest.raises(ConfigError, match=r"method.loss_type: 'sigmoid' is listed more than once"):
        load_config(None, [*base, "method.loss_type=[sigmoid, sft, sigmoid]"], command=command)
    out = tmp_path / "run"
    capsys.readouterr()
    config = {"dpo": "dpo-tiny.yaml", "online-dpo": "online-dpo-tiny.yaml"}[command]
    assert main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}",
                 "method.loss_type=[sigmoid, sigmoid]"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert len(err) == 1 and "'sigmoid' is listed more than once" in err[0], err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"PreferenceTrainer: loss type 'sigmoid' is listed more than once"):
        check_loss_weights(["sigmoid", "sigmoid"], [1.0, 0.5], "PreferenceTrainer")
    batch = PreferenceBatch(torch.tensor([-1.0]), torch.tensor([-2.0]))
    with pytest.raises(ValueError, match="listed more than once"):
        preference_loss(batch, PreferenceParams(), ["sigmoid", "sigmoid"])
