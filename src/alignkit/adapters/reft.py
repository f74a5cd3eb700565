"""ReFT: interventions on hidden states (`alignkit.interventions`), the model wrapped in a `ReftModel` (base
frozen; a sequence classifier's head stays trainable and is saved next to the interventions).

The position spec ("f1+l1", share_weights) is part of the `ReftConfig` and saved with the weights
(`reft_config.json` + `interventions.safetensors`), so a loaded ReFT called with plain `generate(**inputs)`
intervenes where training did. A classifier head is saved in `modules_to_save.safetensors`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.adapters.base import (SCORE_HEADS, Adapter, Route, head_names, is_reft, register_adapter, unwrap_lm,
                                    unwrap_parallel)
from alignkit.adapters.config import ADAPTER_CONFIG_NAME, AdapterConfig, ReftSettings
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import Positions, ReftConfig
from alignkit.interventions.io import CONFIG_NAME, read_reft_weights, saved_reft_config
from alignkit.interventions.loading import load_reft
from alignkit.interventions.locate import is_peft_model

HEAD_WEIGHTS_NAME = "modules_to_save.safetensors"


def check_settings_match(settings: ReftSettings, saved: ReftConfig, folder: Path) -> None:
    """Refuse (ValueError, one line) a folder whose `alignkit_adapter.json` (`adapter.reft`: what serving routes by and
    what the run summary reports) and `reft_config.json` (what the weights were saved with and what the loaded model
    runs) disagree on a representation or on the positions: the model would run one setting and say, or serve, the
    other. Files from two saves mixed in one folder, or one of them edited by hand."""
    def differs(key: str, have: Any, want: Any) -> ValueError:
        return ValueError(f"{folder}: {ADAPTER_CONFIG_NAME} says adapter.reft.{key}={have!r} but {CONFIG_NAME}, which "
                          f"the weights were saved with, says {want!r}, so the loaded model would run {want!r} while "
                          f"serving and the run summary use {have!r}; the two files come from different saves or one "
                          f"was edited: save the adapter again (or put back the file that was changed)")

    ours = settings.config.representations if settings.config is not None else []
    if len(ours) != len(saved.representations):
        raise differs("config.representations", f"{len(ours)} representation(s)",
                      f"{len(saved.representations)} representation(s)")
    for i, (a, b) in enumerate(zip(ours, saved.representations)):
        da, db = a.to_dict(), b.to_dict()
        key = next((k for k in da if da[k] != db.get(k)), None)
        if key is not None:
            raise differs(f"config.representations[{i}].{key}", da[key], db.get(key))
    if saved.positions is not None:  # folders saved before positions lived in reft_config.json have none
        have, want = str(Positions.parse(settings.positions)), saved.positions
        if have != want:
            raise differs("positions", have, want)
        if settings.share_weights != saved.share_weights:
            raise differs("share_weights", settings.share_weights, saved.share_weights)


@register_adapter
class Reft(Adapter):
    """ReFT on the model it is given (in the ReFT+LoRA stack: around the `PeftModel`, whose LoRA then trains
    the classifier head, so `trains_head` is off there)."""

    kind = "reft"
    weight_files = (("reft_config.json", "the ReFT interventions and positions"),
                    ("interventions.safetensors", "the ReFT weights"))
    other_files = (HEAD_WEIGHTS_NAME,)
    trains_head = True

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return is_reft(model) and not is_peft_model(unwrap_parallel(model).model)

    def _heads(self) -> list[str]:
        return (self.config.reft.modules_to_save or []) if self.trains_head else []

    def wrap(self, model: nn.Module) -> nn.Module:
        s = self.config.reft
        spec = str(Positions.parse(s.positions))  # fail early on a bad spec
        rc = s.config
        if rc.positions is not None and (rc.positions, rc.share_weights) != (spec, s.share_weights):
            raise ValueError(f"adapter.reft.config.positions ({rc.positions!r}, share_weights={rc.share_weights}) "
                             f"and adapter.reft.positions ({s.positions!r}, share_weights={s.share_weights}) "
                             "disagree; set adapter.reft.positions only")
        heads = head_names(model, s.modules_to_save) if self.trains_head else []
        out = get_reft_model(model, dataclasses.replace(rc, positions=s.positions, share_weights=s.share_weights))
        lm = unwrap_lm(out)
        for name in heads:
            for p in lm.get_submodule(name).parameters():
                p.requires_grad_(True)
        if heads:
            self.config = dataclasses.replace(self.config, reft=dataclasses.replace(s, modules_to_save=heads))
        return out

    def off(self, model: nn.Module) -> ContextManager[Any]:
        return unwrap_parallel(model).disable_adapters()

    def kept_when_off(self) -> list[str]:
        """`modules_to_save` is trained in the model itself (no base copy): switching the interventions off leaves
        it trained."""
        return self._heads() if self.config is not None and self.config.reft is not None else []

    def route(self, name: str) -> Route:
        s = self.config.reft
        heads = self._heads()
        if heads:  # the stack holds one copy of every module besides the interventions: the base's
            raise ValueError(f"this ReFT adapter also trained {', '.join(heads)} whole (adapter.reft.modules_to_save), "
                             "and alignkit serve routes each row's interventions but serves one copy of every other "
                             "module, the base's, so it would answer with the base's; use alignkit generate, or train "
                             "the module in a LoRA part (kind reft+lora with adapter.lora.modules_to_save)")
        return Route(name, self.kind, reft=name, positions=Positions.parse(s.positions), share_weights=s.share_weights)

    def save_weights(self, model: nn.Module, folder: Path, config: AdapterConfig,
                     state_dict: dict[str, torch.Tensor] | None) -> None:
        unwrap_parallel(model).save_pretrained(str(folder))
        heads = (config.reft.modules_to_save or []) if self.trains_head else []
        if heads:
            lm = unwrap_lm(model)
            tensors = {f"{h}.{k}": v.detach().cpu().contiguous() for h in heads
                       for k, v in lm.get_submodule(h).state_dict().items()}
            save_file(tensors, str(folder / HEAD_WEIGHTS_NAME), metadata={"format": "alignkit-heads"})

    def written_files(self, folder: Path, config: AdapterConfig) -> set[str]:
        heads = (config.reft.modules_to_save or []) if self.trains_head else []
        return self.saved_files(folder) - (set() if heads else {HEAD_WEIGHTS_NAME})

    def _load_heads(self, model: nn.Module, folder: Path, trainable: bool) -> None:
        heads = self._heads()
        if not heads:
            return
        path = folder / HEAD_WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the adapter config lists trained modules {heads}")
        tensors = load_file(str(path))
        lm = unwrap_lm(model)
        for h in heads:
            sub = {k[len(h) + 1:]: v for k, v in tensors.items() if k.startswith(h + ".")}
            lm.get_submodule(h).load_state_dict(sub, strict=True)
            for p in lm.get_submodule(h).parameters():
                p.requires_grad_(trainable)

    def load(self, model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
        s = self.config.reft
        check_settings_match(s, saved_reft_config(folder), Path(folder))  # before the model is wrapped
        out = load_reft(model, folder)
        if out.adapter_configs["default"].positions is None:  # folders saved before positions lived in reft_config.json
            out.set_positions("default", s.positions, s.share_weights)
        for p in out.interventions.parameters():
            p.requires_grad_(trainable)
        self._load_heads(out, folder, trainable)
        return out

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        read_reft_weights(unwrap_parallel(model), folder)
        self._load_heads(model, folder, True)

    def own_config(self, model: nn.Module) -> AdapterConfig:
        """A ReFT built by `get_reft_model` (e.g. through the pyreft-style `ReftTrainer`) describes itself from
        its one adapter's `ReftConfig`, which must carry its position spec."""
        reft = unwrap_parallel(model)
        names = list(reft.adapter_names)
        rc = reft.adapter_configs[names[0]] if len(names) == 1 else None
        if rc is None or rc.positions is None:
            why = (f"it holds {len(names)} ReFT adapters {names} (save each with ReftModel.save_pretrained)"
                   if len(names) != 1 else "its ReftConfig has no position spec")
            raise ValueError(f"save_adapter: cannot describe this {self.kind} model ({why}); build it with "
                             "alignkit.adapters.apply_adapter, or give the ReftConfig positions= (e.g. 'f1+l1')")
        reft_settings = ReftSettings(config=dataclasses.replace(rc, positions=None, share_weights=True),
                                     positions=rc.positions, share_weights=rc.share_weights)
        return AdapterConfig(kind=self.kind, reft=reft_settings)

    def trained_task(self, folder: Path) -> tuple[str, str] | None:
        """A classifier's head is trained and saved with the interventions (`modules_to_save`, "score" by default):
        none saved means an LM's ReFT (a classifier's would come back with a new random head)."""
        heads = self._heads()
        scores = [h for h in heads if h.rsplit(".", 1)[-1] in SCORE_HEADS]
        if scores and (Path(folder) / HEAD_WEIGHTS_NAME).is_file():
            return "classifier", f"{HEAD_WEIGHTS_NAME} holds the trained head {', '.join(scores)}"
        if heads:  # other trained modules (an LM's lm_head, ...): the folder does not say
            return None
        return "causal_lm", (f"no trained score head saved (reft.modules_to_save {heads or None}, "
                             f"no {HEAD_WEIGHTS_NAME})")

    def settings_summary(self) -> dict[str, Any]:
        s = self.config.reft if self.config is not None else None
        return ({"reft.positions": s.positions, "reft.representations": s.config.to_dict()["representations"]}
                if s else {})
