"""NoReFT: LoReFT without the orthogonality constraint (pyreft's `NoreftIntervention`; an ablation in
Wu, Arora et al. 2024, "ReFT: Representation Finetuning for Language Models")."""

from __future__ import annotations

import torch
from torch import nn

from alignkit.interventions.base import Intervention, register_intervention


@register_intervention("noreft")
class NoReFT(Intervention):
    """Φ(h) = h + W₂ᵀ(act(W₁h + b) − (W₂h + c))

    W₂ ∈ R^{r×d} is `proj_layer`, a plain Linear(d, r) (no orthogonality), with bias c only if
    `proj_bias` (pyreft calls this flag `add_bias`; c = 0 otherwise). W₁ ∈ R^{r×d}, b ∈ R^r form
    `learned_source` (b only if `add_bias`). With c = 0 and act = identity this is LoReFT's equation with
    R replaced by an unconstrained W₂. Trainable parameters: 2·d·r + r (+ r with `proj_bias`).
    """

    def __init__(
        self,
        embed_dim: int,
        low_rank_dimension: int,
        dropout: float = 0.0,
        act_fn: str | None = None,
        add_bias: bool = True,
        proj_bias: bool = False,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dt = self.setup(embed_dim, low_rank_dimension, dropout, dtype, act_fn=act_fn, add_bias=add_bias,
                        proj_bias=proj_bias)
        self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=proj_bias, dtype=dt)        # W₂, c
        self.learned_source = nn.Linear(embed_dim, low_rank_dimension, bias=add_bias, dtype=dt)     # W₁, b

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        x = h.to(self.learned_source.weight.dtype)                            # (N, d)
        delta = self.act(self.learned_source(x)) - self.proj_layer(x)         # (N, r)
        return self.add_edit(h, delta @ self.proj_layer.weight)               # h + dropout(W₂ᵀ delta)
