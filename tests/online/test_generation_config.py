"""A model folder's generation_config.json, as transformers reads it with from_pretrained, and what each generation
path of alignkit takes from it.

Stop tokens: Llama-3-Instruct-style folders list several `eos_token_id`s (`[<|end_of_text|>, <|eot_id|>]`) while the
tokenizer's eos_token is one of them. Every path stops at, and counts as an end, every id the folder names
(`generation.end_token_ids` is the one source): a generation that runs past `<|eot_id|>` is a run-on answer that
rewards and masks are then computed on."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from alignkit.models.loading import load_model
from alignkit.online.generation import SamplingConfig, end_token_ids, generate_responses

from .test_turn_end import Says


class DistributedDataParallel(torch.nn.Module):
    """Stands for torch's DDP wrapper (alignkit unwraps by type name): `.module` is the model, and attribute reads
    other than submodules / parameters do not reach it."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def folder_with(tiny_dir, tmp_path, **gen) -> str:
    """A copy of the tiny llama folder whose generation_config.json holds `gen` (over what it had)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), folder)
    path = folder / "generation_config.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **gen}))
    return str(folder)


@pytest.fixture
def eot(tokenizer):
    """An id standing for Llama-3's <|eot_id|>: neither the tokenizer's eos nor the chat template's turn end."""
    t = tokenizer("Hello")["input_ids"][-1]
    assert t not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return t


def test_every_path_stops_at_every_eos_id_the_folder_names(tiny_dir, tmp_path, tokenizer, eot):
    from alignkit.online.vllm_generation import generate_with
    from alignkit.serve.engine import default_end_ids

    model = load_model(folder_with(tiny_dir, tmp_path, eos_token_id=[tokenizer.eos_token_id, eot])).eval()
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, eot]  # transformers read the file
    model.lm_head = Says(model.config.vocab_size, eot)
    cfg = SamplingConfig(do_sample=False, max_new_tokens=4)
    for lean in (None, False):  # alignkit's decode loop, transformers' generate
        (s,) = generate_responses(model, tokenizer, ["Hi"], cfg, lean=lean)
        assert (s.response_ids, s.finish_reason) == ([eot], "eos"), lean
    # a parallel wrapper (online training's policy under DDP) does not pass attribute reads on to the model
    wrapped = DistributedDataParallel(model)
    assert eot in end_token_ids(wrapped, tokenizer, cfg, chat=False)
    # vLLM's requests (stop_token_ids) and the finish reasons of what it returns
    seen = {}

    def complete(encoded, requests):
        seen["stop"] = requests[0]["stop_token_ids"]
        return [[[eot, 5, 6]] for _ in encoded]

    (v,) = generate_with(complete, tokenizer, ["Hi"], cfg, eos_source=wrapped)
    assert eot in seen["stop"] and (v.response_ids, v.finish_reason) == ([eot], "eos")
    # serve: alignkit's engine
    assert eot in default_end_ids(SimpleNamespace(model=wrapped, tokenizer=tokenizer), chat=False)


def test_local_chat_and_generation_report_stop_at_the_turn_end(tiny_lm, tokenizer):
    """`LocalChat` (augment / judge with a local model) and `generation_report` called model.generate with the
    model's generation_config EOS only: a chat-formatted answer ran past the template's turn end (<|im_end|>) to
    max_new_tokens (LocalChat then refused it as cut off; the report showed run-on text)."""
    from alignkit.augment.llm import LocalChat
    from alignkit.trainers.evaluation import generation_report

    model = tiny_lm("llama")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in (tokenizer.eos_token_id, model.generation_config.eos_token_id)
    model.lm_head = Says(model.config.vocab_size, im_end)
    got = LocalChat(model, tokenizer, "tiny").chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert got == ""
    seen = []
    real = type(model).generate

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        seen.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    type(model).generate = spy
    try:
        generation_report(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=4,
                          base_model=model)
    finally:
        type(model).generate = real
    assert seen == [1, 1]  # stopped at the turn end (was 4 and 4)


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    """The argmax continuation by full forwards, no cache, no generation config: the policy's own greedy tokens."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def test_folder_sampling_fields_alignkit_sets_itself_are_not_used_on_either_engine(tiny_dir, tmp_path, tokenizer,
                                                                                     caplog):
    """A Qwen / Llama-3-Instruct style generation_config.json (do_sample, temperature, top_p, top_k,
    repetition_penalty): alignkit's settings are passed on every call, so greedy decoding is the policy's argmax on
    the decode loop and on model.generate alike (a repetition penalty of the folder would change it), and the
    fields it does not use are one warning naming the file, once."""
    import logging

    from alignkit.online.generation import encode_prompt, note_generation_config

    folder = folder_with(tiny_dir, tmp_path, do_sample=True, temperature=0.6, top_p=0.9, top_k=20,
                         repetition_penalty=5.0)
    model = load_model(folder).eval()
    cfg = SamplingConfig(do_sample=False, max_new_tokens=16)
    want = naive_greedy(model, encode_prompt("Hello world", tokenizer), 16)  # repeats itself from token 13 on
    assert tokenizer.eos_token_id not in want and len(set(want)) < len(want)
    for lean in (None, False):
        (s,) = generate_responses(model, tokenizer, ["Hello world"], cfg, lean=lean)
        assert s.response_ids == want, lean
    with caplog.at_level(logging.WARNING, logger="alignkit.online.generation"):
        note_generation_config(model, tokenizer, cfg, "generation")
        note_generation_config(model, tokenizer, cfg, "generation")
    said = [r.getMessage() for r in caplog.records if r.name == "alignkit.online.generation"]
    assert said == [f"{folder}/generation_config.json sets do_sample=True, repetition_penalty=5.0, which alignkit does "
                    "not use: the generation settings are passed on every call instead (do_sample=False, "
                    "repetition_penalty=1.0); set them in generation to sample that way"], said


def test_online_training_refuses_folder_options_that_change_the_sampled_distribution(tiny_dir, tmp_path, tokenizer):
    """no_repeat_ngram_size (min_new_tokens, suppress_tokens, ...) in generation_config.json: model.generate applied
    it to an online run's samples on the transformers backend, so they came from another distribution than the
    policy whose log-probs the loss uses, without a word. Now one line when the trainer is built, naming the file
    and the option; a folder whose extra fields only say how generate runs (cache_implementation) builds."""
    from alignkit.online.grpo import GRPOConfig, GRPOTrainer
    from alignkit.settings import ConfigError

    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), report_to="none")
    reward = {"type": "function", "fn": lambda p, r: 0.0}
    folder = folder_with(tiny_dir, tmp_path, no_repeat_ngram_size=3)
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(load_model(folder), tokenizer, ["hi"], reward, cfg)
    assert str(e.value) == (
        f"generation_backend='transformers': {folder}/generation_config.json sets no_repeat_ngram_size=3, which "
        "model.generate would apply to every sample, so the samples would come from another distribution than the "
        f"policy whose log-probs the loss uses; remove it from {folder}/generation_config.json (online training "
        "samples with sampling.* settings only)")
    shutil.rmtree(folder)
    GRPOTrainer(load_model(folder_with(tiny_dir, tmp_path, cache_implementation="dynamic")), tokenizer, ["hi"],
                reward, cfg)


def test_generate_applies_folder_options_on_both_engines_and_says_so(tiny_dir, tmp_path, tokenizer, caplog):
    """Outside training (`alignkit generate` / `sample`) a folder option alignkit's decode loop does not implement
    is applied, as model.generate applies it: the decode loop hands such calls to model.generate, so both give the
    same greedy tokens (suppress_tokens: the policy's first greedy token is never drawn); a warning names the file
    and the option."""
    import logging

    from alignkit.online.generation import encode_prompt, note_generation_config

    plain = load_model(tiny_dir("llama")).eval()
    first = naive_greedy(plain, encode_prompt("Hello world", tokenizer), 1)[0]
    folder = folder_with(tiny_dir, tmp_path, suppress_tokens=[first])
    model = load_model(folder).eval()
    cfg = SamplingConfig(do_sample=False, max_new_tokens=4)
    got = [generate_responses(model, tokenizer, ["Hello world"], cfg, lean=lean)[0].response_ids for lean in (None, False)]
    assert got[0] == got[1] and got[0][0] != first
    with caplog.at_level(logging.WARNING, logger="alignkit.online.generation"):
        note_generation_config(model, tokenizer, cfg, "generation")
    assert [r.getMessage() for r in caplog.records if r.name == "alignkit.online.generation"] == [
        f"{folder}/generation_config.json sets suppress_tokens=[{first}], which model.generate applies to every "
        "response (alignkit's decode loop does not implement it, so these samples use model.generate); remove it "
        f"from {folder}/generation_config.json to sample without it"]


@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])
def test_row_seeded_samples_are_the_same_whatever_the_batch(tiny_lm, tokenizer, sampler):
    """`row_seed` (alignkit generate / sample): each (prompt, sample) row draws from its own generator, so batch
    sizes 1 and 3 (rows of several prompts together, rows leaving the batch as they end) give the same samples;
    with the batch's one generator they differed. A draw is the row's own: another first_prompt, other samples."""
    model = tiny_lm("llama")
    prompts = ["Hello world", "Once upon a time", "1, 2, 3,", "Translate: cat"]
    cfg = SamplingConfig(num_samples=2, max_new_tokens=8, seed=5, sampler=sampler)

    def run(batch_size, **kw):
        return [s.response_ids for s in generate_responses(model, tokenizer, prompts, cfg, batch_size=batch_size, **kw)]

    one = run(1, row_seed=5)
    assert run(3, row_seed=5) == one and run(8, row_seed=5) == one
    assert len({tuple(x) for x in one}) == len(one)  # sampled: every row its own answer
    assert run(3) != run(1)  # one generator per batch: the batch size changes the samples
    assert run(1, row_seed=5, first_prompt=1) != one


class TwoWay(torch.nn.Module):
    """An LM head whose next token is `a` (logit 0.1) or `b` (logit 0): about half and half at temperature 1, always
    `a` under top_k=1."""

    def __init__(self, vocab: int, a: int, b: int):
        super().__init__()
        self.vocab, self.a, self.b = vocab, a, b

    def forward(self, h):
        out = torch.full((*h.shape[:-1], self.vocab), -1e4)
        out[..., self.a], out[..., self.b] = 0.1, 0.0
        return out


def test_local_chat_samples_at_temperature_alone_and_names_the_folder_options(tiny_dir, tmp_path, tokenizer, eot,
                                                                               caplog):
    """`LocalChat` (augment / the LLM judge with a local model) called model.generate with temperature only, so the
    folder's top_k / top_p / repetition_penalty shaped every answer unseen (here top_k=1: always the likelier token).
    Now they are pinned off like every other generation path, named in one warning, and an option model.generate
    still applies (no_repeat_ngram_size) is named in another."""
    from alignkit.augment.llm import AnswerCutOff, LocalChat

    folder = folder_with(tiny_dir, tmp_path, top_k=1, top_p=0.5, repetition_penalty=1.3, no_repeat_ngram_size=4)
    model = load_model(folder).eval()
    model.lm_head = TwoWay(model.config.vocab_size, tokenizer.eos_token_id, eot)
    llm = LocalChat(model, tokenizer, "tiny")
    ends = 0
    with caplog.at_level("WARNING", logger="alignkit.augment.llm"):
        for seed in range(16):  # one token: the end token (a whole, empty answer) or `eot` (cut off at max_tokens)
            try:
                ends += llm.chat([{"role": "user", "content": "Hi"}], max_tokens=1, temperature=1.0, seed=seed) == ""
            except AnswerCutOff:
                pass
    assert 0 < ends < 16  # both tokens drawn: under top_k=1 all 16 answers were the end token
    lines = [r.getMessage() for r in caplog.records if r.name == "alignkit.augment.llm"]
    assert len(lines) == 2, lines  # once each, not per request
    assert f"{folder}/generation_config.json sets " in lines[0] and "does not use" in lines[0]
    assert all(f"{k}=" in lines[0] for k in ("top_k", "top_p", "repetition_penalty"))
    assert "no_repeat_ngram_size=4" in lines[1] and "model.generate applies" in lines[1]
