"""Intervention types: each against its equation (hand numbers, and a naive formula written here), then one
table of (type, kwargs) rows driving the generic tests. Adding a type = one file + one row in ROWS."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils.parametrizations import orthogonal

from alignkit.interventions import (
    INTERVENTIONS, ConsReFT, DiReFT, DiReFTOrth, LobiReFT, LoReFT, NoReFT, build_intervention, register_intervention,
)
from alignkit.interventions.base import Intervention, LowRankRotation
from alignkit.trainers import turn_off_dropout
from tests.interventions.table import INTERVENTION_ROWS

D, R_ = 8, 3  # embed_dim, low_rank_dimension for the generic rows

ROWS = [(r.kind, kw) for r in INTERVENTION_ROWS for kw in ({}, *r.variants)]  # tests/interventions/table.py
IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for kind, kw in ROWS]
ORTHOGONAL = {r.kind for r in INTERVENTION_ROWS if r.orthogonal}
ACT = {None: lambda x: x, "relu": torch.relu, "tanh": torch.tanh, "silu": torch.nn.functional.silu,
       "gelu": torch.nn.functional.gelu}


def make(kind: str, kw: dict, seed: int = 0, **extra) -> Intervention:
    """A type from the table with every parameter randomised (so no term hides behind a zero init)."""
    torch.manual_seed(seed)
    m = build_intervention({"type": kind, "embed_dim": D, "low_rank_dimension": R_, **kw, **extra})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "rotate_layer" not in name:
                p.add_(torch.randn_like(p))
    return m


def naive(m: Intervention, h: torch.Tensor) -> torch.Tensor:
    """Each equation, row by row, in float64, from the parameters by their meaning (R is r x d here)."""
    s, out = m.spec(), []
    act = ACT[s.get("act_fn")]
    R = m.rotate_layer.weight.detach().double().T if s["type"] in ORTHOGONAL else None
    lin = m.learned_source if isinstance(m.learned_source, torch.nn.Linear) else None
    W = lin.weight.detach().double() if lin is not None else None
    b = (lin.bias.detach().double() if lin.bias is not None else torch.zeros(R_, dtype=torch.float64)) if lin \
        else m.learned_source.detach().double()
    if hasattr(m, "proj_layer"):
        W2 = m.proj_layer.weight.detach().double()
        c = m.proj_layer.bias.detach().double() if m.proj_layer.bias is not None else torch.zeros(R_, dtype=torch.float64)
    for x in h.double():
        if s["type"] == "loreft":
            y = x + R.T @ (act(W @ x + b) - R @ x)
        elif s["type"] == "noreft":
            y = x + W2.T @ (act(W @ x + b) - (W2 @ x + c))
        elif s["type"] == "direft":
            y = x + W2.T @ act(W @ x + b)
        elif s["type"] == "direft_orth":
            y = x + R.T @ act(W @ x + b)
        elif s["type"] == "consreft":
            y = x + R.T @ (b - R @ x)
        elif s["type"] == "lobireft":
            y = x + R.T @ b
        out.append(y)
    return torch.stack(out)


# ---- each type against numbers worked out by hand ---------------------------------------------------------

def _set(module: torch.nn.Module, **tensors: list) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            *path, leaf = name.split(".")
            target = module
            for p in path:
                target = getattr(target, p)
            getattr(target, leaf).copy_(torch.tensor(value))


def test_loreft_by_hand():
    m = LoReFT(2, 1)
    m.rotate_layer.assign(torch.tensor([[0.6], [0.8]]))  # R = [0.6, 0.8], one unit row
    _set(m, **{"learned_source.weight": [[1.0, 2.0]], "learned_source.bias": [0.5]})
    # h=(1,1): Wh+b = 3.5, Rh = 1.4, Rᵀ(2.1) = (1.26, 1.68).  h=(2,-1): 0.5 - 0.4 = 0.1 -> (0.06, 0.08)
    out = m(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.26, 2.68], [2.06, -0.92]]))


def test_lobireft_and_consreft_by_hand():
    rotation = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]]).T  # (d=3, r=2); rows of R orthonormal
    h = torch.tensor([[1.0, 2.0, 3.0]])
    lobi, cons = LobiReFT(3, 2), ConsReFT(3, 2)
    for m in (lobi, cons):
        m.rotate_layer.assign(rotation)
        _set(m, learned_source=[2.0, -1.0])
    # LobiReFT: Rᵀb = 2(0,1,0) - (0.6,0,0.8) = (-0.6, 2, -0.8)
    torch.testing.assert_close(lobi(h), torch.tensor([[0.4, 4.0, 2.2]]))
    # ConsReFT: Rh = (2, 3), b - Rh = (0, -4), Rᵀ(0,-4) = (-2.4, 0, -3.2); afterwards R·out = b
    out = cons(h)
    torch.testing.assert_close(out, torch.tensor([[-1.4, 2.0, -0.2]]))
    torch.testing.assert_close(out @ rotation, torch.tensor([[2.0, -1.0]]))


def test_direft_noreft_direft_orth_by_hand():
    h = torch.tensor([[3.0, 1.0]])
    direft, noreft = DiReFT(2, 1), NoReFT(2, 1)
    for m in (direft, noreft):
        _set(m, **{"learned_source.weight": [[1.0, -1.0]], "learned_source.bias": [1.0],
                   "proj_layer.weight": [[2.0, 3.0]]})
    torch.testing.assert_close(direft(h), torch.tensor([[9.0, 10.0]]))  # W₁h+b = 3 -> W₂ᵀ3 = (6, 9)
    torch.testing.assert_close(noreft(h), torch.tensor([[-9.0, -17.0]]))  # 3 - W₂h(9) = -6 -> (-12, -18)
    orth = DiReFTOrth(2, 1)
    orth.rotate_layer.assign(torch.tensor([[0.6], [0.8]]))
    _set(orth, **{"learned_source.weight": [[1.0, 2.0]], "learned_source.bias": [0.5]})
    torch.testing.assert_close(orth(torch.tensor([[1.0, 1.0]])), torch.tensor([[3.1, 3.8]]))  # 3.5·(0.6, 0.8)


def test_loreft_parameter_count_matches_pyreft():
    # pyreft's figure for rank 4 at d=4096: R 4096x4 + W 4096x4 + b 4
    assert LoReFT(4096, 4).num_trainable_parameters() == 4096 * 4 + 4096 * 4 + 4 == 32_772


# ---- generic tests over the table ---------------------------------------------------------------------------

def test_registry_lists_every_type_and_table_covers_it():
    assert set(INTERVENTIONS) == {"loreft", "noreft", "direft", "direft_orth", "consreft", "lobireft"}
    assert {kind for kind, _ in ROWS} == set(INTERVENTIONS), "every registered type needs a row in ROWS"


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
def test_matches_naive_equation(kind, kw):
    m = make(kind, kw).eval()
    h = torch.randn(6, D)
    torch.testing.assert_close(m(h).double(), naive(m, h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
def test_spec_round_trip_is_bitwise(kind, kw):
    m = make(kind, kw, dropout=0.1).eval()
    spec = json.loads(json.dumps(m.spec()))  # JSON-able
    params = set(inspect.signature(type(m).__init__).parameters) - {"self"}
    assert set(spec) == params | {"type"}, "spec() must record every constructor argument"
    rebuilt = build_intervention(spec).eval()
    rebuilt.load_state_dict(m.state_dict())
    assert rebuilt.spec() == m.spec()
    h = torch.randn(5, D)
    assert torch.equal(rebuilt(h), m(h))


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
def test_spec_keeps_the_configured_dropout_when_training_turns_it_off(kind, kw):
    """turn_off_dropout (the preference objectives' `disable_dropout`) sets the live rate to 0; spec() used to
    write that live rate, so a folder said dropout 0.0 for a type built with 0.25. Now: 0.25, and the edit is
    deterministic in training mode (the sweep still works)."""
    m = make(kind, kw, dropout=0.25).train()
    turn_off_dropout(m)
    assert m.spec()["dropout"] == 0.25 and m.dropout.p == 0.0
    h = torch.randn(5, D)
    assert torch.equal(m(h), m(h))
    assert build_intervention(m.spec()).dropout.p == 0.25


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
def test_state_dict_round_trips_through_safetensors(kind, kw, tmp_path):
    m = make(kind, kw).eval()
    save_file(m.state_dict(), tmp_path / "w.safetensors")  # refuses non-contiguous tensors
    rebuilt = build_intervention(m.spec()).eval()
    rebuilt.load_state_dict(load_file(tmp_path / "w.safetensors"))
    h = torch.randn(3, D)
    assert torch.equal(rebuilt(h), m(h))


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
def test_dropout_acts_on_the_edit_only(kind, kw):
    m = make(kind, kw, dropout=0.5)
    h = torch.randn(64, D)
    reference = make(kind, kw, dropout=0.0).eval()  # same seed -> same parameters
    m.eval()
    expected = reference(h)
    assert torch.equal(m(h), expected) and torch.equal(m(h), m(h))  # eval: no dropout, deterministic
    edit = expected - h
    m.train()
    out = m(h)
    dropped = (out == h)  # h + 0: bitwise h
    kept = torch.isclose(out - h, 2 * edit, atol=1e-5)  # h + edit / (1 - p)
    assert bool((dropped | kept).all()), "every coordinate is h or h + edit/(1-p); h itself is never zeroed"
    assert 0.3 < dropped.float().mean().item() < 0.7


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_follows_argument_and_output_follows_input(kind, kw, dtype):
    m = make(kind, kw, dtype=dtype).eval()
    for name, p in m.named_parameters():  # rotations stay float32 (no half-precision QR; see base.py)
        assert p.dtype == (torch.float32 if "rotate_layer" in name else getattr(torch, dtype)), name
    full = build_intervention({**m.spec(), "dtype": "float32"}).eval()
    full.load_state_dict(m.state_dict())  # same (rounded) weights in float32
    h = torch.randn(4, D)
    for h_in in (h, h.bfloat16()):
        out = m(h_in)
        assert out.dtype == h_in.dtype
        tol = 1e-5 if dtype == "float32" and h_in.dtype == torch.float32 else 0.15
        torch.testing.assert_close(out.float(), full(h_in.float()), atol=tol, rtol=0.05)


@pytest.mark.parametrize("kind,kw", ROWS, ids=IDS)
def test_gradients_reach_every_parameter(kind, kw):
    m = make(kind, kw).train()
    m(torch.randn(7, D)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind,kw", [r for r in ROWS if r[0] in ORTHOGONAL], ids=[i for i, r in zip(IDS, ROWS)
                                                                                  if r[0] in ORTHOGONAL])
def test_rotation_stays_orthonormal_through_an_optimizer_step(kind, kw):
    m = make(kind, kw).train()
    eye = torch.eye(R_)
    before = m.rotate_layer.weight.detach().clone()  # (d, r) = Rᵀ
    torch.testing.assert_close(before.T @ before, eye, atol=1e-6, rtol=0)  # R Rᵀ = I
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)  # decay also shrinks R's sign diagonal
    m(torch.randn(7, D)).pow(2).sum().backward()
    opt.step()
    after = m.rotate_layer.weight.detach()
    assert (after - before).abs().max() > 1e-3, "the step moved R"
    torch.testing.assert_close(after.T @ after, eye, atol=1e-6, rtol=0)


def test_householder_map_matches_torch_orthogonal_values_and_gradients():
    """Our parametrization is torch's orthogonal(householder, no trivialization) map: same stored tensor,
    same R, same gradients (we only compute it without torch's (d, d) backward)."""
    torch.manual_seed(0)
    ours = LowRankRotation(D, R_)
    theirs = torch.nn.Module()
    theirs.weight = torch.nn.Parameter(torch.empty(D, R_))
    orthogonal(theirs, orthogonal_map="householder", use_trivialization=False)
    with torch.no_grad():  # random reflectors, random diagonal signs
        x = torch.randn(D, R_).tril(-1)
        x[range(R_), range(R_)] = torch.tensor([1.0, -1.0, -1.0])
        ours.parametrizations.weight.original.copy_(x)
        theirs.parametrizations.weight.original.copy_(x)
    torch.testing.assert_close(ours.weight, theirs.weight, atol=1e-6, rtol=0)
    probe = torch.randn(D, R_)
    (ours.weight * probe).sum().backward()
    (theirs.weight * probe).sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                               theirs.parametrizations.weight.original.grad, atol=1e-5, rtol=1e-5)
    q, _ = torch.linalg.qr(torch.randn(D, R_))
    ours.assign(q)  # right_inverse: R comes back as given
    torch.testing.assert_close(ours.weight.detach(), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,kw", [r for r in ROWS if r[0] in ORTHOGONAL][:1], ids=["loreft"])
def test_rotation_is_evaluated_once_per_forward(kind, kw):
    m = make(kind, kw)
    calls = []
    m.rotate_layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    m(torch.randn(3, D))
    assert len(calls) == 1


def test_unknown_type_and_bad_arguments_say_what_is_valid():
    with pytest.raises(ValueError, match=r"unknown intervention type 'lorfet'.*loreft"):
        build_intervention({"type": "lorfet", "embed_dim": 4, "low_rank_dimension": 1})
    with pytest.raises(ValueError, match="unknown activation 'relux'"):
        LoReFT(4, 1, act_fn="relux")
    with pytest.raises(ValueError, match="unknown intervention dtype 'fp8'"):
        LoReFT(4, 1, dtype="fp8")
    with pytest.raises(ValueError, match=r"low_rank_dimension must be an int in \[1, embed_dim=4\]"):
        LoReFT(4, 5)
    with pytest.raises(ValueError, match="bad arguments for intervention type 'lobireft'"):
        build_intervention({"type": "lobireft", "embed_dim": 4, "low_rank_dimension": 1, "act_fn": "relu"})


def test_adding_a_type_is_one_class_and_one_registration():
    @register_intervention("test_scale")
    class Scale(Intervention):
        """Φ(h) = h + s·h (a toy type for this test)."""

        def __init__(self, embed_dim: int, scale: float = 2.0) -> None:
            super().__init__()
            self.embed_dim, self.scale = embed_dim, scale
            self.dropout = torch.nn.Dropout(0.0)

        def spec(self):
            return {"type": self.kind, "embed_dim": self.embed_dim, "scale": self.scale}

        def forward(self, h):
            return self.add_edit(h, self.scale * h)

    try:
        m = build_intervention({"type": "test_scale", "embed_dim": 3, "scale": 0.5})
        assert isinstance(m, Scale) and m.spec()["scale"] == 0.5
        torch.testing.assert_close(m(torch.ones(1, 3)), torch.full((1, 3), 1.5))
        with pytest.raises(ValueError, match="already registered"):
            register_intervention("test_scale")(LoReFT)
    finally:
        INTERVENTIONS.pop("test_scale", None)
