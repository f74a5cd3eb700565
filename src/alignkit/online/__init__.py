"""Online alignment, first half: generate from the current policy, annotate, turn feedback into records.

    samples = generate_responses(policy, tokenizer, prompts, SamplingConfig(num_samples=4, max_new_tokens=64))
    scores = RewardModelAnnotator("path/to/rm").annotate([s.prompt for s in samples], [s.response for s in samples])
    pairs = best_worst_pairs(samples, scores, min_margin=0.1)        # PreferenceRecords for DPO
    pairs = reweight(pairs, ["margin_sigmoid"])                       # weights with mean 1

Offline rounds (`rounds.py`) run the same loop through files, so annotation can be a separate job.
"""

from alignkit.online.annotators import (ANNOTATORS, Annotator, AnnotatorError, FunctionAnnotator, JudgeAnnotator,
                                        RewardModelAnnotator, Scores, build_annotator, load_function)
from alignkit.online.feedback import (FEEDBACK_MODES, best_of_n, best_worst_pairs, build_records, judge_pairs,
                                      pointwise, random_pairs)
from alignkit.online.generation import (FINISH_REASONS, Sample, SamplingConfig, generate_responses,
                                        generation_metrics)
from alignkit.online.reweighting import REWEIGHTERS, Reweighter, build_reweighter, reweight
from alignkit.online.rounds import annotate_round, read_samples, run_offline_rounds, sample_round, train_round

__all__ = [
    "SamplingConfig", "Sample", "FINISH_REASONS", "generate_responses", "generation_metrics",
    "ANNOTATORS", "Annotator", "AnnotatorError", "Scores", "RewardModelAnnotator", "FunctionAnnotator",
    "JudgeAnnotator", "build_annotator", "load_function",
    "FEEDBACK_MODES", "build_records", "pointwise", "best_worst_pairs", "random_pairs", "judge_pairs", "best_of_n",
    "REWEIGHTERS", "Reweighter", "build_reweighter", "reweight",
    "sample_round", "annotate_round", "train_round", "run_offline_rounds", "read_samples",
]
