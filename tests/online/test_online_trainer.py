"""The online loop's mechanics: metrics JSONL and saved adapters, the reference, KL control, rollout
log-probs vs an independent implementation, failed annotations, weights in the online DPO loss, RLOO, and
PPO's value head (loss drops on a fixed batch, safetensors round trip)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics

import pytest
import torch
import torch.nn.functional as F

from alignkit.adapters import load_adapter, reference_off, unwrap_lm
from alignkit.models.loading import load_model
from alignkit.online.annotators import Annotator
from alignkit.online.judge import JudgeAnnotator
from alignkit.online.dpo import OnlineDPOConfig, OnlineDPOTrainer
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.online.trainer import METRICS_FILE
from alignkit.online.value_head import ValueHead
from alignkit.trainers.logps import completion_logps
from alignkit.trainers.packing import resolve_online_share_prompt

from .toy import PROMPTS, digit_fraction, toy_policy

SAMPLING = SamplingConfig(num_samples=4, max_new_tokens=3)
DIGITS = {"type": "function", "fn": digit_fraction}


def small(cls, **kw):
    return cls(**{"steps": 2, "prompts_per_step": 2, "sampling": SAMPLING, "learning_rate": 1e-2, **kw})


def test_metrics_jsonl_and_saved_adapter(tiny_dir, tokenizer, tmp_path):
    model = toy_policy(tiny_dir("llama"), "lora")
    trainer = GRPOTrainer(model, tokenizer, PROMPTS, DIGITS, small(GRPOConfig), output_dir=tmp_path)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0.0, 1.0]
    for key in ("reward", "reward_std", "kl", "kl/sequence_sum", "kl_coef", "completions/mean_length", "entropy",
                "clip_ratio/region_mean",
                "loss", "function/failures"):
        assert all(key in r for r in rows), key
    assert rows[0]["completions/mean_length"] <= 3 and rows[0]["entropy"] > 0
    # the saved adapter, loaded onto a fresh base, is the trained policy
    base = load_model(tiny_dir("llama"))
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)
    loaded = load_adapter(base, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trainer.policy(input_ids=ids).logits, atol=1e-5)
    assert json.loads((tmp_path / "online_config.json").read_text())["steps"] == 2


@pytest.mark.parametrize("key, value", [("save_steps", 1), ("push_to_hub", True), ("report_to", "tensorboard")])
def test_settings_that_write_into_output_dir_are_refused_without_one(tiny_dir, tokenizer, key, value):
    """save_steps, push_to_hub and report_to act through output_dir; a trainer built without one ran every step and
    wrote no checkpoint, uploaded nothing, logged to no tracker, without a word. Now refused when built; the
    defaults (save_at_end, report_to None) still build without a folder."""
    model = toy_policy(tiny_dir("llama"), "lora")
    with pytest.raises(ValueError, match=re.escape(f"GRPOTrainer: {key}={value!r} writes into (or uploads) output_dir, "
                                                   "and no output_dir was given, so it would be ignored")):
        GRPOTrainer(model, tokenizer, PROMPTS, DIGITS, small(GRPOConfig, **{key: value}))
    GRPOTrainer(model, tokenizer, PROMPTS, DIGITS, small(GRPOConfig, report_to="none"))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_reference_is_the_start_policy_and_adaptive_kl(tiny_dir, tokenizer, kind):
    model = toy_policy(tiny_dir("llama"), kind)
    cfg = small(GRPOConfig, kl_coef=0.1, kl_target=1.0, kl_horizon=100)
    trainer = GRPOTrainer(model, tokenizer, PROMPTS, DIGITS, cfg)
    assert (trainer.ref_model is not None) == (kind == "full")  # frozen copy only for full finetuning
    h = trainer.train()
    assert h[0]["kl/sequence_sum"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0 / the copy: the policy IS the reference
    assert h[1]["kl/sequence_sum"] > 0
    # Ziegler et al.: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon), n = 8 samples
    assert h[1]["kl_coef"] == pytest.approx(0.1 * (1 - 0.2 * 8 / 100))


def test_rollout_logps_match_an_independent_implementation(tiny_dir, tokenizer):
    model = toy_policy(tiny_dir("llama"), "reft+lora")
    trainer = GRPOTrainer(model, tokenizer, PROMPTS, DIGITS, small(GRPOConfig))
    rollout = trainer.score(trainer.generate(PROMPTS[:2], 0))
    with torch.no_grad():
        want, counts = completion_logps(trainer.policy, rollout.batch)  # (B,), (B,)
        with reference_off(trainer.policy):
            want_ref, _ = completion_logps(trainer.policy, rollout.batch)
    assert torch.allclose((rollout.old_logps * rollout.mask).sum(-1), want, atol=1e-5)
    assert torch.allclose((rollout.ref_logps * rollout.mask).sum(-1), want_ref, atol=1e-5)
    assert rollout.mask.sum(-1).tolist() == counts.tolist()
    assert rollout.mask.sum(-1).tolist() == [len(s.response_ids) for s in rollout.samples]
    # before any update the ratio is exactly 1 on a minibatch (rows re-selected and trimmed)
    _, metrics = trainer.policy_loss(trainer.build_batch(rollout), torch.tensor([5, 1, 2]))
    # token means, each with the tokens it is a mean over (run_minibatches weights micro-batches by them)
    tokens = float(rollout.mask[[5, 1, 2]].sum())
    assert metrics["ratio/mean"] == (pytest.approx(1.0, abs=1e-6), tokens)
    assert metrics["clip_ratio/region_mean"] == (0.0, tokens)


def test_failed_annotations_get_weight_zero(tiny_dir, tokenizer):
    calls = []

    def flaky(prompt, response):
        calls.append(response)
        return None if len(calls) % 4 == 1 else float(len(calls) % 3)  # groups [-, 2, 0, 1], [-, 0, 1, 2]

    model = toy_policy(tiny_dir("llama"), "lora")
    trainer = GRPOTrainer(model, tokenizer, PROMPTS, {"type": "function", "fn": flaky}, small(GRPOConfig))
    rollout = trainer.score(trainer.generate(PROMPTS[:2], 0))
    failed = torch.isnan(rollout.scores)
    assert failed.tolist() == [True, False, False, False] * 2
    assert rollout.weights[failed].tolist() == [0.0, 0.0] and (rollout.weights[~failed] == 1).all()
    for g in range(2):  # filled with the group's mean
        assert rollout.rewards[4 * g] == pytest.approx(float(rollout.rewards[4 * g + 1:4 * g + 4].mean()))
    # the advantages are over each group's three scored rewards (statistics module), the failed one's is 0
    for advantage in ("grpo", "rloo"):
        trainer.config = dataclasses.replace(trainer.config, advantage=advantage)
        adv = trainer.advantages(rollout).tolist()
        for g in range(2):
            vals = rollout.rewards[4 * g + 1:4 * g + 4].tolist()
            if advantage == "grpo":
                want = [(v - statistics.mean(vals)) / (statistics.stdev(vals) + 1e-4) for v in vals]
            else:
                want = [v - (sum(vals) - v) / 2 for v in vals]
            assert adv[4 * g:4 * g + 4] == pytest.approx([0.0, *want], abs=1e-5), advantage
    assert rollout.metrics["reward/failed"] == 2.0 and rollout.metrics["function/failures"] == 2.0


def test_online_dpo_loss_is_the_weighted_mean_of_pair_losses(tiny_dir, tokenizer):
    model = toy_policy(tiny_dir("llama"), "lora")
    with torch.no_grad():  # move the policy away from its reference so the pair losses differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    cfg = small(OnlineDPOConfig, beta=0.5, feedback="random_pairs", feedback_kwargs={"pairs_per_prompt": 3},
                reweighters=["margin_linear"])
    trainer = OnlineDPOTrainer(model, tokenizer, PROMPTS, lambda p, r: float(len(r)), cfg)
    pairs = trainer.build_batch(trainer.score(trainer.generate(PROMPTS[:2], 0)))
    P = pairs.chosen.numel()
    assert P >= 2
    rewards = pairs.rollout.rewards
    margins = (rewards[pairs.chosen] - rewards[pairs.rejected]).double()  # chosen is the longer response
    assert (margins > 0).all()
    assert pairs.weights.double().tolist() == pytest.approx((margins / margins.mean()).tolist())
    policy, batch = trainer.policy, pairs.rollout.batch
    with torch.no_grad():
        pi, _ = completion_logps(policy, batch)
        with reference_off(policy):
            ref, _ = completion_logps(policy, batch)
        d = (pi[pairs.chosen] - ref[pairs.chosen]) - (pi[pairs.rejected] - ref[pairs.rejected])
        per_pair = -F.logsigmoid(0.5 * d)  # DPO, by hand
        loss, _ = trainer.pair_loss(pairs, torch.arange(P))
    w = pairs.weights
    assert float(loss) == pytest.approx(float((w * per_pair).sum() / w.sum()), rel=1e-4)
    # the logged kl_coef is the loss's beta (it was OnlineConfig's unread kl_coef, 0.05)
    assert pairs.rollout.metrics["kl_coef"] == 0.5


class LengthJudge(Annotator):
    """A pairwise-only judge: prefers the longer response; pointwise scoring must not be asked for."""

    def annotate(self, prompts, responses, metas=None):
        raise AssertionError("judge_pairs mode must not ask for pointwise scores")

    def prefer_batch(self, prompts, a, b):
        return [None if len(x) == len(y) else (0 if len(x) > len(y) else 1) for x, y in zip(a, b)]


def test_online_dpo_with_judge_pairs(tiny_dir, tokenizer):
    cfg = small(OnlineDPOConfig, feedback="judge_pairs", feedback_kwargs={"pairs_per_prompt": 3})
    trainer = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "reft"), tokenizer, PROMPTS, LengthJudge(), cfg)
    pairs = trainer.build_batch(trainer.score(trainer.generate(PROMPTS[:2], 0)))
    assert pairs.chosen.numel() > 0
    samples = pairs.rollout.samples
    for c, r in zip(pairs.chosen.tolist(), pairs.rejected.tolist()):
        assert len(samples[c].response) > len(samples[r].response)
        assert samples[c].group == samples[r].group
    history = trainer.train()
    assert all(h["pairs"] > 0 and h["reward/failed"] == 0 for h in history)


def test_online_dpo_logs_the_judges_undecided_comparisons(tiny_dir, tokenizer):
    """JudgeAnnotator counted its unparseable pair answers (judge/pair_parse_failures) and nothing logged them: a
    step's comparisons that gave no pair were invisible. Now in the step's row: 2 prompts x 3 pairs = 6 comparisons,
    each a pair or a failure."""
    from .scripted import ScriptedJudge

    def script(text):  # an answer only for some comparisons (by the prompt's length parity)
        return "Winner: A" if len(text) % 2 else "I cannot tell."

    judge = JudgeAnnotator(ScriptedJudge(tokenizer, script), tokenizer)
    cfg = small(OnlineDPOConfig, feedback="judge_pairs", feedback_kwargs={"pairs_per_prompt": 3}, steps=2)
    history = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, judge, cfg).train()
    assert all(h["pairs"] + h["judge/pair_parse_failures"] == 6 for h in history)
    assert any(h["judge/pair_parse_failures"] > 0 for h in history)


@pytest.mark.parametrize("feedback", ["random_pairs", "judge_pairs"])
def test_online_dpo_draws_new_pairs_each_step_reproducibly(tiny_dir, tokenizer, monkeypatch, feedback):
    """random_pairs / judge_pairs drew their pairs (and the judge's A/B order) with seed 0 at every step unless
    feedback_kwargs set one: the same pattern each step. Now the seed is (seed * 100003 + step) (one process):
    the run's seed 7 gives 700021, 700022; feedback_kwargs.seed 3 gives 300009, 300010."""
    import alignkit.online.dpo as dpo

    seen = []

    def spy(mode, *args, **kwargs):
        seen.append(kwargs.get("seed"))
        return build_records(mode, *args, **kwargs)

    build_records = dpo.build_records
    monkeypatch.setattr(dpo, "build_records", spy)
    from .scripted import ScriptedJudge

    annotator = JudgeAnnotator(ScriptedJudge(tokenizer, lambda text: "Winner: A"), tokenizer) \
        if feedback == "judge_pairs" else DIGITS
    for extra, want in (({}, [700021, 700022]), ({"seed": 3}, [300009, 300010])):
        seen.clear()
        cfg = small(OnlineDPOConfig, feedback=feedback, feedback_kwargs=extra, seed=7)
        OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, annotator, cfg).train()
        assert seen == want


def test_a_run_whose_every_response_is_cut_off_says_so(tiny_dir, tokenizer, caplog):
    """Every response of every step reached max_new_tokens (completions/clipped_ratio 1 each step): the run trained
    on cut-off responses without a word. Now one warning at the end of the run, naming the setting. (Precondition
    read off the samples themselves: 1 new token each, none an end token.)"""
    cfg = small(GRPOConfig, sampling=SamplingConfig(num_samples=2, max_new_tokens=1))
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg)
    seen = []
    sample_prompts = trainer.sample_prompts
    trainer.sample_prompts = lambda prompts, seed: seen.extend(sample_prompts(prompts, seed)) or seen[-len(prompts) * 2:]
    with caplog.at_level("WARNING", logger="alignkit.online.trainer"):
        trainer.train()
    assert len(seen) == 8 and all(len(s.response_ids) == 1 and s.response_ids[0] != tokenizer.eos_token_id
                                  for s in seen), "the test needs every response cut off"
    warned = [r.getMessage() for r in caplog.records if "reached sampling.max_new_tokens" in r.getMessage()]
    assert warned == ["every response of this run's 2 step(s) reached sampling.max_new_tokens (1) without an end "
                      "token (completions/clipped_ratio = 1 at every step): the policy learned from cut-off responses, "
                      "and a reward that reads a response's end never saw one; raise sampling.max_new_tokens"]


def test_rloo_trainer_uses_leave_one_out_advantages(tiny_dir, tokenizer):
    with pytest.raises(ValueError, match="num_samples >= 2"):
        RLOOConfig(sampling=SamplingConfig(num_samples=1))
    trainer = RLOOTrainer(toy_policy(tiny_dir("llama"), "reft"), tokenizer, PROMPTS, DIGITS, small(RLOOConfig))
    rollout = trainer.score(trainer.generate(PROMPTS[:2], 0))
    rollout.rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 4.0])
    adv = trainer.build_batch(rollout).advantages
    # r_i - mean of the other three
    assert adv.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, -8 / 3, 8 / 3])
    assert len(trainer.train()) == 2
    with pytest.raises(TypeError, match="RLOOConfig"):
        RLOOTrainer(toy_policy(tiny_dir("llama"), "reft"), tokenizer, PROMPTS, DIGITS, small(OnlineDPOConfig))


def test_ppo_value_loss_drops_on_a_fixed_batch_and_head_round_trips(tiny_dir, tokenizer, tmp_path):
    model = toy_policy(tiny_dir("llama"), "reft")
    cfg = small(PPOConfig, learning_rate=3e-2, epochs_per_step=1, kl_coef=0.05)
    trainer = PPOTrainer(model, tokenizer, PROMPTS, DIGITS, cfg, output_dir=tmp_path)
    rollout = trainer.score(trainer.generate(PROMPTS[:2], 0))
    rollout.rewards = torch.linspace(-1, 1, 8)  # spread returns the value head can fit
    pb = trainer.build_batch(rollout)
    assert torch.equal(pb.old_values, torch.zeros_like(pb.old_values))  # zero-initialised head
    m = rollout.mask.float()

    def value_mse() -> float:
        with torch.no_grad():
            v = trainer.value_head(trainer.token_stats(rollout.batch, hidden=True).hidden)
        return float((((v - pb.returns) * m) ** 2).sum() / m.sum())

    first = value_mse()
    for _ in range(15):
        pb.old_values = pb.old_values.detach()
        trainer.optimise(pb)
    assert value_mse() < 0.7 * first
    trainer.save(tmp_path)
    head = ValueHead.load(tmp_path)
    assert torch.equal(head.linear.weight, trainer.value_head.linear.weight.detach())


def test_ppo_whitening_is_over_the_scored_samples(tiny_dir, tokenizer):
    """A failed annotation (NaN score, weight 0) used to enter PPO's advantage whitening with its filled-in reward.
    No KL, a zero-initialised value head, gamma = lam = 1: each token's advantage before whitening is its row's
    reward, so the whitened ones are the statistics module's z-scores over the scored rows' tokens."""
    cfg = small(PPOConfig, kl_coef=0.0, gamma=1.0, lam=1.0)
    trainer = PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg)
    rollout = trainer.score(trainer.generate(PROMPTS[:2], 0))
    rollout.scores[[0, 5]] = float("nan")
    rollout.rewards = torch.tensor([0.0, 1.0, 2.0, 4.0, 0.5, 1.5, -1.0, 3.0])  # 0.0, 1.5: filled-in values
    adv = trainer.build_batch(rollout).advantages
    lengths = rollout.mask.sum(-1).tolist()
    scored = [i for i in range(8) if i not in (0, 5)]
    tokens = [float(rollout.rewards[i]) for i in scored for _ in range(int(lengths[i]))]
    mu, sd = statistics.mean(tokens), statistics.stdev(tokens)
    for i in range(8):
        want = [(float(rollout.rewards[i]) - mu) / sd if i in scored else 0.0] * int(lengths[i])
        assert adv[i][rollout.mask[i]].tolist() == pytest.approx(want, abs=1e-5), i


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_metric_uses_the_chosen_estimator(tiny_dir, tokenizer, estimator):
    # a LoReFT adapter is not the identity at init, so the policy already differs from its reference
    # k1 has no KL penalty in GRPO's loss (refused with kl_coef > 0): its logged KL with the reference asked for
    coef = 0.0 if estimator == "k1" else 0.2
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "reft"), tokenizer, PROMPTS, DIGITS,
                          small(GRPOConfig, kl_estimator=estimator, kl_coef=coef, reference="adapter_off"))
    r = trainer.score(trainer.generate(PROMPTS[:2], 0))
    per_seq, per_token = [], []
    for lp, rp, m in zip(r.old_logps.tolist(), r.ref_logps.tolist(), r.mask.tolist()):
        total = 0.0
        for a, b, keep in zip(lp, rp, m):
            if keep:
                log_r = b - a  # log pi_ref / pi_theta (Schulman 2020)
                per_token.append({"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": math.exp(log_r) - 1 - log_r}[estimator])
                total += per_token[-1]
        per_seq.append(total)
    assert r.metrics["kl/sequence_sum"] == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-4, abs=1e-7)
    assert r.metrics["kl"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-4, abs=1e-7)  # TRL's: per token
    assert abs(r.metrics["kl"]) > 1e-4
    # and the loss carries beta * KL: with zero advantages the loss is 0.2 * mean_i mean_t KL_t
    r.rewards = torch.zeros_like(r.rewards)
    with torch.no_grad():
        loss, _ = trainer.policy_loss(trainer.build_batch(r), torch.arange(len(r.samples)))
    lens = r.mask.sum(-1).tolist()
    assert float(loss) == pytest.approx(coef * sum(s / n for s, n in zip(per_seq, lens)) / len(lens), rel=1e-4,
                                        abs=1e-9)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_sum"])
def test_sample_weights_give_a_weighted_mean_under_both_aggregations(tiny_dir, tokenizer, aggregation):
    """GRPO's "token_sum" normaliser counted the tokens of the samples with weight > 0, whatever their weight, so
    prompt records of weight 0.5 halved the loss (and the update) while "sequence_mean", PPO and online DPO divide
    by the weights. Now both aggregations are weighted means: sum_i w_i L_i / sum_i w_i n_i (n_i: tokens of
    sample i for token_sum, 1 for sequence_mean), checked by hand from the per-sample losses."""
    from alignkit.losses import clipped_policy_loss

    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                          small(GRPOConfig, aggregation=aggregation, share_prompt=False))
    rollout = trainer.score(trainer.generate(PROMPTS[:2], 0), policy_pass=True)
    rollout.rewards = torch.arange(8, dtype=torch.float32)  # a spread, so the advantages are not 0
    pb = trainer.build_batch(rollout)
    idx = torch.arange(8)
    with torch.no_grad():
        ones, _ = trainer.policy_loss(pb, idx)
        rollout.weights = torch.full((8,), 0.5)
        halves, _ = trainer.policy_loss(pb, idx)
        rollout.weights = torch.tensor([2.0, 0.0, 1.0, 1.0, 0.5, 1.0, 3.0, 1.0])
        weighted, _ = trainer.policy_loss(pb, idx)
        stats = trainer.token_stats(rollout.batch)
        per = clipped_policy_loss(stats.logps, rollout.old_logps[:, :stats.logps.shape[1]], pb.advantages, stats.mask,
                                  ref_logps=rollout.ref_logps[:, :stats.logps.shape[1]], kl_coef=trainer.kl_ctl.value,
                                  aggregation=aggregation).losses.tolist()
    n = stats.mask.sum(-1).tolist() if aggregation == "token_sum" else [1.0] * 8
    w = rollout.weights.tolist()
    assert float(weighted) == pytest.approx(sum(a * b for a, b in zip(w, per)) / sum(a * b for a, b in zip(w, n)),
                                            rel=1e-5)
    assert float(halves) == pytest.approx(float(ones), rel=1e-6)



@pytest.mark.parametrize("cls, config", [(GRPOTrainer, GRPOConfig), (PPOTrainer, PPOConfig),
                                         (OnlineDPOTrainer, OnlineDPOConfig)])
def test_prompts_all_weighted_0_are_refused_before_the_run(tiny_dir, tokenizer, tmp_path, cls, config):
    """Prompt records whose every weight is 0 gave each sample (and pair) loss weight 0: loss 0 and grad_norm 0 at every
    step, and the model saved unchanged, exit 0. Now the trainer refuses them when built, before the run folder; one
    record with a weight > 0 trains."""
    from alignkit.data.records import DataError, PromptRecord

    zero = [PromptRecord(p, weight=0.0, id=f"p{i}") for i, p in enumerate(PROMPTS)]
    cfg = small(config, **({"epochs_per_step": 1} if config is PPOConfig else {}))
    with pytest.raises(DataError, match=re.escape(
            f"{cls.__name__}: every one of the {len(PROMPTS)} training example(s) has weight 0, so every loss term is "
            "0 and nothing would be learned; give examples a weight > 0")):
        cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, zero, DIGITS, cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    zero[1] = PromptRecord(PROMPTS[1], weight=0.5, id="p1")
    assert len(cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, zero, DIGITS, cfg).prompts) == len(PROMPTS)

@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_sum"])
def test_gradient_accumulation_gives_the_minibatch_update(tiny_dir, tokenizer, aggregation):
    """Minibatches of 4 of the step's 8 samples, split into 3 micro-batches (2+1+1 samples, one backward each),
    give the parameters of one backward per minibatch: every micro-batch is divided by its minibatch's
    normaliser (weights, or tokens for token_sum), not its own. (SGD: Adam would amplify float noise.) Padded rows
    (share_prompt=False): shared-prompt rows group a micro-batch's samples differently from its minibatch's, which
    changes float rounding (~1e-5 here at lr 2, parameters moving by ~15), not the normalisers tested here."""
    def run(accumulation: int) -> dict[str, torch.Tensor]:
        cfg = small(GRPOConfig, steps=2, mini_batch_size=4, gradient_accumulation_steps=accumulation,
                    aggregation=aggregation, max_grad_norm=None, share_prompt=False)
        trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        trainer.optimizer = torch.optim.SGD(params, lr=2.0)
        losses = [m["loss"] for m in trainer.train()]
        return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}, losses

    (one, l1), (three, l3) = run(1), run(3)
    start = {n: p for n, p in toy_policy(tiny_dir("llama"), "lora").named_parameters() if p.requires_grad}
    assert any(not torch.allclose(one[n], start[n]) for n in one), "training changed nothing"
    for n in one:
        torch.testing.assert_close(three[n], one[n], rtol=1e-4, atol=2e-5)
    assert l3 == pytest.approx(l1, rel=1e-5, abs=1e-8)


def test_logged_metrics_are_means_over_items_and_tokens_across_ragged_micro_and_minibatches():
    """5 items in minibatches of 3 then 2, each split into 2 micro-batches (2+1, then 1+1): a plain average of
    micro-batch means (then of minibatch means) counted a short micro-batch's items more. Every logged value is
    checked against the mean over all items (or tokens) computed here by hand, whatever the shuffled order."""
    from types import SimpleNamespace

    from alignkit.online.updates import MinibatchUpdates

    value = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])  # a per-item metric: its mean over the 5 items is 2
    tokens = torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])  # a per-token metric: item i has tokens[i] tokens of value[i]
    weight = torch.nn.Parameter(torch.ones(()))

    class Accelerator:
        device = torch.device("cpu")

        def no_sync(self, module):
            import contextlib
            return contextlib.nullcontext()

        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, params, max_norm):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

    class Harness(MinibatchUpdates):
        config = SimpleNamespace(mini_batch_size=3, gradient_accumulation_steps=2, epochs_per_step=1,
                                 max_grad_norm=None)
        model, extra_modules, accelerator, world = torch.nn.Module(), [], Accelerator(), 1
        optimizer = torch.optim.SGD([weight], lr=0.0)

        def __init__(self, seed):
            self.rng = torch.Generator().manual_seed(seed)
            self.sizes = []

        def gather(self, t):
            return t

        def reduce_sum(self, t):
            return t

        def loss(self, idx, normalizer):
            self.sizes.append(idx.numel())
            v, n = value[idx], tokens[idx]
            loss = weight * v.sum() / normalizer  # a loss whose minibatch value is its items' mean
            return loss, {"per_item": float(v.mean()), "per_token": (float((v * n).sum() / n.sum()), float(n.sum()))}

    for seed in range(4):  # different shuffles put the 10 in different micro-batches
        h = Harness(seed)
        got = h.run_minibatches(5, h.loss, lambda idx: torch.tensor(float(idx.numel())))
        assert h.sizes == [2, 1, 1, 1]
        assert got["per_item"] == pytest.approx(2.0)  # (0 + 0 + 0 + 0 + 10) / 5
        assert got["per_token"] == pytest.approx(60.0 / 10.0)  # 10 x 6 tokens over 1 + 1 + 1 + 1 + 6 tokens
        assert got["loss"] == pytest.approx(2.0)  # the minibatch losses weighted by their 3 and 2 items


def test_prompts_per_step_must_split_over_processes(tiny_dir, tokenizer):
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                          small(GRPOConfig, prompts_per_step=4))
    assert (trainer.world, trainer.rank) == (1, 0)
    assert trainer.local_prompts([1, 2, 3, 4]) == [1, 2, 3, 4]
    trainer.world, trainer.rank = 2, 1  # what rank 1 of 2 keeps, and its seed
    assert trainer.local_prompts([1, 2, 3, 4]) == [3, 4]
    assert trainer.sampling_seed(5) == (0 * 100_003 + 5) * 2 + 1


@pytest.mark.parametrize("cls,cfg_cls", [(GRPOTrainer, GRPOConfig), (OnlineDPOTrainer, OnlineDPOConfig)])
def test_skipping_the_rollout_policy_pass_changes_no_result(tiny_dir, tokenizer, cls, cfg_cls):
    """One update per step: the rollout's no-grad policy pass is skipped (pi_old = the training forward,
    detached; online DPO never reads pi_old), and the steps' losses and kl / entropy metrics equal those of a
    run that keeps the pass."""

    class KeepsPass(cls):
        def reuses_training_pass(self):
            return False

    runs = []
    for trainer_cls in (cls, KeepsPass):  # seed 2: step 0's samples differ in reward, so the policy moves
        trainer = trainer_cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                              small(cfg_cls, seed=2))
        runs.append(trainer.train())
    assert cls.reuses_training_pass(trainer) and not KeepsPass.reuses_training_pass(trainer)
    fast, slow = runs
    for a, b in zip(fast, slow):
        for key in ("loss", "kl", "kl/sequence_sum", "entropy", "reward", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert slow[1]["kl"] > 0  # the policy moved: the comparison can fail


@pytest.mark.parametrize("cls,cfg_cls", [(GRPOTrainer, GRPOConfig), (OnlineDPOTrainer, OnlineDPOConfig)])
def test_share_prompt_changes_no_result(tiny_dir, tokenizer, cls, cfg_cls):
    """`share_prompt=True` runs each prompt's samples as one row (the prompt once) in the reference and training
    forwards: the same losses, kl, entropy and rewards as padded rows (transformers' own sdpa over one row per
    sample), step by step, while the policy moves. The default (None) is that layout here (CPU, sdpa llama)."""
    runs = []
    for share in (False, True, None):
        trainer = cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                      small(cfg_cls, share_prompt=share, seed=2))  # seed 2: step 0's rewards differ
        assert trainer.share_prompt is (share is not False)
        runs.append(trainer.train())
    padded, shared, default = runs
    for a, b, d in zip(padded, shared, default):
        for key in ("loss", "kl", "kl/sequence_sum", "entropy", "reward", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
            assert d[key] == b[key], key  # the default is exactly the shared layout
    assert padded[1]["kl"] > 0  # the policy moved: the comparison can fail


def test_share_prompt_default_only_where_it_runs_as_varlen_rows(tiny_dir, tokenizer):
    """share_prompt=None is on for a CPU run of an sdpa model of a tested architecture, full or LoRA, and off for
    eager attention, a ReFT policy or an accelerator; True / False are kept as given."""
    def resolved(model, share=None):
        return GRPOTrainer(model, tokenizer, PROMPTS, DIGITS, small(GRPOConfig, share_prompt=share)).share_prompt

    assert resolved(toy_policy(tiny_dir("llama"), "lora")) is True
    assert resolved(load_model(tiny_dir("llama"))) is True  # full finetuning (a frozen copy as reference)
    assert resolved(toy_policy(tiny_dir("llama"), "lora"), False) is False
    assert resolved(toy_policy(tiny_dir("llama"), "reft")) is False  # ReFT places its positions in padded rows
    eager = load_model(tiny_dir("llama"), attn_implementation="eager")
    assert resolved(eager) is False and resolved(eager, True) is True
    sdpa = load_model(tiny_dir("llama"))
    assert resolve_online_share_prompt(None, sdpa, "cuda") is False  # measured on CPU only
    assert resolve_online_share_prompt(None, sdpa, "cpu") is True


def test_shared_rows_give_each_rows_own_logps(tiny_dir):
    """token_stats over rows grouped by prompt (`share_groups`) against each row run alone, full logits."""
    from alignkit.online.rollout import rows_batch, token_stats

    lm = load_model(tiny_dir("llama")).eval()
    rows = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10, 11, 12]), ([5, 6, 7], [8]), ([13, 14], [15, 16])]
    batch = rows_batch(rows, pad_id=0)
    batch["share_groups"] = torch.tensor([0, 0, 0, 1])
    with torch.no_grad():
        stats = token_stats(lm, batch, entropy=True)
        for i, (p, r) in enumerate(rows):
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(lm(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            got = stats.logps[i][stats.mask[i]]
            torch.testing.assert_close(got, lp[len(p) - 1:], rtol=1e-5, atol=1e-5)


def test_inverse_cdf_sampler_with_a_reft_policy_is_refused_before_the_run(tiny_dir, tokenizer, tmp_path):
    """A ReftModel samples with its own generate (torch.multinomial): sampling.sampler=inverse_cdf is refused when
    the trainer is made, before anything is written; the default (None) and multinomial are accepted."""
    out = tmp_path / "run"
    cfg = small(GRPOConfig, sampling=SamplingConfig(num_samples=2, max_new_tokens=3, sampler="inverse_cdf"))
    with pytest.raises(ValueError, match="sampling.sampler=inverse_cdf: this policy samples with model.generate"):
        GRPOTrainer(toy_policy(tiny_dir("llama"), "reft"), tokenizer, PROMPTS, DIGITS, cfg, output_dir=out)
    assert not out.exists()
    for sampler in (None, "multinomial"):
        GRPOTrainer(toy_policy(tiny_dir("llama"), "reft"), tokenizer, PROMPTS, DIGITS,
                    small(GRPOConfig, sampling=SamplingConfig(num_samples=2, max_new_tokens=3, sampler=sampler)))


def test_policy_is_unwrapped_once_per_model_object(tiny_dir, tokenizer):
    """`OnlineTrainer.policy` keeps accelerate's unwrapped model per `self.model` object (unwrap_model re-reads
    package metadata on every call): the same object while the model is the same, the new model's after
    `self.model` is replaced, never a stale one."""
    trainer = GRPOTrainer(toy_policy(tiny_dir("llama"), "full"), tokenizer, PROMPTS, DIGITS, small(GRPOConfig))
    calls = []
    real = trainer.accelerator.unwrap_model
    trainer.accelerator.unwrap_model = lambda m, *a, **k: calls.append(m) or real(m, *a, **k)
    first = trainer.policy
    assert trainer.policy is first and first is trainer.accelerator.unwrap_model(trainer.model) and len(calls) == 2
    other = toy_policy(tiny_dir("llama"), "full")
    trainer.model = torch.nn.DataParallel(other)  # a wrapper accelerate unwraps
    assert trainer.policy is other and trainer.policy is other and len(calls) == 3


def forward_counter(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# (trainer, config, settings whose loss reads no reference, settings whose loss reads one)
NO_REFERENCE = [(GRPOTrainer, GRPOConfig, {"kl_coef": 0.0}, {"kl_coef": 0.05}),
                (RLOOTrainer, RLOOConfig, {"kl_coef": 0.0}, {"kl_coef": 0.05}),
                (PPOTrainer, PPOConfig, {"kl_coef": 0.0}, {"kl_coef": 0.05}),
                # online DPO's reference-free losses (REFERENCE_FREE): its loss never reads the reference
                (OnlineDPOTrainer, OnlineDPOConfig, {"loss_type": "simpo"}, {"loss_type": "sigmoid"}),
                (OnlineDPOTrainer, OnlineDPOConfig, {"loss_type": "orpo"}, {"loss_type": ["sigmoid", "orpo"]}),
                (OnlineDPOTrainer, OnlineDPOConfig, {"loss_type": "cpo"}, {"loss_type": "sigmoid"})]


@pytest.mark.parametrize("cls,config,free,reads", NO_REFERENCE)
def test_a_loss_without_reference_builds_none(tiny_dir, tokenizer, cls, config, free, reads):
    """kl_coef 0 (fixed) multiplies the KL term by 0, and online DPO's reference-free losses (simpo, orpo, cpo)
    never read the reference, yet the loop built the reference (a full copy of a fully finetuned policy) and ran
    its forward every step only to log the KL; TRL's beta 0 loads none. Now no reference is built or run, the "kl"
    metrics are absent, and the losses equal a run that asked for the reference (reference="adapter_off": the old
    path) exactly; a loss that reads it still builds and logs it."""
    full = cls(toy_policy(tiny_dir("llama"), "full"), tokenizer, PROMPTS, DIGITS, small(config, **free))
    assert full.reference_mode == "none" and full.ref_model is None
    kept = cls(toy_policy(tiny_dir("llama"), "full"), tokenizer, PROMPTS, DIGITS, small(config, **reads))
    assert kept.reference_mode == "copy" and kept.ref_model is not None
    ref_calls = forward_counter(kept.ref_model)
    assert "kl" in kept.train()[0] and ref_calls[0] == 2  # one reference forward per step

    runs = {}
    for reference in ("auto", "adapter_off"):
        trainer = cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                      small(config, **free, reference=reference, progress_bar=False))
        calls = forward_counter(unwrap_lm(trainer.policy))
        runs[reference] = (trainer.train(), calls[0], trainer.reference_mode)
    (h0, n0, mode0), (h1, n1, mode1) = runs["auto"], runs["adapter_off"]
    assert (mode0, mode1) == ("none", "adapter_off")
    assert n1 - n0 == 2  # the reference forward (adapter off) of each of the 2 steps, and nothing else
    assert not any(k.startswith("kl") and k != "kl_coef" for row in h0 for k in row)
    assert all("kl" in row and "kl/sequence_sum" in row for row in h1)
    for a, b in zip(h0, h1):
        assert set(a) == set(b) - {"kl", "kl/sequence_sum", "kl/token"}
        for key in ("loss", "reward", "entropy", "policy_loss", "value_loss", "rewards/margins", "logps/chosen"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("cls,config,free,reads", NO_REFERENCE)
def test_a_kl_estimator_without_reference_is_refused(tiny_dir, tokenizer, cls, config, free, reads):
    """method.kl_estimator picks the estimator of the logged KL; where no reference is built (a fixed kl_coef 0, a
    reference-free loss) no KL is computed, and a kl_estimator set away from its default was ignored without a
    word. Now refused in one line naming the key and what to do; with a reference asked for it is read."""
    from alignkit.settings import ConfigError

    other = "k2" if config.__dataclass_fields__["kl_estimator"].default != "k2" else "k1"
    with pytest.raises(ConfigError, match=rf"^method.kl_estimator: '{other}' is the estimator of the logged KL to "
                                          r"the reference, and no reference is built \(.*\), so it would be ignored; "
                                          r"set method.reference to adapter_off or copy"):
        cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, small(config, **free, kl_estimator=other))
    kept = cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
               small(config, **free, kl_estimator=other, reference="adapter_off"))
    assert kept.reference_mode == "adapter_off"
    cls(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, small(config, **reads, kl_estimator=other))


def test_trackers_project_is_the_run_folder(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """accelerate names each tracker's project (W&B's project, MLflow's experiment, ...) by init_trackers'
    project_name, and the loop passed "tensorboard": a W&B run landed in a project called "tensorboard". Now the
    run folder's name; TensorBoard's events stay in <run>/tensorboard."""
    from accelerate import Accelerator

    seen = []
    init = Accelerator.init_trackers
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, *a, **kw: (seen.append(name),
                                                                                    init(self, name, *a, **kw)))
    out = tmp_path / "my-run"
    GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                small(GRPOConfig, steps=1, report_to="tensorboard", progress_bar=False), output_dir=out).train()
    assert seen == ["my-run"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) and not (out / "my-run").exists()


# online DPO's loss_type -> the logged kl_coef: the beta the loss applies, or none where no loss reads beta
# (PreferenceObjective.BETA_UNREAD: orpo weighs by orpo_lambda, slic by slic_lambda, sft by nothing)
KL_COEF_LOGGED = [("sigmoid", 0.3), ("simpo", 0.3), (["sigmoid", "orpo"], 0.3), ("orpo", None), ("slic", None),
                  (["orpo", "sft"], None)]


@pytest.mark.parametrize("loss_type,logged", KL_COEF_LOGGED)
def test_online_dpo_logs_the_kl_coef_its_loss_applies(tiny_dir, tokenizer, loss_type, logged):
    """Online DPO logged kl_coef = beta for every loss_type, also for losses that never read beta (orpo, slic, sft):
    a logged figure that was not what was applied. Now the rows carry kl_coef only where a loss reads beta (a beta
    other than the default beside such losses alone is refused: test_guards.py::
    test_a_loss_parameter_no_loss_of_the_trainer_reads_is_refused)."""
    beta = {} if logged is None else {"beta": 0.3}
    trainer = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                               small(OnlineDPOConfig, steps=1, loss_type=loss_type, progress_bar=False, **beta))
    (row,) = trainer.train()
    assert row.get("kl_coef") == logged


@pytest.mark.parametrize("config, keys, most, said", [
    # minibatches of 4 of the step's 8 samples (2 prompts x 4) split into 6 micro-batches: 2 empty on every update
    (GRPOConfig, {"mini_batch_size": 4, "gradient_accumulation_steps": 6}, 4,
     "gradient_accumulation_steps: 6 splits each minibatch into 6 micro-batches, and a minibatch holds at most 4 "
     "item(s) (mini_batch_size), so at least 2 of them would be empty zero-weight passes on every update (the gradient "
     "is the same); set gradient_accumulation_steps to 4 or less"),
    # online DPO, best_worst: one pair per prompt, 2 a step
    (OnlineDPOConfig, {"gradient_accumulation_steps": 3}, 2,
     "gradient_accumulation_steps: 3 splits each minibatch into 3 micro-batches, and a minibatch holds at most 2 "
     "pair(s) (prompts_per_step 2 x 1 for feedback best_worst), so at least 1 of them"),
])
def test_more_accumulation_steps_than_the_minibatch_has_items_is_refused(config, keys, most, said):
    """The CLI refused this from its config; a library caller got a warning at the first update, after the run
    folder was written. Now the library config refuses it (the same check as the CLI's) before a trainer exists;
    as many micro-batches as items still build."""
    with pytest.raises(ValueError, match=re.escape(said)):
        small(config, **keys)
    assert small(config, **{**keys, "gradient_accumulation_steps": most}).gradient_accumulation_steps == most


def test_more_accumulation_steps_than_a_step_has_pairs_warns_once(tiny_dir, tokenizer, caplog):
    """The config allows 4 micro-batches for 4 prompts' best_worst pairs, and one prompt's samples always tie (no
    pair): each update's minibatch holds 3 pairs, so one micro-batch is an empty zero-weight pass. What the config
    cannot know is warned about once, at the first update."""
    def reward(prompt, response):
        return 0.0 if prompt == PROMPTS[0] else sum(ord(c) * (i + 1) for i, c in enumerate(response)) % 997 / 997

    cfg = small(OnlineDPOConfig, prompts_per_step=4, gradient_accumulation_steps=4, progress_bar=False)
    trainer = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                               {"type": "function", "fn": reward}, cfg)
    with caplog.at_level("WARNING", logger="alignkit"):
        history = trainer.train()
    assert [h["pairs"] for h in history] == [3.0, 3.0]
    warned = [r.getMessage() for r in caplog.records if "gradient_accumulation_steps" in r.getMessage()]
    assert warned == ["gradient_accumulation_steps (train.gradient_accumulation_steps) is 4, and this process's "
                      "minibatch holds 3 item(s): 1 micro-batch(es) are empty zero-weight passes on every update (the "
                      "gradient is the same); lower it to 3"], warned


@pytest.mark.parametrize("config, key, value, extra", [
    (GRPOConfig, "clip_eps", 0.3, {}),
    (RLOOConfig, "dual_clip", 3.0, {}),
    (PPOConfig, "cliprange_value", 0.1, {"epochs_per_step": 1}),  # PPO's default is 4 epochs
])
def test_clip_settings_that_cannot_act_are_refused_by_the_library_config(config, key, value, extra):
    """One update per generation step: the policy (and PPO's value head) is still the one that sampled, so a clip
    never acts. The CLI refused it from its config; GRPOConfig(clip_eps=0.3) built in Python trained as with the
    default, without a word. Now the library config refuses it with the same check; several updates still build."""
    with pytest.raises(ValueError, match=re.escape(
            f"{key}: {value!r} ") + r".*one update per generation step \(epochs_per_step=1, mini_batch_size None "
            r"\(the whole step\)\) the policy is still the one that sampled, so it would never act; remove it, or "
            r"make several updates per step: epochs_per_step >= 2 or mini_batch_size < 8"):
        small(config, **{key: value, **extra})
    assert getattr(small(config, **{key: value, **extra, "epochs_per_step": 2}), key) == value
    assert getattr(small(config, **{key: value, **extra, "mini_batch_size": 4}), key) == value


@pytest.mark.parametrize("loss_type", [["sigmoid", "sft"], "cpo"])
def test_online_dpo_nll_term_is_the_step_token_mean_under_accumulation(tiny_dir, tokenizer, loss_type):
    """A chosen-NLL term (sft, cpo) under gradient accumulation: the pairs of one minibatch in 1 or 3 micro-batches
    give the same update (SGD). Before, each micro-batch scaled its chosen NLL by its own N / T, so the term was the
    mean of the micro-batches' token means, not the minibatch's token mean: the responses (1 to 6 tokens: a third
    of the vocabulary stops them) fell differently into micro-batches and the parameters moved elsewhere."""
    stops = list(range(3, len(tokenizer), 3))
    def run(accumulation: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        cfg = small(OnlineDPOConfig, steps=1, prompts_per_step=2, loss_type=loss_type, feedback="random_pairs",
                    feedback_kwargs={"pairs_per_prompt": 3}, gradient_accumulation_steps=accumulation,
                    max_grad_norm=None, share_prompt=False, seed=3,
                    sampling=SamplingConfig(num_samples=4, max_new_tokens=6, stop_token_ids=stops))
        trainer = OnlineDPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                                   lambda p, r: float(len(r)), cfg)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        trainer.optimizer = torch.optim.SGD(params, lr=2.0)
        lengths: list[int] = []
        build = trainer.build_batch

        def recorded(*a, **k):
            pairs = build(*a, **k)
            lengths.extend(pairs.rollout.mask.sum(-1)[pairs.chosen].tolist())
            return pairs
        trainer.build_batch = recorded
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}, lengths

    (one, lengths), (three, _) = run(1), run(3)
    assert len(set(lengths)) > 1, lengths  # chosen responses of different lengths: the token means differ
    start = {n: p for n, p in toy_policy(tiny_dir("llama"), "lora").named_parameters() if p.requires_grad}
    assert any(not torch.allclose(one[n], start[n]) for n in one), "training changed nothing"
    for n in one:
        torch.testing.assert_close(three[n], one[n], rtol=1e-4, atol=2e-5)
