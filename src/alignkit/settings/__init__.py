"""Run configs: typed sections, read from YAML plus dotted command-line overrides.

    cfg = load_config("configs/dpo.yaml", ["method.beta=0.05", "train.learning_rate=1e-4"], command="dpo")
    cfg.method.beta                          # 0.05 (a float: override values are parsed as YAML scalars)
    save_config(cfg, "run/config.yaml")      # the resolved config; load_config(that file) gives cfg again

A config is one dataclass per command (`CONFIG_CLASSES`) made of sections:
- `model`    (`ModelSettings`): path (a folder, a hub id, or `tiny:<arch>` for a random tiny model built
             locally), dtype, attention implementation, trust_remote_code (off by default);
- `data`     (`DataSettings`): files, reader and formatter names, length limits, evaluation split;
- `adapter`  (`alignkit.adapters.config.AdapterConfig`, torch-free): full / lora / reft / reft+lora;
- `method`   the objective's parameters only, one class per objective (`SFTMethod`, `RewardMethod`, `DPOMethod`,
             `KTOMethod`, `EvalMethod`; online: `OnlineDPOMethod`, `GRPOMethod`, `PPOMethod`), each under one name;
- `train`    the optimisation keys, one vocabulary for every training command, offline and online
             (settings/train.py: learning_rate, max_steps, seed, save_steps, report_to, ...; offline commands pass
             it to `transformers.TrainingArguments`, online ones map it onto their trainer's config);
- `generation` / `sampling` (`SamplingConfig`, settings/sampling.py); online: `annotator` (settings/online.py).

Importing this package imports no torch, transformers, peft or accelerate: what needs them (trainer configs,
registries, TrainingArguments' fields) is imported when a config is loaded or used.
Old spellings (`method.steps` in an online config, `method.params.beta`, `data.padding_free`) are a ConfigError
naming the new key (settings/train.py:RENAMED).

Every key is checked: an unknown key or a value of the wrong type is a `ConfigError` naming the dotted
key, the valid keys and the closest match. Scalars follow YAML 1.2 (`1e-4` is a float, `no` a string).
"""


from alignkit.settings.load import (check_training_args, command_of, config_from_dict, config_to_dict, dump_config,
                                    load_config, save_config)
from alignkit.settings.sections import (CONFIG_CLASSES, TRAIN_COMMANDS, DataSettings, DPOConfig, DPOMethod, EvalConfig,
                                        EvalMethod, GenerateConfig, KTOConfig, KTOMethod, ModelSettings, RewardConfig,
                                        RewardMethod, SFTConfig, SFTMethod, TrainConfig)
from alignkit.settings.typed import ConfigError, build, coerce, merge, parse_overrides, parse_value, read_yaml
from alignkit.settings.online import ONLINE_CONFIG_CLASSES, AnnotateConfig, AnnotatorSettings, SampleConfig
from alignkit.adapters.config import AdapterConfig, LoraSettings, ReftSettings
from alignkit.settings.sampling import SamplingConfig
from alignkit.settings.train import ONLINE_COMMANDS, TRAIN_KEYS

from alignkit.settings.serve import ServeConfig
from alignkit.settings.augment import AugmentConfig, FilterSettings, LLMSettings

CONFIG_CLASSES.update(ONLINE_CONFIG_CLASSES)  # online-dpo, grpo, rloo, ppo, sample, annotate (settings/online.py)
CONFIG_CLASSES["serve"] = ServeConfig  # settings/serve.py
CONFIG_CLASSES["augment"] = AugmentConfig  # settings/augment.py

__all__ = ["AdapterConfig", "LoraSettings", "ReftSettings", "SamplingConfig", "ONLINE_COMMANDS", "TRAIN_KEYS",
           "AugmentConfig", "FilterSettings", "LLMSettings", "AnnotateConfig", "AnnotatorSettings", "SampleConfig",
           "ServeConfig", "CONFIG_CLASSES", "TRAIN_COMMANDS", "ConfigError", "DPOConfig", "DPOMethod", "DataSettings",
           "EvalConfig", "EvalMethod", "GenerateConfig", "KTOConfig", "KTOMethod", "ModelSettings", "RewardConfig",
           "RewardMethod", "SFTConfig", "SFTMethod", "TrainConfig", "build", "check_training_args", "coerce",
           "command_of", "config_from_dict", "config_to_dict", "dump_config", "load_config", "merge",
           "parse_overrides", "parse_value", "read_yaml", "save_config"]
