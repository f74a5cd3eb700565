"""LobiReFT: a learned bias in an orthonormal low-rank subspace (pyreft's `LobireftIntervention`; one of
the ReFT variants of Wu, Arora et al. 2024, "ReFT: Representation Finetuning for Language Models")."""

from __future__ import annotations

import torch
from torch import nn

from alignkit.interventions.base import Intervention, LowRankRotation, register_intervention


@register_intervention("lobireft")
class LobiReFT(Intervention):
    """Φ(h) = h + Rᵀb

    R ∈ R^{r×d} with orthonormal rows (stored as `rotate_layer.weight` = Rᵀ, (d, r)); b ∈ R^r is
    `learned_source`, initialised U[0, 1) like pyreft. The edit does not depend on h: a steering
    vector constrained to an r-dimensional subspace. Trainable parameters: d·r + r.
    """

    def __init__(
        self,
        embed_dim: int,
        low_rank_dimension: int,
        dropout: float = 0.0,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dt = self.setup(embed_dim, low_rank_dimension, dropout, dtype)
        self.rotate_layer = LowRankRotation(embed_dim, low_rank_dimension, dt)  # weight: (d, r) = Rᵀ
        self.learned_source = nn.Parameter(torch.rand(low_rank_dimension, dtype=dt))  # b: (r,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        b = self.learned_source                                       # (r,)
        rt = self.rotate_layer.weight.to(b.dtype)                     # (d, r) = Rᵀ, evaluated once
        edit = (rt @ b).expand(h.shape)                               # (N, d): Rᵀb for every row
        return self.add_edit(h, edit)
