"""Preference pairs from scored rows: the one place where chosen / rejected log-probs become a `PreferenceBatch`.

Every pairwise scorer (the offline preference trainer, online DPO, `alignkit eval`) scores 2B rows in one
forward, the B chosen completions first and then their B rejected ones (`alignkit.data.PreferenceCollator`'s
layout), and asks `Reference.logps` for the reference's values of the same rows:

    logps, lengths = completion_logps(policy, batch)        # (2B,), (2B,)
    batch = pair_batch(logps, lengths, reference.logps(policy, batch))
    out = preference_loss(batch, params, loss_type)
"""

from __future__ import annotations

from torch import Tensor

from alignkit.losses import PreferenceBatch


def pair_batch(logps: Tensor, lengths: Tensor, ref_logps: Tensor | None = None, weights: Tensor | None = None,
               weight_normalization: str = "count") -> PreferenceBatch:
    """`PreferenceBatch` of B pairs from (2B,) per-row values, chosen rows first: the policy's summed completion
    log-probs `logps`, the completions' token counts `lengths`, and the reference's summed log-probs `ref_logps`
    (None for reference-free losses); the pairs' `weights` (B,) and the reduction's `weight_normalization`, for the
    chosen-NLL terms (`PreferenceBatch.nll_scale`)."""
    if logps.dim() != 1 or logps.shape[0] % 2:
        raise ValueError(f"pair_batch: logps must be (2B,) with the chosen rows first, got shape {tuple(logps.shape)}")
    if lengths.shape != logps.shape or (ref_logps is not None and ref_logps.shape != logps.shape):
        raise ValueError(f"pair_batch: logps, lengths and ref_logps must have one value per row, got shapes "
                         f"{tuple(logps.shape)}, {tuple(lengths.shape)}, "
                         f"{None if ref_logps is None else tuple(ref_logps.shape)}")
    B = logps.shape[0] // 2
    ref_w, ref_l = (None, None) if ref_logps is None else (ref_logps[:B], ref_logps[B:])
    return PreferenceBatch(logps[:B], logps[B:], ref_w, ref_l, lengths[:B], lengths[B:], weights=weights,
                           weight_normalization=weight_normalization)


__all__ = ["pair_batch"]
