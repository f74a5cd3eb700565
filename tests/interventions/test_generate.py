"""Generation with interventions: the prompt edit is made in the prefill and kept through the KV cache (decode
steps do not re-edit it), optionally every generated position is edited too, and left-padded batches give
the same tokens as one prompt at a time."""

from __future__ import annotations

import pytest
import torch

import alignkit.interventions  # noqa: F401
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import ReftConfig, RepresentationConfig

NEW = 6


def make_reft(tiny_lm, arch: str):
    reps = [RepresentationConfig(layer=0, intervention="loreft", low_rank_dimension=4),
            RepresentationConfig(layer=1, component="mlp_output", intervention="noreft", low_rank_dimension=4)]
    reft = get_reft_model(tiny_lm(arch), ReftConfig(reps))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(2.0 * torch.randn(p.shape, generator=g))  # strong edits: the tokens must change
    return reft


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 200, (n,), generator=g) for n in (5, 3, 7)]


def naive_greedy(reft, prompt: torch.Tensor, prompt_loc: list[int], on_generated: bool) -> list[int]:
    """No cache: run the whole sequence every step, editing the prompt positions (and, if asked, every
    generated position) each time; what the cached generation must reproduce."""
    seq = prompt.tolist()
    for _ in range(NEW):
        positions = list(prompt_loc) + (list(range(len(prompt), len(seq))) if on_generated else [])
        loc = torch.tensor(positions)[None, None, :].expand(1, reft.num_interventions, -1)
        with torch.no_grad():
            logits = reft(input_ids=torch.tensor([seq]), intervention_locations=loc).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("arch,on_generated", [("llama", False), ("llama", True), ("gpt2", False)])
def test_cached_generation_equals_full_recompute(arch, on_generated, tiny_lm):
    """Location 0 is inside every decode step's window if the cache offset were ignored, so a decode step
    that re-edited "position 0" (the new token) would break the equality."""
    reft = make_reft(tiny_lm, arch)
    prompt = prompts()[2]
    loc = torch.tensor([[[0, 6]] * 2])  # (1, I=2, P=2): first and last prompt token
    out = reft.generate(prompt[None], attention_mask=torch.ones(1, 7, dtype=torch.long), intervention_locations=loc,
                        intervene_on_generated=on_generated, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert out[0, 7:].tolist() == naive_greedy(reft, prompt, [0, 6], on_generated)
    base = reft.model.generate(prompt[None], attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=NEW,
                               min_new_tokens=NEW, do_sample=False)
    assert out[0, 7:].tolist() != base[0, 7:].tolist()  # the edit changes what is generated


@pytest.mark.parametrize("arch,on_generated", [("llama", False), ("gpt2", True), ("gpt_neox", False)])
def test_left_padded_batch_equals_one_at_a_time(arch, on_generated, tiny_lm):
    reft = make_reft(tiny_lm, arch)
    ps = prompts()
    T = max(len(p) for p in ps)
    pad = reft.model.generation_config.pad_token_id
    ids = torch.full((3, T), pad, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    rel = [[0, len(p) - 1] for p in ps]  # first and last prompt token
    loc = torch.zeros(3, 2, 2, dtype=torch.long)
    for b, p in enumerate(ps):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
        loc[b, :] = torch.tensor(rel[b]) + (T - len(p))  # shifted by the left padding
    loc[1, 1] = -1  # row 1: no edit by the second intervention
    batched = reft.generate(ids, attention_mask=mask, intervention_locations=loc, intervene_on_generated=on_generated,
                            max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    for b, p in enumerate(ps):
        one_loc = loc[b:b + 1] - (T - len(p)) * (loc[b:b + 1] >= 0)
        single = reft.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               intervention_locations=one_loc, intervene_on_generated=on_generated,
                               max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        assert batched[b, T:].tolist() == single[0, len(p):].tolist(), f"row {b}"


def test_generate_expands_locations_for_num_return_sequences(tiny_lm):
    reft = make_reft(tiny_lm, "llama")
    prompt = prompts()[0][None]
    loc = torch.tensor([[[4]] * 2])
    kw = dict(attention_mask=torch.ones(1, 5, dtype=torch.long), intervention_locations=loc, max_new_tokens=NEW,
              min_new_tokens=NEW, do_sample=False)
    two = reft.generate(prompt, num_beams=2, num_return_sequences=2, **kw)
    kw.pop("intervention_locations")
    base = reft.model.generate(prompt, num_beams=2, num_return_sequences=2, **kw)
    assert two.shape == base.shape == (2, 5 + NEW) and not torch.equal(two, base)
