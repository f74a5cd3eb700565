"""The on-disk cache of tokenized features (`tokenize_records(..., cache_dir=)`): keys and entries.

An entry is two files under the cache folder, named by `cache_key`: `<key>.jsonl` (one feature dict per line) and
`<key>.json` (the run's `TokenizeStats` as JSON, written last: an entry without it is never read). The key hashes
every input the features depend on: the source of the modules that decide them (`FEATURE_MODULES`: the encoding,
the built-in formatters and the suffix / BOS probes, the records, the stats stored beside the features, and
this module, which reads entries back), every registered formatter's code
(`formatters_fingerprint`: one the user registers lives elsewhere), the tokenizer (`tokenizer_fingerprint`),
the tokenize config, and the records. A damaged entry (cut short, unreadable) is tokenized again, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

from alignkit.data.chat import FORMATTERS
from alignkit.naming import code_digest, stable_repr

logger = logging.getLogger(__name__)

# the modules whose source decides the features (and how an entry is read back): a cache never outlives a change
FEATURE_MODULES = ("alignkit.data.tokenize", "alignkit.data.chat", "alignkit.data.records",
                   "alignkit.data.tokenize_stats", __name__)


def sha(*parts: Any) -> str:
    """sha256 of `parts` (bytes as they are, anything else as its UTF-8 str), each followed by a NUL."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What the token ids depend on: the vocabulary/merges/normalizer (the backend's full JSON for a fast
    tokenizer, whose post-processor holds add_bos_token / add_eos_token: transformers' setters rewrite it; else
    `slow_tokenizer_state`), special tokens, the chat template, and `split_special_tokens` (a wrapper setting the JSON
    does not hold: True encodes "<|im_start|>" in a text as ordinary pieces, not as the token; compat K12). Not
    padding_side / truncation_side: they pad or cut a call's output and our encodings use neither. Its twin
    `trainers.reference.stable_tokenizer_fingerprint` keys the caches meant to outlive an alignkit upgrade (reference
    log-probs, local-LLM answers); this key is renewed with this module's source anyway (`FEATURE_MODULES`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = (backend.to_str() if backend is not None and hasattr(backend, "to_str")
            else slow_tokenizer_state(tokenizer))
    specials = getattr(tokenizer, "special_tokens_map", {})
    return sha(type(tokenizer).__name__, body, sorted(specials.items()), getattr(tokenizer, "chat_template", None),
               tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None),
               bool(getattr(tokenizer, "split_special_tokens", False)))


def slow_tokenizer_state(tokenizer: Any) -> list:
    """What a tokenizer without a Rust backend encodes by (transformers 5's `PythonBackend` / `SentencePieceBackend`
    classes: byt5, bert_japanese, marian, siglip, gpt_sw3, ...): its vocabulary and added tokens, its class's source,
    the sentencepiece model (normalizer rules included) and every plain setting it keeps, also one object down
    (`special_tokens_pattern`, `basic_tokenizer.do_lower_case`, ...), changed after loading or not. File paths and
    name_or_path are left out: the same tokenizer read from another folder hits."""
    sp = getattr(tokenizer, "sp_model", None)
    proto = sp.serialized_model_proto() if hasattr(sp, "serialized_model_proto") else None
    added = sorted((i, repr(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    module = sys.modules.get(type(tokenizer).__module__)
    path = getattr(module, "__file__", None)
    source = Path(path).read_bytes() if path and Path(path).is_file() else b""
    return [sorted(tokenizer.get_vocab().items()), added, sha(source), proto and sha(proto), _settings(tokenizer, 1)]


def _settings(obj: Any, depth: int) -> list:
    out: list = []
    for k, v in sorted(vars(obj).items()):
        if k == "name_or_path" or k.endswith("_file"):
            continue
        if v is None or isinstance(v, (str, int, float, bool)):
            out.append((k, v))
        elif isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(i, (str, int, float, bool)) for i in v):
            out.append((k, stable_repr(v)))  # e.g. BasicTokenizer.never_split: a set that changes the ids
        elif depth and hasattr(v, "__dict__") and not callable(v) and not isinstance(v, (type, types.ModuleType)):
            out.append((k, type(v).__name__, _settings(v, depth - 1)))
    return out


def code_fingerprint(modules: tuple[str, ...] = FEATURE_MODULES) -> str:
    """The source of `modules` (default `FEATURE_MODULES`), hashed."""
    return sha(*(Path(importlib.import_module(m).__file__).read_bytes() for m in modules))


def function_fingerprint(fn: Any) -> str:
    """What a function's output depends on in code: its module and name, `naming.code_digest` (its source or compiled
    code, nested functions too, its default arguments and closure values; a partial's function and arguments), and
    the source of its module's file when it has one, hashed. A function of a module with a file is digested by
    version 1 (no module-level names): the file's bytes hold its helpers and constants already, and version 2's walk
    (the source of every helper and class it reads, 20-200x slower: 0.1-0.3 s a run for the built-in formatters)
    added nothing there; the key is the one alignkit gave before version 2. One without a file (exec'd) or another
    callable (a partial, an object) keeps version 2: its helpers are in no hashed file."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")  # (a function made by exec has no file)
    path = getattr(module, "__file__", None)
    source = Path(path).read_bytes() if path and Path(path).is_file() else b""
    in_file = bool(source) and isinstance(fn, types.FunctionType) and fn.__globals__ is vars(module)
    return sha(getattr(fn, "__module__", None), getattr(fn, "__qualname__", type(fn).__qualname__), source,
               code_digest(fn, 1) if in_file else code_digest(fn))


def formatters_fingerprint() -> str:
    """Every registered formatter (`alignkit.data.register_formatter`), by name and code: one registered by the user
    (or registered again under a built-in name) lives outside `FEATURE_MODULES`, and before, an edit to it, or another
    function under its name, hit the features the old one had made."""
    return sha(*(f"{name}={function_fingerprint(fn)}" for name, fn in sorted(FORMATTERS.items())))


def cache_key(records: list, tokenizer: Any, cfg: Any) -> str:
    """Key of the features of `records` under `tokenizer` and `cfg` (a TokenizeConfig): every input they depend on,
    hashed (not `max_dropped_fraction`: a threshold checked on the result, it does not change the features)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "max_dropped_fraction"}
    return sha(code_fingerprint(), formatters_fingerprint(), tokenizer_fingerprint(tokenizer), sorted(settings.items()),
               len(records), *(repr(r) for r in records))


def read_cache(folder: Path, key: str, stats_of: Callable[[dict], Any]) -> tuple[list[dict], Any] | None:
    """The features and stats (`stats_of(summary)`) of entry `key` in `folder`; None when there is none, or when it
    is damaged (a warning: it is tokenized again)."""
    feats, meta = folder / f"{key}.jsonl", folder / f"{key}.json"
    if not (feats.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        with feats.open(encoding="utf-8") as f:
            out = [json.loads(line) for line in f]
        if len(out) != info["kept"]:
            raise ValueError(f"{len(out)} features for {info['kept']} kept records")
        return out, stats_of(info)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged entry is recomputed, never trusted
        logger.warning("tokenization cache %s: unreadable (%s); tokenizing again", feats, e)
        return None


def write_cache(folder: Path, key: str, feats: list[dict], summary: dict) -> None:
    """Features then their summary (the stats as JSON), each through a temp file named by the process, renamed into
    place (the summary last: an entry without it is never read). Not `files.atomic_write`: no fsync (a lost or damaged
    entry is tokenized again, and fsync made a 20k-row write ~5% slower); concurrent processes write their own temp
    files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in ((f"{key}.jsonl", "".join(json.dumps(x) + "\n" for x in feats)),
                           (f"{key}.json", json.dumps(summary))):
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, folder / name)
    except (OSError, TypeError, ValueError) as e:  # a feature that is not JSON (e.g. a custom meta): no cache
        logger.info("tokenization cache not written (%s)", e)


__all__ = ["FEATURE_MODULES", "cache_key", "code_fingerprint", "formatters_fingerprint", "function_fingerprint",
           "read_cache", "sha", "slow_tokenizer_state", "tokenizer_fingerprint", "write_cache"]
