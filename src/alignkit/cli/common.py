"""What every config-driven command shares: arguments, the config, the model, the data.

Model paths: a folder (or hub id), or `tiny:<arch>` (llama, qwen2, gpt2, gpt_neox): a random tiny model
and tokenizer built by `alignkit.models.tiny`, saved to `<output_dir>/base_model/` and loaded back with
`from_pretrained`, so example configs run anywhere without downloads. Data paths: a file or folder, or
`bundled:<path>` for a file shipped in `alignkit/resources/` (e.g. `bundled:data/hh_rlhf_sample.jsonl`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alignkit.runs import RunFolder
from alignkit.settings import ConfigError, DataSettings, ModelSettings, dump_config, load_config, save_config

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
BUNDLED_PREFIX = "bundled:"
TINY_TMP_PREFIX = "alignkit-tiny-"
# folders this process created itself (mkdtemp): the only ones alignkit ever removes. A user's folder that
# happens to share the prefix is never touched (issue 12, finding 3).
_CREATED: set[str] = set()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed as YAML scalars, e.g. method.beta=0.05 train.learning_rate=1e-4")


def config_from_args(args: argparse.Namespace, command: str) -> Any:
    return load_config(args.config, args.overrides, command=command)


def dry_run(cfg: Any) -> int:
    print(dump_config(cfg), end="")
    return 0


def command_line(args: argparse.Namespace) -> str:
    return "alignkit " + shlex.join(getattr(args, "argv", []))


def start_run(cfg: Any) -> RunFolder:
    """The run folder, with the resolved config written (main process) and stale metrics removed."""
    run = RunFolder(Path(cfg.output_dir))
    if run.main:
        save_config(cfg, run.config)
        if run.metrics.exists():
            run.metrics.unlink()
    return run


# ----------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------

def resolve_model_path(ms: ModelSettings, run: RunFolder, task: str) -> tuple[str, str]:
    """(folder or id to load, description for the model card). Builds `tiny:<arch>` models."""
    if not ms.path.startswith(TINY_PREFIX):
        return ms.path, ms.path
    from alignkit.models.tiny import ARCHITECTURES, save_tiny

    arch = ms.path[len(TINY_PREFIX):]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.path: {ms.path!r}: unknown tiny architecture {arch!r}; valid: "
                          + ", ".join(TINY_PREFIX + a for a in ARCHITECTURES))
    # every process builds the same seeded model; only the main one writes into the run folder
    if run.main:
        folder = run.root / "base_model"
    else:
        folder = Path(tempfile.mkdtemp(prefix=TINY_TMP_PREFIX))
        _CREATED.add(str(folder))
    save_tiny(folder, arch, classifier=task == "classifier", num_labels=1)
    desc = f"{ms.path} (a random tiny {arch} built by alignkit.models.tiny, saved in base_model/)"
    return str(folder), desc


def load_tokenizer_for(ms: ModelSettings, path: str):
    from alignkit.models.loading import load_tokenizer

    return load_tokenizer(ms.tokenizer or path, trust_remote_code=ms.trust_remote_code)


def load_base(ms: ModelSettings, run: RunFolder, task: str = "causal_lm") -> tuple[Any, Any, str, str]:
    """(model, tokenizer, loaded path, description) for `task` "causal_lm" or "classifier" (1 label)."""
    from alignkit.models.loading import load_model

    path, desc = resolve_model_path(ms, run, task)
    tok = load_tokenizer_for(ms, path)
    model = load_model(path, task=task, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                       num_labels=1 if task == "classifier" else None, trust_remote_code=ms.trust_remote_code,
                       rope_scaling=ms.rope_scaling)
    if path in _CREATED:  # this process's private copy of a tiny model: loaded, so not needed
        shutil.rmtree(path, ignore_errors=True)
        _CREATED.discard(path)
        path = str(run.root / "base_model")
    if task == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, path, desc


def load_for_inference(ms: ModelSettings, run: RunFolder, task: str = "causal_lm") -> tuple[Any, Any, str, str]:
    """(model, tokenizer, base path, description): the base model with `model.adapter_path` applied (an
    adapter folder, or a fully finetuned model's folder)."""
    from alignkit.models.adapters import load_adapter, read_adapter_config
    from alignkit.models.loading import load_model

    model, tok, path, desc = load_base(ms, run, task)
    if ms.adapter_path is None:
        return model, tok, path, desc
    folder = Path(ms.adapter_path)
    if read_adapter_config(folder).kind == "full":
        model = load_model(folder, task=task, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                           num_labels=1 if task == "classifier" else None, trust_remote_code=ms.trust_remote_code,
                           rope_scaling=ms.rope_scaling)
        if (folder / "tokenizer_config.json").is_file():
            tok = load_tokenizer_for(ModelSettings(path=str(folder), trust_remote_code=ms.trust_remote_code), str(folder))
    else:
        model = load_adapter(model, folder)
    return model, tok, path, f"{desc} + {folder}"


def to_device(model: Any) -> Any:
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

def data_path(path: str) -> str:
    if path.startswith(BUNDLED_PREFIX):
        from importlib.resources import files

        resolved = Path(str(files("alignkit") / "resources" / path[len(BUNDLED_PREFIX):]))
        if not resolved.exists():
            raise ConfigError(f"{path}: no such bundled file (looked in {resolved})")
        return str(resolved)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such data file or folder (relative paths are from the current directory)")
    return path


def _paths(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def read_records(paths: str | list[str] | None, ds: DataSettings, kind: str, split: str | None, where: str) -> list:
    from alignkit.data import load_records

    records: list = []
    for p in _paths(paths):
        records += load_records(data_path(p), kind, reader=ds.reader, on_invalid=ds.on_invalid, split=split,
                                **ds.reader_options)
    if paths is not None and not records:
        raise ConfigError(f"{where}: {paths} holds no {kind} records")
    return records


def load_data(ds: DataSettings, kind: str) -> tuple[list, list]:
    """(train records, eval records) of `kind`; eval from `data.eval_path` or an `eval_fraction` split."""
    from alignkit.data import split_records

    records = read_records(ds.path, ds, kind, ds.split, "data.path")
    if ds.max_records is not None:
        records = records[:ds.max_records]
    evals = read_records(ds.eval_path, ds, kind, ds.eval_split or ds.split, "data.eval_path")
    if ds.eval_path is None and ds.eval_fraction > 0:
        if not 0 < ds.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in (0, 1), got {ds.eval_fraction}")
        records, evals = split_records(records, [1 - ds.eval_fraction, ds.eval_fraction], seed=ds.split_seed)
    logger.info("data: %d training and %d evaluation %s record(s)", len(records), len(evals), kind)
    return records, evals


def tokenize(records: list, tokenizer: Any, ds: DataSettings, where: str) -> tuple[list[dict], Any]:
    from alignkit.data import TokenizeConfig, tokenize_records

    cfg = TokenizeConfig(max_length=ds.max_length, max_prompt_length=ds.max_prompt_length, formatter=ds.formatter,
                         add_eos=ds.add_eos, loss_on=ds.loss_on)
    features, stats = tokenize_records(records, tokenizer, cfg)
    logger.info("%s: %s", where, stats.summary())
    if records and not features:
        raise ConfigError(f"{where}: every record was dropped ({stats.summary()}); raise data.max_length")
    return features, stats
