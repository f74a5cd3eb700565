"""LobiReFT: a learned bias in an orthonormal low-rank subspace (pyreft's `LobireftIntervention`; one of
the ReFT variants of Wu, Arora et al. 2024, "ReFT: Representation Finetuning for Language Models")."""

from __future__ import annotations

import torch

from alignkit.interventions.base import RotatedBiasIntervention, register_intervention


@register_intervention("lobireft")
class LobiReFT(RotatedBiasIntervention):
    """Φ(h) = h + Rᵀb

    R ∈ R^{r×d} with orthonormal rows (stored as `rotate_layer.weight` = Rᵀ, (d, r)); b ∈ R^r is
    `learned_source`, initialised U[0, 1) like pyreft. The edit does not depend on h: a steering
    vector constrained to an r-dimensional subspace. Trainable parameters: d·r + r.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        b = self.learned_source                                       # (r,)
        rt = self.rotate_layer.weight.to(b.dtype)                     # (d, r) = Rᵀ, evaluated once
        edit = (rt @ b).expand(h.shape)                               # (N, d): Rᵀb for every row
        return self.add_edit(h, edit)
