"""torch's module internals alignkit reads directly (row A26 of docs/architecture.md's table)."""

from __future__ import annotations

import torch
from torch import nn

from .guards import check

TORCH = "torch"


def test_parameters_and_submodules_live_in_dicts_every_replacement_writes_to():
    """A module keeps its parameters in the dict `_parameters` and its submodules in `_modules` for its whole life
    (the same dict objects), and every way of replacing one writes the new object into that dict: a
    `load_state_dict(assign=True)`, an attribute set to a new Parameter / Module, `register_parameter` /
    `add_module` (the dict grows), `del` (it shrinks); `parameters(recurse=False)` / `children()` are their values.
    The ReFT prefix cache watches these dicts' entries and sizes (plain lookups each forward instead of a
    `parameters()` walk) to see a frozen layer's weight or module replaced."""
    where = "alignkit/interventions/prefix_cache.py:PrefixCache._watch/_state"
    seq = nn.Sequential(nn.Linear(2, 2))
    lin = seq[0]
    params, modules = lin._parameters, seq._modules
    check(list(lin.parameters(recurse=False)) == [p for p in params.values() if p is not None]
          and list(seq.children()) == [m for m in modules.values() if m is not None], TORCH,
          "Module._parameters / _modules no longer hold what parameters() / children() give", where)
    old = lin.weight
    seq.load_state_dict({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}, assign=True)
    check(lin._parameters is params and params["weight"] is lin.weight and lin.weight is not old, TORCH,
          "load_state_dict(assign=True) no longer puts the new Parameter into the module's _parameters dict", where)
    lin.weight = nn.Parameter(torch.zeros(2, 2))
    check(params["weight"] is lin.weight, TORCH, "a Parameter set as an attribute no longer lands in _parameters",
          where)
    seq[0] = nn.Linear(2, 2)
    check(seq._modules is modules and modules["0"] is seq[0] and modules["0"] is not lin, TORCH,
          "a submodule replaced by item assignment no longer lands in the parent's _modules dict", where)
    seq.add_module("extra", nn.Linear(2, 2))
    lin.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    check(len(modules) == 2 and len(params) == 3, TORCH, "add_module / register_parameter no longer add to the "
          "_modules / _parameters dicts (a module or parameter added would go unseen)", where,
          f"_modules {list(modules)}, _parameters {list(params)}")
    del lin.extra
    check(len(params) == 2 and lin._parameters is params, TORCH, "deleting a parameter attribute no longer removes "
          "it from the same _parameters dict", where, f"{list(params)}")
