"""ConsReFT: constant-target subspace ReFT (pyreft's `ConsreftIntervention`; a ReFT variant of Wu, Arora
et al. 2024, "ReFT: Representation Finetuning for Language Models")."""

from __future__ import annotations

import torch

from alignkit.interventions.base import RotatedBiasIntervention, register_intervention


@register_intervention("consreft")
class ConsReFT(RotatedBiasIntervention):
    """Φ(h) = h + Rᵀ(b − Rh)

    Sets the coordinates of h in the subspace spanned by R's rows to the learned constant b, leaving the
    orthogonal complement untouched. R ∈ R^{r×d} with orthonormal rows (stored as `rotate_layer.weight`
    = Rᵀ, (d, r)); b ∈ R^r is `learned_source`, initialised U[0, 1) like pyreft.
    Unlike pyreft (which ignores it here) dropout applies, to the edit. Trainable parameters: d·r + r.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        b = self.learned_source                                       # (r,)
        x = h.to(b.dtype)                                             # (N, d)
        rt = self.rotate_layer.weight.to(b.dtype)                     # (d, r) = Rᵀ, evaluated once
        return self.add_edit(h, (b - x @ rt) @ rt.T)                  # h + dropout(Rᵀ(b − Rh))
