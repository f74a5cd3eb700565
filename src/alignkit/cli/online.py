"""`alignkit online-dpo | grpo | rloo | ppo`: online alignment from a config (generate -> annotate -> optimise).

    config -> prompts (data.path) -> run folder (config.yaml) -> policy (+ adapter) -> annotator
           -> OnlineDPOTrainer / GRPOTrainer / RLOOTrainer / PPOTrainer (metrics.jsonl, one row per step)
           -> model/ (adapter or full model + online_config.json; PPO: value_head.safetensors)
           -> plots/*.png (every logged figure: ONLINE_PLOTS), README.md

Sections (`alignkit.settings.online`): model, data (the prompts: any records, their prompts are used; held-out
prompts from `eval_path` or `eval_fraction`, evaluated every `train.eval_steps` steps and after the last one),
adapter, annotator (reward_model | function | judge), sampling, method (the objective), train (the same keys
as the offline commands: learning_rate, max_steps, seed, save_steps, report_to, ...; `settings/train.py`).
The online trainers run their own accelerate loop (not `transformers.Trainer`); `accelerate launch -m alignkit
grpo ...` works the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import logging
from importlib.machinery import PathFinder
import sys
from pathlib import Path
from typing import Any

from transformers import set_seed

from alignkit.adapters import adapter_of, reft_settings, unwrap_lm
from alignkit.cli.data import read_records, read_splits
from alignkit.cli.models import (
    adopt_tiny, apply_configured_adapter, check_formats, check_head, check_model_folder, check_model_settings,
    head_folder, load_base, load_for_inference, rename_base,
)
from alignkit.cli.runfolder import (abandon_run, add_config_command, begin_run, command_line, finish_run,
                                   moved_reference, plan_run)
from alignkit.online.digests import model_files_digest
from alignkit.models.rope import check_context, learned_positions
from alignkit.online import (ANNOTATORS, AnnotatorArgumentError, GRPOTrainer, OnlineDPOTrainer, PPOTrainer,
                             RLOOTrainer, build_annotator)
from alignkit.interventions.positions import Positions, check_truncated_prompts
from alignkit.data.tokenize import TokenizeConfig, tokenize_records
from alignkit.distributed import refuse_fsdp1_on_cpu
from alignkit.online.generation import encode_prompt, encode_prompts
from alignkit.online.ptx import check_ptx_tokens
from alignkit.trainers.precision import weight_dtypes
from alignkit.online.vllm_client import SERVER_MAX_MODEL_LEN, VllmServerGenerator
from alignkit.online.vllm_generation import NO_VLLM, check_model_len
from alignkit.run_commit import staged
from alignkit.runs import (
    ModelCard, RunFolder, figure, final_metrics, plot_metrics, read_metrics, versions, write_prompt_formats,
)
from alignkit.settings import ConfigError, DataSettings, ModelSettings
from alignkit.settings.tiny import is_tiny
from alignkit.settings.online import check_code_allowed

logger = logging.getLogger(__name__)

HELP = {"online-dpo": "online DPO: pairs from the policy's own samples each step (any preference loss)",
        "grpo": "GRPO: group-relative advantages, clipped policy gradient, KL to the reference",
        "rloo": "RLOO: GRPO's loop with the leave-one-out baseline",
        "ppo": "PPO with a value head and GAE (RLHF step 3)"}

# plot file -> metric names drawn on it (the online trainers' row keys, docs/metrics.md): every figure they log but
# bookkeeping (ONLINE_BOOKKEEPING); `online_plots` adds the figures named by the rows. Only reward, kl and loss
# were drawn before: completion lengths, entropy, finish reasons, the policy-ratio and value figures and online
# DPO's pair figures were logged but on no plot.
ONLINE_PLOTS: dict[str, tuple[str, ...]] = {
    "reward": ("reward", "reward_std", "reward/normalized_mean", "eval/reward", "eval/reward_std"),
    "kl": ("kl", "kl/sequence_sum", "kl/token", "kl_coef"),
    "loss": ("loss", "policy_loss", "value_loss"),
    "completions": ("completions/mean_length", "completions/min_length", "completions/max_length",
                    "eval/mean_length"),
    "finish": ("completions/clipped_ratio", "generation/finish_eos", "generation/finish_stop",
               "generation/finish_length", "frac_reward_zero_std", "eval/clipped_ratio"),
    "entropy": ("entropy",),
    "policy": ("clip_ratio/region_mean", "approx_kl", "ratio/mean"),
    "value": ("value/mean", "returns/mean", "advantages/std", "explained_variance", "vf_clip_fraction"),
    "rewards": ("rewards/chosen", "rewards/rejected", "rewards/margins"),  # online DPO's pairs, as offline DPO
    "accuracy": ("rewards/accuracies",),
    "logps": ("logps/chosen", "logps/rejected"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, text in HELP.items():
        add_config_command(sub, name, text, run, dry=dry_checks)


def dry_checks(cfg: Any, args: argparse.Namespace) -> list[str]:
    """`--dry-run`'s own checks of an online command: the policy's folders (`load_base`'s checks) and the
    annotator (`check_annotator`: nothing loaded, no code of the config imported)."""
    return [check_model_settings(cfg.model), check_annotator(cfg.annotator, getattr(args, "allow_code", False))]


def run(cfg: Any, args: argparse.Namespace) -> int:
    return train_online(cfg, args.command, command_line=command_line(args), resume=args.resume,
                        overwrite=args.overwrite, quiet=getattr(args, "quiet", False), allow_code=args.allow_code)


# ---------------------------------------------------------------------------------------------- shared pieces

def read_prompts(ds: DataSettings, command: str = "sample") -> list:
    """The prompt records of `data.path` (any records: their prompts, weights and meta are used) for a command
    that takes no evaluation split (`sample`): read as `read_splits` reads them, and a ConfigError if `ds` asks
    for held-out prompts, which such a command would drop (its config refuses the keys first:
    settings/sections.py:check_prompt_data)."""
    prompts, held_out = read_splits(ds, "prompt")
    if held_out:
        raise ConfigError(f"data: alignkit {command} takes no evaluation split, and data.eval_path / "
                          f"data.eval_fraction would hold out {len(held_out)} prompt(s) it never reads; remove them")
    return prompts


def read_ptx(ds: DataSettings, tokenizer: Any) -> list[dict[str, Any]]:
    """alignkit ppo's pretraining mix: the SFT records of `data.ptx_path` (read with data.path's reader and
    on_invalid; not its split: a separate training corpus, so a data file gives its rows and a dataset folder its
    "train" split. data.split was passed: prompts read with split=test refused a .jsonl ptx file, and a ptx folder
    would have trained on its test split), tokenized as alignkit sft tokenizes them (data.max_length,
    max_prompt_length, formatter, add_eos, loss_on); a ConfigError when no record has a trainable token."""
    records = read_records(ds.ptx_path, ds, "sft", None, "data.ptx_path")
    features, _ = tokenize_records(records, tokenizer, TokenizeConfig(  # logs what it dropped or cut
        max_length=ds.max_length, max_prompt_length=ds.max_prompt_length, formatter=ds.formatter,
        add_eos=ds.add_eos, loss_on=ds.loss_on))
    return check_ptx_tokens(features, "data.ptx_path")


def read_prompt_splits(ds: DataSettings) -> tuple[list, list]:
    """(training prompts, held-out prompts): the records of `data.path`, and of `data.eval_path` or an
    `eval_fraction` split of them (`alignkit.cli.data.read_splits`); their prompts are used."""
    prompts, held_out = read_splits(ds, "prompt")
    if held_out:
        logger.info("data: %d training and %d held-out prompt(s)", len(prompts), len(held_out))
    return prompts, held_out


def check_annotator_model(settings: Any) -> str:
    """What `make_annotator` checks of a reward model's or judge's folders before loading them (also `--dry-run`'s
    annotator check): annotator.path and annotator.adapter_path are model / adapter folders, with the head the
    annotator scores with. Returns one line saying what was checked."""
    check_model_folder(settings.path, "annotator.path")
    if settings.adapter_path is not None:
        check_model_folder(settings.adapter_path, "annotator.adapter_path", adapter=True)
    task = "classifier" if settings.kind == "reward_model" else "causal_lm"
    fix = ("give a reward model (annotator.path, or annotator.adapter_path for an alignkit rm run's model/)"
           if task == "classifier" else "give a causal LM as the judge")
    scorer = head_folder(settings.path, settings.adapter_path, "annotator", task, fix)
    if scorer is not None:  # a judge generates with the LM head, a reward model scores with its score head
        check_head(scorer[1], task, scorer[0], fix)
    return (f"annotator ({settings.kind}): annotator.path" + (" and annotator.adapter_path" if settings.adapter_path
                                                               else "") + " hold a model with the head it scores with")


def function_module_findable(spec: str) -> None:
    """ConfigError when the module of an `annotator.function` spec ('pkg.mod:name') cannot be found on sys.path,
    found without importing (executing) anything: a dry run of a config with --allow-code code said OK, and the run
    then stopped at the import. Whether `name` is in the module is known only once it is imported (the run)."""
    module = spec.split(":", 1)[0]
    parts, locations = module.split("."), None
    for depth in range(len(parts)):
        name = ".".join(parts[:depth + 1])
        if name in sys.modules:
            found = getattr(sys.modules[name], "__spec__", None)
        else:  # a top-level name is looked up without importing it; a submodule in its package's folders
            found = importlib.util.find_spec(name) if depth == 0 else PathFinder.find_spec(name, locations)
        if found is None:
            raise ConfigError(f"annotator.function: {spec!r}: no module {name!r} on the Python path (sys.path); "
                              "install it or add its folder to PYTHONPATH, or fix the spelling")
        locations = found.submodule_search_locations
        if locations is None and depth < len(parts) - 1:
            raise ConfigError(f"annotator.function: {spec!r}: {name!r} is a module, not a package, so it holds no "
                              f"{module!r}; fix the module path")


def check_annotator(settings: Any, allow_code: bool) -> str:
    """`--dry-run`'s annotator check: the function specs (alignkit's are imported and checked when the config is
    read; code outside it is refused without --allow-code, else only found on sys.path, not imported) or the
    reward model's / judge's folders. Returns one line saying what was checked."""
    if not allow_code:  # (add_config_command refuses such code before the dry run: the run's own line)
        check_code_allowed(settings, allow_code=False)
    if settings.kind != "function":
        return check_annotator_model(settings)
    specs = settings.function if isinstance(settings.function, list) else [settings.function]
    for spec in specs:
        function_module_findable(spec)
    return (f"annotator.function: {', '.join(specs)} found (alignkit's imported and checked; other code is "
            "imported when the run starts)")


def make_annotator(settings: Any, run: RunFolder | None, allow_code: bool = False) -> Any:
    """An `alignkit.online.Annotator` from the `annotator` section. A reward model or judge is loaded like a
    policy (`tiny:<arch>` built in <run>/annotator/, or in a temporary folder when `run` is None, `adapter_path`
    applied) and moved to `device`."""
    check_code_allowed(settings, allow_code)
    if settings.kind == "function":
        return build_annotator({"type": "function", **settings.arguments()})

    check_annotator_model(settings)
    ms = ModelSettings(path=settings.path, dtype=settings.dtype, adapter_path=settings.adapter_path)
    task = "classifier" if settings.kind == "reward_model" else "causal_lm"
    model, tok, path, desc = load_for_inference(
        ms, RunFolder(run.root / "annotator", main=run.main) if run is not None else None, task)
    if settings.device is not None:
        model = model.to(settings.device)
    logger.info("annotator %s: %s", settings.kind, desc)
    try:
        annotator = ANNOTATORS[settings.kind](model, tok, **settings.arguments())
    except AnnotatorArgumentError as e:  # its argument is the section's key of the same name
        raise ConfigError(f"annotator.{e.key}: {e.reason}") from None
    except ValueError as e:
        raise ConfigError(f"annotator: {e}") from None
    annotator.path = desc  # built from a model object, it would describe itself with path None (manifest, card)
    annotator.alignkit_base_path = path  # a tiny model's temporary folder, for `adopt_tiny`
    annotator.model_files = annotator_files_digest(settings, path)
    return annotator


def annotator_files_digest(settings: Any, path: str) -> str | None:
    """`model_files_digest` of the folders a reward model / judge was loaded from (the base `path` and
    `annotator.adapter_path`), which checkpoints record so that a resume warns of one retrained or replaced there;
    None for a `tiny:<arch>` (built from its spec) or when no folder is found."""
    if is_tiny(settings.path):
        return None
    parts = [model_files_digest(p) for p in (path, settings.adapter_path) if p]
    return hashlib.sha256(repr(parts).encode()).hexdigest() if any(parts) else None


# row keys drawn on no plot: counts, totals and timings (a key starting with "judge/" too: the judge's counts)
ONLINE_BOOKKEEPING = frozenset({"step", "grad_norm", "num_tokens", "time/step_s", "pairs", "reward/failed",
                                "function/failures", "reward_model/truncated", "reward_model/response_truncated",
                                "eval/failed", "eval/prompts"})


def online_plots(rows: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """`ONLINE_PLOTS` with the figures the rows name: each reward function's `rewards/<function>/mean` and `/std` on
    the reward plot, each loss of an online DPO loss_type list (`loss/<name>`) on the loss plot, and any other
    number the rows hold but bookkeeping (`ONLINE_BOOKKEEPING`; a loss's own figures: orpo's log_odds_ratio,
    slic's hinge, ...) on `other`, so that every logged figure is drawn."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)))
    functions = tuple(k for k in keys if k.startswith("rewards/") and k.endswith(("/mean", "/std")))
    losses = tuple(k for k in keys if k.startswith("loss/"))
    plots = {**ONLINE_PLOTS, "reward": ONLINE_PLOTS["reward"] + functions, "loss": ONLINE_PLOTS["loss"] + losses}
    drawn = {k for names in plots.values() for k in names}
    other = tuple(k for k in keys if k not in drawn and k not in ONLINE_BOOKKEEPING and not k.startswith("judge/"))
    return {**plots, "other": other} if other else plots


def plot_online(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per `online_plots(rows)` entry with data (`alignkit.runs.plot_metrics`: none, with a warning,
    without matplotlib)."""
    return plot_metrics(rows, out_dir, plots=online_plots(rows))


# ---------------------------------------------------------------------------------------------- the run

def check_generation_context(model: Any, tok: Any, prompts: list, tcfg: Any) -> None:
    """Before the run folder: with a learned position table (GPT-2), the longest prompt (as generation encodes it) +
    sampling.max_new_tokens past the table is a ConfigError (the first generation would stop with an IndexError).
    RoPE models are warned at generation time (`check_context`); their prompts are not encoded twice."""
    config = getattr(unwrap_lm(model), "config", None)
    if not learned_positions(config):
        return
    longest = max(map(len, encode_prompts(prompts, tok, tcfg.formatter, tcfg.max_prompt_length)), default=0)
    check_context(config, longest + tcfg.sampling.max_new_tokens,
                  "generation (the longest prompt + sampling.max_new_tokens)",
                  "lower sampling.max_new_tokens or data.max_prompt_length (prompts keep their last tokens)")


def check_reft_prompt_cuts(model: Any, tok: Any, prompts: list, tcfg: Any) -> None:
    """Before the run folder: a policy with a ReFT part whose positions name first tokens, and prompts longer than
    data.max_prompt_length (generation keeps their last tokens), so those positions land mid-prompt: one warning
    (count, prompts, key, fix), as training and eval give (`positions.check_truncated_prompts`). The prompts are
    encoded once for this, and only then."""
    reft = reft_settings(model)
    limit = tcfg.max_prompt_length
    if reft is None or limit is None or not Positions.parse(reft.positions).first_n:
        return
    cut = [r.id or f"prompt {i}" for i, r in enumerate(prompts)
           if len(encode_prompt(r.prompt, tok, tcfg.formatter)) > limit]
    check_truncated_prompts(reft.positions, len(cut), len(prompts), cut[:5], limit, "data.path")


def trainer_class(command: str) -> type:
    return {"online-dpo": OnlineDPOTrainer, "grpo": GRPOTrainer, "rloo": RLOOTrainer, "ppo": PPOTrainer}[command]


def train_online(cfg: Any, command: str, *, command_line: str = "", resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, allow_code: bool = False) -> int:
    """Run one online command end to end (see the module docstring). Returns an exit code. The output folder,
    prompts, policy, adapter, annotator and trainer are all checked before the run folder is written."""
    plan = plan_run(cfg, resume=resume, overwrite=overwrite)
    try:
        return _train_online(cfg, command, plan, command_line=command_line, quiet=quiet, allow_code=allow_code)
    except BaseException:
        abandon_run(plan)
        raise


def _check_annotator_columns(annotator: Any, cfg: Any, prompts: list, held_out: list) -> None:
    """Before the run folder: a reward function taking a column the prompts lack is a ConfigError (it stopped the
    first step, after the run folder was written)."""
    try:
        annotator.check_columns({k for r in [*prompts, *held_out] for k in r.meta.get("columns", {})},
                                "data.path" if not held_out or cfg.data.eval_path is None else
                                "data.path / data.eval_path")
    except ValueError as e:
        raise ConfigError(f"annotator.function: {e}") from None


def _attach_vllm_server(trainer: Any, model: Any, tok: Any, records: list, tcfg: Any) -> None:
    """Before the run folder, with method.vllm_mode=server: the server the trainer contacts at its first step,
    checked now (down / another model / no LoRA there / too short a max_model_len: one line, not after the run
    folder is written) and handed to the trainer (it built a second one at its first step, so /info was checked
    twice and a remote server's "weights were not compared" warned twice)."""
    server = VllmServerGenerator(model, tok, tcfg.vllm_server_url, timeout=tcfg.vllm_server_timeout)
    limit = server.info.get("max_model_len")
    check_model_len(records, encode_prompts(records, tok, tcfg.formatter, tcfg.max_prompt_length),
                    tcfg.sampling.max_new_tokens, int(limit) if limit else None, SERVER_MAX_MODEL_LEN)
    trainer.vllm_generator = server


def _online_card(cfg: Any, command: str, trainer: Any, annotator: Any, rows: list[dict[str, Any]], base_desc: str,
                 base_path: str, named: Any, n_prompts: int, held_out: bool, command_line: str) -> ModelCard:
    """The model card of a finished online run (model/README.md and the run folder's README.md)."""
    method = {k: v for k, v in {**dataclasses.asdict(cfg.method), **cfg.train}.items() if v is not None}
    return ModelCard(
        title=f"{command}: online alignment of {cfg.model.path}", base_model=base_desc,
        adapter=adapter_of(trainer.policy).describe(trainer.policy),
        objective={"objective": HELP[command], "command": command,
                   "annotator": annotator.describe(), **method},
        data={"path": cfg.data.path, "reader": cfg.data.reader or "detected", "prompts": n_prompts,
              **({"held-out prompts": trainer.eval_prompts_total} if held_out else {}),
              "sampling": cfg.sampling.to_dict()},
        hyperparameters={"steps done": trainer.steps_done, "reference": trainer.reference_mode,
                         "world size": trainer.world, **weight_dtypes(trainer.policy),
                         **({"reference syncs": moved_reference(trainer.ref_syncer.syncs)} if trainer.ref_syncer
                            else {})},
        metrics=final_metrics(rows), command_line=command_line or f"alignkit {command}", versions=versions(),
        base_model_id=cfg.model.path,
        how_to_load=adapter_of(trainer.policy).how_to_load(str(named.model), base_path, False, cfg.model.rope_scaling))


def _ema_card(card: ModelCard, cfg: Any, trainer: Any, named: Any, base_path: str) -> ModelCard:
    """model_ema/README.md: the run's card, saying it holds the EMA (train.ema_decay) and loading model_ema/."""
    decay = trainer.config.ema_decay
    return dataclasses.replace(
        card, title=f"{card.title} (EMA of the policy, decay {decay})",
        hyperparameters={**card.hyperparameters, "weights": f"the exponential moving average of the policy's trainable "
                         f"weights (train.ema_decay {decay}), not its final weights (those are in model/)"},
        how_to_load=adapter_of(trainer.policy).how_to_load(str(Path(named.root) / "model_ema"), base_path, False,
                                                           cfg.model.rope_scaling))


def _train_online(cfg: Any, command: str, plan: Any, *, command_line: str, quiet: bool = False,
                  allow_code: bool = False) -> int:
    check_code_allowed(cfg.annotator, allow_code)  # before anything is loaded or written
    refuse_fsdp1_on_cpu()  # each process alone, before any waits on the others (the trainer checks it again)
    prompts, held_out = read_prompt_splits(cfg.data)  # data errors come before any model is built
    formats = check_formats(cfg.model, (r.prompt for r in prompts), cfg.data.formatter)  # recorded in model/
    tcfg = cfg.trainer_config()
    if tcfg.generation_backend == "vllm" and tcfg.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"method.{NO_VLLM}, or method.vllm_mode=server with alignkit vllm-serve running in vLLM's "
                          "environment (the engine starts at the first step, after the run folder is written)")
    set_seed(tcfg.seed)  # the adapter's initialisation follows the run's seed
    model, tok, base_path, base_desc = load_base(cfg.model, None, "causal_lm")
    model = apply_configured_adapter(model, cfg.adapter)
    annotator = make_annotator(cfg.annotator, None, allow_code)
    _check_annotator_columns(annotator, cfg, prompts, held_out)
    annotator.check_prompts(prompts, "data.path")
    annotator.check_prompts(held_out, "data.path" if cfg.data.eval_path is None else "data.eval_path")
    if quiet:  # --quiet: no progress bar, as the offline commands (the saved config is unchanged); set on this
        tcfg.progress_bar = False  # object (a copy would be built, and checked, again)
    extra = {"ptx_data": read_ptx(cfg.data, tok)} if cfg.data.ptx_path is not None else {}
    trainer = trainer_class(command)(model, tok, prompts, annotator, tcfg, output_dir=plan.root,
                                     eval_prompts=held_out or None, **extra)

    if plan.checkpoint is not None:  # a checkpoint of other prompts or restored settings: refused before writing
        trainer.check_resume(plan.checkpoint)
    check_generation_context(model, tok, [*prompts, *held_out], tcfg)
    check_reft_prompt_cuts(model, tok, [*prompts, *held_out], tcfg)
    if tcfg.generation_backend == "vllm" and tcfg.vllm_mode == "server":  # the trainer contacts it at the first step
        _attach_vllm_server(trainer, model, tok, [*prompts, *held_out], tcfg)
    run = begin_run(plan, cfg, zero_based_steps=True)  # ---------- from here on the run folder is written
    named = plan.named()
    loaded_from, base_path = base_path, adopt_tiny(base_path, run.root / "base_model", main=run.main)
    if base_path != loaded_from:
        base_path = str(named.root / "base_model")
        rename_base(model, loaded_from, base_path)
    ann_path = getattr(annotator, "alignkit_base_path", None)
    if ann_path is not None:
        adopt_tiny(ann_path, run.root / "annotator" / "base_model", main=run.main)
    trainer.train(resume_from_checkpoint=plan.checkpoint)
    if not run.main:
        trainer.save(run.model)  # a no-op write-wise off the main process (collective under FSDP)
        return 0
    rows = read_metrics(run.metrics)
    card = _online_card(cfg, command, trainer, annotator, rows, base_desc, base_path, named, len(prompts),
                        bool(held_out), command_line)
    with staged(run.model, step=trainer.steps_done) as model_dir:
        trainer.save(model_dir)
        card.write(model_dir / "README.md")
        write_prompt_formats(model_dir, formats, cfg.data.formatter)
    if trainer.ema is not None:  # train.ema_decay: the policy's average, in model/'s format
        ema_card = _ema_card(card, cfg, trainer, named, base_path)
        trainer.save_ema(run.root / "model_ema", then=lambda d: (ema_card.write(d / "README.md"),
                                                                  write_prompt_formats(d, formats, cfg.data.formatter)))
    card.write(run.card)
    plot_online(rows, run.plots)
    finish_run(plan)
    if tcfg.push_to_hub:
        trainer.push_to_hub(tcfg.hub_model_id or Path(named.root).name, folder=named.model)  # model/ + card only
    last = rows[-1] if rows else {}
    shown = ", ".join(f"{k} {figure(last[k])}" for k in ("reward", "kl", "loss", "eval/reward")
                      if isinstance(last.get(k), float))
    print(f"alignkit {command}: done ({len(rows)} step(s)). {shown}\n"
          f"  run folder: {named.root} (model/, {'model_ema/, ' if trainer.ema is not None else ''}README.md, "
          "metrics.jsonl, plots/)")
    return 0


__all__ = ["ONLINE_BOOKKEEPING", "ONLINE_PLOTS", "add_parser", "make_annotator", "online_plots", "plot_online",
           "read_prompt_splits", "read_ptx", "read_prompts", "run", "train_online"]
