"""peft behaviour and names alignkit relies on (rows P of the table in docs/architecture.md)."""

from __future__ import annotations

import pytest
import torch

from alignkit.compat import DependencyMoved, check_peft_load
from alignkit.adapters import (AdapterConfig, LoraSettings, adapter_kind, apply_adapter, load_adapter,
                                      load_adapter_weights, reference_off, save_adapter, unwrap_lm)
from alignkit.models.loading import load_model
from alignkit.trainers.reference import model_fingerprint

from tests.adapters.table import perturb

from .guards import check, guard

PEFT = "peft"
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def lora(base, **kw):
    torch.manual_seed(0)
    return apply_adapter(base, AdapterConfig(kind="lora", lora=LoraSettings(r=2, **kw)))


def test_peft_model_is_recognised_and_unwrapped(tiny_lm):
    where = "alignkit/adapters/base.py:unwrap_lm, interventions/locate.py:is_peft_model/hf_model"
    base = tiny_lm("llama")
    m = lora(base)
    check(hasattr(m, "peft_config") and callable(getattr(m, "get_base_model", None)), PEFT,
          "a PeftModel no longer has peft_config / get_base_model()", where)
    check(m.get_base_model() is base and unwrap_lm(m) is base and adapter_kind(m) == "lora", PEFT,
          "PeftModel.get_base_model() no longer returns the transformers model it wraps", where)


def test_all_linear_leaves_the_head_and_seq_cls_trains_the_score(tiny_lm, tiny_classifier):
    """'all-linear' must not wrap lm_head (alignkit applies the head's weight itself); a SEQ_CLS LoRA keeps the
    classifier head trainable through modules_to_save."""
    where = "alignkit/adapters/lora.py:Lora.wrap, trainers/logps.py:_head"
    m = lora(tiny_lm("llama"))
    lm = unwrap_lm(m)
    check(not hasattr(lm.get_output_embeddings(), "base_layer"), PEFT, "target_modules='all-linear' now wraps "
          "lm_head in a LoRA layer", where)
    check(hasattr(lm.model.layers[0].self_attn.q_proj, "base_layer"), PEFT, "target_modules='all-linear' no "
          "longer wraps the attention projections (LoRA layers lost their base_layer attribute?)", where)
    rm = lora(tiny_classifier("llama", num_labels=1))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad and "score" in n]
    check(trainable and all("modules_to_save" in n for n in trainable), PEFT, "a SEQ_CLS LoRA no longer trains the "
          "classifier head through modules_to_save", where, str(trainable))


def test_disable_adapter_gives_the_base_model(tiny_lm):
    where = "alignkit/adapters/lora.py:Lora.off"
    base = tiny_lm("llama")
    with torch.no_grad():
        want = base(input_ids=IDS).logits
    m = lora(base)
    perturb(m, 0.1)
    with torch.no_grad(), guard(PEFT, "PeftModel.disable_adapter() is no longer a context manager", where):
        on = m(input_ids=IDS).logits
        with reference_off(m):
            off = m(input_ids=IDS).logits
    check(not torch.allclose(on, want), PEFT, "a perturbed LoRA does not change the outputs", where)
    check(torch.allclose(off, want, atol=1e-6), PEFT, "inside disable_adapter() the model no longer computes as "
          "its base (DPO references would be wrong)", where, f"max diff {(off - want).abs().max().item():.3g}")


def test_adapter_files_and_state_dict_round_trip(tiny_dir, tmp_path):
    """save_pretrained writes adapter_config.json + adapter_model.safetensors; set_peft_model_state_dict puts
    them back in place (resume) with no key left over; PeftModel.from_pretrained loads the same model."""
    where = "alignkit/adapters/lora.py:Lora.save_weights/load_weights/load"
    m = lora(load_model(tiny_dir("llama")))
    perturb(m, 0.1)
    with torch.no_grad():
        want = m(input_ids=IDS).logits
    save_adapter(m, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    check({"adapter_config.json", "adapter_model.safetensors", "alignkit_adapter.json"} <= set(files), PEFT,
          "PeftModel.save_pretrained no longer writes adapter_config.json + adapter_model.safetensors", where, str(files))
    import json

    peft_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    check("base_model_name_or_path" in peft_cfg, PEFT, "adapter_config.json no longer records "
          "base_model_name_or_path (alignkit makes it absolute)", "alignkit/adapters/lora.py:absolute_base_path",
          str(sorted(peft_cfg)))
    perturb(m, 0.1, seed=2)
    with guard(PEFT, "set_peft_model_state_dict(model, state) failed on peft's own saved file", where):
        load_adapter_weights(m, tmp_path / "a")
        fresh = load_adapter(load_model(tiny_dir("llama")), tmp_path / "a")
    with torch.no_grad():
        back, loaded = m(input_ids=IDS).logits, fresh(input_ids=IDS).logits
    check(torch.equal(back, want), PEFT, "set_peft_model_state_dict no longer restores the saved LoRA weights "
          "in place (a resumed run would continue from other weights)", where)
    check(torch.equal(loaded, want), PEFT, "PeftModel.from_pretrained(model, folder) no longer rebuilds the saved "
          "adapter", where)
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(m, {k.replace("lora_A", "lora_Z"): v for k, v in state.items()})
    check(getattr(result, "unexpected_keys", None), PEFT, "set_peft_model_state_dict no longer reports keys it could "
          "not place (alignkit's check_peft_load would be blind)", "alignkit/compat.py:check_peft_load")
    with pytest.raises(DependencyMoved, match=r"peft \d"):
        check_peft_load(result, "renamed keys")


def test_fingerprint_ignores_lora_and_modules_to_save(tiny_dir):
    """The reference cache identifies the base model under LoRA by skipping `lora_` / `modules_to_save` tensors and
    renaming `.base_layer` / `.original_module`: a LoRA model must fingerprint as its base."""
    where = "alignkit/trainers/reference.py:model_fingerprint"
    for classifier in (False, True):
        folder = tiny_dir("llama", classifier=classifier, num_labels=1) if classifier else tiny_dir("llama")
        task = "classifier" if classifier else "causal_lm"
        plain = model_fingerprint(load_model(folder, task=task))
        wrapped = lora(load_model(folder, task=task))
        perturb(wrapped, 0.1)
        check(model_fingerprint(wrapped) == plain, PEFT, f"peft's state-dict names moved: a LoRA "
              f"{'classifier' if classifier else 'causal LM'} no longer fingerprints as its base", where,
              str([n for n in unwrap_lm(wrapped).state_dict() if "lora" in n or "modules_to_save" in n or
                   "base_layer" in n or "original_module" in n][:4]))


@pytest.fixture(scope="module")
def two_adapters(tiny_dir, tmp_path_factory):
    """Folders of two different LoRA adapters ("a", "b") of the tiny llama."""
    root = tmp_path_factory.mktemp("two-loras")
    for name, seed in (("a", 1), ("b", 2)):
        m = lora(load_model(tiny_dir("llama")))
        perturb(m, 0.1, seed)
        save_adapter(m, root / name)
    return root


def two_adapter_model(tiny_dir, root):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(tiny_dir("llama")), str(root / "a"), adapter_name="a",
                                      is_trainable=False)
    model.load_adapter(str(root / "b"), adapter_name="b", is_trainable=False)
    return model.eval()


MIXED_IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])


def test_mixed_adapter_batch_routes_rows(tiny_dir, two_adapters):
    """Serving loads several LoRA adapters into one PeftModel (`from_pretrained(..., adapter_name=)`, then
    `load_adapter(folder, adapter_name=, is_trainable=False)`) and, for adapters the stacked path cannot take,
    routes rows with `adapter_names=[...]`, where "__base__" means no LoRA: each row must equal that adapter (or
    the base) alone."""
    where = "alignkit/serve/stack.py:build_stack/Stack.peft_names (PEFT_BASE)"
    ids = MIXED_IDS
    with torch.no_grad(), guard(PEFT, "loading two LoRA adapters into one PeftModel and running a mixed batch failed",
                                where):
        model = two_adapter_model(tiny_dir, two_adapters)
        mixed = model(input_ids=ids, adapter_names=["b", "__base__", "a"]).logits
        want = [load_adapter(load_model(tiny_dir("llama")), two_adapters / "b")(input_ids=ids[:1]).logits[0],
                load_model(tiny_dir("llama"))(input_ids=ids[1:2]).logits[0],
                load_adapter(load_model(tiny_dir("llama")), two_adapters / "a")(input_ids=ids[2:]).logits[0]]
    for i, w in enumerate(want):
        check(torch.allclose(mixed[i], w, atol=1e-5), PEFT, f"row {i} of a mixed-adapter batch (adapter_names=[...], "
              "'__base__' = no LoRA) is not what its adapter gives alone", where,
              f"max diff {(mixed[i] - w).abs().max().item():.3g}")


def test_stacked_lora_reads_peft_layers(tiny_dir, two_adapters):
    """serve's stacked per-row LoRA reads peft's layer internals (`peft.tuners.lora.layer.LoraLayer` / `Linear`,
    `base_layer`, `lora_A[name].weight`, `lora_B[name].weight` / `.bias`, `scaling[name]`, `use_dora`,
    `lora_variant`), switches peft's own path off with `base_model.disable_adapter_layers()` and adds
    `scaling * B(A(x))` itself: its rows must equal peft's mixed batch."""
    where = "alignkit/serve/lora.py:StackedLora.build/_hook"
    from alignkit.serve.lora import StackedLora

    ids = MIXED_IDS
    model = two_adapter_model(tiny_dir, two_adapters)
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=["b", "__base__", "a"]).logits
    with guard(PEFT, "peft.tuners.lora.layer (LoraLayer, Linear) or a LoRA layer attribute moved", where):
        stacked = StackedLora.build(model, ["a", "b"])
    check(stacked is not None, PEFT, "StackedLora.build no longer recognises vanilla LoRA on nn.Linear (serve falls "
          "back to peft's slower mixed batches)", where)
    try:
        with torch.no_grad(), stacked.route(["b", None, "a"], torch.device("cpu")):
            got = model(input_ids=ids).logits
    finally:
        stacked.remove()
    check(torch.allclose(got, want, atol=1e-5), PEFT, "the stacked per-row LoRA no longer equals peft's own mixed "
          "batch (peft's LoRA maths or disable_adapter_layers() changed)", where,
          f"max diff {(got - want).abs().max().item():.3g}")


def test_modules_to_save_that_match_nothing_are_refused(tiny_lm):
    """peft wraps the modules whose name ends with a modules_to_save entry and says nothing when none does:
    modules_to_save: [lm_headx] trained LoRA only (8192 parameters, not the 35776 with the head), exit 0. alignkit
    refuses the name with peft's own rule (endswith), pinned here: a matching name makes that module trainable."""
    where = "alignkit/adapters/lora.py:Lora.wrap (modules_to_save check)"
    with pytest.raises(ValueError, match=r"adapter.lora.modules_to_save: 'lm_headx' matches no module of the model"):
        lora(tiny_lm("llama"), modules_to_save=["lm_headx"])
    m = lora(tiny_lm("llama"), modules_to_save=["lm_head"])
    trained = {n for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n}
    check(bool(trained) and all("lm_head" in n for n in trained), PEFT,
          f"modules_to_save=['lm_head'] no longer makes lm_head trainable (trainable: {sorted(trained)})", where)


def test_a_target_module_of_a_list_that_matches_nothing_is_refused(tiny_lm):
    """peft refuses target_modules none of whose names match, but adapts the others when only one of a list is
    misspelt: [q_proj, vproj] trained q_proj alone (1024 parameters, as [q_proj]), exit 0. alignkit checks each name
    with peft's list rule (the name, or a suffix after a dot), pinned here on the names that do match."""
    where = "alignkit/adapters/lora.py:Lora.wrap (target_modules check)"
    with pytest.raises(ValueError, match=r"adapter.lora.target_modules: 'vproj' matches no module of the model.*"
                                         r"'v_proj'"):
        lora(tiny_lm("llama"), target_modules=["q_proj", "vproj"])
    m = lora(tiny_lm("llama"), target_modules=["q_proj", "self_attn.v_proj"])
    adapted = {n.rsplit(".", 1)[0] for n, _ in m.named_modules() if n.endswith(".lora_A")}
    check(bool(adapted) and all(n.endswith((".q_proj", ".v_proj")) for n in adapted)
          and any(n.endswith(".v_proj") for n in adapted), PEFT,
          f"target_modules ['q_proj', 'self_attn.v_proj'] adapted {sorted(adapted)}", where)


def test_a_lora_on_the_lm_head_is_refused_when_it_is_made(tiny_lm):
    """peft puts a LoRA layer (with `base_layer`) on lm_head when target_modules names it, as a list entry or by a
    regex; alignkit's objectives apply the head's plain weight (trainers/logps.py:_head), so such a run wrote its run
    folder and stopped at the first step ("unexpected error: ValueError: the LM head is wrapped by a LoRA layer").
    Lora.wrap now refuses it, naming the key; modules_to_save=[lm_head] (the head trained whole) still works."""
    from alignkit.trainers import completion_logps

    where = "alignkit/adapters/lora.py:Lora.wrap (LM head check), trainers/logps.py:_head"
    for targets in (["q_proj", "lm_head"], ".*(q_proj|lm_head)"):
        with pytest.raises(ValueError, match=r"^adapter.lora.target_modules: .* puts LoRA on the LM head"):
            lora(tiny_lm("llama"), target_modules=targets)
    from peft import LoraConfig, get_peft_model
    raw = get_peft_model(tiny_lm("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    check(hasattr(raw.get_output_embeddings(), "base_layer"), PEFT, "target_modules=[..., 'lm_head'] no longer "
          "wraps the head in a LoRA layer with base_layer (the check would let a wrapped head through)", where)
    m = lora(tiny_lm("llama"), modules_to_save=["lm_head"])
    batch = {"input_ids": IDS[:, :4], "completion_mask": torch.tensor([[0, 0, 1, 1]])}
    logps, n = completion_logps(m, batch)
    check(bool(torch.isfinite(logps).all()) and n.tolist() == [2], PEFT, "a LoRA with modules_to_save=['lm_head'] "
          "no longer scores completions", where, f"{logps} {n}")


def test_a_saved_lora_says_which_head_it_was_trained_with(tiny_lm, tiny_classifier, tmp_path):
    """`Lora.trained_task` reads peft's `task_type` in the saved adapter_config.json (SEQ_CLS for a classifier,
    CAUSAL_LM for a causal LM, as Lora.wrap sets it): eval refuses an SFT LoRA as a reward model by it."""
    from alignkit.adapters import adapter_in

    where = "alignkit/adapters/lora.py:Lora.trained_task"
    for model, want in ((tiny_lm("llama"), "causal_lm"), (tiny_classifier("llama", num_labels=1), "classifier")):
        folder = tmp_path / want
        save_adapter(lora(model), folder)
        got = adapter_in(folder).trained_task(folder)
        check(got is not None and got[0] == want, PEFT, f"a LoRA saved on a {want} no longer records peft's task_type "
              f"as alignkit reads it (got {got})", where)


def test_modules_to_save_keeps_the_base_module_as_original_module(tiny_lm):
    """alignkit's base fingerprint of a LoRA that trains the input embedding (made by hand or by apply_adapter) reads
    the wrapper's `original_module`: the frozen module peft copied, which training leaves as the base had it."""
    from peft import LoraConfig, get_peft_model

    where = "alignkit/adapters/base.py:base_embedding"
    base = tiny_lm("llama")
    before = base.get_input_embeddings().weight.detach().clone()
    m = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    perturb(m, 0.5)
    emb = unwrap_lm(m).get_input_embeddings()
    original = getattr(emb, "original_module", None)
    check(isinstance(original, torch.nn.Module) and torch.equal(original.weight, before), PEFT, "a modules_to_save "
          "wrapper no longer keeps the untrained module as original_module (the base fingerprint would probe the "
          "trained copy)", where)
    check(not torch.equal(emb.weight, before) and not original.weight.requires_grad, PEFT, "a modules_to_save "
          "wrapper's .weight is no longer the trained copy, or its original_module is trained", where)


@pytest.mark.parametrize("target_modules,modules_to_save", [
    (["q_proj", "lm_head"], None), (r".*\.(q|v)_proj", None), (r".*lm_head", None),
    (["q_proj", "lm_head"], ["lm_head"]), (["self_attn.k_proj", "down_proj"], None), (r"model\.layers\.1\..*_proj", None),
])
def test_lora_targets_are_foreseen_with_peft_s_matcher(tiny_lm, target_modules, modules_to_save):
    """Lora.wrap decides its refusals (the LM head, a block of layers) before get_peft_model changes the model, from
    the modules `lora_targets` says peft will adapt (peft's `check_target_module_exists` over the module names): it
    must name exactly the modules that get_peft_model gives a LoRA layer (list: name or '.'-suffix; string: full
    regex match; modules_to_save excluded). 'all-linear' (foreseen as None: no head, no block) is row P2."""
    from peft import LoraConfig, get_peft_model

    from alignkit.adapters.lora import lora_targets

    where = "alignkit/adapters/lora.py:lora_targets (check_lora_targets, Lora.wrap)"
    cfg = LoraConfig(r=2, target_modules=target_modules, modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    base = tiny_lm("llama")
    with guard(PEFT, "peft.tuners.tuners_utils.check_target_module_exists is gone or takes other arguments", where):
        foreseen = lora_targets(base, cfg)
    get_peft_model(base, cfg)
    adapted = sorted(n for n, m in base.named_modules() if hasattr(m, "lora_A"))
    check(sorted(foreseen) == adapted, PEFT, f"target_modules={target_modules!r}: peft adapted {adapted}, its matcher "
          f"foresaw {sorted(foreseen)}", where)


def test_a_list_entry_matches_the_module_names_peft_matches_it_with(tiny_lm):
    """`matches_entry` (Lora.wrap's check that each entry of a target_modules list matches a module, and the entry
    named in a refusal) is peft's rule for a list entry: the whole module name or its end after a dot, not a bare
    suffix ('proj' is no match for 'q_proj') and not a middle part."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from alignkit.adapters.lora import matches_entry

    where = "alignkit/adapters/lora.py:matches_entry (Lora.wrap, _entry)"
    names = [n for n, _ in tiny_lm("llama").named_modules() if n]
    entries = ["q_proj", "proj", "self_attn.k_proj", "layers.1.mlp.down_proj", "mlp", "lm_head", "model", "layers.0",
               "attn.q_proj"]
    for entry in entries:
        with guard(PEFT, "peft.tuners.tuners_utils.check_target_module_exists is gone or takes other arguments", where):
            peft_says = [n for n in names if check_target_module_exists(LoraConfig(target_modules=[entry]), n)]
        ours = [n for n in names if matches_entry(n, entry)]
        check(ours == peft_says, PEFT, f"a target_modules entry {entry!r}: peft matches {peft_says}, matches_entry "
              f"{ours}", where)
    assert [n for n in names if matches_entry(n, "q_proj")] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_modules_to_save_copies_are_switched_off_with_the_lora_layers(tiny_dir, tmp_path):
    """A LoRA trained with `modules_to_save: [lm_head]` holds the head in peft's `ModulesToSaveWrapper`
    (`modules_to_save[name]` the trained copy, `original_module` the base's); `base_model.disable_adapter_layers()`,
    which serve's stacked LoRA calls, switches it off too (the wrapper then gives the base's module), so the stacked
    LoRA hooks the wrapper and gives each row its adapter's copy: its rows must equal the adapter alone."""
    where = "alignkit/serve/lora.py:StackedLora.build/_saved_hook"
    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper

    from alignkit.serve.lora import StackedLora

    m = lora(load_model(tiny_dir("llama")), modules_to_save=["lm_head"])
    perturb(m, 0.3, 5)
    save_adapter(m, tmp_path / "head")
    model = PeftModel.from_pretrained(load_model(tiny_dir("llama")), str(tmp_path / "head"), adapter_name="head",
                                      is_trainable=False).eval()
    with torch.no_grad():
        alone = load_adapter(load_model(tiny_dir("llama")), tmp_path / "head").eval()(input_ids=MIXED_IDS).logits
        base = load_model(tiny_dir("llama")).eval()(input_ids=MIXED_IDS).logits
    wrappers = [w for w in model.modules() if isinstance(w, ModulesToSaveWrapper)]
    check(len(wrappers) == 1 and "head" in wrappers[0].modules_to_save and hasattr(wrappers[0], "original_module"),
          PEFT, "modules_to_save is no longer a ModulesToSaveWrapper holding modules_to_save[name] and "
          "original_module", where)
    with guard(PEFT, "StackedLora.build over a LoRA with modules_to_save failed", where):
        stacked = StackedLora.build(model, ["head"])
    try:
        x = torch.randn(2, 1, wrappers[0].original_module.in_features)
        with torch.no_grad():
            off = wrappers[0](x)
            check(torch.equal(off, wrappers[0].original_module(x)), PEFT, "disable_adapter_layers() no longer "
                  "switches modules_to_save off with the LoRA layers (the stacked LoRA's hook would apply it twice)",
                  where)
            with stacked.route(["head", None, "head"], torch.device("cpu")):
                got = model(input_ids=MIXED_IDS).logits
    finally:
        stacked.remove()
    check(torch.allclose(got[0::2], alone[0::2], atol=1e-5) and torch.allclose(got[1], base[1], atol=1e-5), PEFT,
          "rows of a LoRA with modules_to_save served by the stacked LoRA differ from the adapter alone (or the base "
          "row from the base)", where, f"max diff {(got[0::2] - alone[0::2]).abs().max().item():.3g}")


def test_saved_lora_keys_are_those_of_the_loaded_adapter_and_extra_ones_are_dropped_silently(tiny_dir, tmp_path):
    """Row P14: `load_peft_weights(folder)` gives the keys `get_peft_model_state_dict(model, adapter_name=name)`
    gives once the folder is loaded under `name` (`check_lora_placed` compares them after every LoRA load), and
    `PeftModel.from_pretrained` still drops, without an error, the saved tensors of modules the base lacks (a LoRA of
    a 3-layer model on a 2-layer one): the reason they are compared."""
    where = "alignkit/adapters/lora.py:check_lora_placed"
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    deep = lora(load_model(tiny_dir("llama", num_layers=3)))
    save_adapter(deep, tmp_path / "deep")
    with guard(PEFT, "loading the 3-layer LoRA on its own base failed", where):
        same = PeftModel.from_pretrained(load_model(tiny_dir("llama", num_layers=3)), str(tmp_path / "deep"),
                                         adapter_name="a", is_trainable=False)
    saved = set(load_peft_weights(str(tmp_path / "deep"), device="cpu"))
    check(saved and saved == set(get_peft_model_state_dict(same, adapter_name="a")), PEFT,
          "the keys load_peft_weights reads differ from get_peft_model_state_dict's for the adapter loaded from them",
          where, f"{sorted(saved ^ set(get_peft_model_state_dict(same, adapter_name='a')))[:3]}")
    with guard(PEFT, "PeftModel.from_pretrained now raises on saved tensors the base has no module for", where):
        shallow = PeftModel.from_pretrained(load_model(tiny_dir("llama", num_layers=2)), str(tmp_path / "deep"),
                                            adapter_name="a", is_trainable=False)
    extra = saved - set(get_peft_model_state_dict(shallow, adapter_name="a"))
    check(extra and all(".layers.2." in k for k in extra), PEFT, "the third layer's saved tensors are no longer "
          "the ones left out of the 2-layer model's adapter state", where, f"{sorted(extra)[:3]}")
    # check_lora_placed asks with save_embedding_layers given (False: the LoRA tensors; True minus False: the base's
    # embedding weights, which a folder saved with save_embedding_layers=True holds and peft loads), never "auto"
    with guard(PEFT, "get_peft_model_state_dict(save_embedding_layers=False / True) failed", where):
        lora_only = set(get_peft_model_state_dict(same, adapter_name="a", save_embedding_layers=False))
        deep.save_pretrained(str(tmp_path / "emb"), save_embedding_layers=True)
        emb = PeftModel.from_pretrained(load_model(tiny_dir("llama", num_layers=3)), str(tmp_path / "emb"),
                                        adapter_name="a", is_trainable=False)
        placed = set(get_peft_model_state_dict(emb, adapter_name="a", save_embedding_layers=False))
        embeddings = set(get_peft_model_state_dict(emb, adapter_name="a", save_embedding_layers=True)) - placed
    check(lora_only == saved, PEFT, "get_peft_model_state_dict(save_embedding_layers=False) no longer gives the "
          "keys of a plain save", where, f"{sorted(lora_only ^ saved)[:3]}")
    with_emb = set(load_peft_weights(str(tmp_path / "emb"), device="cpu"))
    check(embeddings and all("embed_tokens" in k or "lm_head" in k for k in embeddings)
          and with_emb == placed | embeddings, PEFT, "a folder saved with save_embedding_layers=True no longer holds "
          "the LoRA tensors plus exactly the embedding weights get_peft_model_state_dict(True) adds to (False)",
          where, f"saved - LoRA: {sorted(with_emb - placed)}, True - False: {sorted(embeddings)}")


def test_saved_lora_keys_name_the_base_module_and_rank_as_check_lora_fits_reads_them(tiny_dir, tmp_path):
    """Row P15: every LoRA tensor peft saves is keyed `base_model.model.<the base's module name>.lora_A|lora_B.weight`
    (`LORA_KEY`), its rank on axis 0 of lora_A and axis 1 of lora_B (`RANK_AXIS`), and the rank of a module is
    `rank_pattern`'s entry peft's `get_pattern_key` picks, else `r`: what `check_lora_fits` compares with the base's
    module names and adapter_config.json before peft loads a folder."""
    where = "alignkit/adapters/lora.py:check_lora_fits"
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from alignkit.adapters.lora import LORA_KEY, RANK_AXIS

    base = load_model(tiny_dir("llama"))
    names = {n for n, _ in base.named_modules()}
    cfg = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 3})
    model = get_peft_model(base, cfg)
    model.save_pretrained(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    pattern = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
    check(len(saved) == 8, PEFT, "a LoRA on q_proj and down_proj of 2 layers no longer saves 8 tensors", where,
          f"{sorted(saved)}")
    for key, t in saved.items():
        m = LORA_KEY.match(key)
        check(m is not None and m["module"] in names, PEFT, "a saved LoRA key no longer reads as base_model.model. "
              "+ the base's module name + .lora_A/.lora_B.weight", where, key)
        from peft.utils.other import get_pattern_key
        want = 3 if m["module"].endswith("down_proj") else 2
        got_r = pattern.get(get_pattern_key(list(pattern), m["module"]), 2)
        check(t.shape[RANK_AXIS[m["part"]]] == want == got_r, PEFT, "a saved LoRA tensor's rank is no longer on "
              "the axis RANK_AXIS says, or rank_pattern is no longer matched as get_pattern_key does", where,
              f"{key} {tuple(t.shape)} rank_pattern gives {got_r}")


def test_saved_lora_tensors_carry_the_base_layers_widths_as_check_lora_fits_reads_them(tiny_dir, tmp_path):
    """Row P16: peft gives a layer LoRA A of shape (r, in) and B (out, r) (nn.Linear, GPT-2's Conv1D: fan_in_fan_out
    read from its weight (in, out); nn.Embedding: lora_embedding_A (r, num_embeddings), lora_embedding_B
    (embedding_dim, r)), in and out as `_get_in_out_features` reads the base layer: what `layer_widths` and
    `WIDTH_AXIS` compare a saved tensor with before peft loads a folder of another width."""
    where = "alignkit/adapters/lora.py:check_lora_fits (layer_widths, WIDTH_AXIS)"
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import _get_in_out_features
    from safetensors.torch import load_file

    from alignkit.adapters.lora import LORA_KEY, WIDTH_AXIS, layer_widths

    for arch, targets in (("llama", ["q_proj", "down_proj", "embed_tokens"]), ("gpt2", ["c_attn", "c_proj"])):
        base = load_model(tiny_dir(arch))
        modules = dict(base.named_modules())
        widths = {n: layer_widths(m) for n, m in modules.items()}
        folder = tmp_path / arch
        get_peft_model(base, LoraConfig(r=2, target_modules=targets)).save_pretrained(folder)
        saved = load_file(str(folder / "adapter_model.safetensors"))
        parts = set()
        for key, t in saved.items():
            m = LORA_KEY.match(key)
            if m is None:
                continue
            axis, side = WIDTH_AXIS[m["part"]]
            parts.add(m["part"])
            want = widths[m["module"]][0 if side == "in" else 1]
            peft_in_out = _get_in_out_features(modules[m["module"]])  # the base layer, taken before get_peft_model
            check(tuple(t.shape)[axis] == want and tuple(peft_in_out) == widths[m["module"]], PEFT,
                  "a saved LoRA tensor's width is no longer on the axis WIDTH_AXIS says, or peft reads a layer's "
                  "in/out features otherwise than layer_widths", where, f"{arch} {key} {tuple(t.shape)} "
                  f"layer_widths {widths[m['module']]} peft {peft_in_out}")
        check(parts >= ({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"} if arch == "llama" else
                        {"lora_A", "lora_B"}), PEFT, "peft no longer saves the LoRA parts WIDTH_AXIS names", where,
              f"{arch} {sorted(parts)}")


def test_a_saved_module_of_another_shape_fails_peft_load_with_torchs_size_mismatch_line(tiny_dir, tmp_path):
    """Row P17: a LoRA folder whose modules_to_save tensor (lm_head) has 8 more rows than the base's (a base with a
    resized vocabulary) passes check_lora_fits (it compares the LoRA's own tensors) and fails peft's from_pretrained
    with torch's load_state_dict RuntimeError holding a "size mismatch for <name>: copying a param with shape ... from
    checkpoint, the shape in current model is ..." line: what serve's load_loras turns into one line."""
    where = "alignkit/serve/stack.py:load_loras (size_mismatch)"
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    from alignkit.serve.stack import size_mismatch

    base = tiny_dir("llama")
    get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])) \
        .save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = {k: (torch.cat([v, v[:8]]) if "lora_" not in k else v) for k, v in load_file(str(weights)).items()}
    vocab, width = saved["base_model.model.lm_head.weight"].shape
    save_file(saved, str(weights), metadata={"format": "pt"})
    with guard(PEFT, "peft's load of a folder whose modules_to_save tensor has another shape no longer raises "
                     "RuntimeError", where):
        try:
            PeftModel.from_pretrained(load_model(base), str(tmp_path / "a"), adapter_name="x")
            error = None
        except RuntimeError as e:
            error = e
    want = (f"size mismatch for base_model.model.lm_head.modules_to_save.x.weight: copying a param with shape "
            f"torch.Size([{vocab}, {width}]) from checkpoint, the shape in current model is "
            f"torch.Size([{vocab - 8}, {width}])")
    check(error is not None and size_mismatch(error) == want, PEFT, "peft's load of a modules_to_save tensor of "
          "another shape no longer fails with torch's 'size mismatch for <name>' line", where, repr(error))


def test_a_lora_on_expert_parameters_nests_one_wrapper_per_parameter_as_check_lora_fits_reads_it(tmp_path):
    """Row P18: peft's `target_parameters` wraps each targeted parameter of a module in a `ParamWrapper`, nesting
    them in the module's parameter order (the last outermost, under the module's own name; each earlier one a
    `.base_layer` further in), and saves them under those names; a 3-D expert weight (experts, out, in), or
    (experts, in, out) on a module marked `is_transposed` (GPT-OSS), gets LoRA A (r x experts, in) and B (out,
    r x experts): what `param_target` / `param_widths` read before peft loads a folder."""
    where = "alignkit/adapters/lora.py:check_lora_fits (param_target, param_widths, NESTED)"
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from alignkit.adapters.lora import LORA_KEY, RANK_AXIS, WIDTH_AXIS, param_target, param_widths

    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8)
    bases = {"qwen3_moe": Qwen3MoeForCausalLM(Qwen3MoeConfig(**small, intermediate_size=16, moe_intermediate_size=8,
                                                             num_experts=4, num_experts_per_tok=2)),
             "gpt_oss": GptOssForCausalLM(GptOssConfig(**small, intermediate_size=8, num_local_experts=3,
                                                       num_experts_per_tok=2, layer_types=["full_attention"]))}
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    for arch, base in bases.items():
        modules = dict(base.named_modules())  # before peft wraps anything
        model = get_peft_model(base, LoraConfig(r=2, target_modules=[], target_parameters=targets))
        wrappers = {n.removeprefix("base_model.model."): w for n, w in model.named_modules()
                    if type(w).__name__ == "ParamWrapper"}
        check(sorted(wrappers) == ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"], PEFT,
              "peft no longer nests one ParamWrapper per targeted parameter under the module's name", where,
              f"{arch} {sorted(wrappers)}")
        for name, w in wrappers.items():
            target = param_target(modules, name, targets)
            widths = None if target is None else param_widths(target[1], target[2])
            check(target is not None and target[0].endswith("." + w.parameter_name)
                  and widths == (w.in_features, w.out_features, w.num_experts), PEFT,
                  "a ParamWrapper no longer adapts the parameter, or reads the in / out / experts, that "
                  "param_target and param_widths say", where, f"{arch} {name} {w.parameter_name} "
                  f"{(w.in_features, w.out_features, w.num_experts)} ours {target and target[0]} {widths}")
        model.save_pretrained(tmp_path / arch)
        saved = load_file(str(tmp_path / arch / "adapter_model.safetensors"))
        check(len(saved) == 4, PEFT, "a LoRA on 2 expert parameters no longer saves 4 tensors", where, f"{sorted(saved)}")
        for key, t in saved.items():
            m = LORA_KEY.match(key)
            target = m and param_target(modules, m["module"], targets)
            widths = target and param_widths(target[1], target[2])
            axis, side = WIDTH_AXIS[m["part"]] if m else (0, "in")
            check(bool(widths) and t.shape[RANK_AXIS[m["part"]]] == 2 * widths[2]
                  and t.shape[axis] == widths[0 if side == "in" else 1], PEFT,
                  "a saved expert LoRA tensor's key, rank (r x experts) or width is no longer where check_lora_fits "
                  "reads it", where, f"{arch} {key} {tuple(t.shape)} {target and target[0]} {widths}")


def test_trainable_tokens_are_an_auxiliary_wrapper_other_than_modules_to_save(tiny_dir):
    """peft wraps a LoRA's `trainable_token_indices` embedding in `TrainableTokensWrapper`, a subclass of
    `peft.utils.other.AuxiliaryTrainingWrapper` that is not a `ModulesToSaveWrapper` (itself an
    AuxiliaryTrainingWrapper), and the wrapper is what gives the trained rows: serve's stacked LoRA, which applies
    only LoRA layers and modules_to_save copies, finds such an adapter by those classes and leaves it to peft's
    mixed batches."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    where = "alignkit/serve/lora.py:StackedLora.build"
    check(issubclass(ModulesToSaveWrapper, AuxiliaryTrainingWrapper), PEFT, "ModulesToSaveWrapper is no longer an "
          "AuxiliaryTrainingWrapper", where)
    torch.manual_seed(0)
    with guard(PEFT, "get_peft_model with trainable_token_indices failed", where):
        model = get_peft_model(load_model(tiny_dir("llama")), LoraConfig(r=2, target_modules=["q_proj"],
                                                                          trainable_token_indices=[5, 6]))
    other = [m for m in model.modules()
             if isinstance(m, AuxiliaryTrainingWrapper) and not isinstance(m, ModulesToSaveWrapper)]
    check(len(other) == 1, PEFT, "trainable tokens are no longer one AuxiliaryTrainingWrapper other than "
          "ModulesToSaveWrapper (serve's stacked LoRA would serve such an adapter without them)", where,
          f"{[type(m).__name__ for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]}")
    wrapper, ids = other[0], torch.tensor([[5, 7]])
    with torch.no_grad():
        for name, p in wrapper.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(1.0)
        rows, base = wrapper(ids), wrapper.original_module(ids)
    check(not torch.equal(rows[0, 0], base[0, 0]) and torch.equal(rows[0, 1], base[0, 1]), PEFT,
          "the trainable-tokens wrapper no longer gives its trained rows (or changes others)", where,
          f"{[n for n, _ in wrapper.named_parameters()]}")
