"""The reference model of DPO-like objectives, as one object: `build_reference` makes a `Reference`, and every caller
(the offline trainers, the online loop, `alignkit eval`) asks it for log pi_ref(y|x) and never looks at the mode.

| mode           | what                                                            | memory            |
|----------------|-----------------------------------------------------------------|-------------------|
| "adapter_off"  | the policy itself with its adapter switched off (`reference_off`) | no copy          |
|                | (LoRA, ReFT, ReFT+LoRA)                                         |                   |
| "copy"         | a frozen copy of the initial model (full finetuning), or a model | one more model   |
|                | you pass: eval mode, no grad, requires_grad False, dropout off   |                   |
| "precomputed"  | log-probs computed once over the dataset, cached on disk        | none while training|
| "none"         | reference-free losses (SimPO, ORPO, SLiC)                        | -                 |

"auto" picks "none" for reference-free losses, "precomputed" when a cache folder is given, "copy" when a
reference model is passed or the policy has no adapter to switch off (full finetuning), else "adapter_off".
(With ReFT the reference is the base model, which the policy does NOT equal at initialisation: LoReFT's edit
R^T(Wh + b - Rh) is zero only when W = R and b = 0.)

    reference = build_reference(policy, "auto", reference_free=False)      # before the policy is wrapped
    reference.place(device, accelerator)                                   # the copy: on the device, sharded
    ref = reference.logps(policy, batch)          # (rows,) sums over each completion; None for "none"
    ref = reference.logps(policy, batch, score)   # another measure: score(model, batch), e.g. per-token (online)

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
The batches then carry the cached values (`ReferenceCollator`), which `Reference.logps` returns.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alignkit.adapters import adapter_kind, can_switch_off, kept_when_off, reference_off, unwrap_lm
from alignkit.distributed import shard_reference
from alignkit.trainers.base import turn_off_dropout
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


class Reference:
    """log pi_ref of a batch's completions, however the reference is obtained (see the module's table). Made by
    `build_reference`; `model` is the frozen copy ("copy"; "precomputed": what the cache is computed with, None
    for the policy itself or its adapter switched off), `cache_dir` the precomputed cache's folder."""

    def __init__(self, mode: str, model: nn.Module | None = None, *, chunk_size: int = 1024,
                 cache_dir: str | Path | None = None) -> None:
        if mode not in MODES or mode == "auto":
            raise ValueError(f"reference mode {mode!r} is unknown; valid: {list(MODES[1:])}")
        if mode == "copy" and model is None:
            raise ValueError("reference mode 'copy' needs a reference model")
        if mode == "precomputed" and cache_dir is None:
            raise ValueError("reference='precomputed' needs reference_cache_dir (a folder for the cached log-probs)")
        self.mode, self.model, self.chunk_size = mode, model, chunk_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def __repr__(self) -> str:
        return f"Reference({self.mode!r})"

    def place(self, device: torch.device | str, accelerator: Any = None, *, disable_dropout: bool = True) -> Reference:
        """The reference model (if any) on `device`, in eval mode with every parameter frozen and (by default)
        dropout off, and, given the policy's `accelerator`, sharded as the policy is (FSDP2 / ZeRO-3:
        `alignkit.distributed.shard_reference`). Returns self."""
        if self.model is not None:
            model = self.model.to(device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if disable_dropout:
                turn_off_dropout(model)
            self.model = shard_reference(model, accelerator) if accelerator is not None else model
        return self

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: dict[str, Any],
              score: Callable[[nn.Module, dict[str, Any]], Tensor] | None = None) -> Tensor | None:
        """log pi_ref of `batch`'s completions, without gradient: by default each row's summed completion
        log-probs (rows,) (`completion_logps`; preference batches: chosen rows first); `score(model, batch)` for
        another measure of the reference model (the online loop: per-token log-probs). `policy`: the (unwrapped)
        policy, whose adapter is switched off for "adapter_off". None for "none"; "precomputed": the batch's
        cached values (`ReferenceCollator`), in the rows' order."""
        if self.mode == "none":
            return None
        if self.mode == "precomputed":
            if score is not None:
                raise ValueError("precomputed reference log-probs are per-sequence sums; a per-token score needs "
                                 "reference 'adapter_off' or 'copy'")
            return _cached(batch)
        score = score if score is not None else self._sequence_logps
        if self.mode == "copy":
            return score(self.model, batch)
        with reference_off(policy), embeddings_at_rest(policy):
            return score(policy, batch)

    def _sequence_logps(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return completion_logps(model, batch, self.chunk_size)[0]

    def cached_dataset(self, policy: nn.Module, dataset: Any, collator: Callable, split: str, *, tokenizer: Any = None,
                       batch_size: int = 8, device: torch.device | str = "cpu", paired: bool = True) -> Any:
        """`dataset` with its reference log-probs as columns (`attach_reference`), read from the cache or computed
        and cached (`load_or_compute`), for "precomputed"; any other mode (or no dataset): `dataset` unchanged."""
        if self.mode != "precomputed" or dataset is None:
            return dataset
        tensors, _ = load_or_compute(policy, dataset, collator, self.cache_dir, split, tokenizer=tokenizer,
                                     batch_size=batch_size, device=device, paired=paired, ref_model=self.model,
                                     chunk_size=self.chunk_size)
        return attach_reference(dataset, tensors)

    def collator(self, collator: Callable) -> Callable:
        """The data collator to train with: "precomputed" batches also carry the cached values (`ReferenceCollator`)."""
        return ReferenceCollator(collator) if self.mode == "precomputed" else collator


class HasReference:
    """For a trainer holding its `Reference` as `self.reference`: the names trainers have always exposed."""

    reference: Reference

    @property
    def reference_mode(self) -> str:
        return self.reference.mode

    @property
    def ref_model(self) -> nn.Module | None:
        """The reference model ("copy"; "precomputed": what the cache is computed with), None when the reference
        is the policy's adapter switched off."""
        return self.reference.model


@contextlib.contextmanager
def embeddings_at_rest(policy: nn.Module) -> Iterator[None]:
    """The policy's input-embedding module in eval mode for the block (that module only). NEFTune
    (`neftune_noise_alpha`: transformers' `neftune_post_forward_hook` on that module) adds noise while the module
    is training, so an "adapter_off" reference taken during training was the base model plus fresh noise each call
    (DPO's loss at step 0 was not log 2), while a "copy" reference (eval mode) had none; now neither has any."""
    emb = unwrap_lm(policy).get_input_embeddings()
    was = emb.training
    emb.training = False
    try:
        yield
    finally:
        emb.training = was


def _cached(batch: dict[str, Any]) -> Tensor:
    if "reference_chosen_logps" in batch:  # preference batches: chosen rows, then rejected ones
        return torch.cat([batch["reference_chosen_logps"], batch["reference_rejected_logps"]])
    if "reference_logps" in batch:
        return batch["reference_logps"]
    raise ValueError("the batch has no reference log-probs (reference_chosen_logps / reference_logps): with "
                     "reference='precomputed' the data collator must be wrapped in ReferenceCollator "
                     "(Reference.collator; the trainer does this itself)")


def build_reference(model: nn.Module, mode: str = "auto", *, ref_model: nn.Module | None = None,
                    reference_free: bool = False, cache_dir: str | Path | None = None, chunk_size: int = 1024,
                    supports: Sequence[str] = MODES[1:], make_copy: Callable[[], nn.Module] | None = None,
                    owner: str = "") -> Reference:
    """The `Reference` of policy `model` (before any DDP/FSDP wrapping) for `mode` ("auto" resolves as the module
    says). `ref_model`: the reference model to use; else, when a copy is needed, `make_copy()` (e.g. a model
    loaded from disk) or `frozen_copy(model)`. `supports`: the modes this caller can run (`owner` names it in the
    error). Call `place` on the result to put the copy on the device."""
    if mode not in MODES:
        raise ValueError(f"reference mode {mode!r} is unknown; valid: {list(MODES)}")
    given = mode
    if mode == "auto":
        if reference_free:
            mode = "none"
        elif cache_dir is not None:
            mode = "precomputed"
        else:
            switch_off = can_switch_off(model) and not (kept_when_off(model) and make_copy is not None)
            mode = "adapter_off" if switch_off and ref_model is None else "copy"
    if mode not in supports:
        raise ValueError(f"{owner or 'this trainer'} supports reference {' or '.join(map(repr, supports))}, not "
                         f"{mode!r}")
    if mode == "adapter_off" and not can_switch_off(model):
        others = [repr(m) for m in supports if m in ("copy", "precomputed")]
        raise ValueError("reference='adapter_off' needs an adapter (lora, reft, reft+lora); a fully finetuned model "
                         f"has none: use reference {' or '.join(others)}, or pass ref_model (a frozen reference)")
    if mode == "adapter_off" and (kept := kept_when_off(model)):
        others = [repr(m) for m in supports if m in ("precomputed", "copy")]
        raise ValueError(f"{owner or 'this trainer'}: the reference is the policy with its adapter switched off, and "
                         f"the ReFT adapter trains {', '.join(kept)} whole in place (adapter.reft.modules_to_save), "
                         "which switching off keeps as trained, so the reference would move with the policy; use "
                         f"reference {' or '.join(others)} (or pass ref_model), or adapter.kind reft+lora with "
                         "adapter.lora.modules_to_save (peft keeps the base's copy)")
    refuse_unused_reference_inputs(mode, given, ref_model, cache_dir, owner)
    if mode == "copy" and ref_model is None:
        ref_model = make_copy() if make_copy is not None else frozen_copy(model)
    keep = ref_model if mode in ("copy", "precomputed") else None
    return Reference(mode, keep, chunk_size=chunk_size, cache_dir=cache_dir if mode == "precomputed" else None)


def refuse_unused_reference_inputs(mode: str, given: str, ref_model: nn.Module | None, cache_dir: str | Path | None,
                                   owner: str) -> None:
    """ValueError for a `ref_model` or `cache_dir` the resolved reference `mode` never reads (`given`: the mode asked
    for, "auto" resolved to `mode`): a ref_model beside a reference-free loss, reference 'none' or 'adapter_off' was
    dropped without a word (the run scored no reference, or the policy with its adapter off, not that model)."""
    who = owner or "this trainer"
    why = {"none": "the loss reads no reference (reference-free)" if given == "auto" else "reference='none' scores "
                   "none (TRL's reference_free)",
           "adapter_off": "reference='adapter_off' scores the policy with its adapter switched off"}
    if ref_model is not None and mode in why:
        fix = "leave ref_model out" if given == "auto" else "pass reference='copy' to score with it, or leave it out"
        raise ValueError(f"{who}: ref_model is given, and {why[mode]}, so it would never be used; {fix}")
    if cache_dir is not None and mode != "precomputed":
        raise ValueError(f"{who}: reference_cache_dir is read only with reference='precomputed', and the reference is "
                         f"{mode!r}, so it would be ignored; pass reference='precomputed' or leave it out")


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


def stable_tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's part of keys stored to outlive an alignkit upgrade (the precomputed-reference cache; the
    local-LLM answer cache, `online.digests.model_digest`): the backend JSON (the vocabulary for a slow tokenizer),
    special tokens and chat template, as keyed since the first release, plus `split_special_tokens` only when set
    (True changes the ids of a text quoting a special token; left out at its default so that every key stored before
    stays valid). Not `data.tokenize_cache.tokenizer_fingerprint` (the feature cache's, slow tokenizers' settings
    too): its value changes with its module's source, and here a changed key recomputes a cache that may have cost
    hours (the reference cache's data part keys the token ids anyway)."""
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = {"special": getattr(tokenizer, "special_tokens_map", {}),
             "template": getattr(tokenizer, "chat_template", None)}
    if getattr(tokenizer, "split_special_tokens", False):
        extra["split_special_tokens"] = True
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
             "reference": mode, "tokenizer": stable_tokenizer_fingerprint(tokenizer), "data": data_fingerprint(dataset)}
    return {"key": _sha(parts), "parts": parts}


def _label(model: nn.Module, ref_model: nn.Module | None) -> str:
    """How the reference is obtained: a separate copy, the adapter switched off, or the initial policy."""
    return "copy" if ref_model is not None else ("adapter_off" if can_switch_off(model) else "policy")


def _compute(model: nn.Module, dataset: list, collator: Callable, batch_size: int, device: torch.device,
             paired: bool, ref_model: nn.Module | None, chunk_size: int) -> dict[str, Tensor]:
    # the reference as labelled in the cache key; "policy" (full finetuning before training): the policy itself
    reference = Reference("adapter_off", chunk_size=chunk_size) if _label(model, ref_model) == "adapter_off" else \
        Reference("copy", ref_model if ref_model is not None else model, chunk_size=chunk_size)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for s in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            logps = reference.logps(model, batch).float().cpu()
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


__all__ = ["HasReference", "MODES", "Reference", "ReferenceCollator", "attach_reference", "build_reference",
           "cache_key", "data_fingerprint", "frozen_copy", "load_or_compute", "model_fingerprint",
           "stable_tokenizer_fingerprint"]
