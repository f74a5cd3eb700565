"""`OnlineConfig`: the settings every online optimizer shares (`OnlineTrainer`'s; each optimizer's config
subclasses it and adds its own). Plain data checked on construction; the loop is `alignkit.online.trainer`."""

from __future__ import annotations

from dataclasses import MISSING, InitVar, asdict, dataclass, field, fields
from typing import Any, ClassVar

from alignkit.losses import KL_ESTIMATORS
from alignkit.online.generation import SamplingConfig
from alignkit.online.vllm_engine import check_engine_args
from alignkit.settings.bounds import check_section
from alignkit.settings.online_checks import check_accumulation, check_clip_acts
from alignkit.trainers.ref_sync import as_ref_sync


@dataclass
class OnlineConfig:
    """Settings shared by every online optimizer (subclasses add their own)."""

    # an objective that learns from the differences between the samples of one prompt (group advantages, pairs)
    # names itself here: it needs >= 2 samples per prompt, drawn by sampling (greedy ones are all the same)
    compares_samples: ClassVar[str | None] = None

    steps: int = 100
    prompts_per_step: int = 8
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=4, max_new_tokens=64))
    learning_rate: float = 1e-6  # TRL's GRPOConfig / RLOOConfig; online DPO 5e-7, PPO 3e-6 (their subclasses)
    optimizer: str = "adamw_fused"  # "adamw_fused" (torch's fused AdamW kernel) | "adamw" (its per-tensor loop: the
    #   same update up to float rounding) | "sgd" (plain SGD: no momentum). TRL's default is the fused one too
    #   (transformers' optim adamw_torch_fused with torch >= 2.8)
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
    share_prompt: bool | None = None  # the training, reference and policy forwards run each prompt's samples as ONE
    #   row (the prompt once; alignkit.data.collators.shared_prefix_layout): the same log-probs up to float rounding.
    #   None: on where those rows run as varlen rows (CPU, sdpa, a tested architecture, no ReFT;
    #   alignkit.trainers.packing.resolve_online_share_prompt), off elsewhere
    seed: int = 0
    stall_steps: int = 20  # stop after this many steps in a row without reward signal (`OnlineTrainer.no_signal`:
    #   every prompt's samples scored alike, no preference pair); 0: never stop (the run only warns)
    eval_steps: int | None = None  # with held-out prompts (OnlineTrainer's eval_prompts): evaluate every N steps;
    #   held-out prompts are always evaluated after the last step (alignkit.online.evaluation)
    # an exponential moving average of the policy's trainable weights (DeepSpeed-Chat's --enable_ema, 0.992 there):
    #   ema = ema_decay * ema + (1 - ema_decay) * theta after every optimizer step, from the initial weights; kept in
    #   checkpoints, saved as <output_dir>/model_ema (the format of the saved model). None: none
    ema_decay: float | None = None
    # TR-DPO reference syncing ({"alpha": a, "steps": tau} or RefSync; alignkit.online.ref_sync): after every tau-th
    #   optimizer update the reference copy becomes a * policy + (1 - a) * reference. None: the reference stays
    ref_sync: Any = None
    save_at_end: bool = True
    save_steps: int | None = None  # checkpoint every N steps into <output_dir>/checkpoints/checkpoint-N (resume)
    # upload the final model / adapter (and its card) to the Hub at the end; never checkpoints
    push_to_hub: bool = False
    hub_model_id: str | None = None  # the Hub repo; default: the output folder's name
    hub_private_repo: bool = False  # (the token: HF_TOKEN or `hf auth login`, never a config value)
    # not a setting: True when the caller has already checked these method values against the bounds (the CLI's
    # run config, which names them as its config spells them: alignkit.settings.online), so they are not again
    bounds_checked: InitVar[bool] = False

    def __post_init__(self, bounds_checked: bool = False) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        # the objective's values against the bounds `alignkit <command>` checks its method section with (e.g. a
        # dual_clip <= 1 or a negative clip_eps), named <class>.<key>: refused when built, not at the first step
        if not bounds_checked:
            check_section(self, "method", type(self).__name__)
        if self.steps < 0 or self.prompts_per_step < 1 or self.epochs_per_step < 1:
            raise ValueError(f"online config: steps >= 0, prompts_per_step >= 1 and epochs_per_step >= 1 are needed, "
                             f"got {self.steps}, {self.prompts_per_step}, {self.epochs_per_step}")
        if self.optimizer not in ("adamw_fused", "adamw", "sgd"):
            raise ValueError(f"online config: optimizer must be 'adamw_fused', 'adamw' or 'sgd', got "
                             f"{self.optimizer!r}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"online config: eval_steps must be >= 1 or None (evaluate after the last step only), "
                             f"got {self.eval_steps}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"online config: ema_decay must be in (0, 1) (DeepSpeed-Chat's 0.992), or None for no "
                             f"EMA, got {self.ema_decay!r}")
        self.ref_sync = as_ref_sync(self.ref_sync)
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"online config: gradient_accumulation_steps must be >= 1, got "
                             f"{self.gradient_accumulation_steps}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"online config: mini_batch_size must be >= 1 or None, got {self.mini_batch_size}")
        # more micro-batches than a minibatch can hold items: refused before a trainer writes anything (the run
        # config's check, with bare keys)
        check_accumulation(self, self.gradient_accumulation_steps, self.sampling.num_samples, train="", method="")
        # a clip (GRPO / RLOO / PPO) set with one update per step never acts: the run config's check, bare keys
        check_clip_acts(self, self.prompts_per_step * self.sampling.num_samples, where="")
        self.check_samples_differ()
        if self.reward_normalization == "group" and self.sampling.num_samples < 2:
            raise ValueError(f"online config: reward_normalization='group' normalises each prompt's rewards within its "
                             f"sampling.num_samples samples, and num_samples is {self.sampling.num_samples}: a group "
                             "of one has no spread, so every reward would become 0 and only the KL term would train; "
                             "set sampling.num_samples >= 2, or reward_normalization 'running'")
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
        if self.generation_backend == "vllm" and self.vllm:  # a typo failed only when the engine started
            check_engine_args(self.vllm)
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"online config: vllm_server_timeout must be > 0 seconds, got {self.vllm_server_timeout}")
        self._refuse_unread()
        if self.reference not in ("auto", "adapter_off", "copy"):
            raise ValueError("online config: reference must be 'auto', 'adapter_off' or 'copy', got "
                             f"{self.reference!r}")
        KL_ESTIMATORS[self.kl_estimator]  # unknown names fail here, listing the valid ones

    def check_samples_differ(self) -> None:
        """A method that learns from the differences between a prompt's samples (`compares_samples`) refuses
        sampling that draws one sample, or identical ones (greedy decoding, top_k=1)."""
        if self.compares_samples is None:
            return
        what = self.compares_samples
        if self.sampling.num_samples < 2:
            raise ValueError(f"{what} learns from the differences between the samples of a prompt: it needs "
                             f"sampling.num_samples >= 2, got {self.sampling.num_samples} (nothing would be "
                             "learned)")
        if self.sampling.one_answer() is None:  # (SamplingConfig.one_answer decides it, in one place)
            return
        if self.sampling.do_sample:
            raise ValueError(f"{what} learns from the differences between the samples of a prompt, and "
                             f"sampling.top_k=1 keeps only the most likely token at each step, so it draws "
                             f"{self.sampling.num_samples} identical ones (greedy decoding: nothing would be "
                             f"learned); remove sampling.top_k or set it above 1")
        raise ValueError(f"{what} learns from the differences between the samples of a prompt, and "
                         f"sampling.do_sample=false draws {self.sampling.num_samples} identical ones (nothing "
                         f"would be learned); set sampling.do_sample=true")

    def _refuse_unread(self) -> None:
        """Keys set away from their defaults that the chosen settings never read (they were accepted and silently
        ignored): vLLM keys with transformers generation, server keys in colocate mode, transformers generation's
        batch size with vLLM, kl_horizon without an adaptive kl_target."""
        own = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
               for f in fields(OnlineConfig)}
        unread = []
        if self.generation_backend != "vllm":
            unread += [(k, "generation_backend='vllm'") for k in ("vllm", "vllm_mode", "vllm_server_url",
                                                                  "vllm_server_timeout")]
        elif self.vllm_mode != "server":
            unread += [(k, "vllm_mode='server'") for k in ("vllm_server_url", "vllm_server_timeout")]
        if self.generation_backend == "vllm":  # vLLM schedules its own batches
            unread.append(("generation_batch_size", "generation_backend='transformers'"))
        if self.kl_target is None:
            unread.append(("kl_horizon", "an adaptive kl_target"))
        elif self.kl_coef == 0:  # the adaptive controller scales the coefficient: from 0 it stays 0
            raise ValueError(f"online config: kl_target={self.kl_target!r} adapts kl_coef by multiplying it (kl_coef "
                             "<- kl_coef * (1 + e), Ziegler et al. 2019), and kl_coef is 0, so it would stay 0 and "
                             "kl_target would be ignored; set kl_coef > 0 (the starting coefficient) or remove "
                             "kl_target")
        if self.generation_backend == "vllm" and self.sampling.sampler is not None:
            raise ValueError(f"online config: sampling.sampler={self.sampling.sampler!r} is read only by "
                             "transformers generation; vLLM draws tokens with its own sampler, so it would be "
                             "ignored: remove sampling.sampler")
        for key, needs in unread:
            if getattr(self, key) != own[key]:
                raise ValueError(f"online config: {key}={getattr(self, key)!r} is read only with {needs}, which is "
                                 f"not set, so it would be ignored; remove it or set that too")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["OnlineConfig"]
