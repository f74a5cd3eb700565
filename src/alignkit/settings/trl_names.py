"""TRL's config keys that alignkit spells differently or does not have, each with what alignkit has instead.

TRL puts every setting in one config (SFTConfig, DPOConfig, RewardConfig, KTOConfig, GRPOConfig, RLOOConfig,
OnlineDPOConfig, PPOConfig, plus ModelConfig and ScriptArguments; names as of TRL 1.16). A TRL user who writes one
of `TRL_NAMES` where alignkit has no such key (under train, method, data, model, sampling or adapter, in a config
file, a dotted override or a TRL-style --flag) gets one line saying it is TRL's name and what alignkit has instead,
rather than "unknown key" and the list of valid ones. A key alignkit has under the same name and meaning (beta,
loss_type, label_smoothing under dpo's method, max_length under data, ...) is read as usual and never gets here.
docs/trl.md is the same table for readers.
"""

from __future__ import annotations

from typing import Any

# where a TRL name is looked up when a key is unknown: the top-level sections a TRL user's keys land in
# TRL's ModelConfig / ScriptArguments names (its scripts' --flags, a flat TRL config's keys) for alignkit's dotted keys:
# alignkit.cli.flags maps the flags, and a flat config's top-level key names the key it should be nested as
TRL_FLAG_KEYS = {
    "model_name_or_path": "model.path",
    "dataset_name": "data.path",
    "dataset_train_split": "data.split",
    "dataset_test_split": "data.eval_split",
    "torch_dtype": "model.dtype",
    "dtype": "model.dtype",
    "packing": "train.padding_free",
    "padding_free": "train.padding_free",
    "group_by_length": "train.group_by_length",
    "use_peft": "adapter.kind",
    "lora_r": "adapter.lora.r",
    "lora_alpha": "adapter.lora.alpha",
    "lora_dropout": "adapter.lora.dropout",
    "lora_target_modules": "adapter.lora.target_modules",
}
SECTIONS = ("train", "method", "data", "model", "sampling", "adapter")

_NOT_HERE = "alignkit has no equivalent"
_ADAPTIVE_ENTROPY = (f"{_NOT_HERE} (TRL's adaptive entropy control, Skywork-OR1: entropy_coef moved by "
                     "entropy_coef_delta toward entropy_target and applied only below it); method.entropy_coef is a "
                     "fixed coefficient; remove it")
_TR_DPO = ("method.ref_sync: {alpha: <ref_model_mixup_alpha>, steps: <ref_model_sync_steps>} (TR-DPO reference "
           "syncing; dpo, kto, online-dpo, grpo, rloo and ppo with full finetuning; TRL's defaults 0.6 and 512, and "
           "sync_ref_model: true is method.ref_sync set; steps counts optimizer updates)")

TRL_NAMES: dict[str, str] = {
    # data and tokenization (SFTConfig, DPOConfig, RewardConfig, KTOConfig)
    "max_length": "data.max_length (prompt + completion tokens of the offline commands)",
    "max_seq_length": "data.max_length (TRL's older SFTConfig name: prompt + completion tokens)",
    "max_prompt_length": "data.max_prompt_length (a longer prompt keeps its last tokens)",
    "max_completion_length": "sampling.max_new_tokens for the online commands; offline, data.max_length caps prompt "
                             "+ completion",
    "truncation_mode": "no key: a prompt longer than data.max_prompt_length keeps its last tokens, then each "
                       "completion keeps its first data.max_length - prompt tokens (data.max_prompt_length=null: TRL's "
                       "keep_start)",
    "completion_only_loss": "data.loss_on (a prompt-completion row trains its completion only, as TRL's "
                            "completion_only_loss=true; data.loss_on=all trains the prompt too)",
    "assistant_only_loss": "data.loss_on=all_assistant, the default (every assistant turn of a messages "
                           "conversation; data.loss_on=all trains the whole conversation, TRL's default)",
    "packing": "train.padding_free (each batch's sequences in rows without padding)",
    "packing_strategy": "train.padding_free (each batch is packed; there is no strategy to choose)",
    "dataset_text_field": "no key: alignkit reads TRL's prompt / completion and messages columns (data.reader); a "
                          "plain text column has no prompt to tell from the completion",
    "eos_token": "model.tokenizer (a tokenizer folder whose eos_token is that token: alignkit appends the tokenizer's "
                 "own EOS); data.add_eos says whether one follows each plain-text completion (a chat template ends the "
                 "turn itself)",
    "chat_template_path": "model.tokenizer (a tokenizer folder: its chat template is used)",
    "model_init_kwargs": "model.dtype, model.attn_implementation and model.trust_remote_code (from_pretrained's "
                         "arguments alignkit reads)",
    "trust_remote_code": "model.trust_remote_code (the CLI loads the model with it; a trainer in Python takes the "
                         "model already loaded: pass it to from_pretrained)",
    "pad_token": "model.tokenizer (a tokenizer folder whose pad token is set; without one, its EOS token pads)",
    "pad_to_multiple_of": "no key: batches are padded to their longest row (in Python, the data collator's "
                          "pad_to_multiple_of: alignkit.data.SFTCollator, PreferenceCollator)",
    "dataset_kwargs": f"{_NOT_HERE} (TRL's dataset preparation options); data.reader and data.reader_options "
                      "choose how rows are read; remove it",
    "shuffle_dataset": "no key: the Trainer draws the training records in a new random order each epoch (train.seed); "
                       "remove it",
    "eval_packing": "train.padding_free (evaluation batches are laid out as the training ones)",
    "activation_offloading": f"{_NOT_HERE} (train.activation_checkpointing recomputes activations instead of keeping "
                             "them); remove it",
    "router_aux_loss_coef": f"{_NOT_HERE} (a mixture-of-experts router's auxiliary loss is not added to the "
                            "objective); remove it",
    # DPOConfig
    "precompute_ref_batch_size": "train.per_device_eval_batch_size (the batch size method.reference=precomputed "
                                 "scores the reference with)",
    "precompute_ref_log_probs": "method.reference=precomputed with method.reference_cache_dir=<folder> (dpo; kto "
                                "has none: its KL pairs depend on how batches are drawn, so its reference is scored "
                                "each step, method.reference adapter_off or copy)",
    "reference_free": "method.reference=none (dpo)",
    "rpo_alpha": "method.loss_type=[sigmoid, sft] with method.loss_weights=[1, <rpo_alpha>] (the chosen NLL term)",
    "use_weighting": f"{_NOT_HERE} (WPO weighting); remove it",
    "ld_alpha": f"{_NOT_HERE} (LD-DPO); remove it",
    "sync_ref_model": _TR_DPO,
    "ref_model_mixup_alpha": _TR_DPO,
    "ref_model_sync_steps": _TR_DPO,
    "f_divergence_type": "method.loss_type fdpo_js, fdpo_forward_kl or fdpo_alpha for TRL's js_divergence, forward_kl "
                         "or alpha_divergence with loss_type sigmoid (reverse_kl, TRL's default, is loss_type sigmoid "
                         "itself: remove it); TRL 1.16 applies it to hinge, ipo, robust, exo_pair, discopop and "
                         "sigmoid_norm too: those have no f-divergence form here",
    "f_alpha_divergence_coef": "method.f_alpha = 1 - f_alpha_divergence_coef, with method.loss_type=fdpo_alpha (TRL "
                               "1.16 writes f'(t) = (t^(a-1) - 1)/(a-1); method.f_alpha is the f-DPO paper's alpha, "
                               "f'(t) = (1 - t^-alpha)/alpha, which is 1 - TRL's a)",
    # GRPOConfig, RLOOConfig, OnlineDPOConfig, PPOConfig
    "num_generations": "sampling.num_samples (completions per prompt)",
    "beta": "method.beta for dpo, kto and online-dpo; method.kl_coef (the KL-to-reference coefficient) for grpo, rloo "
            "and ppo (TRL's rloo subtracts beta x the summed k1 from the reward: method.kl_in_reward=true with "
            "method.kl_estimator=k1)",
    "loss_type": "method.loss_type for sft, dpo, kto and online-dpo; for grpo and rloo, method.aggregation "
                 "(sequence_mean: TRL's grpo; token_sum: over the step's tokens, TRL's dapo / bnpo; max_length_mean: "
                 "over sequences x sampling.max_new_tokens, TRL's dr_grpo; sequence_sum: TRL's luspo; TRL's cispo: "
                 "method.cispo_max)",
    "epsilon": "method.clip_eps",
    "epsilon_high": "method.clip_eps_high (with TRL's loss_type cispo: method.cispo_max)",
    "cliprange": "method.clip_eps",
    "num_iterations": "method.epochs_per_step",
    "num_ppo_epochs": "method.epochs_per_step",
    "num_mini_batches": "method.mini_batch_size (items per optimizer step, not a number of mini-batches)",
    "scale_rewards": "method.scale_by_std with method.std_scope (TRL's group: scale_by_std true, the default; batch: "
                     "std_scope batch; none or false: scale_by_std false)",
    "reward_clip_range": "method.reward_clip (one bound c: rewards clipped to [-c, c])",
    "reward_weights": "annotator.weights",
    "response_length": "sampling.max_new_tokens",
    "missing_eos_penalty": f"{_NOT_HERE}; write it into the reward function (annotator.function)",
    "use_vllm": "method.generation_backend=vllm",
    "vllm_server_base_url": "method.vllm_server_url",
    "vllm_server_host": "method.vllm_server_url (http://host:port)",
    "vllm_server_port": "method.vllm_server_url (http://host:port)",
    "vllm_gpu_memory_utilization": "method.vllm: {gpu_memory_utilization: ...} (vllm.LLM's arguments)",
    "vllm_tensor_parallel_size": "method.vllm: {tensor_parallel_size: ...} (vllm.LLM's arguments)",
    "importance_sampling_level": "method.importance_sampling (token or sequence: GSPO's one ratio per sequence, exp of "
                                 "the mean of its tokens' log-ratios)",
    "steps_per_generation": "method.epochs_per_step with method.mini_batch_size (several updates per generation step)",
    "min_p": f"{_NOT_HERE} (samples come from the policy at sampling.temperature with sampling.top_p / top_k only, the "
             "distribution the loss scores); remove it",
    "repetition_penalty": f"{_NOT_HERE} (pinned to 1: a penalised sample is not drawn from the policy the loss "
                          "scores); remove it",
    "delta": "method.dual_clip (TRL's min(ratio, delta) before the min bounds, for delta > 1 + epsilon_high, only "
             "negative advantages' loss at delta x A, with the same gradient as the dual clip)",
    "normalize_advantages": f"{_NOT_HERE} (rloo's leave-one-out advantages are not rescaled per batch); remove it",
    "vllm_importance_sampling_correction": f"{_NOT_HERE} (pi_old is the trainer's own log-probs of vLLM's samples, not "
                                           "vLLM's); remove it",
    "use_bias_correction_kl": f"{_NOT_HERE} (the KL term is not weighted by the ratio); remove it",
    "off_policy_mask_threshold": f"{_NOT_HERE}; remove it",
    "use_adaptive_entropy": _ADAPTIVE_ENTROPY,
    "entropy_target": _ADAPTIVE_ENTROPY,
    "entropy_coef_delta": _ADAPTIVE_ENTROPY,
    "entropy_coef_min": _ADAPTIVE_ENTROPY,
    "entropy_coef_max": _ADAPTIVE_ENTROPY,
    "sapo_temperature_pos": f"{_NOT_HERE} (a parameter of TRL's loss_type sapo, which has none here); remove it",
    "sapo_temperature_neg": f"{_NOT_HERE} (a parameter of TRL's loss_type sapo, which has none here); remove it",
    "vespo_k_pos": f"{_NOT_HERE} (a parameter of TRL's loss_type vespo, which has none here); remove it",
    "vespo_lambda_pos": f"{_NOT_HERE} (a parameter of TRL's loss_type vespo, which has none here); remove it",
    "vespo_k_neg": f"{_NOT_HERE} (a parameter of TRL's loss_type vespo, which has none here); remove it",
    "vespo_lambda_neg": f"{_NOT_HERE} (a parameter of TRL's loss_type vespo, which has none here); remove it",
    "multi_objective_aggregation": "method.multi_objective_aggregation of alignkit grpo (sum_then_normalize, the "
                                   "default, or normalize_then_sum: GDPO); rloo, ppo and online-dpo reward the "
                                   "weighted sum of the functions' scores (annotator.weights), TRL's "
                                   "sum_then_normalize; remove it",
    # ModelConfig, ScriptArguments (the --flags of TRL's scripts map these themselves: alignkit.cli.flags.ALIASES)
    "model_name_or_path": "model.path",
    "torch_dtype": "model.dtype",
    "use_peft": "adapter.kind=lora",
    "lora_r": "adapter.lora.r",
    "lora_alpha": "adapter.lora.alpha",
    "lora_dropout": "adapter.lora.dropout",
    "lora_target_modules": "adapter.lora.target_modules",
    "dataset_name": "data.path",
    "dataset_train_split": "data.split",
    "dataset_test_split": "data.eval_split (with data.eval_path)",
    "dataset_config": "no key: data.path names one dataset (a file, a folder or a saved dataset); point it at the "
                      "configuration's own files",
}

# TRL's loss_type values alignkit has not registered, with what it has instead (a did-you-mean would name a neighbour:
# kto_pair -> exo_pair)
TRL_LOSS_TYPES: dict[str, str] = {
    "kto_pair": "alignkit kto (preference rows are read as desirable chosen / undesirable rejected examples; TRL's "
                "older DPO kto_pair)",
    "aot": f"{_NOT_HERE} (AOT sorts log-ratios across the batch; see README, objectives not yet)",
    "aot_unpaired": f"{_NOT_HERE} (AOT sorts log-ratios across the batch; see README, objectives not yet)",
    "dft": f"{_NOT_HERE} (TRL's SFT loss_type dft); use nll",
    "grpo": "method.aggregation=sequence_mean (alignkit grpo's loss_type is not a key)",
    "dapo": "method.aggregation=token_sum (alignkit grpo's loss_type is not a key)",
    "bnpo": "method.aggregation=token_sum (alignkit grpo's loss_type is not a key)",
    "cispo": "method.cispo_max=<TRL's epsilon_high> with method.aggregation=token_sum (TRL's cispo normaliser); "
             "alignkit grpo's loss_type is not a key",
    "dr_grpo": "method.aggregation=max_length_mean (sequences x sampling.max_new_tokens; alignkit grpo's loss_type is "
               "not a key); method.scale_by_std=false gives Dr. GRPO's advantage",
    "sapo": f"{_NOT_HERE} (TRL's SAPO gates the ratio with a sigmoid of temperature sapo_temperature_pos / _neg "
            "instead of clipping it); use the clipped loss (method.clip_eps, method.clip_eps_high) or CISPO "
            "(method.cispo_max)",
    "vespo": f"{_NOT_HERE} (TRL's VESPO weights each sequence by a Gamma function of its ratio, vespo_k_* / "
             "vespo_lambda_*, instead of clipping); use method.importance_sampling=sequence (GSPO's clipped sequence "
             "ratio) or method.cispo_max",
    "luspo": "method.aggregation=sequence_sum with method.importance_sampling=sequence (each sequence's loss summed "
             "over its tokens, averaged over sequences; alignkit grpo's loss_type is not a key)",
}

_F_OTHERS = ("TRL 1.16 applies it to hinge, ipo, robust, exo_pair, discopop and sigmoid_norm too: those have no "
             "f-divergence form here")
_F_DIVERGENCES = {"js_divergence": "fdpo_js", "forward_kl": "fdpo_forward_kl", "alpha_divergence": "fdpo_alpha"}


def trl_equivalent(key: str, value: Any = None) -> str | None:
    """What alignkit has instead of TRL's `key` (None: not one of TRL_NAMES); `value`, TRL's value when known, makes
    the answer exact where it depends on it (f_divergence_type, f_alpha_divergence_coef)."""
    if key == "f_divergence_type" and value in _F_DIVERGENCES:
        return (f"method.loss_type={_F_DIVERGENCES[value]} (TRL's {value} with loss_type sigmoid; {_F_OTHERS})")
    if key == "f_divergence_type" and value == "reverse_kl":
        return "none needed: reverse_kl, TRL's default, is DPO itself (method.loss_type=sigmoid); remove it"
    if key == "f_alpha_divergence_coef" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return (f"method.f_alpha={1 - value:g} (1 - {value:g}) with method.loss_type=fdpo_alpha: TRL 1.16 writes "
                f"f'(t) = (t^(a-1) - 1)/(a-1), and method.f_alpha is the f-DPO paper's alpha, f'(t) = (1 - t^-alpha)"
                f"/alpha, which is 1 - TRL's a")
    if key == "loss_type" and isinstance(value, str) and value in TRL_LOSS_TYPES:  # grpo / rloo: loss_type is no key
        return f"for TRL's loss_type {value}, {TRL_LOSS_TYPES[value]}"
    return TRL_NAMES.get(key)


def trl_loss_type_message(where: str, name: str) -> str | None:
    """The one-line ConfigError text for TRL's loss type `name`, not registered, under key `where` (None: not one of
    TRL_LOSS_TYPES)."""
    if name not in TRL_LOSS_TYPES:
        return None
    return f"{where}: {name!r} is TRL's loss type, not registered here; alignkit: {TRL_LOSS_TYPES[name]}"


def trl_top_level_message(key: str) -> str | None:
    """The one-line ConfigError text for a flat TRL config's key at the top level of an alignkit config (None: not
    one of TRL_FLAG_KEYS): alignkit's configs nest each key in its section."""
    if key not in TRL_FLAG_KEYS:
        return None
    dotted = TRL_FLAG_KEYS[key]
    parts = dotted.split(".")
    nested = "lora" if key == "use_peft" else "..."  # use_peft: true is adapter.kind lora
    for part in reversed(parts[1:]):
        nested = f"{{{part}: {nested}}}"
    return (f"{key}: unknown key at the top level ({key} is TRL's name, as in a flat TRL config); alignkit: {dotted}, "
            f"nested in its section ({parts[0]}: {nested}), as is every setting but output_dir (training arguments "
            f"under train:); or give TRL's names as flags (--{key} ...)")


def trl_key_message(where: str, key: str, value: Any = None) -> str | None:
    """The one-line ConfigError text for TRL's `key` unknown under section `where` (None: `where` is not one of
    SECTIONS, or `key` is not TRL's)."""
    if where not in SECTIONS:
        return None
    instead = trl_equivalent(key, value)
    if instead is None:
        return None
    return f"{where}.{key}: unknown key here ({key} is TRL's name); alignkit: {instead}"


__all__ = ["SECTIONS", "TRL_FLAG_KEYS", "TRL_LOSS_TYPES", "TRL_NAMES", "trl_equivalent", "trl_key_message",
           "trl_loss_type_message", "trl_top_level_message"]
