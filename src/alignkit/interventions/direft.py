"""DiReFT: the paper's "direct" ReFT (Wu, Arora et al. 2024, "ReFT: Representation Finetuning for
Language Models", eq. 3): no orthogonality and no difference term, a LoRA-like low-rank edit of h.

Naming versus pyreft: the paper's DiReFT is pyreft's `NodireftIntervention` (plain projections), which is
what this type is. pyreft's `DireftIntervention` keeps an orthonormal R; alignkit calls that one
"direft_orth" (direft_orth.py). See PYREFT_TYPE_MAPPING in pyreft_compat.py.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.interventions.base import SourceIntervention, register_intervention


@register_intervention("direft")
class DiReFT(SourceIntervention):
    """Φ(h) = h + W₂ᵀ act(W₁h + b)

    W₂ ∈ R^{r×d} is the weight of `proj_layer` (a bias-free Linear(d, r); pyreft's optional bias there
    never enters the output, so we do not create it). W₁ ∈ R^{r×d}, b ∈ R^r form `learned_source`
    (b only if `add_bias`). act = `act_fn` (None = identity, the paper's form).
    Trainable parameters: 2·d·r + r.
    """

    def projection(self, embed_dim: int, low_rank_dimension: int, dtype: torch.dtype) -> None:
        self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=False, dtype=dtype)  # W₂

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        x = h.to(self.learned_source.weight.dtype)                            # (N, d)
        z = self.act(self.learned_source(x))                                  # (N, r): act(W₁h + b)
        return self.add_edit(h, z @ self.proj_layer.weight)                   # h + dropout(W₂ᵀ z)
