"""Where alignkit leans on other libraries' internals, checked where it is cheap to check.

transformers moves monthly, and several things alignkit relies on are not public API: private
`Trainer` methods it overrides (`_save`, `_load_from_checkpoint`, ...), private config attributes
(`_attn_implementation`), what peft reports when it loads a state dict. When one of them moves, the
code around it usually keeps running and quietly does something else (a Trainer that never calls our
`_save` writes a pickled full model; a renamed sampler hook drops length grouping). The functions here
turn those cases into a `DependencyMoved` error at first use, naming the library, its installed
version, what moved and where alignkit depends on it.

The full list of reliances, each with the test that pins it, is the table "Where alignkit leans on
other libraries' internals" in docs/architecture.md; the tests are in tests/compat/.

    check_trainer(AlignTrainer)            # once per class: overridden / called private Trainer methods
    impl = attn_implementation(model.config)
    check_peft_load(result, folder)        # peft's load report: no unexpected keys
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from typing import Any, Iterable

from transformers import Trainer

from alignkit.adapters import unwrap_lm
from alignkit.interventions.editing import CACHE_KEYWORDS

logger = logging.getLogger(__name__)

DEPENDENCIES = ("transformers", "peft", "accelerate", "datasets", "tokenizers", "torch")


class DependencyMoved(RuntimeError):
    """A library alignkit depends on no longer behaves the way alignkit relies on."""


def version(dep: str) -> str:
    """The installed version of `dep` ("not installed" when it cannot be imported)."""
    try:
        return str(getattr(importlib.import_module(dep), "__version__", "unknown version"))
    except ImportError:
        return "not installed"


def versions(deps: Iterable[str] = DEPENDENCIES) -> dict[str, str]:
    return {d: version(d) for d in deps}


def moved_message(dep: str, what: str, where: str) -> str:
    """One plain line: `<dep> <version>: <what> (alignkit relies on it in <where>)` plus the way out."""
    return (f"{dep} {version(dep)}: {what} (alignkit relies on it in {where}). Install the versions alignkit "
            f"was tested with (constraints.txt), or see docs/architecture.md, 'Where alignkit leans on other "
            f"libraries' internals'")


def moved(dep: str, what: str, where: str) -> DependencyMoved:
    return DependencyMoved(moved_message(dep, what, where))


# ----------------------------------------------------------------------------------------------------
# transformers.Trainer: private methods alignkit overrides or calls
# ----------------------------------------------------------------------------------------------------

# name -> the parameter names (after self) alignkit's override or call assumes, in order
TRAINER_METHODS: dict[str, tuple[str, ...]] = {
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
    "_get_train_sampler": ("train_dataset",),
    "_get_eval_sampler": ("eval_dataset",),
    "_get_num_items_in_batch": ("batch_samples", "device"),
    "_get_dataloader": ("dataset", "description", "batch_size", "sampler_fn", "is_training", "dataloader_key"),
    "training_step": ("model", "inputs", "num_items_in_batch"),
    "_clip_grad_norm": ("model",),
    "_get_grad_norm": ("model", "grad_norm"),
    "_has_mixed_mesh_grads": ("model",),
    "_prepare_inputs": ("inputs",),
    "compute_loss": ("model", "inputs", "return_outputs", "num_items_in_batch"),
    "compute_loss_context_manager": (),
    "prediction_step": ("model", "inputs", "prediction_loss_only", "ignore_keys"),
    "evaluation_loop": ("dataloader", "description"),
    "log": ("logs", "start_time"),
    "floating_point_ops": ("inputs",),
    "get_decay_parameter_names": ("model",),
    "_get_output_dir": ("trial",),
    "_save_checkpoint": ("model", "trial"),
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "train": ("resume_from_checkpoint",),
    "_run_epoch": ("model", "epoch"),
    "save_model": ("output_dir", "_internal_call"),
    "create_accelerator_and_postprocess": (),
}

# class attributes of Trainer that alignkit sets to change the Trainer's behaviour
TRAINER_ATTRIBUTES = ("loss_is_scaled_for_ga",)

# methods alignkit calls on the Trainer without overriding them (checked for every subclass)
TRAINER_CALLED = {"AlignTrainer": ("_has_mixed_mesh_grads", "_prepare_inputs"), "ReftTrainer": ()}


def _params(fn: Any) -> tuple[str, ...]:
    sig = inspect.signature(fn)
    return tuple(n for n, p in sig.parameters.items()
                 if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def trainer_problems(cls: type) -> list[str]:
    """What moved in `transformers.Trainer` for the subclass `cls` (empty when nothing did): each private or
    overridden Trainer method that `cls` (or a base between it and Trainer) defines or calls must still exist
    on Trainer with the parameters alignkit assumes; each Trainer attribute it sets must still exist. A mixin
    before Trainer in the method order (`trainers.sampling.BatchSampling`) counts as the class's own."""
    mro = cls.__mro__
    ours = list(mro[:mro.index(Trainer)]) if Trainer in mro else []
    defined = {name for k in ours for name in vars(k)}
    called = {n for k in ours for n in TRAINER_CALLED.get(k.__name__, ())}
    out = []
    for name, expected in TRAINER_METHODS.items():
        if name not in defined and name not in called:
            continue
        fn = getattr(Trainer, name, None)
        if not callable(fn):
            out.append(f"Trainer.{name} no longer exists")
            continue
        got = _params(fn)
        if got[:len(expected)] != expected:
            out.append(f"Trainer.{name} now takes {got}, not {expected}")
    for name in TRAINER_ATTRIBUTES:
        if name in defined and not hasattr(Trainer, name):
            out.append(f"Trainer no longer reads the class attribute {name!r}")
    return out


@functools.lru_cache(maxsize=None)
def check_trainer(cls: type) -> None:
    """Raise `DependencyMoved` if a Trainer method or attribute `cls` relies on has moved (once per class)."""
    problems = trainer_problems(cls)
    if problems:
        where = f"{cls.__module__}.{cls.__qualname__}"
        raise moved("transformers", "; ".join(problems), where)


# ----------------------------------------------------------------------------------------------------
# transformers models
# ----------------------------------------------------------------------------------------------------


def attn_implementation(config: Any) -> str:
    """The attention implementation a transformers config resolved (`config._attn_implementation`:
    "eager", "sdpa", "flash_attention_2", ...). Packing chooses one row with varlen kwargs for flash
    kernels and block-diagonal rows otherwise, so a silently missing value would pick the wrong layout."""
    if not hasattr(config, "_attn_implementation"):
        raise moved("transformers", f"{type(config).__name__} has no `_attn_implementation`",
                    "alignkit/trainers/logps.py:forward_kwargs and alignkit/trainers/base.py:packed_collator")
    return str(config._attn_implementation or "")


_warned_logits: set[str] = set()


def check_logits_skipped(logits: Any, model_name: str) -> None:
    """`logits_to_keep=<empty index>` must leave the model's own LM head with no position to project
    (`(B, 0, V)` logits). If a model ignores it, results stay right but every step pays for full
    `(B, T, V)` logits: warned once per model class, with the version."""
    if logits is None or getattr(logits, "dim", lambda: 0)() < 2 or logits.shape[-2] == 0:
        return
    if model_name not in _warned_logits:
        _warned_logits.add(model_name)
        logger.warning(moved_message("transformers", f"{model_name} ignored logits_to_keep=<empty index> and "
                                     f"projected all {logits.shape[-2]} positions (full logits: slower, more memory)",
                                     "alignkit/trainers/logps.py:final_hidden_states"))


def cache_keyword(model: Any) -> str:
    """The keyword under which `model`'s forward (and so `generate`) takes a KV cache, and under which its
    output returns it: `cache` from transformers 5.24, `past_key_values` before (5.19 in the vLLM
    environment). Read from the forward's signature of the transformers model under any wrapper; a forward
    that names neither raises `DependencyMoved` instead of passing a cache the model would not use."""
    lm = unwrap_lm(model)
    params = _params(type(lm).forward)
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise moved("transformers", f"{type(lm).__name__}.forward takes no KV cache keyword (looked for "
                f"{' / '.join(CACHE_KEYWORDS)})", "alignkit/online/generation.py:shared_prompt_cache and "
                "alignkit/serve/engine.py")


# ----------------------------------------------------------------------------------------------------
# peft
# ----------------------------------------------------------------------------------------------------

def check_peft_load(result: Any, where: str) -> None:
    """peft's `set_peft_model_state_dict` reports the keys it could not place (`unexpected_keys`); a key
    naming change between saving and loading would otherwise leave the LoRA weights silently untouched."""
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise moved("peft", f"set_peft_model_state_dict did not place {len(unexpected)} saved tensor(s) "
                    f"(e.g. {unexpected[:3]}) from {where}", "alignkit/adapters/lora.py:Lora.load_weights")


__all__ = ["DEPENDENCIES", "DependencyMoved", "TRAINER_METHODS", "attn_implementation", "cache_keyword",
           "check_logits_skipped", "check_peft_load", "check_trainer", "moved", "moved_message", "trainer_problems",
           "version", "versions"]
