"""ReFT owns its positions: the spec a ReFT was trained with ("f1+l1") is saved with its weights, and a
reloaded adapter called as plain `model.generate(**inputs)` / `model(**inputs)` intervenes exactly where
training did, without the caller rebuilding locations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.interventions import ReftConfig, RepresentationConfig, get_reft_model
from alignkit.interventions.loading import load_reft
from alignkit.interventions.positions import locations_from_mask, locations_from_spans
from alignkit.adapters import load_adapter
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.online.generation import SamplingConfig, encode_prompt, generate_responses
from tests.adapters.table import REFT_KINDS, perturb

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROMPTS = ["Human: How do I bake bread?\n\nAssistant:", "Human: Name a colour.\n\nAssistant:",
           "Human: What is two plus two, and why?\n\nAssistant:"]


def test_saved_spec_round_trips_and_places_forward_and_generate(tiny_lm, tmp_path):
    reps = [RepresentationConfig(layer=0, low_rank_dimension=2), RepresentationConfig(layer=1, low_rank_dimension=2)]
    reft = get_reft_model(tiny_lm("llama"), ReftConfig(reps, positions="f1+l2"))
    perturb(reft.interventions, 2.0, seed=3)
    reft.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "reft_config.json").read_text())["reft_config"]
    assert saved["positions"] == "f1+l2" and saved["share_weights"] is True
    loaded = load_reft(tiny_lm("llama"), tmp_path)
    assert loaded.adapter_configs["default"].positions == "f1+l2"

    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    # by hand: row 0 prompt spans [2, 6): first = 2, last two = 4, 5; row 1 [0, 6): 0, 4, 5
    explicit = torch.tensor([[2, 4, 5], [0, 4, 5]])[:, None, :].expand(2, 2, 3)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        plain = loaded(input_ids=ids, attention_mask=mask).logits
        placed = loaded(input_ids=ids, attention_mask=mask, intervention_locations=explicit).logits
        torch.testing.assert_close(plain, placed, rtol=0, atol=0)
        out = loaded.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(out, loaded.generate(input_ids=ids, attention_mask=mask, intervention_locations=explicit, **kw))
        assert not torch.equal(out, loaded.model.generate(input_ids=ids, attention_mask=mask, **kw))  # edits matter
        # prompt + completion rows: the prompt ends at the first completion token (position 4 in row 1)
        comp = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])
        by_hand = torch.tensor([[2, 2, 3], [0, 2, 3]])  # row 0: [2, 4) -> first 2, last two 2, 3 (2 deduplicated)
        by_hand[0, 1] = -1
        with_comp = loaded(input_ids=ids, attention_mask=mask, completion_mask=comp).logits
        torch.testing.assert_close(with_comp, loaded(input_ids=ids, attention_mask=mask,
                                                      intervention_locations=by_hand[:, None, :].expand(2, 2, 3)).logits,
                                   rtol=0, atol=0)


def test_spec_checks_and_adapters_without_a_spec(tiny_lm):
    reps = [RepresentationConfig(layer=0, low_rank_dimension=2)]
    with pytest.raises(ValueError, match="bad positions 'q3'"):
        ReftConfig(reps, positions="q3")
    with pytest.raises(ValueError, match="is odd"):
        ReftConfig(reps, positions="f1+l1", share_weights=False)
    reft = get_reft_model(tiny_lm("llama"), ReftConfig(reps))  # no spec: plain calls edit nothing, as before
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reft(input_ids=ids).logits, reft.model(input_ids=ids).logits, rtol=0, atol=0)
    reft.add_adapter("b", ReftConfig(reps, positions="l1"))  # mixed: only "b" is placed
    loc = reft.default_locations(torch.ones(1, 3, dtype=torch.long))
    assert loc.tolist() == [[[-1], [2]]]
    assert torch.equal(loc, torch.cat([torch.full((1, 1, 1), -1), locations_from_mask("l1", torch.ones(1, 3), 1)], 1))
    assert locations_from_spans("f1+l1", torch.tensor([0]), torch.tensor([3]), 2, False).tolist() == [[[0], [2]]]


@pytest.mark.parametrize("kind", REFT_KINDS)
@pytest.mark.parametrize("command,positions", [("sft", "f1+l1"), ("dpo", "f2+l1")])
def test_cli_trained_reft_reloaded_plain_generate_equals_training_path(command, positions, kind, tiny_dir, tmp_path):
    """Issue 11: a ReFT (and ReFT+LoRA) trained by `alignkit sft` / `alignkit dpo`, reloaded and called with plain
    `generate(**inputs)`, gives the tokens of the training-time generation path (explicit positions)."""
    base = tiny_dir("llama")
    out = tmp_path / "run"
    rc = main(["-q", command, "--config", str(CONFIGS / f"{command}-reft-tiny.yaml"), f"output_dir={out}",
               f"model.path={base}", f"adapter.kind={kind}", f"adapter.reft.positions={positions}",
               "train.max_steps=3", "train.logging_steps=1", "train.eval_strategy=no"])
    assert rc == 0
    tok = load_tokenizer(base)
    model = load_adapter(load_model(base).eval(), out / "model")
    assert model.adapter_configs["default"].positions == positions
    cfg = SamplingConfig(max_new_tokens=6, do_sample=False)
    trained_path = generate_responses(model, tok, PROMPTS, cfg, positions=positions, batch_size=4)  # explicit
    defaults = generate_responses(model, tok, PROMPTS, cfg, batch_size=4)  # the model's own spec
    assert [s.response_ids for s in defaults] == [s.response_ids for s in trained_path]
    for prompt, sample in zip(PROMPTS, trained_path):
        ids = torch.tensor([encode_prompt(prompt, tok)])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        n = len(sample.response_ids)
        assert plain[0, ids.shape[1]:ids.shape[1] + n].tolist() == sample.response_ids
    base_model = load_model(base).eval()
    ids = torch.tensor([encode_prompt(PROMPTS[0], tok)])
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, base_model(input_ids=ids).logits)  # the ReFT acts


def test_apply_adapter_refuses_two_disagreeing_position_specs(tiny_lm):
    """One setting, one place: a `positions` inside adapter.reft.config that differs from adapter.reft.positions
    is an error naming both keys, not a silent precedence; an agreeing one is accepted."""
    from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter

    rc = {"representations": [{"layer": 0, "low_rank_dimension": 2}], "positions": "f3"}
    with pytest.raises(ValueError, match=r"adapter.reft.config.positions \('f3'.*adapter.reft.positions \('f1\+l1'"):
        apply_adapter(tiny_lm("llama"), AdapterConfig(kind="reft", reft=ReftSettings(config=rc, positions="f1+l1")))
    model = apply_adapter(tiny_lm("llama"), AdapterConfig(kind="reft", reft=ReftSettings(config=rc, positions="f3")))
    assert model.adapter_configs["default"].positions == "f3"
