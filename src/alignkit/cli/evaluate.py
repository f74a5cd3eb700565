"""`alignkit eval`: score a trained model on preference pairs; writes `metrics.json` in the run folder, TensorBoard
events in `tensorboard/eval/` and a histogram per per-pair value in `plots/eval-*.png` (`runs.write_command_outputs`).

method.kind = "reward": a reward model (`model.path` a 1-label classifier, `model.adapter_path` its
    adapter): accuracy = fraction of pairs with r(chosen) > r(rejected), mean scores and margin
    (`alignkit.trainers.evaluation.evaluate_reward_model`); `ties` counts the pairs scored exactly equal (not right,
    as TRL counts them; a warning gives their number). Ranked records (Open-Assistant trees, ranked columns)
    are scored as their pairs (every two replies of different rank: `alignkit.data.records.ranked_to_pairs`), so
    `pairs` counts those, and also as rankings: `prompts` (records with at least one ordered pair), the mean per
    prompt of `kendall_tau` (Kendall's tau-a of the scores against the ranks, tied ranks no pair) and of
    `exact_match` (1 when every ordered pair of the prompt is scored in order: the whole ranking reproduced).
method.kind = "dpo": a policy (`model.adapter_path`, an adapter or a fully finetuned folder) against its
    reference (the adapter switched off, or `method.reference_path` / `model.path` for a full model):
    implicit rewards r = beta * (log pi(y|x) - log pi_ref(y|x)); accuracy = mean[r_w > r_l], margin =
    mean[r_w - r_l], and the DPO (sigmoid) loss, with TRL's metric names. Without `model.adapter_path` the
    reference must be named (`method.reference_path`): the model as its own reference is refused before anything
    is written (every reward would be 0). beta (`method.beta`) is the one the policy was trained with when its
    run folder says (`training_beta`: the policy folder is `<run>/model` or a checkpoint of a dpo, kto or
    online-dpo run, whose config.yaml records method.beta); a `method.beta` other than that one is refused (the
    rewards, margins and loss would be on another scale than training logged them); with no run folder, 0.1
    (DPO's default), with a warning. metrics.json records the beta used. A run trained with another loss_type than
    sigmoid is warned of: `loss` here is the sigmoid loss, not the one it logged.

Pairs cut to identical tokens: a pair whose chosen and rejected differ only past `data.max_length` /
`data.max_prompt_length` has the same tokens on both sides once cut, so it scores a tie and a zero margin whatever
the model. It is left out of every figure (`pairs` does not count it), counted in `cut_identical` (metrics.json
and the printed table) and warned of once; when every pair is so cut, eval refuses in one line naming the data
and the limits (raise data.max_length), before anything is written.

Record weights: every figure above is unweighted (each pair, or ranked prompt, counts once). When a record has a
weight other than 1, each also comes weighted, `weighted/<name>` = sum_i w_i v_i / sum_i w_i over the pairs (a
ranked record's weight on each of its pairs, as training gives it) or ranked prompts, beside the unweighted one
(`alignkit.trainers.evaluation.weighted_means`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from alignkit.adapters import adapter_in, reft_settings
from alignkit.cli.data import check_cut_identical, native_kinds, read_records, tokenize
from alignkit.cli.models import (adopt_tiny, check_adapter_files, check_formats, check_head, check_model_folder,
                                 check_model_settings,
                                 head_folder, load_for_inference, rename_base, to_device)
from alignkit.cli.runfolder import add_config_command, check_rerun, checkpoint_run_config, start_run
from alignkit.data import PreferenceCollator, RankedCollator
from alignkit.data.records import convert, ranked_to_pairs
from alignkit.interventions.positions import check_truncated_prompts
from alignkit.losses import PreferenceParams, preference_loss
from alignkit.models.loading import load_model
from alignkit.files import atomic_write_text
from alignkit.run_commit import output_set
from alignkit.runs import figure, is_main_process, write_command_outputs
from alignkit.settings import ConfigError
from alignkit.trainers.evaluation import evaluate_reward_model, weighted_means
from alignkit.trainers.logps import completion_logps
from alignkit.trainers.pairs import pair_batch
from alignkit.trainers.reference import build_reference

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "eval", "reward-model accuracy, or DPO implicit-reward accuracy, on preference data", run,
                       dry=dry_checks)


def dry_checks(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of `eval`, as `evaluate` makes them before loading: the model folders, the reference
    (`check_reference`) and the heads that score (`check_heads`)."""
    line = check_model_settings(cfg.model)
    check_reference(cfg)
    check_heads(cfg)
    resolve_beta(cfg)
    warn_moved_reference(cfg)
    return [line, "the reference and the scoring heads (method.reference_path, model.path's head), method.beta"]


def run(cfg: Any, args: argparse.Namespace) -> int:
    metrics = evaluate(cfg, progress=not args.quiet)
    print(f"alignkit eval ({cfg.method.kind}) on {cfg.data.path}:")
    for k, v in metrics.items():
        print(f"  {k:<22} {figure(v)}" if isinstance(v, float) else f"  {k:<22} {v}")
    return 0


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="pair", disable=not progress)


def evaluate(cfg: Any, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Score `cfg`'s model on its data and write the results to `cfg.output_dir` (see the module docstring); returns
    the metrics. An earlier eval's outputs there are refused unless `overwrite` or `cfg.overwrite` (`check_rerun`,
    as the CLI's --overwrite)."""
    check_rerun(cfg, overwrite)
    records, ranked = read_eval_records(cfg)
    check_formats(cfg.model, (r.prompt for r in records), cfg.data.formatter)
    check_reference(cfg)
    check_heads(cfg)
    resolve_beta(cfg)
    warn_moved_reference(cfg)
    task = "classifier" if cfg.method.kind == "reward" else "causal_lm"
    model, tok, base_path, desc = load_for_inference(cfg.model, None, task)  # before anything is written: a model
    model = to_device(model)  # that does not load, or data the length limits drop entirely, leaves output_dir as it was
    per_pair: dict[str, list[float]] = {}
    try:  # scored before the run folder is touched: a failure leaves an earlier run's config and metrics as they were
        features, stats = tokenize(records, tok, cfg.data, "data.path", say_identical=False)
        reft = reft_settings(model)
        if reft is not None:  # a prompt cut at its start: "first" positions land mid-prompt (as training says)
            check_truncated_prompts(reft.positions, stats.prompt_truncated, len(features), stats.prompt_truncated_ids,
                                    cfg.data.max_prompt_length, "data.path")
        features, identical = drop_cut_identical(features, cfg.data)
        if cfg.method.kind == "reward":
            metrics = reward_metrics(model, features, tok.pad_token_id, cfg.method.batch_size, progress, per_pair)
        else:
            metrics = dpo_metrics(model, features, tok.pad_token_id, cfg, base_path, progress, per_pair)
        metrics = {"pairs": len(features), "cut_identical": identical,
                   **{k: (int(v) if k == "ties" else v) for k, v in metrics.items() if k != "num_pairs"}}
        if ranked:
            metrics.update(ranking_metrics(model, ranked, tok, cfg, progress))
        check_finite_scores(metrics, per_pair, features, desc)
        if cfg.method.kind != "reward":
            warn_unchanged_policy(per_pair, desc)
    except BaseException:
        adopt_tiny(base_path, Path(cfg.output_dir) / "base_model", main=False)  # a tiny base built for the load
        raise
    with output_set(cfg.output_dir, "eval", ["metrics.json"], enabled=is_main_process()) as outs:
        run = start_run(cfg, outs)
        loaded_from, base_path = base_path, adopt_tiny(base_path, run.root / "base_model", main=run.main)
        rename_base(model, loaded_from, base_path)
        if run.main:
            outs.add(atomic_write_text(run.root / "metrics.json",
                                       json.dumps({"model": desc, "data": cfg.data.path, **beta_entry(cfg), **metrics},
                                                  indent=2)))
            for path in write_command_outputs(run.root, "eval", metrics, per_pair):
                outs.add(path)
    return metrics


def read_eval_records(cfg: Any) -> tuple[list, list]:
    """(the preference pairs to score, the ranked records they came from). The ranked records are read when
    every source of a reward-model eval holds ranked data (Open-Assistant trees, ranked columns): its pairs are
    theirs (`alignkit.data.records.ranked_to_pairs`, as a preference read gives), and the ranked records kept are
    the leading ones whose pairs are all within `data.max_records` (a record cut there is not ranked); [] else."""
    ds = cfg.data
    if cfg.method.kind != "reward" or native_kinds(ds.path, ds, "preference", ds.split) != {"ranked"}:
        records = read_records(ds.path, ds, "preference", ds.split, "data.path")
        return (records if ds.max_records is None else records[:ds.max_records]), []
    ranked = read_records(ds.path, ds, "ranked", ds.split, "data.path")
    records = convert(ranked, "preference")
    if ds.max_records is None:
        return records, ranked
    kept, n = [], 0
    for r in ranked:
        n += len(ranked_to_pairs(r))
        if n > ds.max_records:
            break
        kept.append(r)
    return records[:ds.max_records], kept


def drop_cut_identical(features: list[dict], ds: Any) -> tuple[list[dict], int]:
    """(the features to score, how many pairs were left out): a pair that data.max_length / max_prompt_length cut to
    the same tokens on both sides (`cut_identical`) scores a tie and a zero margin whatever the model, so it would
    only dilute accuracy; it is left out of every figure, counted in `cut_identical`, and warned of once (every pair
    so cut is refused: `check_cut_identical`, computed once here, as `tokenize` leaves it to this caller)."""
    same = check_cut_identical(features, ds, "data.path", warn=False)
    if not same:
        return features, 0
    ids = [f.get("id") for f in same[:3]]
    logger.warning("eval: %d of %d pair(s) of %s have chosen == rejected once truncated to data.max_length=%s / "
                   "data.max_prompt_length=%s (they differ only past the cut), e.g. %s: left out of every figure "
                   "(metrics cut_identical=%d); raise data.max_length to score them", len(same), len(features),
                   ds.path, ds.max_length, ds.max_prompt_length, ids, len(same))
    gone = {id(f) for f in same}
    return [f for f in features if id(f) not in gone], len(same)


def ranking_metrics(model: Any, ranked: list, tok: Any, cfg: Any, progress: bool) -> dict[str, Any]:
    """The ranking figures of a reward model on ranked records (`evaluate_reward_model` on their K-wise features):
    `prompts` (ranked records with at least one ordered pair), mean `kendall_tau` and `exact_match` (whole ranking
    reproduced) per prompt, and their weighted means when records are weighted."""
    features, _ = tokenize(ranked, tok, cfg.data, "data.path (ranked)")
    out = reward_metrics(model, features, tok.pad_token_id, cfg.method.batch_size, progress,
                         collator=RankedCollator(tok.pad_token_id), say_ties=False)  # (said of their pairs)
    keys = ("kendall_tau", "exact_match", "weighted/kendall_tau", "weighted/exact_match")
    return {"prompts": int(out["num_prompts"]), **{k: out[k] for k in keys if k in out}}


def check_reference(cfg: Any) -> None:
    """ConfigError before anything is written when a DPO eval's `method.reference_path` would be ignored (the
    `model.adapter_path` adapter switches off, and that is the reference), or when it would compare the model with
    itself: without
    `model.adapter_path` (an adapter switched off is the reference) and without `method.reference_path`, the
    reference is `model.path` itself, so every implicit reward is 0, accuracy 0 and the loss ln 2, whatever the
    model learned."""
    if cfg.method.kind != "reward" and cfg.model.adapter_path is not None and cfg.method.reference_path is not None:
        folder = Path(cfg.model.adapter_path)
        check_model_folder(str(folder), "model.adapter_path", adapter=True)
        check_adapter_files(folder, "model.adapter_path")
        adapter = adapter_in(folder)
        if adapter.can_switch_off:  # the reference is the adapter switched off: reference_path is never loaded
            raise ConfigError(f"method.reference_path: model.adapter_path={folder} holds a {adapter.kind} adapter, "
                              f"whose reference is the adapter switched off (model.path={cfg.model.path}), so "
                              f"method.reference_path={cfg.method.reference_path} would be ignored; remove "
                              "method.reference_path (it is read only for a fully finetuned model.adapter_path); "
                              "nothing was written")
    if cfg.method.kind == "reward" or cfg.model.adapter_path is not None or cfg.method.reference_path is not None:
        return
    check_model_folder(cfg.model.path, "model.path")  # a path that is not a model says so first
    raise ConfigError(f"eval {cfg.method.kind}: model.path={cfg.model.path} would be its own reference (no "
                      "model.adapter_path, no method.reference_path), so every implicit reward would be 0 and the "
                      "accuracy 0 whatever it learned; set method.reference_path to the model it was trained from "
                      "(or model.adapter_path to its adapter); nothing was written")


BETA_COMMANDS = ("dpo", "kto", "online-dpo")  # whose method.beta scales the implicit reward (grpo's KL: kl_coef)
DEFAULT_BETA = 0.1


def training_beta(policy: str) -> tuple[float, Path, Any] | None:
    """(method.beta, the config.yaml it came from, method.loss_type) of the run that trained the policy folder
    `policy` (`<run>/model`, or a checkpoint `<run>/checkpoints/checkpoint-N`) when that run is one of
    `BETA_COMMANDS`; None when the folder is in no such run folder (copied out, another command, a config.yaml
    without method.beta)."""
    folder = Path(policy)
    saved = folder.parent / "config.yaml" if folder.name == "model" else checkpoint_run_config(folder)
    if saved is None or not saved.is_file():
        return None
    try:
        run = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"method.beta: {saved} (the config of the run that trained {policy}) is not valid YAML "
                          f"({e}); restore it, or copy the model out of its run folder and set method.beta") from None
    method = run.get("method") if isinstance(run, dict) else None
    beta = method.get("beta") if isinstance(method, dict) else None
    if run.get("command") not in BETA_COMMANDS or not isinstance(beta, (int, float)):
        return None
    return float(beta), saved, method.get("loss_type")


def resolve_beta(cfg: Any) -> None:
    """Set `cfg.method.beta` for a DPO eval before anything is loaded: the training run's (`training_beta`) when
    not given; a given one that differs from it is a ConfigError (the implicit rewards beta * log-ratio, their
    margins and the loss would be on another scale than the run logged, exit 0); with no run folder to read,
    `DEFAULT_BETA` with a warning. A reward-model eval reads no beta."""
    m, ms = cfg.method, cfg.model
    if m.kind == "reward":
        return
    policy = ms.adapter_path if ms.adapter_path is not None else ms.path
    trained = training_beta(policy)
    if trained is None:
        if m.beta is None:
            logger.warning("method.beta: not set, and %s is not in the run folder of a dpo, kto or online-dpo run "
                           "(no <run>/config.yaml beside it), so the implicit rewards use beta=%s; set method.beta "
                           "to the beta the policy was trained with", policy, DEFAULT_BETA)
            m.beta = DEFAULT_BETA
        return
    beta, saved, loss_type = trained
    if loss_type not in (None, "sigmoid", ["sigmoid"]):
        logger.warning("eval: the policy %s was trained with method.loss_type=%s (%s), and eval's `loss` is DPO's "
                       "sigmoid loss, so it is not the loss the run logged (the rewards, margins and accuracy are "
                       "the same implicit-reward figures)", policy, loss_type, saved)
    if m.beta is not None and m.beta != beta:
        raise ConfigError(f"method.beta={m.beta}: the policy {policy} was trained with method.beta={beta} ({saved}), "
                          "so the implicit rewards, margins and loss would be on another scale than the run logged "
                          f"them; remove method.beta (eval then uses the run's) or set method.beta={beta}; nothing "
                          "was written")
    if m.beta is None:
        logger.info("method.beta: %s, the beta the policy was trained with (%s)", beta, saved)
    m.beta = beta


def warn_moved_reference(cfg: Any) -> None:
    """Warn when a DPO eval's policy was trained with `method.ref_sync` (TR-DPO: its run's config.yaml, beside
    model/ or above a checkpoint) and no `method.reference_path` is given: training's reference moved towards the
    policy, and eval scores against the initial model (`model.path`), so its figures are not what training
    optimised."""
    m, ms = cfg.method, cfg.model
    if m.kind == "reward" or m.reference_path is not None:
        return
    policy = Path(ms.adapter_path if ms.adapter_path is not None else ms.path)
    saved = policy.parent / "config.yaml" if policy.name == "model" else checkpoint_run_config(policy)
    if saved is None or not saved.is_file():
        return
    try:
        method = (yaml.safe_load(saved.read_text()) or {}).get("method")
    except (yaml.YAMLError, AttributeError):
        return  # resolve_beta has said what is wrong with it
    sync = method.get("ref_sync") if isinstance(method, dict) else None
    if sync:
        logger.warning("eval: the policy %s was trained with method.ref_sync=%s (%s): its reference moved towards the "
                       "policy during training, and eval scores against %s (the initial model), so the implicit "
                       "rewards, margins and accuracy are not the figures training optimised; read them as against "
                       "the initial model, or set method.reference_path to another reference", policy, sync, saved,
                       ms.path)


def beta_entry(cfg: Any) -> dict[str, float]:
    """metrics.json's record of the beta a DPO eval used ({} for a reward model)."""
    return {} if cfg.method.kind == "reward" else {"beta": cfg.method.beta}


def check_heads(cfg: Any) -> None:
    """ConfigError before anything is loaded when a model folder that scores lacks the head of `method.kind`
    (`models.check_head`): a causal LM evaluated as a reward model got a random score head (accuracy of chance,
    another on every run, exit 0), a reward model evaluated with kind dpo a random LM head. The folders: the
    whole model in `model.adapter_path`, else `model.path` (`models.head_folder`; an adapter on `model.path`
    brings its own head, and is refused when it was saved for the other head: an SFT LoRA as a reward model), and a
    DPO reference (`method.reference_path`, or `model.path` under a whole model)."""
    ms, m = cfg.model, cfg.method
    if m.kind == "reward":
        fix = ("give the reward model (model.path, or model.adapter_path for an alignkit rm run's model/), or set "
               "method.kind=dpo to evaluate a policy")
        scorer = head_folder(ms.path, ms.adapter_path, task="classifier", fix=fix)
        if scorer is not None:
            check_head(scorer[1], "classifier", scorer[0], fix)
        return
    fix = "point it at a causal LM (the policy or the model it was trained from), or set method.kind=reward"
    scorer = head_folder(ms.path, ms.adapter_path, task="causal_lm", fix=fix)
    key, policy = scorer or ("model.path", ms.path)
    check_head(policy, "causal_lm", key, fix)
    if m.reference_path is not None or key == "model.adapter_path":
        check_head(m.reference_path or ms.path, "causal_lm",
                   "method.reference_path" if m.reference_path is not None else "model.path", fix)


def warn_unchanged_policy(per_pair: dict[str, list[float]], model: str) -> None:
    """One warning when every implicit reward of a DPO eval is exactly 0: the policy computes what its reference
    does (an adapter saved untrained: LoRA's B still 0, ReFT edits that reach no position), so accuracy is 0 and
    the loss ln 2 whatever the data; otherwise read as a policy that prefers every worse reply."""
    values = per_pair.get("rewards/chosen", []) + per_pair.get("rewards/rejected", [])
    if values and all(v == 0 for v in values):
        logger.warning("eval: every implicit reward of %s is exactly 0 (%d pair(s)): the policy gives the same "
                       "log-probabilities as its reference, so accuracy 0 and loss ln 2 say nothing of the data; "
                       "check model.adapter_path is the trained adapter (not one saved before training)", model,
                       len(values) // 2)


def check_finite_scores(metrics: dict[str, Any], per_pair: dict[str, list[float]], features: list[dict],
                        model: str) -> None:
    """ConfigError before the metrics are written when a score is NaN or infinite (naming the value and, where the
    values are one per record, the record): the metrics would be NaN, and the averages hide which pair did it."""
    for key, values in per_pair.items():
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            where = (f"record {features[bad[0]].get('id')}" if len(values) == len(features)
                     else f"value {bad[0]} of {len(values)}")
            break
    else:
        key = next((k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)), None)
        if key is None:
            return
        bad, values, where = [0], [metrics[key]], "the mean"
    raise ConfigError(f"eval: {key} is {values[bad[0]]} at {where} ({len(bad)} non-finite) with {model}, so the "
                      "metrics would be NaN; no metrics were written. Likely: float16 overflow (set model.dtype to "
                      "bfloat16 or float32) or non-finite weights in the model")


def reward_metrics(model: Any, features: list[dict], pad_id: int, batch_size: int, progress: bool,
                   per_pair: dict[str, list[float]] | None = None, collator: Any = None, say_ties: bool = True
                   ) -> dict[str, float]:
    collate = collator or PreferenceCollator(pad_id)
    with _bar(len(features), "reward eval", progress) as bar:
        def counted(batch: list[dict]) -> dict[str, Any]:
            bar.update(len(batch))
            return collate(batch)

        return evaluate_reward_model(model, features, counted, batch_size=batch_size, per_pair=per_pair,
                                     say_ties=say_ties)


@torch.no_grad()
def dpo_metrics(model: Any, features: list[dict], pad_id: int, cfg: Any, base_path: str,
                progress: bool, per_pair: dict[str, list[float]] | None = None) -> dict[str, float]:
    m = cfg.method

    def load_reference() -> Any:  # a full model's reference: method.reference_path, else the base it started from,
        ms = cfg.model  # loaded as the policy is (its RoPE scaling: training's reference ran with it)
        return load_model(m.reference_path or base_path, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                          trust_remote_code=ms.trust_remote_code, rope_scaling=ms.rope_scaling)

    # the adapter switched off, or (full finetuning) the reference model loaded from disk
    reference = build_reference(model, "auto", make_copy=load_reference, chunk_size=m.chunk_size,
                                supports=("adapter_off", "copy"), owner="alignkit eval")
    collate = PreferenceCollator(pad_id)
    device = next(model.parameters()).device
    reference.place(device)
    sums: dict[str, float] = {}
    n = 0
    each: dict[str, list[torch.Tensor]] = {}  # one value per pair, for the weighted means
    weights = []
    model.eval()
    with _bar(len(features), "dpo eval", progress) as bar:
        for s in range(0, len(features), m.batch_size):
            batch = collate(features[s:s + m.batch_size])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logps, lengths = completion_logps(model, batch, m.chunk_size)  # (2B,), (2B,)
            B = logps.shape[0] // 2
            out = preference_loss(pair_batch(logps, lengths, reference.logps(model, batch)),  # ref: (2B,)
                                  PreferenceParams(beta=m.beta), ["sigmoid"])
            values = {"loss": out.losses, **out.metrics}
            weights.append(batch["weight"].float().cpu())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v.float().sum())
                if v.dim() == 1 and v.shape[0] == B:  # one value per pair
                    each.setdefault(k, []).append(v.detach().float().cpu())
                    if per_pair is not None:
                        per_pair.setdefault(k, []).extend(v.float().tolist())
            n += B
            bar.update(B)
    weighted = weighted_means({k: torch.cat(v) for k, v in each.items()}, torch.cat(weights), "data.path")
    return {**{k: v / max(n, 1) for k, v in sums.items()}, **weighted}


__all__ = ["add_parser", "dpo_metrics", "evaluate", "reward_metrics", "run"]
