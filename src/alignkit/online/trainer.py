"""`OnlineTrainer`: the loop every online optimizer shares. One step is

    prompts  = next_prompts(step)                   a slice of the prompt set (reshuffled every pass)
    samples  = generate(prompts, step)              num_samples per prompt, from the CURRENT policy
    rollout  = annotate + score(samples)            rewards (raw, normalised, clipped), and, without gradient,
                                                    the policy's and the reference's per-token log-probs
    batch    = build_batch(rollout)                 subclass: pairs (online DPO), group advantages (GRPO/RLOO),
                                                    GAE (PPO)
    metrics  = optimise(batch)                      subclass loss, run by `run_minibatches` (epochs x minibatches)

and its metrics (reward mean/std, KL to the reference, response length, entropy, the annotator's failure
counts, the subclass's loss metrics) are logged with `logging` and appended to `<output_dir>/metrics.jsonl`.
At the end the trainable state is saved (`alignkit.adapters.save_adapter`).

Why a plain torch loop with `accelerate.Accelerator` and not a `transformers.Trainer` subclass: the Trainer
is built around a fixed dataset, a dataloader and one `compute_loss` per micro-batch; an online step
generates its own data, runs no-grad passes (old and reference log-probs, values), then several epochs of
minibatch updates on that data. TRL's online trainers subclass Trainer and then replace its training loop
wholesale, keeping little but the name. Here the loop is ~60 readable lines; `Accelerator` still gives device
placement, DDP gradient averaging (`prepare`), `backward`, gradient clipping and mixed precision, so the
distribution story is unchanged (`accelerate launch`). Per-sample weights reach every loss through the one
reduction `alignkit.losses.reduce_loss` (weighted mean over a minibatch).

Reference (`alignkit.trainers.reference.build_reference`, as the offline trainers): the policy with its adapter
switched off (lora, reft, reft+lora; no second copy), or a frozen copy of the initial model for full finetuning
(`reference="auto"`), or a `ref_model` you pass.

Several processes (`torchrun`, `accelerate launch`; DDP through `Accelerator.prepare`): a step's
`prompts_per_step` prompts are the GLOBAL batch. Every rank draws the same shuffled slice and keeps its
contiguous share (rank r of W: prompts [r n/W, (r+1) n/W)), samples it with its own seed
((seed * 100003 + step) * W + r; one process keeps seed * 100003 + step), so ranks never duplicate rollouts.
All K samples of a prompt live on one rank, so group statistics (GRPO/RLOO baselines, "group" reward
normalisation, online-DPO pairs) are local; statistics over the whole batch are reduced across ranks:
"running" reward moments (updated with every rank's scores), PPO's advantage whitening, and each update's
loss normaliser (sum of weights, or of weighted tokens for "token_sum"), so that DDP's gradient average equals the
one-process gradient of the same global batch. `mini_batch_size` is global (each rank takes its share);
`gradient_accumulation_steps` splits each minibatch into micro-batches (one backward each, one optimizer
step, the same normaliser, so the update is the minibatch's). Metrics are reduced across ranks (reward
statistics from every rank's scores; counts summed; the rest averaged) and only the main process writes
`metrics.jsonl` and the saved model.

Failed annotations (NaN scores) get weight 0 (they do not train) and the mean of their group's valid rewards as
their reward; GRPO / RLOO advantages leave them out of their group's statistics (`alignkit.online.grpo`).

The class is assembled from one module per part: this one holds the set-up and the loop (`train`); `config.py` the
settings (`OnlineConfig`); `step.py` prompts, generation, annotation and the `Rollout` (`RolloutSteps`); `updates.py`
the minibatch optimisation (`MinibatchUpdates`); `metrics.py` cross-process reductions and the metrics' output
(`ProcessMetrics`); `evaluation.py` the held-out prompts' evaluation (`HeldOutEvaluation`); `checkpoint.py` checkpoints,
the saved model and the Hub upload (`Checkpoints`). `alignkit.online.trainer` still exports `OnlineConfig`, `Rollout`
and `METRICS_FILE`.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from alignkit.adapters import adapter_of, enable_gradient_checkpointing, record_base, saves_whole_model, unwrap_lm
from alignkit.distributed import (
    check_process_count, enable_sharding_on_cpu, is_fsdp2, refuse_fsdp1_adapter,
    refuse_ignored_fsdp_settings, refuse_unmatched_wrap_classes, requested_engine, take_over_activation_checkpointing,
)
from alignkit.guards import RewardStallError
from alignkit.losses import AdaptiveKLController, FixedKLController
from alignkit.models.vllm_support import (check_head_size, check_moe_lora, check_rope_type, engine_limit,
                                          folder_config, vllm_installed)
from alignkit.online.annotators import Annotator, build_annotator
from alignkit.online.checkpoint import Checkpoints
from alignkit.online.config import OnlineConfig
from alignkit.online.ema import ActorEMA
from alignkit.online.evaluation import HeldOutEvaluation
from alignkit.online.generation import (as_prompt_records, check_on_policy_options, check_sampler, check_stop_strings,
                                       encode_prompts, lean_reason, note_generation_config)
from alignkit.online.metrics import METRICS_FILE, ProcessMetrics
from alignkit.online.normalize import RunningMoments
from alignkit.online.ref_sync import build_online_ref_sync
from alignkit.online.step import Rollout, RolloutSteps, zero_spread_fraction
from alignkit.online.updates import MinibatchUpdates
from alignkit.online.vllm_engine import check_engine_base, check_engine_rope, check_lora_rank
from alignkit.online.vllm_generation import MOE_LORA_FIX, NO_VLLM, check_model_len, refuse_unsupported
from alignkit.settings import ConfigError
from alignkit.trainers.base import turn_off_dropout
from alignkit.trainers.weights import refuse_bad_weights
from alignkit.trainers.packing import resolve_online_share_prompt
from alignkit.trainers.precision import refuse_float16_adam, warn_low_precision
from alignkit.trainers.reference import HasReference, Reference, build_reference

logger = logging.getLogger(__name__)

# a `loss_scale` part: the rewards scale a loss whose advantages (or value targets) are not normalised
REWARD_SCALE = "the rewards' scale (method.reward_normalization, method.reward_clip)"


def seen_scores(lo: float | None, hi: float | None) -> str:
    """The scores of a stretch of steps, for a message: (lowest, highest), None: none scored."""
    if lo is None:
        return "no response was scored"
    return f"every score was {lo:g}" if lo == hi else f"scores from {lo:g} to {hi:g}"


def _has_accelerator() -> bool:
    """A GPU (or other accelerator) torch can use. Without one, `Accelerator` must be told `cpu=True`: under
    torchrun it otherwise forms a process group but reports ONE process (accelerate 1.x only selects
    MULTI_CPU/gloo for `cpu=True` or ACCELERATE_USE_CPU), and every rank would train alone."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def build_optimizer(params: list[torch.nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """The online optimizer `config.optimizer` names: "sgd", "adamw" (torch's per-tensor loop) or "adamw_fused" (its
    fused kernel: one call for every tensor, the same update up to float rounding; on CPU ~4x less time a step for
    the benchmarks' full-finetuned tiny Llama, bench/README). torch refuses the fused kernel for parameters it does
    not cover (not floating point, a device without it) at their first step, after the run folder is written: a
    probe step on one zero element of each dtype / device finds them now, an error here, not a quiet switch to the
    loop."""
    kwargs = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, **kwargs)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    kinds = {(p.dtype, p.device) for p in params}  # torch checks them only at the first step: probe each kind now
    probes = [torch.zeros(1, dtype=dtype, device=device, requires_grad=True) for dtype, device in kinds]
    try:
        for probe in probes:
            probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW(probes, fused=True, **kwargs).step()
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError as err:
        raise ConfigError(f"train.optim=adamw_torch_fused: torch's fused AdamW does not take these parameters "
                          f"({str(err).splitlines()[0]}); set train.optim adamw_torch (the same update, one tensor "
                          "at a time)") from err


class OnlineTrainer(HasReference, RolloutSteps, MinibatchUpdates, ProcessMetrics, Checkpoints, HeldOutEvaluation):
    """Base of the online optimizers. Subclasses implement `build_batch` and `optimise`.

    Args:
        model: the policy, wrapped by `alignkit.adapters.apply_adapter` (any adapter kind).
        tokenizer: its tokenizer (with a pad token).
        prompts: prompt records, strings or conversations (`generation.as_prompt_records`).
        annotator: an `Annotator` or a spec for `build_annotator` ({"type": "function", "fn": "mod:fn"}, ...).
        config: an `OnlineConfig` (or a subclass's).
        ref_model: a frozen reference (default: adapter off, or a frozen copy for full finetuning).
        output_dir: where metrics.jsonl and the final adapter go (nothing is written when None).
        eval_prompts: held-out prompts (same forms as `prompts`), sampled and scored every `config.eval_steps`
            steps and after the last step: `eval/*` metrics (`alignkit.online.evaluation`).
    """

    config_class = OnlineConfig
    needs_hidden = False  # PPO: keep the final hidden states of the rollout for the value head

    def reuses_training_pass(self) -> bool:
        """True when the rollout's no-grad policy pass can be skipped: the step's one training forward sees the
        same parameters and rows, so log pi_old = its log-probs detached (TRL's GRPO with num_iterations=1 does the
        same), and the rollout's "kl" / "entropy" metrics come from that forward (`pass_sums`, `metrics_from_sums`). The
        base loop never skips (subclasses decide); `score(policy_pass=True)` always runs it."""
        return False

    def __init__(self, model: nn.Module, tokenizer: Any, prompts: Sequence[Any], annotator: Annotator | dict,
                 config: OnlineConfig | None = None, *, ref_model: nn.Module | None = None,
                 output_dir: str | Path | None = None, eval_prompts: Sequence[Any] | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(self.config).__name__}")
        fsdp2 = self.check_before_writing(model, tokenizer, prompts, annotator, output_dir, eval_prompts)
        self.vllm_generator: Any = None  # the colocated engine / the server's client, made at the first generation
        #   unless the caller hands one in (the CLI: the VllmServerGenerator it checked before the run folder)
        if self.config.ema_decay is not None and fsdp2:
            raise ConfigError("train.ema_decay: the EMA of the policy is not kept under FSDP2 (its weights are "
                              "sharded); remove it, or train under DDP")
        self.prepare_model(model, ref_model, fsdp2)  # the reference, extra modules, optimizer, accelerate's wrapping
        self.ema = (ActorEMA(self.policy_trainable(), self.config.ema_decay) if self.config.ema_decay is not None
                    else None)
        self.ref_syncer = build_online_ref_sync(self, model, ref_model, fsdp2)  # method.ref_sync (TR-DPO)
        self.reset_loop_state()

    def check_before_writing(self, model: nn.Module, tokenizer: Any, prompts: Sequence[Any],
                             annotator: Annotator | dict, output_dir: str | Path | None,
                             eval_prompts: Sequence[Any] | None) -> bool:
        """The library's refusals, made before anything is written or trained (as `alignkit <command>` makes its own
        before it writes the run folder): the inputs, the launch (DeepSpeed, mixed precision, process count), the
        step's shares over the processes and the generation backend. On the way it sets `tokenizer`, `annotator`,
        `prompts`, `output_dir`, `trackers`, `accelerator`, `world` / `rank` and the held-out prompts. Returns
        whether FSDP2 shards the model."""
        self.check_inputs(tokenizer, prompts, annotator, output_dir, eval_prompts)
        refuse_unmatched_wrap_classes(model, type(self).__name__)  # an FSDP config's layer classes: read, in the model
        refuse_fsdp1_adapter(saves_whole_model(model), type(self).__name__, online=True)  # FSDP1: a GPU; no gathering
        fsdp2 = self.start_accelerator()
        self.check_batch_shares(eval_prompts)
        self.check_generation(model, tokenizer, fsdp2)
        return fsdp2

    def check_inputs(self, tokenizer: Any, prompts: Sequence[Any], annotator: Annotator | dict,
                     output_dir: str | Path | None, eval_prompts: Sequence[Any] | None) -> None:
        """The tokenizer's pad token, the prompts (and the columns the annotator reads), the settings that only write
        into an output_dir."""
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
        self.tokenizer, self.annotator = tokenizer, build_annotator(annotator)
        self.prompts = as_prompt_records(prompts)
        if not self.prompts:
            raise ValueError("online training needs at least one prompt")
        # prompts all weighted 0 (a weight column of 0s): every sample's loss weight 0, so each step's loss was 0 and
        #   the run saved the model unchanged, exit 0 (the CLI's readers refuse such records; this is the library's
        #   check)
        refuse_bad_weights(type(self).__name__, [{"weight": r.weight} for r in self.prompts])
        # a reward function's parameter no prompt row gives (a dataset column the data lacks) stopped the first step,
        # after the run folder's trackers were started: refused here, as `alignkit <command>` does before loading
        held_out = as_prompt_records(eval_prompts) if eval_prompts is not None else []
        self.annotator.check_columns({k for r in [*self.prompts, *held_out] for k in r.meta.get("columns", {})},
                                     "the prompts" + (" and held-out prompts" if held_out else ""))
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if self.output_dir is None:  # what only writes into output_dir: set without one, it was never read
            c = self.config
            unread = [(k, getattr(c, k)) for k in ("save_steps", "push_to_hub") if getattr(c, k)]
            unread += [("report_to", c.report_to)] if c.report_to not in (None, "none", []) else []
            if unread:
                key, value = unread[0]
                raise ValueError(f"{type(self).__name__}: {key}={value!r} writes into (or uploads) output_dir, and no "
                                 f"output_dir was given, so it would be ignored; pass output_dir=..., or remove {key}")

    def start_accelerator(self) -> bool:
        """The trackers and the `Accelerator`, refusing a launch the loop does not run (DeepSpeed, mixed precision,
        other processes than asked for); returns whether FSDP2 shards the model."""
        self.trackers = self._trackers() if self.output_dir is not None else []
        if requested_engine() == "deepspeed":  # accelerate would drop it on CPU (plain DDP) or need its batch config
            raise ConfigError(f"{type(self).__name__}: the online loop does not run under DeepSpeed yet (the "
                              "accelerate config says distributed_type: DEEPSPEED): launch it with "
                              "configs/accelerate/fsdp2.yaml (sharded) or configs/accelerate/ddp-cpu.yaml / torchrun "
                              "(DDP)")
        refuse_ignored_fsdp_settings(type(self).__name__)  # fsdp_state_dict_type: checkpoints are always full
        others = [t for t in self.trackers if t != "tensorboard"]  # TensorBoard: `start_trackers`
        self.accelerator = Accelerator(cpu=not _has_accelerator(), log_with=others or None,
                                       project_dir=str(self.output_dir) if self.trackers else None)
        fsdp2 = enable_sharding_on_cpu(self.accelerator) or is_fsdp2(self.accelerator)
        if self.accelerator.mixed_precision != "no":  # accelerate's, from its config / ACCELERATE_MIXED_PRECISION
            raise ConfigError(f"{type(self).__name__}: accelerate's mixed_precision is "
                              f"{self.accelerator.mixed_precision!r} (an accelerate launch config, --mixed_precision, "
                              "ACCELERATE_MIXED_PRECISION, or a bf16 Trainer earlier in this Python process), and the "
                              "online loop does not run mixed precision (its "
                              "first generation failed with a dtype error, after the run folder was written); launch "
                              "with mixed_precision 'no' (configs/accelerate/*-cpu.yaml, fsdp2.yaml, or "
                              "--mixed_precision no), and load the model in bf16 (model.dtype=bfloat16) for bf16 "
                              "compute")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_process_count(self.world, type(self).__name__)  # the processes asked for are the ones training
        return fsdp2

    def check_batch_shares(self, eval_prompts: Sequence[Any] | None) -> None:
        """The step's prompts, the held-out prompts and the minibatch divide over the processes."""
        n_step = min(self.config.prompts_per_step, len(self.prompts))
        if n_step < self.config.prompts_per_step:  # the step's batch (and every mean over it) is smaller than asked
            logger.warning("prompts_per_step (method.prompts_per_step on the command line) is %d, and the data holds "
                           "%d prompt(s): each step samples %d, so its batch is %d sample(s), not %d; add prompts or "
                           "lower method.prompts_per_step", self.config.prompts_per_step, len(self.prompts), n_step,
                           n_step * self.config.sampling.num_samples,
                           self.config.prompts_per_step * self.config.sampling.num_samples)
        if n_step % self.world:
            raise ValueError(f"online config: prompts_per_step ({n_step}, method.prompts_per_step on the command "
                             f"line, capped by the {len(self.prompts)} prompt(s)) must be a multiple of the number "
                             f"of processes ({self.world}): each process samples an equal share of the step's prompts")
        self.set_eval_prompts(eval_prompts)
        if self.config.mini_batch_size is not None and self.config.mini_batch_size % self.world:
            raise ValueError(f"online config: mini_batch_size ({self.config.mini_batch_size}) must be a multiple "
                             f"of the number of processes ({self.world}) or None")

    def check_generation(self, model: nn.Module, tokenizer: Any, fsdp2: bool) -> None:
        """What the generation backend would refuse or ignore only at the first step (vLLM: the model, its
        generation_config, the engine, the processes; transformers: the sampler), and the stop strings."""
        # generation_config.json options beyond sampling.* (no_repeat_ngram_size, suppress_tokens, ...): off-policy
        # samples under model.generate, a second distribution under vLLM
        check_on_policy_options(model, tokenizer, self.config.sampling, self.config.generation_backend)
        note_generation_config(model, tokenizer, self.config.sampling)
        if self.config.generation_backend == "vllm":
            refuse_unsupported(adapter_of(model), model)  # ReFT; LoRA features vLLM's LoRA lacks
            if self.config.vllm_mode == "colocate":  # before the engine starts (server mode: at its /info)
                self.check_colocated_engine(model, tokenizer)
            if self.config.vllm_mode == "server" and self.world > 1:
                raise ValueError(f"vllm_mode='server' (method.vllm_mode) runs in ONE process ({self.world} here): "
                                 "each process would push its own weights to the one server; run it in one process "
                                 "(no torchrun / accelerate launch), or use method.generation_backend=transformers "
                                 "with several processes")
            if fsdp2 or self.world > 1:  # one colocated engine per process: no shard-aware placement, sync or
                #   seeding yet (each rank would silently start its own engine on the default device)
                raise ConfigError(f"generation_backend='vllm' (method.generation_backend) runs one colocated engine "
                                 f"in ONE process; this run has {self.world} process(es)"
                                 f"{' under FSDP' if fsdp2 else ''}, and several processes with vLLM are not "
                                 f"supported yet: run it in one process (no torchrun / accelerate launch), or use "
                                 f"method.generation_backend=transformers with several processes")
            if self.config.vllm_mode == "colocate" and not vllm_installed():  # the engine is made at the first step
                raise ConfigError(f"{NO_VLLM}, or use generation_backend='transformers' (or vllm_mode='server' with "
                                  "alignkit vllm-serve running in vLLM's environment); the colocated engine starts "
                                  "at the first step, where vLLM's absence stopped the run")
        else:
            check_sampler(self.config.sampling, lean_reason(model, tokenizer, self.config.sampling))
        check_stop_strings(tokenizer, self.config.sampling)  # vLLM too decodes without special tokens

    def prepare_model(self, model: nn.Module, ref_model: nn.Module | None, fsdp2: bool) -> None:
        """Dropout off, the base's fingerprint, the reference, the extra modules (PPO's value head), the optimizer,
        and accelerate's wrapping (FSDP2: model and optimizer sharded together)."""
        turn_off_dropout(model)  # old, new and reference log-probs then come from one deterministic network
        # a model wrapped by hand: its base's fingerprint before training changes a trained embedding
        record_base(model)
        if self.uses_reference(ref_model):
            self.reference: Reference = build_reference(model, self.config.reference, ref_model=ref_model,
                                                        chunk_size=self.config.chunk_size,
                                                        supports=("adapter_off", "copy"), owner=type(self).__name__)
        else:  # kl_coef 0, fixed: the KL term is multiplied by 0 (TRL's beta 0 loads none); online DPO: reference-free
            self.reference = Reference("none")
            if self.config.kl_estimator != type(self.config).__dataclass_fields__["kl_estimator"].default:
                raise ConfigError(f"method.kl_estimator: {self.config.kl_estimator!r} is the estimator of the logged "
                                  f"KL to the reference, and no reference is built ({self.why_no_reference()}), so "
                                  "it would be ignored; set method.reference to adapter_off or copy to build one and "
                                  "log the KL with it, or remove method.kl_estimator")
        self.reference.place(self.accelerator.device, self.accelerator)  # FSDP2: a copy sharded like the policy
        self.model = model
        # None: each prompt's samples as one row where that runs as varlen rows (CPU, sdpa, no ReFT)
        self.share_prompt = resolve_online_share_prompt(self.config.share_prompt, model, self.accelerator.device)
        self.extra_modules = self.build_extra_modules()  # e.g. PPO's value head
        if fsdp2 and self.extra_modules:
            raise ConfigError(f"{type(self).__name__} under FSDP: its extra modules (PPO's value head) are not "
                             "sharded yet; use DDP (configs/accelerate/ddp-cpu.yaml or --multi_gpu) for PPO")
        params = [p for p in model.parameters() if p.requires_grad]
        params += [p for m in self.extra_modules for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters; wrap it with apply_adapter first")
        # fp16 weights + AdamW: nan within a few steps (optimizer: train.optim's online name, settings/train.py)
        refuse_float16_adam(model, self.config.optimizer, "optimizer", mixed=False)
        warn_low_precision(model, self.config.learning_rate)  # bf16 weights: updates round away
        optimizer = build_optimizer(params, self.config)
        if fsdp2:  # accelerate shards model and optimizer together (fully_shard swaps the parameters)
            if take_over_activation_checkpointing(self.accelerator, type(self).__name__):  # names stay the model's
                enable_gradient_checkpointing(model)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        else:
            self.model = self.accelerator.prepare(model)
            self.optimizer = self.accelerator.prepare(optimizer)
        self.extra_modules = [self.accelerator.prepare(m) for m in self.extra_modules]

    def reset_loop_state(self) -> None:
        """The KL controller, reward moments, RNGs and counters of the loop (a resumed run restores them)."""
        c = self.config
        self.kl_ctl = (AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.kl_target is not None
                       else FixedKLController(c.kl_coef))
        self.moments = RunningMoments()
        self.rng = torch.Generator().manual_seed(c.seed)
        self._order: list[int] = []
        self._py_rng = random.Random(c.seed)
        self.history: list[dict[str, float]] = []  # this `train` call's rows (a resumed run: from its checkpoint on)
        self.steps_done = 0  # steps of the whole run, those before a resumed checkpoint included
        self._num_tokens = 0  # TRL's num_tokens: prompt + completion tokens sampled so far, all processes

    def check_colocated_engine(self, model: nn.Module, tokenizer: Any) -> None:
        """What the colocated engine would refuse, or cut short, only when it starts at the first step (after the
        run folder is written) or run otherwise than the policy: the model folder it loads (its RoPE, its weights: the
        policy's base), a LoRA
        rank above `method.vllm.max_lora_rank`, and the
        longest prompt + max_new_tokens past its max_model_len (`method.vllm.max_model_len`, else the one vLLM
        derives from the model folder, capped at the context alignkit reads from a RoPE-scaled one:
        `vllm_support.engine_limit`)."""
        vllm = self.config.vllm
        folder = str(vllm.get("model") or getattr(unwrap_lm(model).config, "name_or_path", "") or "")
        if not folder or not Path(folder, "config.json").is_file():
            raise ConfigError(f"generation_backend='vllm': the colocated engine loads the policy's model folder, and "
                              f"{folder!r} is none (no config.json); set method.vllm.model to the folder the "
                              "policy's base was loaded from")
        ranks = [int(c.r) for c in getattr(model, "peft_config", {}).values() if hasattr(c, "r")]
        if ranks and adapter_of(model).vllm_sync == "lora_request":
            check_lora_rank(max(ranks), vllm)
        check_engine_rope(unwrap_lm(model).config, folder, vllm)
        check_engine_base(model, folder, vllm)
        check_head_size(folder_config(folder, vllm), folder, "generation_backend='vllm'",
                        "use a model whose head size vLLM takes, or method.generation_backend=transformers")
        check_rope_type(folder_config(folder, vllm), folder, "generation_backend='vllm'",
                        "use method.generation_backend=transformers, or another model.rope_scaling type (linear, yarn)")
        if adapter_of(model).vllm_sync == "lora_request":  # vLLM starts with enable_lora (row V20)
            check_moe_lora(folder_config(folder, vllm), folder, "generation_backend='vllm'", MOE_LORA_FIX)
        limit, source = engine_limit(folder, vllm)  # RoPE-capped (row V16): VllmGenerator starts vLLM with it
        records = [*self.prompts, *self.eval_prompts]
        given = vllm.get("max_model_len") is not None
        check_model_len(records, encode_prompts(records, tokenizer, self.config.formatter,
                                                self.config.max_prompt_length),
                        self.config.sampling.max_new_tokens, limit,
                        "method.vllm.max_model_len" if given else f"the engine's max_model_len (from {source})",
                        fixed=not given)

    # -- hooks for subclasses -----------------------------------------------------------------------

    def build_extra_modules(self) -> list[nn.Module]:
        return []

    def uses_reference(self, ref_model: nn.Module | None) -> bool:
        """Whether the loop builds a reference and runs its forward each step. Not with a fixed kl_coef of 0 (the KL
        term is multiplied by 0; TRL's beta 0 loads none either), unless asked for one (a `ref_model`, or
        `reference` other than "auto"): it then only gives the "kl" metrics (docs/metrics.md)."""
        c = self.config
        return c.kl_coef != 0 or c.kl_target is not None or ref_model is not None or c.reference != "auto"

    def why_no_reference(self) -> str:
        """Why `uses_reference` is False, for messages."""
        return "a fixed method.kl_coef of 0 multiplies the KL term by 0"

    @classmethod
    def loss_scale(cls, config: OnlineConfig) -> str | None:
        """The settings that scale this method's loss under `config`, named by the advice of a non-finite loss or
        gradient norm (`alignkit.guards.likely_causes`, as the offline trainers' `loss_scale`); None: none to lower.
        Each method names what its loss reads (online DPO: method.beta, or none for orpo / slic / sft)."""
        return None

    @classmethod
    def penalty_scales(cls, config: OnlineConfig) -> list[str]:
        """The KL penalty's and entropy bonus's coefficients where they act: method.kl_coef unless a fixed 0 (no
        reference is run), method.entropy_coef when above 0 (GRPO / RLOO / PPO's `loss_scale`)."""
        scales = ["method.kl_coef"] if config.kl_coef != 0 or config.kl_target is not None else []
        return scales + (["method.entropy_coef"] if getattr(config, "entropy_coef", 0.0) > 0 else [])

    def build_batch(self, rollout: Rollout) -> Any:
        raise NotImplementedError

    def optimise(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def clipped_alike(self) -> str:
        """"" unless this step's scores differed and method.reward_clip made the rewards alike (`score`): then the
        words that say so, added where a message says the samples got the same reward."""
        if not getattr(self, "_flat_by_clip", False):
            return ""
        return (f" after method.reward_clip={self.config.reward_clip!r} (the scores differed; the clip at "
                f"+-{self.config.reward_clip!r} made them alike)")

    def clip_advice(self, otherwise: str) -> str:
        """The fix of a message about rewards that were alike: `otherwise`, or the clip's when it made them so."""
        return "raise method.reward_clip above the rewards' spread, or remove it" if self.clipped_alike() else otherwise

    def no_signal(self, metrics: dict[str, float]) -> tuple[str, str] | None:
        """None when the step's feedback could move the policy; else (what the step's warning says, what the
        run's says after "no step of this run", with {steps}). Here: every prompt's samples scored alike."""
        if not getattr(self, "_step_flat", False):
            return None
        return (f"every prompt's {self.config.sampling.num_samples} samples got the same reward{self.clipped_alike()}, "
                "so this step has no reward signal (only the KL term moves the policy); "
                + self.clip_advice("a reward that never varies is usually a bug in the annotator"),
                "had a reward spread inside any prompt's group (frac_reward_zero_std = 1 at all {steps} step(s)): "
                "the rewards did not move the policy")

    def check_annotator_advice(self) -> str:
        """The fix a stall's message gives when the scores never varied: look at the annotator itself."""
        return (f"check {self.annotator.source()} on a few responses (e.g. a format they never match, a judge that "
                "always answers the same)")

    def stall_cause(self, seen: str) -> tuple[str, str]:
        """(why `stall_steps` steps in a row had no reward signal, what to do about it) for `RewardStallError`;
        `seen`: the scores of those steps (`seen_scores`). Here (GRPO / RLOO): every group scored alike."""
        return (f"every prompt's {self.config.sampling.num_samples} samples got the same reward from "
                f"{self.annotator.source()} ({seen}){self.clipped_alike()}, so every group advantage was 0 and the "
                "reward moved nothing (only the KL / entropy terms trained)",
                self.clip_advice(self.check_annotator_advice()))

    def check_stall(self, step: int, flat: bool) -> None:
        """Count the steps in a row without reward signal (`no_signal`, `flat`); at `config.stall_steps` of them stop
        with a `RewardStallError` naming the steps, the reward source, the scores seen and the fix (after the step's
        metrics row, before its checkpoint or the saved model). 0 steps: never stop (the run's warnings remain)."""
        if not flat:
            self._stall = None
            return
        first, lo, hi = self._stall or (step, None, None)
        got = getattr(self, "_step_range", None)  # (min, max) of the step's scores; None: none scored
        if got is not None:
            lo, hi = got if lo is None else (min(lo, got[0]), max(hi, got[1]))
        self._stall = (first, lo, hi)
        n = self.config.stall_steps
        if n and step + 1 - first >= n:
            why, fix = self.stall_cause(seen_scores(lo, hi))
            raise RewardStallError(first + 1, step + 1, (
                f"{type(self).__name__}: no reward signal at steps {first + 1}-{step + 1} ({step + 1 - first} in a "
                f"row, method.stall_steps={n}): {why}; the run stopped before saving the model (its metrics.jsonl rows "
                f"and earlier checkpoints are kept). {fix[0].upper()}{fix[1:]}, or set method.stall_steps=0 to train "
                "on anyway"))

    # -- the loop ---------------------------------------------------------------------------------------

    @property
    def policy(self) -> nn.Module:
        """The policy without accelerate's wrapper (DDP, compile). Unwrapped once per `self.model` object: accelerate's
        `unwrap_model` re-reads installed-package metadata on every call (~5 ms, twice a step)."""
        got = self.__dict__.get("_unwrapped")
        if got is None or got[0] is not self.model:
            got = self.__dict__["_unwrapped"] = (self.model, self.accelerator.unwrap_model(self.model))
        return got[1]

    def train(self, resume_from_checkpoint: str | Path | None = None) -> list[dict[str, float]]:
        """Run `config.steps` steps; returns each step's metrics (also in `history`, `metrics.jsonl` and the
        trackers: TensorBoard events in <output_dir>/tensorboard by default). With `resume_from_checkpoint` (a
        folder written by `save_checkpoint`), continue after its step: on a CPU in fp32 the later steps equal an
        uninterrupted run's exactly; metrics.jsonl keeps its rows up to that step. Without it, an output_dir whose
        metrics.jsonl already holds rows, or whose checkpoints/ holds an earlier run's checkpoints, is refused
        (`prepare_metrics_file`, `check_fresh_checkpoints`)."""
        self._stall = None  # (first step, lowest, highest score) of the steps in a row without one (`check_stall`;
        #   a resumed run: the checkpoint's, so that method.stall_steps counts across the resume)
        # steps of the run without a reward spread / whose every response reached max_new_tokens (warned about
        # below), counted from step `_counted_from`: 0, or a resume's step when its checkpoint did not record them
        self._flat_steps = self._clipped_steps = self._counted_from = 0
        start = self.load_checkpoint(resume_from_checkpoint) if resume_from_checkpoint is not None else 0
        self.prepare_metrics_file(start)  # an earlier run's rows: kept up to the checkpoint, or refused from step 0
        self.check_fresh_checkpoints(start)  # an earlier run's checkpoints: refused from step 0 (after its rows)
        self.steps_done = start
        if self.trackers:  # opened here, not in __init__: nothing is written before training starts
            self.start_trackers(start)
        bar = tqdm(total=self.config.steps, initial=start, desc=type(self).__name__.replace("Trainer", ""),
                   unit="step", disable=not (self.config.progress_bar and self.accelerator.is_main_process))
        try:
            self._train_steps(bar, start)
        finally:
            bar.close()
            if self.trackers:  # not accelerator.end_training(): it also destroys the process group, which
                for tracker in self.accelerator.trackers:  # saving (FSDP gathers) and the caller still need
                    tracker.finish()
        self.warn_whole_run(start)
        if self.output_dir is not None and self.config.save_at_end:
            self.save(self.output_dir)
            if self.ema is not None:
                self.save_ema(self.output_dir / "model_ema")
            if self.config.push_to_hub and self.accelerator.is_main_process:
                self.push_to_hub()
        return self.history

    def warn_whole_run(self, start: int) -> None:
        """The end-of-run warnings: no step had a reward spread, every response was cut at max_new_tokens. They judge
        the whole run, a resumed one's earlier steps included (their counts come back with the checkpoint), or the
        steps since the resume when the checkpoint did not record them (and say so). Only when this call ran a step."""
        flat, ran = self._flat_steps, self.config.steps - self._counted_from
        since = "" if self._counted_from == 0 else f" since its resume after step {self._counted_from}"
        if self.config.steps - start <= 0:
            return
        if flat == ran:
            logger.warning("no step of this run%s %s", since, self._no_signal[1].format(steps=ran))
        if self._clipped_steps == ran:
            logger.warning("every response of this run's %d step(s)%s reached sampling.max_new_tokens (%d) without an "
                           "end token (completions/clipped_ratio = 1 at every step): the policy learned from cut-off "
                           "responses, and a reward that reads a response's end never saw one; raise "
                           "sampling.max_new_tokens", ran, since, self.config.sampling.max_new_tokens)

    def _train_steps(self, bar: Any, start: int = 0) -> None:
        for step in range(start, self.config.steps):
            t0 = time.perf_counter()
            self._step = step
            samples = self.generate(self.local_prompts(self.next_prompts()), step)
            self._step_ids = list(dict.fromkeys(s.prompt_id for s in samples if s.prompt_id))
            self._policy_pass = not self.reuses_training_pass()  # read by `score` (its default)
            rollout = self.score(samples)
            self._policy_pass = True
            batch = self.build_batch(rollout)
            metrics = self.reduce_metrics({"step": float(step), **rollout.metrics, **self.optimise(batch)})
            if "kl/sequence_sum" in metrics:  # absent without a reference (then the controller is a fixed 0)
                self.kl_ctl.update(metrics["kl/sequence_sum"], len(samples) * self.world)
            metrics["time/step_s"] = time.perf_counter() - t0
            if self.eval_due(step):  # after the step's update; not counted in time/step_s
                metrics.update(self.evaluate())
            self.log(metrics)
            self._clipped_steps += metrics.get("completions/clipped_ratio") == 1.0
            none = self.no_signal(metrics)
            if none is not None:
                self._no_signal = none
                self._flat_steps += 1
                if self._flat_steps == 1:
                    logger.warning("step %d: %s", step + 1, none[0])
            self.check_stall(step, none is not None)
            self.steps_done = step + 1
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "kl", "loss") if k in metrics})
            if self.output_dir is not None and self.config.save_steps and (step + 1) % self.config.save_steps == 0:
                self.save_checkpoint(self.output_dir / "checkpoints" / f"checkpoint-{step + 1}", step + 1)


__all__ = ["METRICS_FILE", "OnlineConfig", "REWARD_SCALE", "OnlineTrainer", "Rollout", "seen_scores",
           "zero_spread_fraction"]
