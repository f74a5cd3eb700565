"""An adapted model folded into a plain transformers model folder (`merge_adapter`).

    merge_adapter(model, "merged/", tokenizer)   # LoRA / DoRA: peft's merge_and_unload on a copy; full: as it is
    AutoModelForCausalLM.from_pretrained("merged/")   # the adapted model's logits, no adapter files, no peft

Only an adapter whose effect is a change of the model's own weights can be merged (`Adapter.merges`: LoRA, and a
fully finetuned model, saved as it is). A ReFT (alone or with LoRA) edits hidden states at chosen positions while the
model runs, which no weight holds: refused in one line before anything is written. The model given is left as it
was (the merge runs on a copy: the model's size again in memory for that moment). The folder is written under a
staging name and renamed when complete; an `out_dir` that exists and is not an empty folder is refused.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from alignkit.adapters.base import adapter_of, unwrap_parallel

logger = logging.getLogger(__name__)


def merge_adapter(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Save `model` (adapted) as one transformers model folder `out_dir` holding the adapter folded into its weights
    (and `tokenizer`'s files when given). ValueError in one line for an adapter that cannot be merged (ReFT) or an
    `out_dir` already holding files. Returns `out_dir`."""
    adapter, out = adapter_of(model), Path(out_dir)
    if not adapter.merges:
        raise ValueError(f"merge_adapter: a {adapter.kind} adapter cannot be merged into the model's weights (its ReFT "
                         "interventions edit hidden states at chosen positions while the model runs, which no weight "
                         "holds); save it as an adapter folder (save_adapter) and load it with load_adapter or serve "
                         "it with `alignkit serve`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"merge_adapter: {out} already exists and is not an empty folder; choose a new out_dir "
                         "(nothing there is replaced)")
    base = unwrap_parallel(model)
    merged = base if adapter.saves_whole_model else copy.deepcopy(base).merge_and_unload()
    staging = out.parent / f".{out.name}.merging"
    if staging.exists():  # a merge killed before its rename: our own staging folder
        shutil.rmtree(staging)
    try:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("merged the %s adapter into %s", adapter.kind, out)
    return out


__all__ = ["merge_adapter"]
