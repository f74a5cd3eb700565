"""What an adapter is, as data: the `adapter:` config section and the table of kinds. No torch here
(settings and the CLI read it before anything heavy is imported).

    AdapterConfig(kind="reft+lora", lora=LoraSettings(r=8),
                  reft=ReftSettings(config={"representations": [...]}, positions="f1+l1"))

`KINDS` is the one table of kind names: what `alignkit list` prints, the model card's Hub metadata
(library_name, tags) and the parts a kind is made of. The behaviour of each kind (wrap, switch off, route,
save, load) is its `Adapter` class in `alignkit.adapters.<kind>`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.files import read_json_object
from alignkit.interventions.config import Positions, ReftConfig

ADAPTER_CONFIG_NAME = "alignkit_adapter.json"


@dataclass(frozen=True)
class KindInfo:
    description: str  # one line for `alignkit list`
    library_name: str  # the Hub model card's library_name for a folder of this kind
    parts: tuple[str, ...] = ()  # the settings sections it uses ("lora", "reft"); also its model-card tags


KINDS: dict[str, KindInfo] = {
    "full": KindInfo("full finetuning", "transformers"),
    "lora": KindInfo("LoRA / DoRA via peft", "peft", ("lora",)),
    "reft": KindInfo("ReFT interventions", "alignkit", ("reft",)),
    "reft+lora": KindInfo("ReFT interventions and LoRA together", "alignkit", ("reft", "lora")),
}


@dataclass
class LoraSettings:
    """peft `LoraConfig` arguments (DoRA with `use_dora`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    modules_to_save: list[str] | None = None  # None: peft's default (the classifier head for SEQ_CLS)


@dataclass
class ReftSettings:
    """A ReFT adapter: `config` the interventions (a `ReftConfig`, or its mapping `{representations: [...]}`);
    `positions` the prompt positions ("f1+l1")."""

    config: ReftConfig | None = None
    positions: str = "f1+l1"
    share_weights: bool = True
    modules_to_save: list[str] | None = None  # None: the head of a sequence classifier ("score")

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):  # unknown keys: ValueError naming the key (adapter.reft.config...)
            self.config = ReftConfig.from_dict(self.config, where="adapter.reft.config")
        elif self.config is not None and not isinstance(self.config, ReftConfig):
            raise ValueError(f"adapter.reft.config: expected a mapping with 'representations', got "
                             f"{type(self.config).__name__}")


@dataclass
class AdapterConfig:
    kind: Literal["full", "lora", "reft", "reft+lora"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    reft: ReftSettings | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is unknown; valid: {list(KINDS)}")
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraSettings, self.lora, "adapter.lora")
        if isinstance(self.reft, dict):
            self.reft = from_dict(ReftSettings, self.reft, "adapter.reft")
        self.check_parts()
        if "reft" in self.parts and (self.reft is None or self.reft.config is None):
            raise ValueError(f"adapter kind {self.kind!r} needs adapter.reft.config (a ReftConfig mapping with "
                             "'representations'), e.g. {'representations': [{'layer': 1, 'low_rank_dimension': 4}]}")

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    @property
    def parts(self) -> tuple[str, ...]:
        return KINDS[self.kind].parts

    @property
    def has_reft(self) -> bool:
        """The kind edits hidden states with ReFT interventions (reft, reft+lora)."""
        return "reft" in self.parts

    @property
    def trained_in_place(self) -> list[str]:
        """The modules this config trains whole in place, which switching the adapter off (a DPO / KTO / online
        reference "adapter_off") leaves trained: a ReFT part's `modules_to_save` when no LoRA part holds them (a ReFT
        unfreezes them in the model; peft's `modules_to_save` keeps the base's copy and switches back to it). Empty
        for a classifier's default head (None), which is chosen when the model is wrapped."""
        if self.reft is None or "reft" not in self.parts or "lora" in self.parts:
            return []
        return list(self.reft.modules_to_save or [])

    def check_parts(self) -> None:
        """ValueError (`unused_part_message`, the CLI's line) for a part's settings (`PART_SETTINGS`) given to a kind
        without that part: `AdapterConfig(kind="full", lora=LoraSettings(r=8))` trained the whole model and read no
        rank. A part at its defaults (None, or the settings class's defaults: what the dataclass builds, and what an
        earlier alignkit wrote for every part into a saved config) is accepted. Run when the config is built and by
        `check()` (a part set afterwards). The rule is `refuse_unused_parts`'s, given the parts as mappings."""
        parts = {part: getattr(self, part) for part in PART_SETTINGS}
        for part, value in parts.items():  # not settings at all (a str, a number): refused as any value would be
            if value is not None and not isinstance(value, dict) and not dataclasses.is_dataclass(value) \
                    and self.kind in KINDS and part not in KINDS[self.kind].parts:
                raise ValueError(unused_part_message(part, self.kind, "adapter"))
        refuse_unused_parts({"kind": self.kind, **{part: dataclasses.asdict(value) if dataclasses.is_dataclass(value)
                                                   else value for part, value in parts.items()}})

    def check(self) -> None:
        """Check what can be checked without a model (ValueError naming the key), for the CLI's config loader and
        `apply_adapter` alike (the one check of both). A ReFT part's `ReftConfig` checked its keys and intervention
        types when it was built. Left: a part's settings given to a kind without that part (`check_parts`, run at
        construction too: `AdapterConfig(kind="reft", lora=LoraSettings(r=16))` trained a ReFT adapter and dropped
        the LoRA settings), or the ReFT part's
        modules_to_save in a stack whose LoRA trains them, or share_weights=False with one group of positions; each
        would be ignored (not checked when a saved folder's config is read back)."""
        self.check_parts()
        if "lora" in self.parts and self.reft is not None and self.reft.modules_to_save is not None:
            raise ValueError(f"adapter.reft.modules_to_save: with adapter.kind {self.kind!r} the LoRA part trains the "
                             "modules besides the adapter (peft's modules_to_save), so it would be ignored; set "
                             "adapter.lora.modules_to_save instead")
        if self.reft is not None and not self.reft.share_weights:
            pos = Positions.parse(self.reft.positions)
            if not (pos.first_n and pos.last_n):
                raise ValueError(f"adapter.reft.share_weights: false splits the interventions between the first and "
                                 f"the last positions, and adapter.reft.positions {str(pos)!r} names only one group, "
                                 "so it would be ignored; give both groups (e.g. 'f1+l1') or remove "
                                 "adapter.reft.share_weights")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return from_dict(cls, data, "adapter")


PART_SETTINGS: dict[str, type] = {"lora": LoraSettings, "reft": ReftSettings}  # a part -> its settings section


def unused_part_message(part: str, kind: str, where: str = "adapter") -> str:
    """The one line for a `part` section (lora, reft) given to a `kind` without that part: it would be ignored."""
    readers = " or ".join(name for name, info in KINDS.items() if part in info.parts)
    return (f"{where}.{part}: read only by adapter.kind {readers}, and kind is {kind!r}, so it would be ignored; set "
            f"adapter.kind or remove {where}.{part} ({where}.{part}=null)")


def used_parts(data: dict[str, Any]) -> dict[str, Any]:
    """An `adapter:` mapping (a config's, as `dataclasses.asdict` gives it) without the part sections its kind does
    not use: what a run's config.yaml records (a full run's used to hold a default lora section and reft: null)."""
    kind = data.get("kind", AdapterConfig.kind)
    if kind not in KINDS:
        return dict(data)
    return {k: v for k, v in data.items() if k not in PART_SETTINGS or k in KINDS[kind].parts}


def refuse_unused_parts(data: dict[str, Any], where: str = "adapter") -> None:
    """ValueError for a part section in the raw `adapter:` mapping `data` (a file's, after overrides) that its kind
    does not use, at any values: `adapter.lora: {r: 8}` under kind full was accepted and ignored (the built settings
    equal the defaults). One exception: the complete section at every default, which is what a run's config.yaml
    held before `used_parts` (every key written by `dataclasses.asdict`, e.g. a full run's lora section), so such
    a saved config still loads; a section a user writes names only the keys they set. The one owner of the rule:
    `AdapterConfig.check_parts` calls it with its built parts as mappings (every key, so at the defaults exactly
    when the settings equal the class's defaults)."""
    kind = data.get("kind", AdapterConfig.kind)
    if kind not in KINDS:  # refused by AdapterConfig, naming the valid kinds
        return
    for part, settings in PART_SETTINGS.items():
        section = data.get(part)
        if not isinstance(section, dict) or part in KINDS[kind].parts:  # not a mapping: from_dict names the type
            continue
        if section == dataclasses.asdict(settings()):
            continue  # an earlier alignkit's saved config.yaml: the defaults it wrote for every part
        raise ValueError(unused_part_message(part, kind, where))


def without_null_parts(data: dict[str, Any]) -> dict[str, Any]:
    """An `adapter:` mapping without the part sections (lora, reft) set to null, which then take their defaults:
    `adapter.lora=null` on the command line drops a config file's lora section."""
    parts = {part for info in KINDS.values() for part in info.parts}
    return {k: v for k, v in data.items() if not (k in parts and v is None)}


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    return cls(**data)


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an alignkit adapter folder is written by save_adapter "
                                "(or a Trainer's save_model)")
    data = read_json_object(path, "save the adapter again", "alignkit's adapter config")
    # the part sections its kind does not use: ignored by the run that wrote them (at their defaults from every
    # earlier alignkit; at other values from one that accepted them), so a saved folder loads as it was trained
    return AdapterConfig.from_dict(used_parts(data))


__all__ = ["ADAPTER_CONFIG_NAME", "AdapterConfig", "KINDS", "KindInfo", "LoraSettings", "PART_SETTINGS", "ReftSettings",
           "from_dict", "read_adapter_config", "refuse_unused_parts", "unused_part_message", "used_parts",
           "without_null_parts"]
