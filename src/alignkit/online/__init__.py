"""Online alignment, first half: generate from the current policy, annotate, turn feedback into records.

    samples = generate_responses(policy, tokenizer, prompts, SamplingConfig(num_samples=4, max_new_tokens=64))
    scores = RewardModelAnnotator("path/to/rm").annotate([s.prompt for s in samples], [s.response for s in samples])
    pairs = best_worst_pairs(samples, scores, min_margin=0.1)        # PreferenceRecords for DPO
    pairs = reweight(pairs, ["margin_sigmoid"])                       # weights with mean 1

Offline rounds (`rounds.py`) run the same loop through files, so annotation can be a separate job.

Online optimizers (one loop, `trainer.OnlineTrainer`: generate -> annotate -> build batch -> optimise):

    policy = apply_adapter(load_model(path), AdapterConfig(kind="lora"))
    trainer = GRPOTrainer(policy, tokenizer, prompts, {"type": "function", "fn": "my_rewards:exact"},
                          GRPOConfig(steps=100, sampling=SamplingConfig(num_samples=8)), output_dir="out/")
    trainer.train()                      # metrics -> out/metrics.jsonl, adapter -> out/

`OnlineDPOTrainer` (pairs from each round's samples, any preference loss), `GRPOTrainer` / `RLOOTrainer`
(group-relative advantages, clipped policy gradient, k1/k2/k3 KL), `PPOTrainer` (value head + GAE).
"""

from alignkit.online.annotators import (ANNOTATORS, Annotator, AnnotatorArgumentError, AnnotatorError,
                                        FunctionAnnotator, RewardModelAnnotator, Scores, build_annotator,
                                        load_function)
from alignkit.online.judge import JudgeAnnotator  # registers the "judge" annotator
from alignkit.online.feedback import (FEEDBACK_MODES, best_of_n, best_worst_pairs, build_records, judge_pairs,
                                      pointwise, random_pairs)
from alignkit.online.generation import (FINISH_REASONS, Sample, SamplingConfig, generate_responses,
                                        generation_metrics)
from alignkit.online.reweighting import REWEIGHTERS, Reweighter, build_reweighter, reweight
from alignkit.online.rounds import annotate_round, read_samples, run_offline_rounds, sample_round, train_round
from alignkit.online.normalize import NORMALIZATIONS, RunningMoments, group_normalize, normalize_rewards
from alignkit.online.trainer import OnlineConfig, OnlineTrainer, Rollout
from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer, ppo_advantages
from alignkit.online.value_head import ValueHead

__all__ = [
    "SamplingConfig", "Sample", "FINISH_REASONS", "generate_responses", "generation_metrics",
    "ANNOTATORS", "Annotator", "AnnotatorArgumentError", "AnnotatorError", "Scores", "RewardModelAnnotator",
    "FunctionAnnotator", "JudgeAnnotator", "build_annotator", "load_function",
    "FEEDBACK_MODES", "build_records", "pointwise", "best_worst_pairs", "random_pairs", "judge_pairs", "best_of_n",
    "REWEIGHTERS", "Reweighter", "build_reweighter", "reweight",
    "sample_round", "annotate_round", "train_round", "run_offline_rounds", "read_samples",
    "NORMALIZATIONS", "RunningMoments", "group_normalize", "normalize_rewards",
    "OnlineConfig", "OnlineTrainer", "Rollout", "OnlineDPOConfig", "OnlineDPOTrainer", "GRPOConfig", "GRPOTrainer",
    "RLOOConfig", "RLOOTrainer", "PPOConfig", "PPOTrainer", "ppo_advantages", "ValueHead",
]
