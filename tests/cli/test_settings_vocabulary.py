"""One config vocabulary (issue 11, point 4): settings import no torch; `train:` carries the same keys for every
training command, offline and online; `method:` only the objective, each parameter under one name; old spellings
and bad closed choices are one clear line naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from alignkit.settings import CONFIG_CLASSES, ConfigError, load_config
from alignkit.settings.train import ALIGNKIT_TRAIN_KEYS, OFFLINE_DEFAULTS, ONLINE_COMMANDS, ONLINE_TRAIN_KEYS, TRAIN_KEYS

HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "alignkit.trainers", "alignkit.online",
         "alignkit.models")
PROMPTS = ["model.path=tiny:llama", "data.path=bundled:data/hh_rlhf_sample.jsonl"]
FUNCTION = ["annotator.kind=function", "annotator.function=alignkit.rewards:digit_fraction"]


def test_importing_settings_imports_no_torch():
    code = ("import sys\nimport alignkit.settings, alignkit.cli.helptext\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def online(command: str, *extra: str):
    return load_config(None, [*PROMPTS, *FUNCTION, *extra], command=command)


# ---------------------------------------------------------------------------------------------- one train vocabulary

@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", *ONLINE_COMMANDS])
def test_every_training_command_takes_the_shared_train_keys(command):
    extra = FUNCTION if command in ONLINE_COMMANDS else []
    cfg = load_config(None, [*PROMPTS, *extra, "train.learning_rate=3e-4", "train.max_steps=7", "train.seed=11",
                             "train.save_steps=5", "train.max_grad_norm=0.5"], command=command)
    assert (cfg.train["learning_rate"], cfg.train["max_steps"], cfg.train["seed"]) == (3e-4, 7, 11)
    if command in ONLINE_COMMANDS:  # mapped onto the online trainer's own config
        t = cfg.trainer_config()
        assert (t.learning_rate, t.steps, t.seed, t.save_steps, t.max_grad_norm) == (3e-4, 7, 11, 5, 0.5)


def test_online_train_keys_map_onto_the_trainer_config():
    t = online("grpo", "train.optim=sgd", "train.max_grad_norm=0", "train.disable_tqdm=true",
               "train.gradient_accumulation_steps=2", "train.weight_decay=0.1", "train.report_to=none").trainer_config()
    assert (t.optimizer, t.max_grad_norm, t.progress_bar) == ("sgd", None, False)  # 0: no clipping, as offline
    assert (t.gradient_accumulation_steps, t.weight_decay, t.report_to) == (2, 0.1, "none")
    assert online("ppo").trainer_config().optimizer == "adamw_fused"  # adamw_torch_fused, transformers' default
    assert online("grpo", "train.optim=adamw_torch").trainer_config().optimizer == "adamw"  # the per-tensor loop


def test_online_train_refuses_keys_its_loop_does_not_have():
    with pytest.raises(ConfigError, match=r"^train\.logging_steps: unknown key.* Valid keys: learning_rate, max_steps"):
        online("grpo", "train.logging_steps=5")
    with pytest.raises(ConfigError, match=r"^train\.optim: 'adafactor' is not available for grpo; choose one of: "
                                          r"adamw_torch, adamw_torch_fused, sgd$"):
        online("grpo", "train.optim=adafactor")


@pytest.mark.parametrize("command, cls_name", [("online-dpo", "OnlineDPOConfig"), ("grpo", "GRPOConfig"),
                                               ("rloo", "RLOOConfig"), ("ppo", "PPOConfig")])
def test_online_settings_reach_every_trainer_field_with_the_trainers_defaults(command, cls_name):
    import alignkit.online as online_pkg

    cls = getattr(online_pkg, cls_name)
    built, reference = online(command).trainer_config(), cls()
    own_sections = {"sampling", "save_at_end", "formatter", "max_prompt_length"}  # sampling:, data:, the run folder
    not_settable = {"advantage"}  # the command decides (grpo or rloo)
    if command == "online-dpo":  # the KL controller is only reported by online DPO (its loss has beta)
        not_settable |= {"kl_coef", "kl_target", "kl_horizon", "params"}
    method = {f.name for f in dataclasses.fields(online(command).method)}
    train = {"steps" if k == "max_steps" else "optimizer" if k == "optim" else "progress_bar" if k == "disable_tqdm"
             else k for k in ONLINE_TRAIN_KEYS}
    for f in dataclasses.fields(cls):
        if f.name in own_sections or f.name in not_settable:
            continue
        assert f.name in method | train, f"{cls_name}.{f.name} cannot be set from a config"
        assert getattr(built, f.name) == getattr(reference, f.name), f"{cls_name}.{f.name}: settings' default differs"


def test_offline_train_defaults_shown_by_help_are_transformers_own():
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    for key, value in OFFLINE_DEFAULTS.items():
        if key in ALIGNKIT_TRAIN_KEYS:  # alignkit's own
            assert key not in fields
            continue
        if key == "report_to":  # alignkit's default: null = TensorBoard into <run>/tensorboard when installed
            assert value is None
            continue
        assert key in fields and key in TRAIN_KEYS, key
        assert fields[key].default == value, f"train.{key}: TrainingArguments' default is {fields[key].default!r}"


def test_feedback_choices_agree_with_the_online_package():
    from alignkit.online import FEEDBACK_MODES
    from alignkit.online.dpo import PAIR_MODES
    from alignkit.settings import online as so

    assert so.FEEDBACK_MODES == tuple(FEEDBACK_MODES) and so.PAIR_MODES == PAIR_MODES


# ---------------------------------------------------------------------------------------------- one name per parameter

def test_online_dpo_beta_is_one_key():
    t = online("online-dpo", "method.beta=0.3", "method.label_smoothing=0.1").trainer_config()
    assert (t.params.beta, t.beta, t.params.label_smoothing) == (0.3, 0.3, 0.1)


@pytest.mark.parametrize("command, override, message", [
    ("grpo", "method.steps=3", "method.steps: renamed; use train.max_steps ("),
    ("ppo", "method.learning_rate=1e-4", "method.learning_rate: renamed; use train.learning_rate ("),
    ("rloo", "method.seed=1", "method.seed: renamed; use train.seed ("),
    ("grpo", "method.optimizer=sgd", "method.optimizer: renamed; use train.optim ("),
    ("grpo", "method.progress_bar=false", "method.progress_bar: renamed; use train.disable_tqdm (inverted) ("),
    ("online-dpo", "method.params={beta: 0.5}", "method.params: renamed; use method.<key> (write each preference"),
    ("grpo", "method.advantage=rloo", "method.advantage: renamed; use the command (alignkit grpo or alignkit rloo)"),
    ("ppo", "method.save_at_end=false", "method.save_at_end: removed (the run always writes its model/ folder)"),
    ("sft", "data.padding_free=true", "data.padding_free: renamed; use train.padding_free ("),
    ("dpo", "data.group_by_length=true", "data.group_by_length: renamed; use train.group_by_length ("),
])
def test_an_old_spelling_is_one_line_naming_the_new_key(command, override, message):
    extra = FUNCTION if command in ONLINE_COMMANDS else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [*PROMPTS, *extra, override], command=command)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_old_spelling_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("command: grpo\nmodel: {path: 'tiny:llama'}\ndata: {path: bundled:data/hh_rlhf_sample.jsonl}\n"
                    "annotator: {kind: function, function: 'alignkit.rewards:digit_fraction'}\nmethod: {steps: 5}\n")
    with pytest.raises(ConfigError, match=f"^{path}: method.steps: renamed; use train.max_steps"):
        load_config(path)


@pytest.mark.parametrize("command, override, message", [
    ("grpo", "method.reference=frozen", "method.reference: 'frozen' is not allowed"),
    ("grpo", "method.aggregation=token_mean", "method.aggregation: 'token_mean' is not allowed"),
    ("ppo", "method.reward_normalization=batch", "method.reward_normalization: 'batch' is not allowed"),
    ("online-dpo", "method.feedback=pointwise", "method.feedback: 'pointwise' is not allowed"),
    ("grpo", "annotator.dtype=float64", "annotator.dtype: 'float64' is not allowed"),
])
def test_closed_choices_are_one_line_with_the_allowed_values(command, override, message):
    with pytest.raises(ConfigError) as e:
        online(command, override)
    text = str(e.value)
    assert text.startswith(message) and "Choose one of: " in text and "\n" not in text


# ---------------------------------------------------------------------------------------------- --help lists every key

@pytest.mark.parametrize("command", ["dpo", "grpo", "eval", "annotate", "augment"])
def test_help_built_from_settings_equals_the_command_modules_parser(command):
    from alignkit.cli import build_parser

    def sub_help(parser):
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        return sub.choices[command].format_help()

    assert sub_help(build_parser([command, "--help"])) == sub_help(build_parser())


def test_help_lists_every_settable_key_with_type_and_default():
    from alignkit.cli.helptext import settable_keys

    keys = {k: (t, d) for k, t, d in settable_keys("dpo")}
    assert keys["train.learning_rate"] == ("float", "1e-06") and keys["method.beta"] == ("float", "0.1")
    assert keys["model.path"] == ("str", "required") and keys["adapter.lora.r"] == ("int", "8")
    assert keys["train.padding_free"] == ("bool or null", "null")  # null: the trainer's default (on where faster)
    grpo = {k: (t, d) for k, t, d in settable_keys("grpo")}
    assert grpo["train.max_steps"] == ("int", "100") and grpo["train.learning_rate"] == ("float", "1e-06")
    assert grpo["method.aggregation"][0] == "one of 'sequence_mean', 'token_sum', 'max_length_mean', 'sequence_sum'"
    assert "method.learning_rate" not in grpo and "method.steps" not in grpo and "train.logging_steps" not in grpo
    assert {k for k in grpo if k.startswith("train.")} == {f"train.{k}" for k in ONLINE_TRAIN_KEYS}


def test_trl_seed_flag_sets_train_seed_for_online_commands():
    from alignkit.cli.flags import translate

    assert translate(["--seed", "3", "--max_steps", "2"], "grpo", set()) == ["train.seed=3", "train.max_steps=2"]


def test_dpo_and_online_dpo_share_the_preference_keys_of_preference_params():
    from alignkit.losses import PreferenceParams
    from alignkit.settings.online import OnlineDPOMethod
    from alignkit.settings.sections import DPOMethod, PreferenceObjective

    params = {f.name for f in dataclasses.fields(PreferenceParams)}
    assert set(PreferenceObjective.PARAMS) == params - {"bco_delta"}  # bco_delta: the BCO running mean (state)
    shared = {f.name: f.default for f in dataclasses.fields(PreferenceObjective)}
    for cls in (DPOMethod, OnlineDPOMethod):
        assert {f.name: f.default for f in dataclasses.fields(cls) if f.name in shared} == shared
    assert {k: v for k, v in shared.items() if k in params} == {k: getattr(PreferenceParams(), k)
                                                               for k in PreferenceObjective.PARAMS}
