"""`alignkit augment`: new training records from existing data (see `alignkit.augment`, `settings/augment.py`).

    alignkit augment --config configs/augment-code-bugs.yaml
    alignkit augment --config configs/augment-paraphrase.yaml llm.base_url=http://127.0.0.1:8000/v1 llm.model=base

Writes <output_dir>/augmented.jsonl (records + `meta` provenance), summary.json (counts, drops by reason,
requests sent, cache hits), config.yaml, TensorBoard events (tensorboard/augment) and a histogram of the written
records' sizes (plots/augment-record_chars.png). The LLM's answers are cached in <output_dir>/cache (or
`llm.cache_dir`): running the same config again sends no request for what it already asked. Running the same
config into the same output_dir is expected (that is how the cache pays off); a folder holding an earlier run of
another config is refused unless --overwrite (`runfolder.check_earlier_outputs`). augmented.jsonl is
replaced atomically, and only by a run that writes records: a run that fails, or keeps no record, leaves the
folder's augmented.jsonl, summary.json and config.yaml as the previous run wrote them. They are one set
(`run_commit.output_set`): alignkit_augment_outputs.json is marked unfinished just before augmented.jsonl is
written and lists every file last, so a run killed between two writes leaves a set a command reading
augmented.jsonl refuses (rerun augment: the cache answers what was paid for).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from alignkit.augment.llm import Cached, LocalChat, OpenAIChat
from alignkit.augment.pipeline import Filters, read_sources
from alignkit.augment.pipeline import augment as run_augment
from alignkit.augment.strategies import check_columns
from alignkit.cli.data import data_path
from alignkit.cli.models import check_model_folder, explaining_load
from alignkit.cli.runfolder import add_config_command, check_rerun
from alignkit.models.tiny import save_tiny
from alignkit.settings.tiny import tiny_arch
from alignkit.files import atomic_write_text, read_jsonl
from alignkit.run_commit import output_set
from alignkit.runs import write_command_outputs
from alignkit.settings import ConfigError, save_config

logger = logging.getLogger(__name__)

OUTPUTS = ["augmented.jsonl", "summary.json", "config.yaml"]  # the set's files a reader may take (`output_set`)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "augment", "augment data: code bugs, paraphrases, self-instruct, summaries, entities",
                       run, dry=dry_checks)


def run(cfg: Any, args: argparse.Namespace) -> int:
    return augment(cfg, progress=not args.quiet)


def dry_checks(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of `augment`, as the run makes them before it writes: each data.path exists and its
    first source (row, function, text) reads and has the columns the strategy's options name (`check_inputs`), and
    the LLM (`check_llm`: a local model folder, the API key's variable set; no request sent, nothing loaded)."""
    paths = [cfg.data.path] if isinstance(cfg.data.path, str) else list(cfg.data.path)
    check_inputs(cfg, read_sources([data_path(p) for p in paths], per_path=1))
    return [f"data.path: {len(paths)} source file(s), the first source of each read and its columns fit strategy "
            f"{cfg.strategy!r}", check_llm(cfg)]


def check_inputs(cfg: Any, sources: list) -> None:
    """The sources' columns against the strategy's options (a wrong options.field), before the output folder."""
    if not sources:
        raise ConfigError(f"data.path: {cfg.data.path} holds no rows")
    try:
        check_columns(sources, cfg.strategy_options())
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_llm(cfg: Any) -> str:
    """What `build_llm` checks before it builds the model: a local model's folder (llm.path), the environment
    variable of the API key (llm.api_key_env). Returns one line saying what was checked."""
    s = cfg.llm
    if s is None:
        return "llm: none (the strategy needs no language model)"
    if s.kind == "local":
        check_model_folder(s.path, "llm.path")
        return f"llm.path {s.path}: a model folder (or a tiny model), loaded when the run starts"
    if s.api_key_env is not None and not os.environ.get(s.api_key_env):
        raise ConfigError(f"llm.api_key_env: the environment variable {s.api_key_env} is not set")
    return f"llm: {s.base_url} (model {s.model}), not contacted by a dry run"


def build_llm(cfg: Any) -> Any:
    """The configured ChatModel (cached unless llm.cache is false), or None."""
    s = cfg.llm
    if s is None:
        return None
    check_llm(cfg)
    if s.kind == "openai":
        key = None if s.api_key_env is None else os.environ[s.api_key_env]
        llm: Any = OpenAIChat(s.base_url, s.model, api_key=key, timeout=s.timeout, retries=s.retries,
                              backoff=s.backoff, requests_per_minute=s.requests_per_minute)
    else:
        path = s.path
        arch = tiny_arch(path, "llm.path")
        if arch is not None:
            path = str(save_tiny(Path(cfg.output_dir) / "llm_model", arch))
        with explaining_load("llm.path", path):  # a folder without weights, a damaged file: one line naming the key
            llm = LocalChat.from_path(path, dtype=s.dtype, name=s.path)
    if s.cache:
        llm = Cached(llm, s.cache_dir or Path(cfg.output_dir) / "cache")
    return llm


def augment(cfg: Any, progress: bool = True, overwrite: bool = False) -> int:
    """Augment `cfg`'s data into `cfg.output_dir` (see the module docstring). An earlier augment's outputs of another
    config there are refused unless `overwrite` or `cfg.overwrite` (`check_rerun`, as the CLI's --overwrite)."""
    check_rerun(cfg, overwrite)
    paths = [cfg.data.path] if isinstance(cfg.data.path, str) else list(cfg.data.path)
    sources = read_sources([data_path(p) for p in paths], cfg.data.max_records)
    check_inputs(cfg, sources)  # a wrong options.field, before the output folder (or a local model in it) is made
    llm = build_llm(cfg)  # a model that does not load stops here, before the output folder (a tiny one is built in it)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = cfg.llm
    kw = {} if s is None else {"max_tokens": s.max_tokens, "temperature": s.temperature, "seed": s.seed,
                               "concurrency": s.concurrency}
    with output_set(out, "augment", OUTPUTS, lazy=True) as outs:  # begun where augmented.jsonl is written
        try:
            result = run_augment(sources, cfg.strategy, cfg.strategy_options(), llm,
                                 Filters(cfg.filters.min_chars, cfg.filters.max_chars, cfg.filters.dedup,
                                         cfg.filters.printable),
                                 out / "augmented.jsonl", progress=progress, before_write=outs.begin, **kw)
        except ValueError as e:  # e.g. an empty seed task (instructions)
            raise ConfigError(str(e)) from None
        outs.add(result.path)
        inner = getattr(llm, "inner", llm)
        summary = {"strategy": cfg.strategy, "sources": len(sources), "candidates": result.candidates,
                   "written": result.written, "dropped": result.dropped, "model": getattr(llm, "name", None),
                   "requests": getattr(inner, "requests", 0), "cache_hits": getattr(llm, "hits", 0),
                   "cache_misses": getattr(llm, "misses", 0)}
        outs.add(atomic_write_text(out / "summary.json", json.dumps(summary, indent=2)))
        outs.add(save_config(cfg, out / "config.yaml"))  # after the records: it describes the augmented.jsonl
        scalars = {**summary, **{f"dropped/{k}": v for k, v in result.dropped.items()}}  # numbers only are written
        chars = [sum(len(json.dumps(v, ensure_ascii=False)) for k, v in row.items() if k != "meta")
                 for row in read_jsonl(result.path)]
        for path in write_command_outputs(out, "augment", scalars, {"record_chars": chars}):
            outs.add(path)
    print(f"alignkit augment: {cfg.strategy}: {result.summary()}; {summary['requests']} request(s), "
          f"{summary['cache_hits']} cache hit(s)\n  wrote {result.path}")
    return 0


__all__ = ["add_parser", "build_llm", "run"]
