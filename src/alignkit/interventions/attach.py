"""Attach ReFT interventions to any Hugging Face model with forward hooks (Wu, Arora et al. 2024, "ReFT").

`get_reft_model(model, config)` freezes the base model, builds one intervention per representation of
the config, and registers its hooks once. `ReftModel.forward(..., intervention_locations=...)` then runs
the base model; inside each hook the selected (row, position) pairs are gathered with index tensors,
edited by the intervention `h: (N, d) -> (N, d)` and scattered back out of place (`editing.py`).
Positions that are not selected keep the base model's values bitwise. Where each representation lives
in the model is found generically (`locate.py`).

Location layout: `intervention_locations` is a LongTensor `(batch, num_interventions, positions)`,
or `(batch, positions)` meaning the same positions for every intervention. Interventions are numbered
over all adapters: adapters in the order they were added, and within an adapter its representations in
config order (`ReftModel.slots` lists them; `adapter_slice(name)` gives an adapter's range). `-1` (any
negative value) means "no position"; a row whose entries for intervention i are all negative is not
touched by i. Positions count from the start of the (padded) `input_ids`; in `forward` a position past
the input is an error (it would edit nothing), in `generate` one past the prompt is a generated token's.
With a KV cache, positions are absolute (prompt tokens keep their index), so the decode steps of `generate`
never re-edit the prompt; they skip the hooks' work entirely unless `intervene_on_generated` is set. Within one
`generate` call every orthonormal R is evaluated once (`torch.nn.utils.parametrize.cached`), not once per decode
step.

Works under `peft` (LoRA + ReFT trained together) and with non-reentrant gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from alignkit.interventions.base import Intervention, build_intervention
from alignkit.interventions.config import ReftConfig
from alignkit.interventions.editing import (
    ReftPositionError, Run, Slot, Step, cache_length, edit_positions, find_cache, first_tensor, largest_location,
    locate_step,
)
from alignkit.interventions.io import load_adapter_into, save_reft
from alignkit.interventions.locate import (  # noqa: F401  (re-exported: users import them from here)
    ATTENTION_NAMES, MLP_NAMES, find_decoder_layers, hf_model, hidden_size, is_peft_model, layer_index, num_layers,
    resolve_component,
)
from alignkit.interventions.locate import component_width
from alignkit.interventions.positions import (
    locations_from_spans, prompt_spans, prompt_spans_from_labels, prompt_spans_from_mask,
)
from alignkit.interventions.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache

logger = logging.getLogger(__name__)

__all__ = ["ReftModel", "ReftPositionError", "get_reft_model", "Slot", "edit_positions", "find_decoder_layers",
           "hf_model", "hidden_size", "requires_grad_restored_on_error", "resolve_component"]


@contextlib.contextmanager
def requires_grad_restored_on_error(model: nn.Module) -> Iterator[None]:
    """Keep each parameter's `requires_grad` as it is on entry and set it back if the block raises: a wrap that
    freezes the base (or lets peft do it) and is then refused leaves the caller's model trainable as it was
    (`ReftModel.__init__`, `adapters.reft_lora.ReftLora.wrap`). Parameters added inside the block are not touched."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, trainable in grads:
            p.requires_grad_(trainable)
        raise


# ----------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------

class ReftModel(nn.Module):
    """A base model with ReFT adapters attached by hooks. Build it with `get_reft_model`."""

    def __init__(self, model: nn.Module, config: ReftConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.interventions = nn.ModuleDict()  # adapter name -> ModuleList of Intervention
        self.adapter_configs: dict[str, ReftConfig] = {}
        self.slots: list[Slot] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._slot_handles: dict[str, list] = {}
        self._state_handles: dict[int, list] = {}  # layer index -> handles of its state hooks
        self._active: set[str] | None = None  # None = every adapter
        self._run: Run | None = None
        self._seen = 0  # tokens the base model has processed in the current run (its absolute offset)
        self._step: Step | None = None
        self._layer_step: dict[int, Step | None] = {}
        self._recompute = WeakIdKeyDictionary()  # layer input tensor -> Step (checkpoint replay)
        self._prefix_cache: PrefixCache | None = None  # enable_prefix_cache
        self._warned_bare: set[str] = set()  # adapters without a spec already warned about (_check_specs)
        # a refused config (a layer out of range, ...): the caller's model as it was (no hooks, requires_grad back)
        with requires_grad_restored_on_error(model):
            self._freeze_base()
            self.training = model.training  # follow the base's mode (an eval-mode model stays in eval)
            self._handles.append(hf_model(model).register_forward_pre_hook(self._top_pre_hook, with_kwargs=True,
                                                                           prepend=True))
            if config is not None:
                try:
                    self.add_adapter(adapter_name, config)
                except BaseException:
                    self.remove_hooks()
                    raise

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- setup ---------------------------------------------------------------------------------------

    def _freeze_base(self) -> None:
        if is_peft_model(self.model):  # peft already froze the base and left its adapters trainable
            return
        for p in self.model.parameters():
            p.requires_grad_(False)

    def add_adapter(self, name: str, config: ReftConfig, interventions: Sequence[Intervention] | None = None) -> None:
        """Build and attach the interventions of `config` under `name` (after the existing adapters).

        `interventions` (one per representation, already built and loaded) are attached as given
        instead of built from the config; the loaders use this."""
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a ReftConfig, got {type(config).__name__}")
        if not name or "." in name or name in self.interventions:
            raise ValueError(f"adapter name {name!r} is empty, contains '.', or exists already "
                             f"(adapters: {list(self.interventions)})")
        if interventions is not None and len(interventions) != len(config.representations):
            raise ValueError(f"{len(interventions)} interventions for {len(config.representations)} representations")
        if self._prefix_cache is not None:  # it replays layers 0..b-1 from its store: a new edit there would be lost
            raise ValueError(f"adapter {name!r}: the ReFT prefix cache is on and replays decoder layers 0-"
                             f"{self._prefix_cache.frozen - 1} from stored states, so an intervention the new adapter "
                             "puts there would be skipped; call disable_prefix_cache() before adding an adapter and "
                             "enable_prefix_cache() after")
        base = hf_model(self.model)
        _, layers = find_decoder_layers(base)
        ref = next((p for p in layers.parameters() if p.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        targets = [resolve_component(base, rep) for rep in config.representations]  # fail before attaching
        modules = nn.ModuleList()
        for i, (rep, (_, module, is_input)) in enumerate(zip(config.representations, targets)):
            width = component_width(base, rep, module, is_input)
            if interventions is not None:
                iv = interventions[i].to(device=device)
            else:
                kwargs = rep.intervention_kwargs(width or hidden_size(base), str(dtype).removeprefix("torch."))
                iv = build_intervention({"type": rep.intervention, **kwargs}).to(device=device)
                if "dtype" not in kwargs:  # a type without a dtype argument follows the model's
                    iv = iv.to(dtype=dtype)
            got = getattr(iv, "embed_dim", None)
            if width is not None and isinstance(got, int) and got != width:  # else the first forward stops on
                # 'mat1 and mat2 shapes cannot be multiplied', under the CLI once the run folder is written
                raise ValueError(f"representations[{i}] (layer {rep.layer}, component {rep.component!r}): the "
                                 f"intervention has embed_dim={got}, and the hidden states it edits there are {width} "
                                 f"wide; set embed_dim: {width}, or leave embed_dim out (it is the component's width)")
            modules.append(iv)
        modules.train(self.training)
        self.interventions[name] = modules
        self.adapter_configs[name] = config
        for i, ((path, module, is_input), rep) in enumerate(zip(targets, config.representations)):
            slot = Slot(name, i, len(self.slots), rep.layer, rep.component, path, is_input, modules[i])
            self.slots.append(slot)
            self._slot_handles.setdefault(name, []).append(self._register(slot, module))

    def _register(self, slot: Slot, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        layer = layer_index(hf_model(self.model), module)
        if layer is not None and layer not in self._state_handles:
            self._register_state_hooks(layer)
        read = (lambda: self._layer_step.get(layer)) if layer is not None else (lambda: self._step)
        if slot.hook_input:
            def pre_hook(mod, args, kwargs):
                step = read()
                h = first_tensor(args, kwargs)
                if step is None or h is None:
                    return None
                new = edit_positions(h, slot, step)
                return ((new,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(mod, args, output):
            step = read()
            if step is None:
                return None
            if isinstance(output, torch.Tensor):
                return edit_positions(output, slot, step)
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                return type(output)([edit_positions(output[0], slot, step), *output[1:]])
            raise TypeError(f"cannot intervene on the output of {slot.path!r}: {type(output).__name__}")
        return module.register_forward_hook(hook)

    def _register_state_hooks(self, layer: int) -> None:
        """Per decoder layer, once: resolve which call's state this layer runs under. Under gradient
        checkpointing the layer is replayed during backward, after our forward returned (maybe after
        another forward); the replay gets the same input tensor, so the state is looked up by it."""
        _, layers = find_decoder_layers(hf_model(self.model))
        block = layers[layer]

        def on_layer(mod, args, kwargs):
            h = first_tensor(args, kwargs)
            if self._run is None:  # a replay (or a plain call of the base model)
                step = self._recompute.get(h) if h is not None else None
            else:
                step = self._step
                if (h is not None and torch.is_grad_enabled() and mod.training
                        and getattr(mod, "gradient_checkpointing", False)):
                    self._recompute[h] = step
            self._layer_step[layer] = step

        def on_child(mod, args, kwargs):  # replays of `forward` alone skip the layer's own hooks
            h = first_tensor(args, kwargs)
            if self._run is None and h is not None and h in self._recompute:
                self._layer_step[layer] = self._recompute[h]

        handles = [block.register_forward_pre_hook(on_layer, with_kwargs=True, prepend=True)]
        handles += [c.register_forward_pre_hook(on_child, with_kwargs=True, prepend=True) for c in block.children()]
        self._state_handles[layer] = handles

    def _top_pre_hook(self, mod, args, kwargs):
        if self._run is None:
            self._step = None
            return None
        ref = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None or ref.dim() < 2:
            raise ReftPositionError("a forward inside a ReFT call got neither input_ids nor inputs_embeds of shape "
                                    "(batch, seq, ...); ReFT cannot tell which positions it covers")
        offset = locate_step(self._seen, int(ref.shape[1]), kwargs)
        self._seen = offset + int(ref.shape[1])
        self._step = Step(self._run, offset)
        return None

    def enable_prefix_cache(self, max_bytes: int = DEFAULT_MAX_BYTES) -> PrefixCache:
        """Cache, per example, the output of the layers that run before every intervention
        (`alignkit.interventions.prefix_cache`): from an example's second forward on, those frozen layers are skipped.
        ValueError (one line, why) where those layers are not a fixed function of the tokens."""
        self.disable_prefix_cache()
        self._prefix_cache = PrefixCache(self, max_bytes)
        return self._prefix_cache

    def disable_prefix_cache(self) -> None:
        if self._prefix_cache is not None:
            self._prefix_cache.remove()
            self._prefix_cache = None

    def remove_hooks(self) -> None:
        """Remove every hook this wrapper registered (and only those). The wrapper is unusable after."""
        self.disable_prefix_cache()
        for h in self._handles + [h for hs in self._slot_handles.values() for h in hs] + \
                [h for hs in self._state_handles.values() for h in hs]:
            h.remove()
        self._handles, self._slot_handles, self._state_handles = [], {}, {}
        self._recompute = WeakIdKeyDictionary()

    def unwrap(self) -> nn.Module:
        """Remove our hooks and return the base model (its parameters stay frozen)."""
        self.remove_hooks()
        return self.model

    def delete_adapter(self, name: str) -> None:
        self._check_adapter(name)
        for h in self._slot_handles.pop(name):
            h.remove()
        del self.interventions[name]
        del self.adapter_configs[name]
        self.slots = [s for s in self.slots if s.adapter != name]
        for i, s in enumerate(self.slots):
            s.pos = i
        if self._active is not None:
            self._active.discard(name)

    # -- adapters and locations ------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.interventions)

    @property
    def num_interventions(self) -> int:
        return len(self.slots)

    def _check_adapter(self, name: str) -> None:
        if name not in self.interventions:
            raise KeyError(f"unknown ReFT adapter {name!r}; adapters: {list(self.interventions)}")

    def set_active_adapters(self, names: str | Sequence[str] | None) -> None:
        """Switch adapters on (`None` = all). Locations keep covering every adapter."""
        names = [names] if isinstance(names, str) else names
        for n in names or []:
            self._check_adapter(n)
        self._active = None if names is None else set(names)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside this block (e.g. a DPO reference pass)."""
        saved, self._active = self._active, set()
        try:
            yield
        finally:
            self._active = saved

    def adapter_slice(self, name: str) -> slice:
        """The range of `name`'s interventions in dim 1 of `intervention_locations`."""
        self._check_adapter(name)
        pos = [s.pos for s in self.slots if s.adapter == name]
        return slice(pos[0], pos[-1] + 1)

    def locations_for(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """Full `(B, I, P)` locations that route every row to adapter `name` only.

        `positions`: `(B, P)` (the same for each of the adapter's interventions) or `(B, K, P)` with
        K = the adapter's intervention count."""
        return self.route_locations([name] * positions.shape[0], positions)

    def route_locations(self, adapters: Sequence[str | None], positions: torch.Tensor) -> torch.Tensor:
        """Per-row routing: row b is edited only by adapter `adapters[b]` (None = no edit).

        `positions` is `(B, P)` or `(B, K, P)` (K = each named adapter's intervention count).
        Returns `(B, I, P)` long with -1 everywhere else."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        B, I = positions.shape[0], self.num_interventions
        if len(adapters) != B:
            raise ValueError(f"{len(adapters)} adapter names for {B} rows of positions")
        out = torch.full((B, I, positions.shape[-1]), -1, dtype=torch.long, device=positions.device)
        for b, name in enumerate(adapters):
            if name is None:
                continue
            sl = self.adapter_slice(name)
            k = sl.stop - sl.start
            if positions.dim() == 3 and positions.shape[1] != k:
                raise ValueError(f"row {b}: positions give {positions.shape[1]} interventions but adapter "
                                 f"{name!r} has {k}")
            out[b, sl] = positions[b] if positions.dim() == 3 else positions[b].expand(k, -1)
        return out

    def _prepare_locations(self, locations: torch.Tensor | None, batch: int,
                           with_last: bool = False) -> tuple[torch.Tensor | None, int | None]:
        """(locations `(B, I, P)` long on the model's device, their max when `with_last`, else None).
        The max is taken before the copy to the device, so CPU locations cost no device sync."""
        if locations is None:
            return None, None
        locations = torch.as_tensor(locations)
        if locations.dim() == 2:
            locations = locations[:, None, :].expand(-1, self.num_interventions, -1)
        if locations.dim() != 3 or locations.shape[0] != batch or locations.shape[1] != self.num_interventions:
            raise ValueError(f"intervention_locations must be (batch={batch}, num_interventions="
                             f"{self.num_interventions}, positions) (or (batch, positions)), got "
                             f"{tuple(locations.shape)}; order: {[(s.adapter, s.index) for s in self.slots]}")
        if locations.is_floating_point():
            raise ValueError("intervention_locations must be an integer tensor (use -1 for no position)")
        last = largest_location(locations) if with_last else None
        device = next(self.model.parameters()).device
        return locations.to(device=device, dtype=torch.long, non_blocking=True), last

    def set_positions(self, name: str, positions: str | None, share_weights: bool = True) -> None:
        """Record adapter `name`'s position spec ("f1+l1"; saved with its weights): what `forward` and
        `generate` edit when called without `intervention_locations`."""
        self._check_adapter(name)
        self.adapter_configs[name] = dataclasses.replace(self.adapter_configs[name], positions=positions,
                                                         share_weights=share_weights)

    def default_locations(self, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None = None,
                          labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """`(B, I, P)` locations from each adapter's saved position spec: the prompt is each row's attended
        span up to its first completion token (`completion_mask`), else up to its first target (`labels` `(B, T)`,
        -100 off the response, as ReftTrainer reads pyreft batches; `positions.prompt_spans_from_labels`: a row
        whose first token is a target is refused), else the whole attended span (a prompt-only batch, as
        `generate` gets). None when no adapter has a spec; an adapter without one gets -1 (no edit)."""
        spec = any(cfg.positions for cfg in self.adapter_configs.values())  # else labels place nothing: not read
        if completion_mask is not None:
            start, length = prompt_spans(attention_mask, completion_mask)
        elif spec and labels is not None and labels.shape == attention_mask.shape and not labels.is_floating_point():
            start, length = prompt_spans_from_labels(attention_mask, labels)
        else:  # no labels, or a classifier's (B,) class ids / (B, C) multi-label targets: prompt-only rows
            start, length = prompt_spans_from_mask(attention_mask)
        return self.span_locations(start, length)

    def span_locations(self, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor | None:
        """`(B, I, P)` locations for prompts spanning [start, start + length) `(B,)` (absolute indices), from
        each adapter's saved position spec; None when no adapter has one, -1 (no edit) for an adapter
        without one. What `default_locations` uses; a packed batch's caller gives its spans directly."""
        configs = list(self.adapter_configs.items())
        if not any(cfg.positions for _, cfg in configs):
            return None
        parts = []
        for name, cfg in configs:
            sl = self.adapter_slice(name)
            k = sl.stop - sl.start
            if cfg.positions is None:
                parts.append(torch.full((start.shape[0], k, 1), -1, dtype=torch.long, device=start.device))
            else:
                parts.append(locations_from_spans(cfg.positions, start, length, k, cfg.share_weights))
        width = max(p.shape[-1] for p in parts)
        return torch.cat([nn.functional.pad(p, (0, width - p.shape[-1]), value=-1) for p in parts], dim=1)

    def _check_specs(self, call: str) -> None:
        """A call without `intervention_locations` places each switched-on adapter at its saved position spec; one
        without a spec (built without `positions`, or loaded from pyreft) edits nothing there, and the call returns
        the base model's output as if it were the adapter's: one warning per adapter (`disable_adapters` is the
        way to ask for the base model)."""
        bare = [n for n, cfg in self.adapter_configs.items() if cfg.positions is None
                and (self._active is None or n in self._active) and n not in self._warned_bare]
        for name in bare:
            self._warned_bare.add(name)
            logger.warning("ReFT adapter %r has no position spec and this %s passes no intervention_locations, so it "
                           "edits nothing (the output is the base model's); pass intervention_locations, or give it "
                           "a spec (set_positions(%r, 'f1+l1'), ReftConfig(positions=...), or load_pyreft(..., "
                           "positions=...))",
                           name, call, name)

    def _active_slots(self) -> frozenset:
        return frozenset(s.pos for s in self.slots if self._active is None or s.adapter in self._active)

    @contextlib.contextmanager
    def _running(self, run: Run, start: int = 0) -> Iterator[None]:
        """Run the base model under `run`; `start` is the absolute position of the first token the
        first forward will see (the length of a cache the caller passed in, else 0)."""
        if not self._handles:
            raise RuntimeError("this ReftModel's hooks were removed; build a new one with get_reft_model")
        saved, saved_seen = self._run, self._seen
        self._run, self._seen = run, start
        try:
            yield
        finally:
            self._run, self._step, self._seen = saved, None, saved_seen
            self._layer_step.clear()

    # -- running ---------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                intervention_locations: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The base model's forward (loss included when `labels` are given) with the interventions
        applied at `intervention_locations` `(B, I, P)` (-1 = none). Without locations, each adapter's
        saved position spec (`ReftConfig.positions`) places them on the prompt: the attended span up to
        the first token of `completion_mask` (pass it for prompt + completion rows), else up to the first
        target of `labels` (`(B, T)`, -100 off the response: pyreft's batches, placed as ReftTrainer trains
        them; a row whose first token is a target is a ValueError), else the whole attended span; a
        switched-on adapter without a spec edits nothing (one warning). A forward
        continuing a KV cache gets no default locations (its prompt was placed when it ran)."""
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        start = cache_length(find_cache(kwargs)[1])  # a cache the caller passed in (any keyword)
        completion_mask = kwargs.pop("completion_mask", None)
        if intervention_locations is None and start == 0:  # with a cache, the prompt was placed when it ran
            mask = attention_mask if attention_mask is not None else torch.ones(ref.shape[:2], dtype=torch.long)
            self._check_specs("forward")
            intervention_locations = self.default_locations(
                mask.cpu(), None if completion_mask is None else completion_mask.cpu(),
                None if labels is None else labels.cpu())
        locations, last = self._prepare_locations(intervention_locations, ref.shape[0], with_last=True)
        if start == 0 and last is not None and last >= ref.shape[1]:
            _refuse_past_input(torch.as_tensor(intervention_locations), int(ref.shape[1]))
        if labels is not None:
            kwargs["labels"] = labels
        cache = self._prefix_cache
        # the cache only where nothing reads the skipped layers: no KV cache in or out, no hidden states asked for
        use = (cache is not None and start == 0 and input_ids is not None and kwargs.get("use_cache") is False
               and not kwargs.get("output_hidden_states") and not kwargs.get("output_attentions"))
        with self._running(Run(locations, self._active_slots(), last_location=last), start), \
                (cache.around(input_ids, attention_mask, kwargs.get("position_ids")) if use
                 else contextlib.nullcontext()):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 intervention_locations: torch.Tensor | None = None, intervene_on_generated: bool = False,
                 **generate_kwargs: Any) -> Any:
        """`model.generate` with the prompt edited in the prefill pass (kept through the KV cache); without
        `intervention_locations`, at each adapter's saved position spec over the attended prompt, so a
        reloaded adapter called as `generate(**inputs)` edits what training edited;
        with `intervene_on_generated`, every generated token's position is edited too (for the rows
        and interventions that have at least one prompt location). Decode steps past the last prompt
        location do no intervention work, and each orthonormal R is evaluated once per call."""
        if intervention_locations is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            self._check_specs("generate")
            intervention_locations = self.default_locations(mask.cpu())
        locations, last = self._prepare_locations(intervention_locations, input_ids.shape[0], with_last=True)
        run = Run(locations, self._active_slots(), last_location=last)
        if intervene_on_generated and locations is not None:
            run = Run(locations, run.active, input_ids.shape[1], (locations >= 0).any(-1), last)
        _, cache = find_cache(generate_kwargs)
        with self._running(run, cache_length(cache)), parametrize.cached():
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the base's layers, non-reentrant by default (the frozen base's inputs need no grad,
        so reentrant checkpointing would cut the interventions' gradients). Hooks keep working: a
        layer replayed during backward runs under the state of the forward that recorded it."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        base = hf_model(self.model)
        if kwargs["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                                 offload=offload)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Alias of `activation_checkpointing_enable` (the name transformers < 5.x and Trainer use)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        base = hf_model(self.model)
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable

    # -- parameters ------------------------------------------------------------------------------------

    def count_parameters(self) -> int:
        """Trainable intervention parameters."""
        return sum(p.numel() for p in self.interventions.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> str:
        model_params = sum(p.numel() for p in self.model.parameters())
        trainable_model = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        iv = self.count_parameters()
        text = (f"trainable intervention params: {iv:,} || trainable model params: {trainable_model:,} || "
                f"model params: {model_params:,} || trainable%: {100 * (iv + trainable_model) / model_params:.4f}")
        logger.info(text)
        return text

    def save_pretrained(self, folder: str, adapter_name: str | None = None) -> None:
        """Write one adapter (`adapter_name`, or the only one) to `folder`; see `alignkit.interventions.io`."""
        save_reft(self, folder, adapter_name=adapter_name)

    def load_adapter(self, folder: str, adapter_name: str = "default") -> None:
        """Attach the adapter saved in `folder` under `adapter_name`."""
        load_adapter_into(self, folder, adapter_name)


def _refuse_past_input(locations: torch.Tensor, length: int) -> None:
    """ValueError naming the first location of a forward's `intervention_locations` past its `length` input tokens:
    one forward runs every position it will ever see, so such a location would edit nothing, without a word."""
    index = tuple(int(x) for x in (locations >= length).nonzero()[0])  # (b, i, p) or (b, p)
    raise ValueError(f"intervention_locations[{', '.join(map(str, index))}] is {int(locations[index])}, past this "
                     f"forward's {length} input tokens (positions 0..{length - 1}), so it would edit nothing; "
                     f"locations index this call's padded input_ids (-1 = none): build them from this batch "
                     f"(alignkit.interventions.positions.locations_from_spans), or pass none to use the adapter's "
                     f"saved position spec")


def get_reft_model(model: nn.Module, config: ReftConfig, adapter_name: str = "default") -> ReftModel:
    """Freeze `model` (a transformers model, or a peft one: its LoRA weights stay trainable), attach the
    interventions of `config` under `adapter_name` and return the wrapper."""
    return ReftModel(model, config, adapter_name)
