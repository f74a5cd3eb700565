"""Load a model and its tokenizer from a local folder (or hub id, where a hub is reachable).

Never `trust_remote_code` unless asked. The dtype is what the caller says ("auto" keeps the
checkpoint's), never a silent bfloat16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast,
)

from alignkit.files import read_json_object
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
