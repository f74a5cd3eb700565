"""`padding_free=None` / `share_prompt=None` (the SFT / DPO / RM trainers' defaults): pack when it is faster and
changes nothing but rounding. SFT packs its sequences; DPO and RM run each pair as one shared-prompt segment of a
packed row (`resolve_share_prompt`), else pack their 2B sequences.

A padding-free batch holds the same examples as the padded one (the sampler is untouched: the same samples are batched
together, in the same order); only their layout changes, so losses, gradients and metrics are those of the padded batch
up to float rounding (tests/trainers/test_varlen.py bounds it: ~1e-7 relative on the loss). It is the default on CPU
where the packed row runs through `alignkit.models.varlen` (sdpa attention, no activation checkpointing, an architecture
tested with it; not measured on GPUs, so not their default) with alignkit's own padded collator (or none given);
anywhere else the default stays the padded batch, and so it does under NEFTune, whose noise is scaled by the row
length (`refuse_noise_scaled_by_row`; true is refused there). `padding_free=True` / `False` decide explicitly. The
layout is resolved when the trainer is built, before accelerate wraps the model: a DDP or FSDP2 run on CPU processes
takes the same default (tests/distributed/test_packing.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from alignkit.adapters import adapter_kind, unwrap_lm, unwrap_parallel
from alignkit.compat import attn_implementation
from alignkit.data import PreferenceCollator, SFTCollator
from alignkit.models import varlen
from alignkit.settings import ConfigError
from alignkit.settings.sections import check_pair_layout

logger = logging.getLogger(__name__)

VARLEN_MODEL_TYPES = varlen.VARLEN_MODEL_TYPES


def varlen_rows(model: nn.Module, checkpointing: bool = False) -> bool:
    """True when a packed row of `model` runs through `varlen_sdpa_attention` (see `alignkit.models.varlen`)."""
    return varlen.runs_varlen(unwrap_lm(model), checkpointing)


def on_cpu(args: Any) -> bool:
    """True when the run trains on CPU: the layout defaults were measured there only (bench/README.md); on an
    accelerator one sdpa call per sequence may cost more kernel launches than the padding it saves, so GPU runs
    keep padded batches unless padding_free / share_prompt are set."""
    device = getattr(args, "device", None)
    return device is None or torch.device(device).type == "cpu"


def refuse_noise_scaled_by_row(key: str, on: bool | None, args: Any) -> bool:
    """Whether NEFTune (`neftune_noise_alpha`) keeps the layout `key` off: transformers' hook scales its noise by
    1 / sqrt(row length x width) (compat row T34), and a packed or shared-prompt row is longer than the padded
    batch's rows (B sequences in one row: about sqrt(B) times less noise than asked for). `on` True: ConfigError;
    None (the default): True, logged, so the padded batch keeps the noise NEFTune is tuned for."""
    alpha = getattr(args, "neftune_noise_alpha", None)
    if not alpha or on is False:
        return False
    if on:
        raise ConfigError(f"train.{key}: true puts a batch's sequences in longer rows, and train.neftune_noise_alpha="
                          f"{alpha:g} scales its noise by 1/sqrt(row length x width) (transformers' NEFTune hook), so "
                          f"the embeddings would get less noise than asked for; remove train.{key} (padded batches) "
                          "or train.neftune_noise_alpha")
    logger.info("%s off: NEFTune (neftune_noise_alpha=%g) scales its noise by the row length, so padded batches "
                "keep the noise it is tuned for", key, alpha)
    return True


def resolve_padding_free(padding_free: bool | None, model: nn.Module, args: Any, collator: Any, paired: bool) -> bool:
    """`padding_free` as given, or for None: on when the run trains on CPU, the layout is `varlen_rows` and the
    collator is alignkit's padded one of the right kind (or none given). Not with NEFTune
    (`refuse_noise_scaled_by_row`)."""
    if refuse_noise_scaled_by_row("padding_free", padding_free, args):
        return False
    if padding_free is not None:
        return bool(padding_free)
    if not on_cpu(args):
        return False
    kind = PreferenceCollator if paired else SFTCollator
    if collator is not None and type(collator) is not kind:
        return False
    return _varlen_default(model, args, "padding-free batches (padding_free=None and sdpa attention): same examples "
                           "per batch, no padding in the linear layers; padding_free=False keeps padded batches")


def check_layout(model: nn.Module, share_prompt: bool | None, padding_free: bool | None, reward_model: bool,
                 ranked: str | None = None) -> None:
    """An explicit `share_prompt` / `padding_free` the model cannot run (a ReFT model, attention other than sdpa /
    eager), refused when the DPO / reward trainer is built instead of at its first step: the CLI's check and
    message (`alignkit.settings.sections.check_pair_layout`). A ReFT model is one that edits positions
    (`span_locations`). `ranked`: why the reward data is ranked (None for pairs)."""
    edits = getattr(unwrap_parallel(model), "span_locations", None) is not None
    check_pair_layout(share_prompt, padding_free, reft_kind=adapter_kind(model) if edits else None,
                      attention=attn_implementation(unwrap_lm(model).config) or None, reward_model=reward_model,
                      where="", ranked=ranked)


def resolve_share_prompt(share_prompt: bool | None, padding_free: bool | None, model: nn.Module, args: Any,
                         collator: Any, collator_required: bool = False) -> bool:
    """`share_prompt` as given, or for None: on when the shared rows run as one varlen row (`varlen_rows`: the
    prompt once, no padding, each response attending over the prompt and itself), the model edits no positions
    (ReFT), padding_free is not asked for and the collator is alignkit's right-padded PreferenceCollator (or none
    given, unless `collator_required`). Same pairs per batch; values equal to the padded batch up to rounding."""
    if padding_free:  # explicit (the DPO / RM trainers resolve None after this)
        refuse_noise_scaled_by_row("padding_free", True, args)
    if refuse_noise_scaled_by_row("share_prompt", share_prompt, args):
        return False
    if share_prompt is not None:
        return bool(share_prompt)
    if padding_free or not on_cpu(args):
        return False
    if collator is None and collator_required:
        return False
    if collator is not None and (type(collator) is not PreferenceCollator
                                 or getattr(collator, "padding_side", "right") != "right"):
        return False
    if getattr(unwrap_parallel(model), "span_locations", None) is not None:
        return False
    return _varlen_default(model, args, "shared-prompt rows (share_prompt=None and sdpa attention): each pair's "
                           "prompt runs once, no padding; share_prompt=False keeps padded batches")


def resolve_online_share_prompt(share_prompt: bool | None, model: nn.Module, device: Any) -> bool:
    """The online trainers' `share_prompt` (each prompt's samples as one row in the reference, rollout and training
    forwards) as given, or for None: on when the run is on CPU, the model edits no positions (ReFT) and the shared
    rows run as varlen rows (`varlen_rows`), as `resolve_share_prompt` decides offline. Same samples, the same
    log-probs up to rounding (tests/online/test_online_trainer.py)."""
    if share_prompt is not None:
        return bool(share_prompt)
    if torch.device(device).type != "cpu":  # measured on CPU only, as offline (`on_cpu`)
        return False
    if getattr(unwrap_parallel(model), "span_locations", None) is not None:
        return False
    return _varlen_default(model, None, "shared-prompt rows (share_prompt=None and sdpa attention): each prompt's "
                           "samples run as one row in the scoring and training forwards, the prompt once; "
                           "share_prompt=False keeps one padded row per sample")


def _varlen_default(model: nn.Module, args: Any, chosen: str) -> bool:
    """The last condition of both defaults (`varlen_rows`), and the one log line saying which layout was chosen."""
    on = varlen_rows(model, bool(getattr(args, "activation_checkpointing", False)))
    if on:
        logger.info(chosen)
    return on


__all__ = ["VARLEN_MODEL_TYPES", "check_layout", "on_cpu", "refuse_noise_scaled_by_row", "resolve_online_share_prompt",
           "resolve_padding_free",
           "resolve_share_prompt", "varlen_rows"]
