"""The whole-pipeline demo: SFT -> reward model -> DPO (ReFT and LoRA) -> held-out evaluation, on a CPU.

    result = run_pipeline_demo("runs/pipeline", scale=1.0, seed=0)
    print(result.table())          # the CLI prints; this module only logs

The bundled task (`alignkit.demos.pipeline_data`): questions about coloured animals whose answers come in
a plain style and a polite one ("Sure! ... Hope this helps!"). SFT data holds both styles (30% polite),
so the SFT model answers mostly plainly; the preference pairs prefer the polite answer. THE RULE
(`follows_rule`) is a string test on what the model actually generates, applied to held-out prompts.

Stages, all on models saved and loaded back with `from_pretrained` / `load_adapter` (the real paths):
0. a byte-level BPE tokenizer trained on the bundled texts and a tiny random Llama -> `base/`;
1. SFT, full finetuning (`SFTTrainer`) on sft_train -> `sft/`; held-out token NLL before and after;
2. reward model: a sequence classifier whose backbone is the SFT model's (`RewardTrainer`, Bradley-Terry)
   -> `reward_model/`; accuracy on held-out pairs before and after;
3. DPO (`PreferenceTrainer`, reference = the adapter switched off) from the SFT model with a LoReFT adapter
   -> `dpo_reft/`, and with LoRA -> `dpo_lora/`; reward accuracy / margin on held-out pairs. The loss is
   DPO's sigmoid loss plus the NLL of the chosen response (loss_type ["sigmoid", "sft"]; the "DPO + NLL"
   of Pang et al. 2024, "Iterative Reasoning Preference Optimization"). With DPO alone the tiny policy
   raises the margin by pushing BOTH responses down (chosen log-prob -3 -> -67 in 120 steps) and its
   generations collapse into byte soup; the NLL term keeps the chosen response likely;
4. generations for held-out prompts, greedy and sampled, from the SFT model (before) and from each DPO
   adapter reloaded from disk (after), scored with the rule, an on-topic check and the reward model.

Each stage writes `metrics.json` (its before/after numbers), `metrics.jsonl` (the training log), `tensorboard/`
and `plots/*.png` into its folder; `results.json` holds everything, `table.txt` the table.
`scale` multiplies every step count (the test uses a small one).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from alignkit.adapters import AdapterConfig, apply_adapter, load_adapter
from alignkit.data import PreferenceCollator, SFTCollator, load_records, tokenize_records
from alignkit.data.collators import pad
from alignkit.demos import pipeline_data as task
from alignkit.demos.pipeline_report import AdapterNumbers, Change, PipelineResult
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.models.tiny import build_tiny_model, build_tiny_tokenizer
from alignkit.online.generation import SamplingConfig, generate_responses
from alignkit.runs import MetricsJsonl, plot_metrics, read_metrics
from alignkit.trainers import PreferenceTrainer, RewardTrainer, SFTTrainer
from alignkit.trainers.evaluation import evaluate_reward_model
from alignkit.trainers.reward import sequence_rewards

logger = logging.getLogger(__name__)

# Model and schedule. Steps are for scale=1.0; every count is multiplied by `scale` (at least 1).
MODEL = dict(hidden_size=64, num_layers=2, num_heads=4)
VOCAB_SIZE = 512  # every word of the task becomes one token
SFT = dict(steps=300, batch=16, lr=3e-3)
RM = dict(steps=100, batch=16, lr=1e-3)
DPO = dict(steps=100, batch=16, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0])
ADAPTERS: dict[str, dict[str, Any]] = {
    "reft": dict(lr=1e-2, adapter={"kind": "reft", "reft": {
        "config": {"representations": [{"layer": 0, "intervention": "loreft", "low_rank_dimension": 4},
                                       {"layer": 1, "intervention": "loreft", "low_rank_dimension": 4}]},
        "positions": "f1+l1"}}),
    "lora": dict(lr=5e-3, adapter={"kind": "lora", "lora": {"r": 8, "alpha": 16.0}}),
}
MAX_NEW_TOKENS = 32
NUM_SAMPLES = 4


# ----------------------------------------------------------------------------------------------------
# Data and the base model
# ----------------------------------------------------------------------------------------------------

def load_task(folder: str | Path | None = None) -> dict[str, list]:
    """Records of every bundled file (`pipeline_data.FILES`), read with `alignkit.data.load_records`."""
    if folder is None:
        with resources.as_file(resources.files("alignkit").joinpath("resources/demo/pipeline")) as path:
            return {name: load_records(str(path / f"{name}.jsonl")) for name in task.FILES}
    return {name: load_records(str(Path(folder) / f"{name}.jsonl")) for name in task.FILES}


def build_base(folder: Path, texts: list[str], seed: int) -> Path:
    """Tokenizer trained on `texts` + a tiny random Llama sized to it, saved to `folder`."""
    tok = build_tiny_tokenizer(texts, vocab_size=VOCAB_SIZE)
    model = build_tiny_model("llama", tok, seed=seed, hidden_size=MODEL["hidden_size"],
                             num_layers=MODEL["num_layers"], num_heads=MODEL["num_heads"])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    logger.info("base: tiny Llama with %d parameters, vocabulary %d -> %s",
                sum(p.numel() for p in model.parameters()), len(tok), folder)
    return folder


def _texts(records: dict[str, list]) -> list[str]:
    """The training texts the tokenizer is trained on (prompt + each response)."""
    out = [r.prompt + r.completion for r in records["sft_train"]]
    out += [r.prompt + c for r in records["preference_train"] for c in (r.chosen, r.rejected)]
    return out


# ----------------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------------

class _StageBar:
    """A tqdm bar per stage with the loss in its postfix (instead of the Trainer's printed dicts)."""

    def __new__(cls, desc: str, enabled: bool):
        class Bar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.bar = tqdm(total=state.max_steps, desc=desc, disable=not enabled, leave=False)

            def on_step_end(self, args, state, control, **kw):
                self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4g}")

            def on_train_end(self, args, state, control, **kw):
                self.bar.close()

        return Bar()


def _args(out: Path, steps: int, batch: int, lr: float, seed: int):
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                             per_device_eval_batch_size=128, learning_rate=lr, lr_scheduler_type="cosine",
                             warmup_steps=steps // 10, weight_decay=0.0, logging_steps=max(1, steps // 10),
                             save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)


def _quiet(trainer, desc: str, progress: bool):
    """Replace the Trainer's printing callbacks (one dict per log) by a stage bar, and record the stage as a
    training run does: `metrics.jsonl` and (when tensorboard is installed) `tensorboard/` in the stage's folder,
    replacing those of an earlier demo run there. Returns the trainer."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_StageBar(desc, progress))
    folder = Path(trainer.args.output_dir)
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    trainer.add_callback(MetricsJsonl(folder / "metrics.jsonl"))
    if importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter

        trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder / "tensorboard"))))
    return trainer


def _plot_stage(folder: Path) -> None:
    """plots/*.png of the stage's metrics.jsonl (loss, rewards, accuracy curves), when matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is not None and (folder / "metrics.jsonl").is_file():
        plot_metrics(read_metrics(folder / "metrics.jsonl"), folder / "plots")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _steps(n: int, scale: float) -> int:
    return max(1, round(n * scale))


# ----------------------------------------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def _rm_scores(rm, samples, pad_id: int) -> list[float]:
    """Reward-model score of each (prompt ids + generated ids) sequence, as generated."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    scores: list[float] = []
    for i in range(0, len(seqs), 128):
        chunk = seqs[i:i + 128]
        batch = {"input_ids": pad(chunk, pad_id), "attention_mask": pad([[1] * len(x) for x in chunk], 0)}
        scores += sequence_rewards(rm, batch).tolist()
    return scores


def score_generations(model, tok, prompts: list[str], rm, seed: int, out: Path) -> dict[str, float]:
    """Greedy and sampled generations for `prompts`, scored; written to `out/generations_*.jsonl`."""
    # a ReFT places its own saved position spec (ReftModel.generate)
    greedy = generate_responses(model, tok, prompts, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
                                batch_size=64)
    sampled = generate_responses(model, tok, prompts, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=True,
                                                                     num_samples=NUM_SAMPLES, seed=seed),
                                 batch_size=128)
    g_rule = [task.follows_rule(s.response) for s in greedy]
    g_topic = [task.on_topic(s.response, s.prompt) for s in greedy]
    g_rm = _rm_scores(rm, greedy, tok.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in (("greedy", greedy), ("sampled", sampled)):
        with (out / f"generations_{name}.jsonl").open("w") as f:
            for s in samples:
                f.write(json.dumps({"prompt": s.prompt, "response": s.response, "finish_reason": s.finish_reason,
                                    "follows_rule": task.follows_rule(s.response)}) + "\n")
    return {"rule_greedy": sum(g_rule) / len(g_rule),
            "rule_sampled": sum(task.follows_rule(s.response) for s in sampled) / len(sampled),
            "on_topic_greedy": sum(g_topic) / len(g_topic), "rm_score_greedy": sum(g_rm) / len(g_rm)}


# ----------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """What every stage shares: the output folder, tokenizer, tokenized data, step counts, switches."""

    out: Path
    tok: Any
    feats: dict[str, list[dict]]
    prompts: list[str]
    steps: dict[str, int]
    seed: int
    progress: bool

    def collator(self, kind: str):
        return (SFTCollator if kind == "sft" else PreferenceCollator)(self.tok.pad_token_id)


def stage_sft(run: _Run, base_dir: Path) -> Change:
    """1. Full finetuning of the random base on sft_train -> `sft/`; held-out token NLL before and after."""
    args = _args(run.out / "sft", run.steps["sft"], SFT["batch"], SFT["lr"], run.seed)
    trainer = _quiet(SFTTrainer(load_model(base_dir), args, train_dataset=run.feats["sft_train"],
                                eval_dataset=run.feats["sft_heldout"], data_collator=run.collator("sft"),
                                processing_class=run.tok), "1/4 SFT", run.progress)
    before = trainer.evaluate()["eval_loss"]
    train_metrics = dict(trainer.train().metrics)
    loss = Change(before, trainer.evaluate()["eval_loss"])
    trainer.save_model(str(run.out / "sft"))
    _plot_stage(run.out / "sft")
    _write(run.out / "sft" / "metrics.json", {"heldout_loss": vars(loss), "train": train_metrics})
    logger.info("SFT: held-out loss %.4g -> %.4g (%d steps)", loss.before, loss.after, run.steps["sft"])
    return loss


def stage_reward_model(run: _Run):
    """2. A classifier on the SFT backbone (new score head), Bradley-Terry on preference_train ->
    `reward_model/`. Returns (held-out accuracy before/after, the trained model in eval mode)."""
    torch.manual_seed(run.seed)  # the new score head
    rm = load_model(run.out / "sft", task="classifier", num_labels=1)
    held, collator = run.feats["preference_heldout"], run.collator("preference")
    before = evaluate_reward_model(rm, held, collator, batch_size=128)
    args = _args(run.out / "reward_model", run.steps["reward_model"], RM["batch"], RM["lr"], run.seed)
    trainer = _quiet(RewardTrainer(rm, args, train_dataset=run.feats["preference_train"], data_collator=collator,
                                   processing_class=run.tok), "2/4 reward model", run.progress)
    train_metrics = dict(trainer.train().metrics)
    trainer.save_model(str(run.out / "reward_model"))
    _plot_stage(run.out / "reward_model")
    after = evaluate_reward_model(rm.eval(), held, collator, batch_size=128)
    _write(run.out / "reward_model" / "metrics.json", {"heldout_before": before, "heldout_after": after,
                                                       "train": train_metrics})
    logger.info("reward model: held-out accuracy %.2f -> %.2f", before["accuracy"], after["accuracy"])
    return Change(before["accuracy"], after["accuracy"]), rm


def stage_dpo(run: _Run, name: str, rm, before_gen: dict[str, float]) -> AdapterNumbers:
    """3./4. DPO(+NLL) from the SFT model with adapter `name` -> `dpo_<name>/`; held-out reward accuracy and
    margin at step 0 and after; generations of the adapter reloaded from disk, scored against `before_gen`."""
    spec, folder = ADAPTERS[name], run.out / f"dpo_{name}"
    torch.manual_seed(run.seed)  # the adapter's initial weights
    policy = apply_adapter(load_model(run.out / "sft"), AdapterConfig.from_dict(spec["adapter"]))
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    args = _args(folder, run.steps["dpo"], DPO["batch"], spec["lr"], run.seed)
    trainer = _quiet(PreferenceTrainer(policy, args, beta=DPO["beta"], loss_type=DPO["loss_type"],
                                       loss_weights=DPO["loss_weights"], train_dataset=run.feats["preference_train"],
                                       eval_dataset=run.feats["preference_heldout"],
                                       data_collator=run.collator("preference"), processing_class=run.tok),
                     f"3/4 DPO+{name}", run.progress)
    ev_before = trainer.evaluate()
    train_metrics = dict(trainer.train().metrics)
    ev_after = trainer.evaluate()
    trainer.save_model(str(folder))
    _plot_stage(folder)
    reloaded = load_adapter(load_model(run.out / "sft"), folder).eval()  # the real loading path
    gen = score_generations(reloaded, run.tok, run.prompts, rm, run.seed, folder)
    _write(folder / "metrics.json", {"heldout_before": ev_before, "heldout_after": ev_after,
                                     "train": train_metrics, "generations": gen})
    logger.info("DPO+%s: held-out reward accuracy %.2f, margin %.4g; rule score greedy %.2f -> %.2f", name,
                ev_after["eval_rewards/accuracies"], ev_after["eval_rewards/margins"], before_gen["rule_greedy"],
                gen["rule_greedy"])
    return AdapterNumbers(
        reward_accuracy=Change(ev_before["eval_rewards/accuracies"], ev_after["eval_rewards/accuracies"]),
        reward_margin=Change(ev_before["eval_rewards/margins"], ev_after["eval_rewards/margins"]),
        **{k: Change(before_gen[k], gen[k]) for k in before_gen}, trainable_parameters=n_train)


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------

def run_pipeline_demo(output_dir: str | Path, *, scale: float = 1.0, seed: int = 0, progress: bool = True,
                      threads: int | None = None) -> PipelineResult:
    """Run every stage (see the module docstring); returns the measured numbers. Nothing is printed.

    `threads`: torch intra-op threads for the run (restored afterwards); None means 1. The model is so
    small that a second thread has nothing to share, and whenever another process wants a core OpenMP's
    barriers make 2 threads ~30x slower per step (measured on 2 shared cores: 12 ms vs 340-450 ms per SFT
    step), so the whole demo takes ~20 s with 1 thread and 4-9 minutes with 2 on a busy 2-core machine.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 (it multiplies every step count), got {scale}")
    old_threads = torch.get_num_threads()
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for 1), got {threads}")
    torch.set_num_threads(threads or 1)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(output_dir)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - since
        return now

    try:
        records = load_task()
        base_dir = build_base(out / "base", _texts(records), seed)
        tok = load_tokenizer(base_dir)
        feats = {name: tokenize_records(recs, tok, max_length=64, max_prompt_length=32)[0]
                 for name, recs in records.items() if name != "prompts_heldout"}
        steps = {"sft": _steps(SFT["steps"], scale), "reward_model": _steps(RM["steps"], scale),
                 "dpo": _steps(DPO["steps"], scale)}
        run = _Run(out, tok, feats, [r.prompt for r in records["prompts_heldout"]], steps, seed, progress)
        t = lap("base", t0)
        sft_loss = stage_sft(run, base_dir)
        t = lap("sft", t)
        rm_accuracy, rm = stage_reward_model(run)
        t = lap("reward_model", t)
        before_gen = score_generations(load_model(out / "sft").eval(), tok, run.prompts, rm, seed, out / "sft")
        logger.info("SFT model generations: %s", before_gen)
        t = lap("generate_sft", t)
        dpo: dict[str, AdapterNumbers] = {}
        for name in ADAPTERS:
            dpo[name] = stage_dpo(run, name, rm, before_gen)
            t = lap(f"dpo_{name}", t)
    finally:
        torch.set_num_threads(old_threads)

    seconds["total"] = time.perf_counter() - t0
    result = PipelineResult(sft_loss=sft_loss, rm_accuracy=rm_accuracy, dpo=dpo, steps=steps, seconds=seconds,
                            num_heldout_prompts=len(run.prompts), num_samples=NUM_SAMPLES, seed=seed, scale=scale,
                            output_dir=str(out))
    _write(out / "results.json", result.to_dict())
    (out / "table.txt").write_text(result.table() + "\n")
    logger.info("pipeline demo done in %.0f s; results in %s", seconds["total"], out / "results.json")
    return result


__all__ = ["ADAPTERS", "load_task", "build_base", "score_generations", "stage_dpo", "stage_reward_model",
           "stage_sft", "run_pipeline_demo"]
