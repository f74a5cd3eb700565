"""Offline pairwise preference objectives: the DPO family (incl. f-DPO, DiscoPOP), SimPO, CPO, ORPO, SLiC, combined
losses.

Inputs are per-pair sequence log-probs (sums over completion tokens, from `sequence_logps`):
policy pi_theta and reference pi_ref for the chosen y_w and rejected y_l completions, `(B,)` each.
Notation, as in TRL's DPOTrainer (names of `loss_type` are TRL's, so results compare):

    rho_w = log pi_theta(y_w|x) - log pi_ref(y_w|x)        (chosen log-ratio)
    rho_l = log pi_theta(y_l|x) - log pi_ref(y_l|x)        (rejected log-ratio)
    d     = rho_w - rho_l

A missing reference (None) means a uniform reference: rho = log pi_theta (TRL's `reference_free`).
Metrics (TRL's definitions, per pair, detached): rewards/chosen = beta * rho_w, rewards/rejected =
beta * rho_l, rewards/accuracies = [rewards/chosen > rewards/rejected], rewards/margins = their
difference, logps/chosen and logps/rejected = the policy log-probs as passed in.

Every loss here has the signature `fn(batch: PreferenceBatch, params: PreferenceParams) ->
LossOutput`; `preference_loss(batch, params, loss_type, loss_weights)` sums several of them.
Hyper-parameters live in one dataclass so a trainer builds it once from its config. Running state
(e.g. BCO's reward mean) lives in the trainer and comes in through `params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.loss_bounds import LOSS_BOUNDS, past_bound

from .registry import PAIR_METRICS, PREFERENCE_LOSSES, LossOutput


@dataclass
class PreferenceBatch:
    """Per-pair sequence log-probs `(B,)`; lengths are completion token counts `(B,)`.

    `weights` `(B,)` (None: 1 each) and `weight_normalization` ("count" | "weighted") are the trainer's, read only by
    the chosen-NLL terms (sft, orpo, cpo; `nll_scale`): the trainer reduces every per-pair loss as
    sum_i w_i L_i / N (N = B under "count", sum_i w_i under "weighted"), and the NLL term's share then comes out as
    the token mean sum_i w_i NLL_i / T with T reduced the same way (sum_i |y_w,i|, or sum_i w_i |y_w,i|).
    `nll_step_scale`: N / T counted over the whole optimizer step (every micro-batch of gradient accumulation and
    every process), set by a trainer whose N is the step's: the NLL term is then the step's token mean, as the
    other terms are the step's mean (None: this batch's own N / T)."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    weights: Tensor | None = None
    weight_normalization: str = "count"
    nll_step_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if self.weight_normalization not in ("count", "weighted"):
            raise ValueError(f"PreferenceBatch.weight_normalization must be 'count' or 'weighted', got "
                             f"{self.weight_normalization!r}")
        shape = self.policy_chosen_logps.shape
        for name in ("policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
                     "chosen_lengths", "rejected_lengths", "weights"):
            t = getattr(self, name)
            if t is not None and t.shape != shape:
                raise ValueError(f"PreferenceBatch.{name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                                 "like policy_chosen_logps (one value per pair)")
        if len(shape) != 1:
            raise ValueError(f"PreferenceBatch: log-probs must be (B,), got {tuple(shape)}; sum over tokens "
                             "first (losses.logprobs.sequence_logps)")
        if (self.reference_chosen_logps is None) != (self.reference_rejected_logps is None):
            raise ValueError("PreferenceBatch: give both reference_chosen_logps and reference_rejected_logps, "
                             "or neither (reference-free)")

    def logratios(self) -> tuple[Tensor, Tensor]:
        """(rho_w, rho_l); the policy log-probs themselves when there is no reference."""
        if self.reference_chosen_logps is None:
            return self.policy_chosen_logps, self.policy_rejected_logps
        return (self.policy_chosen_logps - self.reference_chosen_logps,
                self.policy_rejected_logps - self.reference_rejected_logps)

    def lengths(self, loss: str) -> tuple[Tensor, Tensor]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(f"preference loss {loss!r} normalises by completion length: pass chosen_lengths "
                             "and rejected_lengths (number of completion tokens per pair) in PreferenceBatch")
        dt = self.policy_chosen_logps.dtype
        return self.chosen_lengths.to(dt).clamp(min=1.0), self.rejected_lengths.to(dt).clamp(min=1.0)

    def nll_scale(self, loss: str) -> Tensor:
        """N / T, the factor that turns a pair's chosen NLL (a sum over its tokens) into its share of the batch's token
        mean: N = B and T = sum_i |y_w,i| under "count"; N = sum_i w_i and T = sum_i w_i |y_w,i| under "weighted"
        (the trainer's reduction sum_i w_i L_i / N then gives sum_i w_i NLL_i / T, where a weight-0 pair adds nothing
        to the NLL nor to T). Needs chosen_lengths. `nll_step_scale` when set (the optimizer step's N / T)."""
        lw, _ = self.lengths(loss)
        if self.nll_step_scale is not None:
            return self.nll_step_scale.to(lw.device, lw.dtype)
        if self.weight_normalization == "weighted" and self.weights is not None:
            w = self.weights.to(lw.dtype)
            return w.sum() / (w * lw).sum().clamp(min=torch.finfo(lw.dtype).tiny)  # all weights 0: 0 (nothing to add)
        return lw.new_tensor(float(lw.shape[0])) / lw.sum()


# the losses with a chosen-NLL term (`PreferenceBatch.nll_scale`): a trainer counts the step's T only for these
CHOSEN_NLL_LOSSES = frozenset({"sft", "orpo", "cpo"})


@dataclass
class PreferenceParams:
    """Hyper-parameters of all pairwise losses (each loss reads only its own)."""

    beta: float = 0.1  # DPO beta; IPO tau; SimPO beta; hinge 1/delta
    label_smoothing: float = 0.0  # cDPO / robust epsilon; exo_pair epsilon (1e-3 when 0)
    bco_delta: float | Tensor = 0.0  # BCO running mean of the rewards (state, not a setting: trainers refuse != 0)
    simpo_gamma_beta_ratio: float = 0.5  # SimPO gamma / beta
    orpo_lambda: float = 0.1  # ORPO lambda (TRL's ORPOConfig.beta)
    slic_delta: float = 1.0  # SLiC margin delta
    slic_lambda: float = 0.1  # SLiC regularisation weight on -log pi(y_w|x)
    discopop_tau: float = 0.05  # DiscoPOP temperature of the mixing sigmoid
    cpo_alpha: float = 1.0  # CPO weight of the chosen NLL (TRL's CPOConfig.cpo_alpha)
    f_alpha: float = 0.5  # f-DPO alpha-divergence coefficient (fdpo_alpha)

    def __post_init__(self) -> None:
        # the CLI's bounds (one table, alignkit.loss_bounds): past them the loss trains toward the rejected answers
        # (beta <= 0; label_smoothing >= 0.5 flips cDPO's labels; a negative weight turns its term around) or divides
        # by 0 (IPO, SPPO: 1 / beta), or asks for a margin in the rejected answers' favour (slic_delta,
        # simpo_gamma_beta_ratio < 0)
        for key in ("beta", "label_smoothing", "orpo_lambda", "cpo_alpha", "slic_lambda", "discopop_tau", "f_alpha",
                    "slic_delta", "simpo_gamma_beta_ratio"):
            if past_bound(key, getattr(self, key)):
                _, bound, why = LOSS_BOUNDS[key]
                raise ValueError(f"{key} must be {bound}, got {getattr(self, key)} ({why})")


def resolve_params(params: PreferenceParams | None, beta: float, who: str) -> PreferenceParams:
    """The preference hyper-parameters of a trainer or config that takes both `params` and the `beta` shortcut:
    `params` when given, else `PreferenceParams(beta=beta)`. A `beta` other than the default beside `params` with
    another beta would be ignored (`params` holds every hyper-parameter): a ValueError naming `who`. So is a
    `bco_delta` other than 0: BCO's running reward mean is no setting, and no trainer keeps one (delta = 0, as TRL's
    `bco_pair`); a value given here was used as a fixed shift and left out of the run's recorded settings."""
    if params is None:
        return PreferenceParams(beta=beta)
    if isinstance(params.bco_delta, Tensor) or params.bco_delta != 0:
        raise ValueError(f"{who}: params.bco_delta={params.bco_delta} is not a setting (BCO's running reward mean, "
                         "which alignkit's trainers keep at 0 as TRL's bco_pair loss does); remove it from "
                         "PreferenceParams")
    if beta != PreferenceParams.beta and beta != params.beta:
        raise ValueError(f"{who}: beta={beta:g} and params.beta={params.beta:g} disagree; params holds every "
                         f"preference hyper-parameter, so beta would be ignored: give PreferenceParams(beta={beta:g}, "
                         "...) as params, or leave beta out")
    return params


def _output(batch: PreferenceBatch, params: PreferenceParams, losses: Tensor,
            rewards: tuple[Tensor, Tensor] | None = None, **extra: Tensor) -> LossOutput:
    rc, rr = rewards if rewards is not None else tuple(params.beta * r for r in batch.logratios())
    rc, rr = rc.detach(), rr.detach()
    metrics = dict(zip(PAIR_METRICS, (rc, rr, (rc > rr).to(rc.dtype), rc - rr, batch.policy_chosen_logps.detach(),
                                      batch.policy_rejected_logps.detach())))  # rewards/chosen, ..., logps/rejected
    metrics.update({k: v.detach() for k, v in extra.items()})
    return LossOutput(losses=losses, metrics=metrics)


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the label-smoothed logistic loss."""
    out = -F.logsigmoid(logits)
    if eps:
        out = out * (1 - eps) - eps * F.logsigmoid(-logits)
    return out


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with cDPO label smoothing.

    (TRL's current `sigmoid` has no label smoothing; with label_smoothing = 0 the two are identical.)

        L = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)

    eps = `label_smoothing` (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's older
    `sigmoid` + label_smoothing; eps = 0 is plain DPO).
    """
    rw, rl = batch.logratios()
    return _output(batch, params, _smoothed_sigmoid(params.beta * (rw - rl), params.label_smoothing))


@PREFERENCE_LOSSES.register("hinge")
def hinge_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """Hinge loss on the DPO logit (SLiC-style, Zhao et al. 2023): L = max(0, 1 - beta d)."""
    rw, rl = batch.logratios()
    return _output(batch, params, torch.relu(1 - params.beta * (rw - rl)))


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17), length-normalised.

        L = (rho_w / |y_w| - rho_l / |y_l| - 1 / (2 tau))^2,   tau = beta

    As TRL: log-ratios are divided by the completion token counts (the IPO authors' convention;
    the paper writes sequence-level log-ratios). Needs chosen_lengths / rejected_lengths.
    """
    rw, rl = batch.logratios()
    lw, ll = batch.lengths("ipo")
    return _output(batch, params, (rw / lw - rl / ll - 1 / (2 * params.beta)) ** 2)


@PREFERENCE_LOSSES.register("sigmoid_norm")
def sigmoid_norm_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """Length-normalised DPO (TRL's `sigmoid_norm`): L = -log sigma(beta (rho_w/|y_w| - rho_l/|y_l|)).

    TRL divides each reference-relative log-ratio by its completion token count (min 1); unlike
    SimPO it keeps the reference model. Needs chosen_lengths / rejected_lengths.
    """
    rw, rl = batch.logratios()
    lw, ll = batch.lengths("sigmoid_norm")
    return _output(batch, params, -F.logsigmoid(params.beta * (rw / lw - rl / ll)))


@PREFERENCE_LOSSES.register("robust")
def robust_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under flip rate eps.

        L = [-(1 - eps) log sigma(beta d) + eps log sigma(-beta d)] / (1 - 2 eps)
    """
    eps = params.label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    rw, rl = batch.logratios()
    z = params.beta * (rw - rl)
    return _output(batch, params, (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps))


@PREFERENCE_LOSSES.register("exo_pair")
def exo_pair_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """EXO (Ji et al. 2024, "Towards Efficient Exact Optimization...", Eq. 16), K = 2.

        L = sigma(beta d) (log sigma(beta d) - log(1 - eps)) + sigma(-beta d) (log sigma(-beta d) - log eps)

    i.e. KL(p_theta || p_label) with p_label = (1 - eps, eps). eps = label_smoothing, and 1e-3 when
    label_smoothing is 0 (as TRL's older code; the current one requires eps > 0).
    """
    eps = params.label_smoothing or 1e-3
    rw, rl = batch.logratios()
    z = params.beta * (rw - rl)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return _output(batch, params, losses)


@PREFERENCE_LOSSES.register("nca_pair")
def nca_pair_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment..."), pairwise form.

        L = -log sigma(beta rho_w) - 0.5 log sigma(-beta rho_w) - 0.5 log sigma(-beta rho_l)
    """
    rw, rl = batch.logratios()
    zw, zl = params.beta * rw, params.beta * rl
    return _output(batch, params, -F.logsigmoid(zw) - 0.5 * F.logsigmoid(-zw) - 0.5 * F.logsigmoid(-zl))


@PREFERENCE_LOSSES.register("bco_pair")
def bco_pair_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization...").

        L = -log sigma(beta rho_w - delta) - log sigma(-(beta rho_l - delta))

    delta = `bco_delta`, the running mean of the (detached) rewards beta*rho over chosen and
    rejected in the BCO paper (TRL's older DPOTrainer updated it before each loss; TRL's current
    `bco_pair` drops it, i.e. delta = 0, the default here). No alignkit trainer keeps one:
    `resolve_params` refuses a nonzero value given to a trainer (this function takes any, for tests).
    """
    rw, rl = batch.logratios()
    delta = params.bco_delta
    return _output(batch, params, -F.logsigmoid(params.beta * rw - delta) - F.logsigmoid(-(params.beta * rl - delta)))


@PREFERENCE_LOSSES.register("sppo_hard")
def sppo_hard_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7, P = 1/0).

        L = (rho_w - 1 / (2 beta))^2 + (rho_l + 1 / (2 beta))^2
    """
    rw, rl = batch.logratios()
    return _output(batch, params, (rw - 0.5 / params.beta) ** 2 + (rl + 0.5 / params.beta) ** 2)


@PREFERENCE_LOSSES.register("apo_zero")
def apo_zero_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7).

        L = 1 - sigma(beta rho_w) + sigma(beta rho_l)     (chosen better than the model's outputs)
    """
    rw, rl = batch.logratios()
    return _output(batch, params, 1 - torch.sigmoid(params.beta * rw) + torch.sigmoid(params.beta * rl))


@PREFERENCE_LOSSES.register("apo_down")
def apo_down_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8).

        L = sigma(beta rho_w) + 1 - sigma(beta (rho_w - rho_l))   (chosen worse than the model's outputs)
    """
    rw, rl = batch.logratios()
    return _output(batch, params, torch.sigmoid(params.beta * rw) + 1 - torch.sigmoid(params.beta * (rw - rl)))


@PREFERENCE_LOSSES.register("sft")
def sft_term(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """NLL on the chosen completions, token-averaged over the batch (TRL's `sft` loss_type, MPO).

        L_i = -log pi_theta(y_w,i|x_i) * N / T          (`PreferenceBatch.nll_scale`)

    so that the trainer's reduction sum_i w_i L_i / N is the batch's chosen cross-entropy sum_i w_i NLL_i / T (TRL's
    total chosen NLL / total chosen tokens when every weight is 1; T counts tokens as `weight_normalization` counts
    pairs). Needs chosen_lengths. Use it inside a combination, e.g. ["sigmoid", "sft"].
    """
    return _output(batch, params, -batch.policy_chosen_logps * batch.nll_scale("sft"))


@PREFERENCE_LOSSES.register("simpo")
def simpo_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward"), Eq. 6.

        L = -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),  gamma = ratio * beta

    Reference-free (reference log-probs are ignored); `label_smoothing` smooths as in cDPO.
    ratio = `simpo_gamma_beta_ratio` (the SimPO repo's gamma_beta_ratio). TRL's CPOTrainer takes
    `simpo_gamma` = gamma instead, so TRL (beta=b, simpo_gamma=g) is ours with ratio = g / b (and
    cpo_alpha = 0). Rewards (metrics) are beta * length-averaged policy log-probs, as TRL's CPO.
    """
    lw, ll = batch.lengths("simpo")
    aw, al = batch.policy_chosen_logps / lw, batch.policy_rejected_logps / ll
    z = params.beta * (aw - al - params.simpo_gamma_beta_ratio)
    return _output(batch, params, _smoothed_sigmoid(z, params.label_smoothing),
                   rewards=(params.beta * aw, params.beta * al))


@PREFERENCE_LOSSES.register("orpo", metrics=PAIR_METRICS + ("log_odds_ratio", "log_odds_chosen", "nll_loss"))
def orpo_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model").

        a = log P(y|x) / |y| (length-averaged),   odds(y) = P / (1 - P)
        log OR = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))
        L_i = NLL_i - lambda * log sigma(log OR),   NLL_i = -log P(y_w,i|x_i) * N / T   (as the `sft` term)

    Reference-free. As TRL's ORPOTrainer, the NLL is the chosen cross-entropy averaged over all
    chosen tokens of the batch (spread over pairs so that the mean over pairs equals it; the paper
    averages per sequence, identical when lengths are equal). Needs lengths. Metrics as TRL:
    `log_odds_ratio`, `log_odds_chosen`, `nll_loss`; rewards = lambda * a.
    """
    lw, ll = batch.lengths("orpo")
    aw, al = batch.policy_chosen_logps / lw, batch.policy_rejected_logps / ll
    # log(1 - e^a) for a < 0, computed stably as log(-expm1(a)); a is clamped away from 0
    log1m = lambda a: torch.log(-torch.expm1(a.clamp(max=-1e-6)))  # noqa: E731
    log_odds = (aw - al) - (log1m(aw) - log1m(al))
    ratio = F.logsigmoid(log_odds)
    nll = -batch.policy_chosen_logps * batch.nll_scale("orpo")
    lam = params.orpo_lambda
    return _output(batch, params, nll - lam * ratio, rewards=(lam * aw, lam * al),
                   log_odds_ratio=ratio, log_odds_chosen=log_odds, nll_loss=nll)


@PREFERENCE_LOSSES.register("slic", metrics=PAIR_METRICS + ("hinge",))
def slic_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback").

        L = max(0, delta - log pi(y_w|x) + log pi(y_l|x)) - lambda * log pi(y_w|x)

    Reference-free calibration hinge plus the regularisation term, here the NLL of the chosen
    completion (the paper's target sequence). Sequence log-probs as passed (sums).
    """
    pw, pl = batch.policy_chosen_logps, batch.policy_rejected_logps
    hinge = torch.relu(params.slic_delta - pw + pl)
    return _output(batch, params, hinge - params.slic_lambda * pw, hinge=hinge)


@PREFERENCE_LOSSES.register("discopop")
def discopop_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """DiscoPOP / LRML (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models"): the logistic and exponential losses mixed by a sigmoid of the scaled log-ratio difference.

        z = beta d,   m = sigma(z / tau),   L = (1 - m) (-log sigma(z)) + m exp(-z),   tau = `discopop_tau` (0.05)

    m exp(-z) is computed as exp(log sigma(z / tau) - z), finite where exp(-z) alone overflows.
    """
    rw, rl = batch.logratios()
    z = params.beta * (rw - rl)
    tau = params.discopop_tau
    losses = -torch.sigmoid(-z / tau) * F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return _output(batch, params, losses)


@PREFERENCE_LOSSES.register("cpo", metrics=PAIR_METRICS + ("nll_loss",))
def cpo_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization"), as TRL's CPOTrainer with loss_type sigmoid.

        L_i = -(1 - eps) log sigma(beta (log pi(y_w) - log pi(y_l))) - eps log sigma(-...) + alpha NLL_i

    Reference-free (reference log-probs are ignored; sequence log-probs are sums); NLL_i as the `sft` term (the
    batch's chosen cross-entropy spread over pairs), alpha = `cpo_alpha`. Rewards = beta * policy log-probs.
    Needs chosen_lengths.
    """
    pw, pl = batch.policy_chosen_logps, batch.policy_rejected_logps
    nll = -pw * batch.nll_scale("cpo")
    losses = _smoothed_sigmoid(params.beta * (pw - pl), params.label_smoothing) + params.cpo_alpha * nll
    return _output(batch, params, losses, rewards=(params.beta * pw, params.beta * pl), nll_loss=nll)


def _exp(x: Tensor) -> Tensor:
    """exp with the exponent capped below the dtype's overflow (f-DPO's u^-alpha for very negative log-ratios)."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max) - 1.0))


def _f_dpo(batch: PreferenceBatch, params: PreferenceParams, logits: Tensor) -> LossOutput:
    return _output(batch, params, _smoothed_sigmoid(params.beta * logits, params.label_smoothing))


@PREFERENCE_LOSSES.register("fdpo_js")
def fdpo_js_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """f-DPO with the Jensen-Shannon divergence (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints"): DPO's logit d is replaced by f'(u_w) - f'(u_l) with
    u = pi / pi_ref and f'(u) = log(2u / (1 + u)):

        logit = rho_w - rho_l - (softplus(rho_w) - softplus(rho_l)),   L = -log sigma(beta logit) (cDPO smoothing)
    """
    rw, rl = batch.logratios()
    return _f_dpo(batch, params, rw - rl - (F.softplus(rw) - F.softplus(rl)))


@PREFERENCE_LOSSES.register("fdpo_forward_kl")
def fdpo_forward_kl_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """f-DPO with the forward KL (Wang et al. 2023): f'(u) = -1/u, so logit = exp(-rho_l) - exp(-rho_w)."""
    rw, rl = batch.logratios()
    return _f_dpo(batch, params, _exp(-rl) - _exp(-rw))


@PREFERENCE_LOSSES.register("fdpo_alpha")
def fdpo_alpha_loss(batch: PreferenceBatch, params: PreferenceParams) -> LossOutput:
    """f-DPO with the alpha-divergence (Wang et al. 2023): f'(u) = (1 - u^-alpha) / alpha, so

        logit = (exp(-alpha rho_l) - exp(-alpha rho_w)) / alpha,   alpha = `f_alpha` (0.5)

    (alpha -> 0 recovers DPO's reverse KL, alpha = 1 is the forward KL.)
    """
    rw, rl = batch.logratios()
    a = params.f_alpha
    return _f_dpo(batch, params, (_exp(-a * rl) - _exp(-a * rw)) / a)


def check_loss_weights(names: Sequence[str], loss_weights: Sequence[float] | None, who: str) -> list[float]:
    """The weight of each loss of `names` (1 each when `loss_weights` is None); a ValueError naming `who` when a loss
    type is listed twice, or `loss_weights` does not give exactly one weight per loss type, or gives a negative one or
    only zeros. Trainers
    call it when they are built, so a mismatch stops before the first step."""
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:  # added twice and logged once (loss/<name>): one entry with its weight says the same
        raise ValueError(f"{who}: loss type {twice[0]!r} is listed more than once in {list(names)}; list each loss "
                         "type once (loss_weights scales a loss type: one weight per loss type)")
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if len(weights) != len(names):
        raise ValueError(f"{who}: {len(names)} loss types {list(names)} but {len(weights)} loss_weights; "
                         "give one weight per loss type")
    if any(w < 0 for w in weights) or not any(weights):
        raise ValueError(f"{who}: loss_weights {weights} for loss types {list(names)}: each must be >= 0 (< 0 trains "
                         "that loss the other way) and one > 0 (all 0: nothing would be trained)")
    return weights


def preference_loss(batch: PreferenceBatch, params: PreferenceParams,
                    loss_type: str | Sequence[str] = "sigmoid",
                    loss_weights: Sequence[float] | None = None) -> LossOutput:
    """Weighted sum of one or more registered preference losses (TRL's list `loss_type` style).

        L_i = sum_k w_k * L_k,i        e.g. loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]

    Metrics: those of the first loss plus `loss/<name>` (per pair, unweighted) for each component
    when there are several.
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ValueError("preference_loss: loss_type is empty; give at least one name, e.g. 'sigmoid'")
    weights = check_loss_weights(names, loss_weights, "preference_loss")
    total, metrics = None, {}
    for name, w in zip(names, weights):
        out = PREFERENCE_LOSSES[name](batch, params)
        total = w * out.losses if total is None else total + w * out.losses
        for k, v in out.metrics.items():
            metrics.setdefault(k, v)
        if len(names) > 1:
            metrics[f"loss/{name}"] = out.losses.detach()
    return LossOutput(losses=total, metrics=metrics)
