"""Load a model and its tokenizer from a local folder (or hub id, where a hub is reachable).

Never `trust_remote_code` unless asked. The dtype is what the caller says ("auto" keeps the
checkpoint's), never a silent bfloat16.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast,
)

from alignkit.files import read_json_object
from alignkit.models.hub_cache import hub_cache_snapshot
from alignkit.models.rope import apply_rope_scaling

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}") from None


def load_tokenizer(path: str | Path, *, padding_side: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer saved at `path`.

    A folder whose tokenizer_config declares a generic fast tokenizer (`TokenizersBackend` or
    `PreTrainedTokenizerFast`) is loaded as exactly that, rather than as the architecture's own class
    (AutoTokenizer would otherwise swap in, e.g., Qwen2's class, which adds tokens of its own).
    """
    cfg_file = Path(path) / "tokenizer_config.json"
    declared = None
    if cfg_file.is_file():
        declared = read_json_object(cfg_file, "re-save the tokenizer with save_pretrained").get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token; set tok.pad_token")
        tok.pad_token = tok.eos_token
        logger.info("tokenizer at %s has no pad token: using eos %r", path, tok.eos_token)
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


def load_model(path: str | Path, *, task: Literal["causal_lm", "classifier"] = "causal_lm",
               dtype: str | torch.dtype | None = "float32", attn_implementation: str | None = None,
               num_labels: int | None = None, trust_remote_code: bool = False,
               rope_scaling: dict | None = None, rope_key: str = "model.rope_scaling"):
    """Load a causal LM (`task="causal_lm"`) or a sequence classifier (`task="classifier"`).

    `rope_scaling` (e.g. `{"type": "linear", "factor": 2.0}`) extends the context: see `alignkit.models.rope`
    (its errors name `rope_key`)."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if rope_scaling is not None:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        kwargs["config"] = apply_rope_scaling(config, rope_scaling, rope_key)
    dt = resolve_dtype(dtype)
    if dt is not None:
        kwargs["dtype"] = dt
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    elif task == "classifier":
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    else:
        raise ValueError(f"unknown task {task!r}; valid: causal_lm, classifier")
    return model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
HASHED_FILE_BYTES = 64 << 20  # smaller files (config, tokenizer, chat template) are hashed whole


def model_files_digest(path: str | Path) -> str | None:
    """SHA-256 of the files a model at `path` is loaded from, without reading its weights: each weight file's
    (`WEIGHT_SUFFIXES`, or over `HASHED_FILE_BYTES`) name, size and modification time (ns), with a safetensors file's
    header (tensor names, dtypes, shapes, offsets, metadata) and, in the Hub cache, the blob it links to (named by
    its content's hash); every other file's bytes (config.json, tokenizer, chat template). A model retrained or
    replaced at the same path gives another digest (its weight files are rewritten: new mtimes) after reading a few
    kB however big it is, where hashing every weight (`augment.llm.answerer_digest`) reads them all; a copy that does
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
