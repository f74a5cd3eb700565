"""`alignkit sample` and `alignkit annotate`: one offline round as two jobs, through files.

    alignkit sample   --config configs/sample-tiny.yaml     policy + prompts -> <round>/samples.jsonl
    alignkit annotate --config configs/annotate-tiny.yaml   <round>/samples.jsonl + annotator -> <round>/records.jsonl
    alignkit dpo      --config ... data.path=<round>/records.jsonl        train on the round (or sft / kto)

Both work on one round folder (`output_dir`), the layout of `alignkit.online.rounds`: samples.jsonl
(`Sample.to_dict()` rows), records.jsonl (TRL-style columns + weight/id/meta: `alignkit.data.load_records`
reads it, and so do `alignkit sft | dpo | kto`), manifest.json (sampling settings, annotator, feedback and
the round's metrics). Annotation only reads the folder, so it can run on another machine or device
(`annotator.device`) after copying it. Each job also writes its resolved config there (sample.yaml,
annotate.yaml), TensorBoard events (tensorboard/sample, tensorboard/annotate) and histograms of response lengths,
rewards and record weights (plots/sample-*.png, plots/annotate-*.png). A complete stage is not redone unless
`overwrite: true`.

The feedback mode decides the record kind: best_worst / random_pairs / judge_pairs -> preference pairs (dpo),
pointwise -> desirable/undesirable (kto), best_of_n -> SFT records of the best responses (sft: augmentation
by reward-model filtering, as Open-Assistant does).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from alignkit.cli.models import check_formats, check_model_settings, load_for_sampling
from alignkit.cli.online import check_annotator, make_annotator, read_prompts
from alignkit.cli.runfolder import add_config_command, config_changes, wants_overwrite
from alignkit.online.rounds import (MANIFEST_FILE, RECORDS_FILE, SAMPLES_FILE, annotate_round, check_kept_samples,
                                    read_jsonl, read_manifest, read_samples, sample_round, sampling_settings)
from alignkit.data.records import DataError
from alignkit.online.digests import model_digest
from alignkit.online.generation import Sample
from alignkit.runs import RunFolder, figure, write_command_outputs
from alignkit.settings import ConfigError, dump_config, save_config

logger = logging.getLogger(__name__)

RECORD_COMMAND = {"best_worst": "dpo", "random_pairs": "dpo", "judge_pairs": "dpo", "pointwise": "kto",
                  "best_of_n": "sft"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "sample", "offline round, job 1: the policy's responses to prompts -> samples.jsonl",
                       run_sample, dry=dry_sample)
    add_config_command(sub, "annotate", "offline round, job 2: score samples.jsonl, build records -> records.jsonl "
                                        "(pairs, labels, or best-of-n SFT data)", run_annotate, dry=dry_annotate)


def dry_sample(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of `sample` (after output_dir and data.path): the model folders (`load_base`'s
    checks) and a kept samples stage made with other settings (`check_kept_stage`)."""
    line = check_model_settings(cfg.model)
    check_kept_stage(cfg, Path(cfg.output_dir), "samples", SAMPLES_FILE, "sample.yaml")
    return [line]


def dry_annotate(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of `annotate`: the round folder (`check_round_folder`), a kept annotation stage made
    with other settings, and the annotator (`online.check_annotator`: nothing loaded, no config code imported)."""
    root = Path(cfg.output_dir)
    line = check_round_folder(root)
    check_kept_stage(cfg, root, "annotation", RECORDS_FILE, "annotate.yaml")
    return [line, check_annotator(cfg.annotator, getattr(args, "allow_code", False))]


def check_round_folder(root: Path) -> str:
    """What `annotate` reads first: `root` holds a complete samples.jsonl (with its manifest entry) whose first row
    is a sample. FileNotFoundError / DataError naming the file and the fix; returns one line saying what it is."""
    path = root / SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"output_dir: {root} has no {SAMPLES_FILE}; run `alignkit sample` with "
                                f"output_dir={root} first")
    if "samples" not in read_manifest(root):
        raise FileNotFoundError(f"output_dir: {path} is not complete (no 'samples' entry in {root / MANIFEST_FILE}: "
                                f"the sample job did not finish); run `alignkit sample` with output_dir={root} again")
    with path.open(encoding="utf-8") as f:
        first = next(((n, line) for n, line in enumerate(f, 1) if line.strip()), None)
    if first is None:
        raise DataError(f"{path}: no samples (the file is empty); run `alignkit sample` with output_dir={root} "
                        "and overwrite=true")
    try:
        Sample.from_dict(json.loads(first[1]), where=f"{path}:{first[0]}")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{first[0]}: broken JSON line ({e.msg}); delete the file to redo the stage") from None
    return f"output_dir {root}: a round folder with a complete {SAMPLES_FILE}, its first row a sample"


def run_sample(cfg: Any, args: argparse.Namespace) -> int:
    path = sample(cfg, progress=not args.quiet)
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    print(f"alignkit sample: {n} sample(s) in {path}\n  next: alignkit annotate --config <annotate config> "
          f"output_dir={path.parent}")
    return 0


def run_annotate(cfg: Any, args: argparse.Namespace) -> int:
    path = annotate(cfg, allow_code=args.allow_code, progress=not args.quiet)
    m = json.loads((path.parent / "manifest.json").read_text())["annotation"]["metrics"]
    shown = ", ".join(f"{k} {figure(m[k])}" for k in ("reward/mean", "reward/std") if isinstance(m.get(k), float))
    print(f"alignkit annotate: {int(m.get('records/count', 0))} {cfg.feedback} record(s) in {path}. {shown}\n"
          f"  train on them: alignkit {RECORD_COMMAND[cfg.feedback]} --config <config> data.path={path}")
    return 0


def check_kept_stage(cfg: Any, root: Path, stage: str, file: str, saved: str, overwrite: bool = False) -> None:
    """A complete stage is kept, not redone (resume): refuse when it was made with other settings than `cfg` (its
    `saved` yaml), which would otherwise be rewritten to record settings the kept file was not made with. Nothing to
    check when `overwrite` or `cfg.overwrite` (the stage is redone)."""
    if wants_overwrite(cfg) or overwrite or not (root / file).is_file() or stage not in read_manifest(root) \
            or not (root / saved).is_file():
        return
    try:
        old = yaml.safe_load((root / saved).read_text()) or {}
    except yaml.YAMLError:
        old = {}
    changes = [c for c in config_changes(old, yaml.safe_load(dump_config(cfg)))
               if c[0] not in ("output_dir", "overwrite")]
    if changes:
        shown = "; ".join(f"{k}: {v0!r} then, {v1!r} now" for k, v0, v1 in changes[:4])
        more = f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""
        raise ConfigError(f"output_dir: {root} already holds a complete {file} made with other settings "
                          f"({root / saved}: {shown}{more}); it would be kept as it is, not redone. Pass --overwrite "
                          f"(overwrite=true) to redo it, or choose another output_dir")


def model_sha256(annotator: Any) -> str | None:
    """`online.digests.model_digest` of a model annotator's model and tokenizer (reward model, judge), None for one
    without."""
    model = getattr(annotator, "model", None)
    return model_digest(model, getattr(annotator, "tokenizer", None)) if isinstance(model, torch.nn.Module) else None


def sample(cfg: Any, progress: bool = True, overwrite: bool = False) -> Path:
    """Generate `sampling.num_samples` responses per prompt into `<output_dir>/samples.jsonl` (a progress bar over
    the batches unless `progress` is off: `--quiet`). Returns its path. A complete samples stage there is kept (or
    refused when made with other settings) unless `overwrite` or `cfg.overwrite` (as the CLI's --overwrite)."""
    overwrite = wants_overwrite(cfg) or overwrite
    prompts = read_prompts(cfg.data)  # data errors come before any model is built
    check_formats(cfg.model, (r.prompt for r in prompts), cfg.data.formatter)
    check_kept_stage(cfg, Path(cfg.output_dir), "samples", SAMPLES_FILE, "sample.yaml", overwrite)
    generate = {"formatter": cfg.data.formatter, "max_prompt_length": cfg.data.max_prompt_length,
                "row_seed": cfg.sampling.seed}  # each sample's draws its own: the same whatever batch_size
    # kept samples of other prompts or made with other settings (sample.yaml missing): refused before the model
    check_kept_samples(cfg.output_dir, prompts, overwrite, made_with=sampling_settings(cfg.sampling, **generate))
    model, tok, desc = load_for_sampling(cfg.model, cfg.output_dir, cfg.sampling, "sampling")
    # the policy's weights (adapter included), tokenizer and generation options: a model retrained at the same
    # model.path / adapter folder kept the old model's samples (sample.yaml holds the paths only)
    generate["policy_sha256"] = model_digest(model, tok)
    run = RunFolder(Path(cfg.output_dir))  # after every check: a refused run leaves output_dir as it was
    logger.info("sampling %d prompt(s) x %d from %s", len(prompts), cfg.sampling.num_samples, desc)
    describe = functools.partial(save_config, cfg, run.root / "sample.yaml") if run.main else None
    path = sample_round(model, tok, prompts, run.root, cfg.sampling, batch_size=cfg.batch_size,
                        overwrite=overwrite, before_entry=describe, progress=progress, **generate)
    if describe is not None:  # (again when the stage was kept: the same settings, check_kept_stage)
        describe()  # with the samples it describes, before their manifest entry: a failed or killed run leaves the
        # kept stage's settings (check_kept_stage), never a complete stage with the previous run's
    samples = read_samples(path)
    manifest = json.loads((run.root / MANIFEST_FILE).read_text())["samples"]
    write_command_outputs(run.root, "sample", {"samples": len(samples), **manifest.get("metrics", {})},
                          {"response_length": [len(x.response_ids) for x in samples]})
    return path


def annotate(cfg: Any, allow_code: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Score `<output_dir>/samples.jsonl` (a progress bar over the scoring unless `progress` is off: `--quiet`) and
    write `<output_dir>/records.jsonl`. Returns its path. A complete annotation there is kept (or refused when made
    with other settings) unless `overwrite` or `cfg.overwrite` (as the CLI's --overwrite)."""
    overwrite = wants_overwrite(cfg) or overwrite
    run = RunFolder(Path(cfg.output_dir))
    check_round_folder(run.root)  # before any annotator model is loaded
    check_kept_stage(cfg, run.root, "annotation", RECORDS_FILE, "annotate.yaml", overwrite)
    annotator = make_annotator(cfg.annotator, run, allow_code)
    describe = functools.partial(save_config, cfg, run.root / "annotate.yaml") if run.main else None
    path = annotate_round(run.root, annotator, cfg.feedback, feedback_kwargs=cfg.feedback_kwargs,
                          reweighters=cfg.reweighters, overwrite=overwrite, refuse_empty=True,
                          progress=progress, before_entry=describe, annotator_sha256=model_sha256(annotator))
    if describe is not None:  # with the records it describes (as sample.yaml)
        describe()
    entry = json.loads((run.root / MANIFEST_FILE).read_text())["annotation"]
    write_command_outputs(run.root, "annotate", entry.get("metrics", {}),  # (failed scores are null: not drawn)
                          {"reward": entry.get("scores") or [],
                           "record_weight": [r.get("weight", 1.0) for r in read_jsonl(path)]})
    return path


__all__ = ["RECORD_COMMAND", "add_parser", "annotate", "run_annotate", "run_sample", "sample"]
