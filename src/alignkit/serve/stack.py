"""One base model carrying every served adapter at once, and what each row of a batch needs to be routed.

    stack = load_stack("base/", {"polite": "runs/dpo-reft/model", "terse": "runs/dpo-lora/model"})
    stack.route("polite")   # -> Route(lora=None, reft="polite", positions=Positions(1, 1), share_weights=True)

The base transformers model is loaded once. Each adapter folder says how its rows are routed
(`alignkit.adapters`: `adapter_in(folder).route(name)`, a `Route`). Adapters with a LoRA part
are loaded into ONE `peft.PeftModel` under the served name (`load_adapter(..., adapter_name=name)`); rows
are routed by the stacked per-row LoRA of `serve/lora.py` (all adapters' A/B stacked per layer, two batched
matmuls), or, where that does not apply (DoRA, LoRA biases, non-Linear layers), by peft's mixed-adapter
batches (`adapter_names=[...]`, `"__base__"` = no LoRA).
Adapters with a ReFT part are attached to ONE `ReftModel` around that,
also under the served name, and rows are routed with per-row `intervention_locations` (each adapter's
prompt positions as it was trained, -1 elsewhere). The bare base is served under its folder's name.

Only causal LMs: a sequence-classifier adapter, or a fully finetuned model (not an adapter), is refused
with a message that names the folder.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alignkit.adapters.api import check_finite
from alignkit.adapters.base import Adapter, Route, adapter_in, check_base, is_classifier, unwrap_lm
from alignkit.adapters.config import ADAPTER_CONFIG_NAME
from alignkit.adapters.full import Full
from alignkit.adapters.lora import check_lora_fits, check_lora_placed
from alignkit.data.chat import PROMPT_FORMAT_FILE, format_mismatch, trained_prompt_formats
from alignkit.data.positions import locations_from_spans
from alignkit.files import FileState, UnchangedSinceChecked, read_json_object
from alignkit.interventions.attach import ReftModel
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.serve.lora import StackedLora
from alignkit.serve.template import check_chat_template

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
PEFT_BASE = "__base__"  # peft's name for "no LoRA on this row" in mixed batches


@dataclass(frozen=True)
class Source:
    """The files a served model was loaded from (`names` in `folder`) and their state (size, mtime) taken before
    they were read: the server holds those weights in memory, so once the files change (a new run saved over the
    folder) it would go on answering with the old ones under the same name (`changed`)."""

    what: str  # "adapter 'terse'", "the base model"
    folder: Path
    names: tuple[str, ...]
    state: FileState
    loaded_at: float  # wall-clock time of the state

    @classmethod
    def of(cls, what: str, folder: Path, names: set[str]) -> "Source":
        names_ = tuple(sorted(names))
        return cls(what, folder, names_, UnchangedSinceChecked.state(*(folder / n for n in names_)), time.time())

    def changed(self) -> str | None:
        """None while every file is as it was loaded, else one line naming the file and what to do."""
        for name, then in zip(self.names, self.state):
            try:
                now = UnchangedSinceChecked.state(self.folder / name)[0]
            except OSError:
                now = None
            if now != then:
                how = "was removed" if now is None else "changed"
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.loaded_at))
                return (f"{self.what}: {self.folder / name} {how} on disk after the server loaded it ({when}), so "
                        f"the server would answer with the weights it loaded then, not the folder's; restart alignkit "
                        f"serve to serve the folder as it is now (or serve the new files under another name)")
        return None


@dataclass
class Stack:
    """The served model (a `ReftModel` around the peft model or the base), its tokenizer, and the routes."""

    model: nn.Module
    tokenizer: Any
    base_name: str
    routes: dict[str, Route] = field(default_factory=dict)
    has_lora: bool = False
    lora: Any = None  # StackedLora (serve/lora.py), or None: peft's `adapter_names` routes the LoRA rows
    # served name -> the adapter folder whose saved tokenizer has another chat template than `tokenizer`'s (trained
    # with `model.tokenizer`): the chat endpoint would format its messages with a template it never saw
    other_template: dict[str, str] = field(default_factory=dict)
    # served name -> the files it was loaded from (`Source`); the base's under `base_name`, and every adapter's
    # answers depend on the base's too
    sources: dict[str, Source] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.routes)

    def route(self, name: str) -> Route:
        try:
            return self.routes[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; served: {self.names}") from None

    def changed(self, name: str) -> str | None:
        """One line when the files served name `name` (or the base under it) was loaded from changed on disk since
        (`Source.changed`), else None."""
        for key in dict.fromkeys([self.base_name, name]):
            source = self.sources.get(key)
            msg = source.changed() if source is not None else None
            if msg is not None:
                return msg
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_config(self) -> Any:
        return unwrap_lm(self.model).config

    def lora_routing(self, routes: list[Route]) -> tuple[Any, dict[str, Any]]:
        """(context manager, forward kwargs) that give row b the LoRA of `routes[b]`: the stacked per-row
        LoRA hooks when they apply, else peft's `adapter_names` (`"__base__"` = none)."""
        if not self.has_lora:
            return contextlib.nullcontext(), {}
        if self.lora is not None:
            return self.lora.route([r.lora for r in routes], self.device), {}
        return contextlib.nullcontext(), {"adapter_names": [r.lora or PEFT_BASE for r in routes]}

    def locations(self, routes: list[Route], start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """`(B, I, P)` intervention locations for prompts spanning [start, start + length) of each row:
        each ReFT row gets its adapter's trained positions in its adapter's slots, -1 everywhere else.
        All -1 when no row uses ReFT (the hooks then do no work; None would mean "each adapter's saved
        position spec" to `ReftModel`)."""
        if not any(r.reft for r in routes):
            return torch.full((len(routes), self.model.num_interventions, 1), -1, dtype=torch.long)
        model = self.model
        parts: list[tuple[int, slice, torch.Tensor]] = []
        width = 1
        for b, r in enumerate(routes):
            if r.reft is None:
                continue
            sl = model.adapter_slice(r.reft)
            loc = locations_from_spans(r.positions, start[b:b + 1], length[b:b + 1], sl.stop - sl.start,
                                       r.share_weights, warn=False)[0]  # (K, P); a short prompt: the engine says it
            parts.append((b, sl, loc))
            width = max(width, loc.shape[-1])
        out = torch.full((len(routes), model.num_interventions, width), -1, dtype=torch.long)
        for b, sl, loc in parts:
            out[b, sl, :loc.shape[-1]] = loc
        return out


def _check_cache(lm: nn.Module, base: Path) -> None:
    """The engine merges and slices full-attention KV caches; sliding-window or linear-attention layers
    (whose caches drop or fold old tokens) are not supported yet."""
    cache = DynamicCache(config=lm.config)
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"{base}: this model's KV cache has {', '.join(odd)} layers (sliding-window or other "
                         "non-full attention); alignkit serve handles full-attention caches only (not yet others)")


def _adapter(folder: Path) -> Adapter:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    adapter = adapter_in(folder)
    adapter.require_files(folder)  # before the base loads
    check_json_files(adapter, folder)
    return adapter


# the JSON files of a base folder transformers reads; a damaged generation_config.json is not an error there (row
# T27): from_pretrained falls back to config.json's ids (an info log), so its end tokens and sampling defaults go
COPY_AGAIN = " (or copy it again from where it came from)"
BASE_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def check_base_json(base: Path) -> None:
    """ValueError naming the first of `BASE_JSON_FILES` in `base` that is not a JSON object, before the base loads
    (a damaged generation_config.json was served without its end tokens, a damaged tokenizer.json stopped the
    server with json's bare message naming no file)."""
    for name in BASE_JSON_FILES:
        if (base / name).is_file():
            read_json_object(base / name, f"save the base model again{COPY_AGAIN}", "a file of the base model")


def check_json_files(adapter: Adapter, folder: Path) -> None:
    """ValueError naming the first JSON file of `adapter`'s kind in `folder` (peft's adapter_config.json,
    reft_config.json) that is not a JSON object: peft read a damaged adapter_config.json after the base had loaded
    and the server stopped with json's bare "Expecting property name ..." naming no file."""
    for name, what in adapter.weight_files:
        if name.endswith(".json"):
            read_json_object(folder / name, f"save the adapter again{COPY_AGAIN}", what)


def _check_new_finite(model: nn.Module, before: set[int], folder: str | Path) -> None:
    """`load_adapter`'s refusal of non-finite weights, for the parameters one served adapter just added: a NaN in
    one adapter would make every row routed to it answer garbage while the server reports nothing."""
    check_finite([(n, p) for n, p in model.named_parameters() if id(p) not in before], folder)


def check_served_names(base_name: str, adapters: Mapping[str, Any]) -> None:
    """ValueError when a served name is not one a client can send (`NAME_RE`) or an adapter takes the base's name
    (a request for it would reach one of the two only: vLLM's server gives it to the adapter)."""
    for name in [base_name, *adapters]:
        if not NAME_RE.match(name):
            raise ValueError(f"served model name {name!r}: use letters, digits and _.:/- (at most 128, starting "
                             "with a letter or digit)")
    if base_name in adapters:
        raise ValueError(f"adapter name {base_name!r} is the base model's served name; pick another name "
                         "(or set the base's name with --base-name)")


def warn_prompt_formats(folders: Mapping[str, str | Path]) -> None:
    """A warning for each served model (name -> folder) trained on prompts formatted otherwise than with the chat
    template, which the chat endpoint formats with."""
    for name, folder in folders.items():
        trained = trained_prompt_formats(folder)
        if format_mismatch(trained, {"chat-template": 1}):
            logger.warning("serve: %r was trained on prompts formatted as %s (%s in %s), and /v1/chat/completions "
                           "formats messages with the tokenizer's chat template, which it never saw: send prompts "
                           "formatted as in training to /v1/completions", name, " / ".join(map(repr, sorted(trained))),
                           PROMPT_FORMAT_FILE, folder)


def size_mismatch(error: BaseException) -> str | None:
    """The first "size mismatch for <name>: copying a param with shape ... from checkpoint, the shape in current
    model is ..." line of torch's load_state_dict error (row P17), without its final dot; None for another error."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line.rstrip(".") for line in lines if line.startswith("size mismatch for ")), None)


def load_loras(lm: nn.Module, loras: Mapping[str, str | Path], base: Path) -> nn.Module:
    """`lm` as a PeftModel holding each LoRA adapter of `loras` (served name -> folder) under its name; one that does
    not fit the base (shapes) or holds non-finite values is a ValueError naming its folder."""
    model: nn.Module = lm
    for i, (name, folder) in enumerate(loras.items()):
        before = {id(p) for p in model.parameters()}
        check_lora_fits(lm, folder, base)  # lm: the transformers model, its module names those of the base
        try:
            if i == 0:
                model = PeftModel.from_pretrained(lm, str(folder), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except RuntimeError as e:
            # check_lora_fits compares the LoRA's own tensors; one besides them (modules_to_save, saved embedding
            # weights) of another shape (a base with another vocabulary or head) is torch's load_state_dict
            # "size mismatch for <name>: ..." (row P17). Any other RuntimeError is no misfit: raised as it is.
            mismatch = size_mismatch(e)
            if mismatch is None:
                raise
            raise ValueError(f"{folder}: this LoRA adapter does not fit the base model {base} ({mismatch}); "
                             "serve it with the base it was trained on") from None
        _check_new_finite(model, before, folder)
        check_lora_placed(model, name, folder, base)
        logger.info("serve: LoRA adapter %r from %s", name, folder)
    return model


def load_stack(base: str | Path, adapters: Mapping[str, str | Path] | None = None, *, base_name: str | None = None,
               dtype: str = "float32", device: str | torch.device | None = None,
               attn_implementation: str | None = None, stacked_lora: bool = True,
               rope_scaling: dict[str, Any] | None = None) -> Stack:
    """Load the base model in `base` once and every adapter of `adapters` (served name -> folder) onto it.

    `base_name` (default: the base folder's name) serves the bare base. Names must be unique, match
    `NAME_RE` and not collide with the base's name. `stacked_lora=False` routes LoRA rows with peft's
    `adapter_names` instead of the stacked per-row LoRA of `serve/lora.py`. `rope_scaling` (the serve config's
    key): the base's RoPE scaling, as training's `model.rope_scaling` (an adapter trained with one needs it)."""
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"base model folder {base} does not exist")
    adapters = dict(adapters or {})
    base_name = base_name or base.resolve().name
    check_served_names(base_name, adapters)
    check_base_json(base)
    served: dict[str, Route] = {}
    sources = {base_name: Source.of("the base model", base, Full.saved_files(base))}
    for name, folder in adapters.items():
        adapter = _adapter(Path(folder))
        files = adapter.saved_files(Path(folder)) | {n for n in [ADAPTER_CONFIG_NAME] if (Path(folder) / n).is_file()}
        sources[name] = Source.of(f"adapter {name!r}", Path(folder), files)
        try:
            served[name] = adapter.route(name)
        except ValueError as e:  # e.g. a fully finetuned model: not an adapter
            raise ValueError(f"{folder}: {e}") from None
    tokenizer = load_tokenizer(base)
    check_chat_template(tokenizer, f"base {base}")  # before the model is loaded
    other_template = saved_tokenizers_differ(tokenizer, base, adapters)
    lm = load_model(base, dtype=dtype, attn_implementation=attn_implementation, rope_scaling=rope_scaling,
                    rope_key="rope_scaling")
    if is_classifier(lm):
        raise ValueError(f"{base}: a sequence classifier; serve needs a causal LM")
    if device is not None:
        lm = lm.to(device)
    lm.eval()
    _check_cache(lm, base)
    for name in served:  # an adapter trained on another base with the same shapes would serve something else
        check_base(lm, adapters[name], rope_key="rope_scaling")
    warn_prompt_formats({base_name: base, **adapters})
    routes: dict[str, Route] = {base_name: Route(base_name, "base")}
    model: nn.Module = lm
    lora = [n for n, r in served.items() if r.lora]
    if lora:
        model = load_loras(lm, {n: adapters[n] for n in lora}, base)
    stacked = None
    if lora and stacked_lora:
        stacked = StackedLora.build(model, lora)
    reft = ReftModel(model)
    for name, r in served.items():
        if r.reft:
            before = {id(p) for p in reft.parameters()}
            reft.load_adapter(str(adapters[name]), adapter_name=r.reft)
            _check_new_finite(reft, before, adapters[name])
            logger.info("serve: ReFT adapter %r from %s (positions %s)", name, adapters[name], r.positions)
        routes[name] = r
    for p in reft.parameters():
        p.requires_grad_(False)
    reft.eval()
    if device is not None:
        reft.to(device)
    return Stack(reft, tokenizer, base_name, routes, has_lora=bool(lora), lora=stacked, other_template=other_template,
                 sources=sources)


# what happens to the chat requests of an adapter trained with another chat template (alignkit's engine: refused)
CHAT_REFUSED = "its chat requests are refused (400)"


def saved_tokenizers_differ(tokenizer: Any, base: Path, adapters: Mapping[str, str | Path],
                            chat: str = CHAT_REFUSED) -> dict[str, str]:
    """{served name: folder} of the adapters saved with a tokenizer whose chat template is not the base's (`tokenizer`,
    the one the server formats and tokenizes with); each is a warning saying what happens to its chat requests
    (`chat`: alignkit's chat endpoint refuses it; vLLM's server formats them with the base's template). A saved
    tokenizer with another vocabulary is a ValueError: every prompt would be tokenized with ids it was not trained
    on. Adapters saved without a tokenizer, or with one without a chat template, are not checked."""
    out: dict[str, str] = {}
    for name, folder in adapters.items():
        if not (Path(folder) / "tokenizer_config.json").is_file():
            continue
        own = load_tokenizer(folder)
        if own.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"adapter {name!r}: the tokenizer saved with it ({folder}) has another vocabulary than "
                             f"the base's ({base}), which the server tokenizes with: serve it on a copy of the base "
                             f"folder holding the tokenizer it was trained with")
        template = getattr(own, "chat_template", None)
        if template and template != getattr(tokenizer, "chat_template", None):
            out[name] = str(folder)
            logger.warning("serve: %r was trained with the chat template of the tokenizer saved in %s, not the one of "
                           "the base %s that /v1/chat/completions formats messages with: %s; send prompts "
                           "formatted as in training to /v1/completions, or serve it on a copy of the base folder "
                           "holding that tokenizer", name, folder, base, chat)
    return out


__all__ = ["BASE_JSON_FILES", "CHAT_REFUSED", "Route", "Source", "Stack", "check_base_json", "check_json_files",
           "check_served_names", "load_loras", "load_stack", "saved_tokenizers_differ", "size_mismatch",
           "warn_prompt_formats", "PEFT_BASE", "NAME_RE"]
