"""ReFT places each forward of a `generate` call by counting the tokens it has processed, not by reading the
keyword under which transformers passes the KV cache (`past_key_values` up to 5.23, `cache` from 5.24).
These tests drive generation through models whose forward receives the cache under a name alignkit has never
seen, or cannot see it at all, and check the tokens against a no-cache recompute; where the position cannot be
established (a cache rolled back under ReFT's feet, a multi-token step with nothing to cross-check), ReFT
raises `ReftPositionError` instead of editing a guessed position."""

from __future__ import annotations

import functools
import inspect
import types

import pytest
import torch
from transformers import DynamicCache

from alignkit.interventions import ReftPositionError
from tests.interventions.test_generate import NEW, make_reft, naive_greedy, prompts

CACHE_NAMES = ("cache", "past_key_values")


def route_cache(reft, rename: str | None = None, hide: bool = False, drop_mask: bool = False, swap_at: int | None = None,
                drop_positions: bool = False):
    """Patch the base model (instance attributes only) so that `generate` hands its forward the KV cache under
    `rename`, or wrapped in an object without `get_seq_length` (`hide`), optionally without the attention
    mask, optionally replacing the cache by an empty one at forward number `swap_at`."""
    base = reft.model
    prepare, forward = base.prepare_inputs_for_generation, base.forward
    calls = {"n": 0}

    @functools.wraps(prepare)  # generate validates its kwargs against these signatures
    def prepare_inputs(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        key = next((k for k in CACHE_NAMES if inputs.get(k) is not None), None)
        cache = inputs.pop(key) if key else None
        for k in CACHE_NAMES:
            inputs.pop(k, None)
        if drop_mask:
            inputs.pop("attention_mask", None)
        if drop_positions:
            inputs.pop("position_ids", None)
        calls["n"] += 1
        if cache is not None and swap_at is not None and calls["n"] == swap_at:
            cache = DynamicCache(config=base.config)
        if cache is not None:
            inputs["kv_state"] = types.SimpleNamespace(inner=cache) if hide else cache
        return inputs

    params = inspect.signature(forward).parameters
    real_name = next(k for k in CACHE_NAMES if k in params)  # what this transformers' forward takes

    @functools.wraps(forward)
    def patched_forward(*args, kv_state=None, **kwargs):
        if kv_state is not None:
            kwargs[real_name] = kv_state.inner if hide else kv_state
        return forward(*args, **kwargs)

    base.prepare_inputs_for_generation = prepare_inputs
    base.forward = patched_forward
    return calls


def greedy(reft, prompt, loc, on_generated=False, **kw):
    return reft.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         intervention_locations=loc, intervene_on_generated=on_generated, max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, **kw)[0, len(prompt):].tolist()


@pytest.fixture
def setup(tiny_lm):
    reft = make_reft(tiny_lm, "llama")
    prompt = prompts()[2]
    loc = torch.tensor([[[0, 6]] * 2])  # first and last prompt token, both interventions
    return reft, prompt, loc


@pytest.mark.parametrize("on_generated", [False, True])
def test_cache_under_an_unknown_keyword_gives_the_recompute_tokens(setup, on_generated):
    reft, prompt, loc = setup
    expected = naive_greedy(reft, prompt, [0, 6], on_generated)
    calls = route_cache(reft, rename="kv_state")
    assert greedy(reft, prompt, loc, on_generated) == expected
    assert calls["n"] == NEW  # the patched path really ran, once per forward


def test_cache_invisible_to_reft_is_placed_by_counting(setup):
    """The cache reaches the model inside an object ReFT cannot recognise and there is no attention mask:
    only the token count says where each decode step is."""
    reft, prompt, loc = setup
    expected = naive_greedy(reft, prompt, [0, 6], False)
    route_cache(reft, hide=True, drop_mask=True, drop_positions=True)
    assert greedy(reft, prompt, loc) == expected


def test_recompute_placed_by_position_ids_when_there_is_no_mask(setup):
    reft, prompt, loc = setup
    expected = naive_greedy(reft, prompt, [0, 6], True)
    route_cache(reft, drop_mask=True)
    assert greedy(reft, prompt, loc, True, use_cache=False) == expected


@pytest.mark.parametrize("on_generated", [False, True])
def test_generation_without_cache_recomputes_from_position_zero(setup, on_generated):
    reft, prompt, loc = setup
    assert greedy(reft, prompt, loc, on_generated, use_cache=False) == naive_greedy(reft, prompt, [0, 6], on_generated)


def test_cache_that_disagrees_with_the_count_raises_and_names_the_keyword(setup):
    reft, prompt, loc = setup
    route_cache(reft, rename="kv_state", swap_at=3)  # the third forward gets an empty cache
    with pytest.raises(ReftPositionError, match=r"processed in this call but the KV cache passed as `kv_state` holds 0"):
        greedy(reft, prompt, loc)


def test_multi_token_step_with_nothing_to_cross_check_raises(setup):
    """No cache, mask or position ids: a second forward with the whole sequence could be a recompute or
    several new tokens; ReFT cannot tell and must not guess."""
    reft, prompt, loc = setup
    route_cache(reft, drop_mask=True, drop_positions=True)
    with pytest.raises(ReftPositionError, match="no KV cache, attention mask or position ids"):
        greedy(reft, prompt, loc, use_cache=False)


def test_direct_forward_with_a_cache_continues_at_the_cache_length(setup):
    """A caller driving decoding itself (forward with a cache, e.g. a serving engine) gets absolute positions:
    the prefill edits the prompt, and a decode step with a location at its absolute index edits that token."""
    reft, prompt, loc = setup
    ids = prompt[None]
    cache = DynamicCache(config=reft.model.config)
    with torch.no_grad():
        out = reft(input_ids=ids, attention_mask=torch.ones_like(ids), intervention_locations=loc, past_key_values=cache,
                   use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(1, 8, dtype=torch.long)
        step = reft(input_ids=nxt, attention_mask=mask, intervention_locations=loc, past_key_values=cache,
                    use_cache=True).logits[0, -1]
        full = reft(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask, intervention_locations=loc).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
