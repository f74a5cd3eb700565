"""Generation in the online loop through a vLLM server in another process (`method.vllm_mode: server`):

    alignkit vllm-serve --model runs/sft/model --enable-lora          # process 1 (vLLM's environment)
    alignkit grpo --config grpo.yaml method.generation_backend=vllm \\
        method.vllm_mode=server method.vllm_server_url=http://127.0.0.1:8000   # process 2

The trainer keeps the policy; before every generation (so after every optimizer step) it pushes the policy's
current weights to the server over HTTP, then asks for token ids. Everything travels in the request body, so
the server may be on another machine (no NCCL; these machines have none):
- full:  the transformers state dict as one safetensors blob (POST /weights); the server loads it with vLLM's
         in-place `reload_weights`, as the colocated engine does.
- lora:  peft's adapter tensors as one safetensors blob whose metadata carries adapter_config.json
         (POST /lora); the server saves the two files and serves them under a NEW LoRA id.
- reft, reft+lora: refused (vLLM knows nothing of interventions).

At the first contact the client waits for the server (`vllm_server_timeout`) and checks its `/info` against the policy:
architecture, vocabulary, hidden size, layers; for LoRA also --enable-lora, the rank and that no full-weights push has
replaced the base; for an adapter policy, the weights of the server's model folder against the policy's base (as the
colocated engine's folder: a few safetensors slices) where that folder is on this machine (/info `model_path`), else a
warning that they were not compared. A server that is down, answers an error or serves another model stops training with
one line (`VllmServerError`: the URL, what failed, the fix); nothing falls back to transformers generation. The wire
format is `alignkit.serve.vllm_serve`'s (module docstring there). Requests are built as the colocated engine's
(`vllm_generation.generate_with`): each carries the policy's end tokens (`end_token_ids`: its folder's EOS list, the
tokenizer's, the chat template's turn end for conversations) as stop_token_ids, which the server hands to vLLM's
SamplingParams unchanged, so both modes end and cut responses at the same tokens.

The HTTP client uses the standard library only (tests/online/test_vllm_server_client.py runs it against the
server's own handler with a fake engine, and against a server that answers errors); the generator imports
torch and safetensors when it packs weights.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save

from alignkit.adapters.base import adapter_of, recorded_base, unwrap_lm
from alignkit.online.vllm_engine import check_engine_base
from alignkit.online.vllm_generation import generate_with, refuse_unsupported

logger = logging.getLogger(__name__)

API_KEY_ENV = "ALIGNKIT_VLLM_API_KEY"  # the server's --api-key, read from the environment (never a config value)
PROTOCOL = 1  # bumped when the wire format changes; the server says which it speaks in /info
SERVER_MAX_MODEL_LEN = "the vLLM server's max_model_len (alignkit vllm-serve --max-model-len)"  # named in refusals
START_HINT = "start it with: alignkit vllm-serve --model <the policy's base folder> (in vLLM's environment)"
# what the policy and the served model must agree on (transformers config keys)
MATCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


class VllmServerError(RuntimeError):
    """The vLLM server cannot be used: down, an error answer, or another model. Its text is one line;
    `answered`: the server did answer (an error status, another protocol), so waiting longer will not help."""

    def __init__(self, message: str, answered: bool = True, reason: str = "") -> None:
        super().__init__(message)
        self.answered, self.reason = answered, reason


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


class VllmServerClient:
    """HTTP calls to `alignkit vllm-serve` (stdlib only). Every failure is a one-line `VllmServerError`."""

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise VllmServerError(f"method.vllm_server_url: {url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000")
        self.url, self.timeout = url, float(timeout)

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
              timeout: float | None = None) -> dict:
        headers = {"Content-Type": content_type} if body is not None else {}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            detail = " ".join(str(detail).split())[:500] or e.reason
            raise VllmServerError(f"vLLM server {self.url}: {method} {path} failed with HTTP {e.code}: {detail}") \
                from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            raise VllmServerError(f"vLLM server {self.url}: {method} {path} failed ({_reason(e)}); is it running? "
                                  f"{START_HINT}", answered=False, reason=_reason(e)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise VllmServerError(f"vLLM server {self.url}: {method} {path} answered something that is not JSON "
                                  f"({raw[:80]!r}); is this URL an alignkit vllm-serve server?") from None

    def wait(self, timeout: float | None = None, interval: float = 1.0) -> dict:
        """Retry GET /info until it answers (the engine takes a while to start), then return it."""
        timeout = self.timeout if timeout is None else timeout
        t0 = time.monotonic()
        while True:
            try:
                return self.info()
            except VllmServerError as e:
                if e.answered:
                    raise
                if time.monotonic() - t0 >= timeout:
                    raise VllmServerError(f"vLLM server {self.url}: no answer after {timeout:g} s "
                                          f"(method.vllm_server_timeout; last: {e.reason}); {START_HINT}",
                                          answered=False) from None
            logger.info("waiting for the vLLM server at %s ...", self.url)
            time.sleep(interval)

    def health(self) -> dict:
        return self._call("GET", "/health", timeout=10)

    def info(self) -> dict:
        info = self._call("GET", "/info", timeout=10)
        if info.get("protocol") != PROTOCOL:
            raise VllmServerError(f"vLLM server {self.url}: speaks protocol {info.get('protocol')!r}, this alignkit "
                                  f"{PROTOCOL}; run alignkit vllm-serve from the same alignkit version as the trainer")
        return info

    def generate(self, prompt_token_ids: list[list[int]], requests: list[dict], lora: bool) -> dict:
        body = json.dumps({"prompt_token_ids": prompt_token_ids, "sampling": requests, "lora": lora}).encode()
        return self._call("POST", "/generate", body)

    def push_weights(self, blob: bytes) -> dict:
        return self._call("POST", "/weights", blob, "application/octet-stream")

    def push_lora(self, blob: bytes) -> dict:
        return self._call("POST", "/lora", blob, "application/octet-stream")


def check_compatible(info: dict, lm_config: Any, url: str) -> None:
    """One line when the server's model cannot be the policy's (architecture, sizes)."""
    ours = {k: getattr(lm_config, k, None) for k in MATCH_KEYS}
    ours["architectures"] = list(getattr(lm_config, "architectures", None) or [])
    theirs = info.get("config", {})
    keys = [k for k in (*MATCH_KEYS, "architectures") if ours.get(k) is not None and ours.get(k) != theirs.get(k)
            and not (k == "architectures" and not ours[k])]
    if keys:
        diff = ", ".join(f"{k} {theirs.get(k)!r} (policy {ours[k]!r})" for k in keys)
        raise VllmServerError(f"vLLM server {url}: serves {info.get('model')!r} whose {diff} differ from the "
                              f"policy's; restart it with alignkit vllm-serve --model <the policy's base folder>")


class VllmServerGenerator:
    """Samples from the current policy through `alignkit vllm-serve` (module docstring); the same interface as
    the colocated `VllmGenerator` (`sync`, `generate`, `close`, `version`, `sync_seconds`)."""

    def __init__(self, policy: Any, tokenizer: Any, url: str, timeout: float = 300.0) -> None:
        adapter = adapter_of(policy)
        refuse_unsupported(adapter, policy)
        self.kind, self.sync_mode = adapter.kind, adapter.vllm_sync
        self.tokenizer = tokenizer
        self.client = VllmServerClient(url, timeout)
        t0 = time.perf_counter()
        self.info = self.client.wait()
        check_compatible(self.info, unwrap_lm(policy).config, self.client.url)
        if self.sync_mode == "lora_request":
            r = max(int(c.r) for c in policy.peft_config.values())
            if not self.info.get("enable_lora"):
                raise VllmServerError(f"vLLM server {self.client.url}: LoRA is off there and the policy is a LoRA "
                                      "adapter; restart it with alignkit vllm-serve ... --enable-lora")
            if int(self.info.get("max_lora_rank") or 0) < r:
                raise VllmServerError(f"vLLM server {self.client.url}: max LoRA rank {self.info.get('max_lora_rank')} "
                                      f"< the policy's rank {r}; restart it with --max-lora-rank {r} (or more)")
            if int(self.info.get("weights_version") or 0) > 0:
                raise VllmServerError(f"vLLM server {self.client.url}: its base weights were replaced by "
                                      f"{self.info['weights_version']} full-weights push(es); a LoRA policy needs "
                                      "the frozen base: restart alignkit vllm-serve")
        if not adapter.saves_whole_model:  # the server runs the adapter over its own folder's weights
            self.check_base(policy)
        logger.info("vLLM server %s (%s) ready for the %s policy after %.1f s", self.client.url,
                    self.info.get("model"), self.kind, time.perf_counter() - t0)
        self.version = 0  # pushes done
        self.sync_seconds = 0.0
        self.pushed_bytes = 0

    def check_base(self, policy: Any) -> None:
        """The server's model folder (/info `model_path`) against the adapter policy's base, as the colocated
        engine's (`check_engine_base`: refused when its weights differ, a warning when they cannot be compared),
        where that folder is on this machine; elsewhere (another machine, an older server) a warning: only the
        architecture and sizes were compared."""
        path = self.info.get("model_path")
        if path and Path(path, "config.json").is_file():
            check_engine_base(policy, path, {}, key=f"vLLM server {self.client.url}", engine="serves",
                              fix="restart alignkit vllm-serve with --model set to the policy's base folder")
            return
        logger.warning("vLLM server %s: its model folder (%s) is not on this machine, so its weights were not "
                       "compared with the adapter policy's base (%s), only its architecture and sizes; make sure "
                       "alignkit vllm-serve --model is that base (vLLM samples through its weights)", self.client.url,
                       path or self.info.get("model"), (recorded_base(policy) or {}).get("name_or_path") or "unknown")

    def sync(self, policy: Any) -> None:
        """Push the policy's current weights (full: the state dict; LoRA: the adapter, served under a new id)."""
        t0 = time.perf_counter()
        blob = full_weights_blob(policy) if self.sync_mode == "weights" else lora_blob(policy)
        answer = (self.client.push_weights if self.sync_mode == "weights" else self.client.push_lora)(blob)
        self.version += 1
        self.pushed_bytes += len(blob)
        self.sync_seconds += time.perf_counter() - t0
        logger.debug("vLLM server push %d (%s, %.1f MB) in %.2f s: %s", self.version, self.kind, len(blob) / 1e6,
                     time.perf_counter() - t0, answer)

    def generate(self, prompts: Sequence[Any], cfg: Any = None, *, formatter: str = "auto",
                 max_prompt_length: int | None = None, eos_source: Any = None) -> list:
        limit = self.info.get("max_model_len")
        return generate_with(self._complete, self.tokenizer, prompts, cfg, formatter=formatter,
                             max_prompt_length=max_prompt_length, eos_source=eos_source,
                             source=f"vLLM server {self.client.url}", max_model_len=int(limit) if limit else None,
                             max_model_len_key=SERVER_MAX_MODEL_LEN)

    def _complete(self, encoded: list[list[int]], requests: list[dict]) -> list[list[list[int]]]:
        answer = self.client.generate(encoded, requests, lora=self.sync_mode == "lora_request" and self.version > 0)
        outs = answer.get("outputs")
        if not isinstance(outs, list) or len(outs) != len(encoded) or any(
                len(o) != r["n"] for o, r in zip(outs, requests)):
            raise VllmServerError(f"vLLM server {self.client.url}: POST /generate answered {len(outs or [])} "
                                  f"prompt(s) for {len(encoded)} asked (or the wrong number of samples)")
        return [[list(c["token_ids"]) for c in o] for o in outs]

    def close(self) -> None:
        """Nothing to stop: the server outlives the trainer."""


def full_weights_blob(policy: Any) -> bytes:
    """The policy's transformers state dict as safetensors bytes (tensors sharing memory, e.g. tied embeddings,
    are written as copies: safetensors refuses shared storage)."""
    seen: set[int] = set()
    tensors = {}
    with torch.no_grad():
        for name, t in unwrap_lm(policy).state_dict().items():
            t = t.detach().cpu()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t.contiguous()
            seen.add(ptr)
    return save(tensors)


def lora_blob(policy: Any) -> bytes:
    """peft's adapter (the tensors of adapter_model.safetensors) as safetensors bytes whose metadata holds
    adapter_config.json (what `save_pretrained` writes, so the server gets the same two files)."""
    with tempfile.TemporaryDirectory(prefix="alignkit-lora-push-") as d:
        policy.save_pretrained(d)
        tensors = load_file(str(Path(d) / "adapter_model.safetensors"))
        config = (Path(d) / "adapter_config.json").read_text()
    return save(tensors, metadata={"format": "pt", "adapter_config": config})


__all__ = ["API_KEY_ENV", "PROTOCOL", "SERVER_MAX_MODEL_LEN", "VllmServerClient", "VllmServerError",
           "VllmServerGenerator", "check_compatible", "full_weights_blob", "lora_blob"]
