"""Config loading: overrides parsed as YAML scalars, typed sections, errors that name the dotted key and
suggest the closest valid one, registry names checked, resolved configs that re-load to the same settings,
and every file in configs/ valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from alignkit.adapters import AdapterConfig, LoraSettings
from alignkit.settings import (CONFIG_CLASSES, ConfigError, DPOConfig, config_from_dict, load_config, merge,
                               parse_overrides, save_config)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BASE = {"model": {"path": "tiny:llama"}, "data": {"path": "pairs.jsonl"}}


def test_overrides_are_yaml_scalars_nested_by_dots():
    got = parse_overrides(["method.beta=0.05", "train.learning_rate=1e-4", "train.max_steps=3", "train.bf16=true",
                           "model.attn_implementation=null", "data.path=[a.jsonl, b.jsonl]", "adapter.lora.r=4",
                           "output_dir=runs/x", "method.loss_type=sigmoid"])
    assert got == {"method": {"beta": 0.05, "loss_type": "sigmoid"},
                   "train": {"learning_rate": 0.0001, "max_steps": 3, "bf16": True},
                   "model": {"attn_implementation": None}, "data": {"path": ["a.jsonl", "b.jsonl"]},
                   "adapter": {"lora": {"r": 4}}, "output_dir": "runs/x"}
    # 1e-4 is a float (plain PyYAML would read a string), and so are 5E+3 and -2.5e-1
    assert parse_overrides(["a=5E+3", "b=-2.5e-1"]) == {"a": 5000.0, "b": -0.25}
    assert isinstance(parse_overrides(["a=1e-4"])["a"], float)
    # YAML 1.2 booleans: `no` (eval_strategy, save_strategy) and `on` stay strings
    assert parse_overrides(["train.save_strategy=no", "a=yes", "b=on", "c=False", "d=TRUE"]) == \
        {"train": {"save_strategy": "no"}, "a": "yes", "b": "on", "c": False, "d": True}


@pytest.mark.parametrize("bad", ["method.beta", "=3", "method..beta=1", "1x=2"])
def test_malformed_override_is_an_error(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([bad])


def test_merge_is_deep_and_overrides_win():
    base = {"method": {"beta": 0.1, "loss_type": "ipo"}, "train": {"seed": 1}}
    assert merge(base, {"method": {"beta": 0.5}}) == {"method": {"beta": 0.5, "loss_type": "ipo"}, "train": {"seed": 1}}
    assert base["method"]["beta"] == 0.1  # not mutated


def test_typed_sections_and_widening(tmp_path):
    cfg = config_from_dict({**BASE, "method": {"beta": 1, "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5]},
                            "adapter": {"kind": "lora", "lora": {"r": 2, "alpha": 4}},
                            "train": {"learning_rate": 1e-3, "max_steps": 2}}, "dpo")
    assert isinstance(cfg, DPOConfig)
    assert cfg.method.beta == 1.0 and isinstance(cfg.method.beta, float)  # int widened to float
    assert cfg.method.loss_weights == [1.0, 0.5]
    assert cfg.adapter == AdapterConfig(kind="lora", lora=LoraSettings(r=2, alpha=4.0))  # the adapters' own dataclass
    assert cfg.model.trust_remote_code is False and cfg.train == {"learning_rate": 1e-3, "max_steps": 2,
                                                                 "logging_steps": 10}  # the dpo default added


@pytest.mark.parametrize("data, key, hint, command", [
    ({**BASE, "method": {"betaa": 0.1}}, "method.betaa", "'beta'", "dpo"),
    ({**BASE, "adapter": {"kind": "lora", "lora": {"rr": 2}}}, "adapter.lora.rr", "'r'", "dpo"),
    ({**BASE, "train": {"lerning_rate": 1e-4}}, "train.lerning_rate", "'learning_rate'", "dpo"),
    ({**BASE, "dataa": {}}, "dataa", "'data'", "dpo"),
    ({"model": {"path": "x", "dtyp": "bf16"}}, "model.dtyp", "'dtype'", "dpo"),
    # the section of the neighbouring config (sample-tiny / grpo-tiny: sampling; generate-tiny: generation): the
    # line listed the valid keys without a hint ("unknown key Valid keys: ...")
    ({**BASE, "sampling": {"max_new_tokens": 32}}, "sampling", "'generation'? (this command's name for the sampling "
     "section, with the same keys)", "generate"),
    ({**BASE, "generation": {"max_new_tokens": 32}}, "generation", "'sampling'?", "sample"),
])
def test_unknown_key_names_dotted_key_suggests_and_lists_valid(data, key, hint, command):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, command)
    msg = str(e.value)
    assert msg.startswith(f"{key}: unknown key"), msg
    assert f"did you mean {hint}" in msg
    assert "Valid keys:" in msg


def test_unknown_key_lists_every_valid_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "method": {"zzz": 1}}, "kto")
    valid = e.value.args[0].split("Valid keys: ")[1].split(", ")
    assert valid == ["loss_type", "beta", "desirable_weight", "undesirable_weight", "reference", "chunk_size",
                     "disable_dropout", "weight_normalization", "ref_sync"]
    assert "did you mean" not in str(e.value) and "zzz: unknown key. Valid keys" in str(e.value)  # nothing close


@pytest.mark.parametrize("data, key, expected", [
    ({**BASE, "method": {"beta": "high"}}, "method.beta", "expected float, got str 'high'"),
    ({**BASE, "method": {"beta": True}}, "method.beta", "expected float, got bool True"),
    ({**BASE, "train": {"max_steps": 2.5}}, "train.max_steps", "expected int, got float 2.5"),
    ({**BASE, "data": {"max_length": "long"}}, "data.max_length", "expected int or null, got str 'long'"),
    ({**BASE, "method": {"loss_weights": [1, "x"]}}, "method.loss_weights[1]", "expected float"),
    ({**BASE, "model": {"path": 3}}, "model.path", "expected str, got int 3"),
    ({**BASE, "adapter": {"lora": 4}}, "adapter.lora", "expected a mapping of LoraSettings keys"),
    ({**BASE, "method": {"reference": "adapter-off"}}, "method.reference", "did you mean 'adapter_off'"),
])
def test_wrong_type_names_key_and_expected_type(data, key, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "dpo")
    assert str(e.value).startswith(f"{key}: "), str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize("data, key, text", [
    ({**BASE, "method": {"loss_type": "sigmod"}}, "method.loss_type", "did you mean 'sigmoid'"),
    ({**BASE, "data": {"path": "p", "reader": "hh_rlhf"}}, "data.reader", "did you mean 'hh-rlhf'"),
    ({**BASE, "data": {"path": "p", "formatter": "chat"}}, "data.formatter", "valid: auto, chat-template"),
    ({**BASE, "data": {"eval_path": "p"}}, "data.path", "required"),
    ({**BASE, "model": {"path": "tiny:lama"}}, "model.path", "did you mean 'tiny:llama'"),
    ({**BASE, "adapter": {"kind": "reft"}}, "adapter", "needs adapter.reft.config"),
    ({**BASE, "adapter": {"kind": "reft", "reft": {"config": {"representations": [{"layr": 0}]}}}},
     "adapter.reft.config.representations[0].layr", "did you mean 'layer'"),
    ({"data": {}}, "model.path", "required"),
    ({**BASE, "train": {"output_dir": "x"}}, "train.output_dir", "top-level output_dir"),
])
def test_names_checked_against_registries(data, key, text):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "dpo")
    assert str(e.value).startswith(key) and text in str(e.value), str(e.value)


def test_file_errors_name_the_file_and_command(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("command: sft\nmodel: {path: tiny:llama}\ndata: {path: p.jsonl}\nmethod: {beta: 0.1}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: method\.beta: unknown key"):
        load_config(f)
    with pytest.raises(ConfigError, match="this config is for `alignkit sft`, not `alignkit dpo`"):
        load_config(f, command="dpo")
    f.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f, command="sft")


def test_overrides_apply_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("command: dpo\nmodel: {path: tiny:llama}\ndata: {path: p.jsonl}\nmethod: {beta: 0.1, loss_type: ipo}\n"
                 "train: {learning_rate: 5e-5}\n")
    cfg = load_config(f, ["method.beta=0.05", "train.learning_rate=1e-4", "adapter.kind=lora"])
    assert (cfg.method.beta, cfg.method.loss_type, cfg.train["learning_rate"], cfg.adapter.kind) == \
        (0.05, "ipo", 1e-4, "lora")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert type(cfg) is CONFIG_CLASSES[path.read_text().split("command:")[1].split()[0]]
    again = load_config(save_config(cfg, tmp_path / "resolved.yaml"))
    assert again == cfg


def test_configs_cover_every_command():
    commands = {p.read_text().split("command:")[1].split()[0] for p in CONFIGS}
    assert commands == set(CONFIG_CLASSES)
    tiny = [p for p in CONFIGS if "tiny:" in p.read_text() or "runs/" in p.read_text()]
    assert len(tiny) >= 8


def test_reft_config_is_typed_old_mappings_still_load_unknown_keys_named():
    from alignkit.adapters import ReftSettings
    from alignkit.interventions.config import ReftConfig, RepresentationConfig

    reps = [{"layer": 0, "low_rank_dimension": 2, "intervention": "noreft"}, {"layer": 1, "low_rank_dimension": 2}]
    old = AdapterConfig.from_dict({"kind": "reft", "reft": {"config": {"representations": reps}, "positions": "l1"}})
    assert old.reft == ReftSettings(config=ReftConfig([RepresentationConfig(0, intervention="noreft",
                                                                            low_rank_dimension=2),
                                                       RepresentationConfig(1, low_rank_dimension=2)]), positions="l1")
    assert AdapterConfig.from_dict(old.to_dict()) == old  # alignkit_adapter.json round trip
    cfg = config_from_dict({**BASE, "adapter": {"kind": "reft", "reft": {"config": {"representations": reps}}}}, "dpo")
    assert cfg.adapter.reft.config == old.reft.config
    for data, key in [({"representations": reps, "postions": "l1"}, "adapter.reft.config.postions"),
                      ({"representations": [{"layer": 0, "rank": 2}]}, "adapter.reft.config.representations[0].rank")]:
        with pytest.raises(ConfigError) as e:
            config_from_dict({**BASE, "adapter": {"kind": "reft", "reft": {"config": data}}}, "dpo")
        assert str(e.value).startswith(f"{key}: unknown key") and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"^adapter\.reft\.config: unknown key\(s\) \['postions'\]"):
        ReftSettings(config={"representations": reps, "postions": "l1"})


@pytest.mark.parametrize("command,config", [("grpo", "grpo-tiny.yaml"), ("online-dpo", "online-dpo-tiny.yaml"),
                                            ("ppo", "ppo-tiny.yaml"), ("sample", "sample-tiny.yaml"),
                                            ("generate", "generate-tiny.yaml")])
@pytest.mark.parametrize("override", ["data.eval_fraction=0.2", "data.max_length=64", "data.loss_on=all",
                                      "data.add_eos=true", "data.eval_path=x.jsonl"])
def test_prompt_only_commands_refuse_data_keys_they_would_ignore(command, config, override):
    """Online training and `sample` read prompts only: a loss mask, row cut or EOS set in `data` was accepted and
    silently ignored. Now one line naming the key; the keys they read still load. The online training commands
    read held-out prompts (eval_path / eval_fraction: alignkit.online.evaluation); `sample` does not."""
    key = override.split("=")[0]
    if command not in ("sample", "generate") and key in ("data.eval_fraction", "data.eval_path"):
        load_config(CONFIG_DIR / config, [override], command=command)
        return
    with pytest.raises(ConfigError, match=rf"{key}: alignkit {command} reads only prompts"):
        load_config(CONFIG_DIR / config, [override], command=command)
    load_config(CONFIG_DIR / config, ["data.max_prompt_length=32", "data.max_records=3"], command=command)


def test_online_eval_steps_without_held_out_prompts_is_refused():
    """train.eval_steps with no held-out prompts would evaluate nothing: one line naming the key and the fix."""
    with pytest.raises(ConfigError, match=r"grpo-tiny\.yaml: train\.eval_steps: 2 evaluates on held-out prompts, and data gives none"):
        load_config(CONFIG_DIR / "grpo-tiny.yaml", ["train.eval_steps=2"], command="grpo")
    cfg = load_config(CONFIG_DIR / "grpo-tiny.yaml", ["train.eval_steps=2", "data.eval_fraction=0.25"], command="grpo")
    assert cfg.trainer_config().eval_steps == 2


@pytest.mark.parametrize("override", ["data.eval_fraction=0.2", "data.eval_path=x.jsonl", "data.split_seed=3",
                                      "data.eval_split=test"])
def test_eval_refuses_split_keys_it_would_ignore(override):
    """`alignkit eval` scores every record of data.path: an evaluation split asked for in `data` was accepted and
    the whole file scored anyway. Now one line naming the key; the keys it reads still load."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: alignkit eval scores every record of data.path"):
        load_config(CONFIG_DIR / "eval-rm-tiny.yaml", [override], command="eval")
    cfg = load_config(CONFIG_DIR / "eval-rm-tiny.yaml", ["data.max_length=64", "data.max_records=3"], command="eval")
    assert cfg.data.max_length == 64 and cfg.data.max_records == 3


def test_a_section_set_in_part_keeps_the_commands_own_defaults():
    """A section whose default is configured for the command (`generate`: greedy; `sample` / online commands: 4
    samples of 64 tokens) lost those defaults as soon as one of its keys was set: `generation.max_new_tokens=4`
    alone turned generate's greedy decoding into sampling (help said do_sample=False), `sampling.temperature=0.7`
    gave GRPO one sample per prompt. The keys set now apply over the command's defaults."""
    base = {"model": {"path": "m"}, "data": {"path": "p.jsonl"}}
    gen = config_from_dict({**base, "generation": {"max_new_tokens": 4}}, "generate").generation
    assert (gen.max_new_tokens, gen.do_sample, gen.num_samples) == (4, False, 1)
    assert config_from_dict(base, "generate").generation.do_sample is False
    assert config_from_dict({**base, "generation": {"do_sample": True}}, "generate").generation.do_sample is True
    sample = config_from_dict({**base, "sampling": {"temperature": 0.7}}, "sample").sampling
    assert (sample.temperature, sample.num_samples, sample.max_new_tokens, sample.do_sample) == (0.7, 4, 64, True)
    grpo = load_config(CONFIG_DIR / "grpo-tiny.yaml", ["sampling.top_p=0.9"], command="grpo")
    assert grpo.sampling.num_samples == 4 and grpo.sampling.top_p == 0.9


@pytest.mark.parametrize("command,config,overrides,message,fix", [
    ("eval", "eval-rm-tiny.yaml", ["method.beta=0.5"], "method.beta: read only by method.kind=dpo", ["method.kind=dpo"]),
    ("eval", "eval-rm-tiny.yaml", ["method.reference_path=ref"], "method.reference_path: read only by method.kind=dpo",
     ["method.kind=dpo"]),
    ("grpo", "grpo-tiny.yaml", ["annotator.default_score=1.0"],
     "annotator.default_score: 1.0 is read only with annotator.on_failure=default", ["annotator.on_failure=default"]),
    ("grpo", "grpo-tiny.yaml", ["method.vllm_mode=server"],
     "vllm_mode='server' is read only with generation_backend='vllm'", ["method.generation_backend=vllm"]),
    ("online-dpo", "online-dpo-tiny.yaml", ["method.vllm={max_model_len: 64}"],
     "vllm={'max_model_len': 64} is read only with generation_backend='vllm'", ["method.generation_backend=vllm"]),
    ("grpo", "grpo-tiny.yaml", ["method.generation_backend=vllm", "method.vllm_server_url=http://h:1"],
     "vllm_server_url='http://h:1' is read only with vllm_mode='server'", ["method.vllm_mode=server"]),
    # vLLM schedules its own batches: transformers generation's batch size was ignored
    ("online-dpo", "online-dpo-tiny.yaml", ["method.generation_batch_size=16", "method.generation_backend=vllm"],
     "generation_batch_size=16 is read only with generation_backend='transformers'",
     ["method.generation_backend=transformers"]),
    # the online loops checkpoint / evaluate when (step + 1) % N == 0: a fraction (TrainingArguments' share of the
    #   run) made every step a checkpoint / evaluation step
    ("grpo", "grpo-tiny.yaml", ["train.max_steps=8", "train.save_steps=0.25"],
     "train.save_steps: 0.25 is not a whole number of steps; grpo counts whole steps and does not read a fraction as "
     "a share of the run (as TrainingArguments does: every step was then a save step); give a step count (0.25 of 8 "
     "steps: 2)", ["train.save_steps=2"]),
    ("rloo", "rloo-tiny.yaml", ["train.eval_steps=1.5"], "train.eval_steps: 1.5 is not a whole number of steps",
     ["train.eval_steps=2.0", "data.eval_fraction=0.25"]),
    ("grpo", "grpo-tiny.yaml", ["method.kl_horizon=50"], "kl_horizon=50 is read only with an adaptive kl_target",
     ["method.kl_target=6.0"]),
    ("rloo", "rloo-tiny.yaml", ["method.scale_by_std=false"], "scale_by_std=False (Dr. GRPO) is read only by GRPO",
     None),
    # the adaptive controller multiplies kl_coef: from 0 it stayed 0 at every step
    ("grpo", "grpo-tiny.yaml", ["method.kl_coef=0", "method.kl_target=6.0"],
     "kl_target=6.0 adapts kl_coef by multiplying it", ["method.kl_coef=0.05"]),
    # PPO may sample once per prompt: a group of one normalised every reward to 0 (only the KL term trained)
    ("ppo", "ppo-tiny.yaml", ["sampling.num_samples=1", "method.reward_normalization=group"],
     "reward_normalization='group' normalises each prompt's rewards within its sampling.num_samples samples, and "
     "num_samples is 1", ["sampling.num_samples=2"]),
    # GRPO's advantage standardises each group again: a reward normalisation cancelled in it
    ("grpo", "grpo-tiny.yaml", ["method.reward_normalization=group"],
     "method: reward_normalization='group' is undone by GRPO's advantage", ["method.reward_clip=3.0"]),
    ("grpo", "grpo-tiny.yaml", ["method.reward_normalization=running"],
     "method: reward_normalization='running' is undone by GRPO's advantage", ["method.scale_by_std=false"]),
    # best_worst pairs follow the rewards' order, which a normalisation keeps: only margins read its scale
    ("online-dpo", "online-dpo-tiny.yaml", ["method.reweighters=[]", "method.reward_normalization=running"],
     "method: online DPO config: reward_normalization='running' shifts and scales the rewards",
     ["method.reweighters=[margin_linear]"]),
    # only a stop string's cut reads it: without sampling.stop every response was the same
    ("grpo", "grpo-tiny.yaml", ["sampling.include_stop_str_in_output=true"],
     "sampling: SamplingConfig.include_stop_str_in_output=True keeps the stop string that ended a response in its "
     "text, and SamplingConfig.stop is empty, so it would be ignored", ["sampling.stop=[END]"]),
    # SLiC's hinge / regulariser and the sft term have no beta (it only scaled the logged rewards)
    ("dpo", "dpo-tiny.yaml", ["method.loss_type=slic", "method.beta=0.5"],
     "method.beta: no loss of loss_type ['slic'] reads it", ["method.loss_type=[slic, sigmoid]"]),
    ("dpo", "dpo-tiny.yaml", ["method.loss_type=[slic, sft]", "method.beta=0.5"],
     "method.beta: no loss of loss_type ['slic', 'sft'] reads it", ["method.loss_type=[sft, ipo]"]),
    ("grpo", "grpo-tiny.yaml", ["method.generation_backend=vllm", "sampling.sampler=multinomial"],
     "sampling.sampler='multinomial' is read only by transformers generation", ["method.generation_backend=transformers"]),
    # generate decodes greedily by default: a temperature / top_k / top_p / sampler alone gave the greedy answer
    ("generate", "generate-tiny.yaml", ["generation.temperature=0.7"],
     "generation.temperature=0.7 is read only when sampling, but generation.do_sample is false (greedy decoding, the "
     "default of alignkit generate), so it would be ignored; set generation.do_sample: true to sample, or remove "
     "generation.temperature", ["generation.do_sample=true"]),
    ("generate", "generate-tiny.yaml", ["generation.top_k=5"], "generation.top_k=5 is read only when sampling",
     ["generation.do_sample=true"]),
    ("generate", "generate-tiny.yaml", ["generation.top_p=0.9"], "generation.top_p=0.9 is read only when sampling",
     ["generation.do_sample=true"]),
    ("generate", "generate-tiny.yaml", ["generation.sampler=multinomial"],
     "generation.sampler='multinomial' is read only when sampling", ["generation.do_sample=true"]),
    ("sample", "sample-tiny.yaml", ["sampling.do_sample=false", "sampling.temperature=0.5"],
     "sampling.temperature=0.5 is read only when sampling, but sampling.do_sample is false (greedy decoding), so",
     ["sampling.do_sample=true"]),
    # greedy decoding with num_samples > 1 wrote that many identical responses per prompt (one log warning)
    ("generate", "generate-tiny.yaml", ["generation.num_samples=3"],
     "generation.num_samples=3 with generation.do_sample false (greedy decoding, the default of alignkit generate) "
     "writes 3 identical responses per prompt; set generation.do_sample: true to sample, or generation.num_samples: 1",
     ["generation.do_sample=true"]),
    ("sample", "sample-tiny.yaml", ["sampling.do_sample=false"],
     "sampling.num_samples=4 with sampling.do_sample false (greedy decoding) writes 4 identical responses per prompt",
     ["sampling.num_samples=1"]),
    # top_k=1 samples greedily whatever the temperature: as many copies of one answer (was accepted, exit 0)
    ("sample", "sample-tiny.yaml", ["sampling.top_k=1"],
     "sampling.num_samples=4 with sampling.top_k=1 (only the most likely token is kept at each step: greedy decoding) "
     "writes 4 identical responses per prompt; remove sampling.top_k (or set it above 1), or sampling.num_samples: 1",
     ["sampling.top_k=2"]),
])
def test_keys_the_chosen_settings_never_read_are_refused(command, config, overrides, message, fix):
    """Each of these was accepted and had no effect (eval of a reward model has no beta or reference; a default
    score is never used when failures are skipped; vLLM / server keys with transformers generation; kl_horizon
    without an adaptive target; Dr. GRPO's switch under RLOO). Now one line naming the key; with the setting
    that reads it, the same key loads."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIG_DIR / config, overrides, command=command)
    if fix is not None:
        load_config(CONFIG_DIR / config, [*overrides, *fix], command=command)
    else:
        assert load_config(CONFIG_DIR / "grpo-tiny.yaml", overrides, command="grpo").method.scale_by_std is False


@pytest.mark.parametrize("override", ["data.split=test", "data.reader=prompt_completion", "data.max_length=64",
                                      "data.formatter=plain", "data.eval_fraction=0.2"])
def test_augment_refuses_data_keys_it_never_reads(override):
    """`alignkit augment` reads the rows of data.path (the first data.max_records) and nothing else of `data`: a
    split, reader, length cut or formatter was accepted and every row of every file augmented anyway. Now one line
    naming the key; path and max_records still load."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: alignkit augment reads only the rows of data.path"):
        load_config(CONFIG_DIR / "augment-code-bugs.yaml", [override], command="augment")
    assert load_config(CONFIG_DIR / "augment-code-bugs.yaml", ["data.max_records=2"], command="augment").data.max_records == 2


@pytest.mark.parametrize("command,config", [("sft", "sft-tiny.yaml"), ("dpo", "dpo-tiny.yaml"), ("rm", "rm-tiny.yaml"),
                                            ("kto", "kto-tiny.yaml")])
def test_offline_evaluation_settings_that_cannot_run_are_refused_at_load(command, config):
    """train.eval_steps without train.eval_strategy was accepted and never read (transformers' default 'no':
    evaluation ran only after the last step); train.eval_strategy=steps / epoch with no held-out data (no
    data.eval_path, eval_fraction 0) got past the config, loaded the model and stopped with transformers'
    ValueError as an 'unexpected error, please report it'. Now one line at load naming the key and the fix. An
    explicit eval_strategy=no beside a config's eval_steps (turning evaluation off from the command line) loads."""
    from alignkit.settings import config_from_dict

    base = {"model": {"path": "tiny:llama"}, "data": {"path": "p.jsonl", "eval_fraction": 0.3}}
    with pytest.raises(ConfigError, match=r"train\.eval_steps: 5 is read only with train\.eval_strategy=steps, "
                                          r"which is not set .*, so it would be ignored"):
        config_from_dict({**base, "train": {"eval_steps": 5}}, command)
    assert config_from_dict({**base, "train": {"eval_steps": 5, "eval_strategy": "steps"}}, command).train[
        "eval_steps"] == 5
    for strategy in ("steps", "epoch"):
        with pytest.raises(ConfigError, match=rf"train\.eval_strategy: '{strategy}' evaluates on held-out records, "
                                              r"and data gives none: set data\.eval_path or data\.eval_fraction"):
            load_config(CONFIG_DIR / config, ["data.eval_fraction=0", f"train.eval_strategy={strategy}"],
                        command=command)
    load_config(CONFIG_DIR / config, ["data.eval_fraction=0", "train.eval_strategy=no"], command=command)


def test_a_saved_config_holds_the_adapter_parts_its_kind_uses_and_loads_back(tmp_path):
    """Every kind of the KINDS table: the saved config's adapter section holds `kind` and that kind's parts only
    (a full run's held a default lora section, which a load can no longer tell from one a user wrote), and loads
    back to the same config; the same section with another kind's part added is refused."""
    import yaml

    from alignkit.adapters.config import KINDS

    reft = {"config": {"representations": [{"layer": 0, "low_rank_dimension": 2}]}}
    for kind, info in KINDS.items():
        adapter = {"kind": kind, **({"reft": reft} if "reft" in info.parts else {})}
        cfg = config_from_dict({"model": {"path": "tiny:llama"}, "data": {"path": "p.jsonl"}, "adapter": adapter},
                               "sft")
        path = save_config(cfg, tmp_path / f"{kind}.yaml")
        saved = yaml.safe_load(path.read_text())["adapter"]
        assert set(saved) == {"kind", *info.parts}, kind
        assert load_config(path) == cfg
        for other, override in {"lora": "adapter.lora={r: 8}", "reft": "adapter.reft={positions: f1+l1}"}.items():
            if other in info.parts:
                continue
            with pytest.raises(ConfigError, match=rf"adapter\.{other}: read only by adapter\.kind .*, and kind is "
                                                  rf"'{re.escape(kind)}', so it would be ignored"):
                load_config(path, [override])


@pytest.mark.parametrize("train,key,strategy", [
    ({"save_strategy": "no", "save_steps": 3}, "save_steps", "no"),
    ({"save_strategy": "epoch", "save_steps": 3}, "save_steps", "epoch"),
    ({"save_strategy": "best", "save_steps": 3, "metric_for_best_model": "loss"}, "save_steps", "best"),
    ({"eval_strategy": "epoch", "eval_steps": 3}, "eval_steps", "epoch"),
    ({"logging_strategy": "no", "logging_steps": 3}, "logging_steps", "no"),
    ({"logging_strategy": "epoch", "logging_steps": 3}, "logging_steps", "epoch"),
])
def test_a_step_count_the_strategy_never_reads_is_refused(train, key, strategy, tmp_path):
    """An explicit strategy other than steps beside an explicit step count ran and ignored the count (save_strategy
    no with save_steps 3: no checkpoint). Now one line naming both keys; with strategy steps the same count loads.
    A default count is not the user's: save_strategy no alone, and logging_strategy no beside the logging_steps
    alignkit fills in (10, written to every run's config.yaml), load, and that saved config loads again."""
    from alignkit.settings import config_from_dict

    base = {"model": {"path": "tiny:llama"}, "data": {"path": "p.jsonl", "eval_fraction": 0.3}}
    strategy_key = key.replace("_steps", "_strategy")
    with pytest.raises(ConfigError, match=rf"^train\.{key}: 3 is read only with train\.{strategy_key}=steps, and "
                                          rf"train\.{strategy_key} is '{strategy}' .*, so it would be ignored; set "
                                          rf"train\.{strategy_key}=steps .*, or remove train\.{key}$"):
        config_from_dict({**base, "train": train}, "sft")
    loaded = config_from_dict({**base, "train": {**train, strategy_key: "steps"}}, "sft")
    assert loaded.train[key] == 3
    alone = config_from_dict({**base, "train": {k: v for k, v in train.items() if k != key}}, "sft")
    assert alone.train.get(key) in (None, 10)  # not set, or the filled logging_steps default
    assert load_config(save_config(alone, tmp_path / "config.yaml")) == alone  # a saved run config re-reads


@pytest.mark.parametrize("command,config,overrides,message,fix", [
    ("dpo", "dpo-tiny.yaml", ["data.loss_on=all"], "data.loss_on: read only by alignkit sft", None),
    ("rm", "rm-tiny.yaml", ["data.loss_on=last_assistant"], "data.loss_on: read only by alignkit sft", None),
    ("eval", "eval-rm-tiny.yaml", ["data.loss_on=all"], "data.loss_on: read only by alignkit sft", None),
    ("eval", "eval-dpo-tiny.yaml", ["data.loss_on=last_assistant"], "data.loss_on: read only by alignkit sft", None),
    ("sft", "sft-tiny.yaml", ["adapter.lora.r=16"], "adapter.lora: read only by adapter.kind lora or reft+lora, and "
     "kind is 'full'", ["adapter.kind=lora"]),
    ("grpo", "grpo-tiny.yaml", ["adapter.kind=full", "adapter.lora={r: 2}"], "adapter.lora: read only by "
     "adapter.kind lora or reft+lora", ["adapter.kind=lora"]),
    ("sft", "sft-tiny.yaml", ["adapter.lora={r: 8}"], "adapter.lora: read only by adapter.kind lora or reft+lora, "
     "and kind is 'full'", ["adapter.kind=lora"]),  # the default values: was accepted (the built settings equal them)
    ("grpo", "grpo-tiny.yaml", ["adapter.kind=reft", "adapter.reft={config: {representations: [{layer: 0}]}}",
                                "adapter.lora={r: 8}"], "adapter.lora: read only by adapter.kind lora or reft+lora, "
     "and kind is 'reft'", ["adapter.kind=reft+lora"]),
    ("dpo", "dpo-lora-tiny.yaml", ["adapter.reft={config: {representations: [{layer: 0}]}}"],
     "adapter.reft: read only by adapter.kind reft or reft+lora, and kind is 'lora'", ["adapter.kind=reft+lora"]),
    ("sft", "sft-reft-tiny.yaml", ["adapter.reft.positions=l2", "adapter.reft.share_weights=false"],
     "adapter.reft.share_weights: false splits the interventions between the first and the last positions, and "
     "adapter.reft.positions 'l2' names only one group", ["adapter.reft.positions=f2+l2"]),
    ("sft", "sft-reft-tiny.yaml", ["adapter.kind=reft+lora", "adapter.reft.modules_to_save=[model.norm]"],
     "adapter.reft.modules_to_save: with adapter.kind 'reft+lora' the LoRA part trains the modules besides the "
     "adapter (peft's modules_to_save), so it would be ignored; set adapter.lora.modules_to_save instead",
     ["adapter.kind=reft"]),
    ("dpo", "dpo-tiny.yaml", ["method.reference=copy", "method.reference_cache_dir=cache"],
     "method.reference_cache_dir: read only with method.reference precomputed (or auto), and it is 'copy'",
     ["method.reference=precomputed"]),
])
def test_keys_one_kind_reads_are_refused_under_another(command, config, overrides, message, fix):
    """Each was accepted and had no effect: data.loss_on under dpo / rm / eval (only SFT masks conversation turns),
    adapter.lora under a full or ReFT adapter (TRL's --lora_r without --use_peft), adapter.reft under LoRA,
    adapter.reft.modules_to_save under reft+lora (its LoRA part trains the extra modules: nothing trained them),
    adapter.reft.share_weights=false with a position spec of one group (f<n> or l<n>: nothing to split),
    method.reference_cache_dir with a reference that is not precomputed. Now one line naming the key; with the
    setting that reads it, the same key loads."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIG_DIR / config, overrides, command=command)
    if fix is not None:
        load_config(CONFIG_DIR / config, [*overrides, *fix], command=command)
    else:
        load_config(CONFIG_DIR / "sft-tiny.yaml", overrides, command="sft")
    # a file's lora / reft section is dropped from the command line with =null (e.g. to train kind=full)
    full = load_config(CONFIG_DIR / "grpo-tiny.yaml", ["adapter.kind=full", "adapter.lora=null"], command="grpo")
    assert full.adapter.kind == "full" and full.adapter.lora == load_config(
        CONFIG_DIR / "sft-tiny.yaml", [], command="sft").adapter.lora


def test_eval_steps_written_beside_an_explicit_eval_strategy_no_is_refused(tmp_path, caplog):
    """train.eval_strategy: no with train.eval_steps: 50 loaded and ran without evaluating every 50 steps (eval_steps
    ignored). Now eval_steps given in the overrides under a 'no' is refused in one line naming both keys and where.
    An override eval_strategy=no over a file's eval_steps stays the off switch, and its resolved config records
    eval_steps null, so that config.yaml loads back. Both in the file alone is what a config.yaml saved before that
    null held (README's commands wrote it): it loads, with one warning (a review caught the first version refusing
    such run configs); an override eval_strategy=steps over a file's 'no' + eval_steps turns evaluation on."""
    import logging

    import yaml

    from alignkit.settings import save_config

    with pytest.raises(ConfigError, match=r"dpo-tiny\.yaml: train\.eval_steps: 50 beside train\.eval_strategy=no in "
                                          r"the overrides: 'no' evaluates only after the last step, so eval_steps "
                                          r"would be ignored; set train\.eval_strategy=steps .* or remove"):
        load_config(CONFIG_DIR / "dpo-tiny.yaml", ["train.eval_strategy=no", "train.eval_steps=50"], command="dpo")
    data = yaml.safe_load((CONFIG_DIR / "dpo-tiny.yaml").read_text())
    data.setdefault("data", {})["path"] = str(CONFIG_DIR.parent / data["data"]["path"])
    data["train"].update({"eval_strategy": "no", "eval_steps": 50})
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"train\.eval_steps: 20 beside train\.eval_strategy=no in the config file"):
        load_config(tmp_path / "both.yaml", ["train.eval_steps=20"], command="dpo")
    with caplog.at_level(logging.WARNING, logger="alignkit.settings.load"):
        old = load_config(tmp_path / "both.yaml", command="dpo")
    assert old.train["eval_strategy"] == "no" and old.train["eval_steps"] is None
    assert "both.yaml: train.eval_steps: 50 beside train.eval_strategy=no" in caplog.text
    on = load_config(tmp_path / "both.yaml", ["train.eval_strategy=steps"], command="dpo")
    assert on.train["eval_strategy"] == "steps" and on.train["eval_steps"] == 50
    off = load_config(CONFIG_DIR / "dpo-tiny.yaml", ["train.eval_strategy=no"], command="dpo")  # the off switch
    assert off.train["eval_strategy"] == "no" and off.train["eval_steps"] is None
    save_config(off, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", command="dpo").train == off.train
