"""Fixtures for the trainer tests: tiny data of each kind, a model of each adapter kind, fast arguments."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainingArguments

from alignkit.data import (PreferenceCollator, PreferenceRecord, RankedCollator, RankedRecord, SFTCollator, SFTRecord,
                           UnpairedRecord, tokenize_records)
from alignkit.adapters import AdapterConfig, apply_adapter
from alignkit.models.loading import load_model
from tests.adapters.table import KINDS, ROWS

logging.getLogger("alignkit").setLevel(logging.WARNING)

ADAPTER_KINDS = KINDS  # the shared ADAPTERS table (tests/adapters/table.py)

PROMPTS = ["Question: what is the capital of France?", "Hello! How can I help you", "def add(a, b):",
           "The quick brown fox", "Please answer politely", "0 1 2 3 4", "user assistant", "Thank you very"]
GOOD = [" Answer: Paris.", " today?", "\n    return a + b\n", " jumps over the lazy dog.", " and briefly.",
        " 5 6 7 8 9 10 11", " system human", " much!"]
BAD = [" Answer: 12.", " no", " pass", " sleeps.", " rudely and at length, with no thanks at all.", " 9",
       " dog fox", " little"]


def adapter_config(kind: str, positions: str = "f1+l1") -> AdapterConfig:
    """The table's small config: LoRA r=2 (alpha 4), ReFT rank 2 on layers 0 and 1."""
    return ROWS[kind].config(positions=positions)


@pytest.fixture
def make_model(tiny_dir):
    """Factory: tiny llama (or `arch`) causal LM / classifier with the adapter `kind` applied."""

    def make(kind: str, arch: str = "llama", classifier: bool = False, seed: int = 0):
        base = load_model(tiny_dir(arch, classifier=classifier, num_labels=1) if classifier else tiny_dir(arch),
                          task="classifier" if classifier else "causal_lm", num_labels=1 if classifier else None)
        torch.manual_seed(seed)
        return apply_adapter(base, adapter_config(kind))

    return make


@pytest.fixture(scope="session")
def features(tokenizer):
    """Tokenized features by kind (plain-text records; EOS appended)."""
    sft = [SFTRecord(p, c, id=f"s{i}") for i, (p, c) in enumerate(zip(PROMPTS, GOOD))]
    pref = [PreferenceRecord(p, g, b, id=f"p{i}") for i, (p, g, b) in enumerate(zip(PROMPTS, GOOD, BAD))]
    ranked = [RankedRecord(p, [g, b, g + b][: 2 + i % 2], id=f"r{i}") for i, (p, g, b) in enumerate(zip(PROMPTS, GOOD, BAD))]
    unpaired = [UnpairedRecord(p, g if i % 2 == 0 else b, label=i % 2 == 0, id=f"u{i}")
                for i, (p, g, b) in enumerate(zip(PROMPTS, GOOD, BAD))]
    out = {}
    for name, recs in (("sft", sft), ("preference", pref), ("ranked", ranked), ("unpaired", unpaired)):
        out[name], _ = tokenize_records(recs, tokenizer, max_length=32, max_prompt_length=16)
    return out


@pytest.fixture(scope="session")
def collators(tokenizer):
    pid = tokenizer.pad_token_id
    return {"sft": SFTCollator(pid), "unpaired": SFTCollator(pid), "preference": PreferenceCollator(pid),
            "ranked": RankedCollator(pid)}


def fast_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
