"""The ReFT demo (`alignkit demo`): teach a tiny random model a dozen answers with a LoReFT alone.

Steps, all local and on CPU:
1. train a byte-level BPE tokenizer on the bundled prompt/answer pairs (resources/demo/reft_pairs.jsonl),
   build a tiny random Llama from config, save both and load them back with `from_pretrained`;
2. greedy answers of the base model (gibberish: its weights are random);
3. attach LoReFT (rank 16, every layer, positions "f5+l5" of the prompt) with `apply_adapter` and train it
   with the ordinary `SFTTrainer` (SFT records, `SFTCollator`) until the loss is below `target_loss` (or
   `max_steps`): a ReFT is an adapter, not a trainer;
4. save the ReFT (interventions only: an adapter folder), load it back onto a freshly loaded base with
   `load_adapter`, and generate again with plain `generate(**inputs)`: the positions were saved with the
   weights, so the reloaded ReFT edits what training edited.

Memorisation by a ReFT on a random base needs a base whose logits can be confident (initializer_range
0.2, not 0.02) and enough depth to carry the stop token to positions no intervention touches (4 layers);
see tests/interventions/test_reft_training.py. Nothing here prints; progress goes through `logging`
and the Trainer's progress bar.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments

from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter, load_adapter
from alignkit.data import PromptRecord, SFTCollator, SFTRecord, tokenize_records
from alignkit.data.collators import PromptCollator
from alignkit.files import DataError
from alignkit.interventions.config import ReftConfig
from alignkit.interventions.training import StopAtLoss
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.models.tiny import build_tiny_tokenizer, tiny_config
from alignkit.trainers import SFTTrainer

logger = logging.getLogger(__name__)

POSITIONS = "f5+l5"
NUM_LAYERS = 4
RANK = 16


@dataclass
class DemoResult:
    prompts: list[str]
    answers: list[str]
    before: list[str]  # the base model's greedy answers
    after: list[str]  # the reloaded ReFT's greedy answers
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    output_dir: str = ""

    @property
    def num_correct(self) -> int:
        return sum(a.strip() == b.strip() for a, b in zip(self.after, self.answers))


def load_demo_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file of {"prompt", "response"} (default: the bundled file)."""
    if path is None:
        text = resources.files("alignkit").joinpath("resources/demo/reft_pairs.jsonl").read_text()
        where = "alignkit/resources/demo/reft_pairs.jsonl"
    else:
        text, where = Path(path).read_text(), str(path)
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pairs.append((str(rec["prompt"]), str(rec["response"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{where}, line {n}: expected a JSON object with 'prompt' and 'response' "
                            f"({type(e).__name__}: {e}); --pairs takes {{\"prompt\": ..., \"response\": ...}} "
                            "lines") from e
    if not pairs:
        raise DataError(f"{where}: no records; --pairs takes {{\"prompt\": ..., \"response\": ...}} lines")
    return pairs


def build_demo_base(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """Tiny random Llama (hidden 64, 4 layers, initializer_range 0.2) + tokenizer trained on `texts`."""
    tok = build_tiny_tokenizer(texts, vocab_size=400)
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=64, num_layers=NUM_LAYERS,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.initializer_range = 0.2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    logger.info("built a tiny random Llama (%d parameters) and its tokenizer in %s",
                sum(p.numel() for p in model.parameters()), folder)
    return folder


class _LossBar:
    """A tqdm bar over training steps with the loss in its postfix (replaces the Trainer's own printing,
    which writes one dict per logged step)."""

    def __new__(cls, enabled: bool):
        class Bar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.bar = tqdm(total=state.max_steps, desc="training ReFT", disable=not enabled, leave=False)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4g}")
                    self.bar.n = state.global_step
                    self.bar.refresh()

            def on_train_end(self, args, state, control, **kw):
                self.bar.close()

        return Bar()


def _greedy(model, tok, prompts: list[str]) -> list[str]:
    """Greedy answers; a ReFT places its saved positions itself (plain `generate(**inputs)`)."""
    features, _ = tokenize_records([PromptRecord(p, id=f"p{i}") for i, p in enumerate(prompts)], tok,
                                   formatter="plain", max_length=None, max_prompt_length=None)
    batch = PromptCollator(tok.pad_token_id, padding_side="left")(features)
    enc = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def run_reft_demo(output_dir: str | Path = "runs/demo", *, max_steps: int = 300, target_loss: float = 0.05,
                  learning_rate: float = 2e-2, seed: int = 0, pairs_file: str | Path | None = None,
                  progress: bool = True) -> DemoResult:
    """Run the demo end to end; returns the before/after answers. Writes base/, reft/ and run/ under
    `output_dir`."""
    out = Path(output_dir)
    pairs = load_demo_pairs(pairs_file)
    prompts, answers = [p for p, _ in pairs], [r for _, r in pairs]
    base_dir = build_demo_base(out / "base", [p + " " + r for p, r in pairs], seed=seed)
    tok = load_tokenizer(base_dir)
    before = _greedy(load_model(base_dir).eval(), tok, prompts)

    torch.manual_seed(seed)
    reft_config = ReftConfig.uniform(list(range(NUM_LAYERS)), "loreft", low_rank_dimension=RANK).to_dict()
    model = apply_adapter(load_model(base_dir), AdapterConfig(kind="reft", reft=ReftSettings(config=reft_config,
                                                                                               positions=POSITIONS)))
    # responses start with a space so that no BPE token straddles the prompt/response boundary
    records = [SFTRecord(p, " " + a, id=f"pair-{i}") for i, (p, a) in enumerate(pairs)]
    features, _ = tokenize_records(records, tok, formatter="plain", add_eos=True, max_length=None,
                                   max_prompt_length=None)
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=len(pairs),
                             learning_rate=learning_rate, max_steps=max_steps, lr_scheduler_type="cosine",
                             weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model, args, train_dataset=features, data_collator=SFTCollator(tok.pad_token_id),
                         callbacks=[StopAtLoss(target_loss), _LossBar(progress)], processing_class=tok)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    logger.info("trained %d steps, final loss %.4g", trainer.state.global_step, losses[-1] if losses else float("nan"))
    trainer.save_model(str(out / "reft"))

    reloaded = load_adapter(load_model(base_dir), out / "reft").eval()  # the real loading path
    after = _greedy(reloaded, tok, prompts)
    result = DemoResult(prompts, answers, before, after, losses, trainer.state.global_step, str(out))
    logger.info("ReFT reproduces %d of %d answers; saved to %s", result.num_correct, len(answers), out / "reft")
    return result


__all__ = ["DemoResult", "load_demo_pairs", "build_demo_base", "run_reft_demo"]
