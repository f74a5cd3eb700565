"""The adapter protocol, its registry, and what a wrapped model is.

An `Adapter` is how a model is changed, as an object: one per kind (`full.py`, `lora.py`, `reft.py`,
`reft_lora.py`, registered by `@register_adapter`). Callers ask it instead of testing a kind string:

| method / attribute          | what it does                                                                |
|-----------------------------|-----------------------------------------------------------------------------|
| `wrap(model)`               | the model to train (peft / ReFT wrappers, `requires_grad` set)              |
| `off(model)`                | context: the model computes as its base (a reference without a copy)        |
| `route(name)`               | serving: which LoRA / ReFT adapter and positions a row named `name` uses    |
| `save(model, folder)`       | the trainable state only (the whole model for full finetuning)              |
| `load(model, folder)`       | wrap a base model with a saved folder; `load_weights`: in place (resume)    |
| `describe(model)`           | the model card's adapter table; `info` its Hub library name and tags        |
| `can_switch_off`            | `off` works (every kind but full finetuning)                                |
| `kept_when_off()`           | modules `off` leaves trained (a ReFT's own `modules_to_save`): not the base |
| `saves_whole_model`         | the trainable state is the whole model (its checkpoints are the Trainer's)  |
| `weight_files`              | (file, what) a saved folder must hold; `require_files(folder)` refuses one  |
|                             | lacking any (before a model is loaded)                                      |
| `trained_task(folder)`      | what a saved folder was trained to score with: ("classifier" / "causal_lm", |
|                             | the evidence), None when the folder does not say                            |
| `vllm_sync`                 | how vLLM gets the weights: "weights" (whole state dict), "lora_request"     |
|                             | (peft's files as a vLLM LoRA), None (vLLM cannot run this kind: ReFT)       |

`adapter_of(model)` finds the adapter of a wrapped model (from its wrappers, with the `AdapterConfig` that
`apply_adapter` / `load_adapter` recorded on it); `adapter_for(config)` the one a config asks for.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from alignkit.adapters.config import ADAPTER_CONFIG_NAME, AdapterConfig, KindInfo, KINDS, read_adapter_config
from alignkit.interventions.attach import ReftModel
from alignkit.interventions.config import Positions
from alignkit.interventions.locate import hf_model, is_peft_model
from alignkit.models.hub_cache import cached_snapshots, hub_cache_snapshot
from alignkit.models.rope import rope_change, rope_record
from alignkit.settings.typed import ConfigError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# What a wrapped model is
# ----------------------------------------------------------------------------------------------------

_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel / FSDP (v1) / DeepSpeed wrappers (what `accelerate` puts around
    it in `Trainer`); the ReFT and peft wrappers stay."""
    while type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_reft(model: nn.Module) -> bool:
    return isinstance(unwrap_parallel(model), ReftModel)


def unwrap_lm(model: nn.Module) -> nn.Module:
    """The transformers model under the ReFT and peft wrappers (and DDP's `.module`)."""
    model = unwrap_parallel(model)
    return hf_model(model.model if is_reft(model) else model)


def is_classifier(model: nn.Module) -> bool:
    return type(unwrap_lm(model)).__name__.endswith("ForSequenceClassification")


SCORE_HEADS = ("score", "classifier")  # what transformers' *ForSequenceClassification models call their head


def head_names(model: nn.Module, names: list[str] | None) -> list[str]:
    """The modules trained with a frozen-base adapter: `names`, or a sequence classifier's head."""
    if names is not None:
        return names
    if not is_classifier(model):
        return []
    lm = unwrap_lm(model)
    return [n for n in SCORE_HEADS if isinstance(getattr(lm, n, None), nn.Module)][:1]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached tensor of every parameter that requires grad (what an optimizer updates)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """How one served row is computed: which LoRA (None: none) and which ReFT adapter (None: none), and the
    ReFT's prompt positions."""

    name: str
    kind: str  # an adapter kind, or "base"
    lora: str | None = None
    reft: str | None = None
    positions: Positions | None = None
    share_weights: bool = True


class Adapter:
    """One kind of adapter (see the module docstring). `config` is None for a model that `apply_adapter` /
    `load_adapter` did not build (e.g. a bare `get_reft_model`); `own_config` then describes it for saving."""

    kind: ClassVar[str] = ""
    can_switch_off: ClassVar[bool] = True
    saves_whole_model: ClassVar[bool] = False
    merges: ClassVar[bool] = False  # foldable into the model's own weights (`adapters.merge.merge_adapter`)
    weight_files: ClassVar[tuple[tuple[str, str], ...]] = ()
    other_files: ClassVar[tuple[str, ...]] = ()  # glob patterns of the other files a save may write (`saved_files`)
    vllm_sync: ClassVar[str | None] = None  # serve --engine vllm / generation_backend vllm (module docstring)

    def __init__(self, config: AdapterConfig | None = None) -> None:
        self.config = config

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    # -- which models are wrapped this way: exactly one registered kind answers True for any model
    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def off(self, model: nn.Module) -> ContextManager[nn.Module]:
        raise NotImplementedError

    def route(self, name: str) -> Route:
        raise NotImplementedError

    def kept_when_off(self) -> list[str]:
        """The modules `off` leaves as trained (trained whole in place, no base copy to switch back to): [] when
        `off` gives the base model exactly."""
        return []

    def save_weights(self, model: nn.Module, folder: Path, config: AdapterConfig,
                     state_dict: dict[str, torch.Tensor] | None) -> None:
        raise NotImplementedError

    def load(self, model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
        raise NotImplementedError

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def own_config(self, model: nn.Module) -> AdapterConfig:
        """The config of a model built without `apply_adapter` (enough for kinds that need no settings)."""
        return AdapterConfig(kind=self.kind)

    def require_files(self, folder: str | Path) -> None:
        """FileNotFoundError naming the first of `weight_files` that `folder` lacks: checked before any model is
        loaded (a ReFT folder without its reft_config.json used to fail only after the base had loaded)."""
        for name, what in self.weight_files:
            if not (Path(folder) / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name} ({what}), which a {self.kind} folder holds; point it "
                                        "at the complete folder save_adapter wrote (a finished run's model/)")

    @classmethod
    def saved_files(cls, folder: Path) -> set[str]:
        """The names of the files in `folder` that a save of this kind writes (`weight_files`, `other_files`)."""
        names = {n for n, _ in cls.weight_files} | {p.name for g in cls.other_files for p in folder.glob(g)}
        return {n for n in names if (folder / n).is_file()}

    def written_files(self, folder: Path, config: AdapterConfig) -> set[str]:
        """The names of the files the save of `config` into `folder` just wrote (`save`: what an earlier save of
        another kind or part set left is removed)."""
        return self.saved_files(folder)

    def trained_task(self, folder: Path) -> tuple[str, str] | None:
        """("classifier" or "causal_lm", the evidence in `folder`) for the head this saved adapter was trained
        with (a reward model's score head or an LM head), None when the folder does not say (a whole model says it
        in its config.json: `alignkit.cli.models.check_head`)."""
        return None

    def describe(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The model card's adapter table: the kind, its settings, and parameter counts of `model`."""
        out: dict[str, Any] = {"kind": self.kind}
        out.update(self.settings_summary())
        if model is not None:
            out["trainable parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out["total parameters"] = sum(p.numel() for p in model.parameters())
        return out

    def settings_summary(self) -> dict[str, Any]:
        return {}

    def how_to_load(self, folder: str, base: str, classifier: bool, rope_scaling: dict[str, Any] | None = None) -> str:
        """Python that loads a saved folder of this kind back (for the model card), with the `model.rope_scaling`
        it was trained with, which `check_base` asks for."""
        task = ', task="classifier", num_labels=1' if classifier else ""
        task += f", rope_scaling={rope_scaling!r}" if rope_scaling else ""
        return (f"from alignkit.adapters import load_adapter\nfrom alignkit.models.loading import load_model, "
                f"load_tokenizer\nmodel = load_adapter(load_model(\"{base}\"{task}), \"{folder}\")\n"
                f"tokenizer = load_tokenizer(\"{folder}\")")

    # -- shared by every kind
    def save(self, model: nn.Module, folder: str | Path, tokenizer: Any = None,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        folder = Path(folder)
        config = self.config if self.config is not None else self.own_config(model)
        earlier = earlier_save(folder)  # before anything is written: refuses a folder holding another tool's save
        folder.mkdir(parents=True, exist_ok=True)
        self.save_weights(model, folder, config, state_dict)
        (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        fingerprint = None if self.saves_whole_model else recorded_base(model)
        if fingerprint is not None:
            (folder / BASE_FINGERPRINT_NAME).write_text(json.dumps(fingerprint, indent=2) + "\n")
        else:  # an earlier save's into this folder would describe another model's base (checked on load)
            (folder / BASE_FINGERPRINT_NAME).unlink(missing_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if earlier is not None:  # its files this save did not replace: a later load could read them with these
            stale = sorted(earlier.saved_files(folder) - self.written_files(folder, config))
            for name in stale:
                (folder / name).unlink(missing_ok=True)
            if stale:
                logger.info("%s: removed %s, left by the earlier %s save there", folder, ", ".join(stale), earlier.kind)
        logger.info("saved %s adapter to %s", self.kind, folder)
        return folder

    def record(self, model: nn.Module, config: AdapterConfig, base: dict[str, Any] | None = None) -> nn.Module:
        """Remember on `model` the config it was built from (what `adapter_of` and `save` read back) and `base`, the
        `base_fingerprint` of the model before it was wrapped (what `save` writes: see `recorded_base`)."""
        model.alignkit_adapter_config = config
        if base is not None:
            model.alignkit_base_fingerprint = base
        self.config = config
        return model


# ---------------------------------------------------------------------------------------------- the base's identity

BASE_FINGERPRINT_NAME = "alignkit_base.json"
PROBE_COLUMNS = 8


def base_fingerprint(model: nn.Module) -> dict[str, Any] | None:
    """What identifies the base model an adapter was trained on: its shape (model type, layers, hidden size,
    vocabulary), a probe of its input embedding (3 rows x 8 columns, as float32) and of its final norm (8 values,
    `final_norm_weight`), which adapters leave frozen, and its RoPE settings (a `model.rope_scaling` training applied
    must be applied again). Weights sharded here (ZeRO-3 partitions, loaded so when HfDeepSpeedConfig / ZeRO-3
    TrainingArguments exist before `from_pretrained`; FSDP DTensors): read from the folder the base was loaded from
    (`sharded_fingerprint`). None when the embedding is not readable here (meta, or sharded and no such folder: then
    with a warning)."""
    lm = unwrap_lm(model)
    w = base_embedding(lm)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if isinstance(w, torch.Tensor) and is_sharded(w):
        return sharded_fingerprint(lm, cfg)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0 or w.is_meta:
        return None
    rows = sorted({0, w.shape[0] // 2, w.shape[0] - 1})
    probe = w.detach()[rows, :PROBE_COLUMNS].float().cpu()  # (3, 8)
    found = {"model_type": getattr(cfg, "model_type", None),
             "num_hidden_layers": getattr(cfg, "num_hidden_layers", None), "hidden_size": int(w.shape[1]),
             "vocab_size": int(w.shape[0]), "probe_rows": rows,
             "embedding_probe": [round(float(x), 6) for x in probe.flatten()], "rope_parameters": rope_record(cfg),
             "name_or_path": getattr(lm.config, "name_or_path", None) or None}
    norm = final_norm_weight(lm)
    if norm is not None:  # exact float32 values, with the dtype they were read in (`base_mismatch`)
        found.update(norm_probe=[float(x) for x in norm.detach().flatten()[:PROBE_COLUMNS].float().cpu()],
                     norm_dtype=str(norm.dtype).removeprefix("torch."))
    return found


def is_sharded(w: torch.Tensor) -> bool:
    """Whether parameter `w` holds only this process's part here: a DeepSpeed ZeRO-3 partition (`ds_id`; its
    `.data` is empty) or an FSDP2 DTensor."""
    return getattr(w, "ds_id", None) is not None or type(w).__name__ == "DTensor" or type(w.data).__name__ == "DTensor"


def sharded_fingerprint(lm: nn.Module, cfg: Any) -> dict[str, Any] | None:
    """`base_fingerprint` of a base whose weights are sharded here, read from the local folder it was loaded from
    (`config.name_or_path`: `folder_fingerprint`, the probed slices of its safetensors files; each process reads
    them, no collective), or for a Hub name from its snapshot in the local Hugging Face cache (`hub_cache_snapshot`,
    no network). A base loaded sharded by ZeRO-3 had no fingerprint, without a word, so adapter folders saved from
    it recorded no base and adapters loaded onto it (`load_adapter`, resume) were not checked. None, with a
    warning, when there is no such folder (a Hub name not in the cache, a folder without safetensors)."""
    name = str(getattr(lm.config, "name_or_path", None) or "")
    folder = name if name and Path(name).is_dir() else hub_cache_snapshot(name)
    found = folder_fingerprint(folder, lm, {}, lm.config) if folder else None
    if found is not None:
        found["name_or_path"] = name  # a Hub name stays the name (the cache's folder is where it was read)
    revisions = [p.name for p in cached_snapshots(name)] if folder is None else []
    if found is None and len(revisions) > 1:  # which snapshot from_pretrained read is not recorded
        if not getattr(lm, "alignkit_unfingerprinted", False):
            lm.alignkit_unfingerprinted = True
            logger.warning("the base model's weights are sharded in this process (DeepSpeed ZeRO-3 / FSDP) and its Hub "
                           "name %r is in the local Hugging Face cache at %d revisions (snapshots %s; main: %s), and "
                           "transformers does not record the revision it loaded, so its fingerprint is not taken "
                           "(main's could be another revision's): an adapter saved from it records no "
                           "alignkit_base.json and one loaded onto it is not checked; load the base from a local "
                           "folder (huggingface_hub.snapshot_download(name, revision=...), or save_pretrained it once)",
                           name, len(revisions), ", ".join(r[:12] for r in revisions), revisions[0][:12])
        return None
    if found is None or "embedding_probe" not in found:
        if not getattr(lm, "alignkit_unfingerprinted", False):
            lm.alignkit_unfingerprinted = True  # once per model: the fingerprint is asked for at wrap, save and load
            logger.warning("the base model's weights are sharded in this process (DeepSpeed ZeRO-3 partitioned them "
                           "at load: HfDeepSpeedConfig / ZeRO-3 TrainingArguments built before from_pretrained; or "
                           "FSDP) and it was not loaded from a local folder with safetensors files, nor is it a Hub "
                           "name whose safetensors are in the local Hugging Face cache (name_or_path %r), "
                           "so its fingerprint is not taken: an adapter saved from it records no alignkit_base.json, "
                           "and an adapter folder loaded onto it (load_adapter, a resume) is not checked against the "
                           "base it was trained on; load the base from a local folder (save_pretrained it once), or "
                           "build the DeepSpeed config after from_pretrained", name)
        return None
    found["rope_parameters"] = rope_record(cfg)
    return found


def final_norm_parameter(lm: nn.Module) -> torch.Tensor | None:
    """The last parameter of the transformers model `lm`'s backbone (`base_model`): its final norm (llama / qwen2
    `norm.weight`, gpt2 `ln_f.bias`, gpt_neox `final_layer_norm.bias`); the frozen original under peft's
    `modules_to_save`. None when `lm` has no separate backbone. Readable here or not (`final_norm_weight`)."""
    backbone = getattr(lm, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is lm:
        return None
    named = [(n, p) for n, p in backbone.named_parameters() if "modules_to_save." not in n]
    return named[-1][1] if named else None


def final_norm_weight(lm: nn.Module) -> torch.Tensor | None:
    """`final_norm_parameter` when its values are readable here. Full finetuning moves it at every step and
    adapters leave it frozen, so it tells a finetuned copy of a base from the base where the embedding probe's rows
    (tokens training may never see) do not. None when not readable here (sharded, meta) or `lm` has no separate
    backbone."""
    w = final_norm_parameter(lm)
    if w is None or w.is_meta or w.numel() == 0 or is_sharded(w):
        return None
    return w


def base_embedding(lm: nn.Module) -> torch.Tensor | None:
    """The input-embedding weight of the transformers model `lm` as its base had it: under peft's `modules_to_save`
    wrapper (`get_peft_model` with `modules_to_save=["embed_tokens"]`, by hand or by `apply_adapter`) the frozen
    `original_module`, whose `.weight` training leaves alone (the wrapper's own `.weight` is the trained copy)."""
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    original = getattr(emb, "original_module", None)
    emb = original if isinstance(original, nn.Module) else emb
    w = getattr(emb, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def recorded_base(model: nn.Module) -> dict[str, Any] | None:
    """The fingerprint of the base `model` was built on, taken by `apply_adapter` / `load_adapter` before wrapping it
    (or by `record_base` when a trainer gets a model wrapped by hand): an adapter that trains the input embedding
    (`modules_to_save: [embed_tokens]`, a ReFT head) changes it, so one taken at save time would describe no base (the
    folder refused on its own base, accepted on any other of its shapes). None recorded: `base_fingerprint(model)`,
    without its embedding probe (and a warning) when that embedding is trained, so only the shapes are checked."""
    recorded = getattr(unwrap_parallel(model), "alignkit_base_fingerprint", None)
    if recorded is not None:
        return recorded
    found = base_fingerprint(model)
    w = base_embedding(unwrap_lm(model))
    if found is not None and w is not None and w.requires_grad:
        logger.warning("saving an adapter of a model wrapped without apply_adapter / load_adapter whose input "
                       "embedding is trained: the base it started from is unknown, so alignkit_base.json records its "
                       "shapes only and an adapter folder loaded onto another base of the same shapes is not "
                       "refused; wrap the base with alignkit.adapters.apply_adapter, or call "
                       "alignkit.adapters.record_base(model) before training")
        found = {k: v for k, v in found.items() if k not in ("embedding_probe", "probe_rows")}
    norm = final_norm_weight(unwrap_lm(model))
    if found is not None and norm is not None and norm.requires_grad:  # trained (modules_to_save): not the base's
        found = {k: v for k, v in found.items() if k not in ("norm_probe", "norm_dtype")}
    return found


def record_base(model: nn.Module) -> None:
    """Record on `model` the fingerprint of its base now, when `apply_adapter` / `load_adapter` did not (a model
    wrapped by hand: pyreft-style `get_reft_model`, peft's `get_peft_model`): what `save_adapter` writes as
    `alignkit_base.json`. Call it before training; alignkit's trainers do. Nothing for full finetuning, a model
    that has one, or a base not readable here (meta; sharded and loaded from no local folder: `sharded_fingerprint`)."""
    target = unwrap_parallel(model)
    if getattr(target, "alignkit_base_fingerprint", None) is not None or adapter_of(target).saves_whole_model:
        return
    found = base_fingerprint(target)
    if found is not None:
        target.alignkit_base_fingerprint = found


def folder_fingerprint(folder: str | Path, model: nn.Module, like: dict[str, Any],
                       config: Any = None) -> dict[str, Any] | None:
    """`base_fingerprint` of the model saved in `folder` (its `config`, else its config.json, and safetensors), probed
    where `like` (the fingerprint of `model`'s base) was: the input embedding's rows `like["probe_rows"]` and the final
    norm, found in the checkpoint by their names in `model`'s transformers model (peft's `base_layer` /
    `original_module` dropped). Only those slices are read (safetensors' `get_slice`, no full load). None when the
    folder has no safetensors; a tensor not found there (another naming) leaves its probe out, so `base_mismatch`
    compares the rest."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {k: folder / f for k, f in json.loads(index.read_text()).get("weight_map", {}).items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            where = dict.fromkeys(f.keys(), folder / "model.safetensors")
    else:
        return None
    if config is None:
        config = AutoConfig.from_pretrained(str(folder))
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: dict[str, Any] = {"model_type": getattr(cfg, "model_type", None), "name_or_path": str(folder),
                             "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)}
    lm = unwrap_lm(model)
    emb, norm = _checkpoint_name(lm, base_embedding(lm), where), _checkpoint_name(lm, final_norm_parameter(lm), where)
    if emb is not None:
        with _slice(where[emb], emb) as w:
            vocab, hidden = w.get_shape()
            rows = like.get("probe_rows") or sorted({0, vocab // 2, vocab - 1})
            found.update(vocab_size=vocab, hidden_size=hidden)
            if max(rows) < vocab:
                probe = torch.cat([w[r:r + 1, :PROBE_COLUMNS] for r in rows]).float()
                found.update(probe_rows=rows, embedding_probe=[round(float(x), 6) for x in probe.flatten()])
    if norm is not None:
        with _slice(where[norm], norm) as w:
            values = w[:PROBE_COLUMNS] if len(w.get_shape()) == 1 else None
            if values is not None:
                found.update(norm_probe=[float(x) for x in values.float()],
                             norm_dtype=str(values.dtype).removeprefix("torch."))
    return found


def _checkpoint_name(lm: nn.Module, tensor: torch.Tensor | None, where: dict[str, Path]) -> str | None:
    """The name `tensor` (a parameter of `lm`) has among a checkpoint's keys `where`: its name in `lm` without
    peft's wrapper segments, or the one key that name ends with (or that ends with it: another prefix)."""
    if tensor is None:
        return None
    name = next((n for n, p in lm.named_parameters(remove_duplicate=False) if p is tensor), None)
    if name is None:
        return None
    name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    if name in where:
        return name
    near = [k for k in where if k.endswith("." + name) or name.endswith("." + k)]
    return near[0] if len(near) == 1 else None


@contextlib.contextmanager
def _slice(file: Path, key: str) -> Iterator[Any]:
    with safe_open(str(file), framework="pt") as f:
        yield f.get_slice(key)


def compared_probes(saved: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """The weight probes `base_mismatch` compares between two fingerprints (`embedding_probe`: the same rows in
    both; `norm_probe`); empty when only shapes can be compared (a probe missing on either side)."""
    out = []
    a, b = saved.get("embedding_probe") or [], found.get("embedding_probe") or []
    if saved.get("probe_rows") == found.get("probe_rows") and len(a) == len(b) and a:
        out.append("embedding_probe")
    a, b = saved.get("norm_probe") or [], found.get("norm_probe") or []
    if len(a) == len(b) and a:
        out.append("norm_probe")
    return out


def base_mismatch(saved: dict[str, Any], found: dict[str, Any]) -> str | None:
    """How `found` (this base) differs from `saved` (the base the adapter was trained on), or None. The probe is
    compared with a tolerance that bf16 / fp16 loading of the same weights stays within."""
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        if saved.get(key) is not None and found.get(key) is not None and saved[key] != found[key]:
            return f"{key} {found[key]} here, {saved[key]} when trained"
    compared = compared_probes(saved, found)
    a, b = saved.get("embedding_probe") or [], found.get("embedding_probe") or []
    if "embedding_probe" in compared:
        worst = max(abs(x - y) - (1e-2 * abs(x) + 1e-4) for x, y in zip(a, b))
        if worst > 0:
            return "its input embedding weights differ (another model or revision with the same shapes)"
    a, b = saved.get("norm_probe") or [], found.get("norm_probe") or []
    if "norm_probe" in compared:  # read in one dtype: the same bits; across dtypes: bf16 / fp16 rounding
        same = saved.get("norm_dtype") is not None and saved.get("norm_dtype") == found.get("norm_dtype")
        rel, tol = (1e-6, 1e-7) if same else (1e-2, 1e-4)
        if max(abs(x - y) - (rel * abs(x) + tol) for x, y in zip(a, b)) > 0:
            return ("its final norm weights differ (a finetuned copy of the base, or another model or revision with "
                    "the same shapes)")
    return None


CHECK_BASE_OFF = "pass check_base=False (model.check_base: false) if that is what you mean"


def check_base(model: nn.Module, folder: str | Path, rope_key: str = "model.rope_scaling",
               found: dict[str, Any] | None = None, off: str = CHECK_BASE_OFF) -> None:
    """Raise ValueError when `folder`'s adapter was trained on another base than `model` (its
    `alignkit_base.json`; folders saved before it existed are not checked, nor sharded bases loaded from no local
    folder: `sharded_fingerprint`), ConfigError
    (naming `rope_key`) when it was trained with a RoPE scaling `model` lacks or has otherwise; a warning when
    `model` adds a scaling to an adapter trained without one. `found`: `model`'s base fingerprint when known (a
    wrapped model's `recorded_base`), else it is taken from `model` (a bare base). `off`: how the caller's user
    skips the check (a resume has no such switch: it says what to do instead)."""
    path = Path(folder) / BASE_FINGERPRINT_NAME
    if not path.is_file():
        return
    found = found if found is not None else base_fingerprint(model)
    if found is None:
        return
    saved = json.loads(path.read_text())
    why = base_mismatch(saved, found)
    if why is not None:
        trained_on = f"; it was trained on {saved['name_or_path']}" if saved.get("name_or_path") else ""
        raise ValueError(f"{folder}: this adapter was trained on a different base model ({why}{trained_on}); load it "
                         f"on the base it was trained with (the training run's base_model/ or model.path), or {off}")
    # None for folders saved before the RoPE settings were recorded
    change = rope_change(saved.get("rope_parameters"), found.get("rope_parameters"), rope_key)
    if change is not None and change[0] == "warning":
        logger.warning("%s: %s", folder, change[1])
    elif change is not None:  # a ConfigError: the CLI shows it whole (it names the key to set)
        raise ConfigError(f"{folder}: {change[1]}; or {off}")


ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    if cls.kind not in KINDS:
        raise ValueError(f"adapter kind {cls.kind!r}: add its row to alignkit.adapters.config.KINDS")
    if cls.kind in ADAPTERS:
        raise ValueError(f"adapter kind {cls.kind!r} is registered twice ({ADAPTERS[cls.kind].__module__} and "
                         f"{cls.__module__})")
    ADAPTERS[cls.kind] = cls
    return cls


def registry() -> dict[str, type[Adapter]]:
    """`ADAPTERS`, with every kind of this package registered (`api` imports the kind modules)."""
    if len(ADAPTERS) < len(KINDS):
        importlib.import_module("alignkit.adapters.api")
    return ADAPTERS


def adapter_for(config: AdapterConfig) -> Adapter:
    """The adapter that `config` asks for (not yet applied to any model)."""
    return registry()[config.kind](config)


def adapter_of(model: nn.Module) -> Adapter:
    """The adapter around `model` (under any DDP / FSDP wrapper), found from its wrappers; with the config
    `apply_adapter` / `load_adapter` recorded on it when that config is of the same kind."""
    model = unwrap_parallel(model)
    found = [cls for cls in registry().values() if cls.wraps(model)]
    if len(found) != 1:
        raise TypeError(f"{type(model).__name__}: {len(found)} adapter kinds claim this model "
                        f"({[c.kind for c in found]}); each model must be wrapped by exactly one")
    cfg = getattr(model, "alignkit_adapter_config", None)
    return found[0](cfg if cfg is not None and cfg.kind == found[0].kind else None)


def earlier_save(folder: Path) -> Adapter | None:
    """The adapter of the alignkit save already in `folder` (its `alignkit_adapter.json`), None when there is none.
    ValueError when `folder` holds files a save writes (any kind's `saved_files`) without one (another tool's
    save: this one would be mixed into it), or an `alignkit_adapter.json` that cannot be read."""
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        found = sorted({n for cls in registry().values() for n in cls.saved_files(folder)}) if folder.is_dir() else []
        if found:
            raise ValueError(f"save_adapter: {folder} holds {', '.join(found)} but no {ADAPTER_CONFIG_NAME}, so not an "
                             "alignkit save, and this save would be mixed into it; save into an empty or new folder, "
                             "or move those files away")
        return None
    try:
        return adapter_in(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"save_adapter: {folder / ADAPTER_CONFIG_NAME} cannot be read ({e}), so the files of the "
                         "earlier save there are unknown and this save would be mixed into them; save into an "
                         "empty or new folder, or remove the earlier save") from None


def adapter_in(folder: str | Path) -> Adapter:
    """The adapter a saved folder holds (from its `alignkit_adapter.json`)."""
    return adapter_for(read_adapter_config(folder))


__all__ = ["ADAPTERS", "Adapter", "BASE_FINGERPRINT_NAME", "Route", "adapter_for", "base_embedding",
           "base_fingerprint", "base_mismatch", "compared_probes", "earlier_save", "folder_fingerprint",
           "hub_cache_snapshot", "cached_snapshots", "record_base", "recorded_base", "check_base", "adapter_in",
           "adapter_of", "head_names", "is_classifier", "is_reft", "register_adapter", "registry",
           "trainable_state_dict", "unwrap_lm", "unwrap_parallel"]
