"""The reference model of DPO-like objectives: three ways to get log pi_ref(y|x), and none for reference-free losses.

| mode           | what                                                            | memory            |
|----------------|-----------------------------------------------------------------|-------------------|
| "adapter_off"  | the policy itself with its adapter switched off (`reference_off`) | no copy          |
|                | (LoRA, ReFT, ReFT+LoRA)                                         |                   |
| "copy"         | a frozen copy of the initial model (full finetuning): eval mode, | one more model   |
|                | no grad, requires_grad False                                     |                   |
| "precomputed"  | log-probs computed once over the dataset, cached on disk        | none while training|
| "none"         | reference-free losses (SimPO, ORPO, SLiC)                        | -                 |

"auto" picks "none" for reference-free losses, "adapter_off" for adapters and "copy" for full
finetuning. (With ReFT the reference is the base model, which the policy does NOT equal at
initialisation: LoReFT's edit R^T(Wh + b - Rh) is zero only when W = R and b = 0.)

Precomputed cache: a folder with `<split>.safetensors` (float32 tensors "chosen", "rejected" or
"logps", one row per example in dataset order) and `<split>.json` holding the cache key and its parts.
The key is a SHA-256 over:
- model: the config (`to_dict`, minus `_name_or_path`) and a SHA-256 of every base weight's bytes
  (name, dtype, shape, data), adapter weights excluded, LoRA's `base_layer` names normalised. A content
  hash rather than path + mtime: it stays right when the weights were changed in memory or the folder
  was rewritten, at the cost of one read of the weights (about 1-2 GB/s on a CPU) at start-up;
- the reference state: adapter kind and mode ("adapter_off" or "copy"/initial policy);
- the tokenizer: its serialised fast tokenizer (or vocabulary), special tokens and chat template;
- the data: the token ids and completion masks of every example, in order.
A cache whose key differs is stale: it is logged, recomputed and overwritten, never used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alignkit.adapters import adapter_kind, can_switch_off, reference_off, unwrap_lm
from alignkit.trainers.logps import completion_logps

logger = logging.getLogger(__name__)

MODES = ("auto", "adapter_off", "copy", "precomputed", "none")
CACHE_VERSION = 1
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps", "reference_logps")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the (transformers) model in eval mode with every parameter frozen."""
    ref = copy.deepcopy(unwrap_lm(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def resolve_mode(mode: str, model: nn.Module, reference_free: bool) -> str:
    if mode not in MODES:
        raise ValueError(f"reference mode {mode!r} is unknown; valid: {list(MODES)}")
    if mode != "auto":
        if mode == "adapter_off" and not can_switch_off(model):
            raise ValueError("reference='adapter_off' needs an adapter (lora, reft, reft+lora); a fully finetuned "
                             "model has none: use 'copy' or 'precomputed'")
        return mode
    if reference_free:
        return "none"
    return "adapter_off" if can_switch_off(model) else "copy"


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Any], mode: str, ref_model: nn.Module | None = None,
                    chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(sum log pi_ref (rows,), token counts (rows,)) of `batch`'s completions, without gradients."""
    if mode == "copy":
        if ref_model is None:
            raise ValueError("reference mode 'copy' needs a reference model")
        return completion_logps(ref_model, batch, chunk_size)
    if mode == "adapter_off":
        with reference_off(model):
            return completion_logps(model, batch, chunk_size)
    raise ValueError(f"reference_logps cannot compute mode {mode!r} on the fly")


# ----------------------------------------------------------------------------------------------------
# Fingerprints and the on-disk cache
# ----------------------------------------------------------------------------------------------------

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """{"config": sha, "weights": sha} of the base model under any adapter wrapper (adapter weights excluded)."""
    lm = unwrap_lm(model)
    cfg = lm.config.to_dict()
    cfg.pop("_name_or_path", None)
    h = hashlib.sha256()
    for name, t in sorted(lm.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.replace(".base_layer", "").replace(".original_module", "")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"config": _sha(cfg), "weights": h.hexdigest()}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = {"special": getattr(tokenizer, "special_tokens_map", {}), "template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256((body + _sha(extra)).encode()).hexdigest()


DATA_KEYS = ("input_ids", "completion_mask", "chosen_input_ids", "chosen_completion_mask", "rejected_input_ids",
             "rejected_completion_mask")


def data_fingerprint(dataset: Iterable[dict]) -> str:
    h = hashlib.sha256()
    for ex in dataset:
        h.update(json.dumps({k: ex[k] for k in DATA_KEYS if k in ex}, sort_keys=True).encode())
    return h.hexdigest()


def cache_key(model: nn.Module, mode: str, tokenizer: Any, dataset: Iterable[dict]) -> dict[str, Any]:
    parts = {"version": CACHE_VERSION, "model": model_fingerprint(model), "adapter": adapter_kind(model),
             "reference": mode, "tokenizer": tokenizer_fingerprint(tokenizer), "data": data_fingerprint(dataset)}
    return {"key": _sha(parts), "parts": parts}


def _label(model: nn.Module, ref_model: nn.Module | None) -> str:
    """How the reference is obtained: a separate copy, the adapter switched off, or the initial policy."""
    return "copy" if ref_model is not None else ("adapter_off" if can_switch_off(model) else "policy")


def _compute(model: nn.Module, dataset: list, collator: Callable, batch_size: int, device: torch.device,
             paired: bool, ref_model: nn.Module | None, chunk_size: int) -> dict[str, Tensor]:
    mode = _label(model, ref_model)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for s in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            if mode == "policy":  # full finetuning before training: the policy IS the reference
                with torch.no_grad():
                    logps, _ = completion_logps(model, batch, chunk_size)
            else:
                logps, _ = reference_logps(model, batch, mode, ref_model, chunk_size)
            logps = logps.float().cpu()
            if paired:
                B = logps.shape[0] // 2
                chosen.append(logps[:B])
                rejected.append(logps[B:])
            else:
                chosen.append(logps)
    finally:
        model.train(was_training)
    if paired:
        return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
    return {"logps": torch.cat(chosen)}


def load_or_compute(model: nn.Module, dataset: list, collator: Callable, cache_dir: str | Path, split: str, *,
                    tokenizer: Any = None, batch_size: int = 8, device: torch.device | str = "cpu",
                    paired: bool = True, ref_model: nn.Module | None = None,
                    chunk_size: int = 1024) -> tuple[dict[str, Tensor], bool]:
    """Reference log-probs of every example of `dataset` (dataset order), from `cache_dir` when its key
    matches, else computed and written there. Returns (tensors, reused)."""
    cache_dir = Path(cache_dir)
    key = cache_key(ref_model if ref_model is not None else model, _label(model, ref_model), tokenizer, dataset)
    meta_path, data_path = cache_dir / f"{split}.json", cache_dir / f"{split}.safetensors"
    if meta_path.is_file() and data_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key["key"]:
            tensors = load_file(str(data_path))
            if all(t.shape[0] == len(dataset) for t in tensors.values()):
                logger.info("reference log-probs for %r reused from %s", split, data_path)
                return tensors, True
            logger.warning("%s: %s rows for %d examples; recomputing", data_path,
                           [t.shape[0] for t in tensors.values()], len(dataset))
        else:
            stale = sorted(k for k in key["parts"] if saved.get("parts", {}).get(k) != key["parts"][k])
            logger.warning("%s: stale reference cache (differs in %s); recomputing", meta_path, stale or "format")
    tensors = _compute(model, dataset, collator, batch_size, torch.device(device), paired, ref_model, chunk_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(data_path), metadata={"key": key["key"]})
    meta_path.write_text(json.dumps({**key, "num_examples": len(dataset)}, indent=2) + "\n")
    logger.info("reference log-probs for %r computed over %d examples, cached in %s", split, len(dataset), cache_dir)
    return tensors, False


def attach_reference(dataset: Any, tensors: dict[str, Tensor]) -> Any:
    """`dataset` with columns reference_chosen_logps / reference_rejected_logps (or reference_logps)."""
    cols = {("reference_logps" if k == "logps" else f"reference_{k}_logps"): v.tolist() for k, v in tensors.items()}
    if hasattr(dataset, "add_column"):  # a datasets.Dataset
        for name, values in cols.items():
            dataset = dataset.add_column(name, values)
        return dataset
    return [{**ex, **{name: values[i] for name, values in cols.items()}} for i, ex in enumerate(dataset)]


class ReferenceCollator:
    """Wraps a collator: also stacks the examples' precomputed reference log-probs into `(B,)` float32."""

    def __init__(self, collator: Callable) -> None:
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        for key in REFERENCE_KEYS:
            if key in features[0]:
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return batch


__all__ = ["MODES", "ReferenceCollator", "attach_reference", "cache_key", "data_fingerprint", "frozen_copy",
           "load_or_compute", "model_fingerprint", "reference_logps", "resolve_mode", "tokenizer_fingerprint"]
