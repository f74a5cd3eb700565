"""What alignkit relies on in transformers' `generate` (rows G1-G4 and G9 of the table in docs/architecture.md)."""

from __future__ import annotations

import pytest
import torch
import transformers

from alignkit.compat import DependencyMoved, cache_keyword
from alignkit.interventions.editing import CACHE_KEYWORDS
from alignkit.online.generation import SamplingConfig, _generation_kwargs

from .guards import check, guard

TF = "transformers"


def test_generate_hands_the_cache_to_forward_under_a_known_name(tiny_lm):
    """Each decode step's forward gets the KV cache (a `transformers.Cache`) under one of the keywords ReFT looks
    for (`interventions.editing.CACHE_KEYWORDS`), whose `get_seq_length()` is the number of tokens already
    processed; prefill sees an empty one (or none)."""
    where = "alignkit/interventions/editing.py:find_cache/cache_length (ReFT's cross-check of its token count)"
    with guard(TF, "transformers.Cache / DynamicCache are no longer importable from transformers", where):
        from transformers import Cache, DynamicCache

        assert callable(DynamicCache.get_seq_length)
    lm = tiny_lm("llama")
    calls: list[tuple[int, dict[str, int], list[str]]] = []

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        caches = {k: int(v.get_seq_length()) for k, v in kwargs.items() if isinstance(v, Cache)}
        calls.append((ids.shape[1], caches, sorted(kwargs)))

    h = lm.register_forward_pre_hook(pre, with_kwargs=True)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    try:
        with torch.no_grad():
            lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    finally:
        h.remove()
    check(len(calls) == 3, TF, f"generate(max_new_tokens=3) ran {len(calls)} forwards, not 3", where)
    names = {k for _, caches, _ in calls for k in caches}
    check(names and names <= set(CACHE_KEYWORDS), TF,
          f"generate now passes the KV cache under {sorted(names) or 'no Cache-valued keyword'} (known: {CACHE_KEYWORDS})",
          where, f"forward keywords per step: {[kw for *_, kw in calls]}")
    seen = 0
    for step, (n_ids, caches, _) in enumerate(calls):
        if step == 0:
            check(n_ids == 5 and all(v == 0 for v in caches.values()), TF, "the prefill forward is not the whole "
                  "prompt on an empty cache", where, str(calls[0]))
        else:
            check(n_ids == 1 and caches and all(v == seen for v in caches.values()), TF,
                  "a decode step's cache length (Cache.get_seq_length()) is not the number of tokens processed before "
                  "it", where, f"step {step}: {calls[step]}, want {seen}")
        seen += n_ids


def test_generate_returns_prompt_then_new_tokens_with_left_padding(tiny_lm):
    """Callers slice `out[:, prompt_len:]`; a left-padded batch must give each row what it gives alone
    (position ids from the attention mask)."""
    where = "alignkit/online/generation.py:generate_responses, trainers/evaluation.py:_generate"
    lm = tiny_lm("llama")
    rows = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids = torch.tensor([rows[0], [0, 0] + rows[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=mask, **kw)
        alone = [lm.generate(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
                 for r in rows]
    check(torch.equal(out[:, :5], ids), TF, "generate no longer returns the prompt ids before the new tokens", where)
    for i, a in enumerate(alone):
        check(torch.equal(out[i, 5:], a[0, len(rows[i]):]), TF, f"left-padded row {i} generates differently from "
              "the same prompt alone (position ids / padding mask handling moved)", where,
              f"{out[i, 5:].tolist()} vs {a[0, len(rows[i]):].tolist()}")


def test_generation_config_fields_alignkit_sets(tiny_lm, tokenizer):
    """`_generation_kwargs` pins top_k=0 (off), repetition_penalty=1.0, a list of EOS ids and stop_strings (with
    `tokenizer=` passed to generate); a stop string must end the row right after the token that completes it."""
    where = "alignkit/online/generation.py:_generation_kwargs"
    lm = tiny_lm("llama")
    prompt = torch.tensor([tokenizer("The quick brown", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(prompt)
    with torch.no_grad(), guard(TF, "generate with alignkit's GenerationConfig failed", where):
        free = lm.generate(input_ids=prompt, attention_mask=mask, **_generation_kwargs(
            SamplingConfig(max_new_tokens=6, do_sample=False), tokenizer, [tokenizer.eos_token_id]))
        sampled = lm.generate(input_ids=prompt, attention_mask=mask, **_generation_kwargs(
            SamplingConfig(max_new_tokens=2, do_sample=True, top_k=None, temperature=0.7), tokenizer,
            [tokenizer.eos_token_id]))
    check(sampled.shape[1] <= prompt.shape[1] + 2, TF, "sampling with top_k=0 generated too many tokens", where)
    new = free[0, prompt.shape[1]:].tolist()
    # a stop string: the first new token that decodes to a whole word on its own and has not appeared before it
    k, stop = next(((j + 1, tokenizer.decode([t]).strip()) for j, t in enumerate(new)
                    if tokenizer.decode([t]).strip().isalnum()
                    and tokenizer.decode([t]).strip() not in tokenizer.decode(new[:j])), (0, ""))
    if not stop or k >= len(new):
        return  # nothing printable to stop on for this random model; the stop path is tested in tests/online
    with torch.no_grad(), guard(TF, "generate(stop_strings=..., tokenizer=...) failed", where):
        stopped = lm.generate(input_ids=prompt, attention_mask=mask, **_generation_kwargs(
            SamplingConfig(max_new_tokens=6, do_sample=False, stop=[stop]), tokenizer, [tokenizer.eos_token_id]))
    check(stopped.shape[1] - prompt.shape[1] <= k, TF, "GenerationConfig(stop_strings=...) no longer stops "
          "generation at the stop string", where, f"stop {stop!r}: {stopped[0, prompt.shape[1]:].tolist()} vs {new}")
    gc = transformers.GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=0.7, repetition_penalty=1.0)
    with guard(TF, "GenerationConfig(top_k=0, ...) no longer validates", where):
        gc.validate()


def test_generate_fills_unset_fields_from_the_folders_generation_config(tiny_dir, tmp_path, tokenizer):
    """from_pretrained reads generation_config.json into `model.generation_config` (a list of eos ids stays a list);
    `generate(generation_config=...)` takes the model's value for each field the call leaves unset (suppress_tokens:
    the argmax token is never drawn) and the call's own value where it sets one (do_sample=False over the folder's
    True: the argmax tokens). What `end_token_ids`, `check_on_policy_options`, `note_generation_config` and the
    decode loop's `_effective_config` assume."""
    import json
    import shutil

    from alignkit.models.loading import load_model

    where = "alignkit/online/generation.py:end_token_ids/overridden_options, online/decode.py:_effective_config"
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), folder)
    plain = load_model(str(folder)).eval()
    prompt = torch.tensor([tokenizer("The quick brown", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        argmax = [int(plain(input_ids=prompt).logits[0, -1].argmax())]
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text())
    path.write_text(json.dumps({**gen, "eos_token_id": [tokenizer.eos_token_id, 5], "do_sample": True, "top_k": 3,
                                "temperature": 5.0, "suppress_tokens": argmax}))
    lm = load_model(str(folder)).eval()
    check(lm.generation_config.eos_token_id == [tokenizer.eos_token_id, 5], TF, "from_pretrained no longer reads "
          "generation_config.json's eos_token_id list into model.generation_config", where,
          repr(lm.generation_config.eos_token_id))
    call = transformers.GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=[tokenizer.eos_token_id],
                                         pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad(), guard(TF, "generate with a folder's generation_config failed", where):
        got = lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=call)
    with torch.no_grad():
        scores = plain(input_ids=prompt).logits[0, -1]
    scores[argmax[0]] = float("-inf")
    check(got[0, prompt.shape[1]:].tolist() == [int(scores.argmax())], TF, "generate no longer fills the fields a "
          "call leaves unset from the model's generation_config (suppress_tokens), or lets the folder's do_sample "
          "override the call's do_sample=False", where, f"{got[0, prompt.shape[1]:].tolist()} vs argmax {argmax}")


def test_serve_cache_rows_can_be_selected_and_cut(tiny_lm):
    """The serving engine calls the model with `cache=DynamicCache(config=...)`, reads `out.cache`, and edits the
    cache's per-layer `keys` / `values` tensors `(B, kv_heads, T, head_dim)` itself: rows leave by `index_select`
    on dim 0, columns that are padding in every remaining row are cut on dim 2. A decode step on the edited cache
    must equal the same row run alone."""
    where = "alignkit/serve/engine.py:_forward/_prefill/_merge/_drop_finished"
    with guard(TF, "DynamicCache(config=...) failed", where):
        from transformers import DynamicCache
    lm = tiny_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    pos = (torch.arange(5)[None, :] - torch.tensor([[0], [2]])).clamp(min=0)
    kw = cache_keyword(lm)  # `cache` (5.2x) or `past_key_values` (5.19, the vLLM environment)
    with torch.no_grad(), guard(TF, f"forward({kw}=..., use_cache=True, logits_to_keep=1) failed", where):
        cache = DynamicCache(config=lm.config)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
    got = getattr(out, kw, None)
    check(got is not None and got.get_seq_length() == 5 and tuple(out.logits.shape[:2]) == (2, 1), TF,
          f"forward({kw}=DynamicCache) no longer fills the cache it was given and returns it as `out.{kw}`", where,
          f"out keys {list(out.keys())}")
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layers = getattr(got, "layers", None)
    check(layers and all(tuple(getattr(layer, a).shape) == (2, cfg.num_key_value_heads, 5, head_dim)
                         for layer in layers for a in ("keys", "values")), TF,
          "DynamicCache no longer holds per-layer `keys` / `values` tensors of shape (batch, kv_heads, length, "
          "head_dim)", where)
    idx = torch.tensor([1])
    for layer in layers:  # row 0 leaves, then the two all-padding columns are cut
        layer.keys, layer.values = layer.keys.index_select(0, idx)[:, :, 2:], layer.values.index_select(0, idx)[:, :, 2:]
    with torch.no_grad():
        step = lm(input_ids=torch.tensor([[14]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                  position_ids=torch.tensor([[3]]), use_cache=True, logits_to_keep=1, **{kw: got}).logits[0, -1]
        alone = lm(input_ids=torch.tensor([[11, 12, 13, 14]]), use_cache=False).logits[0, -1]
    check(torch.allclose(step, alone, atol=1e-5), TF, "a decode step on a DynamicCache whose rows / columns were "
          "edited in place differs from the row run alone (the cache no longer reads its layers' keys / values?)",
          where, f"max diff {(step - alone).abs().max().item():.3g}")


def test_full_attention_cache_layers_are_dynamic_layers():
    """serve refuses a model whose `DynamicCache(config=...)` has any layer that is not exactly
    `transformers.cache_utils.DynamicLayer` (sliding-window layers drop old tokens, which its merging cannot
    handle): a full-attention model must give only DynamicLayer, a sliding-window one another class."""
    from transformers import DynamicCache, LlamaConfig, Qwen2Config

    where = "alignkit/serve/stack.py:_check_cache"
    with guard(TF, "transformers.cache_utils.DynamicLayer moved", where):
        from transformers.cache_utils import DynamicLayer
    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
    full = [type(layer) for layer in DynamicCache(config=LlamaConfig(**small)).layers]
    check(full and all(t is DynamicLayer for t in full), TF, "a full-attention model's DynamicCache layers are no "
          "longer exactly DynamicLayer (serve would refuse every model)", where, str(full))
    sliding = [type(layer) for layer in DynamicCache(config=Qwen2Config(
        **small, use_sliding_window=True, sliding_window=8, max_window_layers=1)).layers]
    check(any(t is not DynamicLayer for t in sliding), TF, "a sliding-window layer's cache is now a plain "
          "DynamicLayer (serve would merge caches that drop old tokens)", where, str(sliding))


def test_cache_keyword_follows_the_forward_signature(tiny_lm):
    """alignkit passes its own KV caches (shared prompt prefill, the serving engine) under the keyword the model's
    forward names: `cache` on transformers >= 5.24, `past_key_values` before (the vLLM environment's 5.19). A model
    class that names neither is an error, not a cache silently dropped into **kwargs."""
    import inspect

    lm = tiny_lm("llama")
    params = inspect.signature(type(lm).forward).parameters
    want = "cache" if "cache" in params else "past_key_values"
    assert want in params and cache_keyword(lm) == want

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    class Neither(torch.nn.Module):
        def forward(self, input_ids=None, **kwargs):
            return None

    assert cache_keyword(Old()) == "past_key_values"
    try:
        cache_keyword(Neither())
    except DependencyMoved as e:
        assert "Neither.forward takes no KV cache keyword" in str(e)
    else:
        raise AssertionError("a forward without a cache keyword was accepted")


def _lean_cases(tok_eos: int):
    from transformers import GenerationConfig

    base = dict(max_new_tokens=7, use_cache=True, pad_token_id=0, repetition_penalty=1.0, num_beams=1)
    sample = dict(do_sample=True, eos_token_id=[tok_eos])
    return {"sample": GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, **sample, **base),
            "warped": GenerationConfig(temperature=0.7, top_k=9, top_p=0.8, **sample, **base),
            "greedy": GenerationConfig(do_sample=False, eos_token_id=[tok_eos], **base),
            "no eos": GenerationConfig(do_sample=True, temperature=1.3, top_k=0, top_p=1.0, **base)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lean_decode_loop_gives_generates_tokens(tiny_lm, arch):
    """`online.decode.lean_generate` must give the installed `generate`'s tokens under the same torch seed
    (greedy; sampling with and without temperature / top-k / top-p; rows that end at an EOS and get the pad id
    after it; a left-padded batch; a batch without padding; continuing from a shared-prompt KV cache of
    `PreallocatedLayer`s). If this fails, transformers changed its decoding loop (inputs of each forward, the
    logits processors or their order, the sampling op, the finished-row rule): mirror the change in decode.py or
    narrow `lean_unsupported` so that the call falls back to generate."""
    from alignkit.online.decode import lean_generate, lean_unsupported
    from alignkit.online.generation import shared_prompt_cache

    where = "alignkit/online/decode.py:lean_generate (generate_responses' sampling loop)"
    lm = tiny_lm(arch)
    rows = [[5, 6, 7, 8, 9], [11, 12, 13], [5, 6, 7, 8, 9], [21, 22, 23, 24]]
    ids = torch.tensor([[0] * (5 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (5 - len(r)) + [1] * len(r) for r in rows])
    kw = cache_keyword(lm)
    with torch.no_grad():  # an EOS the model emits early: the greedy second token of row 0
        eos = int(lm.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, -1])
    ended = 0
    for name, gc in _lean_cases(eos).items():
        why = lean_unsupported(lm, gc)
        check(why is None, TF, f"the lean loop no longer accepts a plain {name} call ({why}): generation falls back to "
              "the slower generate; if transformers added a default generation option, list it in decode.NEUTRAL "
              "after checking it changes nothing", where)
        for label, (x, m) in {"padded": (ids, mask), "no padding": (ids[[0, 2]], mask[[0, 2]])}.items():
            for shared in (False, True):
                cache = None
                if shared:  # rows 0 and 2 share a prompt: prefill the distinct ones, as generate_responses does
                    uniq = [0, 1, 3] if x.shape[0] == 4 else [0]
                    of_row = torch.tensor([0, 1, 0, 2]) if x.shape[0] == 4 else torch.tensor([0, 0])
                    cache = shared_prompt_cache(lm, x[uniq], m[uniq], of_row, x.shape[1] + 7)
                    ref_cache = shared_prompt_cache(lm, x[uniq], m[uniq], of_row, 0)
                with torch.random.fork_rng():
                    torch.manual_seed(3)
                    want = lm.generate(input_ids=x, attention_mask=m, generation_config=gc,
                                       **({kw: ref_cache} if shared else {}))
                    torch.manual_seed(3)
                    with guard(TF, "lean_generate raised", where):
                        got = lean_generate(lm, x, m, gc, cache=cache)
                check(torch.equal(got, want), TF, f"lean_generate's tokens differ from generate's ({arch}, {name}, "
                      f"{label}, shared prompt cache: {shared})", where, f"{got.tolist()} vs {want.tolist()}")
                ended += int((want[:, x.shape[1]:] == eos).any())
    assert ended, "no case ended a row at the EOS: the finished-row rule was not exercised"


def test_lean_decode_loop_refuses_what_it_does_not_implement(tiny_lm):
    """Options the lean loop does not implement (stop strings, another logits processor, beams, a cache
    implementation), set on the call or on the model's generation_config, make it name them; the caller then
    uses generate."""
    from transformers import GenerationConfig

    from alignkit.online.decode import lean_unsupported

    lm = tiny_lm("llama")
    base = dict(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=[2])
    assert lean_unsupported(lm, GenerationConfig(**base)) is None
    for extra, word in [({"stop_strings": ["x"]}, "stop_strings"), ({"min_p": 0.1}, "min_p"),
                        ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"), ({"num_beams": 2}, "num_beams"),
                        ({"repetition_penalty": 1.1}, "repetition_penalty"), ({"cache_implementation": "static"},
                                                                              "cache_implementation")]:
        why = lean_unsupported(lm, GenerationConfig(**{**base, **extra}))
        assert why is not None and word in why, (extra, why)
    saved = lm.generation_config.suppress_tokens
    lm.generation_config.suppress_tokens = [7]  # the model's own generation_config fills unset options
    try:
        why = lean_unsupported(lm, GenerationConfig(**base))
    finally:
        lm.generation_config.suppress_tokens = saved
    assert why is not None and "suppress_tokens" in why
