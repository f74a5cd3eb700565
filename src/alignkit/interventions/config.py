"""What to attach where: `ReftConfig`, a list of `RepresentationConfig`.

Plain data only (no live modules): it round-trips through `to_dict`/`from_dict`, JSON and YAML.
A representation names a decoder layer, a component of that layer, an intervention type and the
type's constructor arguments. `embed_dim` is inferred from the model when left out (the width of the
states the component holds: the hidden size, or a module path's Linear / norm features); every other
argument left as `None` takes the intervention type's own default.

    ReftConfig(representations=[RepresentationConfig(layer=2, intervention="loreft", low_rank_dimension=4)])
    ReftConfig.uniform(layers=[0, 1], intervention="noreft", low_rank_dimension=2, component="mlp_output")

Components: `block_output` (default: the residual stream after the layer), `block_input`,
`mlp_output`, `mlp_input`, `attention_output`, `attention_input`, or an explicit module path inside
the model, e.g. `model.layers[3].mlp` (its output is intervened on; prefix `input:` to intervene on
its input instead, e.g. `input:model.layers[3].mlp`); a path inside a decoder layer must name the
representation's `layer`, one outside them (`model.embed_tokens`, `model.norm`) takes layer 0, which it does
not use (any other value is refused when attached).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from alignkit.files import atomic_write_text
from alignkit.interventions import intervention_types

_TERM = re.compile(r"([fl])(0|[1-9][0-9]*)")  # pyreft's grammar (lowercase, ASCII digits), fullmatch per term
POSITIONS_GRAMMAR = ("f<n>, l<n> or f<n>+l<n> (lowercase f / l, n in ASCII digits without a leading zero, "
                     "no spaces; e.g. 'l1', 'f1+l1', 'f5+l5')")
# the text formats a ReftConfig is read from: parser, the error it raises on bad text
_PARSERS = {"JSON": (json.loads, json.JSONDecodeError), "YAML": (yaml.safe_load, yaml.YAMLError)}


@dataclass(frozen=True)
class Positions:
    """First `first_n` and last `last_n` prompt tokens. `Positions.parse("f3+l3")` == Positions(3, 3)."""

    first_n: int = 0
    last_n: int = 1

    def __post_init__(self) -> None:
        if self.first_n < 0 or self.last_n < 0 or self.first_n + self.last_n == 0:
            raise ValueError(f"positions need first_n >= 0, last_n >= 0 and at least one > 0; got "
                             f"first_n={self.first_n}, last_n={self.last_n}")

    @classmethod
    def parse(cls, spec: "str | Positions") -> "Positions":
        """Parse "l1", "f1", "f3+l3", "l2+f1" (order free, each letter at most once; `POSITIONS_GRAMMAR`)."""
        if isinstance(spec, Positions):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"positions must be a string like 'f3+l3' or a Positions, got {type(spec).__name__}")
        first = last = None
        for term in spec.split("+"):
            m = _TERM.fullmatch(term)
            if m is None:  # 'F1', 'f 1', 'f01', 'f\u0663' were read as f1 / f3: only what pyreft reads is taken
                raise ValueError(f"bad positions {spec!r}: term {term!r} is not of the grammar {POSITIONS_GRAMMAR}")
            if (first if m.group(1) == "f" else last) is not None:
                raise ValueError(f"bad positions {spec!r}: {m.group(1)!r} given twice")
            if m.group(1) == "f":
                first = int(m.group(2))
            else:
                last = int(m.group(2))
        return cls(first_n=first or 0, last_n=last or 0)

    def __str__(self) -> str:
        parts = ([f"f{self.first_n}"] if self.first_n else []) + ([f"l{self.last_n}"] if self.last_n else [])
        return "+".join(parts)

    def width(self, share_weights: bool = True) -> int:
        """P, the number of position slots per intervention."""
        if self.first_n and self.last_n and not share_weights:
            return max(self.first_n, self.last_n)
        return self.first_n + self.last_n


COMPONENTS = ("block_output", "block_input", "mlp_output", "mlp_input", "attention_output", "attention_input")


def _is_module_path(component: str) -> bool:
    return "." in component or "[" in component


def known_intervention_types() -> list[str]:
    """Names of the registered intervention types (the built-in ones and any registered since); imports torch."""
    return sorted(intervention_types())


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
                                                    or isinstance(self.low_rank_dimension, bool)  # true: rank 1
                                                    or self.low_rank_dimension <= 0):
            raise ValueError(f"low_rank_dimension must be a positive int, got {self.low_rank_dimension!r}")
        if self.add_bias is not None and not isinstance(self.add_bias, bool):
            raise ValueError(f"add_bias must be true or false, got {self.add_bias!r} (a "
                             f"{type(self.add_bias).__name__}); write it without quotes")
        if self.dropout is not None and (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
                                         or not 0.0 <= float(self.dropout) < 1.0):  # "0.1" reached nn.Dropout
            raise ValueError(f"dropout must be a number in [0, 1) (YAML reads 1e-1 as text: write 0.1), "
                             f"got {self.dropout!r}")
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
        try:
            return cls(**data)
        except ValueError as e:  # name the representation (a file's ReftConfig.from_dict adds the file before it)
            raise ValueError(f"{where}: {e}") from None

    def intervention_kwargs(self, embed_dim: int, dtype: str | None = None) -> dict[str, Any]:
        """Constructor arguments for this representation's type, checked against its signature.

        `embed_dim` is the model's width (used when the config leaves it out); `dtype` (e.g. "bfloat16")
        the model's, passed when the type takes one and `extra` does not set it. Arguments left as
        `None` are not passed, so the type's own defaults apply.
        """
        INTERVENTIONS = intervention_types()
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
    # Which prompt tokens the interventions edit when the caller passes no locations ("f1+l1": first and
    # last prompt token; pyreft's short form), saved with the weights so that a reloaded adapter edits
    # exactly what training edited. None: the caller always passes `intervention_locations`.
    positions: str | None = None
    share_weights: bool = True  # False: pyreft's split (first half of the interventions on f, second on l)

    def __post_init__(self) -> None:
        if not isinstance(self.share_weights, bool):  # a JSON "false" would be truthy
            raise ValueError(f"share_weights must be true or false, got {self.share_weights!r} (a "
                             f"{type(self.share_weights).__name__}); write it without quotes")
        if self.positions is not None:
            pos = Positions.parse(self.positions)  # ValueError naming the bad term
            self.positions = str(pos)
            if pos.first_n and pos.last_n and not self.share_weights and len(self.representations) % 2:
                raise ValueError(f"positions {self.positions!r} with share_weights=False splits the interventions "
                                 f"in two halves (first / last positions); {len(self.representations)} is odd")
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
        out: dict[str, Any] = {"representations": [r.to_dict() for r in self.representations]}
        if self.positions is not None:
            out.update(positions=self.positions, share_weights=self.share_weights)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "reft config") -> "ReftConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        _check_keys(data, cls, where)
        reps = data.get("representations")
        if not isinstance(reps, list):
            raise ValueError(f"{where}: 'representations' must be a list of mappings")
        try:
            return cls([RepresentationConfig.from_dict(r, where=f"{where}: representations[{i}]")
                        for i, r in enumerate(reps)], positions=data.get("positions"),
                       share_weights=data.get("share_weights", True))
        except (ValueError, TypeError) as e:  # TypeError: positions not a string
            raise ValueError(e.args[0] if str(e.args[0]).startswith(where) else f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_text(cls, text: str, fmt: Literal["JSON", "YAML"], where: str | None = None) -> "ReftConfig":
        """A config from JSON or YAML text; text that does not parse is a ValueError naming `where` and `fmt`."""
        parse, error = _PARSERS[fmt]
        where = where or f"reft config ({fmt})"
        try:
            data = parse(text)
        except error as e:
            raise ValueError(f"{where}: not valid {fmt} ({e})") from e
        return cls.from_dict(data, where=where)

    @classmethod
    def from_json(cls, text: str, where: str | None = None) -> "ReftConfig":
        return cls.from_text(text, "JSON", where)

    @classmethod
    def from_yaml(cls, text: str, where: str | None = None) -> "ReftConfig":
        return cls.from_text(text, "YAML", where)

    def save(self, path: str | Path) -> None:
        """Write JSON (`.json`) or YAML (`.yaml`/`.yml`), atomically (`alignkit.files.atomic_write_text`): a
        reader, or a failure while writing, leaves the previous file whole."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "ReftConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ReFT config file {path} does not exist")
        return cls.from_text(path.read_text(), "YAML" if path.suffix in (".yaml", ".yml") else "JSON", str(path))
