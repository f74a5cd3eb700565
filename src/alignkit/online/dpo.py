"""Online DPO: every step, pairs are built from samples of the CURRENT policy and trained on with any loss of
the preference family (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback";
Calandriello et al. 2024, "Human Alignment of LLMs through Online Preference Optimisation").

    samples  (K per prompt) --annotate--> rewards --feedback--> pairs (y_w, y_l) per prompt
    rho_w = log pi_theta(y_w|x) - log pi_ref(y_w|x),  rho_l likewise
    loss  = sum_i w_i L(rho_w,i, rho_l,i) / sum_i w_i           (L = any PREFERENCE_LOSSES entry, e.g. DPO:
                                                                  -log sigmoid(beta (rho_w - rho_l)))

Pairs come from `alignkit.online.feedback` ("best_worst": best vs worst of each prompt; "random_pairs":
random pairs above a margin; "judge_pairs": the annotator's own A/B verdicts, order randomised), so online
and offline DPO read the same `PreferenceRecord`s; the reweighters of `alignkit.online.reweighting` then
set each pair's weight. The pair's token ids are the sampled ones (found by `meta["chosen_index"]` /
`meta["rejected_index"]`), and its reference log-probs were computed once in the rollout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from alignkit.losses import (CHOSEN_NLL_LOSSES, KL_ESTIMATORS, PREFERENCE_LOSSES, PreferenceParams, check_loss_weights,
                             preference_loss, reduce_loss, resolve_params)
from alignkit.online.annotators import Scores
from alignkit.online.feedback import build_records
from alignkit.online.generation import Sample
from alignkit.online.reweighting import build_reweighter, reweight
from alignkit.online.rollout import select, sequence_sums
from alignkit.online.trainer import OnlineConfig, OnlineTrainer, Rollout
from alignkit.trainers.pairs import pair_batch
from alignkit.settings.online import check_feedback
from alignkit.settings.sections import PreferenceObjective, loss_names, reference_free, refuse_unread_loss_params

PAIR_MODES = ("best_worst", "random_pairs", "judge_pairs")
SEEDED_MODES = ("random_pairs", "judge_pairs")  # draw their pairs with a seed: a new one per step (feedback_kwargs)


@dataclass
class OnlineDPOConfig(OnlineConfig):
    compares_samples: ClassVar[str] = "online DPO (pairs of a prompt's samples)"
    learning_rate: float = 5e-7  # TRL's OnlineDPOConfig
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    params: PreferenceParams | None = None  # all preference hyper-parameters; `beta` alone is a shortcut
    feedback: str = "best_worst"
    feedback_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"min_margin": 0.1}
    reweighters: list[Any] = field(default_factory=list)  # e.g. ["margin_sigmoid"]

    def __post_init__(self, bounds_checked: bool = False) -> None:
        super().__post_init__(bounds_checked)
        for name in loss_names(self.loss_type):
            PREFERENCE_LOSSES[name]
        check_loss_weights(loss_names(self.loss_type), self.loss_weights, "online DPO config")
        if self.feedback not in PAIR_MODES:
            raise ValueError(f"online DPO feedback must be one of {PAIR_MODES}, got {self.feedback!r}")
        # feedback_kwargs the pair builder does not take, or a reweighter these pairs cannot feed, stopped the first
        # step (after the trainer's folder was written): refused here, as `alignkit online-dpo` does
        check_feedback(self.feedback, self.feedback_kwargs, self.reweighters)
        self.refuse_unread_reward_scale()
        if isinstance(self.params, dict):
            self.params = PreferenceParams(**self.params)
        resolved = resolve_params(self.params, self.beta, "OnlineDPOConfig")
        # a loss parameter no loss of loss_type reads (label_smoothing with hinge, orpo_lambda with sigmoid, ...)
        refuse_unread_loss_params(loss_names(self.loss_type), dataclasses.asdict(resolved), where="params.",
                                  who="OnlineDPOConfig: ")
        # OnlineConfig's KL penalty: GRPO / RLOO / PPO add it, no preference loss does
        for key in ("kl_coef", "kl_target"):
            value = getattr(self, key)  # kl_coef=0 (no penalty: what online DPO does) is fine
            if value != OnlineConfig.__dataclass_fields__[key].default and not (key == "kl_coef" and value == 0):
                raise ValueError(f"online DPO config: {key}={getattr(self, key)!r} sets the KL penalty of GRPO / RLOO "
                                 "/ PPO, and online DPO's preference loss has none (its pull toward the reference is "
                                 "beta), so it would be ignored; remove it (set beta, or params.beta, instead)")

    def refuse_unread_reward_scale(self) -> None:
        """reward_normalization / reward_clip where nothing reads them: judge_pairs gives no reward; otherwise pairs
        follow the rewards' order, which a normalisation (a shift and a positive scale, per group or per step) keeps,
        so it acts only through what reads the rewards' scale (min_margin, a reweighter reading margins or scores, a
        reward_clip: clipped rewards can tie)."""
        if self.feedback == "judge_pairs":
            for key in ("reward_normalization", "reward_clip"):
                if getattr(self, key) != OnlineConfig.__dataclass_fields__[key].default:
                    raise ValueError(f"online DPO config: {key}={getattr(self, key)!r} acts on each response's "
                                     "reward, and feedback='judge_pairs' gives none (the judge compares pairs), so it "
                                     f"would be ignored; remove {key} or use another feedback")
            return
        if self.reward_normalization == "none" or self.reward_clip is not None:
            return
        readers = [build_reweighter(spec) for spec in self.reweighters]
        if self.feedback_kwargs.get("min_margin") or any(r.reads_margin or r.reads_meta for r in readers):
            return
        raise ValueError(f"online DPO config: reward_normalization={self.reward_normalization!r} shifts and scales "
                         "the rewards (by a positive factor, per group or per step), which keeps their order, and "
                         f"feedback={self.feedback!r} pairs samples by that order; nothing here reads their scale "
                         "(feedback_kwargs.min_margin, a margin reweighter such as margin_sigmoid, reward_clip), so "
                         "it would be ignored; remove it or set one of those")


@dataclass
class PairBatch:
    rollout: Rollout
    chosen: Tensor  # (P,) row of each pair's chosen sample in rollout.batch
    rejected: Tensor  # (P,)
    weights: Tensor  # (P,)
    ref_chosen: Tensor | None  # (P,) sum log pi_ref
    ref_rejected: Tensor | None


def rows_of(values: Tensor | None, rows: Tensor) -> Tensor | None:
    """`values[rows]`; None (no reference) stays None."""
    return None if values is None else values[rows]


class OnlineDPOTrainer(OnlineTrainer):
    """Online DPO (any preference loss) for every adapter kind; see the module docstring."""

    config_class = OnlineDPOConfig

    @property
    def pointwise_scores(self) -> bool:
        return self.config.feedback != "judge_pairs"

    def no_signal(self, metrics: dict[str, float]) -> tuple[str, str] | None:
        """A step without a preference pair (over all processes) trains nothing. With "judge_pairs" there are no
        pointwise rewards to call flat: the judge's verdicts decide."""
        if metrics.get("pairs", 0.0) > 0:
            return None
        why, fix = self.no_pair_reason()
        return (f"no preference pair was formed: {why}, so this step trained nothing; {fix}",
                "formed a preference pair (pairs = 0 at all {steps} step(s)): the feedback did not move the policy")

    def no_pair_reason(self, seen: str | None = None) -> tuple[str, str]:
        """(why a step formed no pair, the fix); `seen`: the scores of the steps concerned (a stall's message)."""
        c: OnlineDPOConfig = self.config
        if c.feedback == "judge_pairs":  # ties: the judge's None verdicts (and pointwise annotators' equal scores)
            who = "the judge" if seen is None else f"the judge ({self.annotator.source()})"
            return (f"{who} decided none of its comparisons (every verdict was a tie or unparseable)",
                    "check the judge (annotator) on a few pairs")
        margin = c.feedback_kwargs.get("min_margin", 0.0)
        scores = f" ({self.annotator.source()}: {seen})" if seen else ""
        if margin:
            return (f"no prompt's samples differ in reward by more than method.feedback_kwargs.min_margin "
                    f"({margin}){scores}", "lower method.feedback_kwargs.min_margin, or sample more responses per "
                    "prompt")
        # best_worst / random_pairs pair only samples whose scores differ: an all-equal group gives none (a tie)
        return (f"every prompt's samples got the same reward{scores}{self.clipped_alike()}", self.clip_advice(
                "a reward that never varies is usually a bug in the annotator" if seen is None else
                self.check_annotator_advice()))

    def stall_cause(self, seen: str) -> tuple[str, str]:
        why, fix = self.no_pair_reason(seen)
        return f"no preference pair was formed ({why}), so nothing trained", fix

    def uses_reference(self, ref_model: nn.Module | None) -> bool:
        """The preference loss reads the reference whatever kl_coef (which online DPO never reads) is, unless every
        loss of `loss_type` is reference-free (simpo, orpo, cpo, slic, sft): then, as GRPO's fixed kl_coef 0, none
        is built or run unless asked for (a `ref_model`, or `reference` other than "auto"), which only gives the
        "kl" metrics (docs/metrics.md). It was built (a copy of a fully finetuned policy) and run every step."""
        c: OnlineDPOConfig = self.config
        return not reference_free(c.loss_type) or ref_model is not None or c.reference != "auto"

    def why_no_reference(self) -> str:
        return f"method.loss_type {loss_names(self.config.loss_type)} reads none"

    @classmethod
    def loss_scale(cls, config: OnlineDPOConfig) -> str | None:
        """method.beta where a loss of loss_type reads it; none for orpo / slic / sft (as the offline trainer's)."""
        return PreferenceObjective.beta_scale(config.loss_type)

    def logged_kl_coef(self) -> float | None:
        """Online DPO has no KL penalty term (its controller's kl_coef is never read): its KL coefficient is the
        preference loss's beta (TRL's online DPO logs it as `beta`). None (no `kl_coef` logged) when no loss of
        `loss_type` reads beta (orpo, slic, sft: `PreferenceObjective.BETA_UNREAD`): the beta was logged beside a
        loss that never applied it (orpo's weight is its orpo_lambda)."""
        c: OnlineDPOConfig = self.config
        if self.loss_scale(c) is None:
            return None
        return float(resolve_params(c.params, c.beta, "OnlineDPOConfig").beta)

    def reuses_training_pass(self) -> bool:
        """The preference losses never read log pi_old: the rollout's no-grad policy pass only gave the "kl" and
        "entropy" metrics, which then come from the training forward over the paired rows (all rows when no
        group ties). Kept with an adaptive KL controller (`kl_target`), which reads "kl/sequence_sum" every step,
        and with several processes: the samples in no pair (which differ per rank) would need a forward on some
        ranks only, and a DDP / FSDP forward is a collective."""
        return self.config.kl_target is None and self.world == 1

    def annotate(self, samples: list[Sample]) -> Scores:
        """With "judge_pairs" the annotator compares pairs itself; no pointwise scores are asked for (NaN)."""
        if self.config.feedback != "judge_pairs":
            return super().annotate(samples)
        n = len(samples)
        return Scores(torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool), [{} for _ in samples])

    def feedback_kwargs(self) -> dict[str, Any]:
        """`feedback_kwargs` for this step. "random_pairs" / "judge_pairs" draw pairs (and the judge's A/B order)
        with a seed, which defaulted to 0 at every step: each step drew the same pair pattern. Now the seed is
        derived from `feedback_kwargs.seed` (default: the run's `seed`), the step and the rank (`step_seed`):
        it varies by step, and a rerun (or a resumed run) draws the same pairs."""
        c: OnlineDPOConfig = self.config
        kwargs = dict(c.feedback_kwargs)
        if c.feedback in SEEDED_MODES:
            kwargs["seed"] = self.step_seed(kwargs.get("seed", c.seed), getattr(self, "_step", 0))
        return kwargs

    def build_batch(self, rollout: Rollout) -> PairBatch:
        c: OnlineDPOConfig = self.config
        samples = rollout.samples
        scores = torch.where(torch.isnan(rollout.scores), rollout.scores, rollout.rewards).tolist()  # NaN: failed
        records = build_records(c.feedback, samples, None if c.feedback == "judge_pairs" else scores,
                                self.annotator, **self.feedback_kwargs())
        if c.feedback == "judge_pairs":  # the judge's own counts (judge/pair_parse_failures): logged with the step's
            rollout.metrics.update(self.annotator.last_pair_metrics)
        if records and c.reweighters:
            records = reweight(records, c.reweighters)
        row = {(s.group, s.index): i for i, s in enumerate(samples)}
        chosen = [row[(r.meta["group"], r.meta["chosen_index"])] for r in records]
        rejected = [row[(r.meta["group"], r.meta["rejected_index"])] for r in records]
        dev = rollout.rewards.device
        ch, rj = (torch.tensor(chosen, dtype=torch.long, device=dev),
                  torch.tensor(rejected, dtype=torch.long, device=dev))
        ref_seq = None if reference_free(c.loss_type) else sequence_sums(rollout.ref_logps, rollout.mask)
        return PairBatch(rollout, ch, rj, torch.tensor([r.weight for r in records], dtype=torch.float32, device=dev),
                         None if ref_seq is None else ref_seq[ch], None if ref_seq is None else ref_seq[rj])

    def pair_loss(self, pairs: PairBatch, idx: Tensor, normalizer: Tensor | None = None
                  ) -> tuple[Tensor, dict[str, float]]:
        """Weighted preference loss of pairs `idx (M,)`: one forward over their 2M rows (chosen first), divided
        by `normalizer` (default: the pairs' weight sum), or by its first value when it is `pair_normalizer`'s pair
        (the step's weight sum, and its weighted chosen tokens: the NLL terms' N / T over the whole step)."""
        c: OnlineDPOConfig = self.config
        rows = torch.cat([pairs.chosen[idx], pairs.rejected[idx]])  # (2M,)
        on_policy = pairs.rollout.old_logps is None  # no rollout policy pass: this one gives kl / entropy
        stats = self.token_stats(select(pairs.rollout.batch, rows), entropy=on_policy)
        logps, lengths = sequence_sums(stats.logps, stats.mask), stats.mask.sum(-1)  # (2M,), (2M,)
        ref = None if pairs.ref_chosen is None else torch.cat([pairs.ref_chosen[idx], pairs.ref_rejected[idx]])
        # rows: the M chosen, then the M rejected; reduced by the weights' sum, so "weighted" for the NLL terms
        batch = pair_batch(logps, lengths, ref, pairs.weights[idx].to(logps.dtype), "weighted")
        if normalizer is not None and normalizer.numel() == 2:  # the step's N and T (`pair_normalizer`)
            normalizer, tokens = normalizer[0], normalizer[1]
            batch.nll_step_scale = normalizer / tokens.clamp(min=torch.finfo(tokens.dtype).tiny)
        params = resolve_params(c.params, c.beta, "OnlineDPOConfig")
        out = preference_loss(batch, params, c.loss_type, c.loss_weights)
        loss = reduce_loss(out.losses, pairs.weights[idx], normalizer)
        if on_policy:  # per-row values of the rollout's "kl" / "entropy" (`_rollout_pass_metrics`)
            self.__dict__.setdefault("_pass_rows", {}).update(
                zip(rows.tolist(), zip(*self._row_values(stats, rows_of(pairs.rollout.ref_logps, rows)))))
        return loss, {k: float(v.float().mean()) for k, v in out.metrics.items()}

    def _row_values(self, stats: Any, ref_logps: Tensor | None) -> tuple[list[float], list[float], list[float]]:
        """Per row: the summed KL estimator (0 without a reference: no "kl" is logged), summed entropy and response
        tokens of one policy pass."""
        w = stats.logps.shape[1]
        est = (torch.zeros_like(stats.logps) if ref_logps is None
               else KL_ESTIMATORS[self.config.kl_estimator](stats.logps.detach(), ref_logps[:, :w]))
        m = stats.mask.to(est.dtype)
        return ((est * m).sum(-1).tolist(), (stats.entropy.detach() * m).sum(-1).tolist(), m.sum(-1).tolist())

    @torch.no_grad()
    def _rollout_pass_metrics(self, rollout: Rollout) -> dict[str, float]:
        """The rollout's "kl", "entropy" and "kl/sequence_sum" (`metrics_from_sums`) when its policy pass was skipped:
        the training forward's rows, plus one no-grad pass over the samples in no pair. The same values as the rollout
        pass (the parameters are the step's until the update; with several minibatches, later ones see updated
        parameters)."""
        rows = self._pass_rows
        if rollout.old_logps is not None or not rows:
            return {}
        kl, ent, tok = (sum(v[j] for v in rows.values()) for j in range(3))
        self._pass_rows = {}
        return self.metrics_from_sums(torch.tensor([kl, ent, tok, float(len(rows))], dtype=torch.float64))

    @torch.no_grad()
    def _unpaired_pass(self, pairs: PairBatch) -> None:
        """Before the update: the per-row metric values of the samples no pair trains on (their own pass)."""
        r = pairs.rollout
        if r.old_logps is not None:
            return
        paired = set(pairs.chosen.tolist()) | set(pairs.rejected.tolist())
        missing = [i for i in range(len(r.samples)) if i not in paired]
        if missing:
            idx = torch.tensor(missing, dtype=torch.long, device=r.rewards.device)
            stats = self.token_stats(select(r.batch, idx), entropy=True)
            self._pass_rows.update(zip(missing, zip(*self._row_values(stats, rows_of(r.ref_logps, idx)))))

    def pair_normalizer(self, pairs: PairBatch) -> Callable[[Tensor], Tensor]:
        """`run_minibatches`' normaliser of the pairs `idx`: their weight sum N; with a chosen-NLL loss (sft, orpo,
        cpo), N and T = sum_i w_i |y_w,i|, so that the NLL term is the step's token mean over every micro-batch and
        process (each micro-batch's own N / T made it the mean of the micro-batches' token means)."""
        if not CHOSEN_NLL_LOSSES & set(loss_names(self.config.loss_type)):
            return lambda idx: pairs.weights[idx].sum()
        tokens = pairs.rollout.mask.sum(-1).to(pairs.weights.dtype).clamp(min=1.0)  # (rows,) response tokens

        def both(idx: Tensor) -> Tensor:
            w = pairs.weights[idx]
            return torch.stack([w.sum(), (w * tokens[pairs.chosen[idx]]).sum()])
        return both

    def optimise(self, pairs: PairBatch) -> dict[str, float]:
        self._pass_rows: dict[int, tuple[float, float, float]] = {}
        self._unpaired_pass(pairs)
        n = pairs.chosen.numel()
        if self.world > 1 and n == 0:  # other processes may have pairs: take part with a zero-weight pair
            dev = pairs.weights.device
            zero = torch.zeros(1, dtype=torch.long, device=dev)
            pairs = PairBatch(pairs.rollout, zero, zero, torch.zeros(1, device=dev),
                              None if pairs.ref_chosen is None else pairs.rollout.ref_logps.new_zeros(1),
                              None if pairs.ref_rejected is None else pairs.rollout.ref_logps.new_zeros(1))
            self.run_minibatches(1, lambda idx, norm: self.pair_loss(pairs, idx, norm), self.pair_normalizer(pairs))
            return {"pairs": 0.0, **self._rollout_pass_metrics(pairs.rollout)}  # not the zero-weight pair's metrics
        if n == 0:  # every group tied: nothing to learn from this step
            return {"pairs": 0.0, **self._rollout_pass_metrics(pairs.rollout)}
        metrics = self.run_minibatches(n, lambda idx, norm: self.pair_loss(pairs, idx, norm),
                                       self.pair_normalizer(pairs))
        return {"pairs": float(n), **metrics, **self._rollout_pass_metrics(pairs.rollout)}


__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer", "PAIR_MODES", "PairBatch"]
