"""Checks of an online run's update schedule shared by the run config (`alignkit.settings.online`) and the library's
`alignkit.online.OnlineConfig`: a clip key that one update per step leaves inert, and gradient accumulation beyond
what a minibatch holds."""

from __future__ import annotations

import dataclasses
from typing import Any

from alignkit.settings.typed import ConfigError

# The keys that clip against the policy (and PPO's values) that sampled the step: they act only from a step's second
# update on, so one update per generation step leaves them inert (ratio pi / pi_old exactly 1; values = old values)
CLIP_KEYS = {"clip_eps": "clips the policy ratio pi / pi_old", "clip_eps_high": "sets the upper clip of the policy "
             "ratio pi / pi_old", "dual_clip": "bounds the loss of a policy ratio pi / pi_old far above 1 (negative "
             "advantages)", "cliprange_value": "clips the value head's change from its rollout values",
             "importance_sampling": "takes one ratio pi / pi_old per sequence (GSPO), which at ratio 1 gives the same "
             "gradient as a ratio per token", "cispo_max": "caps CISPO's weight pi / pi_old, which at ratio 1 "
             "(weight 1) gives the clipped loss's gradient"}


def check_clip_acts(method: Any, samples_per_step: int, where: str = "method.") -> None:
    """ConfigError naming a clip key (`CLIP_KEYS`) set to a value other than its default (and not null: off) when the
    step makes one update (method.epochs_per_step 1, method.mini_batch_size null or >= the step's samples): the
    first update's policy is the one that sampled, so nothing is ever clipped (TRL's num_iterations=1 alike). The
    run config's check (`where`: its keys' prefix) and the library configs' (`alignkit.online.OnlineConfig`: bare
    keys), before anything is written."""
    updates = method.epochs_per_step * (1 if method.mini_batch_size is None
                                        else -(-samples_per_step // method.mini_batch_size))
    if updates > 1:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(method)}
    for key, what in CLIP_KEYS.items():
        value = getattr(method, key, None)
        if key == "importance_sampling" and getattr(method, "top_entropy_quantile", 1.0) < 1 or \
                key == "cispo_max" and value is not None and value < 1:
            continue  # the sequence ratio's gradient spans tokens the entropy mask drops; a cap < 1 scales at ratio 1
        if key in defaults and value is not None and value != defaults[key]:
            batch = (f"{'null' if where else 'None'} (the whole step)" if method.mini_batch_size is None else
                     f"{method.mini_batch_size} >= the step's {samples_per_step}")
            raise ConfigError(f"{where}{key}: {value!r} {what}, and with one update per generation step "
                              f"({where}epochs_per_step=1, {where}mini_batch_size {batch}) the policy is still the one "
                              "that sampled, so it would never act; remove it, or make several updates per step: "
                              f"{where}epochs_per_step >= 2 or {where}mini_batch_size < {samples_per_step} (the "
                              f"step's {where}prompts_per_step x sampling.num_samples samples)")


def check_accumulation(settings: Any, accumulation: int, num_samples: int, *, train: str = "train.",
                       method: str = "method.") -> None:
    """ConfigError when `gradient_accumulation_steps` is above the most items a minibatch can hold (the step's
    samples; online DPO's pairs (`settings.feedback`): one per prompt for best_worst, feedback_kwargs.pairs_per_prompt
    (default 1; all when <= 0) of the num_samples x (num_samples - 1) / 2 for the other feedback;
    `mini_batch_size` when smaller): each minibatch is split into that many micro-batches, so the extra ones were
    empty and ran a zero-weight forward and backward each, on every update (the gradient is the same). The one check
    of the run config (`train` / `method`: the prefixes its keys are spelled with) and of the library's
    `alignkit.online.OnlineConfig` (bare keys), before anything is written. On several processes a minibatch's share
    is smaller still: the trainer warns (`MinibatchUpdates`)."""
    prompts = settings.prompts_per_step
    feedback = getattr(settings, "feedback", None)  # online DPO's: its items are pairs
    if feedback is not None:
        every = num_samples * (num_samples - 1) // 2
        asked = (settings.feedback_kwargs or {}).get("pairs_per_prompt", 1)
        asked = asked if isinstance(asked, int) else 0  # not a count: bound by every pair (refused elsewhere)
        if feedback == "best_worst":
            per_prompt, why = 1, f"1 for {method}feedback best_worst"
        elif 0 < asked < every:
            per_prompt, why = asked, f"{method}feedback_kwargs.pairs_per_prompt {asked} (1 by default) for {feedback}"
        else:
            per_prompt, why = every, f"the {every} pairs of sampling.num_samples {num_samples}"
        items = prompts * per_prompt
        what = f"{items} pair(s) ({method}prompts_per_step {prompts} x {why})"
    else:
        items = prompts * num_samples
        what = f"{items} sample(s) ({method}prompts_per_step {prompts} x sampling.num_samples {num_samples})"
    if settings.mini_batch_size is not None and settings.mini_batch_size > items:  # one update, as if it were null
        raise ConfigError(f"{method}mini_batch_size: {settings.mini_batch_size} items per optimizer step is more than "
                          f"a step gives, at most {what}, so each step makes one update over all of them, as if it "
                          f"were unset; set {method}mini_batch_size below {items} for several updates a step, or "
                          "remove it")
    if settings.mini_batch_size is not None and settings.mini_batch_size < items:
        items, what = settings.mini_batch_size, f"{settings.mini_batch_size} item(s) ({method}mini_batch_size)"
    if accumulation > items:
        raise ConfigError(f"{train}gradient_accumulation_steps: {accumulation} splits each minibatch into "
                          f"{accumulation} micro-batches, and a minibatch holds at most {what}, so at least "
                          f"{accumulation - items} of them would be empty zero-weight passes on every update (the "
                          f"gradient is the same); set {train}gradient_accumulation_steps to {items} or less")


__all__ = ["CLIP_KEYS", "check_accumulation", "check_clip_acts"]
