"""Compatibility: what `online.digests.model_files_digest` reads of a model folder instead of its weights (row M19
of docs/architecture.md's table)."""

from __future__ import annotations

import json
import os

from alignkit.online.digests import model_files_digest

from .guards import check, guard

TF = "transformers"


# M19 -----------------------------------------------------------------------------------------------------

def test_save_pretrained_rewrites_its_weight_file_which_opens_with_its_header(tiny_lm, tmp_path):
    """`model_files_digest` tells a model retrained or replaced in its folder by the weight file's size and
    modification time and the safetensors header (8 bytes of little-endian length, then JSON: each tensor's dtype,
    shape and data_offsets), never reading the weights: transformers' `save_pretrained` into the same folder must
    rewrite model.safetensors (a new mtime even for the same weights), and the file must open with that header."""
    where = "alignkit/online/digests.py:model_files_digest"
    model = tiny_lm("llama")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with guard("safetensors", "a safetensors file no longer opens with its 8-byte length and JSON header", where):
        raw = weights.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    named = set(model.state_dict()) - {"lm_head.weight"}  # tied to embed_tokens in the tiny llama: saved once
    check(named <= set(tensors) and all({"dtype", "shape", "data_offsets"} <= set(v) for v in tensors.values()),
          "safetensors", "the header no longer names each tensor with dtype, shape and data_offsets", where,
          f"header keys {sorted(tensors)[:5]}..., state_dict {sorted(named)[:5]}...")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10_000_000_000))  # saved 10 s earlier
    first = model_files_digest(tmp_path)
    model.save_pretrained(tmp_path)  # the same weights saved again (a retrain that changed nothing visible)
    check(weights.stat().st_mtime_ns > stat.st_mtime_ns - 10_000_000_000, TF,
          "save_pretrained into an existing folder no longer rewrites model.safetensors", where)
    check(model_files_digest(tmp_path) != first, TF, "a model saved again into its folder keeps its files digest",
          where)
