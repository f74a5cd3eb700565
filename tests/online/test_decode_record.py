"""The decode loop's per-token log-probs and entropies (`decode.TokenRecord`, `Sample.decode_stats`) against a full
forward, and online DPO's samples in no pair reading them instead of a no-grad pass of their own.

The tolerance: the recorded values and a full forward apply the same float32 weights to the same tokens at the same
positions; they differ only in how the sums are ordered (a one-token step over the KV cache, or the fused decode step
(`fast_step`, itself checked against the model's forward to 64 ulp of the logits), against one causal forward over the
right-padded rows, whose matmuls and attention block their sums otherwise). Each of the tiny Llama's ~10 rounded
operations per layer adds a few ulp relative to its operands (float32: eps 1.2e-7; values O(1)), so the logits
differ by ~1e-6; log p(y) = z_y - logsumexp(z) moves by at most twice the logits' largest difference, and
H = lse - sum p z by at most (1 + 2 max|z|) times it (|z| <= ~5 here): 1e-4 leaves an order of magnitude to spare,
and a wrong distribution moves them far more (temperature 1 instead of 0.7: log-probs 0.26 apart here;
the top-k one: entropy below log 5 against ~6 here).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import alignkit.online.decode as decode
from alignkit.models.loading import load_model
from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer, recorded_stats
from alignkit.online.generation import Sample, SamplingConfig, generate_responses
from alignkit.online.rollout import samples_batch

from .toy import PROMPTS, digit_fraction, toy_policy

TOL = 1e-4


def full_forward_stats(model, batch, temperature):
    """Per response token: log p(y) and entropy from one forward's logits, with torch's log_softmax (not alignkit's
    chunked head), at `temperature`; -> (logps, entropy, mask) (R, T-1)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent, (batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:]).bool()


@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])  # the fast decode step; the model's own forward
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, None, 1.0), (0.7, 5, 0.9)])
def test_recorded_values_are_a_full_forwards(tiny_dir, tokenizer, sampler, temperature, top_k, top_p):
    """Every response token's recorded log-prob and entropy equal a full forward's within TOL, at the sampling
    temperature (read from the sampler's probabilities where those are the same distribution, else computed) and
    over the whole vocabulary (with top-k 5, the sampling distribution's entropy is at most
    log 5: the recorded one is the policy's, far above it); rows end at different steps (stop tokens: rows leave
    the batch with the inverse-CDF sampler)."""
    model = load_model(tiny_dir("llama")).eval()
    cfg = SamplingConfig(num_samples=3, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, seed=3,
                         sampler=sampler, stop_token_ids=list(range(10, 40)))
    samples = generate_responses(model, tokenizer, PROMPTS, cfg, batch_size=16, token_record=True)
    assert all(s.decode_stats is not None for s in samples)
    assert len({len(s.response_ids) for s in samples}) > 1  # rows ended at different steps
    batch = samples_batch(samples, tokenizer.pad_token_id)
    rows = list(range(len(samples)))
    got = recorded_stats(SimpleNamespace(samples=samples, batch=batch), rows, torch.tensor(rows))
    lp, ent, mask = full_forward_stats(model, batch, temperature)
    assert torch.equal(got.mask, mask)
    assert float((got.logps - lp)[mask].abs().max()) <= TOL
    assert float((got.entropy - ent)[mask].abs().max()) <= TOL
    assert float(ent[mask].min()) > math.log(5) + 1  # the policy's distribution, not top-k's
    assert bool((got.logps[~mask] == 0).all() and (got.entropy[~mask] == 0).all())


def test_nothing_recorded_unless_asked_or_where_the_loop_does_not_sample(tiny_dir, tokenizer):
    """No record by default, with model.generate (lean=False) or greedy; a sample with a record still saves as
    before (no tensors in `to_dict`)."""
    model = load_model(tiny_dir("llama")).eval()
    cfg = SamplingConfig(num_samples=2, max_new_tokens=4, seed=1)
    assert all(s.decode_stats is None for s in generate_responses(model, tokenizer, PROMPTS[:2], cfg))
    assert all(s.decode_stats is None for s in generate_responses(model, tokenizer, PROMPTS[:2], cfg, lean=False,
                                                                    token_record=True))
    greedy = SamplingConfig(num_samples=1, max_new_tokens=4, do_sample=False)
    assert all(s.decode_stats is None for s in generate_responses(model, tokenizer, PROMPTS[:2], greedy,
                                                                    token_record=True))
    s = generate_responses(model, tokenizer, PROMPTS[:1], cfg, token_record=True)[0]
    assert s.decode_stats is not None and "decode_stats" not in s.to_dict()
    assert Sample.from_dict(s.to_dict()) == s


def test_online_dpo_unpaired_samples_run_no_pass_of_their_own(tiny_dir, tokenizer, monkeypatch):
    """4 samples per prompt, best_worst pairs: at least 2 of each prompt's samples are in no pair. Their "kl" /
    "entropy" come from the decode loop: the policy forwards of a step cover only the paired rows (before: a
    no-grad forward over the unpaired ones too), and the step's metrics equal those of the run whose unpaired
    samples take their own pass (`wants_token_record` False) within the tolerance above."""
    runs, rows_seen = [], []
    for record in (True, False):
        trainer = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                                   {"type": "function", "fn": digit_fraction},
                                   OnlineDPOConfig(steps=2, prompts_per_step=2, learning_rate=1e-2, seed=2,
                                                   sampling=SamplingConfig(num_samples=4, max_new_tokens=3)))
        assert trainer.wants_token_record()
        monkeypatch.setattr(trainer, "wants_token_record", lambda r=record: r)
        seen: list[int] = []
        forward = trainer.token_stats
        monkeypatch.setattr(trainer, "token_stats", lambda batch, **kw: (seen.append(len(batch["input_ids"])),
                                                                          forward(batch, **kw))[1])
        runs.append(trainer.train())
        rows_seen.append(sum(seen))
    fast, slow = runs
    pairs = sum(m["pairs"] for m in fast)
    assert pairs == sum(m["pairs"] for m in slow) and pairs > 0
    assert rows_seen[0] == 2 * pairs  # the training forwards' rows only
    assert rows_seen[1] == 2 * 2 * 4  # every sample of both steps: paired rows + their own pass over the rest
    for a, b in zip(fast, slow):
        for key in ("loss", "kl", "kl/sequence_sum", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), key
        assert a["loss"] == b["loss"]  # the training forward is the same: the same losses, bitwise


def test_no_record_with_attention_dropout(tiny_dir, tokenizer):
    """A config's attention_dropout (not an nn.Dropout the trainer turns off) keeps the unpaired pass."""
    policy = toy_policy(tiny_dir("llama"), "lora")
    trainer = OnlineDPOTrainer(policy, tokenizer, PROMPTS, {"type": "function", "fn": digit_fraction},
                               OnlineDPOConfig(steps=1, prompts_per_step=2))
    assert trainer.wants_token_record()
    decode.unwrap_lm(trainer.policy).config.attention_dropout = 0.1
    assert not trainer.wants_token_record()
