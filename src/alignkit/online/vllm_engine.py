"""What a colocated vLLM engine will make of `method.vllm` (its `vllm.LLM` arguments) and of the model folder,
worked out before it starts: a wrong argument used to stop the run only when the engine started, at the first
step, after the run folder was written.

- `check_engine_args`: every key must be an engine argument. `ENGINE_ARGS` lists those alignkit knows (pinned
  against vLLM's `EngineArgs` fields by tests/compat/test_vllm.py, row V1 of docs/architecture.md); any other
  name is looked up in vLLM's own `EngineArgs` fields and `LLM` parameters where vLLM is importable (where a
  colocated engine runs), and refused otherwise. A typo (`max_model_lenn`) is one line with the close names.
- `check_lora_rank`: a LoRA policy's rank against `max_lora_rank` (vLLM refuses an adapter above it when it loads
  it; it accepts only the ranks `ACCEPTED_LORA_RANKS` lists, so a rank above 512 cannot run), and
  `enable_lora: false` beside a LoRA policy.
- `check_engine_rope`: the policy's RoPE (`model.rope_scaling` changes the loaded config, not config.json)
  against the folder's, which the engine reads.
- `check_engine_base`: the folder's weights (a few safetensors slices) against the policy's base fingerprint
  (`alignkit_base.json`'s probes): an adapter policy samples through the folder's other weights. A warning (naming
  the folder) where no probe could be read there (no safetensors, other tensor names): nothing but shapes compared;
  none for the folder the policy's base was loaded from.
- the engine's max_model_len: `models/vllm_support.py:engine_max_model_len` (shared with serve --engine vllm).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any

from alignkit.adapters.base import adapter_of, base_mismatch, compared_probes, folder_fingerprint, recorded_base
from alignkit.models.rope import rope_record
from alignkit.models.vllm_support import folder_config
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

# vllm.LLM arguments alignkit knows for a colocated engine (all are vLLM EngineArgs fields; tests/compat/test_vllm.py)
ENGINE_ARGS = (
    "model", "dtype", "seed", "max_model_len", "gpu_memory_utilization", "enforce_eager", "max_num_seqs",
    "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill", "kv_cache_memory_bytes",
    "kv_cache_dtype", "block_size", "cpu_offload_gb", "quantization", "enable_lora", "max_lora_rank", "max_loras",
    "max_cpu_loras", "lora_dtype", "trust_remote_code", "revision", "tokenizer", "tokenizer_revision",
    "load_format", "download_dir", "disable_sliding_window", "hf_overrides", "compilation_config",
    "attention_backend", "disable_log_stats", "max_logprobs", "enable_sleep_mode",
)
# the values vLLM's --max-lora-rank accepts (its MaxLoRARanks; alignkit picks the smallest >= the policy's rank)
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
ACCEPTED_LORA_RANKS = (1, *LORA_RANKS)


def vllm_argument_names() -> frozenset[str] | None:
    """The names vLLM's `LLM(...)` takes (its parameters and, through **kwargs, `EngineArgs` fields); None where
    vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    params = {p.name for p in inspect.signature(LLM.__init__).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return frozenset(params | {f.name for f in dataclasses.fields(EngineArgs)})


def check_engine_args(vllm: dict[str, Any], where: str = "online config: vllm") -> None:
    """ValueError (one line) for a key of `vllm` that is no engine argument (module docstring)."""
    unknown = sorted(k for k in vllm if k not in ENGINE_ARGS)
    if not unknown:
        return
    known = vllm_argument_names()
    if known is not None:
        unknown = [k for k in unknown if k not in known]
        if not unknown:
            return
    pool = sorted(set(ENGINE_ARGS) | (known or set()))
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), pool, n=1, cutoff=0.75)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    against = ("vLLM's EngineArgs fields and LLM parameters" if known is not None else
               f"the vllm.LLM arguments alignkit knows without vLLM here ({', '.join(ENGINE_ARGS)})")
    raise ValueError(f"{where}: {', '.join(hints)} is not an engine argument (checked against {against}); vLLM "
                     "would refuse it when the engine starts, after the run folder is written: fix or remove it")


def check_lora_rank(rank: int, vllm: dict[str, Any]) -> None:
    """ConfigError when `method.vllm` cannot serve a LoRA of `rank`: `max_lora_rank` not one vLLM accepts, or below
    the rank (vLLM refuses the adapter when it loads it, at the first generation), or `enable_lora: false`."""
    if vllm.get("enable_lora", True) is False:
        raise ConfigError("method.vllm.enable_lora is false, and the policy is a LoRA, which the colocated engine runs "
                          "as a LoRA adapter (it needs enable_lora): remove method.vllm.enable_lora")
    asked = vllm.get("max_lora_rank")
    if asked is None and rank > LORA_RANKS[-1]:
        raise ConfigError(f"the LoRA policy's rank {rank} (adapter.lora.r) is above {LORA_RANKS[-1]}, the largest "
                          "max_lora_rank vLLM takes: it would refuse the adapter when the engine starts, after the "
                          f"run folder is written; lower adapter.lora.r to {LORA_RANKS[-1]} or less, or use "
                          "method.generation_backend=transformers")
    if asked is None:
        return
    if asked not in ACCEPTED_LORA_RANKS:
        raise ConfigError(f"method.vllm.max_lora_rank {asked!r} is not a rank vLLM accepts "
                          f"({', '.join(map(str, ACCEPTED_LORA_RANKS))}): use "
                          f"{next((x for x in LORA_RANKS if x >= rank), LORA_RANKS[-1])}, or remove it (alignkit "
                          f"picks the smallest that fits the policy's rank)")
    if asked < rank:
        fit = next((x for x in LORA_RANKS if x >= rank), None)
        raise ConfigError(f"method.vllm.max_lora_rank {asked} is below the LoRA policy's rank {rank} (adapter.lora.r): "
                          "vLLM would refuse the adapter at the first generation, after the run folder is written; "
                          + (f"set it to {fit} or remove it (alignkit then picks {fit})" if fit is not None else
                             f"vLLM takes ranks up to {LORA_RANKS[-1]}: lower adapter.lora.r"))


def check_engine_rope(policy_config: Any, folder: str | Path, vllm: dict[str, Any]) -> None:
    """ConfigError when the policy encodes positions otherwise than the model folder the engine loads: its RoPE set
    by `model.rope_scaling` (alignkit changes the loaded config, not config.json), so vLLM, which reads
    config.json, would sample from another model than the one trained (every position encoded otherwise). Not
    checked with `method.vllm.hf_overrides`, through which the caller sets vLLM's config itself."""
    if vllm.get("hf_overrides"):  # the caller changes vLLM's config itself (e.g. its rope_parameters)
        return
    ours, theirs = rope_record(policy_config), rope_record(folder_config(folder, vllm))
    if ours is not None and theirs is not None and ours != theirs:
        raise ConfigError(f"generation_backend='vllm': the policy's RoPE is {ours} (model.rope_scaling), and the "
                          f"colocated engine loads {Path(folder) / 'config.json'}, whose RoPE is {theirs}: vLLM would "
                          "sample from a model whose positions are encoded otherwise than the policy's; remove "
                          "model.rope_scaling, save the base with that scaling in its config.json and load it from "
                          "there, or use method.generation_backend=transformers")


def check_engine_base(model: Any, folder: str | Path, vllm: dict[str, Any], key: str = "method.vllm.model",
                      engine: str = "the colocated engine would load",
                      fix: str = "set method.vllm.model to the policy's base folder") -> None:
    """ConfigError when the model folder the colocated engine loads is not the policy's base: an adapter policy gets
    only its adapter into the engine (a LoRA request, or its merged layers), the rest of the weights are the
    folder's, so another model of the same architecture there (a finetuned copy of the base: an SFT run's folder
    under a LoRA trained on the base) made vLLM sample from other weights, without a word. The policy's base
    fingerprint (`recorded_base`, taken before training) against the folder's, read from its safetensors
    (`folder_fingerprint`: a few slices). Not checked for full finetuning (the engine gets every weight); a folder
    whose weights cannot be compared (no safetensors, no probed tensor under the policy's names) is a warning, but
    the folder the policy's base was loaded from (its fingerprint's name_or_path), which holds that base.
    `load_format: dummy` (random weights) is refused for an adapter policy. `key`, `engine`, `fix`: the setting,
    what loads the folder and the way out, as the message names them (server mode: the server's folder)."""
    if adapter_of(model).saves_whole_model:
        return
    if vllm.get("load_format") == "dummy":  # vLLM's random initialisation (for profiling): nothing read from folder
        raise ConfigError("method.vllm.load_format='dummy': the colocated engine would start from random weights, "
                          "and an adapter policy's engine gets only the adapter (a full policy pushes every weight), "
                          "so vLLM would sample from random weights; remove method.vllm.load_format")
    ours = recorded_base(model)
    theirs = folder_fingerprint(folder, model, ours, folder_config(folder, vllm)) if ours is not None else None
    why = base_mismatch(ours, theirs) if theirs is not None else None
    base = (ours or {}).get("name_or_path") or "the policy's base"
    if why is not None:
        why = why.replace(" here, ", f" in {folder}, ").replace(" when trained", " in the policy's base")
        raise ConfigError(f"{key}: {engine} {folder}, which is not the model the policy's adapter is trained on "
                          f"({base}): {why}, so vLLM would sample from other weights than the policy's; {fix} ({base})")
    loaded_from = (ours or {}).get("name_or_path")
    own = bool(loaded_from) and Path(loaded_from).resolve() == Path(folder).resolve()
    if not own and (theirs is None or not compared_probes(ours, theirs)):  # nothing read to compare: say so (not
        #   refused: the folder may be the base saved otherwise, e.g. .bin files or other tensor names); the folder
        #   the policy's base was loaded from holds that base, whatever its files
        unread = ("the policy's base fingerprint is not readable here" if ours is None else
                  "it has no model.safetensors (or its index)" if theirs is None else
                  "its safetensors hold no input embedding / final norm under the policy's names (or the policy's "
                  "fingerprint has no probe)")
        logger.warning("%s: the weights of %s, which vLLM runs under the adapter policy, were not compared with the "
                       "policy's base (%s): %s; only its shapes were checked, so make sure it holds that base (vLLM "
                       "samples through its other weights)", key, folder, base, unread)


__all__ = ["ACCEPTED_LORA_RANKS", "ENGINE_ARGS", "LORA_RANKS", "check_engine_args", "check_engine_base",
           "check_engine_rope", "check_lora_rank", "vllm_argument_names"]
