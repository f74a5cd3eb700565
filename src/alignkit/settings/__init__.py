"""Run configs: typed sections, read from YAML plus dotted command-line overrides.

    cfg = load_config("configs/dpo.yaml", ["method.beta=0.05", "train.learning_rate=1e-4"], command="dpo")
    cfg.method.beta                          # 0.05 (a float: override values are parsed as YAML scalars)
    save_config(cfg, "run/config.yaml")      # the resolved config; load_config(that file) gives cfg again

A config is one dataclass per command (`CONFIG_CLASSES`) made of sections:
- `model`    (`ModelSettings`): path (a folder, a hub id, or `tiny:<arch>` for a random tiny model built
             locally), dtype, attention implementation, trust_remote_code (off by default);
- `data`     (`DataSettings`): files, reader and formatter names, length limits, evaluation split;
- `adapter`  (`alignkit.models.adapters.AdapterConfig`): full / lora / reft / reft+lora;
- `method`   (one per objective: `SFTMethod`, `RewardMethod`, `DPOMethod`, `KTOMethod`, `EvalMethod`);
- `train`    a mapping passed straight to `transformers.TrainingArguments` (keys checked against its fields);
- `generation` (`alignkit.online.SamplingConfig`) for `generate`;
- online commands (`settings/online.py`): `annotator`, `sampling` and a `method` derived from the trainer's config.

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

from alignkit.settings.serve import ServeConfig
from alignkit.settings.augment import AugmentConfig, FilterSettings, LLMSettings

CONFIG_CLASSES.update(ONLINE_CONFIG_CLASSES)  # online-dpo, grpo, rloo, ppo, sample, annotate (settings/online.py)
CONFIG_CLASSES["serve"] = ServeConfig  # settings/serve.py
CONFIG_CLASSES["augment"] = AugmentConfig  # settings/augment.py

__all__ = ["AugmentConfig", "FilterSettings", "LLMSettings", "AnnotateConfig", "AnnotatorSettings", "SampleConfig", "ServeConfig",
           "CONFIG_CLASSES", "TRAIN_COMMANDS", "ConfigError", "DPOConfig", "DPOMethod", "DataSettings", "EvalConfig",
           "EvalMethod", "GenerateConfig", "KTOConfig", "KTOMethod", "ModelSettings", "RewardConfig", "RewardMethod",
           "SFTConfig", "SFTMethod", "TrainConfig", "build", "check_training_args", "coerce", "command_of",
           "config_from_dict", "config_to_dict", "dump_config", "load_config", "merge", "parse_overrides",
           "parse_value", "read_yaml", "save_config"]
