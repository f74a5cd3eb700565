"""What vLLM makes of a model folder, worked out before an engine or server starts: whether vLLM is here and can
run the model, and the context it derives for it. Shared by `alignkit serve --engine vllm` (serve/vllm_server.py),
`alignkit vllm-serve` (serve/vllm_serve.py) and the online trainers' vLLM generation (online/trainer.py,
online/vllm_generation.py), so neither package imports the other for it.

- `vllm_installed` / `require_vllm`; `head_size`, `attention_head_sizes`, `check_head_size`: a model vLLM's CPU
  attention cannot run (row V3 of docs/architecture.md); `check_rope_type`: a RoPE scaling vLLM computes otherwise
  than transformers (dynamic NTK, row V15); `lora_unsupported`: peft features vLLM's LoRA lacks; `check_moe_lora`:
  LoRA on a mixture of experts, which vLLM's CPU build cannot run (`num_experts`, rows V20, V21).
- `engine_max_model_len`: the engine's max_model_len (prompt + response tokens) as vLLM derives it from the model
  folder when `max_model_len` is not given (vLLM's `_get_and_verify_max_len`: the smallest of the config's length
  keys, the sliding window when `disable_sliding_window`, times the RoPE scaling factor of the types that do not
  scale `max_position_embeddings` themselves), and a `max_model_len` above it, which vLLM refuses at start. Pinned
  against vLLM's `ModelConfig` (rows V2, V11).
- `engine_limit` / `start_max_model_len`: that length capped where vLLM reads a RoPE-scaled model otherwise than
  alignkit (`rope_length_cap`, row V16): linear scaling (vLLM multiplies `max_position_embeddings`, which
  `model.rope_scaling` records already scaled, by the factor again: twice the positions the model was trained on) and
  longrope (vLLM rotates every position with the long factors once max_model_len is above
  `original_max_position_embeddings`, where transformers uses them only past it) and yarn with a
  `max_position_embeddings` above `original_max_position_embeddings` x factor (vLLM's cos/sin table has that many rows,
  and reads a later position from outside it). The engine starters pass the capped length as vLLM's max_model_len
  when none is given.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from alignkit.models.rope import context_length
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

# the config keys vLLM reads a model's length from (the smallest wins), and the RoPE types whose
# max_position_embeddings is already the scaled context (vLLM does not multiply it by `factor`)
MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
NO_LENGTH_DEFAULT = 2048  # vLLM's guess when the config names no length


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_installed():
        raise ConfigError("engine: vllm needs vLLM installed in this Python (make vllm-env builds .venv-vllm with "
                          "the CPU build; on a GPU: pip install vllm); or use engine=alignkit")


def head_size(config: Any) -> int | None:
    """The attention head size of a transformers `config` as vLLM reads it (its `head_dim`, else hidden_size /
    num_attention_heads); None for MLA models (`kv_lora_rank`: vLLM's MLA backends, other sizes) or where not given."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "kv_lora_rank", None) is not None:
        return None
    size = getattr(text, "head_dim", None)
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return int(size) if size else hidden // heads if hidden and heads else None


def attention_head_sizes(size: int) -> tuple[str, list[int]] | None:
    """(vLLM's attention backend on this platform, the head sizes it takes) when it does not take `size`; None when
    it does, where vLLM is not importable, or off its CPU platform (vLLM's GPU selector picks among several backends
    and refuses itself at start). vLLM's own answer: its platform's `get_attn_backend_cls`, the backend's
    `supports_head_size` / `get_supported_head_sizes` (tests/compat/test_vllm.py, row V3)."""
    if not vllm_installed():
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.selector import AttentionSelectorConfig

    path = current_platform.get_attn_backend_cls(None, AttentionSelectorConfig(
        head_size=size, dtype=torch.float32, kv_cache_dtype=None, block_size=None))
    backend = resolve_obj_by_qualname(path)
    if backend.supports_head_size(size):
        return None
    return backend.get_name(), list(backend.get_supported_head_sizes())


def check_head_size(config: Any, folder: str | Path, where: str, fix: str) -> None:
    """ConfigError when vLLM's attention here cannot run the model `folder` (its `config`): the CPU build's engine
    starts and its first generation fails ('Unsupported CPU attention configuration: head_dim=16'), after a run
    folder was written or a server said it was ready. `where`: what starts the engine; `fix`: the way out."""
    size = head_size(config)
    refused = attention_head_sizes(size) if size is not None else None
    if refused is not None:
        backend, sizes = refused
        raise ConfigError(f"{where}: the model in {folder} has attention head size {size} (head_dim, else "
                          f"hidden_size / num_attention_heads), and vLLM's {backend} attention here takes "
                          f"{', '.join(map(str, sizes))}: its first generation would fail, after the engine started; "
                          f"{fix}")


# RoPE types vLLM computes otherwise than transformers: dynamic NTK, which transformers rescales by the sequence's
# length once it grows past max_position_embeddings, where vLLM's one fixed cos/sin table has max_position_embeddings
# rows only (though it derives max_model_len as max_position_embeddings x factor: no row past them) (row V15)
ROPE_NOT_AS_TRANSFORMERS = ("dynamic",)


def check_rope_type(config: Any, folder: str | Path, where: str, fix: str) -> None:
    """ConfigError when vLLM would encode the positions of the model `folder` (its `config`) otherwise than
    transformers does (`ROPE_NOT_AS_TRANSFORMERS`): vLLM would generate from another model than the one trained or
    served by alignkit's engine, without an error; or cannot start on them (a linear factor written as an integer,
    row V16). `where`: what starts the engine; `fix`: the way out."""
    for rp in rope_parameters(config):
        if rp.get("rope_type", rp.get("type")) == "linear" and type(rp.get("factor")) is int:
            raise ConfigError(f"{where}: the model in {folder} has linear RoPE scaling with the integer factor "
                              f"{rp['factor']} (rope_parameters in {Path(folder) / 'config.json'}), on which vLLM's "
                              f"linear RoPE fails when the engine starts ('int' object is not iterable: it takes a "
                              f"float); write factor: {float(rp['factor'])} there, or {fix}")
    kinds = {rp.get("rope_type", rp.get("type")) for rp in rope_parameters(config)}
    for kind in sorted(k for k in kinds if k in ROPE_NOT_AS_TRANSFORMERS):
        raise ConfigError(f"{where}: the model in {folder} has {kind} RoPE scaling (rope_parameters in "
                          f"{Path(folder) / 'config.json'}), which vLLM computes as one fixed table of "
                          f"max_position_embeddings rows (though it runs max_position_embeddings x factor positions) "
                          f"where transformers rescales the frequencies by the sequence's length past them, so past "
                          f"those positions vLLM would generate from another model than the one trained; {fix}")


def lora_unsupported(peft_cfg: Mapping) -> str | None:
    """Why vLLM's LoRA cannot serve this peft adapter_config (DoRA, LoRA biases, extra trained modules, a mixture of
    experts' expert parameters), or None. Expert LoRAs (peft's `target_parameters`, row V20): vLLM 0.32's CPU build
    runs LoRA on a MoE model through its Triton fused-MoE LoRA kernels, so the first generation fails (even the base's,
    once --enable-lora is on); on GPU it takes peft's layout for some models only (`is_3d_moe_weight`, else a
    request flag alignkit does not set), none tested here."""
    return ("uses DoRA (use_dora)" if peft_cfg.get("use_dora") else
            f"trains LoRA biases (bias={peft_cfg.get('bias')!r})" if peft_cfg.get("bias", "none") != "none" else
            f"trains extra modules ({peft_cfg.get('modules_to_save')})" if peft_cfg.get("modules_to_save") else
            f"targets a mixture of experts' expert parameters (target_parameters "
            f"{sorted(peft_cfg['target_parameters'])})" if peft_cfg.get("target_parameters") else None)


# the config keys vLLM reads a model's number of experts from, the first one the (text) config has
# (ModelArchConfigConvertorBase.get_num_experts; `ModelConfig.is_moe`: more than 0), row V21
EXPERT_KEYS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")


def num_experts(config: Any) -> int:
    """The number of experts vLLM reads from a transformers `config` (0: not a mixture of experts): its text config's
    first `EXPERT_KEYS` attribute present (a list: its first value), else the most experts of a "moe" block of
    `block_configs` (heterogeneous models, e.g. NemotronH), as vLLM's `get_num_experts` does (row V21)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = next((getattr(text, k) for k in EXPERT_KEYS if hasattr(text, k)), 0)
    if isinstance(found, (list, tuple)):
        found = found[0] if found else 0
    if not found:
        blocks = getattr(text, "block_configs", None) or []
        read = [(b.get("block_type", ""), b.get("n_routed_experts", 0)) if isinstance(b, dict) else
                (getattr(b, "block_type", ""), getattr(b, "n_routed_experts", 0)) for b in blocks]
        found = max([n or 0 for kind, n in read if kind == "moe"], default=0)
    return int(found or 0)


def vllm_cpu_platform() -> bool:
    """Whether vLLM is importable here and runs on its CPU platform (`current_platform.is_cpu()`)."""
    if not vllm_installed():
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def check_moe_lora(config: Any, folder: str | Path, where: str, fix: str) -> None:
    """ConfigError, before the engine starts, when vLLM would run LoRA on a mixture-of-experts model (`num_experts`)
    on its CPU platform: vLLM 0.32's CPU build picks its Triton fused-MoE LoRA kernels whenever LoRA is enabled on
    a MoE model, so every generation fails, the base model's too (`triton.language has no attribute float32`,
    row V20), after a server said it was ready or a run folder was written. Call it only where LoRA is enabled.
    `where`: what starts the engine; `fix`: the way out."""
    experts = num_experts(config)
    if experts and vllm_cpu_platform():
        raise ConfigError(f"{where}: the model in {folder} is a mixture of experts ({experts} experts), and vLLM's "
                          "CPU build runs LoRA on one with its Triton fused-MoE kernels only, so every generation "
                          "would fail (the base model's too) after the engine started; " + fix)


def folder_config(folder: str | Path, vllm: Mapping[str, Any] | None = None, where: str = "the vLLM engine") -> Any:
    """The transformers config of the model folder the engine loads (as vLLM reads it: config.json). A config.json
    transformers cannot read (a model_type this transformers does not know, broken JSON) is a ConfigError naming
    `where` and the folder, not a traceback."""
    remote = bool((vllm or {}).get("trust_remote_code", False))
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=remote)
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: cannot read the model config in {folder} ({first[:300]}); give a transformers "
                          f"model folder with a valid config.json whose model_type transformers "
                          f"{transformers.__version__} knows (a newer architecture: pip install -U transformers)"
                          ) from None


def rope_parameters(config: Any) -> list[dict[str, Any]]:
    """The RoPE parameter dicts of a transformers `config` (one per layer type where it has several; [] for none)."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or not rp:
        return []
    if all(isinstance(v, dict) for v in rp.values()):  # one per layer type
        return [v for v in rp.values() if v]
    return [rp]


def engine_max_model_len(folder: str | Path, vllm: dict[str, Any],
                         setting: str = "method.vllm.max_model_len") -> tuple[int | None, str]:
    """(the engine's max_model_len, what it comes from) as vLLM derives it for the model `folder` (the module
    docstring), with `vllm.max_model_len` when set (a dict of `vllm.hf_overrides` applied first; None with a callable
    one); a ConfigError when that is above the model's own length (vLLM refuses it when the engine starts, unless
    VLLM_ALLOW_LONG_MAX_MODEL_LEN is set)."""
    config = folder_config(folder, vllm)
    overrides = vllm.get("hf_overrides")
    if callable(overrides):  # vLLM calls it on its config: not derived here (the engine checks at generation)
        return None, "method.vllm.hf_overrides"
    for k, v in (overrides or {}).items():  # vLLM applies a dict of overrides onto the config
        setattr(config, k, v)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    derived, key = math.inf, None
    for k in MAX_LEN_KEYS:
        v = getattr(text, k, None)
        if v is not None and v < derived:
            derived, key = v, k
    if getattr(text, "model_max_length", None):  # vLLM's Command-R rule: this key wins when set
        derived, key = text.model_max_length, "model_max_length"
    window = getattr(text, "sliding_window", None)
    if vllm.get("disable_sliding_window") and window and window < derived:
        derived, key = window, "sliding_window"
    # (the tokenizer's model_max_length: vLLM reads it for pooling models only, not for generation)
    asked = vllm.get("max_model_len")
    if derived == math.inf:
        if asked is not None:
            return int(asked), "method.vllm.max_model_len"
        derived, key = NO_LENGTH_DEFAULT, "vLLM's default (the config names no length)"
    rope = rope_parameters(config)
    if rope and "gemma3" not in str(getattr(config, "model_type", "")):
        factor = 1.0
        for rp in rope:
            if rp.get("rope_type", rp.get("type")) not in PRESCALED_ROPE:
                factor = rp.get("factor", factor)
        if factor != 1.0 and factor is not None:
            derived, key = derived * factor, f"{key} x rope factor {factor}"
    where = f"{key} in {Path(folder) / 'config.json'}" if "default" not in str(key) else key
    if asked is None or asked == -1:
        if any(rp.get("rope_type") == "longrope" for rp in rope):
            orig = getattr(config, "original_max_position_embeddings", None)
            if orig is not None:
                return int(orig), f"original_max_position_embeddings in {Path(folder) / 'config.json'} (longrope)"
        return int(derived), where
    allow_long = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true")
    if asked > derived and not (getattr(config, "model_max_length", None) or 0) >= asked and not allow_long:
        raise ConfigError(f"{setting} {asked} is above the model's context {int(derived)} ({where}): "
                          "vLLM refuses it when the engine starts, after the run folder is written; lower "
                          f"{setting} to {int(derived)} or less")
    return int(asked), setting


class RopeCap(NamedTuple):
    """The longest max_model_len vLLM may run a RoPE-scaled model with (`rope_length_cap`)."""

    length: int
    source: str  # what gives it, e.g. "original_max_position_embeddings 16 x factor 2.0 (rope_parameters) = 32"
    why: str  # why vLLM's own length is longer
    refuse: bool  # a longer max_model_len given: refused (other encodings than trained), else warned (linear)


def rope_length_cap(config: Any) -> RopeCap | None:
    """The longest max_model_len vLLM may run `config`'s model with (`RopeCap`: the length, what gives it, why vLLM's
    own is longer, whether a longer one given is refused) where vLLM reads a RoPE scaling otherwise than alignkit's
    engine and training (row V16); None otherwise.

    - linear (any type vLLM multiplies by its `factor`, dynamic aside: refused by `check_rope_type`): vLLM takes
      `max_position_embeddings` as the length before scaling; `model.rope_scaling` records the scaled length there,
      which is what alignkit trains, generates and serves with (`rope.trained_context`).
    - longrope: vLLM picks its long factors for every position, short sequences included, once max_model_len is
      above `original_max_position_embeddings` (Phi3LongRoPEScaledRotaryEmbedding.use_long_rope); transformers uses
      the short ones for any sequence up to that length.
    - yarn: vLLM's cos/sin table (YaRNScalingRotaryEmbedding) holds `original_max_position_embeddings` x factor rows,
      and its max_model_len is `max_position_embeddings`; where that is longer (a saved config.json: transformers
      only warns of it, `model.rope_scaling` refuses it), a position past the table reads memory outside it (no error on
      CPU / GPU kernels: other numbers every run), where transformers rotates it with the same frequencies.
    (llama3: vLLM's table holds `max_position_embeddings` rows, its max_model_len: every position covered.)"""
    for rp in rope_parameters(config):
        kind, factor = rp.get("rope_type", rp.get("type")), rp.get("factor")
        orig = rp.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        if kind == "yarn" and factor and orig:
            rows, length = math.ceil(orig * factor), context_length(config)
            if length and length > rows:
                return RopeCap(rows, f"original_max_position_embeddings {orig} x factor {factor} (rope_parameters) = "
                               f"{rows}",
                               "yarn RoPE: vLLM's cos/sin table has that many rows while its max_model_len is "
                               f"max_position_embeddings {length}, so it would read a position past them from memory "
                               "outside the table, where transformers keeps rotating with the same frequencies", True)
        if kind == "longrope":
            if orig:
                return RopeCap(int(orig), f"original_max_position_embeddings {int(orig)}",
                               "longrope RoPE: above it vLLM rotates every position with the long factors, where "
                               "transformers uses the short ones for a sequence up to it", True)
        elif kind not in (*PRESCALED_ROPE, *ROPE_NOT_AS_TRANSFORMERS, "default") and factor not in (None, 1, 1.0):
            length = context_length(config)
            if length:
                return RopeCap(length, f"max_position_embeddings {length}",
                               f"{kind} RoPE: vLLM multiplies it by the factor {factor} again, past the positions the "
                               "model was trained on (model.rope_scaling records the scaled length there)", False)
    return None


def _engine_config(folder: str | Path, vllm: dict[str, Any]) -> Any:
    """The folder's config as vLLM's engine sees it: a dict of `hf_overrides` applied; None with a callable one."""
    overrides = vllm.get("hf_overrides")
    if callable(overrides):
        return None
    config = folder_config(folder, vllm)
    for k, v in (overrides or {}).items():
        setattr(config, k, v)
    return config


def capped_length(folder: str | Path, vllm: dict[str, Any],
                  key: str = "method.vllm.max_model_len") -> tuple[int | None, str, RopeCap | None]:
    """(`engine_max_model_len`'s length and source, the `rope_length_cap` when that length is above it, else None)."""
    limit, source = engine_max_model_len(folder, vllm, key)
    config = _engine_config(folder, vllm) if limit is not None else None
    cap = rope_length_cap(config) if config is not None else None
    return limit, source, (cap if cap is not None and limit > cap.length else None)


def engine_limit(folder: str | Path, vllm: dict[str, Any],
                 key: str = "method.vllm.max_model_len") -> tuple[int | None, str]:
    """(the max_model_len a vLLM engine for the model `folder` runs with, what gives it): `engine_max_model_len`,
    capped at `rope_length_cap` when `key` (`vllm["max_model_len"]`) is not given: the engine starters pass that
    length to vLLM (`start_max_model_len`). A given length above the cap: a ConfigError for longrope (vLLM would
    rotate with other frequencies than the trained model's) and yarn (positions past vLLM's cos/sin table), a warning
    for linear (positions past the trained context, which alignkit's own generation warns about too)."""
    limit, source, cap = capped_length(folder, vllm, key)
    if cap is None:
        return limit, source
    asked = vllm.get("max_model_len")
    where = f"{cap.source} in {Path(folder) / 'config.json'}"
    if asked is None or asked == -1:
        return cap.length, f"{where}, not vLLM's own {limit}: {cap.why}"
    if cap.refuse:
        raise ConfigError(f"{key} {asked} is above {where} ({cap.why}), so vLLM would generate from another model "
                          f"than the one trained; set {key} to {cap.length} or less")
    # linear: positions past the trained ones, run as vLLM computes them (alignkit's own generation warns too)
    logger.warning("%s %d is above %s (%s): positions past %d were never trained; lower %s to %d", key, asked, where,
                   cap.why, cap.length, key, cap.length)
    return limit, source


def start_max_model_len(folder: str | Path, vllm: dict[str, Any]) -> int | None:
    """The max_model_len to start vLLM with for the model `folder` when `vllm` gives none (or -1) and vLLM's own
    would be longer than `rope_length_cap`; None: leave it to vLLM."""
    if vllm.get("max_model_len") not in (None, -1):
        return None
    cap = capped_length(folder, vllm)[2]
    return cap.length if cap is not None else None


def meta_causal_lm(config: Any) -> torch.nn.Module:
    """`config`'s transformers causal LM built on the meta device: its module names and layer shapes, no weights,
    no memory (what a LoRA folder is checked against before vLLM gets it: `check_lora_fits`). ValueError / KeyError
    for an architecture transformers builds no causal LM for (vLLM may still serve it)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


__all__ = ["MAX_LEN_KEYS", "NO_LENGTH_DEFAULT", "PRESCALED_ROPE", "ROPE_NOT_AS_TRANSFORMERS", "attention_head_sizes",
           "check_head_size", "check_moe_lora", "check_rope_type", "EXPERT_KEYS", "num_experts", "vllm_cpu_platform",
           "engine_limit", "engine_max_model_len", "folder_config", "head_size", "lora_unsupported", "meta_causal_lm",
           "require_vllm", "RopeCap", "capped_length", "rope_length_cap", "start_max_model_len", "vllm_installed",
           "rope_parameters"]
