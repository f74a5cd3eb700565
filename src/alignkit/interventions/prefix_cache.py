"""Frozen-prefix cache: ReFT training over several epochs runs the layers below its interventions once per example.

ReFT freezes the base model and edits hidden states at its intervened layers. Let b be the number of leading decoder
layers that nothing trainable touches: for each intervention, its layer's index (an input, or a part inside the
layer: attention, MLP) or its layer's index + 1 (a block output: the whole layer runs before the edit); b = the
smallest. The output of layer b - 1 is then a fixed function of the example's tokens: the embedding and layers
0 .. b-1 have no trainable parameter, no dropout, and see nothing the interventions change. pyreft's recipes train
for many epochs on few examples (tens to hundreds of epochs), so from the second epoch on that part of every
forward recomputes what the first epoch already computed: for pyreft's default (block output of layer 15 of 32),
16 of the 32 layers.

`PrefixCache` keeps, per example (the exact token ids of the sequence: the bytes of its ids are the key, so a
shuffled epoch, another batch composition or a packed row finds it; no hash collisions), the (n, d) output of
layer b - 1, as the layer returns it and before any intervention edits it, in host memory, up to `max_bytes`. A
forward whose sequences are ALL in the cache runs layers 0 .. b-2 as the identity and layer b - 1 as "return the
cached states" (their `forward` swapped for the call; the layers' hooks, the interventions' among them, still
run around them); any other forward runs the model as usual and a forward hook on layer b - 1 (run before the
interventions' own) stores its sequences' states (the "fill" pass, the first epoch). Layouts: one packed row
(position ids restarting at 0 per sequence, no mask), right-padded rows (a mask that is a prefix of ones per row;
the padding positions get zeros, which masked attention never reads), or rows without padding. Any other layout
(left padding, a KV cache, inputs_embeds, hidden states asked for) runs without the cache.

Loud where it could be wrong:
- the first forward that could use the cache runs the real layers instead and compares their output with the
  cached states (max |difference| <= 64 eps x max |h|, eps of the states' dtype or of autocast's, i.e. float
  rounding of other matmul shapes);
  further apart raises `PrefixCacheMismatch` (what, by how much, how to turn the cache off);
- `ReftModel.add_adapter` is refused while the cache is on: a new intervention in the cached layers would be
  skipped by the replay;
- the frozen prefix's parameters are watched through their version counters and their identity: any in-place
  change (a load, an optimiser step on a parameter that should have been frozen) or a parameter replaced by another
  object (`load_state_dict(assign=True)`, a module swapped in) empties the cache, with a warning; the objects
  recorded at enable time are checked by plain lookups on each forward (no `Module.parameters()` walk);
- `unusable_reason` refuses models where the prefix is not fixed: a trainable parameter in layers 0 .. b-1 (LoRA
  there), a dropout (module or attention dropout) there, compiled or checkpointed layers, sharded layers (FSDP2,
  DeepSpeed ZeRO-3), accelerate offload hooks, an intervention outside the decoder layers or in layer 0's input
  or parts (b = 0: nothing to cache).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from alignkit.interventions.editing import first_tensor
from alignkit.interventions.locate import find_decoder_layers, hf_model, layer_index

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 * 1024 ** 3


class PrefixCacheMismatch(RuntimeError):
    """The cached output of the frozen layers differs from what those layers compute."""


def frozen_layers(reft_model: nn.Module) -> int | None:
    """b: how many leading decoder layers run entirely before any intervention of `reft_model` (None when one sits
    outside the layers). An intervention on a layer's output (`block_output`) leaves that whole layer frozen; one on
    its input or on a part inside it (attention, MLP) does not."""
    base = hf_model(reft_model.model)
    _, layers = find_decoder_layers(base)
    found = []
    for slot in reft_model.slots:
        module = base.get_submodule(slot.path)
        i = layer_index(base, module)
        if i is None:
            return None
        found.append(i + 1 if module is layers[i] and not slot.hook_input else i)
    return min(found) if found else None


def _prefix_modules(base: nn.Module, layers: nn.ModuleList, L: int) -> list[nn.Module]:
    emb = base.get_input_embeddings()
    return ([emb] if emb is not None else []) + list(layers[:L])


def unusable_reason(reft_model: nn.Module) -> str | None:
    """Why the layers below `reft_model`'s interventions are not a fixed function of the tokens (None: they are)."""
    if not getattr(reft_model, "slots", None):
        return "the model has no interventions"
    L = frozen_layers(reft_model)
    if L is None:
        return "an intervention sits outside the decoder layers"
    if L == 0:
        return "an intervention sits in layer 0 (its input or a part inside it): nothing below it to cache"
    base = hf_model(reft_model.model)
    _, layers = find_decoder_layers(base)
    prefix = _prefix_modules(base, layers, L)
    for m in prefix:
        for name, p in m.named_parameters():
            if p.requires_grad:
                return (f"parameter {name!r} in the layers below the interventions (0-{L - 1}) is trained "
                        "(LoRA on those layers?)")
        for name, sub in m.named_modules():
            if isinstance(sub, nn.Dropout) and sub.p > 0:
                return (f"dropout {name or type(sub).__name__} (p={sub.p}) in the layers below the interventions "
                        f"(0-{L - 1})")
            if float(getattr(sub, "attention_dropout", 0.0) or 0.0) > 0:
                return (f"attention dropout {getattr(sub, 'attention_dropout')} in the layers below the "
                        f"interventions (0-{L - 1})")
            if getattr(sub, "_hf_hook", None) is not None:
                return "accelerate hooks (device map / offload) on the layers below the interventions"
    for layer in layers[:L]:
        if type(layer).__name__.startswith("FSDP") or any(hasattr(p, "ds_id") for p in layer.parameters()):
            return "the layers are sharded (FSDP2 / DeepSpeed ZeRO-3), which gathers them around their own forward"
        if getattr(layer, "_compiled_call_impl", None) is not None:
            return "the decoder layers are compiled (train.compile)"
        if getattr(layer, "gradient_checkpointing", False):
            return "activation checkpointing is on"
    return None


def _segments(ids: Tensor, attention_mask: Tensor | None,
              position_ids: Tensor | None) -> list[tuple[int, int, int]] | None:
    """(row, start, end) of each sequence in the batch, or None for a layout the cache does not handle."""
    B, T = ids.shape
    if attention_mask is None and position_ids is not None and B == 1:  # one packed row
        pos = position_ids.reshape(-1).cpu()
        starts = (pos == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            return None
        ends = starts[1:] + [T]
        for s, e in zip(starts, ends):
            if not torch.equal(pos[s:e], torch.arange(e - s)):
                return None
        return [(0, s, e) for s, e in zip(starts, ends)]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return None
        m = attention_mask.cpu().bool()
        n = m.sum(1)
        if not torch.equal(m, torch.arange(T)[None, :] < n[:, None]):  # right padding only
            return None
        lengths = n.tolist()
    else:
        lengths = [T] * B
    if position_ids is not None:
        pos = position_ids.cpu().expand(B, T)
        if any(not torch.equal(pos[b, :n], torch.arange(n)) for b, n in enumerate(lengths)):
            return None
    return [(b, 0, n) for b, n in enumerate(lengths) if n > 0]


class PrefixCache:
    """The cache of one ReftModel (see the module's docstring). Build it with `ReftModel.enable_prefix_cache`."""

    def __init__(self, reft_model: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        reason = unusable_reason(reft_model)
        if reason is not None:
            raise ValueError(f"ReFT prefix cache: cannot cache the layers below the interventions: {reason}; "
                             "train without it (train.reft_prefix_cache: false)")
        self.frozen = frozen_layers(reft_model)  # b: layers 0 .. b-1 are cached
        base = hf_model(reft_model.model)
        _, self.layers = find_decoder_layers(base)
        self._base = base
        self._watch()
        self._versions = self._state()[1]
        self.max_bytes = int(max_bytes)
        self.store: dict[bytes, Tensor] = {}
        self.bytes = 0
        self.hits = self.fills = 0
        self.verified = False
        self._full_said = False
        self._tuple_out = False
        self._mode: str | None = None
        self._plan: tuple[list[tuple[int, int, int]], list[bytes], tuple[int, int]] | None = None
        self._pending: Tensor | None = None
        # prepend: the states are read before any intervention hook on the same layer edits them
        self._handles = [self.layers[self.frozen - 1].register_forward_hook(self._out_hook, prepend=True)]

    def _watch(self) -> None:
        """Record what `_state` checks each forward: the embedding and cached layer objects, every (dict, key, object)
        of their submodules' `_parameters` and `_modules` with each dict's size, and the parameters themselves."""
        self._emb = self._base.get_input_embeddings()
        self._layer_objs = list(self.layers[:self.frozen])
        self._entries: list[tuple[dict, str, Any]] = []
        self._sizes: list[tuple[dict, int]] = []
        self._watched: list[Tensor] = []
        for root in _prefix_modules(self._base, self.layers, self.frozen):
            for m in root.modules():
                for d in (m._parameters, m._modules):
                    self._sizes.append((d, len(d)))
                    self._entries += [(d, k, v) for k, v in d.items() if v is not None]
                self._watched += [p for p in m._parameters.values() if p is not None]

    def _state(self) -> tuple[bool, int]:
        """(replaced, version sum). Replaced: a frozen parameter or module is not the object watched (a
        `load_state_dict(assign=True)`, a module swapped in, one added): its version counter is not the one watched,
        so the new objects are watched from now on. Plain lookups, no `Module.parameters()` walk: this runs on every
        forward, including the ones the cache makes short."""
        replaced = (self._base.get_input_embeddings() is not self._emb
                    or any(a is not b for a, b in zip(self.layers, self._layer_objs))
                    or any(len(d) != n for d, n in self._sizes) or any(d.get(k) is not v for d, k, v in self._entries))
        if replaced:
            self._watch()
        return replaced, sum(p._version for p in self._watched)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.store.clear()
        self.bytes = 0

    # -- one forward ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def around(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Iterator[None]:
        """Run one forward of the model with the cache: fill, verify or use it (see the module's docstring)."""
        replaced, versions = self._state()
        if replaced or versions != self._versions:
            if self.store:
                logger.warning("ReFT prefix cache: the frozen layers 0-%d %s; the %d cached examples are dropped and "
                               "computed again", self.frozen - 1, "had a parameter replaced by another object"
                               if replaced else "changed in place", len(self.store))
            self.store.clear()
            self.bytes, self.verified, self._versions = 0, False, versions
        segs = _segments(input_ids, attention_mask, position_ids)
        if segs is None:
            yield
            return
        ids = input_ids.detach().cpu()
        keys = [ids[b, s:e].numpy().tobytes() for b, s, e in segs]
        hit = all(k in self.store for k in keys)
        self._mode = ("inject" if self.verified else "verify") if hit else "fill"
        self._plan = (segs, keys, tuple(input_ids.shape))
        originals: list[tuple[nn.Module, Any]] = []
        try:
            if self._mode == "inject":
                self._pending = self._assemble()
                for i, layer in enumerate(self.layers[:self.frozen]):
                    originals.append((layer, layer.__dict__.get("forward")))
                    layer.forward = self._identity if i < self.frozen - 1 else self._cached
                self.hits += 1
            yield
        finally:
            for layer, before in originals:
                if before is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = before
            self._mode, self._plan, self._pending = None, None, None

    def _hidden(self, args: tuple, kwargs: dict) -> Tensor:
        """The hidden states a skipped layer was called with (compat row M7: first argument or `hidden_states=`)."""
        h = first_tensor(args, kwargs)
        if h is None:
            raise PrefixCacheMismatch("ReFT prefix cache: a decoder layer was called without its hidden states as the "
                                      "first argument or hidden_states=; train without the cache "
                                      "(train.reft_prefix_cache: false)")
        return h

    def _identity(self, *args: Any, **kwargs: Any) -> Any:
        h = self._hidden(args, kwargs)
        return (h,) if self._tuple_out else h

    def _cached(self, *args: Any, **kwargs: Any) -> Any:
        """Layer b - 1's forward while every sequence is cached: its stored output, in the shape of its input."""
        h = self._hidden(args, kwargs)
        new = self._pending.to(device=h.device, dtype=h.dtype)
        if new.shape != h.shape:
            raise PrefixCacheMismatch(f"ReFT prefix cache: cached states {tuple(new.shape)} for layer "
                                      f"{self.frozen - 1}'s output, input {tuple(h.shape)}; train without the cache "
                                      "(train.reft_prefix_cache: false)")
        self._pending = None
        return (new,) if self._tuple_out else new

    def _assemble(self) -> Tensor:
        segs, keys, (B, T) = self._plan
        pieces = [self.store[k] for k in keys]
        d = pieces[0].shape[-1]
        if len(segs) == B and all(s == 0 and e == T for _, s, e in segs):  # rows without padding
            return torch.stack(pieces)
        if B == 1 and segs[0][1] == 0 and segs[-1][2] == T and all(a[2] == b[1] for a, b in zip(segs, segs[1:])):
            return torch.cat(pieces)[None]  # one packed row
        out = pieces[0].new_zeros(B, T, d)
        for (b, s, e), piece in zip(segs, pieces):
            out[b, s:e] = piece
        return out

    def _out_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._mode is None or self._mode == "inject":
            return None
        if self._mode == "fill":
            self._tuple_out = not isinstance(output, Tensor)
        h = (output if isinstance(output, Tensor)
             else output[0] if isinstance(output, (tuple, list)) and output else None)
        if not isinstance(h, Tensor):
            return None
        segs, keys, _ = self._plan
        if self._mode == "verify":
            self._verify(h.detach())
            return None
        for (b, s, e), k in zip(segs, keys):  # fill
            if k in self.store:
                continue
            piece = h[b, s:e].detach().to("cpu", copy=True)
            size = piece.numel() * piece.element_size()
            if self.bytes + size > self.max_bytes:
                if not self._full_said:
                    logger.info("ReFT prefix cache full at %d examples (%.2f GiB, max_bytes); the rest are "
                                "computed every time", len(self.store), self.bytes / 1024 ** 3)
                    self._full_said = True
                continue
            self.store[k] = piece
            self.bytes += size
            self.fills += 1
        return None

    def _verify(self, h: Tensor) -> None:
        cached = self._assemble().to(device=h.device, dtype=h.dtype)
        segs = self._plan[0]
        real = torch.cat([h[b, s:e] for b, s, e in segs]).float()
        mine = torch.cat([cached[b, s:e] for b, s, e in segs]).float()
        diff = float((real - mine).abs().max())
        eps = torch.finfo(h.dtype).eps
        if torch.is_autocast_enabled(h.device.type):  # the layers' matmuls round to the autocast dtype
            eps = max(eps, torch.finfo(torch.get_autocast_dtype(h.device.type)).eps)
        tol = 64 * eps * max(1.0, float(real.abs().max()))
        if not diff <= tol:
            raise PrefixCacheMismatch(
                f"ReFT prefix cache: the cached output of layer {self.frozen - 1} differs from what the frozen layers "
                f"compute by {diff:.3g} (> {tol:.3g}, float rounding): the layers below the interventions are not "
                "a fixed function of the tokens in this model; train without the cache (train.reft_prefix_cache: "
                "false)")
        self.verified = True
        logger.info("ReFT prefix cache: checked against the frozen layers (max difference %.3g); layers 0-%d now "
                    "run once per example", diff, self.frozen - 1)


__all__ = ["DEFAULT_MAX_BYTES", "PrefixCache", "PrefixCacheMismatch", "frozen_layers", "unusable_reason"]
