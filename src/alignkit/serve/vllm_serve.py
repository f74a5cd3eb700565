"""`alignkit vllm-serve`: a vLLM engine in its own process that an online trainer samples from and pushes its
weights to (`method.generation_backend: vllm`, `method.vllm_mode: server`; the client is
`alignkit.online.vllm_client`). Not `alignkit serve --engine vllm`, which serves finished models to users.

    alignkit vllm-serve --model runs/sft/model --port 8000 --enable-lora --max-lora-rank 16

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, created in the command's main function, so
`python -m alignkit vllm-serve` is safe to spawn), behind the standard library's HTTP server: one request at a
time, in order (one trainer per server). The API (protocol 1; errors are HTTP 4xx/5xx with {"error": one line}):

    GET  /health    {"status": "ok"}
    GET  /info      {"protocol", "alignkit", "model", "model_path" (the --model folder, absolute: a trainer on
                     this machine compares its weights with a LoRA policy's base), "config": {model_type, architectures,
                     vocab_size, hidden_size, num_hidden_layers, num_attention_heads}, "dtype", "max_model_len",
                     "enable_lora", "max_lora_rank", "weights_version", "lora_version"}
    POST /generate  {"prompt_token_ids": [[int]], "sampling": [one dict per prompt: n, max_tokens, temperature,
                     top_p, top_k, seed, stop_token_ids, stop], "lora": bool (use the last pushed adapter)};
                    any other key, or a lora that is not a JSON boolean: 400 naming it
                    -> {"outputs": [[{"token_ids": [int], "finish_reason": str}]], "weights_version", "lora_version"}
    POST /weights   body: a safetensors blob of the full transformers state dict -> loaded in place with vLLM's
                    `reload_weights` (as the colocated engine does), prefix cache reset -> {"weights_version", ...}
    POST /lora      body: a safetensors blob of peft's adapter tensors, metadata "adapter_config" = peft's
                    adapter_config.json -> checked from the request's bytes, then saved as a folder (whole or not at
                    all), served under a NEW LoRA id -> {"lora_version", ...}; 400, nothing written, when a tensor
                    fits no module of the served model, or not its rank or width (`check_lora_shapes`: vLLM would
                    skip a module the model lacks, silently)

Weights travel in the request body (no shared file system, no NCCL needed), so the trainer may run on another
machine; the whole state dict is one request (its size in memory on both sides). Anyone who can reach the port
can replace the model: the default host is 127.0.0.1, and `--api-key` (or ALIGNKIT_VLLM_API_KEY in the server's
environment) makes every route but /health need `Authorization: Bearer <key>` (the trainer sends
ALIGNKIT_VLLM_API_KEY from its own environment; the key is never a config value). Plain HTTP: on an untrusted
network put it behind TLS (a proxy) or an SSH tunnel.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import logging
import os
import re
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import IO, Any, Callable

from safetensors.torch import load

import alignkit
from alignkit.adapters.lora import WEIGHTS_NAME, check_lora_shapes
from alignkit.files import atomic_write, parse_json_object
from alignkit.models.vllm_support import (check_head_size, check_moe_lora, check_rope_type, engine_limit,
                                          folder_config, lora_unsupported, meta_causal_lm, start_max_model_len)
from alignkit.online.vllm_client import API_KEY_ENV, MATCH_KEYS, PROTOCOL
from alignkit.online.vllm_engine import LORA_RANKS  # the ranks vLLM's --max-lora-rank accepts
from alignkit.online.vllm_generation import sampling_params, shutdown_engine
from alignkit.settings import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".alignkit-vllm-serve.lock"  # in the workdir: the pid of the server using it, flock'd while it runs
STAGING = re.compile(r"\.lora-\d+\..+\.tmp")  # write_lora's staging folders: mkdtemp(prefix=".lora-N.", suffix=".tmp")

class RequestError(Exception):
    """A request the server refuses: HTTP `status`, one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # vLLM's ModelDType (any case), row V22


@dataclass
class EngineSettings:
    """vllm-serve's engine flags, checked when made (`check`: one line naming the flag, before anything starts)."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    seed: int = 0
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ConfigError for a flag vLLM would refuse only as its engine starts (an "unexpected error" there, after the
        workdir was taken): --max-lora-rank (with --enable-lora), --dtype, --max-model-len, --gpu-memory-utilization."""
        if self.enable_lora and self.max_lora_rank not in LORA_RANKS:
            raise ConfigError(f"vllm-serve --max-lora-rank {self.max_lora_rank}: vLLM accepts "
                              f"{', '.join(map(str, LORA_RANKS))}; give one of them, at least the policy's LoRA rank")
        if str(self.dtype).lower() not in VLLM_DTYPES:
            raise ConfigError(f"vllm-serve --dtype {self.dtype}: vLLM accepts {', '.join(VLLM_DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"vllm-serve --max-model-len {self.max_model_len}: give a number of tokens (prompt + "
                              "response) of 1 or more, or leave it out for the model's context")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm-serve --gpu-memory-utilization {self.gpu_memory_utilization}: give a share of "
                              "GPU memory above 0 and at most 1 (e.g. 0.9)")


def safetensors_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors blob (its 8-byte little-endian header length, then the header: each tensor's
    dtype, shape and data_offsets, and `__metadata__`), read in memory; RequestError 400 for a body that is not a
    whole safetensors blob (too short, a header that is not a JSON object, tensors past the body's end)."""
    if len(blob) < 8:
        raise RequestError(400, "the body is not a safetensors blob (fewer than 8 bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError:
        raise RequestError(400, "the body is not a safetensors blob (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise RequestError(400, "the body is not a safetensors blob (its header is not a JSON object)")
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise RequestError(400, "the body is not a safetensors blob (a tensor's header has no data_offsets)") from None
    if end > len(blob) - 8 - n:
        raise RequestError(400, f"the body is not a whole safetensors blob: its header places tensors up to byte {end} "
                                f"of the data and the body holds {len(blob) - 8 - n}; push it again")
    return header


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (`safetensors_header`)."""
    return safetensors_header(blob).get("__metadata__") or {}


def safetensors_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape (name -> shape) in a safetensors header (`safetensors_header`)."""
    return {k: tuple(int(d) for d in v.get("shape", ())) for k, v in header.items() if k != "__metadata__"}


GENERATE_KEYS = ("prompt_token_ids", "sampling", "lora")  # a /generate body's keys (protocol 1)


def generate_body(body: dict) -> dict:
    """`body` when it is a /generate body: RequestError 400 naming a key the protocol does not have (it would be
    ignored: a trainer of another alignkit version asking for something this server does not do) or a `lora`
    that is not a JSON boolean (the string "false" used to count as true)."""
    unknown = sorted(set(body) - set(GENERATE_KEYS))
    if unknown:
        raise RequestError(400, f"/generate: unknown key(s) {', '.join(map(repr, unknown))}; protocol {PROTOCOL} "
                                f"reads {', '.join(GENERATE_KEYS)} (is the trainer's alignkit this server's version?)")
    if not isinstance(body.get("lora", False), bool):
        raise RequestError(400, f"/generate: lora is {body['lora']!r}; it must be a JSON boolean (true / false)")
    return body


def claim_workdir(workdir: str | Path) -> IO[str]:
    """Take `workdir` for this server and return the open lock (close it to let go): an exclusive flock on its
    LOCK_NAME, which the kernel drops when the process ends however it ends (a SIGKILL leaves no stale lock; the file,
    holding the pid, stays), then remove the staging folders a killed server left there (write_lora's
    `.lora-N.<random>.tmp`, half-written, never served; nothing else is touched: a finished `lora-N` folder is another
    run's) with one log line naming them. ConfigError (one line, before the engine starts) when a live server holds
    the lock: its staging folder may be mid-write, and two servers on one workdir would remove each other's files."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the server runs
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(f"vllm-serve workdir {workdir}: another alignkit vllm-serve (pid {pid}) is using it (it "
                          f"holds {LOCK_NAME}); stop that server or give this one another --workdir") from None
    lock.seek(0)
    previous = lock.read().strip() or "unknown"
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # ("a+": written at the end, which is now the start)
    lock.flush()
    stale = sorted(p.name for p in workdir.iterdir() if STAGING.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    for name in stale:
        shutil.rmtree(workdir / name)
    if stale:
        logger.warning("vllm-serve workdir %s: removed %d half-written LoRA staging folder(s) that a stopped server "
                       "(pid %s) left: %s", workdir, len(stale), previous, ", ".join(stale))
    return lock


class VllmServeEngine:
    """The engine and what was pushed to it (weights / LoRA versions). HTTP-free: the handler calls it."""

    def __init__(self, settings: EngineSettings, workdir: str | Path | None = None) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        folder = Path(settings.model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--model {settings.model}: no config.json there; give a transformers model folder "
                                    "(the policy's base, e.g. runs/sft/model)")
        settings.check()  # (fields set after it was made)
        hf = folder_config(folder, where="vllm-serve --model")
        check_head_size(hf, folder, "vllm-serve --model", "give --model a model whose head size vLLM takes (the "
                        "policy's base), or train with method.generation_backend=transformers")
        check_rope_type(hf, folder, "vllm-serve --model", "train with method.generation_backend=transformers")
        if settings.enable_lora:  # (row V20)
            check_moe_lora(hf, folder, "vllm-serve --enable-lora", "serve it without --enable-lora (a fully "
                           "finetuned policy), or train the LoRA policy with method.generation_backend=transformers")
        from vllm import LLM  # (after the checks: they need no engine)

        self.hf_config = hf  # for the served model's skeleton a pushed LoRA is checked against (`lora_fits`)
        self.skeleton: Any = None
        self.config = {k: getattr(hf, k, None) for k in MATCH_KEYS}
        self.config["architectures"] = list(getattr(hf, "architectures", None) or [])
        self.settings = settings
        kw: dict[str, Any] = dict(model=str(folder), dtype=settings.dtype, seed=settings.seed,
                                  enforce_eager=settings.enforce_eager)
        if settings.max_model_len is not None:  # refused / warned above a RoPE-scaled model's context (row V16)
            engine_limit(folder, {"max_model_len": settings.max_model_len}, key="vllm-serve --max-model-len")
            kw["max_model_len"] = settings.max_model_len
        elif (capped := start_max_model_len(folder, {})) is not None:  # vLLM's own is longer than that context
            kw["max_model_len"] = capped
        if settings.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.enable_lora:
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=settings.max_lora_rank)
        # the workdir is made and claimed after every check above (a refusal leaves no folder, no lock behind) and
        # before the engine's start (a second server on it is refused quickly)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="alignkit-vllm-serve-"))
        try:
            self._lock: IO[str] | None = claim_workdir(self.workdir)
        except BaseException:
            self.close()
            raise
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kw)
        except BaseException:
            self.close()
            raise
        logger.info("vLLM engine for %s started in %.1f s", folder, time.perf_counter() - t0)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).replace("torch.", "")
        self.weights_version = 0
        self.lora_version = 0
        self.lora_request: Any = None

    def info(self) -> dict:
        s = self.settings
        return {"protocol": PROTOCOL, "alignkit": alignkit.__version__, "model": s.model,
                "model_path": str(Path(s.model).resolve()), "config": self.config,
                "dtype": self.dtype, "max_model_len": self.max_model_len, "enable_lora": s.enable_lora,
                "max_lora_rank": s.max_lora_rank if s.enable_lora else 0, "weights_version": self.weights_version,
                "lora_version": self.lora_version}

    def versions(self) -> dict:
        return {"weights_version": self.weights_version, "lora_version": self.lora_version}

    def generate(self, body: dict) -> dict:
        ids, sampling, use_lora = body.get("prompt_token_ids"), body.get("sampling"), body.get("lora", False) is True
        if not isinstance(ids, list) or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
                                                for p in ids):
            raise RequestError(400, "prompt_token_ids: a list of non-empty lists of token ids is needed")
        if (not isinstance(sampling, list) or len(sampling) != len(ids)
                or not all(isinstance(r, dict) for r in sampling)):
            raise RequestError(400, f"sampling: one dict per prompt is needed ({len(ids)} prompt(s))")
        vocab = self.config.get("vocab_size")
        if vocab and any(t < 0 or t >= vocab for p in ids for t in p):
            raise RequestError(400, f"prompt_token_ids: a token id is outside the served vocabulary (0..{vocab - 1}); "
                                    "the trainer's tokenizer is not this model's")
        if use_lora and self.lora_request is None:
            raise RequestError(409, "lora: no LoRA adapter was pushed yet (POST /lora first)")
        try:
            params = [sampling_params(r) for r in sampling]
        except (ValueError, TypeError) as e:
            raise RequestError(400, f"sampling: {' '.join(str(e).split())}") from None
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False,
                                 lora_request=self.lora_request if use_lora else None)
        return {"outputs": [[{"token_ids": list(c.token_ids), "finish_reason": c.finish_reason} for c in o.outputs]
                            for o in outs], **self.versions()}

    def load_weights(self, blob: bytes) -> dict:
        t0 = time.perf_counter()
        safetensors_metadata(blob)  # a clear error for a body that is not safetensors
        try:
            weights = list(load(blob).items())
        except Exception as e:  # noqa: BLE001 - safetensors' own error types vary by version
            raise RequestError(400, "the body is not a readable safetensors blob: "
                                    f"{' '.join(str(e).split())}") from None
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._reset_prefix_cache()
        self.weights_version += 1
        logger.info("weights %d loaded (%d tensors, %.1f MB) in %.2f s", self.weights_version, len(weights),
                    len(blob) / 1e6, time.perf_counter() - t0)
        return {**self.versions(), "tensors": len(weights)}

    def load_lora(self, blob: bytes) -> dict:
        if not self.settings.enable_lora:
            raise RequestError(409, "LoRA is off on this server; restart it with alignkit vllm-serve ... --enable-lora")
        header = safetensors_header(blob)
        meta = header.get("__metadata__") or {}
        if "adapter_config" not in meta:
            raise RequestError(400, "the safetensors metadata has no adapter_config (peft's adapter_config.json)")
        try:
            peft_cfg = parse_json_object(meta["adapter_config"], "adapter_config", "push the adapter again (the "
                                         "trainer sends peft's adapter_config.json)", "the safetensors metadata")
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        why = lora_unsupported(peft_cfg)
        if why:
            raise RequestError(400, f"the adapter {why}, which vLLM's LoRA does not run; train a plain LoRA or use "
                                    "generation_backend=transformers")
        r = int(peft_cfg.get("r", 0))
        if r > self.settings.max_lora_rank:
            raise RequestError(400, f"the adapter's rank {r} > this server's --max-lora-rank "
                                    f"{self.settings.max_lora_rank}; restart it with a larger --max-lora-rank")
        self.lora_fits(peft_cfg, safetensors_shapes(header))  # before anything is written
        version = self.lora_version + 1
        peft_cfg["base_model_name_or_path"] = self.settings.model
        folder = self.write_lora(f"lora-{version}", peft_cfg, blob)
        from vllm.lora.request import LoRARequest  # (after the checks: they need no engine)

        old = self.lora_request
        self.lora_request = LoRARequest(f"policy-{version}", version, str(folder))  # a NEW id: vLLM loads it
        self.lora_version = version
        if old is not None:
            try:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            except Exception:  # noqa: BLE001 - it may not have been loaded yet
                pass
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return self.versions()

    def write_lora(self, name: str, peft_cfg: dict, blob: bytes) -> Path:
        """The checked LoRA written as a folder `name` in the workdir, whole or not at all: its two files written
        (`atomic_write`: fsync'd) into a hidden staging folder renamed into place at the end; a folder of that name
        already there (another run's, in a --workdir given again) is left as it is, and this one keeps a unique name
        (`<name>.<random>`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.workdir))
        try:
            atomic_write(staging / "adapter_config.json", (json.dumps(peft_cfg, indent=2) + "\n").encode())
            atomic_write(staging / WEIGHTS_NAME, blob)
            folder = self.workdir / name
            try:
                os.rename(staging, folder)  # refused for a non-empty folder there: never replaced
            except OSError:
                folder = self.workdir / staging.name[1:-len(".tmp")]
                os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def lora_fits(self, peft_cfg: dict, shapes: dict[str, tuple[int, ...]]) -> None:
        """RequestError 400 (one line naming a tensor), nothing written, when the pushed LoRA (its adapter_config
        `peft_cfg` and tensor shapes, read from the request's bytes) does not fit the served model
        (`check_lora_shapes` against its skeleton on the meta device): vLLM's loader checks a LoRA module's last name
        part only ("q_proj") and skips one the model lacks without a word (vllm/lora/lora_model.py,
        model_manager.py), so a LoRA of a deeper base would run in part, silently."""
        if self.skeleton is None:
            try:
                self.skeleton = meta_causal_lm(self.hf_config)
            except (ValueError, KeyError) as e:  # an architecture transformers builds no causal LM for
                logger.warning("vllm-serve: the pushed LoRA's modules were not compared with %s's (%s); make sure "
                               "the policy was trained on it", self.settings.model, e)
                self.skeleton = False
        if self.skeleton is False:
            return
        try:
            check_lora_shapes(self.skeleton, "POST /lora", peft_cfg, shapes, self.settings.model)
        except ValueError as e:
            raise RequestError(400, "the pushed LoRA was not served (nothing was written; the policy's base must be "
                                    f"this server's --model): {e}") from None

    def _reset_prefix_cache(self) -> None:
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()  # cached prompt KV was computed with the old weights

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown_engine(llm)
        if getattr(self, "_own_workdir", False):
            shutil.rmtree(self.workdir, ignore_errors=True)
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()  # the flock goes with it; the file stays (unlinking it would race a server opening it)


def make_handler(engine: Any, api_key: str | None = None) -> type[BaseHTTPRequestHandler]:
    """The request handler class for `engine` (anything with info / generate / load_weights / load_lora).
    With `api_key`, every route but /health needs `Authorization: Bearer <api_key>`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = f"alignkit-vllm-serve/{alignkit.__version__}"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # the library logs, it does not print
            logger.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            n = self.headers.get("Content-Length")
            if n is None:
                raise RequestError(411, "a Content-Length header is needed")
            return self.rfile.read(int(n))

        def _route(self, routes: dict[str, Callable[[], dict]]) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if api_key and path != "/health" and not hmac.compare_digest(
                        self.headers.get("Authorization", ""), f"Bearer {api_key}"):
                    if self.command == "POST":
                        self._body()  # read it, so the answer reaches the client
                    raise RequestError(401, f"missing or wrong API key: set {API_KEY_ENV} for the trainer to "
                                            "this server's --api-key")
                if path not in routes:
                    raise RequestError(404, f"no {self.command} {path}; this server answers "
                                            f"{', '.join(sorted(routes))} ({self.command})")
                self._send(200, routes[path]())
            except RequestError as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - the engine failed: one line back, the traceback in the log
                logger.exception("%s %s failed", self.command, path)
                self._send(500, {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._route({"/health": lambda: {"status": "ok"}, "/info": engine.info})

        def do_POST(self) -> None:  # noqa: N802
            def json_body() -> dict:
                try:
                    body = json.loads(self._body() or b"{}")
                except ValueError:
                    raise RequestError(400, "the body is not JSON") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the body must be a JSON object")
                return body

            self._route({"/generate": lambda: engine.generate(generate_body(json_body())),
                         "/weights": lambda: engine.load_weights(self._body()),
                         "/lora": lambda: engine.load_lora(self._body())})

    return Handler


def serve(settings: EngineSettings, host: str = "127.0.0.1", port: int = 8000,
          ready: Callable[[str], None] | None = None, api_key: str | None = None,
          workdir: str | Path | None = None) -> int:
    """Start the engine, then answer requests until interrupted (Ctrl-C or SIGTERM); returns 0. `api_key`
    (default: the ALIGNKIT_VLLM_API_KEY environment variable): required of every request but /health. `workdir`:
    where pushed LoRA folders go (`claim_workdir`; default a temporary folder removed at exit)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not 0 <= port <= 65535:
        raise ConfigError(f"vllm-serve --port {port}: give a port from 0 (a free one) to 65535")
    engine = VllmServeEngine(settings, workdir)
    try:  # a port taken (or refused): the engine's lock and temporary workdir go now, not at the process's exit
        httpd = HTTPServer((host, port), make_handler(engine, api_key))
    except BaseException as e:
        engine.close()
        if isinstance(e, OSError):
            raise ConfigError(f"vllm-serve --host {host} --port {port}: cannot listen there ({e.strerror or e}); give "
                              "another --port (0: a free one) or stop what uses it") from None
        raise
    url = f"http://{host}:{httpd.server_address[1]}"
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("vllm-serve binds %s without an API key: anyone who reaches it can replace the model's "
                       "weights (set %s or --api-key)", host, API_KEY_ENV)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        logger.info("vllm-serve: %s on %s", settings.model, url)
        if ready is not None:
            ready(url)
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.info("vllm-serve: stopping")
        httpd.server_close()
        engine.close()
        logger.info("vllm-serve: stopped")
    return 0


__all__ = ["EngineSettings", "GENERATE_KEYS", "LOCK_NAME", "LORA_RANKS", "RequestError", "STAGING", "VLLM_DTYPES",
           "VllmServeEngine",
           "claim_workdir", "make_handler", "generate_body", "safetensors_header", "safetensors_metadata",
           "safetensors_shapes", "serve"]
