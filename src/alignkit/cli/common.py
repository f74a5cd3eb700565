"""What every config-driven command shares: arguments, the config, the model, the data.

Model paths: a folder (or hub id), or `tiny:<arch>` (llama, qwen2, gpt2, gpt_neox): a random tiny model
and tokenizer built by `alignkit.models.tiny`, saved to `<output_dir>/base_model/` and loaded back with
`from_pretrained`, so example configs run anywhere without downloads. Data paths: a file or folder, or
`bundled:<path>` for a file shipped in `alignkit/resources/` (e.g. `bundled:data/hh_rlhf_sample.jsonl`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.adapters.config import ADAPTER_CONFIG_NAME
from alignkit.cli.helptext import add_config_arguments  # noqa: F401 (the command modules import it from here)
from alignkit.runs import RunFolder, is_main_process
from alignkit.data.records import DataError
from alignkit.settings.sections import TINY_PREFIX
from alignkit.settings import ConfigError, DataSettings, ModelSettings, dump_config, load_config, save_config

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
TINY_TMP_PREFIX = "alignkit-tiny-"
# folders this process created itself (mkdtemp): the only ones alignkit ever removes. A user's folder that
# happens to share the prefix is never touched (issue 12, finding 3).
_CREATED: set[str] = set()


def config_from_args(args: argparse.Namespace, command: str) -> Any:
    return load_config(args.config, args.overrides, command=command)


def dry_run(cfg: Any) -> int:
    print(dump_config(cfg), end="")
    return 0


def command_line(args: argparse.Namespace) -> str:
    return "alignkit " + shlex.join(getattr(args, "argv", []))


def start_run(cfg: Any) -> RunFolder:
    """The output folder of `eval` / `generate`, with the resolved config written (main process). Nothing else
    in it is removed (training commands use `plan_run` / `begin_run` instead)."""
    from alignkit.settings import command_of

    run = RunFolder(Path(cfg.output_dir))
    if run.main:
        target = run.config
        if target.is_file():
            import yaml

            try:
                written_for = (yaml.safe_load(target.read_text()) or {}).get("command")
            except (yaml.YAMLError, AttributeError):
                written_for = "?"
            if written_for != command_of(cfg):  # another run's config (e.g. the training run evaluated here)
                target = run.root / f"{command_of(cfg)}.yaml"
                logger.info("%s holds the config of `alignkit %s`; this command's config goes to %s", run.config,
                            written_for, target.name)
        save_config(cfg, target)
    return run


# ----------------------------------------------------------------------------------------------------
# The run folder of a training command: planned (checks only), begun (written), finished (swapped in)
# ----------------------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """Where a training run writes, decided before anything is written.

    mode "new": `final` is absent or empty; "resume": continue `final` from `checkpoint`; "overwrite": `final`
    holds a run and the user asked to replace it: the new run is written to `root` (a staging folder beside
    it, `.<name>.staging`) and renamed over `final` only when it has finished."""

    final: Path
    root: Path
    mode: str
    checkpoint: Path | None = None
    main: bool = field(default_factory=is_main_process)
    existed: bool = False

    def folder(self) -> RunFolder:
        """The run folder to write into (created)."""
        return RunFolder(self.root, main=self.main)

    def named(self) -> RunFolder:
        """The run folder as it will be named when finished (for paths shown to the user); nothing created."""
        return RunFolder(self.final, main=False)


def _listing(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def plan_run(cfg: Any, *, resume: bool = False, overwrite: bool = False, checkpoint: str | None = None,
             can_resume: bool = True) -> RunPlan:
    """Check `output_dir` against the user's intent; writes nothing. `checkpoint`: `train.resume_from_checkpoint`."""
    from alignkit.runs import incomplete_reason, latest_complete_checkpoint

    final = Path(cfg.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in output_dir, "
                          "--overwrite replaces it")
    if (resume or checkpoint is not None) and not can_resume:
        raise ConfigError("--resume: online runs write no checkpoints yet, so they cannot be resumed (not yet "
                          "built); start again with --overwrite or another output_dir")
    if final.exists() and not final.is_dir():
        raise ConfigError(f"output_dir: {final} is a file, not a folder; choose another output_dir")
    existed = final.is_dir()
    holds = existed and any(final.iterdir())
    ckpt: Path | None = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.exists():
            raise ConfigError(f"train.resume_from_checkpoint: {ckpt} does not exist; give a checkpoint folder "
                              f"(e.g. {final / 'checkpoints' / 'checkpoint-10'}) or use --resume for the newest "
                              "complete one")
        reason = incomplete_reason(ckpt)
        if reason is not None:
            raise ConfigError(f"train.resume_from_checkpoint: cannot resume: {reason}; pick a complete checkpoint "
                              "folder, or use --resume for the newest complete one")
    elif resume:
        if not holds:
            raise ConfigError(f"--resume: {final} holds no run to resume; run once without --resume first")
        ckpt = latest_complete_checkpoint(final / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"--resume: no complete checkpoint in {final / 'checkpoints'} (training commands write "
                              "them with train.save_strategy=steps and train.save_steps=N, online commands with "
                              "train.save_steps=N); start again with --overwrite")
        check_resume_config(cfg, final / "config.yaml")
        logger.info("resuming %s from %s", final, ckpt)
    elif holds and not overwrite:
        raise ConfigError(f"output_dir: {final} already holds files ({_listing(final)}); pass --resume to continue "
                          "that run from its newest complete checkpoint, --overwrite to replace it as a whole, or "
                          "choose another output_dir")
    if ckpt is not None:
        return RunPlan(final, final, "resume", ckpt, existed=existed)
    if holds:  # --overwrite
        from alignkit.runs import remove_own

        staging = final.parent / f".{final.name}.staging"
        if is_main_process():
            remove_own(staging)  # a leftover of an interrupted --overwrite (marked as ours), else refused
        return RunPlan(final, staging, "overwrite", existed=True)
    return RunPlan(final, final, "new", existed=existed)


# Settings a resumed run may change: how long it runs and what it logs, evaluates, saves and reports. Anything
# else (model, data, adapter, objective, optimizer, schedule, batch, seed) would be silently ignored (the
# optimizer and scheduler states of the checkpoint restore the old learning rate) or would make a different run
# under the old name, so --resume refuses it.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "max_steps", "steps", "num_train_epochs", "logging_steps", "logging_strategy", "logging_first_step",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size", "save_strategy",
    "save_steps", "save_total_limit", "save_only_model", "report_to", "run_name", "project", "disable_tqdm",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_token", "hub_always_push",
    "hub_revision", "log_level", "resume_from_checkpoint", "torch_empty_cache_steps"})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) and v else f"{prefix}{k}"))
        return out if out or not prefix else {prefix.rstrip("."): value}
    return {prefix.rstrip("."): value}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs; a key absent on one side is None
    there (the default, for `train.*` keys that were not written)."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(cfg: Any, saved: Path) -> None:
    """--resume continues the same training: refuse settings that differ from the run's config.yaml except
    those in RESUMABLE_CHANGES (logged). Nothing is checked when the run folder has no config.yaml."""
    import yaml

    from alignkit.settings.load import dump_config

    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--resume: {saved} is not valid YAML ({e}); it records how the run was trained, so "
                          "restore it or start again with --overwrite") from None
    changes = config_changes(old, yaml.safe_load(dump_config(cfg)))
    allowed = [c for c in changes if c[0].rsplit(".", 1)[-1] in RESUMABLE_CHANGES]
    refused = [c for c in changes if c not in allowed]
    for key, before, after in allowed:
        logger.info("--resume: %s changes from %r to %r", key, before, after)
    if refused:
        shown = "; ".join(f"{k}: {_show(v0)} in the run, {_show(v1)} now" for k, v0, v1 in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise ConfigError(f"--resume: the settings differ from the run's {saved}: {shown}{more}. A resumed run "
                          "continues the same training (the checkpoint's optimizer and scheduler would keep the old "
                          "values); only how long it runs and what it logs, evaluates and saves may change. Use the "
                          "run's settings, or start a new run (another output_dir, model.path=<its model/ or a "
                          "checkpoint>)")


def _show(value: Any) -> str:
    return "(default)" if value is None else repr(value)


def apply_configured_adapter(model: Any, adapter: Any) -> Any:
    """`alignkit.adapters.apply_adapter` for a command: what it refuses (a ReFT layer past the model's depth, a
    bad position spec, LoRA target modules the model lacks, ...) is a config error, so one line naming the
    `adapter` section instead of "unexpected error"; `--debug` still shows the traceback."""
    from alignkit.adapters import apply_adapter

    try:
        return apply_adapter(model, adapter)
    except (ValueError, TypeError, KeyError) as e:
        text = " ".join(str(e).split()).strip("'\"") or type(e).__name__
        raise ConfigError(f"adapter: {text}; fix the adapter section of the config (kind "
                          f"{getattr(adapter, 'kind', '?')!r})") from e


def begin_run(plan: RunPlan, cfg: Any, zero_based_steps: bool = False) -> RunFolder:
    """Create the run folder (main process), write the resolved config atomically, and on resume keep
    metrics.jsonl up to the checkpoint's step (the resumed run appends after them)."""
    from alignkit.runs import STAGING_MARK, truncate_metrics

    run = plan.folder()
    if run.main:
        if plan.mode == "overwrite":
            (run.root / STAGING_MARK).touch()
        tmp = run.config.with_name(run.config.name + ".tmp")
        save_config(cfg, tmp)
        os.replace(tmp, run.config)
        if plan.mode == "resume" and plan.checkpoint is not None:
            from alignkit.runs import checkpoint_step

            step = checkpoint_step(plan.checkpoint)
            if step is not None and zero_based_steps:  # online rows: "step" 0..N-1 are the N steps done
                step -= 1
            if step is not None:
                kept = truncate_metrics(run.metrics, step)
                logger.info("metrics.jsonl: %d row(s) up to step %d kept; the resumed run appends", kept, step)
    return run


def abandon_run(plan: RunPlan) -> None:
    """After a failure before or during the run: remove only the EMPTY folders this run created (os.rmdir never
    removes a file); a staging folder of --overwrite with files in it is kept for inspection (the old run is
    untouched, and the next --overwrite removes it)."""
    if not plan.main or (plan.mode != "overwrite" and plan.existed) or not plan.root.is_dir():
        return
    for sub in sorted(plan.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            try:
                sub.rmdir()
            except OSError:
                pass
    try:
        plan.root.rmdir()
    except OSError:
        if plan.mode == "overwrite":
            logger.warning("the new run failed; %s is untouched, the partial new run is in %s (removed by the next "
                           "--overwrite)", plan.final, plan.root)


def finish_run(plan: RunPlan) -> None:
    """--overwrite: the finished new run replaces the old folder as a whole (two renames)."""
    from alignkit.runs import commit_staging

    if plan.main and plan.mode == "overwrite":
        commit_staging(plan.root, plan.final, marker=False)


# ----------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------

def resolve_model_path(ms: ModelSettings, run: RunFolder | None, task: str) -> tuple[str, str]:
    """(folder or id to load, description for the model card). Builds `tiny:<arch>` models: into
    `<run>/base_model` (main process of a run folder), else into a temporary folder of this process's own
    (`adopt_tiny` moves it into the run folder once that exists)."""
    if not ms.path.startswith(TINY_PREFIX):
        return ms.path, ms.path
    from alignkit.models.tiny import ARCHITECTURES, save_tiny

    arch = ms.path[len(TINY_PREFIX):]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.path: {ms.path!r}: unknown tiny architecture {arch!r}; valid: "
                          + ", ".join(TINY_PREFIX + a for a in ARCHITECTURES))
    # every process builds the same seeded model; only the main one writes into the run folder
    if run is not None and run.main:
        folder = run.root / "base_model"
    else:
        folder = Path(tempfile.mkdtemp(prefix=TINY_TMP_PREFIX))
        _CREATED.add(str(folder))
    save_tiny(folder, arch, classifier=task == "classifier", num_labels=1)
    desc = f"{ms.path} (a random tiny {arch} built by alignkit.models.tiny, saved in base_model/)"
    return str(folder), desc


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name"): absolute, relative with ./ ../ ~, or 2+ separators."""
    return (Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path
            or Path(path).exists())


def check_model_folder(path: str, key: str, adapter: bool = False) -> None:
    """A clear error for a model / adapter path that cannot be what the key says (before anything is loaded)."""
    if path.startswith(TINY_PREFIX) or not _looks_local(path):
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"{key}: {path} does not exist; point it at a folder written by save_pretrained "
                          + ("or a training run's model/ folder" if adapter else "(config.json + weights)"))
    if not folder.is_dir():
        raise ConfigError(f"{key}: {path} is a file; point it at the folder that holds it")
    if adapter:
        known = (ADAPTER_CONFIG_NAME, "adapter_config.json", "reft_config.json", "config.json")
        if not any((folder / n).is_file() for n in known):
            raise ConfigError(f"{key}: {path} holds no adapter or model ({', '.join(known)} missing); point it at a "
                              "training run's model/ folder")
        return
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json, so it is not a saved model folder; point it at the "
                          "folder save_pretrained wrote (or a run's base_model/ or model/)")


def damaged_safetensors(folder: str | Path) -> tuple[Path, str] | None:
    """The first `*.safetensors` file under `folder` that cannot be read whole (truncated, bad header), and why."""
    from safetensors import safe_open

    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    h.get_slice(name)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
            return f, str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def describe_load_error(key: str, path: str | Path, e: BaseException) -> str:
    """One line for a model / adapter that failed to load: which file, what is wrong with it, what to do."""
    text = str(e)
    bad = damaged_safetensors(path)
    if bad is not None:
        return (f"{key}: {bad[0]} cannot be read ({bad[1]}): the file is truncated or damaged; save the model "
                "again (or copy it again from where it came from)")
    if "size mismatch" in text:
        first = next((line.strip() for line in text.splitlines() if "size mismatch" in line), text.splitlines()[0])
        return (f"{key}: {path} was trained on a model of another size than the base model ({first[:320]}); use the "
                "base model it was trained from (its README.md names it)")
    if isinstance(e, UnicodeDecodeError):
        return f"{key}: {path}: a file is not UTF-8 text ({e.reason} at byte {e.start}); it is damaged or not JSON"
    first = text.splitlines()[0] if text else ""
    return f"{key}: cannot load {path}: {type(e).__name__}: {first[:300]}"


class explaining_load:
    """`with explaining_load("model.path", path): load(...)`: any failure becomes one ConfigError line."""

    def __init__(self, key: str, path: str | Path) -> None:
        self.key, self.path = key, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, ConfigError):
            return False
        raise ConfigError(describe_load_error(self.key, self.path, exc)) from exc


def check_adapter_files(folder: Path, key: str) -> None:
    """The weights an adapter folder's config promises are there (and complete, when it carries a marker)."""
    from alignkit.adapters import adapter_in  # imports torch
    from alignkit.runs import COMPLETE_MARKER, incomplete_reason

    if (folder / COMPLETE_MARKER).is_file():
        reason = incomplete_reason(folder)
        if reason is not None:
            raise ConfigError(f"{key}: {reason}; the save did not finish: use a complete model/ folder")
    with explaining_load(key, folder):
        adapter = adapter_in(folder)
    for name, what in adapter.weight_files:
        if not (folder / name).is_file():
            raise ConfigError(f"{key}: {folder} has no {name} ({what}); point it at the complete model/ folder of "
                              "a finished run")


def load_tokenizer_for(ms: ModelSettings, path: str):
    from alignkit.models.loading import load_tokenizer

    return load_tokenizer(ms.tokenizer or path, trust_remote_code=ms.trust_remote_code)


def adopt_tiny(path: str, dest: Path, main: bool = True) -> str:
    """A tiny model built in this process's temporary folder: moved to `dest` (main process, when `dest` does not
    exist yet: a resumed run keeps its own), else removed. Any other path is returned unchanged, never touched."""
    if path not in _CREATED:
        return path
    _CREATED.discard(path)
    if main and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, dest)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return str(dest)


def rename_base(model: Any, old: str, new: str) -> None:
    """After `adopt_tiny` moved the base model: the loaded model's configs (and peft's) name the new folder."""
    if old == new:
        return
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_name_or_path", None) == old:
            cfg._name_or_path = new
        for pc in (getattr(m, "peft_config", None) or {}).values():
            if getattr(pc, "base_model_name_or_path", None) == old:
                pc.base_model_name_or_path = new


def load_base(ms: ModelSettings, run: RunFolder | None, task: str = "causal_lm") -> tuple[Any, Any, str, str]:
    """(model, tokenizer, loaded path, description) for `task` "causal_lm" or "classifier" (1 label).
    `run` None: nothing is written to a run folder (a tiny model stays in a temporary folder for `adopt_tiny`)."""
    from alignkit.models.loading import load_model

    check_model_folder(ms.path, "model.path")
    if ms.tokenizer is not None:
        check_model_folder(ms.tokenizer, "model.tokenizer")
    if ms.adapter_path is not None:
        check_model_folder(ms.adapter_path, "model.adapter_path", adapter=True)
    if ms.kernels is not None:
        from alignkit.models.efficiency import check_kernels

        check_kernels(ms.kernels)  # before anything is built
    path, desc = resolve_model_path(ms, run, task)
    with explaining_load("model.tokenizer" if ms.tokenizer else "model.path", ms.tokenizer or path):
        tok = load_tokenizer_for(ms, path)
    with explaining_load("model.path", path):
        model = load_model(path, task=task, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                           num_labels=1 if task == "classifier" else None, trust_remote_code=ms.trust_remote_code,
                           rope_scaling=ms.rope_scaling)
    if run is not None and path in _CREATED:  # this process's private copy of a tiny model: loaded, so not needed
        path = adopt_tiny(path, run.root / "base_model", main=False)
    if task == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if ms.kernels is not None:
        from alignkit.models.efficiency import apply_kernels

        apply_kernels(model, ms.kernels)
    return model, tok, path, desc


def load_for_inference(ms: ModelSettings, run: RunFolder | None, task: str = "causal_lm") -> tuple[Any, Any, str, str]:
    """(model, tokenizer, base path, description): the base model with `model.adapter_path` applied (an
    adapter folder, or a fully finetuned model's folder)."""
    from alignkit.adapters import adapter_in, load_adapter  # imports torch
    from alignkit.models.loading import load_model

    model, tok, path, desc = load_base(ms, run, task)
    if ms.adapter_path is None:
        return model, tok, path, desc
    folder = Path(ms.adapter_path)
    check_adapter_files(folder, "model.adapter_path")
    with explaining_load("model.adapter_path", folder):
        if adapter_in(folder).saves_whole_model:  # a complete model, not an adapter
            model = load_model(folder, task=task, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                               num_labels=1 if task == "classifier" else None, trust_remote_code=ms.trust_remote_code,
                               rope_scaling=ms.rope_scaling)
            if (folder / "tokenizer_config.json").is_file():
                tok = load_tokenizer_for(ModelSettings(path=str(folder), trust_remote_code=ms.trust_remote_code),
                                         str(folder))
        else:
            model = load_adapter(model, folder, check_base=ms.check_base)
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
    from alignkit.data.readers.rows import looks_like_hub_id

    if not Path(path).exists() and not looks_like_hub_id(path):
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
        n = len(records)
        records, evals = split_records(records, [1 - ds.eval_fraction, ds.eval_fraction], seed=ds.split_seed)
        if not evals or not records:
            raise ConfigError(f"data.eval_fraction: {ds.eval_fraction} of {n} record(s) leaves "
                              f"{'no evaluation' if not evals else 'no training'} record; set it so both parts get "
                              "at least one record, set data.eval_fraction=0 (no evaluation) or give data.eval_path")
    records = drop_degenerate(records, "data.path")
    evals = drop_degenerate(evals, "data.eval_path" if ds.eval_path is not None else "evaluation split")
    logger.info("data: %d training and %d evaluation %s record(s)", len(records), len(evals), kind)
    return records, evals


def drop_degenerate(records: list, where: str) -> list:
    """Policy for preference pairs whose chosen equals rejected (no preference signal: their DPO gradient is 0 and
    they only dilute the mean): dropped with ONE warning giving their count and first ids; if every pair is
    such, an error (the run would train for nothing)."""
    from alignkit.data import PreferenceRecord

    same = [r for r in records if isinstance(r, PreferenceRecord) and r.chosen == r.rejected]
    if not same:
        return records
    ids = ", ".join(r.id or "?" for r in same[:3]) + (", ..." if len(same) > 3 else "")
    if len(same) == len(records):
        raise DataError(f"{where}: chosen == rejected in every one of the {len(records)} pair(s) (e.g. {ids}), so "
                        "there is nothing to prefer; check the columns (chosen / rejected swapped in a join?)")
    logger.warning("%s: dropped %d of %d pair(s) whose chosen == rejected (no preference signal): %s", where,
                   len(same), len(records), ids)
    return [r for r in records if not (isinstance(r, PreferenceRecord) and r.chosen == r.rejected)]


def tokenize_cache_dir() -> Path | None:
    """Where tokenized features are kept between runs: `$ALIGNKIT_CACHE/tokenized` (default
    `~/.cache/alignkit/tokenized`); `ALIGNKIT_CACHE=off` turns the cache off."""
    root = os.environ.get("ALIGNKIT_CACHE", "~/.cache/alignkit")
    return None if root.strip().lower() in ("", "off", "0", "none") else Path(root).expanduser() / "tokenized"


def tokenize(records: list, tokenizer: Any, ds: DataSettings, where: str) -> tuple[list[dict], Any]:
    from alignkit.data import TokenizeConfig, tokenize_records

    cfg = TokenizeConfig(max_length=ds.max_length, max_prompt_length=ds.max_prompt_length, formatter=ds.formatter,
                         add_eos=ds.add_eos, loss_on=ds.loss_on)
    features, stats = tokenize_records(records, tokenizer, cfg, cache_dir=tokenize_cache_dir())
    logger.info("%s: %s", where, stats.summary())
    if records and not features:
        raise ConfigError(f"{where}: every record was dropped ({stats.summary()}); raise data.max_length")
    if features and stats.completion_truncated * 2 > len(features):
        logger.warning("%s: %d of %d record(s) lose the end of their completion to data.max_length=%s (those "
                       "tokens are never trained on); raise data.max_length if that is not intended", where,
                       stats.completion_truncated, len(features), ds.max_length)
    same = [f.get("id") for f in features if "chosen_input_ids" in f
            and list(f["chosen_input_ids"]) == list(f["rejected_input_ids"])]
    if same and len(same) == len(features):
        raise DataError(f"{where}: every one of the {len(same)} pair(s) has chosen == rejected once truncated to "
                        f"data.max_length={ds.max_length} / data.max_prompt_length={ds.max_prompt_length} (e.g. "
                        f"{same[:3]}): nothing is left to prefer; raise data.max_length")
    if same:
        logger.warning("%s: %d of %d pair(s) have chosen == rejected once truncated to data.max_length=%s (no "
                       "preference signal; they only dilute the batch), e.g. %s; raise data.max_length", where,
                       len(same), len(features), ds.max_length, same[:3])
    return features, stats
