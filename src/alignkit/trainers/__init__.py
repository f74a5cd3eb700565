"""Trainers: one `transformers.Trainer` base (`AlignTrainer`) and one small subclass per objective.

Every trainer works with every adapter kind (`alignkit.models.adapters`: full, lora, reft, reft+lora).
"""

from alignkit.trainers.base import AlignTrainer, turn_off_dropout
from alignkit.trainers.logps import completion_logps, completion_token_logps, prompt_locations, prompt_spans
from alignkit.trainers.sft import SFTTrainer

__all__ = ["AlignTrainer", "SFTTrainer", "completion_logps", "completion_token_logps", "prompt_locations",
           "prompt_spans", "turn_off_dropout"]
