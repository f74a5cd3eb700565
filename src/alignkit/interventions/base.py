"""The intervention contract, its registry, and the pieces every ReFT type shares.

An intervention is an `nn.Module` that maps hidden states `h: (N, d) -> (N, d)`, where N counts the
selected (row, position) pairs gathered from a batch. Its constructor takes typed arguments only (no
`**kwargs`), and `spec()` returns every one of them as JSON-able values so that
`build_intervention(spec)` rebuilds it exactly. Dropout acts on the edit, never on `h` itself, and is
off in `eval()` mode: every type returns `h + dropout(edit)`.

Dtypes: parameters are created in the `dtype` argument ("float32", "bfloat16", "float16", "float64";
None = torch's default dtype, recorded in `spec()` by name). The edit is computed in that dtype and cast
to `h.dtype` before it is added, so the output always has the input's dtype. One exception, on purpose:
an orthonormal projection R is stored and parametrized in float32 (float64 if asked), because the QR
kernels behind its parametrization (and behind torch's `parametrizations.orthogonal`) have no
half-precision implementation, and a bfloat16 R would be orthonormal only to ~1e-2. R is cast to the compute dtype
once per forward call. Do not call `.to(torch.bfloat16)` on an intervention; pass `dtype=` instead.

Adding a type: one file with a subclass decorated by `@register_intervention("name")`, plus one row in
the generic test table (tests/interventions/test_interventions.py).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from alignkit.interventions import intervention_types

INTERVENTIONS: dict[str, type["Intervention"]] = {}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def get_activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if name is None:
        return ACTIVATIONS["identity"]
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """"bfloat16" / torch.bfloat16 / None (torch's default dtype) -> torch.dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported intervention dtype {dtype}; valid: {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown intervention dtype {dtype!r}; valid: {sorted(DTYPES)} or None")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_sizes(kind: str, embed_dim: int, low_rank_dimension: int, dropout: float) -> None:
    if not (isinstance(embed_dim, int) and embed_dim > 0):
        raise ValueError(f"{kind}: embed_dim must be a positive int, got {embed_dim!r}")
    if not (isinstance(low_rank_dimension, int) and 0 < low_rank_dimension <= embed_dim):
        raise ValueError(f"{kind}: low_rank_dimension must be an int in [1, embed_dim={embed_dim}], "
                         f"got {low_rank_dimension!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{kind}: dropout must be in [0, 1), got {dropout!r}")


class HouseholderOrthonormal(nn.Module):
    """Parametrization X (d, r) -> Q (d, r) with orthonormal columns: Q = H₁H₂⋯H_r·I[:, :r]·diag(s).

    The same map, and the same meaning of the stored tensor X, as torch's
    `torch.nn.utils.parametrizations.orthogonal(m, orthogonal_map="householder", use_trivialization=False)`:
    column i of X below the diagonal is the reflector aᵢ, Hᵢ = I − τᵢvᵢvᵢᵀ with vᵢ = eᵢ + aᵢ and
    τᵢ = 2 / (1 + |aᵢ|²), and the sign of X's diagonal picks sᵢ = ±1. Two differences, both measured:
    - the r reflectors are accumulated in compact WY form (below), so forward and backward cost O(d·r²); torch's
      `householder_product` backward builds (d, d) intermediates (1.36 s vs 3.9 ms for d=4096, r=4 on a
      CPU thread), and
    - sᵢ is the sign of the diagonal, where torch truncates it with `.int()`: AdamW's weight decay shrinks
      the (gradient-free) diagonal from ±1 to ±0.99…, which torch turns into 0 and a zero column of R.

    The product is formed in compact WY form (Schreiber & Van Loan 1989; Joffrain et al. 2006,
    "Accumulating Householder transformations, revisited"): H₁⋯H_r = I − V S⁻¹ Vᵀ with S = striu(VᵀV) +
    diag(|vᵢ|²)/2 upper triangular (r, r), so Q = I[:, :r] − V S⁻¹ V[:r]ᵀ: two (d, r) matmuls and one
    (r, r) triangular solve instead of r sequential rank-1 updates (half the ops and autograd nodes; the
    same Q to float rounding). S's diagonal is ≥ 1/2 (vᵢ = eᵢ + aᵢ), so the solve is well posed.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # (d, r) -> (d, r)
        d, r = X.shape
        eye = torch.eye(d, r, dtype=X.dtype, device=X.device)  # (d, r)
        V = X.tril(-1) + eye                                    # (d, r): vᵢ = eᵢ + aᵢ
        G = V.T @ V                                             # (r, r)
        S = G.triu(1) + torch.diag_embed(G.diagonal() * 0.5)    # (r, r) upper triangular
        Y = torch.linalg.solve_triangular(S, V[:r].T, upper=True)  # (r, r) = S⁻¹ Vᵀ I[:, :r]
        Q = eye - V @ Y                                         # (d, r) = H₁⋯H_r I[:, :r]
        signs = torch.where(X.diagonal() < 0, -1.0, 1.0).to(X.dtype)  # (r,), no gradient
        return Q * signs

    @torch.no_grad()
    def right_inverse(self, Q: torch.Tensor) -> torch.Tensor:  # (d, r) orthonormal columns -> reflectors
        A, tau = torch.geqrf(Q.double())                        # LAPACK's Householder QR
        A.diagonal().sign_()                                    # diag(R) > 0 convention, as torch
        A.diagonal()[tau == 0.0] *= -1                          # a skipped reflection: flip it back
        return A.to(Q.dtype).contiguous()                       # contiguous: safetensors refuses otherwise


class LowRankRotation(nn.Module):
    """An orthonormal projection stored the pyreft way: `weight` is (d, r) with orthonormal columns, so
    R = weight.T (r, d) has orthonormal rows (R Rᵀ = I_r) and `Rh = h @ weight`.

    `weight` is parametrized (torch.nn.utils.parametrize) by `HouseholderOrthonormal`: the trainable
    tensor is `parametrizations.weight.original` (d, r), the Householder reflectors, so the state dict
    holds d·r numbers and no (d, d) `base` buffer (pyreft's default keeps one per intervention: 64 MiB at
    d=4096). Every read of `weight` recomputes the product, so a forward pass reads it once into a local.
    """

    # No weight decay on the reflectors (read by `AlignTrainer.get_decay_parameter_names`): decay cannot break
    # orthonormality (any X maps to orthonormal columns, and shrinking never flips a diagonal sign) but it
    # pulls the reflectors to 0, i.e. R towards the first r coordinate axes: an arbitrary, basis-dependent prior.
    no_weight_decay = ("parametrizations.weight.original",)

    def __init__(self, embed_dim: int, rank: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32  # see the module docstring: no half-precision QR kernels
        self.weight = nn.Parameter(torch.empty(embed_dim, rank, dtype=dtype))  # (d, r)
        nn.init.orthogonal_(self.weight)
        parametrize.register_parametrization(self, "weight", HouseholderOrthonormal(), unsafe=True)

    @torch.no_grad()
    def assign(self, weight: torch.Tensor) -> None:
        """Set R so that `self.weight` equals `weight` (d, r, orthonormal columns) to float rounding."""
        self.weight = weight.to(self.parametrizations.weight.original.dtype)


class Intervention(nn.Module):
    """Base class. Subclasses set `kind` (via the registry decorator) and implement `forward(h)`."""

    kind: ClassVar[str] = ""
    dropout: nn.Dropout

    def setup(self, embed_dim: int, low_rank_dimension: int, dropout: float, dtype: str | torch.dtype | None,
              **options: Any) -> torch.dtype:
        """The constructor part every built-in type shares: checks the sizes, records the arguments `spec()`
        returns (`options`, e.g. act_fn / add_bias, become attributes; `act_fn` also sets `self.act`), creates
        the edit's dropout, and returns the parameters' dtype."""
        check_sizes(self.kind, embed_dim, low_rank_dimension, dropout)
        dt = resolve_dtype(dtype)
        self.embed_dim, self.low_rank_dimension, self.dtype_name = embed_dim, low_rank_dimension, dtype_name(dt)
        self.spec_options = tuple(options)
        for key, value in options.items():
            setattr(self, key, value)
        if "act_fn" in options:
            self.act = get_activation(options["act_fn"])
        self.dropout = nn.Dropout(dropout)
        # the rate asked for, which spec() saves: `self.dropout.p` is the live rate, and turn_off_dropout (the
        # preference objectives' default) sets it to 0 for training. Named unlike a dropout rate (`is_dropout_rate`)
        # so that sweep leaves it: a folder then records what the user configured, not 0.0
        self.configured_rate = dropout
        return dt

    def spec(self) -> dict[str, Any]:
        """Every constructor argument, JSON-able, plus `type` (from `setup`; a type that does not call it
        overrides this)."""
        if not hasattr(self, "spec_options"):
            raise NotImplementedError(f"{type(self).__name__}.spec: call self.setup(...) in __init__ or override spec")
        return {"type": self.kind, "embed_dim": self.embed_dim, "low_rank_dimension": self.low_rank_dimension,
                "dropout": self.configured_rate, **{k: getattr(self, k) for k in self.spec_options},
                "dtype": self.dtype_name}

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, d)
        raise NotImplementedError

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def add_edit(self, h: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        """h + dropout(edit): dropout never touches h; the sum is taken in h's dtype."""
        return h + self.dropout(edit).to(h.dtype)  # (N, d)


def register_intervention(name: str) -> Callable[[type[Intervention]], type[Intervention]]:
    def deco(cls: type[Intervention]) -> type[Intervention]:
        if name in INTERVENTIONS and INTERVENTIONS[name] is not cls:
            raise ValueError(f"intervention type {name!r} is already registered by {INTERVENTIONS[name].__name__}")
        cls.kind = name
        INTERVENTIONS[name] = cls
        return cls

    return deco


def build_intervention(spec: dict[str, Any]) -> Intervention:
    """Rebuild an intervention from `spec()` output (a dict with `type` and constructor arguments)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in intervention_types():
        raise ValueError(f"unknown intervention type {kind!r}; valid: {sorted(INTERVENTIONS)}. "
                         "Use one of those names in the spec's 'type' field (or register a new type).")
    try:
        return INTERVENTIONS[kind](**spec)
    except TypeError as e:
        raise ValueError(f"bad arguments for intervention type {kind!r}: {e}") from None


class SourceIntervention(Intervention):
    """The types whose edit reads act(Wh + b): W, b are `learned_source`, a Linear(d, r) (b only if `add_bias`),
    created after the type's own `projection` so that parameters are registered (and drawn from the RNG) in the
    same order as pyreft's. Subclasses implement `projection` and `forward`."""

    def __init__(self, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: str | None = None,
                 add_bias: bool = True, dtype: str | torch.dtype | None = None) -> None:
        super().__init__()
        dt = self.setup(embed_dim, low_rank_dimension, dropout, dtype, act_fn=act_fn, add_bias=add_bias)
        self.projection(embed_dim, low_rank_dimension, dt)
        self.learned_source = nn.Linear(embed_dim, low_rank_dimension, bias=add_bias, dtype=dt)  # W, b

    def projection(self, embed_dim: int, low_rank_dimension: int, dtype: torch.dtype) -> None:
        raise NotImplementedError


class RotatedBiasIntervention(Intervention):
    """The types built from an orthonormal R (`rotate_layer`, weight = Rᵀ, (d, r)) and a learned b ∈ R^r
    (`learned_source`, initialised U[0, 1) like pyreft). Subclasses implement `forward`."""

    def __init__(self, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0,
                 dtype: str | torch.dtype | None = None) -> None:
        super().__init__()
        dt = self.setup(embed_dim, low_rank_dimension, dropout, dtype)
        self.rotate_layer = LowRankRotation(embed_dim, low_rank_dimension, dt)  # weight: (d, r) = Rᵀ
        self.learned_source = nn.Parameter(torch.rand(low_rank_dimension, dtype=dt))  # b: (r,)
