"""alignkit's own calls into transformers / peft / accelerate / datasets raise no deprecation warning (row W1 of the
table in docs/architecture.md).

pyproject.toml filters DeprecationWarning and FutureWarning out of the test output, so a name alignkit uses that a
library has scheduled for removal would otherwise stay invisible until the release that removes it. Here every
`warnings.warn` of those categories issued while alignkit's main paths run is traced to the frame that called into
the warning library: when that frame is alignkit's code, the test fails naming the library, its version, the
warning and alignkit's file and line. Deprecations one library triggers in another (peft calling a deprecated
transformers method) are not alignkit's to fix; they are listed in docs/architecture.md instead.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

import alignkit
from alignkit.compat import version

from .guards import fail

LIBRARIES = ("transformers", "peft", "accelerate", "datasets")
ALIGNKIT = str(Path(alignkit.__file__).parent) + os.sep
PREFIXES = {lib: str(Path(__import__(lib).__file__).parent) + os.sep for lib in LIBRARIES}
HELPERS = ("warnings.py", "deprecation.py")  # warning helpers' own frames (python's, transformers.utils.deprecation)


def _library(path: str) -> str | None:
    return next((lib for lib, prefix in PREFIXES.items() if path.startswith(prefix)), None)


class Recorder:
    """Wraps `warnings.warn`: for each deprecation warning raised by one of LIBRARIES, who called into it."""

    def __init__(self) -> None:
        self.ours: list[tuple[str, str, str]] = []  # (library, message, alignkit file:line)
        self.upstream: list[tuple[str, str, str]] = []  # (library, message, calling library)
        self._real = warnings.warn

    def __call__(self, message, category=None, stacklevel=1, source=None, **kw):  # noqa: ANN001
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(cat, (DeprecationWarning, FutureWarning)):
            self._trace(str(message))
        return self._real(message, category, stacklevel + 1, source, **kw)

    def _trace(self, message: str) -> None:
        frame = sys._getframe(2)  # the code that called warnings.warn
        lib = None
        while frame is not None:
            path = frame.f_code.co_filename
            owner = _library(path)
            if lib is None:
                lib = owner
                if lib is None and not path.endswith(HELPERS):
                    return  # not a warning of the libraries watched here
            elif owner != lib and not path.endswith(HELPERS):
                if path.startswith(ALIGNKIT):
                    self.ours.append((lib, message, f"{path[len(ALIGNKIT):]}:{frame.f_lineno}"))
                elif owner is not None:
                    self.upstream.append((lib, message, owner))
                return
            frame = frame.f_back


def test_alignkit_calls_no_deprecated_api(tiny_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from alignkit.data import SFTCollator, SFTRecord, tokenize_records
    from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter, load_adapter, save_adapter
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.online.generation import SamplingConfig, generate_responses
    from alignkit.trainers import SFTTrainer

    rec = Recorder()
    monkeypatch.setattr(warnings, "warn", rec)
    feats, _ = tokenize_records([SFTRecord("Hello! How can I help", " you today?", id="0"),
                                 SFTRecord("The quick brown fox", " jumps.", id="1")], tokenizer, max_length=32)
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}, positions="l1")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tok = load_tokenizer(tiny_dir("llama"))
        for kind in ("reft+lora",):  # peft, ReFT and the Trainer in one pass
            torch.manual_seed(0)
            model = apply_adapter(load_model(tiny_dir("llama")),
                                  AdapterConfig(kind=kind, lora=LoraSettings(r=2) if "lora" in kind else LoraSettings(),
                                                reft=reft if "reft" in kind else None))
            args = TrainingArguments(output_dir=str(tmp_path / kind), per_device_train_batch_size=2, max_steps=1,
                                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                     activation_checkpointing=True, logging_steps=1)
            trainer = SFTTrainer(model, args, train_dataset=feats, data_collator=SFTCollator(tok.pad_token_id),
                                 processing_class=tok)
            trainer.train()
            trainer.save_model(str(tmp_path / kind / "model"))
            back = load_adapter(load_model(tiny_dir("llama")), tmp_path / kind / "model")
            generate_responses(back, tok, ["Hello! How"], SamplingConfig(max_new_tokens=3, do_sample=False))
            save_adapter(back, tmp_path / kind / "again")
    if rec.ours:
        lines = "; ".join(f"{lib} {version(lib)}: {msg!r} at alignkit/{where}" for lib, msg, where in rec.ours)
        fail(rec.ours[0][0], f"alignkit calls API its library has deprecated ({len(rec.ours)} warning(s)): {lines}",
             "the alignkit lines named")
