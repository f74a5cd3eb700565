"""The fixed inputs of the TRL parity check, shared by `bench/parity_trl.py` (which records TRL's numbers)
and `tests/parity/test_trl_parity.py` (which recomputes alignkit's in CI, without TRL).

- model: `alignkit.models.tiny.build_tiny_model(**MODEL_ARGS)` on `build_tiny_tokenizer()` = the REFERENCE;
  the POLICY is a copy with every weight moved by `PERTURB["scale"] * N(0, 1)` drawn from a CPU
  `torch.Generator` seeded with `PERTURB["seed"]`, parameters in `named_parameters()` order. So the
  reference differs from the policy and every log-ratio is non-zero.
- rows: TRL-style columns (`prompt`/`chosen`/`rejected`), plain text and conversational; plain
  prompts end on a word and completions start with their space, so no BPE token spans the boundary.
- cases: the TRL `loss_type`s alignkit also has, with their settings.
- `alignkit_case`: alignkit's loss and metrics through the public path a user takes
  (`load_records` -> `tokenize_records` -> `PreferenceCollator` -> `PreferenceTrainer.compute_loss`).

Nothing here imports TRL.
"""

from __future__ import annotations

import copy
import hashlib
import math
import tempfile
from typing import Any

import torch
from torch import nn

MODEL_ARGS: dict[str, Any] = {"arch": "llama", "seed": 0, "hidden_size": 32, "num_layers": 2, "num_heads": 4}
PERTURB: dict[str, Any] = {"seed": 1234, "scale": 0.05}
BETA = 0.1
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")

LOGP_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")


def close(got: float, want: float, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """alignkit's figure `got` is TRL's `want` (the parity tolerance; a non-finite `got` never is)."""
    return math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want)


def parity_problems(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Where alignkit's case result `got` (`alignkit_case`) differs from TRL's `want`: each per-pair log-prob, the
    loss, each of METRICS (atol 1e-5), as tests/parity/test_trl_parity.py checks them; [] = the same."""
    out = []
    for key in LOGP_KEYS:
        if len(got[key]) != len(want[key]):
            out.append(f"{key}: {len(got[key])} vs {len(want[key])} values")
        out += [f"{key}[{i}]: alignkit {g} != TRL {w}" for i, (g, w) in enumerate(zip(got[key], want[key]))
                if not close(g, w)]
    if not close(got["loss"], want["loss"]):
        out.append(f"loss: alignkit {got['loss']} != TRL {want['loss']}")
    return out + [f"{m}: alignkit {got['metrics'][m]} != TRL {want['metrics'][m]}" for m in METRICS
                  if not close(got["metrics"][m], want["metrics"][m], atol=1e-5)]


PLAIN_ROWS: list[dict[str, Any]] = [
    {"prompt": "Question: what is the capital of France? Answer:", "chosen": " Paris.", "rejected": " Lazy dog."},
    {"prompt": "Hello! How can I help", "chosen": " you today?", "rejected": " the quick brown fox jumps over it?"},
    {"prompt": "def add(a, b):\n   ", "chosen": " return a + b\n", "rejected": " return a"},
    {"prompt": "Please answer politely and", "chosen": " briefly. Thank you very much!", "rejected": " 1 2 3"},
]

CONVERSATIONAL_ROWS: list[dict[str, Any]] = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "The lazy dog."}]},
    {"prompt": [{"role": "system", "content": "Answer politely and briefly."},
                {"role": "user", "content": "Hello! How can I help you today?"}],
     "chosen": [{"role": "assistant", "content": "Thank you very much!"}],
     "rejected": [{"role": "assistant", "content": "0 1 2 3 4 5"}]},
    {"prompt": [{"role": "user", "content": "def add(a, b):"},
                {"role": "assistant", "content": "return a + b"},
                {"role": "user", "content": "Thank you!"}],
     "chosen": [{"role": "assistant", "content": "Hello! You are very welcome."}],
     "rejected": [{"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}]},
]

DATASETS = {"plain": PLAIN_ROWS, "conversational": CONVERSATIONAL_ROWS}

# name -> TRL DPOConfig settings (loss_type, loss_weights, label_smoothing, beta). alignkit takes the same,
# except where a convention differs (see `alignkit_settings`).
CASES: dict[str, dict[str, Any]] = {
    "sigmoid": {"loss_type": ["sigmoid"]},
    "sigmoid_ls0.1": {"loss_type": ["sigmoid"], "label_smoothing": 0.1},
    "ipo": {"loss_type": ["ipo"]},
    "hinge": {"loss_type": ["hinge"]},
    "robust_ls0.1": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "exo_pair_ls1e-3": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    "nca_pair": {"loss_type": ["nca_pair"]},
    "bco_pair": {"loss_type": ["bco_pair"]},
    "sppo_hard": {"loss_type": ["sppo_hard"]},
    "apo_zero": {"loss_type": ["apo_zero"]},
    "apo_down": {"loss_type": ["apo_down"]},
    "sigmoid_norm": {"loss_type": ["sigmoid_norm"]},
    "sft": {"loss_type": ["sft"]},
    "sigmoid+sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "sigmoid+ipo+sppo_hard": {"loss_type": ["sigmoid", "ipo", "sppo_hard"], "loss_weights": [0.7, 0.2, 0.1]},
}


def trl_settings(case: dict[str, Any]) -> dict[str, Any]:
    """The case as TRL DPOConfig keyword arguments."""
    return {"loss_type": list(case["loss_type"]), "loss_weights": case.get("loss_weights"),
            "label_smoothing": case.get("label_smoothing", 0.0), "beta": case.get("beta", BETA)}


def alignkit_settings(case: dict[str, Any]) -> dict[str, Any]:
    """The case as alignkit settings that give TRL 1.16's numbers.

    Convention switch: TRL 1.16's `sigmoid` ignores `label_smoothing` (plain DPO), alignkit's `sigmoid` with
    label_smoothing > 0 is cDPO; so a TRL run of `sigmoid` with label_smoothing = eps equals alignkit's with
    label_smoothing = 0 (only when no other loss in the list reads label_smoothing).
    """
    s = trl_settings(case)
    if s["loss_type"] == ["sigmoid"]:
        s["label_smoothing"] = 0.0
    return s


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every state-dict tensor, names sorted."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_checksum(tokenizer: Any) -> str:
    """SHA-256 of the serialised fast tokenizer and its chat template."""
    blob = tokenizer.backend_tokenizer.to_str() + "|" + str(tokenizer.chat_template)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_models() -> tuple[Any, nn.Module, nn.Module]:
    """(tokenizer, policy, reference), float32, eval mode, reference frozen."""
    from alignkit.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    args = dict(MODEL_ARGS)
    reference = build_tiny_model(args.pop("arch"), tok, **args).float().eval()
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(PERTURB["seed"])
    with torch.no_grad():
        for _, p in policy.named_parameters():
            p.add_(PERTURB["scale"] * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for p in reference.parameters():
        p.requires_grad_(False)
    return tok, policy, reference


def alignkit_features(rows: list[dict[str, Any]], tokenizer: Any, **tokenize: Any) -> list[dict[str, Any]]:
    """alignkit's tokenized preference features of TRL-style rows. TRL's conventions: EOS appended to plain-text
    completions only (add_eos=None, the default), and no truncation (max_length=None, max_prompt_length=None)."""
    from alignkit.data import load_records, tokenize_records

    cfg = {"max_length": None, "max_prompt_length": None, **tokenize}
    records = load_records([dict(r) for r in rows], kind="preference")
    features, stats = tokenize_records(records, tokenizer, **cfg)
    if stats.kept != len(rows):
        raise AssertionError(f"alignkit dropped rows: {stats.summary()}")
    return features


def alignkit_case(tokenizer: Any, policy: nn.Module, reference: nn.Module, rows: list[dict[str, Any]],
                  case: dict[str, Any]) -> dict[str, Any]:
    """alignkit's loss, batch-mean metrics and per-pair log-probs for one case, on one batch of all `rows`."""
    from transformers import TrainingArguments

    from alignkit.data import PreferenceCollator
    from alignkit.losses import PreferenceParams
    from alignkit.trainers import PreferenceTrainer
    from alignkit.trainers.logps import completion_logps

    s = alignkit_settings(case)
    features = alignkit_features(rows, tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    batch = collator(features)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True, per_device_train_batch_size=len(rows),
                                 save_strategy="no")
        trainer = PreferenceTrainer(copy.deepcopy(policy), args, loss_type=s["loss_type"],
                                    loss_weights=s["loss_weights"],
                                    params=PreferenceParams(beta=s["beta"], label_smoothing=s["label_smoothing"]),
                                    reference="copy", ref_model=reference, data_collator=collator,
                                    processing_class=tokenizer)
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
            B = len(rows)
            pol, _ = completion_logps(trainer.model, batch)  # (2B,)
            ref, _ = completion_logps(reference, batch)  # (2B,)
        metrics = {k: float(sv / n) for k, (sv, n) in trainer._metrics["eval"].items()}
    return {"loss": float(loss), "metrics": {k: metrics[k] for k in METRICS},
            "policy_chosen_logps": pol[:B].tolist(), "policy_rejected_logps": pol[B:].tolist(),
            "reference_chosen_logps": ref[:B].tolist(), "reference_rejected_logps": ref[B:].tolist()}
