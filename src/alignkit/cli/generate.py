"""`alignkit generate`: responses from a model (+ optional adapter) for a prompts file, written as JSONL.

Prompts come from any records `data.path` holds (their prompts are used: plain prompt files, SFT or
preference data, OASST prompts). Sampling follows the `generation` section (`alignkit.online.SamplingConfig`,
greedy by default). `generation.seed`: sample j of prompt i draws from its own generator, seeded from (seed, i, j)
(`online.generation.row_generators`), so the same data, seed and model give the same samples again whatever
`batch_size` (up to the rounding of batched attention: a draw that falls within float error of a token boundary may
differ). Where the policy samples with model.generate (a ReFT adapter, stop strings, a generation_config.json option
the decode loop lacks) each batch is seeded instead (seed + the index of its first prompt): the same `batch_size`
gives the same samples, another draws other ones (a warning says so). A ReFT adapter intervenes on the prompt
positions it was trained with.
Output: `<output_dir>/generations.jsonl`, one row per sample: id, prompt, response, finish_reason, index;
`generation_metrics.json` (counts, mean response length, finish-reason fractions, tokens/s; with a ReFT adapter
`reft/short_prompts`, the prompts shorter than its positions need, also one warning before generating), TensorBoard
events in `tensorboard/generate/` and `plots/generate-response_length.png` (`runs.write_command_outputs`). Files are
written atomically (a kill leaves the previous file or the complete new one) as one set:
`alignkit_generate_outputs.json` is marked unfinished first and lists every file last, and a command reading
generations.jsonl from an unfinished set refuses it (`run_commit.output_set`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from typing import Any

from tqdm.auto import tqdm

from alignkit.cli.data import read_records
from alignkit.cli.models import check_formats, check_model_settings, load_for_sampling
from alignkit.cli.runfolder import add_config_command, check_rerun, start_run
from alignkit.adapters import reft_settings
from alignkit.interventions.positions import check_prompt_lengths, needed_length
from alignkit.online import generate_responses
from alignkit.online.generation import Sample, encode_prompts, generation_metrics
from alignkit.files import atomic_write_jsonl, atomic_write_text
from alignkit.run_commit import output_set
from alignkit.runs import is_main_process, write_command_outputs
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

OUTPUTS = ["generations.jsonl", "generation_metrics.json"]  # the set's files a reader may take (`output_set`)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "generate", "generations from a model (+ adapter) for a prompts file, as JSONL", run,
                       dry=dry_checks)


def dry_checks(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of `generate`: batch_size, and the model folders as `load_base` checks them."""
    check_batch_size(cfg.batch_size)
    return [check_model_settings(cfg.model)]


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")


def run(cfg: Any, args: argparse.Namespace) -> int:
    rows = generate(cfg, progress=not args.quiet)
    print(f"alignkit generate: {len(rows)} response(s) written to {cfg.output_dir}/generations.jsonl")
    for r in rows[:3]:
        print(f"  {json.dumps(r['prompt'])[:60]} -> {json.dumps(r['response'])[:60]}")
    return 0


def short_reft_prompts(model: Any, tok: Any, records: list, cfg: Any) -> int:
    """How many prompts are shorter than the model's ReFT positions need (0 without a ReFT part), said before
    generating in one warning over every prompt (count, shortest), as training says it for its data set
    (`check_prompt_lengths`): the per-batch warning of generation counted the first short batch alone, once per
    process. Such prompts are generated as training edits them (fewer positions); the count goes to
    generation_metrics.json as `reft/short_prompts`."""
    reft = reft_settings(model)
    if reft is None:
        return 0
    lengths = [len(ids) for ids in encode_prompts(records, tok, cfg.data.formatter, cfg.data.max_prompt_length)]
    check_prompt_lengths(reft.positions, reft.share_weights, lengths, [r.id or i for i, r in enumerate(records)])
    return sum(n < needed_length(reft.positions, reft.share_weights) for n in lengths)


def generate(cfg: Any, progress: bool = True, overwrite: bool = False) -> list[dict[str, Any]]:
    """Generate for `cfg`'s prompts and write them to `cfg.output_dir`; returns the rows. An earlier generate's
    outputs there are refused unless `overwrite` or `cfg.overwrite` (`check_rerun`, as the CLI's --overwrite)."""
    check_rerun(cfg, overwrite)
    check_batch_size(cfg.batch_size)
    records = read_records(cfg.data.path, cfg.data, "prompt", cfg.data.split, "data.path")
    if cfg.data.max_records is not None:
        records = records[:cfg.data.max_records]
    check_formats(cfg.model, (r.prompt for r in records), cfg.data.formatter)
    model, tok, desc = load_for_sampling(cfg.model, cfg.output_dir, cfg.generation, "generation")
    short = short_reft_prompts(model, tok, records, cfg)
    rows: list[dict[str, Any]] = []
    done: list[Sample] = []
    t0 = time.perf_counter()
    step = max(1, cfg.batch_size // cfg.generation.num_samples)  # prompts per call
    for s in tqdm(range(0, len(records), step), desc="generate", unit="batch", disable=not progress):
        sampling = cfg.generation
        if sampling.seed is not None:  # a different, reproducible stream per batch
            sampling = dataclasses.replace(sampling, seed=sampling.seed + s)
        samples = generate_responses(model, tok, records[s:s + step], sampling, batch_size=cfg.batch_size,
                                     formatter=cfg.data.formatter, max_prompt_length=cfg.data.max_prompt_length,
                                     row_seed=cfg.generation.seed, first_prompt=s)
        rows += [{"id": x.prompt_id, "prompt": x.prompt, "response": x.response, "finish_reason": x.finish_reason,
                  "index": x.index} for x in samples]
        done += samples
    seconds = time.perf_counter() - t0
    with output_set(cfg.output_dir, "generate", OUTPUTS, enabled=is_main_process()) as outs:
        run = start_run(cfg, outs)  # after generating: a refused or failed run leaves output_dir as it was
        if run.main:
            outs.add(atomic_write_jsonl(run.root / "generations.jsonl", rows))
            lengths = [len(x.response_ids) for x in done]
            metrics = {"prompts": len(records), "responses": len(rows), **generation_metrics(done),
                       **({"reft/short_prompts": short} if reft_settings(model) is not None else {}),
                       "generation/tokens": sum(lengths), "generation/seconds": seconds,
                       "generation/tokens_per_second": sum(lengths) / max(seconds, 1e-9)}
            outs.add(atomic_write_text(run.root / "generation_metrics.json",
                                       json.dumps({"model": desc, **metrics}, indent=2)))
            for path in write_command_outputs(run.root, "generate", metrics, {"response_length": lengths}):
                outs.add(path)
    if is_main_process():
        logger.info("wrote %d generation(s) from %s to %s", len(rows), desc, run.root / "generations.jsonl")
    return rows


__all__ = ["add_parser", "generate", "run"]
