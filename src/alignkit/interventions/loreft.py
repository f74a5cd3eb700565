"""LoReFT: low-rank linear subspace ReFT (Wu, Arora et al. 2024, "ReFT: Representation Finetuning for
Language Models", eq. 2). pyreft class: `LoreftIntervention`."""

from __future__ import annotations

import torch

from alignkit.interventions.base import LowRankRotation, SourceIntervention, register_intervention


@register_intervention("loreft")
class LoReFT(SourceIntervention):
    """Φ(h) = h + Rᵀ(act(Wh + b) − Rh)

    R ∈ R^{r×d} has orthonormal rows (R Rᵀ = I_r), kept by an orthogonal parametrization and stored the
    pyreft way as `rotate_layer.weight` = Rᵀ, a (d, r) matrix with orthonormal columns. W ∈ R^{r×d} and
    b ∈ R^r form `learned_source`, a Linear(d, r) (b only if `add_bias`). `act` is `act_fn` (None =
    identity, the paper's form). The edit Rᵀ(…) goes through dropout; h never does.
    Trainable parameters: 2·d·r + r (32,772 at d=4096, r=4).
    """

    def projection(self, embed_dim: int, low_rank_dimension: int, dtype: torch.dtype) -> None:
        self.rotate_layer = LowRankRotation(embed_dim, low_rank_dimension, dtype)  # weight: (d, r) = Rᵀ

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        x = h.to(self.learned_source.weight.dtype)                   # (N, d) in the compute dtype
        rt = self.rotate_layer.weight.to(x.dtype)                     # (d, r) = Rᵀ, evaluated once
        delta = self.act(self.learned_source(x)) - x @ rt             # (N, r): act(Wh + b) − Rh
        return self.add_edit(h, delta @ rt.T)                         # h + dropout(Rᵀ delta)
