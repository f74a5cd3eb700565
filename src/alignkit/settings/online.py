"""Typed configs of the online commands: `online-dpo`, `grpo`, `rloo`, `ppo`, and the offline-round jobs
`sample` and `annotate`.

    command: grpo                        # online-dpo | grpo | rloo | ppo
    model:     {path: tiny:llama}        # the policy (ModelSettings)
    data:      {path: prompts.jsonl}     # the prompts: any records (their prompts are used), as for `generate`
    adapter:   {kind: lora}              # AdapterConfig
    annotator: {kind: function, function: alignkit.rewards:digit_fraction}
    sampling:  {num_samples: 4, max_new_tokens: 32}    # alignkit.online.SamplingConfig
    method:    {steps: 100, learning_rate: 1e-5, kl_coef: 0.05}   # the trainer's config, minus `sampling`

`method` is derived from the trainer's own config class (`OnlineDPOConfig`, `GRPOConfig`, `RLOOConfig`,
`PPOConfig`): the same fields, names, types and defaults, without `sampling` (its own section), so the two
never drift apart. The trainer's own checks run at load time and are reported under `method`.

`annotator` is one flat section for the three annotator kinds; a key that the chosen kind does not use is an
error naming it. A reward model or judge is loaded like a policy: `path` (a folder, or `tiny:<arch>` for a
random smoke-test model) plus an optional `adapter_path` (e.g. the `model/` folder of an `alignkit rm` run).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.models.adapters import AdapterConfig
from alignkit.online import (FEEDBACK_MODES, GRPOConfig, OnlineDPOConfig, PPOConfig, RLOOConfig,
                             SamplingConfig, build_reweighter, load_function)
from alignkit.online import feedback as _feedback
from alignkit.settings.sections import DataSettings, ModelSettings
from alignkit.settings.typed import ConfigError, unknown_key_error


# ---------------------------------------------------------------------------------------------- annotator

@dataclass
class AnnotatorSettings:
    kind: Literal["reward_model", "function", "judge"]
    # function
    function: str | list[str] | None = None  # "module:function" (or a list of them), e.g. alignkit.rewards:digit_fraction
    weights: list[float] | None = None  # several functions: the reward is their weighted sum (default 1 each)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the function
    batched: bool = False  # fn(prompts, responses) -> one score per item
    # reward_model / judge: the model, loaded like a policy
    path: str | None = None  # a folder, a hub id, or tiny:<arch> (random: smoke tests only)
    adapter_path: str | None = None  # an adapter (or full model) folder trained on `path`
    dtype: str = "float32"
    device: str | None = None  # e.g. "cuda:1"; default: where the model loads (the annotator may differ from the policy)
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
    chat: bool = True
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
        elif self.path.startswith("tiny:"):
            from alignkit.models.tiny import ARCHITECTURES

            if self.path[len("tiny:"):] not in ARCHITECTURES:
                raise ConfigError(f"annotator.path: {self.path!r}: unknown tiny architecture; valid: "
                                  + ", ".join("tiny:" + a for a in ARCHITECTURES))
        if self.score_range is not None and len(self.score_range) != 2:
            raise ConfigError(f"annotator.score_range: expected [low, high], got {self.score_range}")
        if self.on_failure == "default" and self.default_score is None:
            raise ConfigError("annotator.default_score: required when annotator.on_failure is 'default'")

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
        for spec in specs:
            if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
                raise ConfigError(f"annotator.function: {spec!r} must be written 'module:function', e.g. "
                                  "'alignkit.rewards:digit_fraction'")
            if not code_is_alignkits(spec) and not self._allow_code:
                continue  # not imported while a config is read (nor by --dry-run): see check_code_allowed
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

PAIR_BUILDERS = {"pointwise": _feedback.pointwise, "best_worst": _feedback.best_worst_pairs,
                 "random_pairs": _feedback.random_pairs, "judge_pairs": _feedback.judge_pairs,
                 "best_of_n": _feedback.best_of_n}
_BUILDER_FIXED = ("samples", "scores", "annotator")


def check_feedback(mode: str, kwargs: dict[str, Any], reweighters: list[Any], where: str = "") -> None:
    """`kwargs` against the feedback builder's parameters, and every reweighter spec buildable."""
    params = [p for p in inspect.signature(PAIR_BUILDERS[mode]).parameters if p not in _BUILDER_FIXED]
    for key in kwargs:
        if key not in params:
            raise unknown_key_error(f"{where}feedback_kwargs", str(key), params)
    for i, spec in enumerate(reweighters):
        try:
            build_reweighter(spec)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{where}reweighters[{i}]: {_message(e)}") from None


def _message(e: Exception) -> str:
    """The text of an error (a KeyError's str() would add quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# ---------------------------------------------------------------------------------------------- online runs

OWN_SECTIONS = ("sampling", "formatter", "max_prompt_length")  # the last two come from `data`


def method_section(config_class: type, name: str) -> type:
    """A dataclass with `config_class`'s fields (types, defaults) minus those that are their own section."""
    hints = typing.get_type_hints(config_class)
    fields = []
    for f in dataclasses.fields(config_class):
        if f.name in OWN_SECTIONS or not f.init:
            continue
        default = ({"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING
                   else {"default": f.default})
        fields.append((f.name, hints[f.name], field(**default)))
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__ = __name__
    cls.__doc__ = f"The `method` section: {config_class.__name__}'s fields without {', '.join(OWN_SECTIONS)}."
    return cls


OnlineDPOMethod = method_section(OnlineDPOConfig, "OnlineDPOMethod")
GRPOMethod = method_section(GRPOConfig, "GRPOMethod")
RLOOMethod = method_section(RLOOConfig, "RLOOMethod")
PPOMethod = method_section(PPOConfig, "PPOMethod")


@dataclass
class OnlineRunConfig:
    """Sections shared by the online commands; subclasses add `method` and name the trainer config class."""

    model: ModelSettings
    annotator: AnnotatorSettings
    data: DataSettings = field(default_factory=DataSettings)  # the prompts
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=4, max_new_tokens=64))
    output_dir: str = "runs/online"

    trainer_config_class = OnlineDPOConfig

    def trainer_config(self) -> Any:
        """The trainer's config: `method` + `sampling` (the run folder saves the model itself: save_at_end off)."""
        kw = {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)}
        kw.update(sampling=self.sampling, save_at_end=False, formatter=self.data.formatter,
                  max_prompt_length=self.data.max_prompt_length)
        return self.trainer_config_class(**kw)

    def __post_init__(self) -> None:
        from alignkit.losses import KL_ESTIMATORS, PREFERENCE_LOSSES

        m = self.method
        names = {"kl_estimator": ([m.kl_estimator], KL_ESTIMATORS)}
        if hasattr(m, "loss_type"):
            names["loss_type"] = ([m.loss_type] if isinstance(m.loss_type, str) else m.loss_type, PREFERENCE_LOSSES)
        for key, (values, registry) in names.items():
            for v in values:
                if v not in registry:
                    raise ConfigError(f"method.{key}: {v!r} is not registered; valid: {', '.join(sorted(registry))}")
        try:
            self.trainer_config()
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"method: {_message(e)}") from None
        if hasattr(m, "feedback"):
            check_feedback(m.feedback, m.feedback_kwargs, m.reweighters, "method.")


@dataclass
class OnlineDPORunConfig(OnlineRunConfig):
    method: OnlineDPOMethod = field(default_factory=OnlineDPOMethod)
    trainer_config_class = OnlineDPOConfig


@dataclass
class GRPORunConfig(OnlineRunConfig):
    method: GRPOMethod = field(default_factory=GRPOMethod)
    trainer_config_class = GRPOConfig


@dataclass
class RLOORunConfig(OnlineRunConfig):
    method: RLOOMethod = field(default_factory=RLOOMethod)
    trainer_config_class = RLOOConfig


@dataclass
class PPORunConfig(OnlineRunConfig):
    method: PPOMethod = field(default_factory=PPOMethod)
    trainer_config_class = PPOConfig


# ---------------------------------------------------------------------------------------------- offline rounds

@dataclass
class SampleConfig:
    """`alignkit sample`: the policy's responses to the prompts -> `<output_dir>/samples.jsonl` + manifest.json."""

    model: ModelSettings  # the policy: path (+ adapter_path)
    data: DataSettings = field(default_factory=DataSettings)  # the prompts
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=4, max_new_tokens=64))
    batch_size: int = 8
    overwrite: bool = False  # sample again even when the folder holds a complete samples.jsonl
    output_dir: str = "runs/rounds/round-000"  # the round folder


@dataclass
class AnnotateConfig:
    """`alignkit annotate`: score `<output_dir>/samples.jsonl`, build records -> `<output_dir>/records.jsonl`."""

    annotator: AnnotatorSettings
    feedback: Literal[FEEDBACK_MODES] = "best_worst"  # best_of_n: SFT records (augmentation by reward filtering)
    feedback_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {k: 2} for best_of_n, {min_margin: 0.1}
    reweighters: list[Any] = field(default_factory=list)  # e.g. [margin_sigmoid]
    overwrite: bool = False  # annotate again even when the folder holds a complete records.jsonl
    output_dir: str = "runs/rounds/round-000"  # the round folder written by `alignkit sample`

    def __post_init__(self) -> None:
        check_feedback(self.feedback, self.feedback_kwargs, self.reweighters)

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
ONLINE_COMMANDS = ("online-dpo", "grpo", "rloo", "ppo")

__all__ = ["ALLOWED_CODE", "check_code_allowed", "code_is_alignkits", "ONLINE_COMMANDS", "ONLINE_CONFIG_CLASSES", "AnnotateConfig", "AnnotatorSettings", "GRPOMethod",
           "GRPORunConfig", "OnlineDPOMethod", "OnlineDPORunConfig", "OnlineRunConfig", "PPOMethod", "PPORunConfig",
           "RLOOMethod", "RLOORunConfig", "SampleConfig", "check_feedback", "method_section"]
