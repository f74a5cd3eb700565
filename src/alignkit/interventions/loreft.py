"""LoReFT: low-rank linear subspace ReFT (Wu, Arora et al. 2024, "ReFT: Representation Finetuning for
Language Models", eq. 2). pyreft class: `LoreftIntervention`."""

from __future__ import annotations

import torch
from torch import nn

from alignkit.interventions.base import Intervention, LowRankRotation, register_intervention


@register_intervention("loreft")
class LoReFT(Intervention):
    """Φ(h) = h + Rᵀ(act(Wh + b) − Rh)

    R ∈ R^{r×d} has orthonormal rows (R Rᵀ = I_r), kept by an orthogonal parametrization and stored the
    pyreft way as `rotate_layer.weight` = Rᵀ, a (d, r) matrix with orthonormal columns. W ∈ R^{r×d} and
    b ∈ R^r form `learned_source`, a Linear(d, r) (b only if `add_bias`). `act` is `act_fn` (None =
    identity, the paper's form). The edit Rᵀ(…) goes through dropout; h never does.
    Trainable parameters: 2·d·r + r (32,772 at d=4096, r=4).
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
        x = h.to(self.learned_source.weight.dtype)                   # (N, d) in the compute dtype
        rt = self.rotate_layer.weight.to(x.dtype)                     # (d, r) = Rᵀ, evaluated once
        delta = self.act(self.learned_source(x)) - x @ rt             # (N, r): act(Wh + b) − Rh
        return self.add_edit(h, delta @ rt.T)                         # h + dropout(Rᵀ delta)
