"""What `AlignTrainer` does to the data it is given before the `transformers.Trainer` sees it.

Raw data (TRL-style). `train_dataset` / `eval_dataset` may be raw rows with TRL's columns (a `datasets.Dataset`
or a list of dicts) or alignkit records, with the tokenizer as `processing_class`: `prepare_data` tokenizes them
(`alignkit.data.prepare`: `datasets.map`, cached, `dataset_num_proc` processes, a progress bar) under the
trainer's `TokenizeConfig` (max_length, max_prompt_length, formatter, loss_on) and picks the collator for the
data's kind (`DEFAULT_COLLATORS`) when `data_collator` is not given. A dict `eval_dataset` (several evaluation
sets) is tokenized set by set, as TRL's trainers do; `prepare_one` is one dataset's step, also used by
`AlignTrainer.evaluate` for raw rows given to it.

The two alternative batch layouts an objective can ask for: `packed_collator` (`padding_free=True`) and
`shared_prompt_collator` (`share_prompt=True`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from alignkit.adapters import unwrap_lm
from alignkit.compat import attn_implementation
from alignkit.data import PreferenceCollator, RankedCollator, SFTCollator
from alignkit.data.collators import PackedPreferenceCollator, PackedSFTCollator, SharedPromptCollator, packed_version
from alignkit.data.prepare import feature_kind, is_tokenized, prepare_dataset
from alignkit.data.tokenize import TokenizeConfig
from alignkit.settings import ConfigError
from alignkit.models import varlen

# feature kind (alignkit.data.prepare.feature_kind) -> the collator a trainer uses when none is given
DEFAULT_COLLATORS = {"sft": SFTCollator, "unpaired": SFTCollator, "preference": PreferenceCollator,
                     "ranked": RankedCollator}


def prepare_data(kwargs: dict[str, Any], record_kinds: tuple[str, ...], config: TokenizeConfig,
                 num_proc: int | None, owner: str) -> None:
    """Tokenize raw `train_dataset` / `eval_dataset` in place in the Trainer's `kwargs` (as records of
    `record_kinds`, preferred first) and default `data_collator` for the data's kind. `owner` (the trainer's
    class name) starts the error for raw rows without a tokenizer, or for data without a length (refused)."""
    if "sft" not in record_kinds and config.loss_on != TokenizeConfig.loss_on:  # the CLI refuses data.loss_on alike
        raise ConfigError(f"{owner}: loss_on={config.loss_on!r} is read only by SFTTrainer (which tokens of a "
                          f"conversation are trained); {owner} scores its completions whatever it says, so it would "
                          f"be ignored; remove it")
    tok = kwargs.get("processing_class")
    kind = None
    given, tokenized_here = [], False
    for key in ("train_dataset", "eval_dataset"):
        ds = kwargs.get(key)
        if ds is None:
            continue
        given.append(key)
        if isinstance(ds, dict):  # several evaluation sets (eval_<name>_loss): each one tokenized, as TRL's trainers
            sets = {name: prepare_one(f"{key}[{name!r}]", d, tok, record_kinds, config, num_proc, owner)
                    for name, d in ds.items()}
            kwargs[key] = {name: d for name, (d, _, _) in sets.items()}
            tokenized_here = tokenized_here or any(here for _, _, here in sets.values())
            kind = kind or next((k for _, k, _ in sets.values() if k is not None), None)
            continue
        ds, k, here = prepare_one(key, ds, tok, record_kinds, config, num_proc, owner)
        kwargs[key], tokenized_here, kind = ds, tokenized_here or here, kind or k
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(TokenizeConfig)
               if getattr(config, f.name) != f.default]
    if given and not tokenized_here and changed:
        raise ConfigError(f"{owner}: {', '.join(changed)} would be ignored: tokenization settings apply only when the "
                          f"trainer tokenizes raw rows, and {' and '.join(given)} {'is' if len(given) == 1 else 'are'} "
                          f"already tokenized; pass them to tokenize_records instead (max_dropped_fraction: to "
                          f"alignkit.data.prepare.check_dropped with its stats), or give the raw rows")
    if kwargs.get("data_collator") is None and kind is not None and tok is not None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cls = DEFAULT_COLLATORS.get(kind)
        if cls is not None:
            kwargs["data_collator"] = cls(pad_id)


def prepare_one(name: str, ds: Any, tok: Any, record_kinds: tuple[str, ...], config: TokenizeConfig,
                num_proc: int | None, owner: str) -> tuple[Any, str | None, bool]:
    """(tokenized `ds`, its feature kind, whether it was tokenized here) for one dataset named `name` (the key of
    the trainer's argument, `eval_dataset['<set>']` for one of several evaluation sets, or `evaluate`'s)."""
    if not hasattr(ds, "__len__"):  # else a TypeError from len() below, or from datasets.map
        raise ValueError(f"{owner}: {name} ({type(ds).__name__}) has no length (an iterable or streaming "
                         "dataset), which alignkit's trainers do not read: they tokenize and count the examples, "
                         "and a resumed run compares them with its checkpoint's; pass map-style data (a list of "
                         "rows, a datasets.Dataset: Dataset.from_generator, or list() of the rows)")
    if is_tokenized(ds):
        return ds, (feature_kind(ds[0]) if len(ds) else None), False
    if tok is None:
        raise ValueError(f"{owner}: {name} holds raw rows {_describe(ds)}; pass the tokenizer "
                         f"as processing_class=tokenizer so the trainer can tokenize them")
    ds, kind = prepare_dataset(ds, tok, record_kinds, config, num_proc=num_proc, name=name)
    return ds, kind, True


def packed_collator(collator: Any, model: nn.Module, paired: bool, checkpointing: bool = False) -> Any:
    """The padding-free collator for `padding_free=True`: the packed version of `collator` (or a new one), one
    row for flash-attention and for sdpa models that run `alignkit.models.varlen` (varlen kernels / attention
    per sequence), rows of the batch's longest sequence otherwise (eager, or sdpa under activation
    checkpointing, attend over a whole row with a block-diagonal mask, so one long row would cost S^2)."""
    impl = attn_implementation(unwrap_lm(model).config)
    row_length = None if "flash" in impl or varlen.runs_varlen(unwrap_lm(model), checkpointing) else "longest"
    if collator is None:
        return PackedPreferenceCollator(row_length) if paired else PackedSFTCollator(row_length)
    return packed_version(collator, row_length)


def shared_prompt_collator(collator: Any) -> Any:
    """The collator for `share_prompt=True`: `collator` (a padded preference collator) wrapped so that its batches
    also carry the shared-prompt layout (`alignkit.data.collators.SharedPromptCollator`)."""
    if isinstance(collator, SharedPromptCollator):
        return collator
    if isinstance(collator, PackedPreferenceCollator):
        raise ValueError("share_prompt and padding_free are two different layouts: set one of them")
    return SharedPromptCollator(collator, int(getattr(collator, "pad_token_id", 0) or 0))


def _describe(ds: Any) -> str:
    cols = list(getattr(ds, "column_names", None) or (list(ds[0]) if isinstance(ds, (list, tuple)) and ds and
                                                          isinstance(ds[0], dict) else []))
    return f"(columns {cols})" if cols else f"({type(ds).__name__})"


__all__ = ["DEFAULT_COLLATORS", "packed_collator", "prepare_data", "prepare_one", "shared_prompt_collator"]
