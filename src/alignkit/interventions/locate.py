"""Finding where a ReFT representation lives in any Hugging Face model, without a per-architecture table.

The decoder-layer list is the `nn.ModuleList` whose length is the config's layer count (Llama/Qwen2
`model.layers`, GPT-2 `transformer.h`, GPT-NeoX `gpt_neox.layers`, ...); attention and MLP submodules are
found by their usual names (`self_attn`, `attn`, `mlp`, ...), then by a name containing "att" / "mlp".
An explicit module path (`model.layers[3].mlp`, `input:` prefix for its input) is used as given; its
representation's `layer` must be the decoder layer it sits in, or 0 for a module outside the layers
(`model.embed_tokens`, `model.norm`), where the path alone places it.
A `peft` wrapper is looked through (`hf_model`).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from alignkit.interventions.config import COMPONENTS, RepresentationConfig

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a `peft` wrapper (or `model` itself)."""
    return model.get_base_model() if is_peft_model(model) else model


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def num_layers(model: nn.Module) -> int | None:
    cfg = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def hidden_size(model: nn.Module) -> int:
    cfg = _text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise ValueError("cannot infer the model width from its config (no hidden_size / n_embd / d_model); "
                     "set embed_dim in each representation")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder layers: the ModuleList whose length is the config's layer count."""
    n = num_layers(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found = [(name, m) for name, m in lists if n is None or len(m) == n]
    if not found:
        raise ValueError(f"no nn.ModuleList of length {n} (the config's layer count) in {type(model).__name__}; "
                         f"lists found: {[(name, len(m)) for name, m in lists][:10]}. "
                         "Use explicit module paths as components.")
    if n is None:
        found = [max(found, key=lambda item: len(item[1]))]
    # prefer the usual names, then the shortest path
    found.sort(key=lambda item: (not re.search(r"(^|\.)(layers|h|blocks|layer)$", item[0]), item[0].count(".")))
    return found[0]


def layer_index(model: nn.Module, module: nn.Module) -> int | None:
    """Index of the decoder layer that is or contains `module` (None if it sits outside the layers)."""
    _, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        if module is layer or any(module is m for m in layer.modules()):
            return i
    return None


def _child(layer: nn.Module, names: Sequence[str], word: str, where: str) -> tuple[str, nn.Module]:
    children = dict(layer.named_children())
    for name in names:
        if name in children:
            return name, children[name]
    for name, child in children.items():
        if word in name.lower():
            return name, child
    raise ValueError(f"{where}: no {word} submodule among the layer's children {sorted(children)}; "
                     "give an explicit module path as the component, e.g. 'model.layers[3].mlp'")


def _module_path(path: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def resolve_component(model: nn.Module, rep: RepresentationConfig) -> tuple[str, nn.Module, bool]:
    """(module path, module, is_input) for a representation of `model` (a transformers model)."""
    layers_path, layers = find_decoder_layers(model)
    if rep.layer >= len(layers):
        raise ValueError(f"representation layer {rep.layer} is out of range: the model has {len(layers)} layers")
    comp = rep.component
    if comp not in COMPONENTS:
        is_input = comp.startswith("input:")
        path = _module_path(comp.removeprefix("input:"))
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"component {comp!r}: no module {path!r} in {type(model).__name__} ({e})") from None
        inside = next((i for i, layer in enumerate(layers) if any(module is m for m in layer.modules())), None)
        if inside is not None and inside != rep.layer:
            raise ValueError(f"component {comp!r} is a module of decoder layer {inside}, and the representation says "
                             f"layer {rep.layer}; set layer: {inside} (the module path decides where it is attached)")
        if inside is None and rep.layer != 0:  # else an unused layer would be saved as where it edits
            raise ValueError(f"component {comp!r} is outside the decoder layers ({layers_path}), so the module path, "
                             f"not layer {rep.layer}, decides where it is attached, and that layer would be saved as "
                             f"where it edits without being used; set layer: 0 (what a module path outside the "
                             f"layers takes)")
        return path, module, is_input
    where, is_input = comp.rsplit("_", 1)[0], comp.endswith("_input")
    layer_path = f"{layers_path}.{rep.layer}"
    if where == "block":
        return layer_path, layers[rep.layer], is_input
    names, word = (ATTENTION_NAMES, "att") if where == "attention" else (MLP_NAMES, "mlp")
    name, child = _child(layers[rep.layer], names, word, f"component {comp!r}")
    return f"{layer_path}.{name}", child, is_input


def component_width(model: nn.Module, rep: RepresentationConfig, module: nn.Module, is_input: bool) -> int | None:
    """The width of the hidden states a representation edits: the model's hidden size for a named component (a
    decoder layer's, its attention's or its MLP's input or output), the feature count a module path's `nn.Linear`,
    transformers' `Conv1D`, `nn.Embedding` (output) or norm (1-D weight) states; None when the module does not say."""
    if rep.component in COMPONENTS:
        return hidden_size(model)
    if isinstance(module, nn.Linear):
        return module.in_features if is_input else module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):  # GPT-2: weight (in, out)
        return module.weight.shape[0] if is_input else module.nf
    if isinstance(module, nn.Embedding):
        return None if is_input else module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and not list(module.children()):  # LayerNorm, RMSNorm
        return weight.shape[0]
    return None
