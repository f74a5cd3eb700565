"""DiReFT with an orthonormal write-back projection: what pyreft names `DireftIntervention`.

The paper (Wu, Arora et al. 2024, "ReFT: Representation Finetuning for Language Models", eq. 3) defines
DiReFT with plain projections; that is alignkit's "direft" (pyreft's `NodireftIntervention`). This type
keeps pyreft's orthonormal R instead, under its own name "direft_orth", so pyreft checkpoints of
`DireftIntervention` load without changing what they compute.
"""

from __future__ import annotations

import torch

from alignkit.interventions.base import LowRankRotation, SourceIntervention, register_intervention


@register_intervention("direft_orth")
class DiReFTOrth(SourceIntervention):
    """Φ(h) = h + Rᵀ act(Wh + b)

    R ∈ R^{r×d} with orthonormal rows (stored as `rotate_layer.weight` = Rᵀ, (d, r)); W ∈ R^{r×d},
    b ∈ R^r form `learned_source` (b only if `add_bias`). act = `act_fn` (None = identity).
    Trainable parameters: 2·d·r + r.
    """

    def projection(self, embed_dim: int, low_rank_dimension: int, dtype: torch.dtype) -> None:
        self.rotate_layer = LowRankRotation(embed_dim, low_rank_dimension, dtype)  # weight: (d, r) = Rᵀ

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        x = h.to(self.learned_source.weight.dtype)                            # (N, d)
        rt = self.rotate_layer.weight.to(x.dtype)                             # (d, r) = Rᵀ, evaluated once
        return self.add_edit(h, self.act(self.learned_source(x)) @ rt.T)      # h + dropout(Rᵀ act(Wh + b))
