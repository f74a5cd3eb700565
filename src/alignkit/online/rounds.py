"""Offline rounds: sample -> annotate -> write a dataset -> train with an offline trainer, round after round.

Each stage reads and writes files, so annotation can run as a separate job (another machine, another GPU):

    round-000/
      samples.jsonl    one `Sample.to_dict()` per line                         (sample_round)
      records.jsonl    training records as TRL-style columns + weight/margin/   (annotate_round)
                       label/id/meta: `alignkit.data.load_records(path)` reads them back
      manifest.json    {"round", "samples": {sampling, generate settings, prompts sha256, count, metrics},
                        "annotation": {annotator, feedback, reweighters, counts, score stats, metrics}}

Crash safety: every file is written to a temporary name in the same folder, flushed, fsynced and renamed over the target
(`os.replace` is atomic), data file first, manifest entry last. A stage is complete when its data file AND its manifest
entry exist; a complete stage is not redone (resume), an incomplete one is redone from scratch (`overwrite=True` forces
it). Complete samples made from other prompts or with other sampling settings (`sampling_settings`: every
`SamplingConfig` key, formatter, max_prompt_length, row_seed...) are refused (`check_kept_samples`), naming the key. A
complete annotation made by another annotator, feedback or reweighters than the call's is refused
(`check_kept_annotation`), not kept. New samples first remove the annotation made from the old ones (its manifest entry
and records.jsonl), so the round is annotated again rather than kept as complete. A stage redone (overwrite) drops its
own manifest entry before its file is replaced: a kill between the two writes leaves it incomplete (redone next time),
never the new file under the old entry.

Metrics per round (in the manifest and returned): reward/mean, reward/std, reward/min, reward/max,
reward/valid, reward/failed, generation/response_length, generation/finish_*, the annotator's own
(e.g. judge/parse_failures), records/count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from alignkit.data import load_records
from alignkit.data.records import DataError, Record
from alignkit.files import atomic_write_jsonl, atomic_write_text, read_json_object, read_jsonl
from alignkit.online.annotators import Annotator, Scores, build_annotator
from alignkit.online.feedback import FEEDBACK_MODES, build_records
from alignkit.online.generation import (Sample, SamplingConfig, as_prompt_records, generate_responses,
                                       generation_metrics, prompts_fingerprint)
from alignkit.online.metrics import ProcessMetrics, moment_stats, recompute_rates
from alignkit.online.reweighting import build_reweighter, reweight
from alignkit.runs import figure
from alignkit.settings.online import check_feedback

logger = logging.getLogger(__name__)

SAMPLES_FILE, RECORDS_FILE, MANIFEST_FILE = "samples.jsonl", "records.jsonl", "manifest.json"


# ---------------------------------------------------------------------------------------------- files

def read_manifest(round_dir: str | Path) -> dict[str, Any]:
    path = Path(round_dir) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        return read_json_object(path, "delete it to redo the round")
    except ValueError as e:  # the callers stop on a DataError (bad data: the run's own files)
        raise DataError(str(e)) from None


def _update_manifest(round_dir: Path, key: str, entry: dict[str, Any]) -> None:
    manifest = read_manifest(round_dir)
    manifest[key] = entry
    atomic_write_text(round_dir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _complete(round_dir: Path, key: str, file: str) -> bool:
    return (round_dir / file).is_file() and key in read_manifest(round_dir)


def _forget(round_dir: Path, *keys: str) -> None:
    """Drop the manifest entries `keys` before their stage's data file is replaced: the file is written first and
    its entry last, so a kill between the two left the new file under the old entry, complete to the next run (kept
    as made with the old settings, or refused as made with other ones). Without its entry the stage is redone."""
    manifest = read_manifest(round_dir)
    if any(k in manifest for k in keys):
        for k in keys:
            manifest.pop(k, None)
        atomic_write_text(round_dir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _forget_annotation(round_dir: Path) -> None:
    """Before new samples are written: drop the samples' and the annotation's manifest entries (`_forget`) and
    records.jsonl, made from the samples being replaced. Otherwise they stayed marked complete and `annotate` kept
    records of responses no longer in samples.jsonl (exit 0)."""
    _forget(round_dir, "samples", "annotation")
    if (round_dir / RECORDS_FILE).is_file():
        (round_dir / RECORDS_FILE).unlink()
        logger.warning("%s: removed %s, made from the samples this run replaces; annotate the round again",
                       round_dir, RECORDS_FILE)


def record_to_row(r: Record) -> dict[str, Any]:
    """A record as the columns `alignkit.data` readers recognise (plus id and meta)."""
    row: dict[str, Any] = {"prompt": r.prompt}
    if r.kind == "sft":
        row["completion"] = r.completion
    elif r.kind == "unpaired":
        row.update(completion=r.completion, label=r.label)
    elif r.kind == "preference":
        row.update(chosen=r.chosen, rejected=r.rejected, margin=r.margin)
    else:
        raise DataError(f"{r.id or 'record'}: rounds write sft, unpaired or preference records, not {r.kind!r}")
    row.update(weight=r.weight, id=r.id, meta=r.meta)
    return row


def read_samples(path: str | Path) -> list[Sample]:
    return [Sample.from_dict(d, where=f"{path}:{i + 1}") for i, d in enumerate(read_jsonl(path, "delete the file to "
                                                                                                "redo the stage"))]


def round_dir(out_dir: str | Path, round_index: int) -> Path:
    return Path(out_dir) / f"round-{round_index:03d}"


# ---------------------------------------------------------------------------------------------- stages

GENERATE_DEFAULTS = {"formatter": "auto", "max_prompt_length": None, "positions": None, "share_weights": True,
                     "intervene_on_generated": False, "lean": None, "row_seed": None}  # generate_responses' own


def sampling_settings(cfg: SamplingConfig, policy_sha256: str | None = None,
                      **generate_kwargs: Any) -> dict[str, Any]:
    """What a round's samples were drawn with besides the prompts, as its manifest entry records them: "sampling"
    (every `SamplingConfig` key), "generate" (the `generate_responses` options that shape the responses or their
    draws: `GENERATE_DEFAULTS`' keys; batch_size and progress do not) and, when given, "policy" (`policy_sha256`:
    the sampling model's digest, e.g. `online.digests.model_digest`, which `alignkit sample` passes)."""
    made = {"sampling": cfg.to_dict(), "generate": {k: generate_kwargs.get(k, v) for k, v in GENERATE_DEFAULTS.items()}}
    if policy_sha256 is not None:
        made["policy"] = {"sha256": policy_sha256}
    return json.loads(json.dumps(made, sort_keys=True, default=str))  # as the manifest stores it


def _sampled_otherwise(kept: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """"key: old then, new now" for each setting of `now` (`sampling_settings`) the kept entry recorded otherwise;
    a key it lacks (an older manifest) is not compared."""
    what = {"policy": " (the model's weights, tokenizer or generation options)"}
    return [f"{part}.{k}{what.get(part, '')}: {json.dumps(old)} then, {json.dumps(now[part][k])} now"
            for part in now for k, old in (kept.get(part) or {}).items()
            if k in now[part] and old != now[part][k]]


def check_kept_samples(folder: str | Path, prompts: Sequence[Any], overwrite: bool = False,
                       made_from: dict[str, Any] | None = None, made_with: dict[str, Any] | None = None,
                       redo: str | None = None) -> bool:
    """True when `folder` holds a complete samples.jsonl that `sample_round` would keep (resume), False when it
    would sample; a kept one sampled from other prompts than `prompts`, or with other settings than `made_with`
    (`sampling_settings`; None: not compared) is a DataError. No model needed: the `alignkit sample` command calls
    it before loading one (`made_from`: the prompts' fingerprint, if computed). A kept round sampled with another
    seed, temperature, max_new_tokens, sampler, formatter... was kept silently: only the prompts were compared.
    `redo`: how the caller does the round again, named in the refusal (default: overwrite=true, or another
    output_dir; `run_offline_rounds`, which takes neither, names its folder and out_dir)."""
    folder = Path(folder)
    redo = redo or "Pass overwrite=true to sample again, or choose another output_dir"
    if overwrite or not _complete(folder, "samples", SAMPLES_FILE):
        return False
    made_from = made_from or prompts_fingerprint(as_prompt_records(prompts))
    kept = read_manifest(folder)["samples"]
    if kept.get("prompts_sha256", made_from["sha256"]) != made_from["sha256"]:  # older manifests: not compared
        raise DataError(f"{folder / SAMPLES_FILE}: complete, and sampled from other prompts ({kept.get('prompts')} "
                        f"then, {made_from['count']} now, or the same number changed): it would be kept as it is, "
                        f"not redone. {redo}")
    differ = _sampled_otherwise(kept, made_with or {})
    if differ:
        raise DataError(f"{folder / SAMPLES_FILE}: complete, and sampled with other settings ({'; '.join(differ)}): "
                        f"it would be kept as it is, not redone. Pass the settings it was made with. {redo}")
    return True


def sample_round(model: Any, tokenizer: Any, prompts: Sequence[Any], folder: str | Path, cfg: SamplingConfig, *,
                 batch_size: int = 8, overwrite: bool = False, before_entry: Callable[[], Any] | None = None,
                 policy_sha256: str | None = None, redo: str | None = None, **generate_kwargs: Any) -> Path:
    """Generate responses for `prompts` into `folder/samples.jsonl` (skipped when complete, and refused when
    complete but made from other prompts or settings: `check_kept_samples`). Returns its path.

    `before_entry`: called after the file is written and before its manifest entry (what completes the stage), to
    write what describes it (the CLI's sample.yaml), so a kill never leaves a complete stage with the old one.
    `generate_kwargs` go to `generate_responses` (positions, share_weights, formatter, max_prompt_length).
    `policy_sha256`: the model's digest, recorded and compared (None: neither; a rounds loop trains the model
    between rounds, so a trained round's samples were drawn by an earlier one). `redo`: `check_kept_samples`'."""
    folder = Path(folder)
    path = folder / SAMPLES_FILE
    made_from = prompts_fingerprint(as_prompt_records(prompts))
    made_with = sampling_settings(cfg, policy_sha256, **generate_kwargs)
    if check_kept_samples(folder, prompts, overwrite, made_from, made_with, redo):
        logger.info("%s: complete, not sampled again", path)
        return path
    samples = generate_responses(model, tokenizer, prompts, cfg, batch_size=batch_size, **generate_kwargs)
    _forget_annotation(folder)
    atomic_write_jsonl(path, (s.to_dict() for s in samples))
    if before_entry is not None:
        before_entry()
    _update_manifest(folder, "samples", {"file": SAMPLES_FILE, "count": len(samples), "prompts": len(prompts),
                                         "prompts_sha256": made_from["sha256"], **made_with,
                                         "metrics": generation_metrics(samples)})
    return path


def score_stats(scores: Scores) -> dict[str, float]:
    v = scores.values[scores.valid].to(torch.float64)  # (n_valid,)
    n = v.numel()
    return {"reward/mean": float(v.mean()) if n else math.nan,
            "reward/std": float(v.std(unbiased=False)) if n else math.nan,
            "reward/min": float(v.min()) if n else math.nan, "reward/max": float(v.max()) if n else math.nan,
            "reward/valid": float(n), "reward/failed": float(scores.failed.sum())}


def _same_settings(key: str, kept: Any, now: Any) -> bool:
    if key == "annotator" and isinstance(kept, dict) and isinstance(now, dict):
        return all(k in now and now[k] == v for k, v in kept.items())  # a key only `now` has: an older entry
    return kept == now


def check_kept_annotation(folder: str | Path, made_by: dict[str, Any], redo: str | None = None) -> None:
    """A complete annotation is kept, not redone (resume): a DataError when its manifest entry says it was made by
    another annotator, feedback, feedback_kwargs or reweighters than `made_by` (these keys, as `annotate_round`
    records them). It was kept whatever annotator was passed, and its records silently stood for the new one's.
    Entries without a key (older manifests) are not compared on it, nor annotator descriptions without one of
    today's keys (a function annotator's kwargs and default_score, recorded since): every key they have must match.
    `redo`: how the caller annotates again, named in the refusal (default: overwrite=True)."""
    kept = read_manifest(folder).get("annotation", {})
    now = json.loads(json.dumps(made_by, sort_keys=True, default=str))  # as the manifest stores it
    differ = [k for k, v in now.items() if k in kept and not _same_settings(k, kept[k], v)]
    if differ:
        shown = "; ".join(f"{k}: {json.dumps(kept[k], sort_keys=True)} then, {json.dumps(now[k], sort_keys=True)} "
                          "now" for k in differ)
        raise DataError(f"{Path(folder) / RECORDS_FILE}: complete, and annotated with other settings ({shown}): it "
                        "would be kept as it is, not redone. Pass the settings it was made with. "
                        f"{redo or 'Pass overwrite=True to annotate the round again with these'}")


ANNOTATE_CHUNK = 64  # samples per annotator call in `annotate_round` (one step of its progress bar)


def merge_scores(parts: Sequence[Scores]) -> Scores:
    """The `Scores` of consecutive chunks of items as one: values, failures and metas concatenated; counts
    (`ProcessMetrics.SUMMED_METRICS`) summed and rates (`RATE_METRICS`) recomputed from them, `rewards/<fn>/mean`
    and `/std` from the summed moments (`Scores.moments`), any other metric averaged weighted by the chunks' items."""
    if len(parts) == 1:
        return parts[0]
    sizes = [len(p) for p in parts]
    metrics: dict[str, float] = {}
    for key in dict.fromkeys(k for p in parts for k in p.metrics):
        got = [(p.metrics[key], n) for p, n in zip(parts, sizes) if key in p.metrics]
        metrics[key] = (sum(v for v, _ in got) if key in ProcessMetrics.SUMMED_METRICS
                        else sum(v * n for v, n in got) / max(sum(n for _, n in got), 1))
    recompute_rates(metrics, ProcessMetrics.RATE_METRICS)
    moments = {k: tuple(map(sum, zip(*(p.moments[k] for p in parts if k in p.moments))))
               for k in dict.fromkeys(k for p in parts for k in p.moments)}
    metrics.update(moment_stats(moments))
    return Scores(torch.cat([p.values for p in parts]), torch.cat([p.failed for p in parts]),
                  [m for p in parts for m in p.meta], metrics, moments)


def annotate_samples(annotator: Annotator, samples: Sequence[Sample], progress: bool = False) -> Scores:
    """The annotator's pointwise scores of `samples`, `ANNOTATE_CHUNK` at a time (a tqdm bar over them unless
    `progress` is off), merged (`merge_scores`)."""
    parts = []
    with tqdm(total=len(samples), desc="annotate", unit="sample", disable=not progress) as bar:
        for i in range(0, len(samples), ANNOTATE_CHUNK):
            chunk = samples[i:i + ANNOTATE_CHUNK]
            parts.append(annotator.annotate([s.prompt for s in chunk], [s.response for s in chunk],
                                            [s.meta for s in chunk]))
            bar.update(len(chunk))
    return merge_scores(parts)


def annotate_round(folder: str | Path, annotator: Annotator | dict[str, Any], feedback: str = "best_worst", *,
                   feedback_kwargs: dict[str, Any] | None = None, reweighters: Sequence[Any] = (),
                   overwrite: bool = False, refuse_empty: bool = False, progress: bool = False,
                   before_entry: Callable[[], Any] | None = None, annotator_sha256: str | None = None,
                   redo: str | None = None) -> Path:
    """Score `folder/samples.jsonl`, build records by `feedback` (see `feedback.FEEDBACK_MODES`), reweight them,
    write `folder/records.jsonl` (skipped when complete). Returns its path. A round no record passes writes an empty
    file (a rounds loop skips it); `refuse_empty=True` (the `alignkit annotate` command) raises `DataError` instead,
    before anything is written. `progress`: a bar over the scoring (`annotate_samples`). `before_entry`: as
    `sample_round`'s (the CLI's annotate.yaml). `annotator_sha256`: the annotator model's digest, recorded and
    compared (`alignkit annotate` passes it: a reward model retrained at the same path kept the old one's records).
    `redo`: `check_kept_annotation`'s."""
    folder = Path(folder)
    path = folder / RECORDS_FILE
    annotator = build_annotator(annotator)
    reweighters = [build_reweighter(r) for r in reweighters]
    if feedback in FEEDBACK_MODES:  # (another name: build_records' own error) before the samples are scored
        check_feedback(feedback, feedback_kwargs or {}, reweighters)
    made_by = {"annotator": annotator.describe(), "feedback": feedback, "feedback_kwargs": feedback_kwargs or {},
               "reweighters": [r.describe() for r in reweighters]}
    if annotator_sha256 is not None:
        made_by["annotator_model_sha256"] = annotator_sha256
    if not overwrite and _complete(folder, "annotation", RECORDS_FILE):
        check_kept_annotation(folder, made_by, redo)
        logger.info("%s: complete, not annotated again", path)
        return path
    if not _complete(folder, "samples", SAMPLES_FILE):
        raise FileNotFoundError(f"{folder}: no complete {SAMPLES_FILE} (with its manifest entry); run sample_round "
                                f"first")
    samples = read_samples(folder / SAMPLES_FILE)
    scores = None
    metrics: dict[str, float] = dict(generation_metrics(samples))
    if feedback != "judge_pairs":
        scores = annotate_samples(annotator, samples, progress)
        metrics.update(score_stats(scores))
        metrics.update(scores.metrics)
    records = build_records(feedback, samples, scores, annotator, **(feedback_kwargs or {}))
    if records and reweighters:
        records = reweight(records, reweighters)
    metrics["records/count"] = float(len(records))
    if refuse_empty and not records:
        raise DataError(f"{folder / SAMPLES_FILE}: no {feedback} record passed from its {len(samples)} scored "
                        f"sample(s) (feedback_kwargs: {feedback_kwargs or {}}); no {RECORDS_FILE} was written. Loosen "
                        f"feedback_kwargs (e.g. a lower min_margin) or sample more responses per prompt")
    _forget(folder, "annotation")
    atomic_write_jsonl(path, (record_to_row(r) for r in records))
    if before_entry is not None:
        before_entry()
    _update_manifest(folder, "annotation", {
        "file": RECORDS_FILE, **made_by, "kinds": sorted({r.kind for r in records}), "metrics": metrics,
        "scores": None if scores is None else [None if math.isnan(x) else x for x in scores.values.tolist()]})
    logger.info("%s: %d record(s) from %d sample(s); %s", path, len(records), len(samples),
                ", ".join(f"{k} {figure(v)}" for k, v in metrics.items() if k.startswith("reward/")))
    return path


def train_round(records_path: str | Path, trainer_factory: Callable[[list[Record], int], Any],
                round_index: int = 0) -> Any:
    """Read the round's records back with `alignkit.data.load_records` and train on them:
    `trainer = trainer_factory(records, round_index); trainer.train()`. Returns what `train()` returns."""
    records = load_records(str(records_path))
    if not records:
        logger.warning("%s: no records (no usable feedback this round); skipping training", records_path)
        return None
    trainer = trainer_factory(records, round_index)
    return trainer.train()


def round_seed(seed: int | None, round_index: int) -> int | None:
    """Round `round_index`'s sampling seed: the base `seed` itself for round 0 (a round sampled alone with
    `sample_round` and that seed draws the same), a hash of (seed, round) after it. A function of the base seed and
    the round index only, so round k draws the same however the rounds were split across calls (resumed); not
    `seed + k`, which gave round 1 of seed 5 round 0 of seed 6's draws (two "independent" runs sharing samples)."""
    if seed is None or round_index == 0:
        return seed
    digest = hashlib.sha256(f"alignkit-round:{int(seed)}:{int(round_index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2 ** 31


def kept_round_seed(folder: str | Path, seed: int | None, round_index: int) -> int | None:
    """The seed `run_offline_rounds` samples round `round_index` in `folder` with: `round_seed(seed, k)`, or
    `seed + k` when the round's kept samples record that (runs started before round_seed: they resume, trained
    rounds included, instead of being refused for a seed they never chose)."""
    derived = round_seed(seed, round_index)
    if seed is None or round_index == 0:
        return derived
    kept = (read_manifest(folder).get("samples") or {}).get("sampling") or {}
    if kept.get("seed") == seed + round_index != derived:
        return seed + round_index
    return derived


def run_offline_rounds(model: Any, tokenizer: Any, prompts: Sequence[Any], out_dir: str | Path, *, num_rounds: int,
                       sampling: SamplingConfig, annotator: Annotator | dict[str, Any], feedback: str = "best_worst",
                       trainer_factory: Callable[[list[Record], int], Any] | None = None,
                       feedback_kwargs: dict[str, Any] | None = None, reweighters: Sequence[Any] = (),
                       batch_size: int = 8, **generate_kwargs: Any) -> list[dict[str, Any]]:
    """`num_rounds` of sample -> annotate -> train (resumable: complete stages are skipped). The sampling seed
    of round k is `round_seed(sampling.seed, k)` (when set): round k draws the same whether the rounds ran in one
    call or several (a resume); a kept round sampled with `seed + k` (runs before round_seed) keeps that seed
    (`kept_round_seed`). A kept round made otherwise is refused, naming its folder to delete. The trainer factory
    should keep training `model` in place (so the next round samples from the updated policy) and save it: a
    resumed run skips rounds marked "trained" in their manifest, so load the latest trained
    weights into `model` before resuming. Returns each round's manifest."""
    annotator = build_annotator(annotator)
    manifests = []
    seeds = [kept_round_seed(round_dir(out_dir, k), sampling.seed, k) for k in range(num_rounds)]
    old = [k for k, s in enumerate(seeds) if s != round_seed(sampling.seed, k)]
    if old:
        logger.warning("%s: round(s) %s were sampled with seed + round (the older seeding): they continue with it; "
                       "rounds not sampled yet use round_seed", out_dir, old)
    for k in range(num_rounds):
        folder = round_dir(out_dir, k)
        cfg = replace(sampling, seed=seeds[k])
        redo = f"Delete {folder} to do this round again, or choose another out_dir"
        sample_round(model, tokenizer, prompts, folder, cfg, batch_size=batch_size, redo=redo, **generate_kwargs)
        records_path = annotate_round(folder, annotator, feedback, feedback_kwargs=feedback_kwargs,
                                      reweighters=reweighters, redo=redo)
        manifest = read_manifest(folder)
        if trainer_factory is not None and "trained" not in manifest:
            train_round(records_path, trainer_factory, k)
            _update_manifest(folder, "trained", True)
        manifests.append(read_manifest(folder))
    return manifests


__all__ = ["SAMPLES_FILE", "RECORDS_FILE", "MANIFEST_FILE", "atomic_write_text", "atomic_write_jsonl", "read_jsonl",
           "check_kept_annotation", "check_kept_samples", "read_manifest", "record_to_row", "read_samples",
           "round_dir", "round_seed", "kept_round_seed", "sampling_settings", "GENERATE_DEFAULTS",
           "sample_round", "score_stats", "annotate_samples", "merge_scores", "annotate_round",
           "train_round", "run_offline_rounds"]
