"""The typed sections of a run config, and one config class per command (`CONFIG_CLASSES`).

`adapter` is `alignkit.adapters.config.AdapterConfig` (torch-free; applied by `alignkit.adapters`), `generation`
`alignkit.settings.sampling.SamplingConfig`, `train` the shared vocabulary of `alignkit.settings.train`;
`method` fields are the objective's parameters (the trainers' constructor arguments). No torch import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.adapters.config import AdapterConfig
from alignkit.settings.sampling import SamplingConfig, refuse_greedy_ignored
from alignkit.settings.train import (ONLINE_COMMANDS, TRAIN_COMMANDS, TRAIN_DEFAULTS, check_train,
                                    refuse_unread_step_counts)
from alignkit.settings.typed import ConfigError


DType = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]  # every `dtype` key


@dataclass
class ModelSettings:
    path: str  # a local folder, a hub id, or "tiny:<arch>" (llama, qwen2, gpt2, gpt_neox): a random tiny model
    dtype: DType = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None  # default: the model's folder
    adapter_path: str | None = None  # eval / generate / sample: a folder written by a training run (its model/)
    check_base: bool = True  # refuse an adapter_path trained on another base model (its alignkit_base.json)
    # RoPE scaling, e.g. {type: linear, factor: 2.0} (linear, dynamic, yarn, llama3, longrope): alignkit.models.rope
    # (a model already saved with another scaling is refused; add replace: true to replace it)
    rope_scaling: dict[str, Any] | None = None
    kernels: Literal["liger"] | None = None  # fused GPU kernels (needs liger-kernel + CUDA): alignkit.models.efficiency


@dataclass
class DataSettings:
    path: str | list[str] | None = None  # file(s) (JSONL, JSON, Parquet), a dataset folder, or a hub dataset name
    eval_path: str | list[str] | None = None  # held-out data; else `eval_fraction` of `path`
    eval_fraction: float = 0.0
    split_seed: int = 0
    reader: str | None = None  # a name in alignkit.data.READERS; None: detected from the columns
    reader_options: dict[str, Any] = field(default_factory=dict)
    formatter: str = "auto"  # "auto" or a name in alignkit.data.FORMATTERS
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    # the share of records the length limits may drop (over it: the run stops, naming the share; 1: any share)
    max_dropped_fraction: float = 0.5
    add_eos: bool | None = None
    loss_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"  # SFT: which tokens are trained
    split: str | None = None  # the split of a DatasetDict / dataset folder source (default "train")
    eval_split: str | None = None
    # keep only the first N training records (files of a list in order: one left empty warned)
    max_records: int | None = None
    on_invalid: Literal["raise", "skip"] = "raise"
    # alignkit ppo's pretraining mix (PPO-ptx, method.ptx_coef): SFT data read as data.path is, its loss-masked tokens
    ptx_path: str | list[str] | None = None


@dataclass
class SFTMethod:
    loss_type: str = "nll"  # alignkit.losses.SFT_LOSSES
    chunk_size: int = 1024
    weight_normalization: Literal["count", "weighted"] = "count"


@dataclass
class RewardMethod:
    ranked: bool = False  # K-wise ranking loss on ranked records instead of Bradley-Terry pairs
    use_margin: bool = True
    center_rewards_coefficient: float | None = None
    l2_coefficient: float = 0.0
    weight_normalization: Literal["count", "weighted"] = "count"
    disable_dropout: bool = True  # as TRL's RewardConfig (dpo / kto too): no dropout in the model (turn_off_dropout)

    def __post_init__(self) -> None:
        if self.ranked and self.center_rewards_coefficient:
            raise ConfigError(f"method.center_rewards_coefficient: {self.center_rewards_coefficient} is read only by "
                              "the Bradley-Terry pair loss, and method.ranked is true (the K-wise ranking loss), so it "
                              "would be ignored; remove it (method.center_rewards_coefficient=null) or use "
                              "method.l2_coefficient, the ranking loss's regulariser")
        if not self.ranked and self.l2_coefficient:
            raise ConfigError(f"method.l2_coefficient: {self.l2_coefficient} is read only by the K-wise ranking loss "
                              "(method.ranked=true), and method.ranked is false, so it would be ignored; set "
                              "method.ranked=true, or use method.center_rewards_coefficient with pairs")


@dataclass
class PreferenceObjective:
    """A pairwise preference loss and its parameters, each under one name: the `method` keys shared by `dpo` and
    `online-dpo`. The parameters are `alignkit.losses.PreferenceParams`' fields except `bco_delta` (the BCO
    loss's running reward mean: trainer state, not a setting); tests/cli/test_settings_vocabulary.py checks."""

    loss_type: str | list[str] = "sigmoid"  # alignkit.losses.PREFERENCE_LOSSES (a list combines them)
    loss_weights: list[float] | None = None
    beta: float = 0.1  # DPO beta; IPO tau; SimPO beta; hinge 1/delta
    label_smoothing: float = 0.0  # cDPO / robust epsilon
    simpo_gamma_beta_ratio: float = 0.5
    orpo_lambda: float = 0.1
    slic_delta: float = 1.0
    slic_lambda: float = 0.1
    discopop_tau: float = 0.05  # DiscoPOP mixing temperature
    cpo_alpha: float = 1.0  # CPO weight of the chosen NLL
    f_alpha: float = 0.5  # f-DPO alpha-divergence coefficient (loss fdpo_alpha)

    PARAMS = ("beta", "label_smoothing", "simpo_gamma_beta_ratio", "orpo_lambda", "slic_delta", "slic_lambda",
              "discopop_tau", "cpo_alpha", "f_alpha")
    # the parameters one loss alone reads: set away from its default without that loss, it would be ignored
    READ_ONLY_BY = {"simpo_gamma_beta_ratio": ("simpo",), "orpo_lambda": ("orpo",), "slic_delta": ("slic",),
                    "slic_lambda": ("slic",), "discopop_tau": ("discopop",), "cpo_alpha": ("cpo",),
                    "f_alpha": ("fdpo_alpha",),
                    # the label-smoothed logistic losses (cDPO epsilon); ipo, hinge, nca_pair, ... never read it
                    "label_smoothing": ("sigmoid", "robust", "exo_pair", "simpo", "cpo", "fdpo_js", "fdpo_forward_kl",
                                        "fdpo_alpha")}

    BETA_UNREAD = frozenset({"orpo", "slic", "sft"})  # losses without beta (it only scales their logged rewards)

    @classmethod
    def beta_scale(cls, loss_type: str | list[str] | tuple[str, ...]) -> str | None:
        """"method.beta" where a loss of `loss_type` reads it (it scales that loss), None where none does (orpo, slic,
        sft: `BETA_UNREAD`): the knob the non-finite / stalled advice names (the offline and online preference
        trainers' `loss_scale`)."""
        return None if set(loss_names(loss_type)) <= cls.BETA_UNREAD else "method.beta"

    def __post_init__(self) -> None:
        names = loss_names(self.loss_type)
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:  # its loss would be added twice (and logged once): a weight says that
            raise ConfigError(f"method.loss_type: {twice[0]!r} is listed more than once in {names}; list each loss "
                              "type once (method.loss_weights scales a loss type: one weight per loss type)")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ConfigError(f"method.loss_weights: {len(self.loss_weights)} weight(s) for the {len(names)} loss "
                              f"type(s) {names} of method.loss_type; give one weight per loss type (or remove "
                              "method.loss_weights: 1 each)")
        if self.loss_weights is not None and not any(self.loss_weights):
            raise ConfigError(f"method.loss_weights: {self.loss_weights} gives every loss type of method.loss_type "
                              f"{names} weight 0, so the loss is 0 and nothing would be trained; give the loss types "
                              "to train a weight > 0")
        refuse_unread_loss_params(names, {key: getattr(self, key) for key in self.PARAMS})


def refuse_unread_loss_params(names: list[str], values: dict[str, Any], where: str = "method.", who: str = "") -> None:
    """ConfigError for a preference loss parameter in `values` (PreferenceObjective.PARAMS names) set away from its
    default that no loss of `names` reads (e.g. label_smoothing with hinge, beta with orpo alone): it would be ignored.
    `where` prefixes the key (the config's "method.", a trainer's "params."), `who` the message (a trainer's name)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PreferenceObjective)}
    for key, readers in PreferenceObjective.READ_ONLY_BY.items():
        if values.get(key, defaults[key]) != defaults[key] and not set(readers) & set(names):
            raise ConfigError(f"{who}{where}{key}: only loss_type {' / '.join(readers)} reads it, and loss_type is "
                              f"{names}, so it would be ignored; remove it or add that loss type")
    beta = values.get("beta", defaults["beta"])
    if beta != defaults["beta"] and set(names) <= PreferenceObjective.BETA_UNREAD:
        if "orpo" in names:
            raise ConfigError(f"{who}{where}beta: loss_type orpo does not read it (ORPO's weight, beta in TRL's "
                              f"ORPOConfig, is {where}orpo_lambda here), so it would be ignored; set "
                              f"{where}orpo_lambda={beta:g} instead")
        raise ConfigError(f"{who}{where}beta: no loss of loss_type {names} reads it (SLiC's hinge and regulariser and "
                          "the sft term have no beta; it would only scale the logged rewards/*), so it would be "
                          "ignored; remove it, or add a loss type that reads it (e.g. sigmoid)")


REFERENCE_FREE = frozenset({"simpo", "orpo", "slic", "sft", "cpo"})  # preference losses that read no reference


def loss_names(loss_type: str | list[str] | tuple[str, ...]) -> list[str]:
    """A `loss_type` setting (one name, or a list of names whose losses are combined) as a list of names."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def reference_free(loss_type: str | list[str] | tuple[str, ...]) -> bool:
    """Whether no loss of a `loss_type` setting reads the reference model (all are in REFERENCE_FREE)."""
    return set(loss_names(loss_type)) <= REFERENCE_FREE


@dataclass
class RefSync:
    """TR-DPO reference syncing (Gorbatovski et al. 2024; TRL's sync_ref_model, ref_model_mixup_alpha,
    ref_model_sync_steps): after every `steps`-th optimizer step the reference becomes
    alpha * policy + (1 - alpha) * reference (alpha 1: the policy itself). `method.ref_sync` of dpo and kto."""

    alpha: float = 0.6
    steps: int = 512

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1:
            raise ConfigError(f"method.ref_sync.alpha: {a!r} is not in (0, 1] (the policy's share of the reference "
                              "at each sync; TRL's default 0.6); set a value in (0, 1]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"method.ref_sync.steps: {self.steps!r} is not an integer >= 1 (optimizer steps "
                              "between syncs; TRL's default 512); set an integer >= 1")


def refuse_ref_sync_reference(ref_sync: RefSync | None, reference: str, names: list[str] | None = None,
                              cache_dir: str | None = None) -> None:
    """ConfigError for `method.ref_sync` with a reference it cannot move: reference-free losses (`names`), the
    adapter switched off, precomputed log-probs (stale after the first sync)."""
    if ref_sync is None:
        return
    if reference == "none" or (names is not None and reference_free(names)):
        raise ConfigError(f"method.ref_sync: the loss reads no reference (loss_type {names}, method.reference "
                          f"{reference!r}), so there is nothing to sync; remove method.ref_sync")
    if reference == "adapter_off":
        raise ConfigError("method.ref_sync: method.reference=adapter_off scores the policy with its adapter switched "
                          "off, which training never changes, so there is no separate reference to move; use "
                          "adapter.kind=full (its reference is a frozen copy) or remove method.ref_sync")
    if reference == "precomputed" or cache_dir is not None:
        raise ConfigError("method.ref_sync: the reference log-probs are precomputed once (method.reference="
                          "precomputed / method.reference_cache_dir), and they would be stale after the first sync; "
                          "remove method.reference_cache_dir and set method.reference=copy (or auto), or remove "
                          "method.ref_sync")


@dataclass
class DPOMethod(PreferenceObjective):
    reference: Literal["auto", "adapter_off", "copy", "precomputed", "none"] = "auto"
    reference_cache_dir: str | None = None
    chunk_size: int = 1024
    disable_dropout: bool = True
    weight_normalization: Literal["count", "weighted"] = "count"
    ref_sync: RefSync | None = None  # TR-DPO: the reference moves towards the policy every ref_sync.steps steps

    def __post_init__(self) -> None:
        super().__post_init__()
        names = loss_names(self.loss_type)
        refuse_ref_sync_reference(self.ref_sync, self.reference, names, self.reference_cache_dir)
        if self.reference not in ("auto", "none") and reference_free(names):
            raise ConfigError(f"method.reference: {self.reference!r}, and loss_type {names} reads no reference "
                              "(reference-free), so the reference would be built and scored every step for nothing "
                              "(a 'copy' holds a second model); remove method.reference (auto) or set it to none")
        if self.reference_cache_dir is not None and reference_free(names):
            raise ConfigError(f"method.reference_cache_dir: loss_type {names} reads no reference (reference-free), so "
                              "no reference log-probs are computed or cached and it would be ignored; remove it")
        if self.reference == "precomputed" and self.reference_cache_dir is None:
            raise ConfigError("method.reference: 'precomputed' caches the reference log-probs in "
                              "method.reference_cache_dir, which is not set; set method.reference_cache_dir to a "
                              "folder (it may be new), or set method.reference=auto")
        if self.reference_cache_dir is not None and self.reference not in ("auto", "precomputed"):
            raise ConfigError(f"method.reference_cache_dir: read only with method.reference precomputed (or auto), "
                              f"and it is {self.reference!r}, so it would be ignored; set method.reference="
                              "precomputed or remove method.reference_cache_dir")


@dataclass
class KTOMethod:
    loss_type: str = "kto"  # alignkit.losses.UNPAIRED_LOSSES
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: Literal["auto", "adapter_off", "copy"] = "auto"
    chunk_size: int = 1024
    disable_dropout: bool = True
    weight_normalization: Literal["count", "weighted"] = "count"
    ref_sync: RefSync | None = None  # TR-DPO's syncing, as dpo's

    def __post_init__(self) -> None:
        refuse_ref_sync_reference(self.ref_sync, self.reference)


@dataclass
class EvalMethod:
    kind: Literal["reward", "dpo"] = "reward"  # reward-model accuracy, or DPO implicit-reward accuracy
    beta: float | None = None  # dpo: rewards are beta * (log pi - log pi_ref); None: the training run's (else 0.1)
    reference_path: str | None = None  # dpo with a fully finetuned policy: the reference (default: model.path)
    batch_size: int = 8
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.kind == "reward":  # a reward model's score: no log-probs, no reference, no beta
            for f in dataclasses.fields(self):
                if f.name in ("beta", "reference_path", "chunk_size") and getattr(self, f.name) != f.default:
                    raise ConfigError(f"method.{f.name}: read only by method.kind=dpo (implicit rewards), and "
                                      f"method.kind is 'reward', so it would be ignored; remove it or set "
                                      f"method.kind=dpo")


@dataclass
class TrainConfig:
    model: ModelSettings
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: dict[str, Any] = field(default_factory=dict)  # alignkit.settings.train: TRAIN_KEYS + TrainingArguments
    output_dir: str = "runs/run"

    command = ""  # a plain class attribute: which TRAIN_DEFAULTS apply

    def __post_init__(self) -> None:
        chosen = set(self.train or {})
        self.train = check_train({**TRAIN_DEFAULTS.get(self.command, {}), **(self.train or {})}, self.command)
        if self.train.get("reft_prefix_cache"):
            if not self.adapter.has_reft:
                raise ConfigError("train.reft_prefix_cache: true needs a ReFT adapter (adapter.kind reft or "
                                  f"reft+lora; this config's is {self.adapter.kind!r}); remove it")
        check_pair_layout(self.train.get("share_prompt"), self.train.get("padding_free"),
                          reft_kind=self.adapter.kind if self.adapter.has_reft else None,
                          attention=self.model.attn_implementation, reward_model=self.command == "rm",
                          ranked="method.ranked is true" if getattr(self.method, "ranked", False) else None)
        refuse_loss_on(self.data, self.command)
        refuse_ptx_path(self.data, self.command)
        if self.train.get("eval_steps") is not None and "eval_strategy" not in chosen:  # an explicit no is the
            # off switch (an override turning evaluation off); epoch beside it: refuse_unread_step_counts
            raise ConfigError(f"train.eval_steps: {self.train['eval_steps']} is read only with "
                              "train.eval_strategy=steps, which is not set (the default 'no' evaluates only after the "
                              "last step), so it would be ignored; set train.eval_strategy=steps or remove "
                              "train.eval_steps")
        if str(getattr(self.train.get("eval_strategy"), "value", self.train.get("eval_strategy"))) == "no":
            self.train["eval_steps"] = None  # the off switch: the resolved config records no unread count
        if ("num_train_epochs" in chosen and isinstance(self.train.get("max_steps"), int)
                and self.train["max_steps"] > 0):
            raise ConfigError(f"train.num_train_epochs: {self.train['num_train_epochs']} is read only with "
                              f"train.max_steps=-1, and max_steps is {self.train['max_steps']} (which decides the "
                              "run's length), so it would be ignored; set train.max_steps=-1 to train the epochs, or "
                              "remove train.num_train_epochs")
        strategy = str(getattr(self.train.get("eval_strategy"), "value", self.train.get("eval_strategy") or "no"))
        if strategy != "no" and self.data.eval_path is None and not self.data.eval_fraction:
            raise ConfigError(f"train.eval_strategy: {strategy!r} evaluates on held-out records, and data gives none: "
                              "set data.eval_path or data.eval_fraction, or set train.eval_strategy=no")
        refuse_unread_step_counts(self.train, chosen, self.command)
        if "do_eval" in chosen:
            refuse_do_eval(self.train["do_eval"],
                           held_out=self.data.eval_path is not None or bool(self.data.eval_fraction))


def refuse_do_eval(do_eval: Any, held_out: bool) -> None:
    """`train.do_eval`, a TrainingArguments flag transformers' Trainer leaves to scripts: a run evaluates when data
    holds records out (after the last step, and during training as train.eval_strategy says) whatever it says. A value
    that says otherwise (false with held-out data, true without) was accepted and ignored."""
    if bool(do_eval) == held_out:
        return
    if held_out:
        raise ConfigError(f"train.do_eval: {str(bool(do_eval)).lower()} is not read (transformers' Trainer leaves it "
                          "to scripts): the run evaluates on the held-out records of data.eval_path / "
                          "data.eval_fraction after the last step (and during training as train.eval_strategy says), "
                          "so it would be ignored; to train without evaluating, hold no records out "
                          "(data.eval_fraction=0, no data.eval_path); remove train.do_eval")
    raise ConfigError(f"train.do_eval: {str(bool(do_eval)).lower()} is not read (transformers' Trainer leaves it to "
                      "scripts), and data holds no records out, so nothing would be evaluated; set data.eval_path or "
                      "data.eval_fraction (and train.eval_strategy for evaluations during training); remove "
                      "train.do_eval")


def check_pair_layout(share_prompt: bool | None, padding_free: bool | None, *, reft_kind: str | None,
                      attention: str | None, reward_model: bool, where: str = "train.",
                      ranked: str | None = None) -> None:
    """The layouts of preference pairs a run cannot use, which would stop the first training step: both at once,
    share_prompt
    with a ReFT adapter (its positions are placed in the padded rows) or with attention other than sdpa / eager (a
    custom 4D mask), padding_free with a ReFT reward model (a classifier's positions are placed over the whole padded
    row), either with ranked reward data (`ranked`: why the data is ranked, e.g. "method.ranked is true"; None for
    pairs). `reft_kind`: the adapter's kind when it has a ReFT part, else None; `attention`: the attention
    implementation (None: the default, sdpa). One check, one message, for the CLI's config (`where` "train.", when it
    is loaded) and for the DPO and reward trainers (`where` "", when they are built)."""
    fails = "so the first training step would stop"
    if share_prompt and padding_free:
        raise ConfigError(f"{where}share_prompt and {where}padding_free are two different layouts: set one of them")
    for key, on in (("share_prompt", share_prompt), ("padding_free", padding_free)):
        if on and ranked is not None:
            raise ConfigError(f"{where}{key}: true lays out chosen / rejected pairs, and {ranked} (ranked records, K "
                              f"replies each), {fails}; remove it (or set it to false)")
    if share_prompt and reft_kind is not None:
        raise ConfigError(f"{where}share_prompt: true does not run a ReFT adapter (adapter.kind {reft_kind!r}: its "
                          f"positions are placed in the padded rows), {fails}; remove it (or set it to false)")
    if share_prompt and attention not in (None, "sdpa", "eager"):
        raise ConfigError(f"{where}share_prompt: true needs sdpa or eager attention (a custom 4D mask), and the "
                          f"model's attn_implementation is {attention!r}, {fails}; remove it (padding_free suits "
                          "flash attention) or load the model with attn_implementation sdpa "
                          "(model.attn_implementation)")
    if padding_free and reward_model and reft_kind is not None:
        raise ConfigError(f"{where}padding_free: true does not run a ReFT reward model (adapter.kind {reft_kind!r}: a "
                          f"classifier's positions are placed over the whole padded row), {fails}; remove it (or set "
                          "it to false)")


@dataclass
class SFTConfig(TrainConfig):
    method: SFTMethod = field(default_factory=SFTMethod)
    command = "sft"


@dataclass
class RewardConfig(TrainConfig):
    method: RewardMethod = field(default_factory=RewardMethod)
    command = "rm"


@dataclass
class DPOConfig(TrainConfig):
    method: DPOMethod = field(default_factory=DPOMethod)
    command = "dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_ref_sync_adapter(self.method.ref_sync, self.adapter)
        m = self.method
        switched_off = m.reference_cache_dir is None and not reference_free(loss_names(m.loss_type))
        refuse_switched_off_trained_modules(self.adapter, m.reference, switched_off)


@dataclass
class KTOConfig(TrainConfig):
    method: KTOMethod = field(default_factory=KTOMethod)
    command = "kto"

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_ref_sync_adapter(self.method.ref_sync, self.adapter)
        refuse_switched_off_trained_modules(self.adapter, self.method.reference, True)


def refuse_switched_off_trained_modules(adapter: AdapterConfig, reference: str, reads: bool) -> None:
    """ConfigError for method.reference auto / adapter_off (`reads`: the loss reads a reference that is not
    precomputed) with an adapter that trains modules whole in place (a ReFT's adapter.reft.modules_to_save): the
    reference, the policy with its adapter off, would keep them trained and move with the policy. The trainers'
    own refusal (`alignkit.trainers.reference.build_reference`), before the run folder is written."""
    kept = adapter.trained_in_place
    if kept and reads and reference in ("auto", "adapter_off"):
        raise ConfigError(f"method.reference: {reference!r} scores the policy with its adapter switched off, and "
                          f"adapter.reft.modules_to_save {kept} is trained whole in place, which switching off keeps "
                          "as trained, so the reference would move with the policy; set method.reference=copy (or "
                          "precomputed with method.reference_cache_dir, dpo), or use adapter.kind reft+lora with "
                          "adapter.lora.modules_to_save (peft keeps the base's copy)")


def refuse_ref_sync_adapter(ref_sync: RefSync | None, adapter: AdapterConfig) -> None:
    """ConfigError for `method.ref_sync` with an adapter: the reference is the base with the adapter switched off."""
    if ref_sync is not None and adapter.parts:
        raise ConfigError(f"method.ref_sync: with adapter.kind={adapter.kind} the reference is the base model with the "
                          "adapter switched off, which training never changes, so there is no separate reference to "
                          "move; use adapter.kind=full (its reference is a frozen copy of the initial model) or "
                          "remove method.ref_sync")


# What a prompts-only `data` section (online training, `sample`, `generate`) reads: the prompts are read, never
# loss-masked, cut as whole rows or given an EOS; the online training commands also take held-out prompts (an
# evaluation split: SPLIT_DATA_KEYS), `sample` and `generate` do not. A key outside these set to other than
# its default would be ignored silently: refused instead.
PROMPT_DATA_KEYS = ("path", "reader", "reader_options", "formatter", "max_prompt_length", "split", "max_records",
                    "on_invalid")
# The evaluation split's keys: read by the training commands (offline and online); `eval` never reads them (it
# scores every record of data.path, with no split of its own).
SPLIT_DATA_KEYS = ("eval_path", "eval_fraction", "split_seed", "eval_split")


def check_split_data(data: DataSettings) -> None:
    """ConfigError naming an evaluation-split key (SPLIT_DATA_KEYS) set away from its default that the data as
    configured never reads (`alignkit.cli.data.read_splits`): `eval_split` is the split of `eval_path` to read;
    `split_seed` seeds the `eval_fraction` split of `data.path`, made only without `eval_path`; `eval_fraction`
    is not read when `eval_path` gives the evaluation records. Commands that read no split (eval, generate,
    sample, augment) refuse every such key themselves, before this runs."""
    default = DataSettings()
    what = {"eval_split": "names the split of data.eval_path to read",
            "split_seed": "seeds the data.eval_fraction split of data.path",
            "eval_fraction": "splits data.path"}
    if data.eval_path is not None:
        why, unread = "data.eval_path gives the evaluation records (no split of data.path)", ("eval_fraction",
                                                                                              "split_seed")
    elif data.eval_fraction:
        why, unread = "data.eval_path is not set", ("eval_split",)
    else:
        why, unread = "neither data.eval_path nor data.eval_fraction is set (no evaluation records)", ("eval_split",
                                                                                                      "split_seed")
    for key in unread:
        value = getattr(data, key)
        if value != getattr(default, key):
            fix = {"eval_split": f"set data.eval_path (data.path's source, for its {value!r} split)",
                   "split_seed": "set data.eval_fraction" if data.eval_path is None else
                   "remove data.eval_path and set data.eval_fraction", "eval_fraction": "remove data.eval_path"}[key]
            raise ConfigError(f"data.{key}: {value!r} {what[key]}, and {why}, so it would be ignored; {fix}, or "
                              f"remove data.{key}")


# The commands that load `model.adapter_path` onto `model.path` (cli/models.py:load_for_inference); the training
# commands build a new adapter (the `adapter` section) on `model.path` and never read it.
ADAPTER_PATH_COMMANDS = ("eval", "generate", "sample")


def check_model_reads(model: ModelSettings, command: str) -> None:
    """ConfigError for a `model` key the command would ignore: `adapter_path` under a training command (only
    existence-checked before: the run trained model.path from scratch), `check_base` without `adapter_path`."""
    if model.adapter_path is not None and command not in ADAPTER_PATH_COMMANDS:
        raise ConfigError(f"model.adapter_path: alignkit {command} trains a new adapter (the adapter section) on "
                          f"model.path and never loads model.adapter_path (only {', '.join(ADAPTER_PATH_COMMANDS)} "
                          "do), so it would be ignored; to start from a fully finetuned run set model.path to its "
                          "model/ folder, or remove model.adapter_path")
    if model.adapter_path is None and model.check_base != ModelSettings.check_base:
        raise ConfigError(f"model.check_base: {model.check_base} is read only with model.adapter_path, which is not "
                          "set, so it would be ignored; remove it")


def refuse_loss_on(data: DataSettings, command: str) -> None:
    """ConfigError for `data.loss_on` set under a command other than sft: only SFT records have a loss mask of
    conversation turns (pairs are scored on their completions whatever it says)."""
    if command != "sft" and data.loss_on != DataSettings.loss_on:
        raise ConfigError(f"data.loss_on: read only by alignkit sft (which tokens of a conversation are trained), "
                          f"so alignkit {command} would ignore it; remove it")


def refuse_ignored_data(data: DataSettings, ignored: Any, message: str) -> None:
    """ConfigError `message` (its `{key}` filled) for the first `data` field with `ignored(name)` true that is set
    away from its default."""
    default = DataSettings()
    for f in dataclasses.fields(DataSettings):
        if ignored(f.name) and getattr(data, f.name) != getattr(default, f.name):
            raise ConfigError(message.format(key=f"data.{f.name}"))


def refuse_ptx_path(data: DataSettings, command: str) -> None:
    """ConfigError for `data.ptx_path` under a command other than ppo: only PPO mixes in the pretraining loss."""
    if command != "ppo" and data.ptx_path is not None:
        raise ConfigError(f"data.ptx_path: the pretraining mix (PPO-ptx, method.ptx_coef) is read only by alignkit "
                          f"ppo, so alignkit {command} would ignore it; remove it")


def check_ptx(method: Any, ptx_path: Any, path_key: str = "data.ptx_path", where: str = "method.") -> None:
    """ConfigError when PPO-ptx is half set: method.ptx_coef > 0 without its data, the data without a ptx_coef (it
    would be read and never trained on), or a ptx_batch_size without ptx_coef. The run config's check and the
    library's (`alignkit.online.PPOTrainer`: `path_key` "ptx_data", bare keys)."""
    coef = getattr(method, "ptx_coef", 0.0)
    if coef > 0 and ptx_path is None:
        raise ConfigError(f"{where}ptx_coef: {coef!r} adds the NLL of pretraining / SFT data to each PPO update, and "
                          f"{path_key} is not set, so there is nothing to take it on; set {path_key} (SFT records) or "
                          f"remove {where}ptx_coef")
    if not coef and ptx_path is not None:
        raise ConfigError(f"{path_key}: set with {where}ptx_coef 0 (the pretraining mix off), so it would be read and "
                          f"never trained on; set {where}ptx_coef > 0 (InstructGPT's gamma, e.g. 27.8 on its "
                          f"pretraining mix) or remove {path_key}")
    if not coef and getattr(method, "ptx_batch_size", None) is not None:
        raise ConfigError(f"{where}ptx_batch_size: read only with {where}ptx_coef > 0 (the pretraining mix), which is "
                          f"0, so it would be ignored; remove it or set {where}ptx_coef")


# what alignkit ppo reads of data besides the prompts' keys when data.ptx_path is set (its SFT tokenization)
PTX_DATA_KEYS = ("ptx_path", "max_length", "loss_on", "add_eos")


def check_prompt_data(data: DataSettings, command: str) -> None:
    """ConfigError naming the first `data.<key>` that `command` would ignore (see PROMPT_DATA_KEYS); alignkit ppo
    also reads PTX_DATA_KEYS with data.ptx_path (refused under the other commands first)."""
    refuse_ptx_path(data, command)
    reads = PROMPT_DATA_KEYS + (SPLIT_DATA_KEYS if command in ONLINE_COMMANDS else ())
    reads += PTX_DATA_KEYS if command == "ppo" and data.ptx_path is not None else ()
    what = ("loss mask, row length cut or EOS" if command in ONLINE_COMMANDS
            else "evaluation split, loss mask, row length cut or EOS")
    refuse_ignored_data(data, lambda name: name not in reads,
                    f"{{key}}: alignkit {command} reads only prompts from data (no {what}), so it would ignore "
                    f"{{key}}; remove it (the keys it reads: {', '.join(reads)})")


@dataclass
class EvalConfig:
    model: ModelSettings
    data: DataSettings = field(default_factory=DataSettings)
    method: EvalMethod = field(default_factory=EvalMethod)
    overwrite: bool = False  # replace an earlier eval's outputs in output_dir (--overwrite sets it)
    output_dir: str = "runs/eval"

    def __post_init__(self) -> None:
        refuse_ignored_data(self.data, lambda name: name in SPLIT_DATA_KEYS,
                        "{key}: alignkit eval scores every record of data.path (it makes no evaluation split), so it "
                        "would ignore {key}; remove it, and put the records to score in data.path "
                        "(data.split / data.max_records choose among them)")
        refuse_loss_on(self.data, "eval")
        refuse_ptx_path(self.data, "eval")


@dataclass
class GenerateConfig:
    model: ModelSettings
    data: DataSettings = field(default_factory=DataSettings)  # prompts: any records (their prompts are used)
    generation: SamplingConfig = field(default_factory=lambda: SamplingConfig(do_sample=False))
    batch_size: int = 8
    overwrite: bool = False  # replace an earlier generate's outputs in output_dir (--overwrite sets it)
    output_dir: str = "runs/generate"

    def __post_init__(self) -> None:
        check_prompt_data(self.data, "generate")
        refuse_greedy_ignored(self.generation, "generation", ", the default of alignkit generate")


CONFIG_CLASSES: dict[str, type] = {"sft": SFTConfig, "rm": RewardConfig, "dpo": DPOConfig, "kto": KTOConfig,
                                   "eval": EvalConfig, "generate": GenerateConfig}


__all__ = ["refuse_unread_loss_params", "PROMPT_DATA_KEYS", "SPLIT_DATA_KEYS", "check_prompt_data", "check_split_data",
           "refuse_ignored_data", "refuse_ptx_path", "check_ptx", "PTX_DATA_KEYS", "ADAPTER_PATH_COMMANDS",
           "check_model_reads", "PreferenceObjective",
           "CONFIG_CLASSES", "TRAIN_COMMANDS", "TRAIN_DEFAULTS", "DPOConfig", "DPOMethod", "DataSettings",
           "EvalConfig", "EvalMethod", "GenerateConfig", "KTOConfig", "KTOMethod", "ModelSettings", "RewardConfig",
           "RewardMethod", "SFTConfig", "SFTMethod", "TrainConfig", "REFERENCE_FREE", "check_pair_layout",
           "loss_names", "reference_free", "RefSync", "refuse_ref_sync_adapter", "refuse_ref_sync_reference"]
