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


def _labelled_batch(tokenizer, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pyreft rows (prompt + response, labels -100 off the response and on pads), padded on `side` to 15."""
    rows = [("Q: hi\nA:", " yes"), ("Q: what is it\nA:", " no way")]
    ids, mask, labels = [], [], []
    for prompt, response in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        pad = 15 - len(p) - len(r)
        seq, att, lab = p + r, [1] * (len(p) + len(r)), [-100] * len(p) + r
        before, after = (pad, 0) if side == "left" else (0, pad)
        ids.append([0] * before + seq + [0] * after)
        mask.append([0] * before + att + [0] * after)
        labels.append([-100] * before + lab + [-100] * after)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


# By hand from the tiny tokenizer: "Q: hi\nA:" is 8 tokens + " yes" 4; "Q: what is it\nA:" is 9 + " no way" 6.
# Right padding: row 0's prompt is [0, 8), row 1's [0, 9); left padding shifts row 0 by its 3 pads: [3, 11).
# Spec "f1+l2": the first prompt token, then the last two.
BY_HAND = {"right": [[0, 6, 7], [0, 7, 8]], "left": [[3, 9, 10], [0, 7, 8]]}
WHOLE_ROW = {"right": [[0, 10, 11], [0, 13, 14]], "left": [[3, 13, 14], [0, 13, 14]]}  # the old placement


@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_with_labels_places_positions_on_the_prompt_as_reft_trainer_does(side, tokenizer, tiny_lm):
    """A pyreft-style `forward(input_ids, attention_mask, labels=...)` without completion_mask or locations took
    the whole row as the prompt, so 'l2' edited the response's last tokens (training, which reads
    labels != -100 as the completion, edited the prompt's): a silently other model. Now the prompt ends at each
    row's first label != -100: the positions by hand, the same logits and loss as with the explicit
    completion_mask or locations, and not the old whole-row ones."""
    from alignkit.interventions.positions import prompt_spans_from_labels

    ids, mask, labels = _labelled_batch(tokenizer, side)
    assert len(tokenizer("Q: hi\nA:", add_special_tokens=False)["input_ids"]) == 8  # the counts used by hand
    start, length = prompt_spans_from_labels(mask, labels)
    assert (start.tolist(), length.tolist()) == ({"right": [0, 0], "left": [3, 0]}[side], [8, 9])
    reps = [RepresentationConfig(layer=0, low_rank_dimension=2), RepresentationConfig(layer=1, low_rank_dimension=2)]
    reft = get_reft_model(tiny_lm("llama"), ReftConfig(reps, positions="f1+l2"))
    perturb(reft.interventions, 2.0, seed=3)
    loc = reft.default_locations(mask, labels=labels)
    assert loc.tolist() == [[row, row] for row in BY_HAND[side]]
    with torch.no_grad():
        got = reft(input_ids=ids, attention_mask=mask, labels=labels)
        explicit = reft(input_ids=ids, attention_mask=mask, labels=labels,
                        intervention_locations=torch.tensor(BY_HAND[side])[:, None, :].expand(2, 2, 3))
        comp = reft(input_ids=ids, attention_mask=mask, labels=labels, completion_mask=(labels != -100).long())
        old = reft(input_ids=ids, attention_mask=mask, labels=labels,
                   intervention_locations=torch.tensor(WHOLE_ROW[side])[:, None, :].expand(2, 2, 3))
    for want in (explicit, comp):
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert not torch.allclose(got.loss, old.loss)  # the placement matters to the loss


def test_forward_with_labels_refuses_a_row_without_prompt_and_places_a_row_without_target_whole(tokenizer, tiny_lm):
    """A row whose first attended token is already a target (labels=input_ids) has no prompt end: one ValueError
    naming the row and the fix (it was placed on the whole row, i.e. on its last targets). A row without any target
    (all -100: pyreft's row whose response was cut by truncation) is prompt to its end, as pyreft counts it (its
    prompt's tokens) and as ReftTrainer trains it. A classifier's (B,) class ids place nothing: whole rows, as
    before."""
    ids, mask, labels = _labelled_batch(tokenizer, "left")
    reft = get_reft_model(tiny_lm("llama"), ReftConfig([RepresentationConfig(layer=0, low_rank_dimension=2)],
                                                       positions="l1"))
    bad = torch.where(mask.bool(), ids, -100)
    bad[0] = labels[0]  # row 0 fine, row 1 labelled from its first token
    with pytest.raises(ValueError) as e:
        reft(input_ids=ids, attention_mask=mask, labels=bad)
    msg = str(e.value)
    assert "labels row 1" in msg and "index 0" in msg and "-100" in msg and "completion_mask" in msg, msg
    none = labels.clone()
    none[1] = -100  # row 1: no target at all -> its whole attended span [0, 15) is the prompt
    assert reft.default_locations(mask, labels=none).tolist() == [[[10]], [[14]]]
    assert reft.default_locations(mask, labels=torch.tensor([1, 0])).tolist() == [[[14]], [[14]]]  # class ids
