"""The dropout rates `turn_off_dropout` cannot turn off: those a module's forward reads from the model's config.

A few transformers architectures apply a dropout functionally with the rate read from `self.config` inside forward
(falcon's decoder layer `config.hidden_dropout` / `config.attention_dropout`, gpt_neo's flash attention, persimmon's
attention, prophetnet, blt, data2vec_vision; compat row T36), not from an `nn.Dropout` or a module attribute.
Zeroing those config attributes is not done: the config object is the one `save_pretrained` writes (the policy's
top-level config, or a sub-config it serializes), so a saved model would lose the user's rates; a private copy per
module would stop following later runtime changes of the shared config (attention implementation, use_cache) in
architectures alignkit does not test. `rates_read_from_config` finds them so that the sweep can say so.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

from torch import nn


def forward_source(cls: type) -> str:
    """The source of `cls.forward` (decorators unwrapped); "" where there is none (a C or generated function)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def rates_read_from_config(model: nn.Module, is_rate: Callable[[str, Any], bool]) -> dict[str, float]:
    """{"<module class>: config.<name>": rate} for every rate > 0 of a module's `config` (`is_rate(name, value)`)
    that the module's own forward reads as `config.<name>`: a dropout left on after the sweep. Helpers called from
    forward are not read (deberta's), so this is a floor, not a proof of no dropout."""
    found: dict[str, float] = {}
    sources: dict[type, str] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        names = vars(cfg) if hasattr(cfg, "__dict__") else {}
        rates = {k: v for k, v in names.items() if is_rate(k, v) and v > 0}
        if not rates:
            continue
        cls = type(m)
        if cls not in sources:
            sources[cls] = forward_source(cls)
        for name, rate in rates.items():
            if re.search(rf"config\.{re.escape(name)}\b", sources[cls]):
                found[f"{cls.__name__}: config.{name}"] = rate
    return found


__all__ = ["forward_source", "rates_read_from_config"]
