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

Reference: the policy with its adapter switched off (lora, reft, reft+lora; no second copy), or a frozen
copy of the initial model for full finetuning (`reference="auto"`), or a `ref_model` you pass.

Several processes (`torchrun`, `accelerate launch`; DDP through `Accelerator.prepare`): a step's
`prompts_per_step` prompts are the GLOBAL batch. Every rank draws the same shuffled slice and keeps its
contiguous share (rank r of W: prompts [r n/W, (r+1) n/W)), samples it with its own seed
((seed * 100003 + step) * W + r; one process keeps seed * 100003 + step), so ranks never duplicate rollouts.
All K samples of a prompt live on one rank, so group statistics (GRPO/RLOO baselines, "group" reward
normalisation, online-DPO pairs) are local; statistics over the whole batch are reduced across ranks:
"running" reward moments (updated with every rank's scores), PPO's advantage whitening, and each update's
loss normaliser (sum of weights, or of tokens for "token_sum"), so that DDP's gradient average equals the
one-process gradient of the same global batch. `mini_batch_size` is global (each rank takes its share);
`gradient_accumulation_steps` splits each minibatch into micro-batches (one backward each, one optimizer
step, the same normaliser, so the update is the minibatch's). Metrics are reduced across ranks (reward
statistics from every rank's scores; counts summed; the rest averaged) and only the main process writes
`metrics.jsonl` and the saved model.

Failed annotations (NaN scores) get weight 0 (they do not train) and, for group statistics, the mean of
their group's valid rewards.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from alignkit.adapters import adapter_of, can_switch_off, save_adapter
from alignkit.distributed import (
    enable_sharding_on_cpu, full_optimizer_state, full_parameters, gathered_root, is_fsdp2,
    load_full_optimizer_state, requested_engine, shard_reference,
)
from alignkit.guards import NonFiniteError, as_float, is_finite
from alignkit.losses import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from alignkit.online.annotators import Annotator, AnnotatorError, Scores, build_annotator
from alignkit.online.generation import Sample, SamplingConfig, as_prompt_records, generate_responses, generation_metrics
from alignkit.online.normalize import RunningMoments, normalize_rewards
from alignkit.online.rollout import TokenStats, reference_token_logps, samples_batch, sequence_sums, token_stats
from alignkit.online.vllm_client import VllmServerGenerator
from alignkit.online.vllm_generation import VllmGenerator, refuse_unsupported
from alignkit.runs import CheckpointError, incomplete_reason, push_folder, staged
from alignkit.settings import ConfigError
from alignkit.trainers.base import turn_off_dropout
from alignkit.trainers.reference import frozen_copy

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class OnlineConfig:
    """Settings shared by every online optimizer (subclasses add their own)."""

    steps: int = 100
    prompts_per_step: int = 8
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=4, max_new_tokens=64))
    learning_rate: float = 1e-6  # TRL's GRPOConfig / RLOOConfig; online DPO 5e-7, PPO 3e-6 (their subclasses)
    optimizer: str = "adamw"  # "adamw" | "sgd" (plain SGD: no momentum)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    epochs_per_step: int = 1  # optimisation passes over each step's batch (PPO epochs)
    mini_batch_size: int | None = None  # items (samples or pairs) per optimizer step, over all processes; None: all
    gradient_accumulation_steps: int = 1  # micro-batches per minibatch (one backward each, one optimizer step)
    kl_coef: float = 0.05  # beta of the KL to the reference (initial value when adaptive)
    kl_target: float | None = None  # set: adaptive KL control (Ziegler et al. 2019) towards this sequence KL
    kl_horizon: int = 10000
    kl_estimator: str = "k3"
    reward_normalization: str = "none"  # "none" | "running" | "group" (alignkit.online.normalize)
    reward_clip: float | None = None
    reference: str = "auto"  # "auto" | "adapter_off" | "copy"
    generation_batch_size: int = 64
    generation_backend: str = "transformers"  # "transformers" | "vllm" (colocated engine, full and LoRA policies)
    vllm: dict[str, Any] = field(default_factory=dict)  # vllm.LLM arguments: model (the base folder), dtype,
    #   max_model_len, gpu_memory_utilization, ... (alignkit.online.vllm_generation.VllmGenerator); colocate only
    vllm_mode: str = "colocate"  # "colocate": the engine in this process | "server": `alignkit vllm-serve` elsewhere
    vllm_server_url: str = "http://127.0.0.1:8000"  # server mode: where `alignkit vllm-serve` answers
    vllm_server_timeout: float = 300.0  # server mode: seconds to wait for it to come up, and for each answer
    formatter: str = "auto"  # how prompts are formatted for generation (alignkit.data.FORMATTERS)
    max_prompt_length: int | None = None  # prompt tokens kept (the end of the prompt), None: all
    report_to: str | list[str] | None = None  # accelerate trackers ("tensorboard", "wandb", ...); None: tensorboard
    #   when installed (events in <output_dir>/tensorboard, as offline runs); "none": no tracker
    progress_bar: bool = True  # a tqdm bar over the steps (main process)
    chunk_size: int = 1024
    share_prompt: bool = False  # the training, reference and policy forwards run each prompt's samples as ONE row
    #   (the prompt once; alignkit.data.collators.shared_prefix_layout): the same log-probs up to float rounding
    seed: int = 0
    save_at_end: bool = True
    save_steps: int | None = None  # checkpoint every N steps into <output_dir>/checkpoints/checkpoint-N (resume)
    push_to_hub: bool = False  # upload the final model / adapter (and its card) to the Hub at the end; never checkpoints
    hub_model_id: str | None = None  # the Hub repo; default: the output folder's name
    hub_private_repo: bool = False  # (the token: HF_TOKEN or `hf auth login`, never a config value)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if self.steps < 0 or self.prompts_per_step < 1 or self.epochs_per_step < 1:
            raise ValueError(f"online config: steps >= 0, prompts_per_step >= 1 and epochs_per_step >= 1 are needed, "
                             f"got {self.steps}, {self.prompts_per_step}, {self.epochs_per_step}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"online config: optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"online config: gradient_accumulation_steps must be >= 1, got "
                             f"{self.gradient_accumulation_steps}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"online config: mini_batch_size must be >= 1 or None, got {self.mini_batch_size}")
        if self.generation_backend not in ("transformers", "vllm"):
            raise ValueError(f"online config: generation_backend must be 'transformers' or 'vllm', got "
                             f"{self.generation_backend!r}")
        if self.generation_backend == "vllm" and self.sampling.do_sample and self.sampling.temperature > 2.0:
            raise ValueError(f"online config: sampling.temperature {self.sampling.temperature} is above 2, the most "
                             f"vLLM accepts (generation_backend='vllm'); lower it or use generation_backend="
                             f"'transformers'")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"online config: vllm_mode must be 'colocate' or 'server', got {self.vllm_mode!r}")
        if self.vllm_mode == "server" and self.vllm:
            raise ValueError(f"online config: vllm ({', '.join(sorted(self.vllm))}: vllm.LLM arguments) is for "
                             "vllm_mode='colocate'; in server mode give them to alignkit vllm-serve (--max-model-len, "
                             "--dtype, ...)")
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"online config: vllm_server_timeout must be > 0 seconds, got {self.vllm_server_timeout}")
        if self.reference not in ("auto", "adapter_off", "copy"):
            raise ValueError(f"online config: reference must be 'auto', 'adapter_off' or 'copy', got {self.reference!r}")
        KL_ESTIMATORS[self.kl_estimator]  # unknown names fail here, listing the valid ones

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rollout:
    """One step's samples and what was computed on them without gradient (B samples, T-1 token positions)."""

    samples: list[Sample]
    batch: dict[str, Tensor]  # input_ids, attention_mask, completion_mask (B, T)
    scores: Tensor  # (B,) raw annotator scores, NaN = failed
    rewards: Tensor  # (B,) normalised + clipped; failed ones filled with their group's mean
    weights: Tensor  # (B,) the prompt records' weights, 0 for failed annotations
    old_logps: Tensor | None  # (B, T-1) log pi_old of the sampled tokens; None: the training forward's (below)
    ref_logps: Tensor  # (B, T-1) log pi_ref
    mask: Tensor  # (B, T-1) bool
    entropy: Tensor | None  # (B, T-1); None with old_logps
    hidden: Tensor | None = None  # (B, T-1, d), when the trainer asks (PPO's value head)
    metrics: dict[str, float] = field(default_factory=dict)


def _has_accelerator() -> bool:
    """A GPU (or other accelerator) torch can use. Without one, `Accelerator` must be told `cpu=True`: under
    torchrun it otherwise forms a process group but reports ONE process (accelerate 1.x only selects
    MULTI_CPU/gloo for `cpu=True` or ACCELERATE_USE_CPU), and every rank would train alone."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def zero_spread_fraction(groups: Tensor) -> float:
    """(G, K) rewards, NaN = unscored -> share of groups whose scored rewards are all equal (a group with fewer
    than two scored rewards counts as flat)."""
    ok = ~torch.isnan(groups)
    hi = torch.where(ok, groups, -torch.inf).max(dim=-1).values
    lo = torch.where(ok, groups, torch.inf).min(dim=-1).values
    flat = (ok.sum(-1) < 2) | (hi == lo)
    return float(flat.float().mean()) if groups.shape[0] else 0.0


class OnlineTrainer:
    """Base of the online optimizers. Subclasses implement `build_batch` and `optimise`.

    Args:
        model: the policy, wrapped by `alignkit.adapters.apply_adapter` (any adapter kind).
        tokenizer: its tokenizer (with a pad token).
        prompts: prompt records, strings or conversations (`generation.as_prompt_records`).
        annotator: an `Annotator` or a spec for `build_annotator` ({"type": "function", "fn": "mod:fn"}, ...).
        config: an `OnlineConfig` (or a subclass's).
        ref_model: a frozen reference (default: adapter off, or a frozen copy for full finetuning).
        output_dir: where metrics.jsonl and the final adapter go (nothing is written when None).
    """

    config_class = OnlineConfig
    needs_hidden = False  # PPO: keep the final hidden states of the rollout for the value head

    def reuses_training_pass(self) -> bool:
        """True when the rollout's no-grad policy pass can be skipped: the step's one training forward sees the
        same parameters and rows, so log pi_old = its log-probs detached (TRL's GRPO with num_iterations=1 does
        the same), and the rollout's "kl" / "entropy" metrics come from that forward (`pass_sums`, `metrics_from_sums`). The
        base loop never skips (subclasses decide); `score(policy_pass=True)` always runs it."""
        return False

    def __init__(self, model: nn.Module, tokenizer: Any, prompts: Sequence[Any], annotator: Annotator | dict,
                 config: OnlineConfig | None = None, *, ref_model: nn.Module | None = None,
                 output_dir: str | Path | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(self.config).__name__}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
        self.tokenizer, self.annotator = tokenizer, build_annotator(annotator)
        self.prompts = as_prompt_records(prompts)
        if not self.prompts:
            raise ValueError("online training needs at least one prompt")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.trackers = self._trackers() if self.output_dir is not None else []
        if requested_engine() == "deepspeed":  # accelerate would drop it on CPU (plain DDP) or need its batch config
            raise ConfigError(f"{type(self).__name__}: the online loop does not run under DeepSpeed yet (the accelerate "
                              "config says distributed_type: DEEPSPEED): launch it with configs/accelerate/fsdp2.yaml "
                              "(sharded) or configs/accelerate/ddp-cpu.yaml / torchrun (DDP)")
        self.accelerator = Accelerator(cpu=not _has_accelerator(), log_with=self.trackers or None,
                                       project_dir=str(self.output_dir) if self.trackers else None)
        fsdp2 = enable_sharding_on_cpu(self.accelerator) or is_fsdp2(self.accelerator)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        n_step = min(self.config.prompts_per_step, len(self.prompts))
        if n_step % self.world:
            raise ValueError(f"online config: prompts_per_step ({n_step}, method.prompts_per_step on the command "
                             f"line, capped by the {len(self.prompts)} prompt(s)) must be a multiple of the number "
                             f"of processes ({self.world}): each process samples an equal share of the step's prompts")
        if self.config.mini_batch_size is not None and self.config.mini_batch_size % self.world:
            raise ValueError(f"online config: mini_batch_size ({self.config.mini_batch_size}) must be a multiple "
                             f"of the number of processes ({self.world}) or None")
        if self.config.generation_backend == "vllm":
            refuse_unsupported(adapter_of(model))
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
        self.vllm_generator: Any = None  # the colocated engine / the server's client, made at the first generation
        turn_off_dropout(model)  # old, new and reference log-probs then come from one deterministic network
        mode = self.config.reference
        if mode == "auto":
            mode = "adapter_off" if can_switch_off(model) and ref_model is None else "copy"
        if mode == "adapter_off" and not can_switch_off(model):
            raise ValueError("reference='adapter_off' needs an adapter (lora, reft, reft+lora); a fully finetuned "
                             "model has none: use reference='copy' (a frozen copy) or pass ref_model")
        if mode == "copy" and ref_model is None:
            ref_model = frozen_copy(model)
        self.ref_model = ref_model.to(self.accelerator.device).eval() if ref_model is not None else None
        if self.ref_model is not None:  # FSDP2: sharded like the policy, not a whole copy per process
            self.ref_model = shard_reference(self.ref_model, self.accelerator)
        self.reference_mode = mode
        self.model = model
        self.extra_modules = self.build_extra_modules()  # e.g. PPO's value head
        if fsdp2 and self.extra_modules:
            raise ConfigError(f"{type(self).__name__} under FSDP: its extra modules (PPO's value head) are not "
                             "sharded yet; use DDP (configs/accelerate/ddp-cpu.yaml or --multi_gpu) for PPO")
        params = [p for p in model.parameters() if p.requires_grad]
        params += [p for m in self.extra_modules for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters; wrap it with apply_adapter first")
        opt_class = torch.optim.SGD if self.config.optimizer == "sgd" else torch.optim.AdamW
        optimizer = opt_class(params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)
        if fsdp2:  # accelerate shards model and optimizer together (fully_shard swaps the parameters)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        else:
            self.model = self.accelerator.prepare(model)
            self.optimizer = self.accelerator.prepare(optimizer)
        self.extra_modules = [self.accelerator.prepare(m) for m in self.extra_modules]
        c = self.config
        self.kl_ctl = (AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.kl_target is not None
                       else FixedKLController(c.kl_coef))
        self.moments = RunningMoments()
        self.rng = torch.Generator().manual_seed(c.seed)
        self._order: list[int] = []
        self._py_rng = random.Random(c.seed)
        self.history: list[dict[str, float]] = []
        self._num_tokens = 0  # TRL's num_tokens: prompt + completion tokens sampled so far, all processes

    # -- hooks for subclasses -----------------------------------------------------------------------

    def build_extra_modules(self) -> list[nn.Module]:
        return []

    def build_batch(self, rollout: Rollout) -> Any:
        raise NotImplementedError

    def optimise(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    # -- the loop ---------------------------------------------------------------------------------------

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _trackers(self) -> list[str]:
        r = self.config.report_to
        if r is None:
            r = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
        r = [r] if isinstance(r, str) else list(r)
        return [t for t in r if t != "none"]

    def train(self, resume_from_checkpoint: str | Path | None = None) -> list[dict[str, float]]:
        """Run `config.steps` steps; returns each step's metrics (also in `history`, `metrics.jsonl` and the
        trackers: TensorBoard events in <output_dir>/tensorboard by default). With `resume_from_checkpoint` (a
        folder written by `save_checkpoint`), continue after its step: on a CPU in fp32 the later steps equal an
        uninterrupted run's exactly."""
        start = self.load_checkpoint(resume_from_checkpoint) if resume_from_checkpoint is not None else 0
        self._flat_steps = 0  # steps of this call without a reward spread (warned about below)
        if self.trackers:  # opened here, not in __init__: nothing is written before training starts
            self.accelerator.init_trackers("tensorboard")
        bar = tqdm(total=self.config.steps, initial=start, desc=type(self).__name__.replace("Trainer", ""),
                   unit="step", disable=not (self.config.progress_bar and self.accelerator.is_main_process))
        try:
            self._train_steps(bar, start)
        finally:
            bar.close()
            if self.trackers:  # not accelerator.end_training(): it also destroys the process group, which
                for tracker in self.accelerator.trackers:  # saving (FSDP gathers) and the caller still need
                    tracker.finish()
        flat, ran = self._flat_steps, self.config.steps - start
        if ran > 0 and flat == ran:
            logger.warning("no step of this run had a reward spread inside any prompt's group "
                           "(frac_reward_zero_std = 1 at all %d step(s)): the rewards did not move the policy", ran)
        if self.output_dir is not None and self.config.save_at_end:
            self.save(self.output_dir)
            if self.config.push_to_hub and self.accelerator.is_main_process:
                self.push_to_hub()
        return self.history

    # what `push_to_hub` leaves out of output_dir: the run's by-products, not the model
    PUSH_IGNORE = ["checkpoints/*", "tensorboard/*", METRICS_FILE, "*.staging/*", ".*"]

    def push_to_hub(self, repo_id: str | None = None, folder: str | Path | None = None) -> str:
        """Upload the saved model / adapter of `folder` (default `output_dir`) to the Hub model repo `repo_id`
        (default `config.hub_model_id`, else the folder's name): the files `save` wrote and a README.md if there
        is one; checkpoints, TensorBoard events and metrics.jsonl stay local. Returns the repo id."""
        folder = Path(folder if folder is not None else self.output_dir)
        return push_folder(folder, repo_id or self.config.hub_model_id or folder.resolve().name,
                           private=self.config.hub_private_repo, ignore_patterns=self.PUSH_IGNORE)

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
            self.kl_ctl.update(metrics["kl/sequence_sum"], len(samples) * self.world)
            metrics["time/step_s"] = time.perf_counter() - t0
            self.log(metrics)
            if getattr(self, "_step_flat", False):
                self._flat_steps += 1
                if self._flat_steps == 1:
                    logger.warning("step %d: every prompt's %d samples got the same reward, so this step has no "
                                   "reward signal (only the KL term moves the policy); a reward that never varies "
                                   "is usually a bug in the annotator", step + 1, self.config.sampling.num_samples)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "kl", "loss") if k in metrics})
            if self.output_dir is not None and self.config.save_steps and (step + 1) % self.config.save_steps == 0:
                self.save_checkpoint(self.output_dir / "checkpoints" / f"checkpoint-{step + 1}", step + 1)

    def next_prompts(self) -> list:
        """The next `prompts_per_step` prompts of a seeded shuffle, reshuffled after each pass."""
        out = []
        while len(out) < min(self.config.prompts_per_step, len(self.prompts)):
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self._py_rng.shuffle(self._order)
            out.append(self.prompts[self._order.pop()])
        return out

    def local_prompts(self, prompts: list) -> list:
        """This process's contiguous share of the step's global prompt list (all of it in one process)."""
        n = len(prompts) // self.world
        return prompts[self.rank * n:(self.rank + 1) * n]

    def sampling_seed(self, step: int) -> int:
        """Distinct per step and per rank; one process: seed * 100003 + step."""
        s = self.config.sampling
        return ((s.seed if s.seed is not None else self.config.seed) * 100_003 + step) * self.world + self.rank

    def generate(self, prompts: list, step: int) -> list[Sample]:
        cfg = replace(self.config.sampling, seed=self.sampling_seed(step))
        if self.config.generation_backend == "vllm":
            return self.generate_vllm(prompts, cfg)
        # a ReFT policy places its own saved position spec (ReftModel.generate)
        with gathered_root(self.model):  # FSDP2: a wrapper's generate bypasses the root's forward hooks
            return generate_responses(self.policy, self.tokenizer, prompts, cfg,
                                      batch_size=self.config.generation_batch_size, formatter=self.config.formatter,
                                      max_prompt_length=self.config.max_prompt_length)

    def generate_vllm(self, prompts: list, cfg: SamplingConfig) -> list[Sample]:
        """Sample with vLLM (the colocated engine, or `alignkit vllm-serve` in server mode) after giving it the
        policy's current weights."""
        if self.vllm_generator is None and self.config.vllm_mode == "server":
            self.vllm_generator = VllmServerGenerator(self.policy, self.tokenizer, self.config.vllm_server_url,
                                                      timeout=self.config.vllm_server_timeout)
        elif self.vllm_generator is None:
            self.vllm_generator = VllmGenerator(self.policy, self.tokenizer, seed=self.config.seed,
                                                **self.config.vllm)
        self.vllm_generator.sync(self.policy)  # the weights of the last optimizer step
        return self.vllm_generator.generate(prompts, cfg, formatter=self.config.formatter,
                                            max_prompt_length=self.config.max_prompt_length, eos_source=self.policy)

    def token_stats(self, batch: dict[str, Tensor], **kw: Any):
        return token_stats(self.model, batch, temperature=self.config.sampling.temperature,
                           chunk_size=self.config.chunk_size, **kw)

    @property
    def pointwise_scores(self) -> bool:
        """Whether `annotate` gives pointwise scores (False where a judge compares pairs itself)."""
        return True

    def annotate(self, samples: list[Sample]) -> Scores:
        """Pointwise scores of the samples (each prompt record's meta goes to the annotator)."""
        return self.annotator.annotate([s.prompt for s in samples], [s.response for s in samples],
                                       [s.meta for s in samples])

    @torch.no_grad()
    def score(self, samples: list[Sample], policy_pass: bool | None = None) -> Rollout:
        """Annotate, normalise rewards, and compute old / reference log-probs and entropy. `policy_pass=False`
        (see `reuses_training_pass`) leaves old_logps / entropy to the training forward: the rollout's "kl" and
        "entropy" metrics are then filled in by the loss (`pass_sums`, `metrics_from_sums`)."""
        if policy_pass is None:  # the loop's choice for this step; a direct call runs the pass
            policy_pass = getattr(self, "_policy_pass", True)
        c = self.config
        scores = self.annotate(samples)
        raw = scores.values.to(torch.float32)  # (B,)
        k = c.sampling.num_samples
        everyone = self.gather(raw)  # (W B,) every rank's raw scores, rank-major
        rewards = normalize_rewards(raw.clone(), c.reward_normalization, group_size=k, moments=self.moments,
                                    clip=c.reward_clip, update_with=everyone)
        g = rewards.view(-1, k)  # (G, K): fill failures with their group's valid mean (0 if none)
        fill = torch.nan_to_num(torch.nanmean(g, dim=-1, keepdim=True), nan=0.0).expand_as(g)
        rewards = torch.where(torch.isnan(g), fill, g).reshape(-1)
        valid = ~torch.isnan(raw)
        weights = torch.tensor([s.weight for s in samples], dtype=torch.float32) * valid
        batch = samples_batch(samples, self.tokenizer.pad_token_id, self.accelerator.device)
        if c.share_prompt:  # every forward over these rows (or a selection of them) shares each group's prompt
            batch["share_groups"] = torch.tensor([s.group for s in samples], dtype=torch.long, device=batch["input_ids"].device)
        ref = reference_token_logps(self.policy, batch, self.ref_model, temperature=c.sampling.temperature,
                                    chunk_size=c.chunk_size)
        if policy_pass:
            stats = self.token_stats(batch, entropy=True, hidden=self.needs_hidden)
            kl_tok = KL_ESTIMATORS[c.kl_estimator](stats.logps, ref)  # (B, T-1)
            kl = sequence_sums(kl_tok, stats.mask)  # (B,)
        else:  # old log-probs, entropy and the kl / entropy metrics: from the training forward (`pass_sums`)
            mask = (batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:]).bool()  # (B, T-1)
            stats, kl_tok, kl = TokenStats(None, mask), None, None
        if not (~torch.isnan(everyone)).any() and self.pointwise_scores:
            raise AnnotatorError(f"step {getattr(self, '_step', 0) + 1}: the annotator scored none of the {everyone.numel()} "
                                 "response(s) (every score failed or was None), so there is nothing to learn from; "
                                 "check the annotator (its function, model or judge) on a few of the responses")
        # no reward signal in any group (a group with < 2 scores counts as flat here; TRL's metric does not)
        self._step_flat = k > 1 and zero_spread_fraction(everyone.view(-1, k)) == 1.0
        metrics = self.rollout_metrics(samples, everyone, rewards, scores, kl_tok, kl, stats.entropy, stats.mask)
        dev = self.accelerator.device
        return Rollout(samples, batch, raw.to(dev), rewards.to(dev), weights.to(dev), stats.logps, ref, stats.mask,
                       stats.entropy, stats.hidden, metrics)

    def rollout_metrics(self, samples: list[Sample], everyone: Tensor, rewards: Tensor, scores: Scores, kl_tok: Tensor,
                        kl: Tensor, entropy: Tensor, mask: Tensor) -> dict[str, float]:
        """One step's sampling metrics, under TRL's names where the quantity is TRL's (docs/metrics.md):
        `reward`, `reward_std` (Bessel-corrected), `frac_reward_zero_std`, `kl` and `entropy` (means over every
        completion token of the step), `completions/*`, cumulative `num_tokens`; alignkit's own names otherwise
        (`kl/sequence_sum`: the mean over samples of each sequence's summed KL). Reward, KL, entropy and completion
        statistics are over all processes (every process gets the same values)."""
        k = self.config.sampling.num_samples
        v = everyone[~torch.isnan(everyone)].double()  # reward statistics over the global batch
        g = everyone.view(-1, k).double()  # (G, K) raw scores of each prompt's samples, NaN = failed
        ok = ~torch.isnan(g)
        n_ok = ok.sum(-1)  # (G,)
        g_mean = torch.where(ok, g, 0.0).sum(-1, keepdim=True) / n_ok.clamp(min=1)[:, None]
        g_std = (torch.where(ok, (g - g_mean) ** 2, 0.0).sum(-1) / (n_ok - 1).clamp(min=1)).sqrt()  # (G,) Bessel
        zero_std = (n_ok > 1) & torch.isclose(g_std, torch.zeros_like(g_std))  # TRL: NaN std (< 2 scores) is not 0
        m = mask.float()
        if kl_tok is not None:  # else the policy pass was skipped: the training forward gives them (`pass_sums`)
            sums = self.reduce_sum(torch.stack([(kl_tok * m).sum(), (entropy * m).sum(), m.sum()]).double())  # (3,)
        length = self.gather(torch.tensor([float(len(s.response_ids)) for s in samples]))  # (W B,)
        clipped = self.gather(torch.tensor([float(s.finish_reason == "length") for s in samples]))
        self._num_tokens += int(self.reduce_sum(torch.tensor(
            [float(sum(len(s.prompt_ids) + len(s.response_ids) for s in samples))], dtype=torch.float64))[0])
        metrics = {"reward": float(v.mean()) if v.numel() else float("nan"),
                   "reward_std": float(v.std()) if v.numel() > 1 else float("nan"),
                   "frac_reward_zero_std": float(zero_std.double().mean()),
                   "reward/failed": float(scores.failed.sum()),  # summed over ranks (SUMMED_METRICS)
                   "reward/normalized_mean": float(rewards.mean()), "kl_coef": float(self.kl_ctl.value),
                   "completions/mean_length": float(length.mean()), "completions/min_length": float(length.min()),
                   "completions/max_length": float(length.max()), "completions/clipped_ratio": float(clipped.mean()),
                   "num_tokens": float(self._num_tokens)}
        if kl_tok is not None:
            metrics.update({"kl": float(sums[0] / sums[2].clamp(min=1)), "kl/sequence_sum": float(kl.mean()),
                            "entropy": float(sums[1] / sums[2].clamp(min=1))})
        gen = generation_metrics(samples)
        gen.pop("generation/response_length")  # completions/mean_length, over all processes
        return {**metrics, **gen, **{k_: float(v_) for k_, v_ in scores.metrics.items()}}

    def pass_sums(self, logps: Tensor, ref_logps: Tensor, entropy: Tensor, mask: Tensor) -> Tensor:
        """(4,) float64 of one policy pass's (B, T-1) values: the summed KL estimator (`kl_estimator`) and entropy
        over response tokens, the response tokens, the sequences. See `metrics_from_sums`."""
        kl_tok = KL_ESTIMATORS[self.config.kl_estimator](logps.detach(), ref_logps)
        m = mask.to(kl_tok.dtype)
        return torch.stack([(kl_tok * m).sum(), (entropy.detach() * m).sum(), m.sum(),
                            torch.tensor(float(mask.shape[0]), device=m.device)]).double().cpu()

    def metrics_from_sums(self, sums: Tensor) -> dict[str, float]:
        """The rollout's "kl", "entropy" (token means over every process: a collective, call it on every rank) and
        "kl/sequence_sum" (this process's mean over sequences) from this process's `pass_sums` total."""
        g = self.reduce_sum(sums[:3].clone())
        return {"kl": float(g[0] / g[2].clamp(min=1)), "entropy": float(g[1] / g[2].clamp(min=1)),
                "kl/sequence_sum": float(sums[0] / sums[3].clamp(min=1))}

    def run_minibatches(self, n_items: int, loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]],
                        normalizer_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """`epochs_per_step` passes over this process's `n_items` items in shuffled minibatches; one optimizer
        step each (`gradient_accumulation_steps` backward passes).

        `normalizer_fn(idx (M,)) -> scalar`: what the items' weighted loss sum is divided by (their weight sum,
        or token count), summed here over the minibatch's micro-batches and every process, divided by the
        number of processes (DDP averages gradients). `loss_fn(idx, normalizer) -> (scalar loss, metrics)`
        must return sum_i w_i loss_i / normalizer (`reduce_loss(..., normalizer=normalizer)`). Every process
        runs the same number of minibatches (the largest share decides); a process whose share is exhausted
        runs a zero-weighted pass over its item 0 so that DDP's collectives still match. Returns the metrics
        averaged over the updates ("loss": the minibatch loss)."""
        c = self.config
        counts = self.gather(torch.tensor([float(n_items)]))  # (W,)
        n_max = int(counts.max())
        if n_max == 0:
            return {}
        size = c.mini_batch_size // self.world if c.mini_batch_size is not None else n_max
        n_mini = -(-n_max // size)
        totals: dict[str, float] = {}
        updates = 0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        dev = self.accelerator.device
        self.model.train()
        for _ in range(c.epochs_per_step):
            perm = torch.randperm(n_items, generator=self.rng)
            for j in range(n_mini):
                idx = perm[j * size:(j + 1) * size].to(dev)
                dummy = idx.numel() == 0
                if dummy:
                    if n_items == 0:
                        raise RuntimeError("a process has no items to run a zero-weighted pass on; the subclass "
                                           "must give every process at least one (zero-weight) item")
                    idx = torch.zeros(1, dtype=torch.long, device=dev)
                local = normalizer_fn(idx).detach().to(torch.float64) * (0.0 if dummy else 1.0)
                normalizer = (self.reduce_sum(local.reshape(1)) / self.world).reshape(())
                # the same number of forwards on every process (FSDP gathers weights in each): an empty
                # micro-batch runs item 0 with weight zero
                micro = idx.tensor_split(c.gradient_accumulation_steps)
                real = [mb.numel() > 0 for mb in micro]
                step_loss, step_metrics = 0.0, {}
                for m_i, mb in enumerate(micro):
                    with ExitStack() as stack:
                        if m_i < len(micro) - 1:  # gradients are all-reduced once, on the last micro-batch
                            for module in [self.model, *self.extra_modules]:
                                stack.enter_context(self.accelerator.no_sync(module))
                        loss, metrics = loss_fn(mb if real[m_i] else idx[:1], normalizer)
                        if dummy or not real[m_i]:
                            loss = loss * 0.0
                        if not is_finite(loss):
                            self._stop_non_finite("the training loss", as_float(loss),
                                                  {**metrics, "loss": as_float(loss)})
                        self.accelerator.backward(loss)
                    step_loss += float(loss.detach())
                    if real[m_i]:
                        for k, v in metrics.items():
                            step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / sum(real)
                norm = self.accelerator.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm is not None
                                                        else float("inf"))
                if not is_finite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._stop_non_finite("the gradient norm", as_float(norm), {"loss": step_loss,
                                                                               "grad_norm": as_float(norm)})
                if c.max_grad_norm is not None:
                    step_metrics["grad_norm"] = float(norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if dummy:
                    continue
                step_metrics["loss"] = step_loss
                for k, v in step_metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                updates += 1
        return {k: v / max(updates, 1) for k, v in totals.items()}

    def _stop_non_finite(self, what: str, value: float, metrics: dict[str, Any]) -> None:
        """Log the step's row with the bad value (NaN stays NaN), then stop before the optimizer step."""
        step = getattr(self, "_step", 0)
        self.log({"step": float(step), **{k: as_float(v) for k, v in metrics.items()}})
        err = NonFiniteError(what, value, step + 1, getattr(self, "_step_ids", None))
        raise err

    # -- across processes ---------------------------------------------------------------------------------

    def gather(self, t: Tensor) -> Tensor:
        """Concatenation over processes (rank order) of equally shaped tensors; `t` itself in one process."""
        if self.world == 1:
            return t
        return self.accelerator.gather(t.to(self.accelerator.device)).cpu()

    def reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over processes (float64 kept)."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device).clone(), reduction="sum")

    SUMMED_METRICS = ("reward/failed", "pairs")
    GLOBAL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                      "completions/mean_length", "completions/min_length", "completions/max_length",
                      "completions/clipped_ratio", "num_tokens")

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """One row for all processes: counts (`SUMMED_METRICS`) summed, the rest averaged over the processes
        that report them; the metrics `rollout_metrics` computes over all processes are the same on every rank."""
        if self.world == 1:
            return metrics
        import torch.distributed as dist

        rows: list[dict[str, float]] = [{} for _ in range(self.world)]
        dist.all_gather_object(rows, metrics)
        out: dict[str, float] = {}
        for k in dict.fromkeys(k for r in rows for k in r):
            vals = [float(r[k]) for r in rows if k in r]
            if k in ("step", *self.GLOBAL_METRICS):
                out[k] = vals[0]
            elif k in self.SUMMED_METRICS:
                out[k] = sum(vals)
            else:
                out[k] = sum(vals) / len(vals)
        return out

    # -- output -------------------------------------------------------------------------------------------

    def log(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("step", "reward", "kl", "loss",
                                                                      "completions/mean_length", "entropy")}
        logger.info("online step %s", shown)
        if self.output_dir is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")  # NaN stays NaN (json writes `NaN`), never null
        if self.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    # -- checkpoints (resume) --------------------------------------------------------------------------

    def _trainable(self) -> dict[str, Tensor]:
        """Every trainable tensor by name (policy, then extra modules such as PPO's value head), shared storage once."""
        out: dict[str, Tensor] = {}
        seen: set[int] = set()
        named = [(f"policy.{n}", p) for n, p in self.policy.named_parameters() if p.requires_grad]
        for i, m in enumerate(self.extra_modules):
            named += [(f"extra{i}.{n}", p) for n, p in self.accelerator.unwrap_model(m).named_parameters()]
        from torch.distributed.tensor import DTensor

        for name, p in named:
            key = id(p) if isinstance(p, DTensor) else p.data_ptr()  # a DTensor's data_ptr is not its own
            if key not in seen:
                seen.add(key)
                out[name] = p
        return out

    def save_checkpoint(self, folder: str | Path, step: int) -> Path:
        """Everything a resume needs, written to a staging folder and renamed into place with
        `alignkit_complete.json`: trainable weights (safetensors), optimizer state (`torch.save` of tensors
        only, read back with `weights_only=True`), the sampling RNG, prompt order, KL controller and reward
        moments (JSON). Several processes: every rank holds the same state (DDP), or its shards are gathered
        (FSDP2: full weights, and the full optimizer state keyed by parameter names); the main one writes, and
        every rank restores from the same folder."""
        folder = Path(folder)
        if is_fsdp2(self.accelerator):  # collectives: every process gathers; the main one writes full tensors

            with full_parameters(self.model):
                weights = {k: v.detach().cpu().contiguous().clone() for k, v in self._trainable().items()}
            optim = full_optimizer_state(self.model, self.optimizer)
        else:
            weights = {k: v.detach().cpu().contiguous() for k, v in self._trainable().items()}
            optim = self.optimizer.state_dict()
        if self.accelerator.is_main_process:
            with staged(folder, step=step) as tmp:
                save_file(weights, str(tmp / "trainable.safetensors"))
                save_file({"rng": self.rng.get_state()}, str(tmp / "rng.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
                version, internal, gauss = self._py_rng.getstate()
                state = {"step": step, "order": self._order, "py_rng": [version, list(internal), gauss],
                         "kl_coef": float(self.kl_ctl.value), "num_tokens": self._num_tokens,
                         "moments": [self.moments.count, self.moments.mean, self.moments.m2]}
                (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
            logger.info("online checkpoint: %s", folder)
        self.accelerator.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: str | Path) -> int:
        """Restore a `save_checkpoint` folder in place; returns the number of steps it had done."""
        folder = Path(folder)
        reason = incomplete_reason(folder)
        if reason is not None:
            raise CheckpointError(f"resume: cannot resume from {folder}: {reason}")
        saved = load_file(str(folder / "trainable.safetensors"))
        live = self._trainable()
        if set(saved) != set(live):
            missing = sorted(set(live) - set(saved))[:3] or sorted(set(saved) - set(live))[:3]
            raise CheckpointError(f"resume: {folder} was written for another model or adapter (parameters differ, "
                                  f"e.g. {missing}); resume with the config that wrote it")
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for k, p in live.items():
                full = saved[k].to(p.device, p.dtype)
                # FSDP2: each process keeps its shard of the full tensor (a collective, in the same order everywhere)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full)
        # map_location "cpu", not the accelerator's device: on CPU processes that is "cpu:0", and state saved from
        # it is tagged "cpu:0", which torch.load cannot map back; load_state_dict moves the state to the parameters
        optim = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        if is_fsdp2(self.accelerator):  # full (unsharded) optimizer state, keyed by parameter names: sharded here

            load_full_optimizer_state(self.model, self.optimizer, optim)
        else:
            self.optimizer.load_state_dict(optim)
        self.rng.set_state(load_file(str(folder / "rng.safetensors"))["rng"])
        state = json.loads((folder / "trainer_state.json").read_text())
        version, internal, gauss = state["py_rng"]
        self._py_rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])
        self.kl_ctl.value = float(state["kl_coef"])
        self._num_tokens = int(state.get("num_tokens", 0))  # older checkpoints: counted from 0 again
        self.moments.count, self.moments.mean, self.moments.m2 = state["moments"]
        logger.info("resumed from %s (step %d)", folder, state["step"])
        return int(state["step"])

    def save(self, folder: str | Path) -> Path:
        """The trainable state (adapter, or the full model), the tokenizer and the config as JSON."""
        folder = Path(folder)
        with full_parameters(self.model):  # FSDP2: every process gathers its shards; plain files are written
            bad = [n for n, p in self.policy.named_parameters()
                   if p.requires_grad and not bool(p.detach().isfinite().all())]
            if bad:
                raise NonFiniteError(f"trainable weight {bad[0]!r}", float("nan"), len(self.history),
                                     causes=f"an earlier update diverged; nothing was saved to {folder}")
            if self.accelerator.is_main_process:
                save_adapter(self.policy, folder, tokenizer=self.tokenizer)
                (folder / "online_config.json").write_text(json.dumps(self.config.to_dict(), indent=2,
                                                                      default=str) + "\n")
        return folder


__all__ = ["METRICS_FILE", "OnlineConfig", "OnlineTrainer", "Rollout"]
