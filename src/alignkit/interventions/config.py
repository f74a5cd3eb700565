"""What to attach where: `ReftConfig`, a list of `RepresentationConfig`.

Plain data only (no live modules): it round-trips through `to_dict`/`from_dict`, JSON and YAML.
A representation names a decoder layer, a component of that layer, an intervention type and the
type's constructor arguments. `embed_dim` is inferred from the model when left out; every other
argument left as `None` takes the intervention type's own default.

    ReftConfig(representations=[RepresentationConfig(layer=2, intervention="loreft", low_rank_dimension=4)])
    ReftConfig.uniform(layers=[0, 1], intervention="noreft", low_rank_dimension=2, component="mlp_output")

Components: `block_output` (default: the residual stream after the layer), `block_input`,
`mlp_output`, `mlp_input`, `attention_output`, `attention_input`, or an explicit module path inside
the model, e.g. `model.layers[3].mlp` (its output is intervened on; prefix `input:` to intervene on
its input instead, e.g. `input:model.layers[3].mlp`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

COMPONENTS = ("block_output", "block_input", "mlp_output", "mlp_input", "attention_output", "attention_input")


def _is_module_path(component: str) -> bool:
    return "." in component or "[" in component


def known_intervention_types() -> list[str]:
    """Names of the registered intervention types (importing the package registers the built-in ones)."""
    try:  # the package __init__ registers the built-in types; a bare namespace package has none yet
        import alignkit.interventions  # noqa: F401
    except ImportError:  # pragma: no cover - only while the package is half-built
        pass
    from alignkit.interventions.base import INTERVENTIONS

    return sorted(INTERVENTIONS)


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")


@dataclass
class RepresentationConfig:
    """One intervention: where (`layer`, `component`) and what (`intervention` type + its arguments)."""

    layer: int
    component: str = "block_output"
    intervention: str = "loreft"
    low_rank_dimension: int | None = None
    dropout: float | None = None
    act_fn: str | None = None
    add_bias: bool | None = None
    embed_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other constructor arguments of the type

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"representation layer must be an int >= 0, got {self.layer!r}")
        if not isinstance(self.component, str) or not (
            self.component in COMPONENTS or _is_module_path(self.component.removeprefix("input:"))
        ):
            raise ValueError(f"unknown component {self.component!r}; valid: {list(COMPONENTS)} "
                             "or an explicit module path such as 'model.layers[3].mlp'")
        if self.low_rank_dimension is not None and (not isinstance(self.low_rank_dimension, int)
                                                    or self.low_rank_dimension <= 0):
            raise ValueError(f"low_rank_dimension must be a positive int, got {self.low_rank_dimension!r}")
        if self.dropout is not None and not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict of constructor arguments, got {type(self.extra).__name__}")
        types = known_intervention_types()
        if types and self.intervention not in types:
            raise ValueError(f"unknown intervention type {self.intervention!r}; valid: {types}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "representation") -> "RepresentationConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        _check_keys(data, cls, where)
        if "layer" not in data:
            raise ValueError(f"{where}: missing required key 'layer'")
        return cls(**data)

    def intervention_kwargs(self, embed_dim: int, dtype: str | None = None) -> dict[str, Any]:
        """Constructor arguments for this representation's type, checked against its signature.

        `embed_dim` is the model's width (used when the config leaves it out); `dtype` (e.g. "bfloat16")
        the model's, passed when the type takes one and `extra` does not set it. Arguments left as
        `None` are not passed, so the type's own defaults apply.
        """
        from alignkit.interventions.base import INTERVENTIONS

        known_intervention_types()
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"unknown intervention type {self.intervention!r}; valid: {sorted(INTERVENTIONS)}")
        params = inspect.signature(INTERVENTIONS[self.intervention].__init__).parameters
        given = {"embed_dim": self.embed_dim if self.embed_dim is not None else embed_dim,
                 "low_rank_dimension": self.low_rank_dimension, "dropout": self.dropout,
                 "act_fn": self.act_fn, "add_bias": self.add_bias}
        kwargs = {k: v for k, v in given.items() if v is not None}
        overlap = set(self.extra) & set(given)
        if overlap:
            raise ValueError(f"extra repeats named field(s) {sorted(overlap)}; set them directly")
        kwargs.update(self.extra)
        if dtype is not None and "dtype" in params and "dtype" not in kwargs:
            kwargs["dtype"] = dtype
        valid = [p for p in params if p != "self"]
        for key in kwargs:
            if key not in params:
                if key == "embed_dim" and self.embed_dim is None:
                    raise ValueError(f"intervention type {self.intervention!r} does not take embed_dim")
                raise ValueError(f"intervention type {self.intervention!r} does not take argument {key!r}; "
                                 f"valid: {valid}")
        missing = [p.name for p in params.values() if p.name != "self" and p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in kwargs]
        if missing:
            raise ValueError(f"intervention type {self.intervention!r} needs argument(s) {missing} "
                             f"(layer {self.layer}, component {self.component!r})")
        return kwargs


@dataclass
class ReftConfig:
    """A ReFT adapter: the list of representations to intervene on, in order (that order is the order
    of the interventions in `intervention_locations`)."""

    representations: list[RepresentationConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        reps = []
        for i, r in enumerate(self.representations):
            if isinstance(r, dict):
                r = RepresentationConfig.from_dict(r, where=f"representations[{i}]")
            if not isinstance(r, RepresentationConfig):
                raise ValueError(f"representations[{i}]: expected a RepresentationConfig or dict, "
                                 f"got {type(r).__name__}")
            reps.append(r)
        if not reps:
            raise ValueError("ReftConfig needs at least one representation")
        self.representations = reps

    @classmethod
    def uniform(cls, layers: Sequence[int], intervention: str = "loreft", component: str = "block_output",
                **arguments: Any) -> "ReftConfig":
        """The same intervention type and arguments at each of `layers`."""
        return cls([RepresentationConfig(layer=int(layer), component=component, intervention=intervention,
                                         **arguments) for layer in layers])

    def __len__(self) -> int:
        return len(self.representations)

    def to_dict(self) -> dict[str, Any]:
        return {"representations": [r.to_dict() for r in self.representations]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "reft config") -> "ReftConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        _check_keys(data, cls, where)
        reps = data.get("representations")
        if not isinstance(reps, list):
            raise ValueError(f"{where}: 'representations' must be a list of mappings")
        return cls([RepresentationConfig.from_dict(r, where=f"{where}: representations[{i}]")
                    for i, r in enumerate(reps)])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "reft config (JSON)") -> "ReftConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        return cls.from_dict(data, where=where)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "reft config (YAML)") -> "ReftConfig":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: not valid YAML ({e})") from e
        return cls.from_dict(data, where=where)

    def save(self, path: str | Path) -> None:
        """Write JSON (`.json`) or YAML (`.yaml`/`.yml`)."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "ReftConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ReFT config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(text, where=str(path))
        return cls.from_json(text, where=str(path))
