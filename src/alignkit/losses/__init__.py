"""Losses: pure tensor functions, no model or trainer state.

Every loss returns `LossOutput(losses (B,), metrics, num_tokens)`; the trainer base reduces once with
`reduce_loss`. Registries by name (for configs and `alignkit ls`) are in `REGISTRIES`.
"""

from __future__ import annotations

from .logprobs import (IGNORE_INDEX, TokenLogprobs, chunked_lm_logprobs, entropy_from_logits,
                       selective_log_softmax, sequence_logps)
from .policy import (AdaptiveKLController, FixedKLController, batch_standardized, clip_rewards,
                     clipped_policy_loss, decoupled_rewards, gae, group_advantages, high_entropy_mask, kl_k1,
                     kl_k2, kl_k3, masked_whiten, nan_std, per_token_rewards, rloo_advantages, value_loss)
from .preference import (CHOSEN_NLL_LOSSES, PreferenceBatch, PreferenceParams, check_loss_weights, preference_loss,
                         resolve_params)
from .registry import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES, REGISTRIES,
                       REWARD_LOSSES, SFT_LOSSES, UNPAIRED_LOSSES, LossOutput, Registry, check_signs, reduce_loss)
from .reward import bradley_terry_loss, kendall_tau, ranking_loss
from .sft import sft_loss
from .unpaired import KL_LOSSES, apo_zero_unpaired_loss, kto_kl_estimate, kto_loss

__all__ = ["IGNORE_INDEX", "TokenLogprobs", "chunked_lm_logprobs", "entropy_from_logits", "selective_log_softmax",
           "sequence_logps", "AdaptiveKLController", "FixedKLController", "clip_rewards", "clipped_policy_loss", "gae",
           "group_advantages", "kl_k1", "kl_k2", "kl_k3", "masked_whiten", "nan_std", "per_token_rewards",
           "rloo_advantages", "batch_standardized", "decoupled_rewards", "high_entropy_mask",
           "value_loss", "PreferenceBatch", "PreferenceParams", "check_loss_weights", "preference_loss",
           "resolve_params", "CHOSEN_NLL_LOSSES", "ADVANTAGES", "KL_ESTIMATORS", "POLICY_LOSSES", "PREFERENCE_LOSSES",
           "REGISTRIES",
           "REWARD_LOSSES", "SFT_LOSSES", "UNPAIRED_LOSSES", "LossOutput", "Registry", "check_signs", "reduce_loss",
           "bradley_terry_loss", "kendall_tau", "ranking_loss", "sft_loss", "KL_LOSSES", "apo_zero_unpaired_loss",
           "kto_kl_estimate", "kto_loss"]
