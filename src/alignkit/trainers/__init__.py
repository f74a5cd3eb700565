"""Trainers: one `transformers.Trainer` base (`AlignTrainer`) and one small subclass per objective.

Every trainer works with every adapter kind (`alignkit.adapters`: full, lora, reft, reft+lora).
"""

from alignkit.trainers.base import TRAINER_EVAL_METRICS, AlignTrainer, turn_off_dropout
from alignkit.trainers.checks import check_best_metric_name, check_best_model_metric, lower_is_better
from alignkit.trainers.kto import KTOTrainer, mismatched_batch
from alignkit.trainers.logps import completion_logps, completion_token_logps, prompt_locations, prompt_spans
from alignkit.trainers.preference import REFERENCE_FREE, DPOTrainer, PreferenceTrainer
from alignkit.trainers.pairs import pair_batch
from alignkit.trainers.reference import Reference, ReferenceCollator, build_reference, frozen_copy, load_or_compute
from alignkit.trainers.reward import RewardTrainer, sequence_rewards
from alignkit.trainers.sft import SFTTrainer

# the offline objectives: training command -> its trainer (alignkit.cli.train builds it; a config's
# train.metric_for_best_model is checked against its `eval_metrics` when loaded)
TRAINERS: dict[str, type[AlignTrainer]] = {"sft": SFTTrainer, "rm": RewardTrainer, "dpo": PreferenceTrainer,
                                           "kto": KTOTrainer}

__all__ = ["AlignTrainer", "DPOTrainer", "KTOTrainer", "PreferenceTrainer", "REFERENCE_FREE", "Reference",
           "TRAINERS", "TRAINER_EVAL_METRICS", "check_best_metric_name", "check_best_model_metric",
           "ReferenceCollator", "RewardTrainer", "SFTTrainer", "build_reference", "completion_logps",
           "completion_token_logps", "frozen_copy", "load_or_compute", "mismatched_batch", "pair_batch",
           "lower_is_better", "prompt_locations", "prompt_spans", "sequence_rewards", "turn_off_dropout"]
