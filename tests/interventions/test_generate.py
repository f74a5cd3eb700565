"""Generation with interventions: the prompt edit is made in the prefill and kept through the KV cache (decode
steps do not re-edit it), optionally every generated position is edited too, and left-padded batches give
the same tokens as one prompt at a time."""

from __future__ import annotations

import pytest
import torch

import alignkit.interventions  # noqa: F401
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import ReftConfig, RepresentationConfig
from tests.adapters.table import perturb

NEW = 6


def make_reft(tiny_lm, arch: str):
    reps = [RepresentationConfig(layer=0, intervention="loreft", low_rank_dimension=4),
            RepresentationConfig(layer=1, component="mlp_output", intervention="noreft", low_rank_dimension=4)]
    reft = get_reft_model(tiny_lm(arch), ReftConfig(reps))
    perturb(reft.interventions, 2.0)  # strong edits: the tokens must change
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


def count_calls(modules) -> tuple[list[int], list]:
    """Count forward calls of each module (a foreign hook; ours are not touched)."""
    calls = [0] * len(modules)

    def make(i):
        def hook(mod, args, out):
            calls[i] += 1
        return hook
    return calls, [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]


@pytest.mark.parametrize("on_generated", [False, True])
def test_decode_steps_skip_intervention_work_and_fast_path_is_exact(on_generated, tiny_lm, monkeypatch):
    """Prompt-only edits: the prefill calls each intervention once, the NEW - 1 decode steps call none. Turning
    the fast path off (the run's largest location reported as "beyond any step") runs the full gather ->
    intervene -> scatter on every step and must give the same tokens and bitwise the same scores."""
    import sys

    import alignkit.interventions.attach as attach

    reft = make_reft(tiny_lm, "llama")
    ps = prompts()
    ids = torch.stack([ps[0], ps[2][:5]])  # (2, 5)
    loc = torch.tensor([[[0, 4]] * 2, [[3, -1]] * 2])  # (B=2, I=2, P=2)
    kw = dict(attention_mask=torch.ones_like(ids), intervention_locations=loc, intervene_on_generated=on_generated,
              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ivs = list(reft.interventions["default"])
    forwards, base_handle = count_calls([reft.model.model])  # one call per prefill / decode step

    calls, handles = count_calls(ivs)
    rebuilds, rot_handle = count_calls([ivs[0].rotate_layer.parametrizations.weight[0]])  # LoReFT's R
    fast = reft.generate(ids, **kw)
    assert forwards == [NEW]
    assert calls == ([NEW] * 2 if on_generated else [1, 1])  # prefill only, unless generated tokens are edited
    assert rebuilds == [1]  # R evaluated once per generate call, however many steps use it

    monkeypatch.setattr(attach, "largest_location", lambda locations: sys.maxsize)  # no step is ever skipped
    calls[:] = [0, 0]
    slow = reft.generate(ids, **kw)
    assert calls == [NEW, NEW]  # the slow path really ran in every decode step
    for h in handles + base_handle + rot_handle:
        h.remove()
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.scores, slow.scores))


def test_skipped_step_returns_h_itself_without_tensor_ops(tiny_lm):
    """A decode step past the last location: `edit_positions` hands back the very same tensor and dispatches
    no tensor operation (so no device sync); a step that contains a location does the work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alignkit.interventions.editing import Run, Step, edit_positions

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    reft = make_reft(tiny_lm, "llama")
    slot = reft.slots[0]
    locations = torch.tensor([[[2, 6]] * 2])  # (1, I=2, P=2)
    run = Run(locations, frozenset({0, 1}), last_location=6)
    h = torch.randn(1, 1, 64)  # (B, T=1, d): one decode step
    with CountOps() as counter, torch.no_grad():
        out = edit_positions(h, slot, Step(run, offset=7))
    assert out is h and counter.ops == []
    with CountOps() as counter, torch.no_grad():
        out = edit_positions(h, slot, Step(run, offset=6))  # location 6 is this step's token
    assert counter.ops and not torch.equal(out, h)


def test_all_rows_without_locations_generate_like_the_base(tiny_lm):
    reft = make_reft(tiny_lm, "llama")
    ids = prompts()[2][None]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    calls, handles = count_calls(list(reft.interventions["default"]))
    out = reft.generate(ids, intervention_locations=torch.full((1, 2, 3), -1), **kw)
    for h in handles:
        h.remove()
    assert calls == [0, 0]  # -1 everywhere: even the prefill is skipped
    assert torch.equal(out, reft.model.generate(ids, **kw))
