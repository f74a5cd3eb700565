"""`AlignTrainer`: the one `transformers.Trainer` subclass every objective builds on.

A subclass overrides ONE method, `objective(model, inputs) -> LossOutput` (per-example losses `(B,)` +
metrics). The base does everything else, once:

Reduction. With w_i the batch's `weight` (1 when absent) and n_i the items behind example i (1 per
example for pairwise / ranked / unpaired objectives; its completion tokens for SFT, whose losses are
per-example sums of token NLL):

    loss = sum_{i in step} w_i * L_i / N,   N = sum_{i in step} n_i          (weight_normalization="count")
                                            N = sum_{i in step} w_i * n_i    (weight_normalization="weighted")

"count" (default) is the mean over examples (or tokens) of w * loss: weights scale each example's
contribution and a weight-0 example contributes nothing but is still counted. "weighted" is the
self-normalised weighted mean: weight-0 examples are exactly as if dropped.

Gradient accumulation. N is counted over ALL micro-batches of the optimizer step
(`_get_num_items_in_batch`, called by `Trainer.get_batch_samples` before the step) and summed across
processes; each micro-batch's loss is its partial sum divided by that global N, multiplied by the
number of processes (DDP averages gradients), and `loss_is_scaled_for_ga = True` stops the Trainer from
dividing by the accumulation steps again. So batch 8 x accumulation 1 and batch 1 x accumulation 8
give the same update. Evaluation: `eval_loss` = sum_i w_i L_i / N over the whole evaluation set (all its batches
and processes), whatever the evaluation batch size (the Trainer's mean of per-batch losses weighted every batch by
its examples, so under "weighted" a batch of weight-0 examples counted as a loss of 0, and SFT's token mean
depended on how tokens fell into batches).

Metrics. Each step's metrics are accumulated as (sum, count) per name (`metric_totals`; `alignkit.trainers.totals`),
summed across processes at logging time, and logged as sum / count under their names (train) or `eval_<name>`. When the
evaluation data has a weight other than 1, each metric with one value per example (accuracy, margins, rewards,
...; not token-level ones, nor KTO's per-side sums) is also logged weighted, `eval_weighted/<name>` =
sum_i w_i v_i / sum_i w_i, beside the unweighted `eval_<name>` (`eval_loss` is the loss as trained: weighted,
reduced by `weight_normalization`). Training
logs also carry TRL's `num_tokens`: the cumulative count of input (non-padding) tokens trained on, all
processes. Checkpoints keep it (`alignkit_state.json`), so a resumed run continues the count (TRL's SFT / DPO
trainers start again from 0).

Saving. Only the trainable state (`alignkit.adapters.save_adapter`): peft files for LoRA,
ReFT safetensors + json for ReFT, the full model (safetensors) for full finetuning, plus the
tokenizer and `training_args.json`. Never a pickle of the arguments. Saving, the staged checkpoint commit and
resuming live in `alignkit.trainers.checkpointing.Checkpointing`, a mixin of this class.

Weight decay: the Trainer's parameter split (no decay on biases and norms), and also none on what a module
lists in `no_weight_decay`: ReFT's orthonormal projections R (`interventions.base.LowRankRotation`) are stored
as Householder reflectors, which map to orthonormal rows whatever their values, and weight decay only shrinks
the reflectors towards 0, i.e. pulls R towards the first r coordinate axes of the hidden state: a prior that
depends on the basis and means nothing for the edit (R's scale is fixed). The learned source (W, b) of
LoReFT & co. is decayed as usual. pyreft decays the reflectors too (the Trainer's default); with
`weight_decay=0` (pyreft's recipes) the two agree.

Batches (`alignkit.trainers.sampling.BatchSampling`, a mixin of this class): length-aware batching with
`group_by_length=True` (or `train_sampling_strategy="group_by_length"`), and training batches that carry their
records' ids.

Non-finite values (`alignkit.guards`): each micro-batch's loss and each step's gradient norm are checked; the
first NaN / inf is logged as NaN (metrics.jsonl) and raises `NonFiniteError` naming the optimizer step and
the batch's record ids, before the optimizer applies it. Saving refuses trainable weights that are not finite.

Raw data (TRL-style, `alignkit.trainers.data_prep`): `train_dataset` / `eval_dataset` may be raw rows with TRL's columns
or alignkit records, with the tokenizer as `processing_class`; the trainer tokenizes them itself under `max_length`,
`max_prompt_length`, `formatter`, `loss_on` (SFT), and picks the collator for the data's kind when `data_collator` is
not given. Several evaluation sets (`eval_dataset={"name": rows, ...}`) are tokenized set by set, and so are raw rows
given to `evaluate(eval_dataset=...)`. When the length limits drop over `max_dropped_fraction` (default 0.5, in [0, 1];
1: any share) of a dataset's records, it stops in one line naming the dataset, the share, the limits and that setting
(`alignkit.data.prepare.check_dropped`, the CLI's data.max_dropped_fraction rule).

Other switches: `remove_unused_columns` is forced off (collators carry keys the model's signature does not name);
`max_grad_norm=None` is no clipping (as 0; the Trainer itself would stop at the first step); `compute_metrics` /
`preprocess_logits_for_metrics` are refused (evaluation returns no logits or labels, so the Trainer never calls them),
so are `label_smoothing_factor` and, under several processes, `average_tokens_across_devices=False` (the objectives
always divide by the all-process count); `optim` / `optim_args` and `lr_scheduler_type` / `lr_scheduler_kwargs` are
tried when the trainer is built (`check_optimizer`: a missing package, an unread key; `check_scheduler`: kwargs the
schedule does not take, needs, or ignores); these argument checks, `metric_for_best_model`'s and the resume checks live
in `alignkit.trainers.checks`; `activation_checkpointing` is applied by us, non-reentrant, through the adapter wrappers;
mixed precision is TrainingArguments' (`bf16=True` -> autocast around the loss), never a cast of weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments
from transformers.utils import is_sagemaker_mp_enabled

from alignkit.adapters import enable_gradient_checkpointing, record_base, saves_whole_model
from alignkit.compat import check_trainer
from alignkit.data.tokenize import TokenizeConfig
from alignkit.distributed import (
    check_process_count, deepspeed_on_cpu, enable_sharding_on_cpu, refuse_fsdp1_adapter,
    refuse_ignored_fsdp_settings, refuse_unmatched_wrap_classes,
    fsdp_activation_checkpointing, take_over_activation_checkpointing,
)
from alignkit.guards import ZERO_GRAD_PATIENCE, NonFiniteError, StalledTrainingError, as_float, likely_causes
from alignkit.losses import LossOutput, reduce_loss
from alignkit.trainers.checkpointing import TRAINING_ARGS_JSON, Checkpointing, removes_new_output_dir
from alignkit.trainers.checks import (
    check_best_model_metric, check_optimizer, check_scheduler, refuse_deepspeed_mismatches,
    refuse_empty_batches, refuse_ignored_arguments, refuse_metric_functions, refuse_unread_fields,
)
from alignkit.trainers.config_dropout import rates_read_from_config
from alignkit.data.prepare import feature_kind
from alignkit.trainers.data_prep import packed_collator, prepare_data, prepare_one, shared_prompt_collator
from alignkit.trainers.prefix import check_prefix_cache, data_passes, prefix_cache
from alignkit.trainers.precision import refuse_float16_adam, warn_low_precision
from alignkit.trainers.sampling import RECORD_IDS, BatchSampling
from alignkit.trainers.weights import refuse_bad_weights
from alignkit.trainers.totals import EvalTotals, Totals, add_totals

logger = logging.getLogger(__name__)

# what transformers' Trainer.evaluate logs of its own, as eval_<name> (besides eval_model_preparation_time, only when
# the model is evaluated before any training, so never at a training run's evaluations)
TRAINER_EVAL_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second")


def is_dropout_rate(name: str, value: Any) -> bool:
    """Whether a module attribute is a dropout probability its forward reads: a float named like one (`dropout`,
    `attention_dropout`, `resid_pdrop`, ...). transformers' attention modules keep `attention_dropout` (llama, qwen2,
    mistral, gemma, phi3, ...) and pass it to the attention function in training mode (compat row T35)."""
    return isinstance(value, float) and ("dropout" in name or "pdrop" in name)


def turn_off_dropout(model: nn.Module) -> None:
    """No dropout anywhere in `model`, in training mode too: p = 0 in every `nn.Dropout` (TRL's `disable_dropout`;
    peft's lora_dropout is one), and 0 for every float dropout rate a module keeps and applies functionally
    (`is_dropout_rate`: transformers' `attention_dropout`, `hidden_dropout`, `activation_dropout`, ...). The policy
    and its reference, and an online step's old and new log-probs, then come from one deterministic network. The
    model's config is left as it is (it is saved with the model), so a rate a forward reads from the config
    (falcon's `hidden_dropout`, prophetnet, blt, ...: `config_dropout.py`, compat row T36) stays on: one warning
    names each, and setting it to 0 in the model's config before training is the user's call."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if is_dropout_rate(name, value):
                setattr(m, name, 0.0)
    left = rates_read_from_config(model, is_dropout_rate)
    if left:
        logger.warning("dropout stays on where the model's forward reads the rate from its config (%s): alignkit does "
                       "not change the config, which is saved with the model; for no dropout, set these to 0 in the "
                       "model's config before training (they are then saved as 0)",
                       ", ".join(f"{k}={v}" for k, v in left.items()))


def completion_tokens(batch: dict[str, Any]) -> Tensor:
    """The scored completion tokens of each sequence of a collated batch `(R,)`, float: padded rows or padding-free
    packed sequences (the counts `completion_logps` returns, read from the masks without a forward)."""
    if batch.get("sequence_length") is not None:  # padding-free: R sequences packed in rows
        R = batch["sequence_length"].shape[0]
        seq = batch["sequence_index"].reshape(-1)  # (rows*L,), -1 on filler; first tokens are never scored
        comp = batch["completion_mask"].reshape(-1).float() * (seq >= 0)
        return torch.zeros(R + 1, device=seq.device).index_add_(0, seq.clamp(min=0), comp)[:R]  # (R,)
    mask = batch["completion_mask"][:, 1:].bool()
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return mask.sum(-1).float()


class AlignTrainer(BatchSampling, Checkpointing, Trainer):
    """Base trainer; see the module docstring. Subclasses implement `objective`."""

    normalizer: Literal["examples", "tokens"] = "examples"
    record_kinds: tuple[str, ...] = ("sft",)  # the record kinds raw data is read as, preferred first
    trl_learning_rate: tuple[str, float] | None = None  # (TRL config, its default) for this objective, see __init__
    rows_per_example: int = 1  # 2 for the chosen/rejected layout (used only when a batch has no `weight`)
    # (B,)-shaped metrics that are not one value per example (see weighted_totals)
    unweighted_metrics: tuple[str, ...] = ()
    loss_is_scaled_for_ga = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own `__init__` (alignkit's trainers, a user's) removes the output_dir the Trainer made when
        one of its checks after `super().__init__` refuses (`removes_new_output_dir`)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = removes_new_output_dir(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @removes_new_output_dir
    def __init__(self, model: nn.Module, args: TrainingArguments, *,
                 weight_normalization: Literal["count", "weighted"] = "count", disable_dropout: bool = False,
                 group_by_length: bool = False, max_length: int | None = 1024, max_prompt_length: int | None = 512,
                 formatter: str = "auto", loss_on: str = "all_assistant", add_eos: bool | None = None,
                 max_dropped_fraction: float = 0.5,
                 dataset_num_proc: int | None = None, reft_prefix_cache: bool | None = None, **kwargs: Any) -> None:
        check_trainer(type(self))  # the private Trainer methods overridden below must still be the Trainer's
        refuse_metric_functions(kwargs, type(self).__name__)
        refuse_unread_fields(args, type(self))  # TRL's SFTConfig(max_length=...) as args: read nowhere
        self.tokenize_config = TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length,
                                              formatter=formatter, add_eos=add_eos, loss_on=loss_on,
                                              max_dropped_fraction=max_dropped_fraction)
        prepare_data(kwargs, self.record_kinds, self.tokenize_config, dataset_num_proc, type(self).__name__)
        self.dataset_num_proc = dataset_num_proc  # evaluate(eval_dataset=raw rows) tokenizes them alike
        default_lr = TrainingArguments.__dataclass_fields__["learning_rate"].default
        if self.trl_learning_rate is not None and args.learning_rate == default_lr:
            logger.warning("%s: learning_rate is transformers' default %g; TRL's %s uses %g for this objective "
                           "(and so does the alignkit CLI): pass learning_rate in the TrainingArguments",
                           type(self).__name__, default_lr, *self.trl_learning_rate)
        if weight_normalization not in ("count", "weighted"):
            raise ValueError(f"weight_normalization must be 'count' or 'weighted', got {weight_normalization!r}")
        self.weight_normalization = weight_normalization
        self.group_by_length = group_by_length or getattr(args, "train_sampling_strategy", None) == "group_by_length"
        refuse_ignored_arguments(args, kwargs.get("train_dataset"), self.group_by_length)
        refuse_empty_batches(args, kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        refuse_bad_weights(type(self).__name__, kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        check_optimizer(args, kwargs)
        check_scheduler(args, kwargs)
        changes: dict[str, Any] = {}
        if args.remove_unused_columns:
            changes["remove_unused_columns"] = False
        if args.max_grad_norm is None:  # no clipping, as alignkit's online trainers (the Trainer compares it with 0)
            changes["max_grad_norm"] = 0.0
        gc_kwargs = None
        if args.activation_checkpointing:
            gc_kwargs = dict(args.activation_checkpointing_kwargs or {})
            changes.update(activation_checkpointing=False, gradient_checkpointing=False)
        if changes:
            args = dataclasses.replace(args, **changes)
        deepspeed_on_cpu(args)  # DeepSpeed on CPU processes: accelerate's process count (alignkit.distributed)
        check_process_count(args.world_size, type(self).__name__)  # the processes asked for are the ones training
        refuse_fsdp1_adapter(saves_whole_model(model), type(self).__name__)  # FSDP1 on CPU / with an adapter
        # an FSDP config's keys alignkit overrides
        refuse_ignored_fsdp_settings(type(self).__name__, gc_kwargs is not None)
        refuse_unmatched_wrap_classes(model, type(self).__name__)  # layer classes to wrap: read, and in the model
        if gc_kwargs is None and fsdp_activation_checkpointing():  # alignkit's own in place of accelerate's wrapper
            gc_kwargs = {}
        check_prefix_cache(model, reft_prefix_cache, args)  # before the Trainer makes output_dir
        if disable_dropout:
            turn_off_dropout(model)
        record_base(model)  # a model wrapped by hand: its base's fingerprint before training changes an embedding
        refuse_float16_adam(model, args.optim)  # fp16 weights + AdamW: nan within a few steps
        super().__init__(model=model, args=args, **kwargs)
        refuse_deepspeed_mismatches(self)
        take_over_activation_checkpointing(self.accelerator, type(self).__name__)  # before the model is prepared
        if gc_kwargs is not None:
            enable_gradient_checkpointing(self.model, gc_kwargs)
            logger.info("activation checkpointing on (%s)", {"use_reentrant": False, **gc_kwargs})
        self._metrics: dict[str, Totals] = {"train": {}, "eval": {}}
        self._eval_totals = EvalTotals()  # the whole-set eval_loss and the weighted figures
        self._clip_params_ok: bool | None = None  # see `_clip_grad_norm`
        warn_low_precision(self.model, self.args.learning_rate)  # bf16 weights: updates round away
        self.reft_prefix_cache = reft_prefix_cache
        logged = self.eval_metrics(**self.objective_settings())
        if logged is not None and isinstance(self.eval_dataset, dict):  # per set: eval_<set>_loss, eval_<set>_accuracy
            logged = tuple(f"{name}_{m}" for name in self.eval_dataset for m in logged + TRAINER_EVAL_METRICS)
        if logged is not None:
            check_best_model_metric(self.args.metric_for_best_model, self.args.greater_is_better, logged,
                                    type(self).__name__)

    # -- optimizer ---------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's choice (every weight but biases and norms) minus the parameters a module lists in
        its `no_weight_decay` attribute (names relative to it): ReFT's Householder reflectors
        (`LowRankRotation`). One rule for every objective and adapter (see "Weight decay" above)."""
        skip = {f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
                for n in getattr(m, "no_weight_decay", ())}
        return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    # -- the one method a subclass writes -------------------------------------------------------------

    def objective(self, model: nn.Module, inputs: dict[str, Any]) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement objective(model, inputs) -> LossOutput")

    @classmethod
    def objective_metrics(cls, **method: Any) -> tuple[str, ...] | None:
        """The names of the metrics `objective` returns with the objective's settings `method` (the trainer's
        keyword arguments; others are ignored), as logged: from the loss registries' declarations
        (`alignkit.losses.registry`). alignkit's trainers say which; None (a subclass that does not say):
        unknown, so its metric_for_best_model is left to transformers."""
        return None

    def objective_settings(self) -> dict[str, Any]:
        """This trainer's settings that `objective_metrics` reads (loss types, pairs or ranked data)."""
        return {}

    @classmethod
    def loss_scale(cls, **method: Any) -> str | None:
        """The setting that scales this objective's loss with the settings `method`, named in the advice of a
        non-finite loss or a stalled run (`alignkit.guards`); None where there is none to lower (SFT, reward)."""
        return None

    @classmethod
    def eval_metrics(cls, **method: Any) -> tuple[str, ...] | None:
        """Every metric an evaluation of this objective logs, without the `eval_` prefix: the Trainer's own
        (`TRAINER_EVAL_METRICS`: loss, runtime, ...) and `objective_metrics` (None when those are unknown). What
        `metric_for_best_model` may name (checked when a config is loaded and when a trainer is built)."""
        own = cls.objective_metrics(**method)
        if own is None:
            return None
        return TRAINER_EVAL_METRICS + tuple(m for m in own if m not in TRAINER_EVAL_METRICS)

    # -- normalisation ---------------------------------------------------------------------------------

    def items_per_example(self, batch: dict[str, Any]) -> Tensor:
        """n_i `(B,)`: 1 per example, or completion tokens per example when `normalizer == "tokens"`."""
        packed = batch.get("sequence_length") is not None  # padding-free: R sequences packed in rows
        if self.normalizer == "tokens":
            return completion_tokens(batch)
        w = batch.get("weight")
        if w is not None:
            B = w.shape[0]
        elif batch.get("num_responses") is not None:
            B = batch["num_responses"].shape[0]
        elif packed:
            B = batch["sequence_length"].shape[0] // self.rows_per_example
        else:
            B = batch["input_ids"].shape[0] // self.rows_per_example
        return torch.ones(B, device=batch["input_ids"].device)

    def count_items(self, batch: dict[str, Any]) -> Tensor:
        """N of one micro-batch (see the module docstring), a float scalar."""
        n = self.items_per_example(batch)
        w = batch.get("weight")
        if self.weight_normalization == "weighted" and w is not None:
            n = n * w.to(n.device, n.dtype)
        return n.sum()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        if not batch_samples:
            return None
        total = sum(self.count_items(b).to(device) for b in batch_samples)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    # -- per-step bookkeeping (same values as the Trainer's, without walking every parameter each step) ---

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate, 6 * tokens * non-embedding parameters, with the parameter count taken once
        per model (transformers' `num_parameters` walks every named module and parameter on each call:
        ~0.1 ms a step for a 4-layer model, a few % of a small ReFT step)."""
        model = self.model
        main = getattr(model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(model, "num_parameters"):
            return 0
        cached = getattr(self, "_flops_params", None)
        if cached is None or cached[0] is not model:
            cached = self._flops_params = (model, int(model.num_parameters(exclude_embeddings=True)))
        return 6 * inputs[main].numel() * cached[1]

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; on CPU processes, with the FSDP plugin `accelerate launch` asked for
        attached (accelerate drops it there; `alignkit.distributed`)."""
        super().create_accelerator_and_postprocess()
        if enable_sharding_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Clip over the optimizer's parameters instead of all of `model.parameters()` (a frozen base never
        gets gradients, so the norm and the clipping are the same; the Trainer walks every frozen parameter
        each step). Checked once: if any parameter outside the optimizer holds a gradient, or the setup is
        sharded (FSDP, DeepSpeed, XLA, mixed device meshes), the Trainer's own path is used."""
        if self._clip_params_ok is None:
            in_opt = {id(p) for g in getattr(self.optimizer, "param_groups", []) for p in g["params"]}
            sharded = is_sagemaker_mp_enabled() or self.accelerator.distributed_type in (
                DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA)
            self._clip_params_ok = bool(in_opt) and not sharded and not self._has_mixed_mesh_grads(model) and all(
                id(p) in in_opt for p in model.parameters() if p.grad is not None)
        if not self._clip_params_ok:
            return super()._clip_grad_norm(model)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    # -- non-finite guard (alignkit.guards) ----------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        ids = inputs.pop(RECORD_IDS, None)
        self._batch_ids = (getattr(self, "_batch_ids", None) or []) + list(ids or [])
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = as_float(loss)  # one device sync, as the finiteness check needs anyway
        if not math.isfinite(value):
            self._stop_non_finite("the training loss", value, ids)
        self._step_loss = max(getattr(self, "_step_loss", 0.0), value)
        return loss

    def _run_epoch(self, model: nn.Module, epoch: int, *args: Any, **kwargs: Any) -> None:
        """The Trainer's pass over one epoch, skipped when every optimizer step of the run is done already: resumed
        from a checkpoint of step max_steps (a finished run, or one killed after its last checkpoint, in the final
        evaluation or save) that ends inside an epoch, the Trainer trained one step past max_steps (it checks the
        count only after a step), wrote checkpoint-<max_steps + 1> and saved that model as the run's."""
        if 0 < self.state.max_steps <= self.state.global_step:
            logger.info("all %d optimizer steps are done: nothing left to train", self.state.max_steps)
            self.control.should_training_stop = True
            self._trained_nothing = True
            return None
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        ids, self._batch_ids = getattr(self, "_batch_ids", None), []
        loss, self._step_loss = getattr(self, "_step_loss", 0.0), 0.0
        if norm is not None:
            value = as_float(norm)
            if not math.isfinite(value):
                self._stop_non_finite("the gradient norm", value, ids)
            self._check_stalled(value, loss)
        return norm

    def _check_stalled(self, norm: float, loss: float) -> None:
        """alignkit.guards: a zero gradient with a positive loss warns once, ZERO_GRAD_PATIENCE in a row stop."""
        step = self.state.global_step + 1
        if norm != 0.0 or loss <= 0.0:
            self._zero_grad_since = None
            return
        if getattr(self, "_zero_grad_since", None) is None:
            self._zero_grad_since = step
            logger.warning("the gradient norm is exactly 0 at optimizer step %d while the loss is %.6g: nothing is "
                           "learning at this step (the run stops if this lasts %d steps)", step, loss,
                           ZERO_GRAD_PATIENCE)
        if step - self._zero_grad_since + 1 >= ZERO_GRAD_PATIENCE:
            raise StalledTrainingError(self._zero_grad_since, step, loss, self.loss_scale(**self.objective_settings()))

    def _stop_non_finite(self, what: str, value: float, ids: list[str] | None) -> None:
        """Log the bad value as NaN / inf (metrics.jsonl keeps it), then stop before the optimizer step."""
        step = self.state.global_step + 1
        key = "grad_norm" if "gradient" in what else "loss"
        self.state.global_step = step  # the row names the step that failed (the run ends here)
        try:
            self.log({key: value})
        except Exception:  # the error below matters more than the log row  # noqa: BLE001
            logger.debug("could not log the non-finite %s", key, exc_info=True)
        err = NonFiniteError(what, value, step, ids, causes=likely_causes(self.loss_scale(**self.objective_settings())))
        raise err

    # -- loss ------------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, LossOutput]:
        inputs.pop(RECORD_IDS, None)
        out = self.objective(model, inputs)
        w = inputs.get("weight")
        if w is not None:
            w = w.to(out.losses.device, out.losses.dtype)
        if num_items_in_batch is None:  # evaluation, or a direct call: this batch alone
            norm = self.count_items(inputs)
            loss = reduce_loss(out.losses, w, normalizer=norm)
            if not model.training:  # eval_loss over the whole evaluation set (`log`)
                total = reduce_loss(out.losses.detach(), w, normalizer=1.0).float()
                self._eval_totals.add_loss(total, norm.detach().float().to(total.device))
        else:  # training: the global count of the optimizer step; DDP averages, so scale by processes
            loss = reduce_loss(out.losses, w, normalizer=num_items_in_batch) * self.args.world_size
        self._record(out.metrics, "train" if model.training else "eval")
        if model.training:
            self._count_tokens(inputs)
        elif w is not None:
            self._eval_totals.add_weighted(self.weighted_totals(out.metrics, w), (w.detach() != 1).sum().float())
        return (loss, out) if return_outputs else loss

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """Input tokens (not padding) of a training micro-batch, for TRL's cumulative `num_tokens`."""
        if inputs.get("sequence_length") is not None:  # padding-free
            n = inputs["sequence_length"].sum()
        elif inputs.get("attention_mask") is not None:
            n = inputs["attention_mask"].sum()
        else:
            n = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        pending = getattr(self, "_tokens_pending", None)
        self._tokens_pending = n.detach().float() if pending is None else pending + n.detach().float()

    def compute_loss_context_manager(self):
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())  # bf16/fp16 per TrainingArguments; else a no-op
        return stack

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's, with raw rows given here (TRL's columns, as the trainer's own data) tokenized first under
        the trainer's settings; they reached the collator untokenized (`KeyError: 'chosen_input_ids'`). A dict is
        the Trainer's several sets: it calls this method for each."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            owner = f"{type(self).__name__}.evaluate"
            eval_dataset, kind, _ = prepare_one("eval_dataset", eval_dataset, self.processing_class, self.record_kinds,
                                                self.tokenize_config, self.dataset_num_proc, owner)
            trained = feature_kind(self.train_dataset[0]) if self.train_dataset is not None and len(
                self.train_dataset) else None
            if trained is not None and kind is not None and kind != trained:
                raise ValueError(f"{owner}: eval_dataset holds {kind} examples, and this trainer's collator takes "
                                 f"{trained} ones (its train_dataset's); pass rows of the training data's format")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        inputs.pop(RECORD_IDS, None)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- metrics ---------------------------------------------------------------------------------------

    def metric_totals(self, metrics: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (sum, count) of one step's metrics; logged as sum / count. Override for metrics that
        come as sums with separate counts (KTO)."""
        out = {}
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().float()
            out[k] = (v.sum(), torch.tensor(float(v.numel()), device=v.device))
        return out

    def weighted_totals(self, metrics: dict[str, Tensor], w: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (sum_i w_i v_i, sum_i w_i) of an evaluation batch's metrics that hold one value per example (shape
        (B,), as the weights; not `unweighted_metrics`), logged as eval_weighted/<name> (`EvalTotals`)."""
        w = w.detach().float()
        out = {}
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().float()
            if k not in self.unweighted_metrics and v.dim() == 1 and v.shape == w.shape:
                out[k] = ((v * w.to(v.device)).sum(), w.sum().to(v.device))
        return out

    def _record(self, metrics: dict[str, Tensor], mode: str) -> None:
        add_totals(self._metrics[mode], self.metric_totals(metrics))

    def _sum_over_processes(self, stores: list[Totals]) -> list[dict[str, tuple[float, float]]]:
        """Each store's name -> (sum, count), summed over processes in one collective (every process holds the same
        names: they come from the objective and the data's columns)."""
        keys = [(i, k) for i, store in enumerate(stores) for k in sorted(store)]
        out: list[dict[str, tuple[float, float]]] = [{} for _ in stores]
        if not keys:
            return out
        dev = stores[keys[0][0]][keys[0][1]][0].device
        totals = torch.stack([torch.stack([stores[i][k][0].to(dev), stores[i][k][1].to(dev)]) for i, k in keys])
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        for (i, k), (s, n) in zip(keys, totals.tolist()):
            out[i][k] = (s, n)
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self._metrics[mode]
        extra = self._eval_totals.parts() if mode == "eval" else []
        if store or any(extra):
            metrics, *extra_sums = self._sum_over_processes([store, *extra])
            values = {k: s / n for k, (s, n) in metrics.items() if n > 0}
            if mode == "eval":
                exact, weighted = EvalTotals.from_parts(extra_sums)
                values.update(weighted)
                for k in [k for k in logs if k.endswith("_loss")] if exact is not None else []:  # the Trainer's mean
                    logs[k] = exact[0] / max(exact[1], torch.finfo(torch.float32).tiny)  # of batch losses: one N
                self._eval_totals.clear()
            # the Trainer's metric_key_prefix (eval_<set>_ for each set of an eval_dataset dict), read off its runtime
            prefix = next((k[:-len("runtime")] for k in logs if k.startswith("eval_") and k.endswith("_runtime")),
                          "eval_") if mode == "eval" else ""
            logs.update({prefix + k: v for k, v in values.items()})
            store.clear()
        if "train_runtime" in logs and getattr(self, "_trained_nothing", False):
            # the summary of a call that trained no step (resumed with every step done): the run's own summary was
            # logged when those steps were; a second row at the same step put two summaries in metrics.jsonl, the
            # plots and TensorBoard (its train_loss the Trainer's 0.0 over no step)
            logger.info("no optimizer step was trained: no training summary is logged")
            return
        if mode == "train":
            self.run_train_loss(logs)  # a resumed run's summary: the mean over every step, not the resumed ones
            self._flush_tokens()
            if getattr(self, "_num_tokens", None) is not None:
                logs["num_tokens"] = self._num_tokens  # cumulative input tokens of training, all processes
        super().log(logs, start_time)

    def _flush_tokens(self) -> None:
        """Add the tokens counted since the last flush (summed over processes) to the cumulative `num_tokens`.
        Called on every process (a collective under several processes): at logging and at checkpoint time."""
        pending = getattr(self, "_tokens_pending", None)
        if pending is None:
            return
        if self.args.world_size > 1:
            pending = self.accelerator.reduce(pending.reshape(1), reduction="sum")[0]
        self._num_tokens = (getattr(self, "_num_tokens", None) or 0.0) + float(pending)
        self._tokens_pending = None

    def planned_steps(self) -> int:
        """The optimizer steps the run has in all, as `train()` counts them: `max_steps`, or the epochs' steps over
        this trainer's training data (the Trainer's `set_initial_training_values`)."""
        return int(self.set_initial_training_values(self.args, self.get_train_dataloader())[-1])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `train`, from `resume_point(resume_from_checkpoint)` (trainers/checkpointing.py), under
        the ReFT prefix cache."""
        resume_from_checkpoint = self.resume_point(resume_from_checkpoint)
        with prefix_cache(self.model, self.reft_prefix_cache, data_passes(self.args, self.train_dataset), self.args):
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        return out._replace(training_loss=out.metrics.get("train_loss", out.training_loss))  # run_train_loss's


# packed_collator / shared_prompt_collator live in trainers/data_prep.py; still importable from here (preference.py)
__all__ = ["AlignTrainer", "TRAINING_ARGS_JSON", "completion_tokens", "packed_collator", "is_dropout_rate",
           "shared_prompt_collator", "turn_off_dropout"]