"""Importing pyreft checkpoints: folders fabricated here in pyreft's on-disk format (config.json as pyvene's
IntervenableConfig writes it, one torch.save'd state dict per intervention), read back and checked against
each equation computed from the very tensors written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from alignkit.interventions.pyreft_compat import PYREFT_TYPE_MAPPING, read_pyreft_folder
from tests.interventions.table import KINDS

D, R_ = 6, 2


def pyreft_folder(folder: Path, reps: list[tuple[int, str, str, dict]], style: str = "new") -> Path:
    """Write reps = [(layer, component, pyreft class, state dict)] the way pyvene's save() does."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, counts = [], {}
    for layer, comp, _, state in reps:
        proposal = {"new": f"layer_{layer}_comp_{comp}_unit_pos_nunit_1",
                    "dotted": f"layer.{layer}.comp.{comp}.unit.pos.nunit.1",
                    "old": f"layer.{layer}.repr.{comp}.unit.pos.nunit.1"}[style]
        if "." in comp:
            proposal = f"comp_{comp.replace('.', '_')}_unit_pos_nunit_1"
        counts[proposal] = counts.get(proposal, -1) + 1
        keys.append(f"{proposal}#{counts[proposal]}")
        torch.save(state, folder / f"intkey_{keys[-1]}.bin")
    config = {  # RepresentationConfig namedtuples serialise as lists, in field order
        "representations": [[layer, comp, "pos", 1, R_, None, None, None, None, None, None, None, None]
                            for layer, comp, _, _ in reps],
        "intervention_types": [f"<class 'pyreft.interventions.{cls}'>" for _, _, cls, _ in reps],
        "mode": "parallel", "sorted_keys": keys if style == "new" else None,
        "model_type": "<class 'transformers.models.llama.modeling_llama.LlamaForCausalLM'>",
        "intervention_dimensions": [D] * len(reps), "intervention_constant_sources": [True] * len(reps),
        "transformers_version": "4.45.2",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def orthonormal(d: int = D, r: int = R_, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))
    return q.contiguous()  # (d, r), orthonormal columns


def parametrized_rotation(seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A rotation the way pyreft's non-LoReFT classes hold it (torch's orthogonal() defaults, trivialization
    and a (d, d) base), moved away from its initial point; returns (state dict entries, its R as (d, r))."""
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(D, R_))
    nn.init.orthogonal_(holder.weight)
    orthogonal(holder)
    with torch.no_grad():
        holder.parametrizations.weight.original.add_(0.3 * torch.randn(D, R_).tril(-1))  # as training moves it
    state = {f"rotate_layer.{k}": v.clone() for k, v in holder.state_dict().items()}
    assert "rotate_layer.parametrizations.weight.0.base" in state
    return state, holder.weight.detach().clone()


def linear(seed: int, bias: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"weight": torch.randn(R_, D, generator=g)}
    if bias:
        out["bias"] = torch.randn(R_, generator=g)
    return out


def test_loreft_checkpoint_computes_loreft_with_those_weights(tmp_path):
    rotation, src = orthonormal(), linear(1)
    state = {"weight": src["weight"], "bias": src["bias"], "rotate_layer": rotation}  # LoreftIntervention.state_dict
    [item] = read_pyreft_folder(pyreft_folder(tmp_path, [(15, "block_output", "LoreftIntervention", state)]))
    assert (item.layer, item.component, item.pyreft_class) == (15, "block_output", "LoreftIntervention")
    assert item.key == "layer_15_comp_block_output_unit_pos_nunit_1#0"
    assert item.spec == {"type": "loreft", "embed_dim": D, "low_rank_dimension": R_, "dropout": 0.0,
                         "act_fn": None, "add_bias": True, "dtype": "float32"}
    module = item.build().eval()
    assert (module.rotate_layer.weight.detach() - rotation).abs().max() < 1e-6  # our R is theirs
    h = torch.randn(4, D)
    R, W, b = rotation.T, src["weight"], src["bias"]  # R: (r, d)
    expected = h + (h @ W.T + b - h @ R.T) @ R  # h + Rᵀ(Wh + b − Rh), row-wise
    torch.testing.assert_close(module(h), expected, atol=1e-5, rtol=1e-5)


def test_pyreft_default_bfloat16_source_and_act_fn(tmp_path):
    src = {k: v.bfloat16() for k, v in linear(2).items()}  # pyreft's silent bf16 default for learned_source
    state = {**src, "rotate_layer": orthonormal(seed=2)}
    [item] = read_pyreft_folder(pyreft_folder(tmp_path, [(0, "block_output", "LoreftIntervention", state)]),
                                act_fn="relu")
    assert item.spec["dtype"] == "bfloat16" and item.spec["act_fn"] == "relu"
    module = item.build()
    assert torch.equal(module.learned_source.weight, src["weight"])
    h = torch.randn(3, D)
    R = orthonormal(seed=2).T
    expected = h + (torch.relu(h @ src["weight"].float().T + src["bias"].float()) - h @ R.T) @ R
    torch.testing.assert_close(module(h), expected, atol=0.05, rtol=0.02)


def test_default_state_dict_formats_of_the_other_classes(tmp_path):
    rot_state, R = parametrized_rotation()
    R = R.T  # (r, d)
    buffers = {"embed_dim": torch.tensor(D), "interchange_dim": torch.tensor(D)}  # pyvene's scalar buffers
    src, proj = linear(3), linear(4)
    b = torch.randn(R_)
    reps = [
        (1, "block_output", "DireftIntervention",
         {**buffers, **rot_state, "learned_source.weight": src["weight"], "learned_source.bias": src["bias"]}),
        (1, "block_output", "NodireftIntervention",  # same location twice: key collision #1
         {**buffers, "proj_layer.weight": proj["weight"], "proj_layer.bias": proj["bias"],
          "learned_source.weight": src["weight"], "learned_source.bias": src["bias"]}),
        (2, "mlp_output", "NoreftIntervention",
         {**buffers, "proj_layer.weight": proj["weight"], "proj_layer.bias": proj["bias"],
          "learned_source.weight": src["weight"], "learned_source.bias": src["bias"]}),
        (3, "block_input", "ConsreftIntervention", {**buffers, **rot_state, "learned_source": b}),
        (4, "block_output", "LobireftIntervention", {**buffers, **rot_state, "learned_source": b}),
    ]
    items = read_pyreft_folder(pyreft_folder(tmp_path, reps))
    assert [i.spec["type"] for i in items] == ["direft_orth", "direft", "noreft", "consreft", "lobireft"]
    assert [i.key.rsplit("#", 1)[1] for i in items[:2]] == ["0", "1"]
    assert [(i.layer, i.component) for i in items] == [(1, "block_output"), (1, "block_output"), (2, "mlp_output"),
                                                        (3, "block_input"), (4, "block_output")]
    assert items[2].spec["proj_bias"] is True
    h = torch.randn(5, D)
    W, c, W2, c2 = src["weight"], src["bias"], proj["weight"], proj["bias"]
    expected = [
        h + (h @ W.T + c) @ R,                          # DireftIntervention: h + Rᵀ(Wh + b)
        h + (h @ W.T + c) @ W2,                         # NodireftIntervention: h + W₂ᵀ(W₁h + b)
        h + (h @ W.T + c - (h @ W2.T + c2)) @ W2,       # NoreftIntervention: proj_layer(h) includes its bias
        h + (b - h @ R.T) @ R,                          # ConsreftIntervention: h + Rᵀ(b − Rh)
        h + (b @ R).expand(5, D),                       # LobireftIntervention: h + Rᵀb
    ]
    for item, want in zip(items, expected):
        torch.testing.assert_close(item.build().eval()(h), want, atol=1e-5, rtol=1e-5, msg=item.pyreft_class)


@pytest.mark.parametrize("style", ["dotted", "old"])
def test_older_pyvene_key_spellings(tmp_path, style):
    state = {**linear(5), "rotate_layer": orthonormal(seed=5)}
    items = read_pyreft_folder(pyreft_folder(tmp_path, [(7, "block_output", "LoreftIntervention", state)] * 2, style))
    assert [i.weight_file.name for i in items] == [f"intkey_layer.7.{'comp' if style == 'dotted' else 'repr'}"
                                                   f".block_output.unit.pos.nunit.1#{n}.bin" for n in (0, 1)]


def test_module_path_components_and_trainer_subfolder(tmp_path):
    state = {**linear(6), "rotate_layer": orthonormal(seed=6)}
    comps = ["model.layers[4].mlp.output", "model.layers[2].output", "model.layers[1].input_layernorm.output",
             "model.layers[3].self_attn.input"]
    reps = [(0, comp, "LoreftIntervention", state) for comp in comps]
    items = read_pyreft_folder(pyreft_folder(tmp_path / "intervenable_model", reps).parent)  # pyreft trainer layout
    assert [(i.layer, i.component) for i in items] == [
        (4, "mlp_output"), (2, "block_output"), (1, "model.layers[1].input_layernorm"), (3, "attention_input")]


def test_mapping_names_the_paper_types():
    assert PYREFT_TYPE_MAPPING["NodireftIntervention"] == "direft"  # the paper's DiReFT (eq. 3)
    assert PYREFT_TYPE_MAPPING["DireftIntervention"] == "direft_orth"
    assert set(PYREFT_TYPE_MAPPING.values()) == set(KINDS)  # tests/interventions/table.py


class NotATensor:
    pass


def test_clear_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*ReftModel\.save"):
        read_pyreft_folder(tmp_path / "empty")

    good = {**linear(7), "rotate_layer": orthonormal(seed=7)}
    missing = pyreft_folder(tmp_path / "missing", [(3, "block_output", "LoreftIntervention", good)])
    (missing / "intkey_layer_3_comp_block_output_unit_pos_nunit_1#0.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weight file for representation 0 \(layer 3.*intkey_layer_3_comp"):
        read_pyreft_folder(missing)

    unknown = pyreft_folder(tmp_path / "unknown", [(3, "block_output", "BoundlessRotatedSpaceIntervention", good)])
    with pytest.raises(ValueError, match=r"config\.json: representation 0 uses .*'BoundlessRotatedSpaceIntervention'"):
        read_pyreft_folder(unknown)

    corrupt = pyreft_folder(tmp_path / "corrupt", [(3, "block_output", "LoreftIntervention", good)])
    (corrupt / "intkey_layer_3_comp_block_output_unit_pos_nunit_1#0.bin").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"nunit_1#0\.bin: cannot read it .*corrupt"):
        read_pyreft_folder(corrupt)

    pickled = pyreft_folder(tmp_path / "pickled", [(3, "block_output", "LoreftIntervention", {"x": NotATensor()})])
    with pytest.raises(ValueError, match="cannot read it"):  # weights_only=True: no arbitrary objects
        read_pyreft_folder(pickled)

    extra = pyreft_folder(tmp_path / "extra", [(3, "block_output", "LoreftIntervention", {**good, "lora_A": torch.ones(2)})])
    with pytest.raises(ValueError, match=r"unexpected tensors \['lora_A'\]"):
        read_pyreft_folder(extra)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad_json/config\.json: not valid JSON"):
        read_pyreft_folder(bad_json)


def test_loreft_checkpoint_by_hand(tmp_path):
    """d=2, r=1, every number written out: R = [1, 0] (Rᵀ = [[1], [0]]), W = [[0, 1]], b = [0.5], h = [2, 3]:
    Rh = 2, Wh + b = 3.5, Rᵀ(Wh + b − Rh) = [1.5, 0], so Φ(h) = [3.5, 3]."""
    state = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([0.5]), "rotate_layer": torch.tensor([[1.0], [0.0]])}
    folder = pyreft_folder(tmp_path, [(0, "block_output", "LoreftIntervention", state)])
    config = json.loads((folder / "config.json").read_text())
    config["representations"][0][4] = 1  # low_rank_dimension
    (folder / "config.json").write_text(json.dumps(config))
    [item] = read_pyreft_folder(folder)
    out = item.build().eval()(torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.5, 3.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("index, value, match", [
    (7, [[0, 1]], r"representation 0 sets subspace_partition=\[\[0, 1\]\]: it intervenes on subspaces"),
    (8, 1, r"representation 0 sets group_key=1: it groups"),
    (9, "shared", r"representation 0 sets intervention_link_key='shared': it shares one intervention"),
    (10, "expert", r"representation 0 sets moe_key='expert'"),
    (12, True, r"representation 0 sets hidden_source_representation=True: it swaps in a constant source"),
    (14, "new", r"representation 0 has 15 fields, pyvene's RepresentationConfig 14"),
    ("mode", "serial", r"config\.json: mode='serial'; alignkit runs every intervention in one forward pass"),
    ("dict", {"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1, "new_thing": 1},
     r"representation 0 has unknown field\(s\) \['new_thing'\]"),
])
def test_pyvene_fields_alignkit_cannot_honour_are_refused(tmp_path, index, value, match):
    """A pyvene setting alignkit has no equivalent for is refused naming the file, the representation and the
    field: it used to be dropped, and the interventions loaded as if it were not there."""
    state = {**linear(8), "rotate_layer": orthonormal(seed=8)}
    folder = pyreft_folder(tmp_path, [(0, "block_output", "LoreftIntervention", state)])
    config = json.loads((folder / "config.json").read_text())
    if index == "mode":
        config["mode"] = value
    elif index == "dict":
        config["representations"][0] = value
    elif index == 14:
        config["representations"][0] += [None, value]  # pyvene 0.1.8's 14 fields (latent_dim None) and one more
    else:
        config["representations"][0][index] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        read_pyreft_folder(folder)
    config["mode"], config["representations"][0] = "parallel", [0, "block_output", "pos", 1, R_] + [None] * 9
    (folder / "config.json").write_text(json.dumps(config))
    assert len(read_pyreft_folder(folder)) == 1  # the same folder without it loads
