"""Typed configs of the online commands: `online-dpo`, `grpo`, `rloo`, `ppo`, and the offline-round jobs
`sample` and `annotate`.

    command: grpo                        # online-dpo | grpo | rloo | ppo
    model:     {path: tiny:llama}        # the policy (ModelSettings)
    data:      {path: prompts.jsonl}     # the prompts: any records (their prompts are used), as for `generate`
    adapter:   {kind: lora}              # AdapterConfig
    annotator: {kind: function, function: alignkit.rewards:digit_fraction}
    sampling:  {num_samples: 4, max_new_tokens: 32}    # alignkit.online.SamplingConfig
    method:    {prompts_per_step: 8, kl_coef: 0.05}      # the objective (GRPOMethod)
    train:     {max_steps: 100, learning_rate: 1e-5, seed: 0}   # the same train keys as offline commands

`train` takes `alignkit.settings.train.ONLINE_TRAIN_KEYS` (the shared vocabulary); `method` the objective's
parameters, one class per command (`OnlineDPOMethod`, `GRPOMethod`, `PPOMethod`; rloo uses GRPO's). At use
time `trainer_config()` maps train + method + sampling onto the trainer's own config class (`OnlineDPOConfig`,
`GRPOConfig`, `RLOOConfig`, `PPOConfig`, imported then: no torch when settings are imported); its checks run
when the config is loaded and are reported under `method`. tests/cli/test_settings_vocabulary.py checks that
every field of those classes is reachable and that the defaults agree.

`annotator` is one flat section for the three annotator kinds; a key that the chosen kind does not use is an
error naming it. A reward model or judge is loaded like a policy: `path` (a folder, or `tiny:<arch>` for a
random smoke-test model) plus an optional `adapter_path` (e.g. the `model/` folder of an `alignkit rm` run).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.adapters.config import AdapterConfig
from alignkit.settings.bounds import check_bounds
from alignkit.settings.online_checks import CLIP_KEYS, check_accumulation, check_clip_acts
from alignkit.settings.sampling import SamplingConfig, refuse_greedy_ignored
from alignkit.settings.sections import (PROMPT_DATA_KEYS, DataSettings, DType, ModelSettings, PreferenceObjective,
                                       RefSync, check_prompt_data, check_ptx, loss_names, reference_free,
                                       refuse_ref_sync_adapter,
                                       refuse_ref_sync_reference, refuse_switched_off_trained_modules)
from alignkit.settings.tiny import tiny_arch
from alignkit.settings.train import ONLINE_COMMANDS, ONLINE_LEARNING_RATES, check_train, online_trainer_kwargs
from alignkit.settings.trl_names import trl_loss_type_message
from alignkit.settings.typed import ConfigError, unknown_key_error

# alignkit.online.feedback.FEEDBACK_MODES and alignkit.online.dpo.PAIR_MODES (a test checks they agree)
FEEDBACK_MODES = ("pointwise", "best_worst", "random_pairs", "judge_pairs", "best_of_n")
PAIR_MODES = ("best_worst", "random_pairs", "judge_pairs")


# ---------------------------------------------------------------------------------------------- annotator

@dataclass
class AnnotatorSettings:
    kind: Literal["reward_model", "function", "judge"]
    # function
    # "module:function" (or a list of them), e.g. alignkit.rewards:digit_fraction
    function: str | list[str] | None = None
    weights: list[float] | None = None  # several functions: the reward is their weighted sum (default 1 each)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the function
    batched: bool = False  # fn(prompts, responses) -> one score per item
    # reward_model / judge: the model, loaded like a policy
    path: str | None = None  # a folder, a hub id, or tiny:<arch> (random: smoke tests only)
    adapter_path: str | None = None  # an adapter (or full model) folder trained on `path`
    dtype: DType = "float32"
    # e.g. "cuda:1"; default: where the model loads (the annotator may differ from the policy)
    device: str | None = None
    batch_size: int = 8
    # reward_model
    formatter: str = "auto"
    max_length: int | None = 1024
    add_eos: bool | None = None
    # function / judge: what to do with an item that cannot be scored
    on_failure: Literal["skip", "default"] = "skip"
    default_score: float | None = None
    # judge: a rubric prompt ({prompt}, {response}) and the regex that finds the score in the answer
    template: str | None = None
    pattern: str | None = None
    score_range: list[float] | None = None  # [low, high]
    normalize: bool = True
    max_new_tokens: int = 16
    chat: bool | None = None  # the judge's chat template: null (auto) uses it when the tokenizer has one; true
    #   requires one (refused when the judge loads, before the run folder); false sends plain text
    pair_template: str | None = None
    pair_pattern: str | None = None

    KEYS = {  # annotator kind -> the keys it uses (a plain class attribute, not a config key)
        "function": ("function", "weights", "kwargs", "batched", "on_failure", "default_score"),
        "reward_model": ("path", "adapter_path", "dtype", "device", "batch_size", "formatter", "max_length", "add_eos"),
        "judge": ("path", "adapter_path", "dtype", "device", "batch_size", "on_failure", "default_score", "template",
                  "pattern", "score_range", "normalize", "max_new_tokens", "chat", "pair_template", "pair_pattern"),
    }

    def __post_init__(self) -> None:
        for name in self._non_default():
            if name not in self.KEYS[self.kind]:
                users = [k for k, keys in self.KEYS.items() if name in keys]
                raise ConfigError(f"annotator.{name}: not used by kind {self.kind!r} (only by {', '.join(users)}); "
                                  f"remove it or change annotator.kind")
        if self.kind == "function":
            self._check_function()
        elif self.path is None:
            raise ConfigError(f"annotator.path: required for kind {self.kind!r} (a model folder, or tiny:<arch>)")
        else:
            tiny_arch(self.path, "annotator.path")
        if self.score_range is not None and len(self.score_range) != 2:
            raise ConfigError(f"annotator.score_range: expected [low, high], got {self.score_range}")
        if self.on_failure == "default" and self.default_score is None:
            raise ConfigError("annotator.default_score: required when annotator.on_failure is 'default'")
        if self.on_failure == "skip" and self.default_score is not None:
            raise ConfigError(f"annotator.default_score: {self.default_score} is read only with "
                              "annotator.on_failure=default (now 'skip': unscored items are dropped), so it would be "
                              "ignored; set annotator.on_failure=default or remove it")

    def _non_default(self) -> list[str]:
        out = []
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name != "kind" and getattr(self, f.name) != default:
                out.append(f.name)
        return out

    _allow_code = False  # set by check_code_allowed (the CLI's --allow-code): then any module is imported

    def _check_function(self) -> None:
        if self.function is None:
            raise ConfigError("annotator.function: required for kind 'function' ('module:function', e.g. "
                              "alignkit.rewards:digit_fraction)")
        from alignkit.online.annotators import reward_convention

        specs = self.function if isinstance(self.function, list) else [self.function]
        if self.weights is not None and len(self.weights) != len(specs):
            raise ConfigError(f"annotator.weights: {len(self.weights)} weight(s) for {len(specs)} function(s); give "
                              f"one per entry of annotator.function")
        for i, w in enumerate(self.weights or []):
            if not math.isfinite(w):  # NaN made every score NaN, dropped as unscored without a word
                raise ConfigError(f"annotator.weights[{i}]: {w} is not a finite number; the reward is the weighted "
                                  "sum of the functions' scores, so give each function a finite weight")
        if self.weights and not any(self.weights):
            raise ConfigError(f"annotator.weights: {self.weights} are all 0, so every reward would be 0; give a "
                              "nonzero weight (a 0 weight logs a function without rewarding it)")
        for spec in specs:
            if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
                raise ConfigError(f"annotator.function: {spec!r} must be written 'module:function', e.g. "
                                  "'alignkit.rewards:digit_fraction'")
            if not code_is_alignkits(spec) and not self._allow_code:
                continue  # not imported while a config is read (nor by --dry-run): see check_code_allowed
            from alignkit.online.annotators import load_function

            try:
                fn = load_function(spec)
            except ValueError as e:
                raise ConfigError(f"annotator.function: {e}") from None
            try:
                reward_convention(fn, self.kwargs, spec)
            except ValueError as e:
                if self.kwargs:
                    try:
                        reward_convention(fn, {}, spec)
                    except ValueError:
                        pass
                    else:  # the function is fine; the extra keyword arguments do not fit it
                        raise ConfigError(f"annotator.kwargs: {spec} cannot be called as fn(prompt, response, "
                                          f"**{self.kwargs}); remove the keys it does not take") from None
                raise ConfigError(f"annotator.function: {e}") from None

    def arguments(self) -> dict[str, Any]:
        """Constructor keyword arguments of the annotator class (besides the model and tokenizer)."""
        keys = [k for k in self.KEYS[self.kind] if k not in ("path", "adapter_path", "device", "dtype", "function")]
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}  # None: the class's default
        if self.kind == "function":
            out["fn"] = self.function
        if out.get("score_range") is not None:
            out["score_range"] = tuple(out["score_range"])
        return out


# A judge's keys by what it is asked: a rubric for pointwise scores (every online objective, and the feedback modes
# other than judge_pairs), a pair prompt for judge_pairs (JudgeAnnotator.annotate / prefer_batch)
JUDGE_POINTWISE_KEYS = ("template", "pattern", "score_range", "normalize", "on_failure", "default_score")
JUDGE_PAIR_KEYS = ("pair_template", "pair_pattern")


def check_judge_reads(settings: AnnotatorSettings, feedback: str | None, where: str) -> None:
    """ConfigError naming the first judge key the feedback mode never asks the judge for: judge_pairs asks pairs only,
    every other mode scores each response (`feedback` None: a command that only scores, GRPO / RLOO / PPO, named by
    `where`; else `where` is the feedback key)."""
    if settings.kind != "judge":
        return
    pairwise = feedback == "judge_pairs"
    unread = JUDGE_POINTWISE_KEYS if pairwise else JUDGE_PAIR_KEYS
    for name in settings._non_default():
        if name in unread:
            mode = f"{where}={feedback}" if feedback else where
            asks = ("compares pairs with annotator.pair_template / pair_pattern and never scores a response on its own"
                    if pairwise else "scores each response with annotator.template / pattern and never compares pairs")
            fix = f"set {where}=judge_pairs" if not pairwise else f"use another {where}"
            raise ConfigError(f"annotator.{name}: {mode} {asks}, so it would be ignored; remove annotator.{name}"
                              + ("" if feedback is None else f" or {fix}"))


ALLOWED_CODE = ("alignkit.rewards",)  # modules whose functions a config may name without --allow-code


def code_is_alignkits(spec: str) -> bool:
    """True for 'module:function' specs in alignkit's own registry of reward functions (`ALLOWED_CODE`)."""
    module = spec.split(":", 1)[0]
    return module in ALLOWED_CODE


def check_code_allowed(settings: AnnotatorSettings | None, allow_code: bool) -> None:
    """A config that names code outside `ALLOWED_CODE` runs it only when the user allows it (`--allow-code`):
    without, a ConfigError; with, the functions are imported and their signatures checked now."""
    if settings is None or settings.kind != "function" or settings.function is None:
        return
    specs = settings.function if isinstance(settings.function, list) else [settings.function]
    foreign = [s for s in specs if not code_is_alignkits(s)]
    if foreign and not allow_code:
        raise ConfigError(f"annotator.function: {foreign[0]!r} is code outside alignkit's reward functions "
                          f"({', '.join(ALLOWED_CODE)}); a config can run it only if you pass --allow-code, and it "
                          "will be imported and called on every sample: pass the flag only for code you have read")
    if foreign:
        settings._allow_code = True
        try:
            settings._check_function()
        finally:
            settings._allow_code = False


# ---------------------------------------------------------------------------------------------- feedback

_BUILDER_FIXED = ("samples", "scores", "annotator")


def check_feedback(mode: str, kwargs: dict[str, Any], reweighters: list[Any], where: str = "") -> None:
    """`kwargs` against the feedback builder's parameters, and every reweighter spec buildable."""
    from alignkit.online import REWEIGHTERS, build_reweighter, feedback

    builders = {"pointwise": feedback.pointwise, "best_worst": feedback.best_worst_pairs,
                "random_pairs": feedback.random_pairs, "judge_pairs": feedback.judge_pairs,
                "best_of_n": feedback.best_of_n}
    params = [p for p in inspect.signature(builders[mode]).parameters if p not in _BUILDER_FIXED]
    for key in kwargs:
        if key not in params:
            raise unknown_key_error(f"{where}feedback_kwargs", str(key), params)
    margin = kwargs.get("min_margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0):
        raise ConfigError(f"{where}feedback_kwargs.min_margin: {margin!r} must be a number >= 0: a pair's margin (its "
                          "chosen score minus its rejected score) is never negative, so a negative one passes pairs "
                          "of equal scores, whose chosen side is arbitrary (best_worst pairs an all-equal group's "
                          "first sample with itself); use 0 (pairs with any score difference) or more")
    count = kwargs.get("pairs_per_prompt")
    if mode == "random_pairs" and count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                                         or count < 1):
        raise ConfigError(f"{where}feedback_kwargs.pairs_per_prompt: {count!r} must be a whole number >= 1: "
                          "random_pairs forms up to that many pairs a prompt (0 formed none, a negative count left "
                          "out that many of the candidate pairs)")
    for i, spec in enumerate(reweighters):
        try:
            reweighter = build_reweighter(spec)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{where}reweighters[{i}]: {_message(e)}") from None
        need = unmet_need(reweighter, mode)
        if need is not None:
            works = ", ".join(n for n in sorted(REWEIGHTERS) if unmet_need(REWEIGHTERS[n](), mode) is None)
            raise ConfigError(f"{where}reweighters[{i}]: {reweighter.name} weighs records by their {need}, and "
                              f"{where}feedback={mode} gives records with no {need}, so the first step would stop; "
                              f"remove it (with this feedback: {works or 'none'})"
                              + (" or use feedback best_worst / random_pairs" if reweighter.reads_margin else ""))


def unmet_need(reweighter: Any, mode: str) -> str | None:
    """What `reweighter` reads from each record that feedback `mode`'s records never carry (None: nothing): its
    declared needs (`Reweighter.reads_margin`, `reads_meta`) against `feedback.MARGIN_MODES` / `RECORD_META`."""
    from alignkit.online.feedback import MARGIN_MODES, RECORD_META

    if reweighter.reads_margin and mode not in MARGIN_MODES:  # e.g. a judge's verdict: no scores to subtract
        return "margin"
    missing = [k for k in reweighter.reads_meta if k not in RECORD_META[mode]]
    return f"meta[{missing[0]!r}]" if missing else None


def _message(e: Exception) -> str:
    """The text of an error (a KeyError's str() would add quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# ---------------------------------------------------------------------------------------------- online runs

@dataclass
class OnlineMethod:
    """The online objective's keys shared by every online command (the optimisation keys are `train`'s)."""

    prompts_per_step: int = 8  # prompts sampled per step (over all processes)
    epochs_per_step: int = 1  # optimisation passes over each step's batch (PPO epochs)
    mini_batch_size: int | None = None  # items (samples or pairs) per optimizer step, over all processes; null: all
    kl_estimator: str = "k3"  # alignkit.losses.KL_ESTIMATORS (checked when loaded)
    reward_normalization: Literal["none", "running", "group"] = "none"  # alignkit.online.normalize
    reward_clip: float | None = None
    reference: Literal["auto", "adapter_off", "copy"] = "auto"
    generation_batch_size: int = 64
    chunk_size: int = 1024
    share_prompt: bool | None = None  # each prompt's samples as one row in the training / reference forwards (sdpa,
    #   eager); null: on where it runs as varlen rows (CPU, sdpa, no ReFT), off elsewhere
    generation_backend: Literal["transformers", "vllm"] = "transformers"  # vllm: colocated engine (full, LoRA)
    vllm: dict[str, Any] = field(default_factory=dict)  # colocate: vllm.LLM arguments (alignkit.online.vllm_generation)
    vllm_mode: Literal["colocate", "server"] = "colocate"  # server: `alignkit vllm-serve` in another process
    vllm_server_url: str = "http://127.0.0.1:8000"  # server mode: the vllm-serve URL (alignkit.online.vllm_client)
    vllm_server_timeout: float = 300.0  # server mode: seconds to wait for it to come up, and for each answer
    stall_steps: int = 20  # stop after this many steps in a row without reward signal (every prompt's samples
    #   scored alike; online DPO: no pair formed; PPO: every response scored alike); 0: never stop, only warn
    ref_sync: RefSync | None = None  # TR-DPO: the reference copy moves towards the policy every ref_sync.steps
    #   optimizer updates (alignkit.online.ref_sync); full finetuning only


@dataclass
class OnlineDPOMethod(PreferenceObjective, OnlineMethod):
    """`alignkit online-dpo`: the preference loss on pairs built from each step's samples (the same keys as the
    offline `dpo` command's method: `PreferenceObjective`)."""

    feedback: Literal[PAIR_MODES] = "best_worst"
    feedback_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {min_margin: 0.1}
    reweighters: list[Any] = field(default_factory=list)  # e.g. [margin_sigmoid]


@dataclass
class KLPenaltyMethod(OnlineMethod):
    kl_coef: float = 0.05  # coefficient of the KL to the reference (initial value when adaptive)
    kl_target: float | None = None  # set: adaptive KL control (Ziegler et al. 2019) towards this sequence KL
    kl_horizon: int = 10000


@dataclass
class GRPOMethod(KLPenaltyMethod):
    """`alignkit grpo` / `alignkit rloo` (the command picks the advantage: group-normalised or leave-one-out)."""

    scale_by_std: bool = True  # grpo only
    std_scope: Literal["group", "batch"] = "group"  # grpo, scale_by_std: each prompt's reward std or the step's
    mask_truncated_completions: bool = False  # samples cut at sampling.max_new_tokens get no loss (TRL's, DAPO's)
    kl_in_reward: bool = False  # the KL as a reward penalty, kl_coef x summed KL (TRL's RLOO; with kl_estimator k1)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    # TRL's grpo, dapo, dr_grpo, luspo
    aggregation: Literal["sequence_mean", "token_sum", "max_length_mean", "sequence_sum"] = "sequence_mean"
    importance_sampling: Literal["token", "sequence"] = "token"  # sequence: GSPO (TRL's importance_sampling_level)
    top_entropy_quantile: float = 1.0  # < 1: policy terms only on the top quantile of tokens by entropy (TRL's)
    cispo_max: float | None = None  # set: CISPO's loss, the weight min(ratio, cispo_max) detached (TRL's cispo)
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"  # grpo


RLOOMethod = GRPOMethod


@dataclass
class PPOObjective:
    """PPO's keys (value head + GAE), typed once: `method` of `alignkit ppo` and `alignkit.online.PPOConfig`."""

    epochs_per_step: int = 4
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float | None = 0.2
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    # PPO-ptx (InstructGPT): each update adds ptx_coef x the NLL of a batch of data.ptx_path's SFT records (the
    # library's PPOTrainer: its ptx_data); 0: off. ptx_batch_size: records per update, None: the update's samples
    # (run in micro-batches of the update's micro-batch size: train.gradient_accumulation_steps bounds them too)
    ptx_coef: float = 0.0
    ptx_batch_size: int | None = None


@dataclass
class PPOMethod(PPOObjective, KLPenaltyMethod):
    """`alignkit ppo`: value head + GAE."""


@dataclass
class OnlineRunConfig:
    """Sections shared by the online commands; subclasses add `method` and name the trainer config class."""

    model: ModelSettings
    annotator: AnnotatorSettings
    data: DataSettings = field(default_factory=DataSettings)  # the prompts
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=4, max_new_tokens=64))
    train: dict[str, Any] = field(default_factory=dict)  # alignkit.settings.train.ONLINE_TRAIN_KEYS
    output_dir: str = "runs/online"

    command = "online-dpo"  # a plain class attribute: which trainer config class and train defaults apply
    checks_own_bounds = True  # __post_init__ runs check_bounds (load_config does not again)

    def trainer_config(self) -> Any:
        """The online trainer's config (alignkit.online): train + method + sampling (imports torch). The run folder
        saves the model itself: save_at_end off. The method's bounds, checked when this config was built (named
        as the config spells them), are not checked again while the method is unchanged."""
        import alignkit.online as online

        cls = {"online-dpo": online.OnlineDPOConfig, "grpo": online.GRPOConfig, "rloo": online.RLOOConfig,
               "ppo": online.PPOConfig}[self.command]
        kw = {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)}
        if self.command == "online-dpo":
            from alignkit.losses import PreferenceParams

            kw["params"] = PreferenceParams(**{k: kw.pop(k) for k in PreferenceObjective.PARAMS})
            kw["beta"] = kw["params"].beta
        kw.update(online_trainer_kwargs(self.train))
        kw.update(sampling=self.sampling, save_at_end=False, formatter=self.data.formatter,
                  max_prompt_length=self.data.max_prompt_length)
        return cls(**kw, bounds_checked=self.method == getattr(self, "_bounds_checked_method", None))

    def __post_init__(self) -> None:
        self.train = {"learning_rate": ONLINE_LEARNING_RATES[self.command], **(self.train or {})}
        check_train(self.train, self.command)
        check_prompt_data(self.data, self.command)
        check_ptx(self.method, self.data.ptx_path)
        if self.train.get("eval_steps") is not None and self.data.eval_path is None and not self.data.eval_fraction:
            raise ConfigError(f"train.eval_steps: {self.train['eval_steps']} evaluates on held-out prompts, and data "
                              "gives none: set data.eval_path or data.eval_fraction, or remove train.eval_steps")
        from alignkit.losses import KL_ESTIMATORS, PREFERENCE_LOSSES

        m = self.method
        refuse_ref_sync_adapter(m.ref_sync, self.adapter)
        refuse_ref_sync_reference(m.ref_sync, m.reference)
        reads = (not reference_free(loss_names(m.loss_type)) if hasattr(m, "loss_type")  # online DPO's uses_reference
                 else getattr(m, "kl_coef", 0) != 0 or getattr(m, "kl_target", None) is not None)
        refuse_switched_off_trained_modules(self.adapter, m.reference, reads or m.reference != "auto")
        names = {"kl_estimator": ([m.kl_estimator], KL_ESTIMATORS)}
        if hasattr(m, "loss_type"):
            names["loss_type"] = (loss_names(m.loss_type), PREFERENCE_LOSSES)
        for key, (values, registry) in names.items():
            for v in values:
                trl = trl_loss_type_message(f"method.{key}", v) if key == "loss_type" else None
                if v not in registry and trl is not None:
                    raise ConfigError(trl)
                if v not in registry:
                    raise ConfigError(f"method.{key}: {v!r} is not registered; valid: {', '.join(sorted(registry))}")
        check_bounds(self)  # out-of-range values first, named as the config spells them (then the trainer's checks)
        self._bounds_checked_method = copy.deepcopy(self.method)  # trainer_config: these values need no second check
        # the library configs' own checks (OnlineConfig, OnlineDPOConfig), first here to name the keys as this config
        # spells them
        check_accumulation(m, self.train.get("gradient_accumulation_steps", 1), self.sampling.num_samples)
        check_clip_acts(m, m.prompts_per_step * self.sampling.num_samples)
        if hasattr(m, "feedback"):
            check_feedback(m.feedback, m.feedback_kwargs, m.reweighters, "method.")
        if getattr(m, "feedback", None) == "judge_pairs":  # no pointwise score: nothing to normalise or clip
            for key in ("reward_normalization", "reward_clip"):
                if getattr(m, key) != getattr(type(m), key):
                    raise ConfigError(f"method.{key}: {getattr(m, key)!r} acts on each response's reward, and "
                                      "method.feedback=judge_pairs gives none (the judge compares pairs), so it would "
                                      f"be ignored; remove method.{key} or use another method.feedback")
        try:
            self.trainer_config()
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"method: {_message(e)}") from None
        gdpo = getattr(m, "multi_objective_aggregation", "") == "normalize_then_sum"
        if gdpo and self.annotator.on_failure == "default":
            raise ConfigError("annotator.on_failure: 'default' fills one combined default_score, and method."
                              "multi_objective_aggregation=normalize_then_sum normalises each function's own scores, "
                              "so it would be ignored; use on_failure 'skip' (an item no function scored gets 0)")
        check_judge_reads(self.annotator, getattr(m, "feedback", None),
                          "method.feedback" if hasattr(m, "feedback") else f"alignkit {self.command}")


@dataclass
class OnlineDPORunConfig(OnlineRunConfig):
    method: OnlineDPOMethod = field(default_factory=OnlineDPOMethod)
    command = "online-dpo"


@dataclass
class GRPORunConfig(OnlineRunConfig):
    method: GRPOMethod = field(default_factory=GRPOMethod)
    command = "grpo"


@dataclass
class RLOORunConfig(OnlineRunConfig):
    method: GRPOMethod = field(default_factory=GRPOMethod)
    command = "rloo"


@dataclass
class PPORunConfig(OnlineRunConfig):
    method: PPOMethod = field(default_factory=PPOMethod)
    command = "ppo"


# ---------------------------------------------------------------------------------------------- offline rounds

@dataclass
class SampleConfig:
    """`alignkit sample`: the policy's responses to the prompts -> `<output_dir>/samples.jsonl` + manifest.json."""

    model: ModelSettings  # the policy: path (+ adapter_path)
    data: DataSettings = field(default_factory=DataSettings)  # the prompts
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=4, max_new_tokens=64))
    batch_size: int = 8
    overwrite: bool = False  # sample again even when the folder holds a complete samples.jsonl (--overwrite)
    output_dir: str = "runs/rounds/round-000"  # the round folder

    def __post_init__(self) -> None:
        check_prompt_data(self.data, "sample")
        refuse_greedy_ignored(self.sampling, "sampling")


@dataclass
class AnnotateConfig:
    """`alignkit annotate`: score `<output_dir>/samples.jsonl`, build records -> `<output_dir>/records.jsonl`."""

    annotator: AnnotatorSettings
    feedback: Literal[FEEDBACK_MODES] = "best_worst"  # best_of_n: SFT records (augmentation by reward filtering)
    feedback_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {k: 2} for best_of_n, {min_margin: 0.1}
    reweighters: list[Any] = field(default_factory=list)  # e.g. [margin_sigmoid]
    overwrite: bool = False  # annotate again even when the folder holds a complete records.jsonl (--overwrite)
    output_dir: str = "runs/rounds/round-000"  # the round folder written by `alignkit sample`

    def __post_init__(self) -> None:
        check_feedback(self.feedback, self.feedback_kwargs, self.reweighters)
        check_judge_reads(self.annotator, self.feedback, "feedback")

    # `alignkit.settings.load` checks the `data` and `model` sections of every config; annotate has neither (it
    # reads output_dir's samples; its model is the annotator's, checked above). Read-only views for those checks.
    @property
    def data(self) -> DataSettings:
        return DataSettings(path=self.output_dir)

    @property
    def model(self) -> ModelSettings:
        return ModelSettings(path=self.annotator.path or "")


ONLINE_CONFIG_CLASSES: dict[str, type] = {"online-dpo": OnlineDPORunConfig, "grpo": GRPORunConfig,
                                          "rloo": RLOORunConfig, "ppo": PPORunConfig, "sample": SampleConfig,
                                          "annotate": AnnotateConfig}

__all__ = ["JUDGE_PAIR_KEYS", "JUDGE_POINTWISE_KEYS", "check_judge_reads", "PROMPT_DATA_KEYS", "check_prompt_data",
           "ALLOWED_CODE", "check_code_allowed", "code_is_alignkits", "ONLINE_COMMANDS", "ONLINE_CONFIG_CLASSES",
           "AnnotateConfig", "AnnotatorSettings", "GRPOMethod", "GRPORunConfig", "OnlineDPOMethod",
           "OnlineDPORunConfig", "OnlineRunConfig", "PPOMethod", "PPOObjective", "PPORunConfig", "RLOOMethod",
           "RLOORunConfig", "SampleConfig", "check_feedback", "unmet_need", "CLIP_KEYS", "check_accumulation",
           "check_clip_acts", "FEEDBACK_MODES", "PAIR_MODES", "OnlineMethod"]
