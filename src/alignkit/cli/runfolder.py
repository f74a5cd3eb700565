"""A command's config and its run folder: the config from the arguments (`--dry-run`), and for a training command
the folder planned (checks only: `--resume` / `--overwrite`), begun (config written), finished (swapped in) or
abandoned."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from alignkit.adapters.config import used_parts
from alignkit.cli.data import check_sources, command_record_kind
from alignkit.cli.helptext import OVERWRITE_KEY_COMMANDS, REPLACE_COMMANDS, add_command_parser
from alignkit.models.efficiency import check_model_kernels
from alignkit.run_commit import (
    STAGING_MARK, commit_staging, incomplete_reason, latest_complete_checkpoint, outputs_manifest, recover_swap,
    refuse_foreign, remove_own, resumed_step, truncate_metrics,
)
from alignkit.runs import RunFolder, is_main_process
from alignkit.settings import ConfigError, command_of, dump_config, load_config, save_config
from alignkit.settings.online import check_code_allowed
from alignkit.settings.train import OFFLINE_DEFAULTS, ONLINE_COMMANDS, TRAIN_COMMANDS

logger = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace, command: str) -> Any:
    """The typed config of `command` from --config and the overrides; for a command whose config has the key
    `overwrite` (`OVERWRITE_KEY_COMMANDS`), --overwrite sets it (the flag and the key are one setting)."""
    overrides = list(args.overrides)
    if command in OVERWRITE_KEY_COMMANDS and getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    return load_config(args.config, overrides, command=command)


DryCheck = Callable[[Any, argparse.Namespace], list[str]]


def add_config_command(sub: argparse._SubParsersAction, command: str, text: str,
                       work: Callable[[Any, argparse.Namespace], int], dry: DryCheck | None = None
                       ) -> argparse.ArgumentParser:
    """A config command's parser (`helptext.add_command_parser`: --config, overrides, --dry-run, ...) whose run
    reads the typed config of `command`, answers --dry-run (`dry_run`, with the command's own checks `dry`), and
    otherwise returns `work(cfg, args)`."""
    @functools.wraps(work)  # the command's function still names its module (tests/cli/test_startup.py)
    def run(args: argparse.Namespace) -> int:
        cfg = config_from_args(args, command)
        if args.dry_run:
            if not getattr(args, "allow_code", True):  # --allow-code's name check (imports nothing): a dry run
                check_code_allowed(getattr(cfg, "annotator", None), allow_code=False)  # that passes, runs
            return dry_run(cfg, args, dry)
        check_output_dir(Path(cfg.output_dir))  # every config command writes there: before any work
        check_earlier_outputs(cfg, wants_overwrite(cfg, args))
        return work(cfg, args)

    p = add_command_parser(sub, command, text)
    p.set_defaults(func=run)
    return p


def dry_run(cfg: Any, args: argparse.Namespace | None = None, dry: DryCheck | None = None) -> int:
    """What the run checks before it writes anything, without writing anything, loading a model or importing code the
    config names, in the run's order: the output folder (`check_output_dir`; a training command's `plan_run` as
    --resume / --overwrite / train.resume_from_checkpoint ask, in its dry form), `model.kernels`
    (`check_model_kernels`: package, CUDA, architecture), the data (`alignkit.cli.data.check_sources`: each data path
    exists, can be read, and its first row fits a reader of the command's records), then the command's own checks
    `dry(cfg, args)` (model and adapter folders, annotator, round folder, ...). The first problem is the run's own
    error (one line naming the file or key and the fix). Prints the resolved config, what was checked as YAML
    comments (the output still loads as a config), and a last line saying so."""
    output = check_output(cfg, args)
    if getattr(cfg, "model", None) is not None:  # model.kernels as load_base checks it first (no model is loaded)
        check_model_kernels(cfg.model)
    data, kind = getattr(cfg, "data", None), command_record_kind(command_of(cfg), cfg)
    lines = check_sources(data, kind) if kind is not None and getattr(data, "path", None) is not None else []
    own = command_checks(cfg, args, dry)
    data_text = ("the data (each path exists, can be read, and its first row fits a reader of "
                 f"{kind} records; the records themselves are read when the run starts)")
    print_dry_run(cfg, [output, *own], f" (output folder, {len(lines)} data path(s), {len(own)} of the command's "
                  "own); nothing was written or loaded", data=(data_text, lines))
    return 0


def print_dry_run(cfg: Any, checked: list[str], tail: str, data: tuple[str, list[str]] | None = None) -> None:
    """The report of every `--dry-run` (config commands' `dry_run`, `alignkit serve --dry-run`, `alignkit demo
    --dry-run`, whose `cfg` is a plain dict of what it would run): the config as YAML (it still loads as one), then
    as YAML comments the `data` checks if any (`(what, lines)`: "# --dry-run checked <what>:" and a line each) and
    one `# --dry-run checked <line>` per line of `checked`, and a last line
    `# --dry-run: OK, <N> check(s) passed<tail>`, N counting every line of both."""
    print(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False) if isinstance(cfg, dict)  # `demo`'s plan
          else dump_config(cfg), end="")
    what, lines = data if data is not None else ("", [])
    if lines:
        print(f"# --dry-run checked {what}:")
        print("\n".join(f"#   {line}" for line in lines))
    print("\n".join(f"# --dry-run checked {line}" for line in checked))
    print(f"# --dry-run: OK, {len(lines) + len(checked)} check(s) passed{tail}")


def command_checks(cfg: Any, args: argparse.Namespace | None, dry: DryCheck | None) -> list[str]:
    """The command's own checks in `dry_run` (its `dry`: model / adapter / annotator folders, round folder, ...), one
    line each. One function, so tests/test_docs_commands.py can leave them out for a documented command line whose
    inputs an earlier documented step writes (runs/...), as it leaves out `check_sources` for such data."""
    return dry(cfg, args) if dry is not None else []


def check_output(cfg: Any, args: argparse.Namespace | None) -> str:
    """`dry_run`'s check of `output_dir`, as the run makes it first (nothing written): a training command's
    `plan_run` with the run's --resume / --overwrite, else `check_output_dir`. Returns one line."""
    final = Path(cfg.output_dir)
    if command_of(cfg) not in (*TRAIN_COMMANDS, *ONLINE_COMMANDS):
        check_output_dir(final)
        found = check_earlier_outputs(cfg, wants_overwrite(cfg, args))
        if found:
            return f"output_dir {final}: the earlier outputs there ({', '.join(found)}) are replaced"
        return f"output_dir {final}: " + ("a folder; this command adds its files to it" if final.is_dir() else
                                          "created when the run starts")
    resume, overwrite = bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False))
    train = getattr(cfg, "train", {})
    checkpoint = train.get("resume_from_checkpoint") if command_of(cfg) in TRAIN_COMMANDS else None  # (as the run)
    plan = plan_run(cfg, resume=resume, overwrite=overwrite, checkpoint=checkpoint, dry=True)
    said = {"new": "created when the run starts", "resume": f"continued from {plan.checkpoint}",
            "overwrite": "replaced as a whole when the new run finishes (--overwrite)"}[plan.mode]
    return f"output_dir {final}: {said}"


def command_line(args: argparse.Namespace) -> str:
    return "alignkit " + shlex.join(getattr(args, "argv", []))


def start_run(cfg: Any, outs: Any = None) -> RunFolder:
    """The output folder of `eval` / `generate`, with the resolved config written (main process; added to `outs`,
    the command's `run_commit.output_set`). Nothing else in it is removed (training commands use `plan_run` /
    `begin_run` instead)."""
    run = RunFolder(Path(cfg.output_dir))
    if run.main:
        target = run.config
        if target.is_file():
            try:
                written_for = (yaml.safe_load(target.read_text()) or {}).get("command")
            except (yaml.YAMLError, AttributeError):
                written_for = "?"
            if written_for != command_of(cfg):  # another run's config (e.g. the training run evaluated here)
                target = run.root / f"{command_of(cfg)}.yaml"
                logger.info("%s holds the config of `alignkit %s`; this command's config goes to %s", run.config,
                            written_for, target.name)
        save_config(cfg, target)
        if outs is not None:
            outs.add(target)
    return run


# ----------------------------------------------------------------------------------------------------
# The run folder of a training command: planned (checks only), begun (written), finished (swapped in)
# ----------------------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """Where a training run writes, decided before anything is written.

    mode "new": `final` is absent or empty; "resume": continue `final` from `checkpoint`; "overwrite": `final`
    holds a run and the user asked to replace it: the new run is written to `root` (a staging folder beside
    it, `.<name>.staging`) and renamed over `final` only when it has finished. `checkpoint`: what the run resumes
    from (mode "resume"; or "overwrite" with `train.resume_from_checkpoint` from another run); `label`: what asked
    for it, as refusals name it ("--resume" or "train.resume_from_checkpoint")."""

    final: Path
    root: Path
    mode: str
    checkpoint: Path | None = None
    label: str = "--resume"
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


def check_output_dir(final: Path) -> None:
    """ConfigError when `output_dir` is a file or lies under one: else the command loads its model and data (and
    `eval` / `generate` / `sample` / `annotate` do all their work), then dies making the folder with an unexpected
    FileExistsError / NotADirectoryError."""
    if final.exists() and not final.is_dir():
        raise ConfigError(f"output_dir: {final} is a file, not a folder; choose another output_dir")
    above = next((p for p in final.absolute().parents if p.exists() and not p.is_dir()), None)
    if above is not None:
        raise ConfigError(f"output_dir: {final} lies under {above}, which is a file, not a folder; choose another "
                          "output_dir")


# the files of a command's set (`run_commit.output_set`) that mark an earlier run of it: its manifest, then these
EARLIER_OUTPUTS = {"eval": ("metrics.json",), "generate": ("generations.jsonl", "generation_metrics.json"),
                   "augment": ("augmented.jsonl", "summary.json")}


def wants_overwrite(cfg: Any, args: argparse.Namespace | None = None) -> bool:
    """--overwrite, or the config's key `overwrite` (eval / generate / augment / sample / annotate)."""
    return bool(getattr(args, "overwrite", False)) or bool(getattr(cfg, "overwrite", False))


def check_rerun(cfg: Any, overwrite: bool = False) -> None:
    """The library's form of the CLI's first checks of eval / generate / augment (`evaluate(cfg)`, `generate(cfg)`,
    `augment(cfg)` called from Python): `output_dir` is no file (`check_output_dir`) and holds no earlier outputs of
    the command unless `overwrite` or the config's `overwrite` key (`check_earlier_outputs`). Writes nothing."""
    check_output_dir(Path(cfg.output_dir))
    check_earlier_outputs(cfg, overwrite or wants_overwrite(cfg))


def check_earlier_outputs(cfg: Any, overwrite: bool) -> list[str]:
    """ConfigError when `cfg.output_dir` holds the outputs of an earlier run of the command (eval / generate /
    augment: `REPLACE_COMMANDS`) and `overwrite` (--overwrite) is off: a rerun replaced the earlier results without a
    word (comparing two checkpoints into one folder lost the first's numbers). Another command's files (eval into a
    training run folder) are no earlier outputs; nor is, for `augment`, a set made with the same config (its
    config.yaml: rerunning it is how its LLM cache pays off, and it writes the same records). Returns the files
    found (to be replaced); [] else."""
    final, command = Path(cfg.output_dir), command_of(cfg)
    if command not in REPLACE_COMMANDS or not final.is_dir():
        return []
    names = [outputs_manifest(final, command).name, *EARLIER_OUTPUTS.get(command, ())]
    found = [n for n in names if (final / n).is_file()]
    if not found or overwrite or unfinished_set(final, command) or \
            (command == "augment" and same_config(cfg, final / "config.yaml")):
        return found
    what = (f"the outputs of an earlier `alignkit {command}`" if found[0] == names[0] else  # its manifest: a run's
            f"files `alignkit {command}` writes")  # (generation_report(out_dir=...) writes generations.jsonl too)
    raise ConfigError(f"output_dir: {final} already holds {what} ({', '.join(found)}); pass --overwrite "
                      "(overwrite=true) to replace them, or choose another output_dir")


def unfinished_set(final: Path, command: str) -> bool:
    """Whether the set in `final` is marked unfinished (a run killed between two writes: its readers refuse it and
    name the rerun, which is not refused then)."""
    try:
        m = json.loads(outputs_manifest(final, command).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("complete") is False


def same_config(cfg: Any, saved: Path) -> bool:
    """Whether `saved` (a run's resolved config) holds the settings of `cfg`, `output_dir` and `overwrite` aside."""
    try:
        old = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(old, dict):
        return False
    return not [c for c in config_changes(old, yaml.safe_load(dump_config(cfg)))
                if c[0] not in ("output_dir", "overwrite")]


def named_checkpoint(cfg: Any, checkpoint: str, final: Path, holds: bool, overwrite: bool, label: str) -> Path:
    """`train.resume_from_checkpoint` checked for `plan_run`: it exists and is complete, --overwrite would not remove
    it, it is not mixed into another run's output_dir, and its run's config.yaml (if any) agrees with `cfg`."""
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"train.resume_from_checkpoint: {ckpt} does not exist; give a checkpoint folder "
                          f"(e.g. {final / 'checkpoints' / 'checkpoint-10'}) or use --resume for the newest "
                          "complete one")
    reason = incomplete_reason(ckpt)
    if reason is not None:
        raise ConfigError(f"train.resume_from_checkpoint: cannot resume: {reason}; pick a complete checkpoint "
                          "folder, or use --resume for the newest complete one")
    inside = final.resolve() in ckpt.resolve().parents
    if inside and overwrite:
        raise ConfigError(f"train.resume_from_checkpoint: {ckpt} lies inside output_dir {final}, which --overwrite "
                          "would replace; drop --overwrite to continue that run from it, or choose another "
                          "output_dir")
    if holds and not inside and not overwrite:  # else the resumed run would be mixed into another run's files
        raise ConfigError(f"output_dir: {final} already holds files ({_listing(final)}) and "
                          f"train.resume_from_checkpoint={ckpt} is not one of its checkpoints; pass --overwrite to "
                          "replace it with the resumed run, or choose another output_dir")
    saved = checkpoint_run_config(ckpt)
    if saved is None:
        logger.warning("train.resume_from_checkpoint: %s is not inside a run folder with a config.yaml "
                       "(<run>/checkpoints/checkpoint-N), so the settings only a config.yaml records (model.path, "
                       "data.path, ...) cannot be compared with these; the training settings the checkpoint records "
                       "itself are (a change is refused), and its optimizer state keeps the values it was "
                       "trained with", ckpt)
    else:
        check_resume_config(cfg, saved, label)
    return ckpt


def plan_run(cfg: Any, *, resume: bool = False, overwrite: bool = False, checkpoint: str | None = None,
             can_resume: bool = True, dry: bool = False) -> RunPlan:
    """Check `output_dir` against the user's intent; writes nothing but, unless `dry` (--dry-run: nothing at all),
    the completion of an --overwrite killed between its renames and the removal of its leftover staging folder.
    `checkpoint`: `train.resume_from_checkpoint`."""
    final = Path(cfg.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in output_dir, "
                          "--overwrite replaces it")
    if (resume or checkpoint is not None) and not can_resume:
        raise ConfigError("--resume: online runs write no checkpoints yet, so they cannot be resumed (not yet "
                          "built); start again with --overwrite or another output_dir")
    check_output_dir(final)
    if is_main_process() and not dry:
        recover_swap(final)  # an --overwrite killed between its two renames: completed (or undone) first
    existed = final.is_dir()
    holds = existed and any(final.iterdir())
    ckpt: Path | None = None
    label = "--resume" if checkpoint is None else "train.resume_from_checkpoint"  # what refusals name
    if checkpoint is not None:
        ckpt = named_checkpoint(cfg, checkpoint, final, holds, overwrite, label)
    elif resume:
        if not holds:
            raise ConfigError(f"--resume: {final} holds no run to resume; run once without --resume first")
        ckpt = latest_complete_checkpoint(final / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"--resume: no complete checkpoint in {final / 'checkpoints'} (training commands write "
                              "them with train.save_strategy=steps and train.save_steps=N, online commands with "
                              "train.save_steps=N); start again with --overwrite")
        check_resume_config(cfg, final / "config.yaml", label)
        logger.info("resuming %s from %s", final, ckpt)
    elif holds and not overwrite:
        raise ConfigError(f"output_dir: {final} already holds files ({_listing(final)}); pass --resume to continue "
                          "that run from its newest complete checkpoint, --overwrite to replace it as a whole, or "
                          "choose another output_dir")
    if ckpt is not None and not (holds and overwrite):
        return RunPlan(final, final, "resume", ckpt, label, existed=existed)
    if holds:  # --overwrite (with train.resume_from_checkpoint: another run's checkpoint, resumed into the new run)
        refuse_inputs_inside(cfg, final)
        staging = final.parent / f".{final.name}.staging"
        if is_main_process():  # a leftover of an interrupted --overwrite (marked as ours), else refused
            (refuse_foreign if dry else remove_own)(staging)
        return RunPlan(final, staging, "overwrite", ckpt, label, existed=True)
    return RunPlan(final, final, "new", existed=existed)


def refuse_inputs_inside(cfg: Any, final: Path) -> None:
    """--overwrite replaces `final` as a whole once the new run has finished: a setting naming a file or folder in
    it (model.path=<run>/model to train on from the run's own model, data.path=<run>/generations.jsonl, ...) was
    read by the new run and then deleted with the old folder, so the new run's model card, config.yaml and a LoRA
    adapter's base model (recorded by path) named what no longer existed, or what the new run put there. One
    ConfigError naming the key, before anything is written."""
    inside = final.resolve()
    for key, value in _flatten(yaml.safe_load(dump_config(cfg)) or {}).items():
        for v in value if isinstance(value, list) else [value]:
            if key == "output_dir" or not isinstance(v, str) or not v or not Path(v).exists():
                continue
            p = Path(v).resolve()
            if p == inside or inside in p.parents:
                raise ConfigError(f"{key}: {v} lies inside output_dir {final}, which --overwrite replaces as a whole "
                                  "(deleted once the new run finishes, while the new run's model and config.yaml "
                                  f"name it); copy it out of {final} first, or choose another output_dir")


# Settings a resumed run may change: how long it runs and what it logs, evaluates, saves and reports, and when an
# online run stops without reward signal (method.stall_steps: its stop says "set method.stall_steps=0 to train on
# anyway", and --resume refused that change; the count itself is in the checkpoint, so it spans the resume). Anything
# else (model, data, adapter, objective, optimizer, schedule, batch, seed) would be silently ignored (the
# optimizer and scheduler states of the checkpoint restore the old learning rate) or would make a different run
# under the old name, so --resume refuses it.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "max_steps", "steps", "num_train_epochs", "logging_steps", "logging_strategy", "logging_first_step",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size", "save_strategy",
    "save_steps", "save_total_limit", "save_only_model", "report_to", "run_name", "project", "disable_tqdm",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_token", "hub_always_push",
    "hub_revision", "log_level", "resume_from_checkpoint", "torch_empty_cache_steps", "stall_steps"})


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


def moved_reference(syncs: int) -> str:
    """The model card's record of a run whose reference moved (method.ref_sync)."""
    return (f"{syncs} (method.ref_sync: the reference moved towards the policy during training; alignkit eval "
            "scores against model.path, the initial model, unless method.reference_path names another)")


def checkpoint_run_config(ckpt: Path) -> Path | None:
    """The config.yaml of the run a checkpoint folder belongs to (`<run>/checkpoints/checkpoint-N`), or None."""
    ckpt = ckpt.resolve()
    saved = ckpt.parent.parent / "config.yaml"
    return saved if ckpt.parent.name == "checkpoints" and saved.is_file() else None


def check_resume_config(cfg: Any, saved: Path, label: str = "--resume") -> None:
    """--resume (or train.resume_from_checkpoint, `label`) continues the same training: refuse settings that
    differ from the run's config.yaml except those in RESUMABLE_CHANGES (logged). Nothing is checked when the run
    folder has no config.yaml."""
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: {saved} is not valid YAML ({e}); it records how the run was trained, so "
                          "restore it or start again with --overwrite") from None
    if isinstance(old.get("adapter"), dict):  # a config.yaml from before used_parts: its unused default sections
        old["adapter"] = used_parts(old["adapter"])
    new = yaml.safe_load(dump_config(cfg))
    changes = config_changes(old, new)
    allowed = [c for c in changes if c[0].rsplit(".", 1)[-1] in RESUMABLE_CHANGES]
    refused = [c for c in changes if c not in allowed]
    for key, before, after in allowed:
        logger.info("%s: %s changes from %r to %r", label, key, before, after)
    if not refused:
        warn_schedule_length(new.get("train") or {}, allowed, label, command_of(cfg))
    if refused:
        shown = "; ".join(f"{k}: {_show(v0)} in the run, {_show(v1)} now" for k, v0, v1 in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise ConfigError(f"{label}: the settings differ from the run's {saved}: {shown}{more}. A resumed run "
                          "continues the same training (the checkpoint's optimizer and scheduler would keep the old "
                          "values); only how long it runs and what it logs, evaluates and saves may change. Use the "
                          "run's settings, or start a new run (another output_dir, model.path=<its model/ or a "
                          "checkpoint>)")


def warn_schedule_length(train: dict[str, Any], allowed: list[tuple[str, Any, Any]], label: str, command: str) -> None:
    """A resumed offline run whose length changes (max_steps, num_train_epochs) under a learning-rate schedule that
    depends on it: the Trainer rebuilds the schedule for the new length and takes only the step count from the
    checkpoint, while the first resumed step still uses the rate in the checkpoint's optimizer state; the rates are
    then neither run's schedule (extending a finished linear run: one update at rate 0, then a jump up). Legitimate
    (extending a run), so one warning, not a refusal."""
    if command not in TRAIN_COMMANDS:  # the online loop has no learning-rate schedule
        return
    schedule = train.get("lr_scheduler_type") or OFFLINE_DEFAULTS["lr_scheduler_type"]
    warmup = train.get("warmup_steps") or 0
    if schedule == "constant" or (schedule == "constant_with_warmup" and not 0 < warmup < 1):
        return
    for key, before, after in allowed:
        if key in ("train.max_steps", "train.num_train_epochs"):
            logger.warning("%s: %s changes from %s to %s under train.lr_scheduler_type=%s: the schedule is rebuilt for "
                           "the new length, while the first resumed step still takes the old schedule's next rate, so "
                           "the learning rates follow neither run's schedule; to extend a run smoothly, train with "
                           "lr_scheduler_type constant, or start a new run", label, key, _show(before), _show(after),
                           schedule)
            return


def _show(value: Any) -> str:
    return "(default)" if value is None else repr(value)


def begin_run(plan: RunPlan, cfg: Any, zero_based_steps: bool = False) -> RunFolder:
    """Create the run folder (main process), write the resolved config atomically, and on resume keep
    metrics.jsonl up to the checkpoint's step (the resumed run appends after them)."""
    run = plan.folder()
    if run.main:
        if plan.mode == "overwrite":
            (run.root / STAGING_MARK).touch()
        save_config(cfg, run.config)
        if plan.mode == "resume" and plan.checkpoint is not None:
            step = resumed_step(plan.checkpoint)
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
    if plan.main and plan.mode == "overwrite":
        commit_staging(plan.root, plan.final, marker=False)
