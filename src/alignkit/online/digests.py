"""The digests a run records to tell whether what it depends on changed, in one place: of a model folder's files
(`model_files_digest`: cheap, no weight read), of a model in memory with its tokenizer and generation options
(`model_digest`: every weight byte), and what checkpoints record of an annotator's model (`annotator_model_digest`).
A callable's code is digested by `naming.code_digest` (torch-free, for the data layer too).

Who records what: online checkpoints `annotator_model_digest` (a resume warns of a reward model / judge changed);
`alignkit sample` / `annotate` `model_digest` of the policy / annotator model in their manifests; the LLM cache
(`augment/llm.py`) `model_digest` of a local answering model in each key. The formats are those the same values had
in `models/loading.py` (`model_files_digest`) and `augment/llm.py` (`answerer_digest`), so folders written before
compare equal.

Cost of `model_digest` (every byte), measured on this project's shared 2-core CPU with a 1.007B-parameter model of
Linear weights: 6.0 s in float32 (4 GB), 2.9 s in bfloat16 (sha256 runs at 0.9-1.7 GB/s there; feeding the tensors
in place halved it: `.tobytes()` copied each, 2.5 s -> 1.2 s for 268M float32 parameters), plus the copy from an
accelerator. It is taken once per run or client, never per step. A fixed sample of values was not chosen: a
retrain that changes a few tensors (a score head, an adapter merged into some layers) could keep every sampled
value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.models.hub_cache import hub_cache_snapshot
from alignkit.online.generation import HOW_IT_RUNS, SamplingConfig, model_generation_options, transformers_model
from alignkit.trainers.reference import stable_tokenizer_fingerprint

logger = logging.getLogger(__name__)

# what `annotator_model_digest` puts before the digest of a model given as an object (not a folder's files'): the two
# kinds never compare equal, and a resume says it cannot compare them rather than warn of a change
WEIGHTS_PREFIX = "weights:"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
HASHED_FILE_BYTES = 64 << 20  # smaller files (config, tokenizer, chat template) are hashed whole


def model_files_digest(path: str | Path) -> str | None:
    """SHA-256 of the files a model at `path` is loaded from, without reading its weights: each weight file's
    (`WEIGHT_SUFFIXES`, or over `HASHED_FILE_BYTES`) name, size and modification time (ns), with a safetensors file's
    header (tensor names, dtypes, shapes, offsets, metadata) and, in the Hub cache, the blob it links to (named by
    its content's hash); every other file's bytes (config.json, tokenizer, chat template). A model retrained or
    replaced at the same path gives another digest (its weight files are rewritten: new mtimes) after reading a few
    kB however big it is, where hashing every weight (`model_digest`) reads them all; a copy that does
    not keep mtimes gives another too (a false alarm, never a missed rewrite). Top-level files only, as
    `from_pretrained` reads them; a Hub name: its snapshot in the local cache. None when there is no such folder."""
    folder = Path(path) if Path(path).is_dir() else None
    if folder is None:
        snapshot = hub_cache_snapshot(str(path))
        folder = Path(snapshot) if snapshot else None
    if folder is None:
        return None
    h = hashlib.sha256()
    for p in sorted(q for q in folder.iterdir() if q.is_file()):
        stat = p.stat()
        h.update(f"{p.name}|{stat.st_size}|".encode())
        if p.suffix in WEIGHT_SUFFIXES or stat.st_size > HASHED_FILE_BYTES:
            h.update(f"{stat.st_mtime_ns}|{os.path.basename(os.path.realpath(p))}|".encode())
            if p.suffix == ".safetensors":
                with p.open("rb") as f:
                    head = f.read(8)
                    size = int.from_bytes(head, "little") if len(head) == 8 else 0
                    h.update(head + f.read(min(size, 100 << 20)))
        else:
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def model_digest(model: Any, tokenizer: Any) -> str:
    """SHA-256 of what shapes a local model's answers (or scores) besides the request: every weight (adapters
    included: name, dtype, shape, bytes), the tokenizer (vocabulary, special tokens, chat template,
    split_special_tokens: `stable_tokenizer_fingerprint`) and the options model.generate applies from the model's
    generation config, sampled or greedy (`model_generation_options`: no_repeat_ngram_size, min_new_tokens, ...; the
    sampling ones LocalChat pins are not among them; a classifier has none). Not the options of how it runs
    (`HOW_IT_RUNS`: cache_implementation, compile_config, ...), which do not change the answers: changing one
    refused a kept round and missed the cache."""
    started = time.monotonic()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the bytes in place: .tobytes() copied them
    generates = getattr(transformers_model(model), "generation_config", None) is not None  # not a classifier's
    options = {repr(o) for cfg in (SamplingConfig(), SamplingConfig(do_sample=False)) if generates
               for o in model_generation_options(model, tokenizer, cfg) if o[0] not in HOW_IT_RUNS}
    h.update(json.dumps([stable_tokenizer_fingerprint(tokenizer), sorted(options)]).encode())
    logger.info("digest of the model's weights, tokenizer and generation options: %.1f s",
                time.monotonic() - started)
    return h.hexdigest()


def annotator_model_digest(annotator: Any) -> str | None:
    """What checkpoints record of an annotator's model: its `model_files` (the digest of the folders it was loaded
    from, taken when loaded) or, for a model object given in Python (no folder), `WEIGHTS_PREFIX` + `model_digest`
    of its weights, tokenizer and generation options, computed once per annotator (kept in its
    `weights_digest`); None for an annotator without a model."""
    files = getattr(annotator, "model_files", None)
    if files is not None:
        return files
    model = getattr(annotator, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    if getattr(annotator, "weights_digest", None) is None:
        annotator.weights_digest = WEIGHTS_PREFIX + model_digest(model, getattr(annotator, "tokenizer", None))
    return annotator.weights_digest
