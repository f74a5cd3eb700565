"""The ReFT frozen-prefix cache (`alignkit.interventions.prefix_cache`, `train.reft_prefix_cache`).

Reference throughout: the same model run without the cache (the frozen layers computed every time). Checked: the
completion log-probs and the interventions' gradients of every layout the cache handles (right-padded rows, one
packed varlen row, rows without padding, the same examples in another order or layout) are bitwise those of the
uncached forward and the cache was really used (the skipped layers' forward is not called); a 3-epoch training run
ends with the same weights and losses as without it; the first use is checked against the real layers and a
corrupted entry raises; an in-place change of a frozen weight empties the cache; layouts it does not handle run
without it; models where the prefix is not fixed are refused (True) or left uncached (auto); the CLI key is
validated before anything is written."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
from transformers import TrainingArguments

from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter
from alignkit.data import SFTCollator
from alignkit.interventions.locate import find_decoder_layers, hf_model
from alignkit.interventions.prefix_cache import PrefixCacheMismatch, unusable_reason
from alignkit.models.loading import load_model
from alignkit.settings import ConfigError
from alignkit.trainers import SFTTrainer
from alignkit.trainers.data_prep import packed_collator
from alignkit.trainers.logps import completion_token_logps

LAYERS = 4


@pytest.fixture(scope="module")
def base_dir(tiny_dir):
    return tiny_dir("llama", num_layers=LAYERS)


def reft_model(base_dir, layer=2, kind="reft", positions="f1+l1", seed=0, attention_dropout=None,
               component="block_output"):
    base = load_model(base_dir)
    if attention_dropout is not None:
        for m in base.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = attention_dropout
    torch.manual_seed(seed)
    reps = [{"layer": layer, "component": component, "intervention": "loreft", "low_rank_dimension": 2}]
    cfg = AdapterConfig(kind=kind, reft=ReftSettings(config={"representations": reps}, positions=positions),
                        **({"lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"}} if kind == "reft+lora" else {}))
    model = apply_adapter(base, cfg)
    with torch.no_grad():  # non-zero edits, so a wrong hidden state would move the loss
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def features(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(5, 200, (p + c,), generator=g).tolist()
        out.append({"input_ids": ids, "completion_mask": [0] * p + [1] * c, "prompt_length": p})
    return out


def reft_of(model):
    while not hasattr(model, "enable_prefix_cache"):
        model = model.model
    return model


def step(model, batch):
    model.zero_grad()
    lp, mask = completion_token_logps(model, batch)
    (-(lp * mask).sum()).backward()
    return lp.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


class Calls:
    """Counts the forward calls of decoder layers 0 .. `layer` - 1 (the ones the cache skips)."""

    def __init__(self, model, layer):
        _, layers = find_decoder_layers(hf_model(reft_of(model).model))
        self.n = 0
        for i in range(layer):
            layers[i].self_attn.register_forward_pre_hook(self.count)

    def count(self, *a):
        self.n += 1


# (layer, component) -> b, the layers that run before the intervention: a block output leaves its whole layer frozen
WHERE = [(2, "block_output", 3), (2, "block_input", 2), (2, "mlp_output", 2), (1, "attention_input", 1),
         (LAYERS - 1, "block_output", LAYERS), (0, "block_output", 1)]


@pytest.mark.parametrize("layer,component,frozen", WHERE, ids=[f"{c}@{l}" for l, c, _ in WHERE])
def test_every_layout_gives_the_uncached_values_and_skips_the_frozen_layers(base_dir, layer, component, frozen):
    model = reft_model(base_dir, layer=layer, component=component)
    feats = features()
    padded = SFTCollator(0)(feats)
    packed = packed_collator(SFTCollator(0), model, paired=False, checkpointing=False)(feats)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    same_len = [dict(f, input_ids=f["input_ids"][:5], completion_mask=[0, 0, 0, 1, 1], prompt_length=3) for f in feats]
    flat = SFTCollator(0)(same_len)
    batches = {"padded": padded, "packed": packed, "flat": flat, "padded reversed": SFTCollator(0)(feats[::-1]),
               "packed reversed": packed_collator(SFTCollator(0), model, False, checkpointing=False)(feats[::-1])}
    want = {name: step(model, b) for name, b in batches.items()}
    calls = Calls(model, frozen)
    cache = reft_of(model).enable_prefix_cache()
    assert cache.frozen == frozen
    step(model, padded), step(model, flat)  # fill
    assert cache.fills == 2 * len(feats) and not cache.verified
    step(model, packed)  # first use: runs the real layers and compares
    assert cache.verified and cache.hits == 0
    before = calls.n
    for name, b in batches.items():
        lp, grads = step(model, b)
        assert torch.equal(lp, want[name][0]), name
        for g, w in zip(grads, want[name][1]):
            assert torch.equal(g, w), name
    assert cache.hits == len(batches)
    assert calls.n == before, "the layers below the intervention ran although every example was cached"
    reft_of(model).disable_prefix_cache()
    step(model, padded)
    assert calls.n == before + frozen  # every frozen layer runs again


def test_a_batch_with_an_unseen_example_runs_the_layers_and_fills(base_dir):
    model = reft_model(base_dir)
    feats = features(8)
    cache = reft_of(model).enable_prefix_cache()
    step(model, SFTCollator(0)(feats[:4]))
    want = step(model, SFTCollator(0)(feats[2:6]))  # two cached, two new: computed, the new ones stored
    assert cache.fills == 6 and cache.hits == 0
    reft_of(model).disable_prefix_cache()
    assert torch.equal(step(model, SFTCollator(0)(feats[2:6]))[0], want[0])


def test_a_corrupted_entry_is_caught_at_first_use(base_dir):
    model = reft_model(base_dir)
    batch = SFTCollator(0)(features())
    cache = reft_of(model).enable_prefix_cache()
    step(model, batch)
    key = next(iter(cache.store))
    cache.store[key] = cache.store[key] + 1e-3 * cache.store[key].abs().max()
    with pytest.raises(PrefixCacheMismatch, match=r"differs from what the frozen layers compute .*reft_prefix_cache: false"):
        step(model, batch)


def test_an_in_place_change_of_a_frozen_weight_empties_the_cache(base_dir, caplog):
    model = reft_model(base_dir)
    feats = features()
    batch = SFTCollator(0)(feats)
    cache = reft_of(model).enable_prefix_cache()
    step(model, batch), step(model, batch), step(model, batch)
    assert cache.hits == 1
    _, layers = find_decoder_layers(hf_model(reft_of(model).model))
    with torch.no_grad():
        layers[0].mlp.down_proj.weight.mul_(1.5)
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        got = step(model, batch)
    assert "changed in place" in caplog.text and cache.hits == 1 and not cache.verified
    reft_of(model).disable_prefix_cache()
    assert torch.equal(got[0], step(model, batch)[0])


def assign_scaled(base, layers):
    layers[0].load_state_dict({k: v * 1.5 for k, v in layers[0].state_dict().items()}, assign=True)


def swap_mlp(base, layers):
    layers[0].mlp = copy.deepcopy(layers[0].mlp)
    with torch.no_grad():
        layers[0].mlp.down_proj.weight.mul_(1.5)


def swap_embedding(base, layers):
    emb = copy.deepcopy(base.get_input_embeddings())
    with torch.no_grad():
        emb.weight.mul_(1.5)
    base.set_input_embeddings(emb)


REPLACE = {"load_state_dict(assign=True)": assign_scaled, "layer 0's mlp swapped": swap_mlp,
           "embedding swapped": swap_embedding}


@pytest.mark.parametrize("how", REPLACE)
def test_a_frozen_weight_replaced_by_another_object_empties_the_cache(base_dir, caplog, how):
    """load_state_dict(assign=True) or a module swapped in puts new Parameter objects in the frozen prefix: their
    version counters are not the watched ones, so the cache kept serving the old weights' states (logits off by
    ~0.5, no word). Now the identity of the frozen parameters, modules and layers is watched too."""
    model = reft_model(base_dir)
    batch = SFTCollator(0)(features())
    cache = reft_of(model).enable_prefix_cache()
    step(model, batch), step(model, batch), step(model, batch)
    assert cache.hits == 1
    base = hf_model(reft_of(model).model)
    _, layers = find_decoder_layers(base)
    REPLACE[how](base, layers)
    for m in [base.get_input_embeddings(), *layers[:3]]:
        m.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        got = step(model, batch)
    assert "had a parameter replaced by another object" in caplog.text and cache.hits == 1 and not cache.verified
    step(model, batch), step(model, batch)  # the new objects are watched: filled, checked, then used again
    assert cache.hits == 2 and cache.verified
    reft_of(model).disable_prefix_cache()
    assert torch.equal(got[0], step(model, batch)[0])


def test_a_cached_forward_does_not_walk_the_prefix_modules(base_dir, monkeypatch):
    """Each forward rebuilt the prefix's parameter list through Module.parameters() (every submodule of the
    embedding and the cached layers: 3.8 ms a forward at 32 layers, on the forwards the cache makes short). Now the
    objects recorded at enable time are checked by plain lookups: no parameters() / modules() call on the prefix."""
    model = reft_model(base_dir)
    batch = SFTCollator(0)(features())
    cache = reft_of(model).enable_prefix_cache()
    base = hf_model(reft_of(model).model)
    _, layers = find_decoder_layers(base)
    prefix = {id(m) for root in [base.get_input_embeddings(), *layers[:3]] for m in root.modules()}
    step(model, batch), step(model, batch)  # filled, checked: the next forward is a cached one
    walks = []
    for name in ("parameters", "named_parameters", "modules", "named_modules"):
        real = getattr(torch.nn.Module, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if id(self) in prefix and sys._getframe(1).f_code.co_filename.endswith("prefix_cache.py"):
                walks.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.nn.Module, name, counted)
    completion_token_logps(model, batch)  # walks called by the cache (the step's own calls walk the whole model)
    assert cache.hits == 1 and walks == []


def test_left_padding_runs_without_the_cache(base_dir):
    model = reft_model(base_dir)
    feats = features()
    batch = SFTCollator(0)(feats)
    T = batch["input_ids"].shape[1]
    n = batch["attention_mask"].sum(1)
    left = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    for b in range(len(feats)):  # the same rows, padded on the left
        for key in ("input_ids", "attention_mask", "completion_mask", "labels"):
            left[key][b] = torch.roll(batch[key][b], int(T - n[b]))
    cache = reft_of(model).enable_prefix_cache()
    step(model, left), step(model, left)
    assert cache.fills == 0 and cache.hits == 0


@pytest.mark.parametrize("what,build,reason", [
    ("layer 0's input", dict(layer=0, component="block_input"), "layer 0"),
    ("layer 0's MLP", dict(layer=0, component="mlp_output"), "layer 0"),
    ("LoRA below", dict(kind="reft+lora"), "is trained"),
    ("attention dropout", dict(attention_dropout=0.1), "attention dropout"),
])
def test_unusable_models_are_named(base_dir, what, build, reason):
    model = reft_model(base_dir, **build)
    assert reason in unusable_reason(reft_of(model)), what
    args = TrainingArguments(output_dir="/nonexistent/never-written", max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match=f"reft_prefix_cache: true, but .*{reason}.*reft_prefix_cache: false"):
        SFTTrainer(model, args, train_dataset=features(), data_collator=SFTCollator(0), reft_prefix_cache=True)


def test_true_without_reft_is_refused(tiny_dir):
    model = load_model(tiny_dir("llama"))
    args = TrainingArguments(output_dir="/nonexistent/never-written", max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="needs a ReFT adapter"):
        SFTTrainer(model, args, train_dataset=features(), data_collator=SFTCollator(0), reft_prefix_cache=True)


def _train(base_dir, tmp_path, setting, **kw):
    model = reft_model(base_dir)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                             use_cpu=True, **kw)
    calls = Calls(model, 3)  # the intervention is on layer 2's output: layers 0-2 run before it
    trainer = SFTTrainer(model, args, train_dataset=features(8), data_collator=SFTCollator(0),
                         reft_prefix_cache=setting)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, calls.n


@pytest.mark.slow
def test_three_epochs_train_the_same_weights_with_and_without_the_cache(base_dir, tmp_path):
    """8 examples, batches of 4, 3 epochs (6 steps): auto turns the cache on (the run passes over its data 3
    times); epochs 2-3 skip layers 0-2 (3 layers x 2 batches of the first epoch, + the first-use check)."""
    off = _train(base_dir, tmp_path / "off", False, num_train_epochs=3)
    auto = _train(base_dir, tmp_path / "auto", None, num_train_epochs=3)
    assert len(off[0]) == 6 and auto[0] == off[0]
    for n in off[1]:
        assert torch.equal(auto[1][n], off[1][n]), n
    assert off[2] == 6 * 3 and auto[2] == 3 * 3  # 2 fills + the check, then 3 steps without those layers
    once = _train(base_dir, tmp_path / "once", None, max_steps=2)  # one pass over the data: auto leaves it off
    assert once[2] == 2 * 3


def test_cli_key_is_checked_before_anything_is_written(tmp_path, tiny_dir):
    from alignkit.settings.load import config_from_dict
    cfg = {"model": {"path": str(tiny_dir("llama"))}, "data": {"path": "x.jsonl"},
           "train": {"reft_prefix_cache": "sometimes"}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="reft_prefix_cache"):
        config_from_dict(cfg, "sft")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_true_where_the_model_cannot_use_it_before_writing(tmp_path, capsys):
    """sft-reft-tiny.yaml with its layer-0 intervention on the layer's input: nothing below it to cache; one line,
    exit 2, no run folder."""
    from pathlib import Path

    from alignkit.cli import main
    text = (Path(__file__).resolve().parents[2] / "configs" / "sft-reft-tiny.yaml").read_text()
    assert "{layer: 0, low_rank_dimension: 2," in text
    config = tmp_path / "sft-reft-input.yaml"
    config.write_text(text.replace("{layer: 0, low_rank_dimension: 2,", "{layer: 0, component: block_input, "
                                   "low_rank_dimension: 2,"))
    capsys.readouterr()
    rc = main(["-q", "sft", "--config", str(config), f"output_dir={tmp_path / 'run'}", "train.reft_prefix_cache=true"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("alignkit ")]
    assert rc == 2 and len(lines) == 1, err
    assert "train.reft_prefix_cache: true" in lines[0] and "layer 0" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_adding_an_adapter_while_the_cache_is_on_is_refused(base_dir):
    """An adapter added under a live cache with an intervention in the cached layers (here layer 0's input, b = 3)
    had its edit skipped: the cached forward replayed layers 0-2 from the store (logits off by ~1 on this model).
    Now add_adapter refuses while the cache is on, naming the fix; off, on again, the outputs are the uncached ones."""
    from alignkit.interventions.config import ReftConfig, RepresentationConfig
    model = reft_model(base_dir)
    reft = reft_of(model)
    batch = SFTCollator(0)(features())
    reft.enable_prefix_cache()
    step(model, batch), step(model, batch)
    low = ReftConfig([RepresentationConfig(layer=0, component="block_input", intervention="lobireft",
                                           low_rank_dimension=2)], positions="f3+l3")
    with pytest.raises(ValueError, match=r"adapter 'low': the ReFT prefix cache is on .* layers 0-2 .*"
                                         r"disable_prefix_cache\(\) before adding"):
        reft.add_adapter("low", low)
    assert reft.adapter_names == ["default"] and len(reft.slots) == 1  # nothing attached
    reft.disable_prefix_cache()
    reft.add_adapter("low", low)
    with torch.no_grad():
        reft.interventions["low"][0].learned_source.normal_(0, 3.0)
    want = step(model, batch)
    with pytest.raises(ValueError, match="layer 0"):  # an intervention in layer 0's input: nothing to cache
        reft.enable_prefix_cache()
    assert reft._prefix_cache is None
    assert torch.equal(step(model, batch)[0], want[0])


def test_neftune_keeps_the_cache_off_and_true_is_refused(base_dir, tmp_path):
    """train.neftune_noise_alpha adds fresh noise to the input embeddings at every training forward, so the frozen
    layers' output is not a fixed function of the tokens; the auto cache (a CPU run over its data twice) was on and
    the run stopped at the first step of its second epoch with PrefixCacheMismatch ("not a fixed function of the
    tokens in this model"), after an epoch of training. Now auto leaves it off (every forward runs layers 0-2: 4
    steps x 3 layers) and the run trains its 4 steps; true is refused when the trainer is built, naming the key."""
    losses, _, runs = _train(base_dir, tmp_path / "neft", None, num_train_epochs=2, neftune_noise_alpha=5.0)
    assert len(losses) == 4 and runs == 4 * 3
    args = TrainingArguments(output_dir="/nonexistent/never-written", max_steps=1, report_to=[], use_cpu=True,
                             neftune_noise_alpha=5.0)
    with pytest.raises(ConfigError, match=r"reft_prefix_cache: true, but .*train.neftune_noise_alpha=5 adds fresh "
                                          r"noise .*reft_prefix_cache: false"):
        SFTTrainer(reft_model(base_dir), args, train_dataset=features(), data_collator=SFTCollator(0),
                   reft_prefix_cache=True)
