"""generate_responses: batched == one prompt at a time == a naive no-cache greedy loop; stop strings; EOS;
n samples per prompt; seeds; eval mode; ReftModel (prompt positions) and peft models."""

from __future__ import annotations

import pytest
import torch

from alignkit.guards import NonFiniteLogitsError
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import ReftConfig
from alignkit.online.generation import SamplingConfig, encode_prompt, generate_responses

PROMPTS = ["Hello!", "The quick brown fox jumps over", [{"role": "user", "content": "What is 2 + 2?"}]]
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=6)


def naive_greedy(model, ids: list[int], steps: int, locations=None) -> list[int]:
    """Greedy decoding by re-running the full sequence each step (no cache, no padding)."""
    seq = list(ids)
    for _ in range(steps):
        kw = {} if locations is None else {"intervention_locations": locations}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), **kw).logits  # (1, T, V)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_single_and_naive(tiny_lm, tokenizer, arch):
    model = tiny_lm(arch)
    batched = generate_responses(model, tokenizer, PROMPTS, GREEDY, batch_size=3)
    single = [generate_responses(model, tokenizer, [p], GREEDY)[0] for p in PROMPTS]
    for b, s, p in zip(batched, single, PROMPTS):
        assert b.response_ids == s.response_ids and b.response == s.response
        assert b.prompt_ids == encode_prompt(p, tokenizer)
        want = cut_at_eos(naive_greedy(model, b.prompt_ids, GREEDY.max_new_tokens), tokenizer.eos_token_id)
        assert b.response_ids == want
        assert b.finish_reason == ("eos" if want[-1] == tokenizer.eos_token_id else "length")
    # the chat prompt was formatted with the template (generation prompt opens the assistant turn)
    assert tokenizer.decode(batched[2].prompt_ids).endswith("<|im_start|>assistant\n")


def test_stop_string_truncates_text_and_tokens(tiny_lm, tokenizer):
    model = tiny_lm("llama")
    long = SamplingConfig(do_sample=False, max_new_tokens=8)
    free = generate_responses(model, tokenizer, [PROMPTS[1]], long)[0]
    assert free.finish_reason == "length", "the test needs a response without EOS"
    ids = free.response_ids
    # a stop string: the decoded text of token 3 (clean text, first seen there)
    stop = tokenizer.decode(ids[3:4]).strip()
    assert stop and "\ufffd" not in stop and stop not in tokenizer.decode(ids[:3])
    k = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))  # naive linear search
    full = tokenizer.decode(ids[:k])
    got = generate_responses(model, tokenizer, [PROMPTS[1]], SamplingConfig(do_sample=False, max_new_tokens=8,
                                                                            stop=[stop]))[0]
    assert got.finish_reason == "stop"
    assert got.response_ids == ids[:k]
    assert got.response == full[:full.index(stop)]
    inc = generate_responses(model, tokenizer, [PROMPTS[1]], SamplingConfig(
        do_sample=False, max_new_tokens=8, stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.response == full[:full.index(stop) + len(stop)]


def test_end_token_ids_end_the_response(tiny_lm, tokenizer):
    model = tiny_lm("llama")
    free = generate_responses(model, tokenizer, [PROMPTS[1]], SamplingConfig(do_sample=False, max_new_tokens=8))[0]
    end = free.response_ids[2]
    assert end not in free.response_ids[:2]
    got = generate_responses(model, tokenizer, [PROMPTS[1]], SamplingConfig(
        do_sample=False, max_new_tokens=8, stop_token_ids=[end]))[0]
    assert got.finish_reason == "eos"
    assert got.response_ids == free.response_ids[:3]  # ends WITH the end token
    assert got.response == tokenizer.decode(free.response_ids[:2], skip_special_tokens=True)


def test_num_samples_grouping_and_seed(tiny_lm, tokenizer):
    model = tiny_lm("llama")
    cfg = SamplingConfig(num_samples=3, max_new_tokens=5, seed=7)
    state = torch.get_rng_state()
    a = generate_responses(model, tokenizer, PROMPTS[:2], cfg, batch_size=4)  # batches cut across groups
    assert torch.equal(state, torch.get_rng_state()), "a seeded call must not move the global RNG"
    assert [(s.group, s.index) for s in a] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [s.prompt for s in a] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert all(s.prompt_id == f"prompt[{s.group}]" for s in a)
    assert len({tuple(s.response_ids) for s in a}) > 1, "sampling at temperature 1 should vary"
    b = generate_responses(model, tokenizer, PROMPTS[:2], cfg, batch_size=4)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    c = generate_responses(model, tokenizer, PROMPTS[:2], SamplingConfig(num_samples=3, max_new_tokens=5, seed=8),
                           batch_size=4)
    assert [s.response_ids for s in a] != [s.response_ids for s in c]


def test_eval_mode_during_generation_and_restored(tiny_lm, tokenizer):
    model = tiny_lm("llama").train()
    modes = []
    h = model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    generate_responses(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=3))
    h.remove()
    assert modes and not any(modes)
    assert model.training and all(m.training for m in model.modules())


def test_reft_model_intervenes_on_prompt_positions(tiny_lm, tokenizer):
    torch.manual_seed(0)
    reft = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0, 1], intervention="loreft", low_rank_dimension=4))
    with torch.no_grad():  # make the edit large enough to change greedy tokens
        for p in reft.interventions.parameters():
            p.mul_(20.0)
    with pytest.raises(ValueError, match="positions"):
        generate_responses(reft, tokenizer, PROMPTS, GREEDY)
    got = generate_responses(reft, tokenizer, PROMPTS, GREEDY, batch_size=3, positions="l1")
    plain = generate_responses(reft.model, tokenizer, PROMPTS, GREEDY, batch_size=3)
    changed = 0
    for s, base in zip(got, plain):
        last = len(s.prompt_ids) - 1  # "l1": the last prompt token, unpadded position
        loc = torch.full((1, reft.num_interventions, 1), last)
        want = cut_at_eos(naive_greedy(reft, s.prompt_ids, GREEDY.max_new_tokens, loc), tokenizer.eos_token_id)
        assert s.response_ids == want
        changed += s.response_ids != base.response_ids
    assert changed > 0, "the interventions should change at least one greedy response"


def test_peft_model(tiny_lm, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_lm("llama")
    plain = generate_responses(base, tokenizer, PROMPTS, GREEDY, batch_size=3)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    got = generate_responses(peft_model, tokenizer, PROMPTS, GREEDY, batch_size=3)
    assert [s.response_ids for s in got] == [s.response_ids for s in plain]  # LoRA B = 0 at init


def test_prompt_truncation_and_bad_config(tiny_lm, tokenizer):
    model = tiny_lm("llama")
    full = encode_prompt(PROMPTS[1], tokenizer)
    s = generate_responses(model, tokenizer, [PROMPTS[1]], GREEDY, max_prompt_length=3)[0]
    assert s.prompt_ids == full[-3:]
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        SamplingConfig(num_samples=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_samples_of_a_prompt_share_one_prefill(tiny_lm, tokenizer, arch):
    """num_samples rows of a prompt: the prompt is run once (its KV cache copied to the rows) and the samples
    are those of plain `generate` on the repeated, left-padded prompts with the same seed (sampler multinomial:
    generate's own draws); greedy samples equal the no-cache naive loop."""
    model = tiny_lm(arch)
    cfg = SamplingConfig(num_samples=3, max_new_tokens=5, seed=7, sampler="multinomial")
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, k: widths.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    try:
        got = generate_responses(model, tokenizer, PROMPTS[:2], cfg, batch_size=6)
    finally:
        hook.remove()
    ids = [encode_prompt(p, tokenizer) for p in PROMPTS[:2]]
    T = max(map(len, ids))
    assert widths[0] == (2, T - 1)  # one prefill for the two distinct prompts, all but their last token
    assert all(w[1] == 1 for w in widths[1:])  # then one token at a time for the 6 rows
    rows = [x for x in ids for _ in range(3)]
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(x)) + x for x in rows])
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in rows])
    from alignkit.online.generation import _generation_kwargs, end_token_ids

    eos = end_token_ids(model, tokenizer, cfg)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        ref = model.generate(input_ids=input_ids, attention_mask=mask, **_generation_kwargs(cfg, tokenizer, eos))
    for s, row in zip(got, ref[:, T:].tolist()):
        assert s.response_ids == cut_at_eos(row, tokenizer.eos_token_id)[:len(s.response_ids)]
        assert len(s.response_ids) == len(cut_at_eos(row, tokenizer.eos_token_id))
    greedy = generate_responses(model, tokenizer, PROMPTS[:2], SamplingConfig(do_sample=False, num_samples=2,
                                                                              max_new_tokens=5))
    for s in greedy:
        assert s.response_ids == cut_at_eos(naive_greedy(model, s.prompt_ids, 5), tokenizer.eos_token_id)


def test_generation_past_the_models_context_is_warned_once(tiny_lm, tokenizer, caplog):
    """Longest prompt + max_new_tokens past max_position_embeddings: a RoPE model keeps producing tokens at
    positions it never trained on, silently worse. One warning naming both numbers and the fix, not one per call."""
    import logging

    lm = tiny_lm("llama")
    n = len(encode_prompt("Hi there", tokenizer))
    lm.config.max_position_embeddings = n + 2
    cfg = SamplingConfig(max_new_tokens=3, do_sample=False)
    with caplog.at_level(logging.WARNING, logger="alignkit.models.rope"):
        generate_responses(lm, tokenizer, ["Hi there"], SamplingConfig(max_new_tokens=2, do_sample=False))
        assert not caplog.records  # exactly at the context: fine
        generate_responses(lm, tokenizer, ["Hi there"], cfg)
        generate_responses(lm, tokenizer, ["Hi there"], cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and f"reaches {n + 3} tokens, past the model's context of {n + 2} positions" in msgs[0]
    assert "model.rope_scaling" in msgs[0]


def test_lean_loop_samples_what_generate_samples(tiny_lm, tokenizer):
    """generate_responses samples with `decode.lean_generate` where the call allows it (the default) and with
    `model.generate` when told not to: with sampler multinomial, the same samples under the same seed, for a
    plain model and a LoRA model whose adapters are not zero. A ReftModel never takes the lean loop (its edits live
    in its own generate)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_lm("llama")
    calls = []
    model.generate = lambda *a, _g=model.generate, **k: calls.append(1) or _g(*a, **k)  # noqa: E731
    cfgs = [SamplingConfig(num_samples=3, max_new_tokens=6, seed=11, sampler="multinomial"),
            SamplingConfig(num_samples=2, max_new_tokens=6, seed=5, temperature=0.8, top_k=20, top_p=0.9,
                           sampler="multinomial"),
            SamplingConfig(max_new_tokens=6, do_sample=False)]
    for cfg in cfgs:
        lean = generate_responses(model, tokenizer, PROMPTS, cfg, batch_size=4)
        assert not calls, "the lean loop should have served this call"
        ref = generate_responses(model, tokenizer, PROMPTS, cfg, batch_size=4, lean=False)
        assert calls and [(s.response_ids, s.finish_reason) for s in lean] == [
            (s.response_ids, s.finish_reason) for s in ref]
        calls.clear()
    del model.generate
    plain = generate_responses(model, tokenizer, PROMPTS, GREEDY)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for cfg in (cfgs[0], GREEDY):
        got = generate_responses(lora, tokenizer, PROMPTS, cfg, lean=True)
        want = generate_responses(lora, tokenizer, PROMPTS, cfg, lean=False)
        assert [s.response_ids for s in got] == [s.response_ids for s in want]
    with lora.disable_adapter():
        off = generate_responses(lora, tokenizer, PROMPTS, GREEDY, lean=True)
    assert [s.response_ids for s in off] == [s.response_ids for s in plain]
    assert [s.response_ids for s in got] != [s.response_ids for s in plain]  # the adapters do change the tokens
    reft = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0], intervention="loreft", low_rank_dimension=2))
    with pytest.raises(ValueError, match="ReftModel"):
        generate_responses(reft, tokenizer, PROMPTS, GREEDY, positions="l1", lean=True)


@pytest.mark.parametrize("kwargs, named", [
    ({"positions": "l1"}, "positions='l1'"),
    ({"share_weights": False}, "share_weights=False"),
    ({"intervene_on_generated": True}, "intervene_on_generated=True"),
])
def test_reft_placement_arguments_on_a_model_without_reft_are_refused(tiny_lm, tokenizer, kwargs, named):
    """positions / share_weights / intervene_on_generated only place a ReftModel's interventions: given for another
    model they were read and silently ignored (the samples were the plain model's); now one line names them."""
    model = tiny_lm("llama")
    with pytest.raises(ValueError, match="not a ReftModel, so they would be ignored") as e:
        generate_responses(model, tokenizer, PROMPTS, GREEDY, **kwargs)
    assert named in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert len(generate_responses(model, tokenizer, PROMPTS, GREEDY)) == len(PROMPTS)  # the defaults still run


def test_preallocated_cache_layer_holds_what_dynamic_layer_holds():
    """`PreallocatedLayer` (one buffer, writes in place) returns the keys / values `DynamicLayer` (torch.cat)
    returns: a prefill, row selection, one-token steps past its capacity (it grows), and keys replaced from
    outside (a crop)."""
    from transformers.cache_utils import DynamicLayer

    from alignkit.online.decode import PreallocatedLayer

    g = torch.Generator().manual_seed(0)
    a, b = DynamicLayer(), PreallocatedLayer(capacity=7)
    def kv(n, rows=3):
        return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)

    steps = [kv(5)]
    outs = [layer.update(*steps[0]) for layer in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*outs))
    idx = torch.tensor([0, 0, 2, 1])
    a.batch_select_indices(idx)
    b.batch_select_indices(idx)
    for i in range(4):  # 5 -> 9 positions: past the capacity of 7
        k, v = kv(1, rows=4)
        ka, va = a.update(k, v)
        kb, vb = b.update(k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb) and kb.shape == (4, 2, 6 + i, 4)
    a.keys, a.values = a.keys[:, :, :-2], a.values[:, :, :-2]  # what DynamicLayer.crop does
    b.keys, b.values = b.keys[:, :, :-2], b.values[:, :, :-2]
    k, v = kv(1, rows=4)
    ka, va = a.update(k, v)
    kb, vb = b.update(k, v)
    assert torch.equal(ka, kb) and torch.equal(va, vb) and b.get_seq_length() == 8


def test_lean_path_uses_inference_mode_only_with_plain_parameters(tiny_lm):
    """One process, plain parameters: inference mode; a parameter that is sharded (ZeRO-3 marks its partitioned
    parameters with `ds_id`; FSDP2's are DTensors) keeps the default mode, whose in-place gathers inference mode
    would break."""
    from alignkit.online.decode import inference_context

    model = tiny_lm("llama")
    with inference_context(model):
        assert torch.is_inference_mode_enabled()
    next(model.parameters()).ds_id = 0
    try:
        with inference_context(model):
            assert not torch.is_inference_mode_enabled()
    finally:
        del next(model.parameters()).ds_id


def test_inverse_cdf_sample_draws_the_given_distribution(monkeypatch):
    """`inverse_cdf_sample` against hand-written probabilities: every token's frequency within 5 standard errors
    of its probability over 200 000 draws (unnormalised weights included; a 5 000-token vocabulary, sampled block
    first, with mass in three blocks and on the last token), tokens of probability 0 never drawn,
    the same draws under the same seed; a uniform draw just below 1 still lands on the last token with mass; a
    row of NaN is one error naming the row."""
    from alignkit.online.decode import inverse_cdf_sample

    n = 200_000
    rows = torch.tensor([[0.5, 0.0, 0.25, 0.25, 0.0], [1.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2e-3]])
    want = rows / rows.sum(-1, keepdim=True)
    torch.manual_seed(3)
    got = inverse_cdf_sample(rows.repeat_interleave(n, 0)).view(3, n)
    for r in range(3):
        freq = torch.bincount(got[r], minlength=5).double() / n
        se = (want[r].double() * (1 - want[r].double()) / n).sqrt()
        assert ((freq - want[r].double()).abs() <= 5 * se + 1e-12).all(), (r, freq, want[r])
        assert (freq[want[r] == 0] == 0).all()
    torch.manual_seed(3)
    assert torch.equal(inverse_cdf_sample(rows.repeat_interleave(n, 0)).view(3, n), got)
    # the largest float32 below 1 as the uniform draw: the last token with mass, never the zero tokens after it
    big = torch.zeros(2, 5000)  # above CDF_BLOCK (1 024): a block first, then a token in it
    big[0, [3, 1500, 1501, 4200]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    big[1, 4999] = 1.0  # the last token, in a block padded past the vocabulary
    torch.manual_seed(5)
    m = 40_000  # in chunks of 2 000 rows (a 5 000-wide row each)
    got = torch.cat([inverse_cdf_sample(big.repeat_interleave(1000, 0)).view(2, 1000) for _ in range(m // 1000)], 1)
    freq = torch.bincount(got[0], minlength=5000).double() / m
    want = big[0].double()
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / m).sqrt() + 1e-12).all() and (freq[want == 0] == 0).all()
    assert (got[1] == 4999).all()
    # the largest float32 / float64 below 1 as every uniform draw: the last token with mass, never a zero after it
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full(
        *a, 1 - 2 ** (-53 if k.get("dtype") == torch.float64 else -24), dtype=k.get("dtype")))
    assert inverse_cdf_sample(torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]])).tolist() == [1, 0]
    assert inverse_cdf_sample(big[:1]).tolist() == [4200]
    monkeypatch.undo()
    # bfloat16 probabilities (a model served in bf16) are summed in float32: every one of 1 024 equal tokens is
    # drawn (~29 times each in 30 000 draws; a bf16 running sum rounds many sums onto their predecessor's, and
    # those tokens would never be drawn)
    flat = torch.full((30_000, 1024), 2.0 ** -10, dtype=torch.bfloat16)
    assert (torch.bincount(inverse_cdf_sample(flat), minlength=1024) > 0).all()
    bad = torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])
    with pytest.raises(NonFiniteLogitsError, match="row 1's next-token logits are not finite .sampling"):
        inverse_cdf_sample(bad)


def test_default_sampler_draws_the_models_next_token_distribution(tiny_lm, tokenizer):
    """The lean loop's default sampler (inverse CDF) against the model's own next-token distribution, computed
    independently (one plain forward of the prompt, softmax of the last position's logits, temperature 0.7 and
    top-k 5 applied by hand): 6 000 first tokens, each of the 5 kept tokens within 5 standard errors of its
    probability, nothing outside them. With sampler multinomial the same call gives other draws."""
    model = tiny_lm("llama")
    n = 6000
    cfg = SamplingConfig(num_samples=n, max_new_tokens=1, temperature=0.7, top_k=5, seed=4)
    got = generate_responses(model, tokenizer, PROMPTS[:1], cfg, batch_size=n)
    ids = encode_prompt(PROMPTS[0], tokenizer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double() / 0.7  # (V,)
    top = logits.topk(5)
    want = torch.zeros_like(logits)
    want[top.indices] = torch.softmax(top.values, -1)
    first = torch.tensor([s.response_ids[0] if s.response_ids else tokenizer.eos_token_id for s in got])
    freq = torch.bincount(first, minlength=logits.numel()).double() / n
    se = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all()
    assert freq[want == 0].sum() == 0 and want[top.indices].min() > 0.01  # all 5 kept tokens have mass
    multi = generate_responses(model, tokenizer, PROMPTS[:1], SamplingConfig(
        num_samples=64, max_new_tokens=1, temperature=0.7, top_k=5, seed=4, sampler="multinomial"), batch_size=64)
    assert [s.response_ids for s in multi] != [s.response_ids for s in got[:64]]


def test_sampler_set_where_it_cannot_apply_is_refused(tiny_lm, tokenizer):
    """sampling.sampler=inverse_cdf where the call samples with model.generate (stop strings: when the config is
    made; an option of the model's own generation_config here; a ReftModel in a trainer) and any sampler under
    vLLM: one line each, instead of a setting that is silently unused; an unknown sampler is refused when the
    config is made."""
    from alignkit.online.vllm_generation import sampling_request

    model = tiny_lm("llama")
    with pytest.raises(ValueError, match="sampler='inverse_cdf' with stop strings"):  # when the config is made
        SamplingConfig(max_new_tokens=2, stop=["x"], sampler="inverse_cdf")
    before = model.generation_config.no_repeat_ngram_size
    model.generation_config.no_repeat_ngram_size = 3  # an option only model.generate implements
    try:
        with pytest.raises(ValueError, match="sampling.sampler=inverse_cdf: this policy samples with model.generate"):
            generate_responses(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=2, sampler="inverse_cdf"))
    finally:
        model.generation_config.no_repeat_ngram_size = before
    generate_responses(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=2, stop=["x"]))  # default: fine
    with pytest.raises(ValueError, match="vLLM draws tokens with its own sampler"):
        sampling_request(SamplingConfig(sampler="multinomial"), [2], 0)
    with pytest.raises(ValueError, match="SamplingConfig.sampler must be one of"):
        SamplingConfig(sampler="gumbel")


def test_rows_that_ended_leave_the_batch(tiny_lm, tokenizer, monkeypatch):
    """With the inverse-CDF sampler, rows that hit a stop token leave the decode batch (and their KV cache rows):
    later forwards see fewer rows, and every row's tokens are still its own. top_k=1 makes each draw the argmax,
    so the expected tokens are a naive no-cache greedy loop per prompt cut after its first stop token (stop tokens
    chosen so the rows end at different steps), and the same call with rows kept gives the same tokens."""
    import alignkit.online.decode as decode
    from alignkit.online.generation import end_token_ids

    model = tiny_lm("llama")
    prompts = PROMPTS + ["Once upon a time", "1, 2, 3,", "Translate: cat"]
    greedy = [naive_greedy(model, encode_prompt(p, tokenizer), 8) for p in prompts]
    stops = sorted({greedy[0][1], greedy[1][3]})  # row 0 ends after 2 tokens, row 1 by its 4th
    cfg = SamplingConfig(max_new_tokens=8, top_k=1, stop_token_ids=stops, seed=0)
    ends = end_token_ids(model, tokenizer, cfg)

    def cut(ids):
        hit = next((j for j, t in enumerate(ids) if t in ends), None)
        return ids if hit is None else ids[:hit + 1]

    want = [cut(g) for g in greedy]
    assert len({len(w) for w in want}) > 1 and min(map(len, want)) < 8  # rows do end at different steps
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        got = generate_responses(model, tokenizer, prompts, cfg, batch_size=len(prompts))
        kept_widths, widths[:] = list(widths), []
        monkeypatch.setattr(decode, "DROP_FINISHED", False)
        kept = generate_responses(model, tokenizer, prompts, cfg, batch_size=len(prompts))
    finally:
        hook.remove()
    assert [s.response_ids for s in got] == want == [s.response_ids for s in kept]
    assert min(kept_widths[1:]) < len(prompts) and set(widths[1:]) == {len(prompts)}


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("do_sample", [False, True])
def test_non_finite_logits_stop_generation_naming_the_row(tiny_lm, tokenizer, do_sample, lean):
    """One inf in a weight makes every logit NaN. Greedy decoding picked the first NaN's index (argmax takes NaN as
    the largest value) and wrote those tokens as answers without a word; sampling stopped on a ValueError the CLI
    called 'unexpected'. Both are NonFiniteLogitsError naming the first such row, in the lean loop and in the
    model.generate fallback (lean=False: stop strings, ReFT); finite rows still decode."""
    model = tiny_lm("llama")
    cfg = SamplingConfig(max_new_tokens=4, do_sample=do_sample, temperature=1.0, num_samples=1)
    assert len(generate_responses(model, tokenizer, PROMPTS[:2], cfg, lean=lean)) == 2
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("inf")
    how = "sampling" if do_sample else "greedy"
    with pytest.raises(NonFiniteLogitsError, match=f"row 0's next-token logits are not finite .{how}"):
        generate_responses(model, tokenizer, PROMPTS[:2], cfg, lean=lean)


def test_prompts_cut_to_max_prompt_length_are_warned_about(tiny_lm, tokenizer, caplog):
    """A prompt longer than max_prompt_length keeps its last tokens (its start, e.g. a system message, is lost):
    before, nothing said so (online runs and `alignkit sample` use data.max_prompt_length, 512 by default). Now a
    warning with the count and the first such prompt the first time, INFO on later calls (online runs sample every
    step)."""
    import logging

    model = tiny_lm("llama")
    lengths = [len(encode_prompt(p, tokenizer)) for p in PROMPTS]
    limit = 2  # a limit no other test uses: the warning is once per tokenizer and limit in a process
    long = [i for i, n in enumerate(lengths) if n > limit]
    assert long, "the test needs prompts longer than the limit"
    with caplog.at_level(logging.INFO, logger="alignkit.online.generation"):
        generate_responses(model, tokenizer, PROMPTS, GREEDY, max_prompt_length=limit)
        generate_responses(model, tokenizer, PROMPTS, GREEDY, max_prompt_length=limit)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "max_prompt_length" in r.getMessage()]
    want = (f"{len(long)} of {len(PROMPTS)} prompt(s) are longer than max_prompt_length=2 tokens and keep only their "
            f"last 2 (their start is lost), e.g. prompt[{long[0]}] of {lengths[long[0]]} tokens; raise "
            "max_prompt_length (data.max_prompt_length on the command line) to keep whole prompts")
    assert said == [("WARNING", want), ("INFO", want)]


def test_a_stop_string_of_special_token_text_is_refused_naming_its_id(tiny_lm, tokenizer):
    """Responses are decoded without special tokens, so stop=["<|im_end|>"] never matched the text, while
    model.generate's stop-string criterion (token strings) halted the row on that token: the sample came back
    finish_reason 'length' with the token in response_ids. Refused now, naming the id for stop_token_ids."""
    from alignkit.settings import ConfigError

    model = tiny_lm("llama")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # the policy now answers <|im_end|> first, whatever the prompt
        model.get_output_embeddings().weight[im_end] *= 0
        model.get_output_embeddings().weight[im_end] += 50 * model.get_output_embeddings().weight.abs().max()
    for stop in ("<|im_end|>", "done<|im_end|>"):
        with pytest.raises(ConfigError, match=rf"sampling\.stop: .*special token '<\|im_end\|>' \(id {im_end}\).*"
                                              rf"stop_token_ids=\[{im_end}\]"):
            generate_responses(model, tokenizer, [PROMPTS[1]], SamplingConfig(do_sample=False, max_new_tokens=4,
                                                                              stop=[stop]))
    # the fix the message names: the token ends the row as an end token
    got = generate_responses(model, tokenizer, [PROMPTS[1]], SamplingConfig(do_sample=False, max_new_tokens=4,
                                                                            stop_token_ids=[im_end]))[0]
    assert got.response_ids[-1] == im_end and got.finish_reason == "eos" and "<|im_end|>" not in got.response
