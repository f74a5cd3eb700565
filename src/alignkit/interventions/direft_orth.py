"""DiReFT with an orthonormal write-back projection: what pyreft names `DireftIntervention`.

The paper (Wu, Arora et al. 2024, "ReFT: Representation Finetuning for Language Models", eq. 3) defines
DiReFT with plain projections; that is alignkit's "direft" (pyreft's `NodireftIntervention`). This type
keeps pyreft's orthonormal R instead, under its own name "direft_orth", so pyreft checkpoints of
`DireftIntervention` load without changing what they compute.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.interventions.base import Intervention, LowRankRotation, register_intervention


@register_intervention("direft_orth")
class DiReFTOrth(Intervention):
    """Φ(h) = h + Rᵀ act(Wh + b)

    R ∈ R^{r×d} with orthonormal rows (stored as `rotate_layer.weight` = Rᵀ, (d, r)); W ∈ R^{r×d},
    b ∈ R^r form `learned_source` (b only if `add_bias`). act = `act_fn` (None = identity).
    Trainable parameters: 2·d·r + r.
    """

    def __init__(
        self,
        embed_dim: int,
        low_rank_dimension: int,
        dropout: float = 0.0,
        act_fn: str | None = None,
        add_bias: bool = True,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dt = self.setup(embed_dim, low_rank_dimension, dropout, dtype, act_fn=act_fn, add_bias=add_bias)
        self.rotate_layer = LowRankRotation(embed_dim, low_rank_dimension, dt)  # weight: (d, r) = Rᵀ
        self.learned_source = nn.Linear(embed_dim, low_rank_dimension, bias=add_bias, dtype=dt)  # W, b

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        x = h.to(self.learned_source.weight.dtype)                            # (N, d)
        rt = self.rotate_layer.weight.to(x.dtype)                             # (d, r) = Rᵀ, evaluated once
        return self.add_edit(h, self.act(self.learned_source(x)) @ rt.T)      # h + dropout(Rᵀ act(Wh + b))
