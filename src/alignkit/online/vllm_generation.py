"""Generation in the online loop through vLLM, colocated: the engine lives in the training process and gets the
policy's new weights before every generation (so after every optimizer step).

    trainer = GRPOTrainer(policy, tok, prompts, annotator, GRPOConfig(generation_backend="vllm"))

How the weights get there, by adapter kind:
- full:  the policy's transformers state dict is pushed with vLLM's in-place `reload_weights` (a worker call,
         `LLM.collective_rpc`): it restores the checkpoint layout of every layer, loads, and re-runs the
         post-load processing, so it also works on the CPU build whose linear layers are repacked for oneDNN
         after loading (where `model.load_weights` alone fails: `bench/vllm_probe.py`). The prefix cache is
         reset after it: `reload_weights` keeps prompt KV computed with the old weights, which a prompt seen
         before the sync would be continued from (tests/vllm_backend/test_sync.py).
- lora:  the engine runs the frozen base with `enable_lora`; each sync saves the policy's LoRA (peft's two
         files) to a fresh folder and generation passes a `LoRARequest` with a NEW adapter id, so vLLM loads
         it instead of reusing a cached one. The base weights come from the model folder the policy was
         loaded from (`name_or_path`, or `vllm.model`): they must be the policy's frozen base.
- reft, reft+lora: refused (vLLM knows nothing of interventions); ReFT policies keep transformers generation.

Responses are built exactly as `generation.generate_responses` builds them: the same prompt ids
(`encode_prompts`), the same end tokens (`end_token_ids`, passed as vLLM stop tokens) and the same cut rules
(`finish_response`), so `Sample`s from either backend mean the same thing. Greedy tokens equal transformers'
(tests/vllm_backend); sampled ones come from vLLM's own sampler (per-prompt seeds derived from `SamplingConfig.seed`),
not from torch's RNG, so a vLLM run does not reproduce a transformers run sample for sample.

vLLM is not a dependency of alignkit: `make vllm-env` builds the CPU build's environment (`.venv-vllm`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from alignkit.adapters.base import adapter_of, unwrap_lm
from alignkit.models.vllm_support import check_moe_lora, folder_config, lora_unsupported, start_max_model_len
from alignkit.online.vllm_engine import LORA_RANKS
from alignkit.online.generation import (
    FINISH_REASONS, Sample, SamplingConfig, as_prompt_records, encode_prompts, end_token_ids, finish_response,
    uses_chat_template,
)
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
MOE_LORA_FIX = ("use method.generation_backend=transformers for a LoRA policy on it (or finetune it fully: "
                "adapter.kind=full)")
NO_VLLM = ("generation_backend='vllm' needs vLLM in this Python (make vllm-env builds .venv-vllm with the CPU build; "
           "on a GPU: pip install vllm)")


def refuse_unsupported(adapter: Any, policy: Any = None) -> None:
    """One line when vLLM cannot run this policy's adapter (`Adapter.vllm_sync` is None: ReFT kinds), or, given the
    `policy`, a LoRA whose peft features vLLM's LoRA does not have (`lora_unsupported`): vLLM refused it only when
    the first generation loaded it, after the run folder was written."""
    if adapter.vllm_sync is None:
        raise ConfigError(f"generation_backend='vllm' needs a full or LoRA policy; this one is {adapter.kind} (vLLM "
                          "cannot run ReFT interventions): use generation_backend='transformers' for ReFT policies")
    if policy is None or adapter.vllm_sync != "lora_request":
        return
    for cfg in getattr(policy, "peft_config", {}).values():
        why = lora_unsupported(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
        if why:
            raise ConfigError(f"generation_backend='vllm': the LoRA policy {why}, which vLLM's LoRA does not run (it "
                              "would stop the first generation, after the run folder was written); train a plain LoRA "
                              "(adapter.lora without use_dora / modules_to_save) or use "
                              "generation_backend='transformers'")


def sampling_request(cfg: SamplingConfig, eos: Sequence[int], seed: int | None) -> dict[str, Any]:
    """One prompt's vLLM sampling parameters as plain JSON-able values (the colocated engine turns them into
    `SamplingParams` with `sampling_params`; server mode sends them to `alignkit vllm-serve`, which does the same)."""
    if cfg.sampler is not None:
        raise ValueError(f"sampling.sampler={cfg.sampler}: vLLM draws tokens with its own sampler; remove "
                         "sampling.sampler under generation_backend=vllm (it only applies to transformers generation)")
    req: dict[str, Any] = dict(n=cfg.num_samples, max_tokens=cfg.max_new_tokens, stop_token_ids=[int(t) for t in eos],
                               stop=list(cfg.stop), seed=seed)
    if cfg.do_sample:
        req.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or 0)
    else:
        req.update(temperature=0.0)
    return req


REQUEST_KEYS = ("n", "max_tokens", "stop_token_ids", "stop", "seed", "temperature", "top_p", "top_k")


def shutdown_engine(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine core (best effort, at teardown); None: nothing to stop."""
    if llm is not None:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


def sampling_params(req: dict[str, Any]):
    """`vllm.SamplingParams` of a `sampling_request` (stop strings kept in the output, special tokens kept, no
    repetition penalty: `finish_response` cuts the response as transformers generation does)."""
    from vllm import SamplingParams

    unknown = sorted(set(req) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"sampling request: unknown key(s) {', '.join(unknown)}; valid: {', '.join(REQUEST_KEYS)}")
    kw = dict(req)
    kw["stop"] = list(kw.get("stop") or []) or None
    return SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False, repetition_penalty=1.0, **kw)


def prompt_seeds(cfg: SamplingConfig, n_prompts: int) -> list[int | None]:
    """Per-prompt vLLM seeds from `cfg.seed` (vLLM seeds the k-th sample of a request with seed + k: the
    prompts' seeds are num_samples apart); None for greedy decoding."""
    base = cfg.seed if cfg.seed is not None else 0
    return [(base * 1_000_003 + g * cfg.num_samples) % (2 ** 31) if cfg.do_sample else None for g in range(n_prompts)]


def check_model_len(records: Sequence[Any], encoded: Sequence[Sequence[int]], max_new_tokens: int,
                    max_model_len: int | None, where: str = "method.vllm.max_model_len",
                    fixed: bool = False) -> None:
    """ConfigError when a prompt (its ids in `encoded`, as generation encodes the prompt `records`) + `max_new_tokens`
    does not fit the engine's `max_model_len`: vLLM ends such a response at max_model_len tokens in all, as if
    max_new_tokens were reached (finish 'length': shorter responses than asked, without a word), and refuses a
    prompt that fills it. `where`: the setting that fixes the limit (named in the message); `fixed`: the limit is
    the model's own, which cannot be raised (the message then says what can be lowered)."""
    if max_model_len is None or not encoded:
        return
    i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
    need = len(encoded[i]) + max_new_tokens
    if need > max_model_len:
        name = getattr(records[i], "id", "") or f"#{i}"
        raise ConfigError(f"{where} {max_model_len} is shorter than prompt {name!r} ({len(encoded[i])} tokens, the "
                          f"longest) + sampling.max_new_tokens ({max_new_tokens}) = {need}: vLLM would end its "
                          "responses early as if max_new_tokens were reached; "
                          + ("" if fixed else f"raise {where} to {need}, or ") +
                          "lower sampling.max_new_tokens or data.max_prompt_length (prompts keep their last tokens)")


def generate_with(complete: Any, tokenizer: Any, prompts: Sequence[Any], cfg: SamplingConfig | None = None, *,
                  formatter: str = "auto", max_prompt_length: int | None = None, eos_source: Any = None,
                  source: str = "vLLM", max_model_len: int | None = None,
                  max_model_len_key: str = "method.vllm.max_model_len") -> list[Sample]:
    """Samples built as `generate_responses` builds them, with the token ids that `complete(encoded, requests)`
    returns: for each prompt, its `num_samples` lists of generated ids (the colocated engine, or the server).
    `max_model_len`: the engine's (prompt + response tokens), checked with `check_model_len` before any request."""
    cfg = cfg if cfg is not None else SamplingConfig()
    records = as_prompt_records(prompts)
    encoded = encode_prompts(records, tokenizer, formatter, max_prompt_length)
    check_model_len(records, encoded, cfg.max_new_tokens, max_model_len, max_model_len_key)
    eos = end_token_ids(eos_source, tokenizer, cfg, chat=uses_chat_template(records, formatter))
    requests = [sampling_request(cfg, eos, seed) for seed in prompt_seeds(cfg, len(records))]
    outs = complete([list(ids) for ids in encoded], requests)
    samples: list[Sample] = []
    for g, (r, out) in enumerate(zip(records, outs)):
        for k, token_ids in enumerate(out):
            resp_ids, text, reason = finish_response(list(token_ids), tokenizer, eos, cfg)
            samples.append(Sample(r.prompt, text, list(encoded[g]), resp_ids, reason, group=g, index=k,
                                  prompt_id=r.id, weight=r.weight, meta=dict(r.meta)))
    reasons = {k: sum(x.finish_reason == k for x in samples) for k in FINISH_REASONS}
    logger.info("%s generated %d response(s) for %d prompt(s); finish reasons %s", source, len(samples),
                len(records), reasons)
    return samples


class VllmGenerator:
    """A vLLM engine in this process that samples from the current policy (module docstring).

    Args:
        policy: the policy (full or LoRA, as `apply_adapter` wraps it).
        tokenizer: its tokenizer (prompt ids and response text are ours, not vLLM's).
        model: the folder vLLM loads (default: the policy's `name_or_path`); for LoRA, the frozen base.
        dtype: vLLM's dtype (default: the policy's).
        workdir: where LoRA snapshots go (default: a temporary folder, removed by `close`).
        **engine_kwargs: more `vllm.LLM` arguments (max_model_len, gpu_memory_utilization, ...).
    """

    def __init__(self, policy: Any, tokenizer: Any, *, model: str | None = None, dtype: str | None = None,
                 workdir: str | Path | None = None, seed: int = 0, **engine_kwargs: Any) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (colocated)
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError(NO_VLLM) from None
        adapter = adapter_of(policy)
        refuse_unsupported(adapter, policy)
        self.kind, self.sync_mode = adapter.kind, adapter.vllm_sync
        lm = unwrap_lm(policy)
        self.model_path = str(model or getattr(lm.config, "name_or_path", "") or "")
        if not self.model_path or not Path(self.model_path, "config.json").is_file():
            raise ValueError(f"vLLM needs the policy's model folder (got {self.model_path!r}); set vllm.model to the "
                             "folder the policy's base was loaded from")
        if self.sync_mode == "lora_request":  # (row V20) before anything is written
            check_moe_lora(folder_config(self.model_path, engine_kwargs), self.model_path, "generation_backend="
                           "'vllm'", MOE_LORA_FIX)
        self.tokenizer = tokenizer
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="alignkit-vllm-"))
        dtype = dtype or str(next(policy.parameters()).dtype).replace("torch.", "")
        kw: dict[str, Any] = dict(model=self.model_path, dtype=dtype, seed=seed, enforce_eager=True)
        if self.sync_mode == "lora_request":
            r = max(int(c.r) for c in policy.peft_config.values())
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=next((x for x in LORA_RANKS if x >= r), r))
        kw.update(engine_kwargs)
        capped = start_max_model_len(self.model_path, kw)  # a RoPE-scaled model: vLLM's own is longer (row V16)
        if capped is not None:
            kw["max_model_len"] = capped
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)  # prompt + response tokens
        logger.info("vLLM engine for the %s policy (%s) started in %.1f s", self.kind, self.model_path,
                    time.perf_counter() - t0)
        self.version = 0  # syncs done
        self.lora_request = None
        self.sync_seconds = 0.0

    def sync(self, policy: Any) -> None:
        """Give the engine the policy's current weights (full: pushed in place; LoRA: a new adapter id)."""
        t0 = time.perf_counter()
        self.version += 1
        if self.sync_mode == "weights":
            with torch.no_grad():
                weights = [(n, t.detach()) for n, t in unwrap_lm(policy).state_dict().items()]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()  # reload_weights keeps the prompt KV cached with the old weights
        else:
            from vllm.lora.request import LoRARequest

            folder = self.workdir / f"policy-{self.version}"
            policy.save_pretrained(str(folder))  # the PeftModel: adapter_config.json + adapter_model.safetensors
            old = self.lora_request
            self.lora_request = LoRARequest(f"policy-{self.version}", self.version, str(folder))
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
        self.sync_seconds += time.perf_counter() - t0
        logger.debug("vLLM sync %d (%s) in %.2f s", self.version, self.kind, time.perf_counter() - t0)

    def generate(self, prompts: Sequence[Any], cfg: SamplingConfig | None = None, *, formatter: str = "auto",
                 max_prompt_length: int | None = None, eos_source: Any = None) -> list[Sample]:
        """`cfg.num_samples` responses per prompt, ordered and cut as `generate_responses` does.
        `eos_source`: the model whose generation config names the end tokens (default: none, the tokenizer's)."""
        return generate_with(self._complete, self.tokenizer, prompts, cfg, formatter=formatter,
                             max_prompt_length=max_prompt_length, eos_source=eos_source,
                             max_model_len=self.max_model_len)

    def _complete(self, encoded: list[list[int]], requests: list[dict]) -> list[list[list[int]]]:
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                 [sampling_params(r) for r in requests], use_tqdm=False,
                                 lora_request=self.lora_request)
        return [[list(comp.token_ids) for comp in out.outputs] for out in outs]

    def close(self) -> None:
        """Stop the engine and remove the LoRA snapshots."""
        llm, self.llm = getattr(self, "llm", None), None
        shutdown_engine(llm)
        del llm
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


__all__ = ["BACKENDS", "MOE_LORA_FIX", "NO_VLLM", "REQUEST_KEYS", "VllmGenerator", "check_model_len", "generate_with",
           "prompt_seeds", "refuse_unsupported", "sampling_params", "sampling_request"]
