"""Attaching interventions: base outputs kept bitwise where nothing is selected, gradients only where they
belong, per-row routing, padding, hooks registered once, checkpointing, config round trips."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import alignkit.interventions  # noqa: F401  (registers the types)
from alignkit.interventions.attach import ReftModel, find_decoder_layers, get_reft_model
from alignkit.interventions.config import ReftConfig, RepresentationConfig
from tests.adapters.table import perturb
from tests.interventions.table import INTERVENTION_ROWS

# One representation per component kind. Layer 0 has only a block_output edit, so its output at unselected
# positions must equal the base model's bitwise (an edit inside layer 0 would reach later positions via attention).
MIXED = [dict(layer=0 if r.component == "block_output" else 1, component=r.component, intervention=r.kind,
              low_rank_dimension=2) for r in INTERVENTION_ROWS]  # tests/interventions/table.py


def capture(module: nn.Module, store: list):
    """A foreign hook that records a module's output (registered after ours, it sees the edited value)."""
    return module.register_forward_hook(lambda m, a, out: store.append((out[0] if isinstance(out, tuple) else out).detach().clone()))


def ids_batch(b: int = 3, t: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (b, t), generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def locations_mixed(num: int) -> torch.Tensor:
    loc = torch.full((3, num, 2), -1, dtype=torch.long)  # row 0: pos 3 and 5; row 1: pos 2; row 2: none
    loc[0, :, 0], loc[0, :, 1], loc[1, :, 1] = 3, 5, 2
    return loc


def check_unselected_bitwise(base: nn.Module, reft: ReftModel, **inputs) -> None:
    _, layers = find_decoder_layers(base)
    got, want = [], []
    loc = locations_mixed(reft.num_interventions)
    h = capture(layers[0], want)
    with torch.no_grad():
        out_base = base(**inputs).logits
    h.remove()
    h = capture(layers[0], got)
    with torch.no_grad():
        out = reft(**inputs, intervention_locations=loc).logits
    h.remove()
    sel = torch.zeros(3, inputs["input_ids"].shape[1], dtype=torch.bool)
    sel[0, 3] = sel[0, 5] = sel[1, 2] = True
    assert torch.equal(got[0][~sel], want[0][~sel])  # layer-0 output: every unselected position bitwise
    assert (got[0][sel] != want[0][sel]).any(-1).all()  # and every selected one edited
    if out.dim() == 3:  # causal LM logits (B, T, V): positions before a row's first edit are untouched
        assert torch.equal(out[0, :3], out_base[0, :3]) and torch.equal(out[1, :2], out_base[1, :2])
        assert not torch.equal(out[0, 3:], out_base[0, 3:])
    assert torch.equal(out[2], out_base[2])  # row with no location: bitwise the base output
    assert not torch.equal(out[0], out_base[0])


def test_unselected_positions_bitwise_equal_base(arch, tiny_lm):
    base = tiny_lm(arch)
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(**r) for r in MIXED]))
    perturb(reft.interventions, 0.5)
    check_unselected_bitwise(base, reft, input_ids=ids_batch())
    with torch.no_grad():  # no locations = the base model
        assert torch.equal(reft(input_ids=ids_batch()).logits, base(input_ids=ids_batch()).logits)


def test_classifier_unselected_bitwise_and_loss(tiny_classifier):
    base = tiny_classifier("llama", num_labels=3)
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(**r) for r in MIXED[:3]]))
    perturb(reft.interventions, 0.5)
    check_unselected_bitwise(base, reft, input_ids=ids_batch(), attention_mask=torch.ones(3, 7, dtype=torch.long))
    labels = torch.tensor([0, 2, 1])
    out = reft(input_ids=ids_batch(), intervention_locations=locations_mixed(3), labels=labels)
    want = nn.functional.cross_entropy(out.logits.float(), labels)  # (B, C) logits
    torch.testing.assert_close(out.loss, want)


def test_only_intervention_params_get_gradients(tiny_lm):
    base = tiny_lm("llama")
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(**r) for r in MIXED]))
    assert all(not p.requires_grad for p in base.parameters())
    ids = ids_batch()
    out = reft(input_ids=ids, intervention_locations=locations_mixed(len(MIXED)), labels=ids)
    out.loss.backward()
    assert all(p.grad is None for p in base.parameters())
    for iv in reft.interventions["default"]:
        grads = [p.grad for p in iv.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_lora_and_reft_train_together(tiny_lm):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_lm("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    reft = get_reft_model(peft_model, ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2))
    assert [s.path for s in reft.slots] == ["model.layers.0", "model.layers.1"]
    ids = ids_batch()
    reft(input_ids=ids, intervention_locations=locations_mixed(2)[:, :, :1] * 0 + 4, labels=ids).loss.backward()
    named = dict(peft_model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all(p.requires_grad and p.grad is not None for n, p in lora.items() if "lora_A" in n)
    assert all(p.grad is None and not p.requires_grad for n, p in named.items() if "lora_" not in n)
    assert all(p.grad is not None for p in reft.interventions.parameters())
    text = reft.print_trainable_parameters()
    n_lora = sum(p.numel() for p in lora.values())
    assert f"trainable intervention params: {2 * (2 * 64 * 2 + 2):,} ||" in text  # 2·d·r + r per LoReFT
    assert f"trainable model params: {n_lora:,} ||" in text


def test_print_trainable_parameters_counts_by_hand(tiny_lm):
    base = tiny_lm("gpt2")
    reft = get_reft_model(base, ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=4))
    total = sum(p.numel() for p in base.parameters())
    n = 2 * (2 * 64 * 4 + 4)  # two LoReFTs: R (d·r) + W (r·d) + b (r)
    assert reft.count_parameters() == n
    assert reft.print_trainable_parameters() == (
        f"trainable intervention params: {n:,} || trainable model params: 0 || model params: {total:,} || "
        f"trainable%: {100 * n / total:.4f}")


def test_per_row_routing_equals_each_row_alone(tiny_lm):
    base = tiny_lm("qwen2")
    reft = get_reft_model(base, ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2), adapter_name="a")
    reft.add_adapter("b", ReftConfig([RepresentationConfig(layer=1, intervention="noreft", low_rank_dimension=3)]))
    perturb(reft.interventions, 0.5)
    assert reft.num_interventions == 3 and reft.adapter_slice("b") == slice(2, 3)
    ids = ids_batch(4)
    positions = torch.tensor([[1, 4], [2, -1], [0, 6], [3, 5]])
    loc = reft.route_locations(["a", "b", None, "b"], positions)  # (4, 3, 2)
    assert loc[0].tolist() == [[1, 4], [1, 4], [-1, -1]] and loc[1].tolist() == [[-1, -1], [-1, -1], [2, -1]]
    assert (loc[2] == -1).all()
    with torch.no_grad():
        together = reft(input_ids=ids, intervention_locations=loc).logits
        for b, name in enumerate(["a", "b", None, "b"]):
            alone_loc = reft.route_locations([name], positions[b:b + 1])
            alone = reft(input_ids=ids[b:b + 1], intervention_locations=alone_loc).logits
            torch.testing.assert_close(together[b:b + 1], alone, atol=1e-6, rtol=1e-5)
        assert torch.equal(together[2], base(input_ids=ids).logits[2])
        assert not torch.allclose(together[1], base(input_ids=ids).logits[1])
        # locations_for(b) == route every row to b; disable_adapters = the base model
        torch.testing.assert_close(reft(input_ids=ids, intervention_locations=reft.locations_for("b", positions)).logits[3],
                                   together[3])
        with reft.disable_adapters():
            assert torch.equal(reft(input_ids=ids, intervention_locations=loc).logits, base(input_ids=ids).logits)
        reft.set_active_adapters("a")  # b off: rows routed to b are base rows
        assert torch.equal(reft(input_ids=ids, intervention_locations=loc).logits[1], base(input_ids=ids).logits[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_side_does_not_change_results(arch, tiny_lm):
    base = tiny_lm(arch)
    reft = get_reft_model(base, ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2))
    perturb(reft.interventions, 0.5)
    lengths, T = [7, 4, 5], 7
    seqs = [ids_batch(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    pos = [[1, n - 1] for n in lengths]  # first-but-one and last real token of each row
    outs = {}
    for side in ("right", "left"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        loc = torch.zeros(3, 2, 2, dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            start = 0 if side == "right" else T - n
            ids[b, start:start + n], mask[b, start:start + n] = s, 1
            loc[b, :] = torch.tensor(pos[b]) + start
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = reft(input_ids=ids, attention_mask=mask, position_ids=position_ids, intervention_locations=loc).logits
        outs[side] = [logits[b, (0 if side == "right" else T - n):][:n] for b, n in enumerate(lengths)]
    for r, l in zip(outs["right"], outs["left"]):
        torch.testing.assert_close(r, l, atol=1e-5, rtol=1e-5)


def test_hooks_registered_once_and_removal_leaves_foreign_hooks(tiny_lm):
    base = tiny_lm("gpt_neox")
    before = hook_count(base)
    foreign = base.gpt_neox.layers[0].register_forward_hook(lambda m, a, o: None)
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(**r) for r in MIXED]))
    attached = hook_count(base)
    assert attached > before + 1
    ids = ids_batch()
    for _ in range(3):
        reft(input_ids=ids, intervention_locations=locations_mixed(len(MIXED)), labels=ids).loss.backward()
    reft.generate(ids, attention_mask=torch.ones_like(ids), intervention_locations=locations_mixed(len(MIXED)),
                  max_new_tokens=3, do_sample=False)
    assert hook_count(base) == attached
    base2 = reft.unwrap()
    assert base2 is base and hook_count(base) == before + 1  # only the foreign hook is left
    assert foreign.id in base.gpt_neox.layers[0]._forward_hooks
    with pytest.raises(RuntimeError, match="hooks were removed"):
        reft(input_ids=ids, intervention_locations=locations_mixed(len(MIXED)))


def test_train_eval_propagate_and_eval_disables_dropout(tiny_lm):
    base = tiny_lm("llama")
    reft = get_reft_model(base, ReftConfig.uniform([1], "loreft", low_rank_dimension=2, dropout=0.5))
    assert not reft.training and not reft.interventions["default"][0].training  # follows the eval-mode base
    perturb(reft.interventions, 0.5)
    ids, loc = ids_batch(), torch.full((3, 1, 7), 0) + torch.arange(7)
    reft.train()
    assert base.training and reft.interventions["default"][0].training
    torch.manual_seed(0)
    a = reft(input_ids=ids, intervention_locations=loc).logits
    b = reft(input_ids=ids, intervention_locations=loc).logits
    assert not torch.equal(a, b)  # dropout on the edit is active in training
    reft.eval()
    assert not base.training and not reft.interventions["default"][0].training
    with torch.no_grad():
        assert torch.equal(reft(input_ids=ids, intervention_locations=loc).logits,
                           reft(input_ids=ids, intervention_locations=loc).logits)


def grads_of(reft: ReftModel, ids: torch.Tensor, loc: torch.Tensor, interleave: bool) -> list[torch.Tensor]:
    reft.zero_grad()
    loss = reft(input_ids=ids, intervention_locations=loc, labels=ids).loss
    if interleave:  # another forward between forward and backward (a DPO reference pass, other locations)
        with torch.no_grad(), reft.disable_adapters():
            reft(input_ids=ids[:1], intervention_locations=loc[:1] * 0)
        reft(input_ids=ids[:2], intervention_locations=loc[:2].flip(0))  # grad-enabled, different state
    loss.backward()
    return [p.grad.clone() for p in reft.interventions.parameters()]


def test_gradient_checkpointing_keeps_intervention_gradients(tiny_lm):
    base = tiny_lm("llama")
    reps = [RepresentationConfig(layer=0, intervention="loreft", low_rank_dimension=2),
            RepresentationConfig(layer=1, component="mlp_output", intervention="noreft", low_rank_dimension=2)]
    reft = get_reft_model(base, ReftConfig(reps))
    perturb(reft.interventions, 0.5)
    reft.train()
    ids, loc = ids_batch(), locations_mixed(2)
    plain = grads_of(reft, ids, loc, interleave=False)
    reft.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in base.model.layers)
    for interleave in (False, True):
        ckpt = grads_of(reft, ids, loc, interleave)
        for g, want in zip(ckpt, plain):
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)
            assert want.abs().sum() > 0


def test_explicit_module_path_equals_named_component(tiny_lm):
    outs = []
    for comp in ("mlp_output", "model.layers[1].mlp"):
        base = tiny_lm("llama")
        torch.manual_seed(3)
        reft = get_reft_model(base, ReftConfig([RepresentationConfig(layer=1, component=comp, low_rank_dimension=2)]))
        assert reft.slots[0].path == "model.layers.1.mlp"
        perturb(reft.interventions, 0.5)
        with torch.no_grad():
            outs.append(reft(input_ids=ids_batch(), intervention_locations=locations_mixed(1)).logits)
    assert torch.equal(outs[0], outs[1])


def test_config_round_trips_and_errors(tmp_path):
    cfg = ReftConfig([RepresentationConfig(**r) for r in MIXED] +
                     [RepresentationConfig(layer=2, component="input:model.layers[2].mlp", extra={"proj_bias": True},
                                           intervention="noreft", low_rank_dimension=3, act_fn="relu")])
    assert ReftConfig.from_dict(cfg.to_dict()) == cfg
    assert ReftConfig.from_json(cfg.to_json()) == cfg and ReftConfig.from_yaml(cfg.to_yaml()) == cfg
    for name in ("c.json", "c.yaml"):
        cfg.save(tmp_path / name)
        assert ReftConfig.load(tmp_path / name) == cfg
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\].*valid keys: \['layer'"):
        ReftConfig.from_dict({"representations": [{"layer": 0, "rank": 4}]})
    with pytest.raises(ValueError, match=r"unknown intervention type 'loraft'; valid: \[.*'loreft'"):
        RepresentationConfig(layer=0, intervention="loraft")
    with pytest.raises(ValueError, match="unknown component 'mlp_out'; valid"):
        RepresentationConfig(layer=0, component="mlp_out")
    with pytest.raises(ValueError, match=r"'consreft' does not take argument 'act_fn'; valid: \['embed_dim'"):
        RepresentationConfig(layer=0, intervention="consreft", low_rank_dimension=2, act_fn="relu").intervention_kwargs(8)


@pytest.mark.parametrize("key, where", [("share_weights", ""), ("add_bias", "representations[0]: ")])
def test_a_quoted_bool_in_a_config_file_is_refused(key, where, tmp_path):
    """`bool(share_weights)` made a hand-written "false" True (pyreft's split silently off); add_bias "false" went to
    the constructor as a truthy string. Now a non-bool is refused, naming the file and the key."""
    data = {"representations": [{"layer": i, "low_rank_dimension": 2, "intervention": "noreft"} for i in (0, 1)],
            "positions": "f1+l1", "share_weights": True}
    (data if key == "share_weights" else data["representations"][0])[key] = "false"
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        ReftConfig.load(tmp_path / "c.json")
    assert str(e.value) == (f"{tmp_path / 'c.json'}: {where}{key} must be true or false, got 'false' (a str); write it "
                            "without quotes")
    (data if key == "share_weights" else data["representations"][0])[key] = False
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert getattr(ReftConfig.load(tmp_path / "c.json") if key == "share_weights"
                   else ReftConfig.load(tmp_path / "c.json").representations[0], key) is False


@pytest.mark.parametrize("where, key, value, message", [
    ("representations[0]: ", "low_rank_dimension", True, "low_rank_dimension must be a positive int, got True"),
    ("representations[0]: ", "dropout", "0.1", "dropout must be a number in [0, 1) (YAML reads 1e-1 as text: write 0.1), got '0.1'"),
    ("", "positions", 3, "positions must be a string like 'f3+l3' or a Positions, got int"),
])
def test_a_mistyped_value_in_a_config_file_is_refused_naming_the_file(where, key, value, message, tmp_path):
    """low_rank_dimension: true was read as rank 1, dropout "0.1" was passed on as a string, and positions: 3 was a
    TypeError without the file. Now each is one ValueError naming the file (and the representation)."""
    data = {"representations": [{"layer": 0, "low_rank_dimension": 2}]}
    (data if key == "positions" else data["representations"][0])[key] = value
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        ReftConfig.load(tmp_path / "c.json")
    assert str(e.value) == f"{tmp_path / 'c.json'}: {where}{message}"


@pytest.mark.parametrize("name", ["c.json", "c.yaml"])
def test_config_save_is_atomic(name, tmp_path, monkeypatch):
    """A save that fails after the new text was written (here fsync, before the rename) leaves the previous
    file byte for byte and no temporary file beside it; a plain write_text would have half-replaced it."""
    old = ReftConfig([RepresentationConfig(layer=0, low_rank_dimension=2)])
    new = ReftConfig([RepresentationConfig(layer=1, low_rank_dimension=4, intervention="noreft")])
    old.save(tmp_path / name)
    before = (tmp_path / name).read_bytes()
    import alignkit.files as files  # the one atomic writer ReftConfig.save uses

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == before
    assert ReftConfig.load(tmp_path / name) == old
    monkeypatch.undo()
    new.save(tmp_path / name)
    assert ReftConfig.load(tmp_path / name) == new


def test_bad_locations_and_layers_fail_clearly(tiny_lm):
    base = tiny_lm("llama")
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 layers"):
        get_reft_model(base, ReftConfig.uniform([5], low_rank_dimension=2))
    reft = get_reft_model(base, ReftConfig.uniform([0, 1], low_rank_dimension=2))
    with pytest.raises(ValueError, match=r"must be \(batch=3, num_interventions=2, positions\)"):
        reft(input_ids=ids_batch(), intervention_locations=torch.zeros(3, 3, 1, dtype=torch.long))
    with torch.no_grad():  # (B, P) = the same positions for every intervention
        a = reft(input_ids=ids_batch(), intervention_locations=torch.tensor([[2], [3], [-1]])).logits
        b = reft(input_ids=ids_batch(), intervention_locations=torch.tensor([[[2], [2]], [[3], [3]], [[-1], [-1]]])).logits
    assert torch.equal(a, b)


def test_a_location_past_the_input_is_refused_in_a_forward(tiny_lm):
    """One forward runs every position it will see, so a location past its input edits nothing; before, it was
    dropped without a word (e.g. locations built for a prompt before input_ids were truncated, or for a wider
    batch), and the forward returned the base model's output: training such batches trains nothing. Now one
    ValueError naming the entry, its value and the input length. The last position (T - 1) and -1 still work."""
    reft = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0, 1], low_rank_dimension=2))
    perturb(reft)
    ids = ids_batch(t=7)  # (3, 7)
    loc = torch.tensor([[[6], [6]], [[-1], [-1]], [[2], [7]]])  # row 2, intervention 1: position 7 of 0..6
    with pytest.raises(ValueError, match=r"^intervention_locations\[2, 1, 0\] is 7, past this forward's 7 input "
                                         r"tokens \(positions 0\.\.6\), so it would edit nothing; "):
        reft(input_ids=ids, intervention_locations=loc)
    with pytest.raises(ValueError, match=r"^intervention_locations\[0, 1\] is 9, past"):
        reft(input_ids=ids, intervention_locations=torch.tensor([[2, 9], [-1, -1], [0, 1]]))
    with torch.no_grad():
        edited = reft(input_ids=ids, intervention_locations=torch.tensor([[6], [-1], [-1]])).logits
        plain = reft.model(input_ids=ids).logits
    assert not torch.equal(edited[0, 6], plain[0, 6]) and torch.equal(edited[1:], plain[1:])


def test_a_call_without_locations_on_an_adapter_without_a_spec_warns(tiny_lm, caplog):
    """Without `intervention_locations`, forward / generate place each adapter at its saved position spec; an
    adapter built without one (or loaded from pyreft, which records none) edits nothing there, and the call returns
    the base model's output as the adapter's. That stays (tests/interventions/test_reft_owns_positions.py), but it
    is no longer silent: one warning naming the adapter, per adapter; none with a spec, explicit locations, or the
    bare adapter switched off."""
    reft = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0], low_rank_dimension=2))
    perturb(reft)
    ids = ids_batch(t=5)
    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.attach"), torch.no_grad():
        plain = reft.model(input_ids=ids).logits
        assert torch.equal(reft(input_ids=ids).logits, plain)
        reft.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warned once already
        explicit = reft(input_ids=ids, intervention_locations=torch.full((3, 1), 4)).logits
        with reft.disable_adapters():
            reft(input_ids=ids)
        reft.set_positions("default", "l1")
        assert torch.equal(reft(input_ids=ids).logits, explicit) and not torch.equal(explicit, plain)
    assert [r.getMessage() for r in caplog.records] == [
        "ReFT adapter 'default' has no position spec and this forward passes no intervention_locations, so it edits "
        "nothing (the output is the base model's); pass intervention_locations, or give it a spec "
        "(set_positions('default', 'f1+l1'), ReftConfig(positions=...), or load_pyreft(..., positions=...))"]


def test_interventions_follow_the_model_dtype(tiny_dir):
    from alignkit.models.loading import load_model

    base = load_model(tiny_dir("llama"), dtype="bfloat16").eval()
    reft = get_reft_model(base, ReftConfig.uniform([0], "noreft", low_rank_dimension=2))
    iv = reft.interventions["default"][0]
    assert iv.spec()["dtype"] == "bfloat16" and all(p.dtype == torch.bfloat16 for p in iv.parameters())
    ids = ids_batch()
    loc = torch.tensor([[[2]], [[-1]], [[-1]]])
    with torch.no_grad():
        out, want = reft(input_ids=ids, intervention_locations=loc).logits, base(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out[1:], want[1:]) and torch.equal(out[0, :2], want[0, :2])


def test_a_module_path_in_another_layer_than_layer_is_refused(tiny_lm):
    """component 'model.layers[1].mlp' with layer 0 was attached at layer 1 while the slot (and the saved adapter's
    description) said layer 0. Now a ValueError naming both."""
    base = tiny_lm("llama")
    with pytest.raises(ValueError) as e:
        get_reft_model(base, ReftConfig([RepresentationConfig(layer=0, component="model.layers[1].mlp",
                                                              low_rank_dimension=2)]))
    msg = str(e.value)
    assert "'model.layers[1].mlp'" in msg and "layer 1" in msg and "layer 0" in msg, msg
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(layer=1, component="model.layers[1].mlp",
                                                                 low_rank_dimension=2)]))
    assert (reft.slots[0].layer, reft.slots[0].path) == (1, "model.layers.1.mlp")


@pytest.mark.parametrize("component", ["model.embed_tokens", "model.norm", "input:model.norm"])
def test_a_module_path_outside_the_layers_takes_layer_0_and_refuses_another(component, tiny_lm):
    """A module path outside the decoder layers (embeddings, final norm) accepted any in-range layer, attached by the
    path alone and saved that unused layer as where the adapter edits. Now a layer other than 0 is a ValueError
    naming the component and the fix; layer 0 attaches at the path and edits the selected position."""
    base = tiny_lm("llama")
    with pytest.raises(ValueError) as e:
        get_reft_model(base, ReftConfig([RepresentationConfig(layer=1, component=component, low_rank_dimension=2)]))
    msg = str(e.value)
    assert repr(component) in msg and "outside the decoder layers" in msg and "layer 1" in msg \
        and "set layer: 0" in msg, msg
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())  # refused before any hook
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(layer=0, component=component, low_rank_dimension=2)]))
    assert (reft.slots[0].layer, reft.slots[0].path) == (0, component.removeprefix("input:"))
    perturb(reft.interventions, 2.0, seed=1)
    ids = ids_batch(1)
    loc = torch.tensor([[[4]]])
    with torch.no_grad():
        out, want = reft(input_ids=ids, intervention_locations=loc).logits, base(input_ids=ids).logits
    assert not torch.allclose(out[0, 4], want[0, 4])  # the edit reaches the logits at its position


def test_embed_dim_is_the_components_width_and_a_wrong_one_is_refused_when_attached(tiny_lm):
    """The intervention's width was the model's hidden size (or embed_dim as given) whatever the component: on a
    module of another width (the MLP's down_proj input: intermediate_size) or with a wrong embed_dim, attaching
    worked and the first forward stopped on 'mat1 and mat2 shapes cannot be multiplied' (under the CLI: after the
    run folder was written, as an unexpected error). Now embed_dim left out is the component's width where the
    module says it (Linear, norm), and a given one that differs is a ValueError naming the representation."""
    base = tiny_lm("llama")
    inter = base.config.intermediate_size
    reft = get_reft_model(base, ReftConfig([RepresentationConfig(
        layer=0, component="input:model.layers[0].mlp.down_proj", low_rank_dimension=2)]))
    assert reft.slots[0].intervention.embed_dim == inter != base.config.hidden_size
    with torch.no_grad():
        reft(input_ids=ids_batch(), intervention_locations=locations_mixed(1))
    for rep in (dict(layer=0, component="input:model.layers[0].mlp.down_proj", embed_dim=base.config.hidden_size),
                dict(layer=0, component="model.layers[0].mlp.up_proj", embed_dim=base.config.hidden_size),
                dict(layer=1, embed_dim=8)):
        with pytest.raises(ValueError) as e:
            get_reft_model(tiny_lm("llama"), ReftConfig([RepresentationConfig(low_rank_dimension=2, **rep)]))
        msg = str(e.value)
        assert "representations[0]" in msg and f"embed_dim={rep['embed_dim']}" in msg, msg


def test_requires_grad_is_restored_when_a_wrap_fails_and_kept_when_it_succeeds():
    """ReftModel.__init__ and ReftLora.wrap share `requires_grad_restored_on_error`: a block that raises gives every
    parameter back its own requires_grad (a mixed model stays mixed, not all trainable); a block that finishes keeps
    what it set; the error itself goes through unchanged."""
    from alignkit.interventions.attach import requires_grad_restored_on_error

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    want = [p.requires_grad for p in model.parameters()]
    assert want == [True, True, False, True, True, True]
    with pytest.raises(KeyError, match="refused"):
        with requires_grad_restored_on_error(model):
            model.requires_grad_(False)
            raise KeyError("refused")
    assert [p.requires_grad for p in model.parameters()] == want
    with requires_grad_restored_on_error(model):
        model[0].requires_grad_(False)
    assert [p.requires_grad for p in model.parameters()] == [False, False, False, True, True, True]


def test_a_refused_reft_config_gives_each_parameter_its_own_requires_grad_back(tiny_lm):
    """A model whose embedding the caller froze keeps it frozen and the rest trainable after get_reft_model refuses
    a layer it does not have (the base was frozen, then the config refused)."""
    base = tiny_lm()
    base.get_input_embeddings().weight.requires_grad_(False)
    want, hooks = {n: p.requires_grad for n, p in base.named_parameters()}, hook_count(base)
    assert not all(want.values()) and any(want.values())
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        get_reft_model(base, ReftConfig(representations=[RepresentationConfig(layer=9, low_rank_dimension=2)]))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == want
    assert hook_count(base) == hooks
