"""The bounds of the loss hyper-parameters, one table read by both sides that check them: the CLI's config bounds
(`settings/bounds.py`, the `method` section) and the Python API (`losses.PreferenceParams`, `losses.check_signs`
for KTOTrainer / RewardTrainer). Past a bound a loss trains its term the other way (toward the rejected answers,
up the chosen answers' NLL) or divides by 0. Torch-free and importing nothing of alignkit, so `settings/` (torch-free)
and `losses/` both read it.
"""

from __future__ import annotations

from typing import Any, Callable


def positive(v: Any) -> bool:
    return v > 0


def nonnegative(v: Any) -> bool:
    return v >= 0


# key -> (test, the bound, why): the wording both the CLI's and the Python API's errors give (`allowed`)
LOSS_BOUNDS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "beta": (positive, "> 0", "the strength of the KL to the reference; <= 0 trains toward the rejected answers"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)",
                        "the share of flipped labels; >= 0.5 trains toward the rejected answers"),
    "loss_weights": (nonnegative, ">= 0 for each loss type", "< 0 trains that loss the other way"),
    "orpo_lambda": (nonnegative, ">= 0", "< 0 trains toward the rejected answers"),
    "cpo_alpha": (nonnegative, ">= 0", "< 0 raises the chosen answers' NLL"),
    "slic_lambda": (nonnegative, ">= 0", "< 0 lowers the chosen answers' likelihood"),
    # SLiC-HF's calibration margin in max(0, delta - log pi(y_w|x) + log pi(y_l|x)): 0 is the margin-free ranking
    # hinge (it still pushes y_w above y_l); < 0 is satisfied while the rejected answer is the likelier by up to
    # |delta|, i.e. it trains toward a margin in favour of the rejected answers (TRL has no SLiC trainer to compare)
    "slic_delta": (nonnegative, ">= 0", "the margin of the chosen over the rejected log-likelihood; < 0 accepts the "
                   "rejected answers ahead by up to |delta|"),
    # SimPO's target reward margin gamma >= 0 (Meng et al. 2024, Eq. 6; gamma = 0 is their ablation), so gamma / beta
    # >= 0 with beta > 0; TRL 1.16's CPOConfig.simpo_gamma is unchecked ("target reward margin")
    "simpo_gamma_beta_ratio": (nonnegative, ">= 0", "SimPO's target margin gamma / beta; < 0 asks for a margin in "
                               "favour of the rejected answers"),
    "discopop_tau": (positive, "> 0", "DiscoPOP's mixing temperature"),
    "f_alpha": (positive, "> 0", "f-DPO's alpha; alpha -> 0 is DPO's reverse KL"),
    "center_rewards_coefficient": (nonnegative, ">= 0, or null for no centering",
                                   "< 0 pushes the rewards away from 0 without bound"),
    "desirable_weight": (nonnegative, ">= 0", "< 0 trains the desirable answers' term the other way"),
    "undesirable_weight": (nonnegative, ">= 0", "< 0 trains the undesirable answers' term the other way"),
    "l2_coefficient": (nonnegative, ">= 0", "< 0 pushes the rewards away from 0 without bound"),
}


def allowed(key: str) -> str:
    """What `key` may be, with why: '> 0 (the strength of ...)', as the CLI's bounds say it."""
    _, bound, why = LOSS_BOUNDS[key]
    return f"{bound} ({why})"


def past_bound(key: str, value: Any) -> bool:
    """Whether `value` is past `key`'s bound in LOSS_BOUNDS (None, and a key the table does not have, are not)."""
    return value is not None and key in LOSS_BOUNDS and not LOSS_BOUNDS[key][0](value)


__all__ = ["LOSS_BOUNDS", "allowed", "nonnegative", "past_bound", "positive"]
