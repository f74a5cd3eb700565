"""Saving and loading ReFT adapters: bitwise round trips for every type, and clear errors for a wrong base
model or a damaged folder. Also pyreft checkpoints through `load_pyreft`."""

from __future__ import annotations

import hashlib
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig

from alignkit.interventions import INTERVENTIONS
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import ReftConfig, RepresentationConfig
from alignkit.interventions.io import CONFIG_NAME, WEIGHTS_NAME, read_reft_weights, save_reft
from alignkit.interventions.loading import load_pyreft, load_reft
from alignkit.models.loading import load_model
from tests.adapters.table import perturb
from tests.interventions.table import INTERVENTION_ROWS
from tests.interventions.test_pyreft_compat import orthonormal, pyreft_folder

ROWS = [(r.kind, r.saved) for r in INTERVENTION_ROWS]  # (type, arguments): tests/interventions/table.py


def test_rows_cover_every_registered_type():
    assert sorted({kind for kind, _ in ROWS}) == sorted(INTERVENTIONS)


def ids_and_locations(num: int):
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    loc = torch.full((2, num, 2), -1, dtype=torch.long)
    loc[0, :, 0], loc[1, :, 0], loc[1, :, 1] = 2, 0, 5
    return ids, loc


def saved(tiny_lm, tmp_path, kind="loreft", extra=None, arch="llama"):
    reps = [RepresentationConfig(layer=0, intervention=kind, low_rank_dimension=3, **(extra or {})),
            RepresentationConfig(layer=1, component="mlp_output", intervention=kind, low_rank_dimension=2, **(extra or {}))]
    reft = get_reft_model(tiny_lm(arch), ReftConfig(reps))
    perturb(reft.interventions, 0.5)
    reft.save_pretrained(tmp_path / "ckpt")
    return reft, tmp_path / "ckpt"


@pytest.mark.parametrize("kind,extra", ROWS, ids=[k for k, _ in ROWS])
def test_round_trip_bitwise_for_every_type(kind, extra, tiny_lm, tmp_path):
    reft, folder = saved(tiny_lm, tmp_path, kind, extra)
    ids, loc = ids_and_locations(2)
    with torch.no_grad():
        want = reft(input_ids=ids, intervention_locations=loc).logits
    again = load_reft(tiny_lm("llama"), folder)
    with torch.no_grad():
        got = again(input_ids=ids, intervention_locations=loc).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, tiny_lm("llama")(input_ids=ids).logits)  # the adapter does something
    assert again.adapter_configs["default"] == reft.adapter_configs["default"]
    for a, b in zip(reft.interventions["default"], again.interventions["default"]):
        assert a.spec() == b.spec()
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb)


def test_config_json_records_every_argument_and_the_base(tiny_lm, tmp_path):
    reft, folder = saved(tiny_lm, tmp_path, "loreft", dict(act_fn="relu", dropout=0.1))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["base_model"] == {"model_type": "llama", "hidden_size": 64, "num_layers": 2, "dtype": "float32",
                                  "name_or_path": meta["base_model"]["name_or_path"]}
    params = set(inspect.signature(INTERVENTIONS["loreft"].__init__).parameters) - {"self"}
    first = meta["interventions"][0]
    assert set(first["spec"]) == params | {"type"}  # every constructor argument
    assert first["spec"]["act_fn"] == "relu" and first["spec"]["dropout"] == 0.1 and first["spec"]["embed_dim"] == 64
    assert [(i["layer"], i["path"]) for i in meta["interventions"]] == [(0, "model.layers.0"), (1, "model.layers.1.mlp")]
    assert meta["weights_sha256"] == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    keys = set(load_file(folder / WEIGHTS_NAME))
    assert keys == {f"{i}.{k}" for i, iv in enumerate(reft.interventions["default"]) for k in iv.state_dict()}
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]  # no temp files left


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=32), "hidden_size=64, this model has hidden_size=32"),
    (dict(num_layers=3), "num_layers=2, this model has num_layers=3"),
])
def test_wrong_base_shape_fails(change, message, tiny_lm, tiny_dir, tmp_path):
    _, folder = saved(tiny_lm, tmp_path)
    kwargs = {"hidden_size": change.get("hidden_size", 64), "num_layers": change.get("num_layers", 2)}
    other = load_model(tiny_dir("llama", **kwargs))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}.*{message}"):
        load_reft(other, folder)


def test_another_model_type_of_the_same_shape_fails(tiny_lm, tmp_path):
    """A llama adapter on a qwen2 model of the same widths and depth loaded with one warning (its edits, learnt on
    another network's hidden states, then ran there). Now refused like a shape mismatch."""
    _, folder = saved(tiny_lm, tmp_path)
    other = tiny_lm("qwen2")
    assert (other.config.hidden_size, other.config.num_hidden_layers) == (64, 2)  # only the model type differs
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: .*model_type='llama', this model has model_type='qwen2'"):
        load_reft(other, folder)


def tiny_gemma3_pair():
    """One tiny Gemma-3 decoder as Gemma3ForConditionalGeneration (config model_type gemma3, text config
    gemma3_text) and as Gemma3ForCausalLM (gemma3_text): the same decoder layers under two top-level names."""
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    vlm = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    return vlm, Gemma3ForCausalLM(Gemma3TextConfig(**text))


def test_one_decoder_under_a_composite_and_a_text_model_type_loads(tmp_path):
    """A ReFT adapter trained on Gemma-3 loaded as Gemma3ForConditionalGeneration (model_type gemma3) was refused on
    Gemma3ForCausalLM (gemma3_text) and back, though the decoder layers are the same. The text config's type is now
    saved and compared; a folder saved with the top-level name (gemma3) still loads onto gemma3_text. A text type
    that differs (llama onto gemma3) is still refused."""
    vlm, txt = tiny_gemma3_pair()
    assert (vlm.config.model_type, txt.config.model_type) == ("gemma3", "gemma3_text")
    rep = RepresentationConfig(layer=1, intervention="loreft", low_rank_dimension=2)
    for source, target in ((vlm, txt), (txt, vlm)):
        folder = save_reft(get_reft_model(source, ReftConfig(representations=[rep])), tmp_path / type(source).__name__)
        assert json.loads((folder / CONFIG_NAME).read_text())["base_model"]["model_type"] == "gemma3_text"
        assert len(load_reft(target, folder).interventions["default"]) == 1
    meta = json.loads((folder / CONFIG_NAME).read_text())  # as the earlier code saved it from the composite model
    meta["base_model"]["model_type"] = "gemma3"
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    assert len(load_reft(txt, folder).interventions["default"]) == 1
    meta["base_model"]["model_type"] = "llama"
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: .*model_type='llama', this model has model_type="
                                         "'gemma3_text'"):
        load_reft(txt, folder)


def rewrite_weights(folder, tensors):
    """Replace the safetensors file and fix the checksum, so only the key check can catch the change."""
    save_file(tensors, folder / WEIGHTS_NAME)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_damaged_folders_fail_with_the_file_and_the_reason(tiny_lm, tmp_path):
    _, folder = saved(tiny_lm, tmp_path)
    tensors = load_file(folder / WEIGHTS_NAME)
    blob, meta_text = (folder / WEIGHTS_NAME).read_bytes(), (folder / CONFIG_NAME).read_text()

    def fresh():
        (folder / WEIGHTS_NAME).write_bytes(blob)
        (folder / CONFIG_NAME).write_text(meta_text)

    (folder / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME}: missing"):
        load_reft(tiny_lm(), folder)
    fresh()
    (folder / CONFIG_NAME).write_text(meta_text[:40])
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: not valid JSON"):
        load_reft(tiny_lm(), folder)
    fresh()
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME}: missing"):
        load_reft(tiny_lm(), folder)
    fresh()
    (folder / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: checksum does not match"):
        load_reft(tiny_lm(), folder)
    meta = json.loads(meta_text)
    del meta["weights_sha256"]  # without a checksum the safetensors reader itself must refuse it
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: not a readable safetensors file"):
        load_reft(tiny_lm(), folder)
    fresh()
    missing = dict(tensors)
    gone = sorted(missing)[0]
    del missing[gone]
    rewrite_weights(folder, missing)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: missing tensor\(s\) \['{gone}'\]"):
        load_reft(tiny_lm(), folder)
    rewrite_weights(folder, {**tensors, "7.extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: unexpected tensor\(s\) \['7.extra'\]"):
        load_reft(tiny_lm(), folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reft(tiny_lm(), tmp_path / "nowhere")


@pytest.mark.parametrize("version, message", [(2, "saved by a newer alignkit: upgrade alignkit"),
                                              (None, "damaged or was not written by alignkit's save_reft"),
                                              ("1", "damaged or was not written by alignkit's save_reft")])
def test_another_format_version_is_refused(version, message, tiny_lm, tmp_path):
    """reft_config.json's `version` was written and never read: a folder of another layout (a newer alignkit's) was
    read as version 1. Now loading it (a new ReftModel or a resume's in-place read) names the file and the version."""
    reft, folder = saved(tiny_lm, tmp_path)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["version"] == 1
    meta["version"] = version
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    want = rf"{CONFIG_NAME}: format version {version!r}, this alignkit reads version 1 only; .*{message}"
    with pytest.raises(ValueError, match=want):
        load_reft(tiny_lm(), folder)
    with pytest.raises(ValueError, match=want):
        read_reft_weights(reft, folder)


def test_failed_save_keeps_the_previous_checkpoint(tiny_lm, tmp_path, monkeypatch):
    reft, folder = saved(tiny_lm, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    perturb(reft.interventions, 0.5, seed=7)
    import alignkit.files as files  # the one atomic writer save_reft uses

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_reft(reft, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old files intact, no temp left
    load_reft(tiny_lm(), folder)


def test_several_adapters_save_and_load_by_name(tiny_lm, tmp_path):
    reft = get_reft_model(tiny_lm(), ReftConfig.uniform([0], "loreft", low_rank_dimension=2), adapter_name="a")
    reft.add_adapter("b", ReftConfig.uniform([1], "noreft", low_rank_dimension=2))
    perturb(reft.interventions, 0.5)
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\]; pass adapter_name"):
        reft.save_pretrained(tmp_path / "x")
    reft.save_pretrained(tmp_path / "a", adapter_name="a")
    reft.save_pretrained(tmp_path / "b", adapter_name="b")
    served = load_reft(tiny_lm(), tmp_path / "a", adapter_name="a")
    served.load_adapter(tmp_path / "b", adapter_name="b")
    ids, _ = ids_and_locations(1)
    loc = reft.route_locations(["b", "a"], torch.tensor([[1, 4], [2, 3]]))
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids, intervention_locations=loc).logits,
                           reft(input_ids=ids, intervention_locations=loc).logits)


def test_load_pyreft_loreft_matches_hand_written_hook(tiny_lm, tiny_dir, tmp_path):
    """A pyreft folder written by hand (pyvene's layout); the loaded model must equal the base model with
    h + Rᵀ(Wh + b − Rh) applied at the chosen position by a hook written here."""
    d, r = 64, 2
    g = torch.Generator().manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(d, r, generator=g))  # (d, r) orthonormal columns = Rᵀ
    W, b = torch.randn(r, d, generator=g), torch.randn(r, generator=g)
    folder = tmp_path / "pyreft"
    folder.mkdir()
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    torch.save({"weight": W, "bias": b, "rotate_layer": rot.contiguous()}, folder / f"intkey_{key}.bin")
    (folder / "config.json").write_text(json.dumps({
        "representations": [[1, "block_output", "pos", 1, r, None, None, None, None, None, None, None, None]],
        "intervention_types": ["<class 'pyreft.interventions.LoreftIntervention'>"], "sorted_keys": [key]}))
    reft = load_pyreft(tiny_lm(), folder)
    assert reft.adapter_configs["default"].representations[0].intervention == "loreft"
    ids = torch.randint(3, 200, (1, 6), generator=g)
    with torch.no_grad():
        got = reft(input_ids=ids, intervention_locations=torch.tensor([[[3]]])).logits
        base = tiny_lm()

        def hook(module, args, out):  # (1, T, d)
            h = out.clone()
            x = h[0, 3]
            h[0, 3] = x + (x @ W.T + b - x @ rot) @ rot.T
            return h

        base.model.layers[1].register_forward_hook(hook)
        want = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embed_dim=64 but the model's hidden size is 32"):
        load_pyreft(load_model(tiny_dir("llama", hidden_size=32)), folder)


def test_read_reft_weights_copies_in_place(tiny_lm, tmp_path):
    from alignkit.interventions.io import read_reft_weights

    reft, folder = saved(tiny_lm, tmp_path)
    ids, loc = ids_and_locations(2)
    with torch.no_grad():
        want = reft(input_ids=ids, intervention_locations=loc).logits
    params = list(reft.interventions.parameters())
    perturb(reft.interventions, 0.5, seed=5)
    read_reft_weights(reft, folder)
    assert all(a is b for a, b in zip(params, reft.interventions.parameters()))  # same objects (optimizer state)
    with torch.no_grad():
        assert torch.equal(reft(input_ids=ids, intervention_locations=loc).logits, want)
    other = get_reft_model(tiny_lm(), ReftConfig.uniform([0], "noreft", low_rank_dimension=2))
    with pytest.raises(ValueError, match="differ from adapter 'default'"):
        read_reft_weights(other, folder)


@pytest.mark.parametrize("layers, positions, message", [
    ([(1, "block_output"), (1, "mlp_output")], "f1+l1",
     r"interventions\[0\] was trained at layer 0, component 'block_output', and adapter 'default' has it at layer 1"),
    ([(0, "block_output"), (1, "block_output")], "f1+l1",
     r"interventions\[1\] was trained at layer 1, component 'mlp_output', .* at layer 1, component 'block_output'"),
    ([(0, "block_output"), (1, "mlp_output")], "l3",
     r"the weights were trained on positions 'f1\+l1' \(share_weights=True\), and adapter 'default' edits 'l3'"),
])
def test_read_reft_weights_refuses_weights_of_another_place(layers, positions, message, tiny_lm, tmp_path):
    """The same types and sizes at another layer / component, or on other positions: read_reft_weights (what
    alignkit.adapters.load_adapter_weights runs for a ReFT) compared the intervention specs only, so the weights
    loaded without a word and edited another place. Now refused, naming the file, the entry and both places."""
    reps = [RepresentationConfig(layer=0, low_rank_dimension=3), RepresentationConfig(layer=1, component="mlp_output",
                                                                                       low_rank_dimension=2)]
    reft = get_reft_model(tiny_lm(), ReftConfig(reps, positions="f1+l1"))
    reft.save_pretrained(tmp_path / "ckpt")
    moved = [RepresentationConfig(layer=l, component=c, low_rank_dimension=r.low_rank_dimension)
             for (l, c), r in zip(layers, reps)]
    other = get_reft_model(tiny_lm(), ReftConfig(moved, positions=positions))
    before = [p.clone() for p in other.interventions.parameters()]
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: {message}"):
        read_reft_weights(other, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, other.interventions.parameters()))  # nothing copied


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["reft_config"]["representations"][0].update(layer=1), r"representations\[0\] has layer=1 but "
     r"interventions\[0\], which its weights were saved from, has 0"),
    (lambda m: m["reft_config"]["representations"][1].update(component="block_output"),
     r"representations\[1\] has component='block_output' but interventions\[1\].* has 'mlp_output'"),
    (lambda m: m["reft_config"]["representations"][0].update(intervention="noreft"),
     r"representations\[0\] has intervention='noreft' but interventions\[0\].* has 'loreft'"),
    (lambda m: m["reft_config"]["representations"][0].update(low_rank_dimension=2),
     r"representations\[0\] has low_rank_dimension=2 but interventions\[0\].* has 3"),
    (lambda m: m["interventions"][1]["spec"].update(dropout=0.3),  # the representation's None: the type's 0.0
     r"representations\[1\] has dropout=0.0 but interventions\[1\].* has 0.3"),
    (lambda m: m["interventions"][0]["spec"].update(act_fn="relu"),
     r"representations\[0\] has act_fn=None but interventions\[0\].* has 'relu'"),
])
def test_the_two_halves_of_reft_config_json_that_disagree_are_refused(edit, message, tiny_lm, tmp_path):
    """reft_config.json names each intervention twice: in `reft_config` (where the model attaches it) and in
    `interventions` (where and as what its weights were saved, what is built). Before: an edited or mixed file
    loaded the weights saved for layer 0 on layer 1 (or as rank / type / dropout the config did not say) silently."""
    _, folder = saved(tiny_lm, tmp_path)
    load_reft(tiny_lm("llama"), folder)  # as saved, it loads
    meta = json.loads((folder / CONFIG_NAME).read_text())
    edit(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"^{folder / CONFIG_NAME}: reft_config\.{message}.*save the adapter again"):
        load_reft(tiny_lm("llama"), folder)


def test_load_pyreft_takes_the_positions_pyreft_does_not_record(tiny_lm, tmp_path):
    """pyreft saves no positions; given `positions`, a reloaded pyreft adapter's plain `generate` / forward edits the
    prompt's last token exactly as explicit locations do, and the model can be saved as an alignkit adapter. Before:
    no way to pass them, so `generate(**inputs)` edited nothing (the base model's output, one warning)."""
    d = 64
    state = {"weight": torch.randn(2, d), "bias": torch.randn(2), "rotate_layer": orthonormal(d, 2)}
    folder = pyreft_folder(tmp_path / "pyreft", [(1, "block_output", "LoreftIntervention", state)])
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    reft = load_pyreft(tiny_lm(), folder, positions="l1")
    assert reft.adapter_configs["default"].positions == "l1"
    with torch.no_grad():
        plain = reft(input_ids=ids).logits
        explicit = reft(input_ids=ids, intervention_locations=torch.tensor([[[5]], [[5]]])).logits
        base = tiny_lm()(input_ids=ids).logits
    assert torch.equal(plain, explicit) and not torch.allclose(plain, base)
    reft.save_pretrained(tmp_path / "saved")
    assert load_reft(tiny_lm(), tmp_path / "saved").adapter_configs["default"].positions == "l1"
    with pytest.raises(ValueError, match="bad positions 'x3'"):
        load_pyreft(tiny_lm(), folder, positions="x3")


def old_format(folder, rate_in_spec=0.0):
    """`folder` as alignkit wrote it before the spec kept the constructor's rate: each spec's dropout was the live
    nn.Dropout.p, which turn_off_dropout had set to 0 (reft_config's representations kept the configured rate)."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    for item in meta["interventions"]:
        item["spec"]["dropout"] = rate_in_spec
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def test_a_folder_whose_spec_says_dropout_0_from_a_swept_training_loads_with_the_configured_rate(tiny_lm, tmp_path,
                                                                                                  caplog):
    """Rule (docs/architecture.md, ReFT folders): a spec's dropout 0 where its representation says a rate > 0 is the
    configured rate (what earlier versions wrote after turn_off_dropout); dropout changes neither the weights nor
    inference. Before: such a folder was refused by load_reft ("edited or mixed from two saves"), and
    read_reft_weights (resume) would refuse it against a live adapter reporting its configured rate."""
    reft, folder = saved(tiny_lm, tmp_path, "loreft", dict(dropout=0.05))
    old_format(folder)
    ids, loc = ids_and_locations(2)
    with torch.no_grad():
        want = reft.eval()(input_ids=ids, intervention_locations=loc).logits
    with caplog.at_level("WARNING", logger="alignkit.interventions.io"):
        again = load_reft(tiny_lm("llama"), folder)
    assert "interventions[0]: 0.05, interventions[1]: 0.05" in caplog.text
    assert [iv.dropout.p for iv in again.interventions["default"]] == [0.05, 0.05]
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids, intervention_locations=loc).logits, want)
    perturb(reft.interventions, 0.5, seed=5)
    read_reft_weights(reft, folder)  # resume into the live adapter (configured 0.05) from the old folder
    with torch.no_grad():
        assert torch.equal(reft.eval()(input_ids=ids, intervention_locations=loc).logits, want)


@pytest.mark.parametrize("configured, in_spec", [(None, 0.05), (0.05, 0.1), (0.1, 0.05)])
def test_a_real_dropout_mismatch_is_still_refused(configured, in_spec, tiny_lm, tmp_path):
    """Only a spec's 0 is read as a swept rate: a spec saying a rate the representation does not is refused."""
    _, folder = saved(tiny_lm, tmp_path, "loreft", dict(dropout=configured))
    old_format(folder, in_spec)
    with pytest.raises(ValueError, match=r"has dropout=.* but interventions\[0\].*save the adapter again"):
        load_reft(tiny_lm("llama"), folder)
