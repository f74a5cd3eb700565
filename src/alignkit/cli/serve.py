"""`alignkit serve`: one base model and many adapters behind an OpenAI-compatible API and a chat page.

    alignkit serve --base runs/sft/model --adapter polite=runs/dpo-reft/model --adapter terse=runs/dpo-lora/model
    alignkit serve --config configs/serve.yaml port=8080

Flags and the YAML config (`alignkit.settings.serve.ServeConfig`) say the same things; a flag wins over
the file, dotted overrides (`port=8080`) over both. Binds 127.0.0.1 unless told otherwise. Needs the
`serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from alignkit.cli.helptext import add_config_arguments, keys_epilog, settable_keys
from alignkit.settings import ConfigError, load_config
from alignkit.settings.tiny import tiny_arch

logger = logging.getLogger(__name__)

FLAGS = ("base", "base_name", "engine", "host", "port", "api_key", "dtype", "device", "max_batch_rows", "max_queue",
         "max_prompt_tokens", "max_new_tokens", "default_max_tokens", "request_timeout", "output_dir", "log_every")


# flag -> what it means; its type and default come from the config class (alignkit.settings.serve.ServeConfig)
FLAG_HELP = {
    "base": "base model folder (or tiny:<arch>)", "base_name": "the base's served model name (null: its folder name)",
    "engine": "alignkit, or vllm: hand LoRA/full serving to vLLM's OpenAI server", "host": "address to bind",
    "port": "port", "api_key": "require 'Authorization: Bearer KEY' (or set ALIGNKIT_API_KEY)", "dtype": "model dtype",
    "device": "cpu, cuda, cuda:1 ... (null: cuda if available)", "max_batch_rows": "rows decoded together at most",
    "max_queue": "requests waiting at most", "max_prompt_tokens": "longest prompt accepted",
    "max_new_tokens": "most tokens a request may ask for",
    "default_max_tokens": "max_tokens of a request that sets none (null: the context left after its prompt, capped "
                          "by max_new_tokens, as vLLM; a number: at most that context left)",
    "request_timeout": "seconds a request may take",
    "output_dir": "write metrics.jsonl, tensorboard/serve/ and plots/ of the server here",
    "log_every": "seconds between two metrics rows",
}
_TYPES = {"int": int, "float": float}


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = "serve a base model + adapters (OpenAI-compatible API, chat page at /)"
    p = sub.add_parser("serve", help=text, description=f"alignkit serve: {text}. A flag wins over the config file, "
                       "key=value overrides over both.", epilog=keys_epilog("serve"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "serve")
    keys = {k: (t, d) for k, t, d in settable_keys("serve")}
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter folder served as model NAME (repeat for more; config key adapters)")
    for flag in FLAGS:
        tp, default = keys[flag]
        kwargs: dict[str, Any] = {"type": _TYPES[tp]} if tp in _TYPES else {}
        if tp.startswith("one of "):
            kwargs["choices"] = [c.strip().strip("'") for c in tp[len("one of "):].split(",")]
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar=flag.upper(), **kwargs,
                       help=f"{FLAG_HELP[flag]} ({tp}, default {default})")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> Any:
    overrides = list(args.overrides)
    for key in FLAGS:
        value = getattr(args, key, None)
        if value is not None and key != "api_key":  # --api-key is set below as given: a key is text, not YAML
            overrides.append(f"{key}={value}")
    adapters = {}
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter polite=runs/dpo-reft/model")
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = folder
    cfg = load_config(args.config, overrides, command="serve")  # an api_key=KEY override too (it was dropped)
    if args.api_key is not None:
        cfg.api_key = args.api_key
    if adapters:
        cfg.adapters = {**cfg.adapters, **adapters}
    if cfg.api_key is None and os.environ.get("ALIGNKIT_API_KEY"):
        cfg.api_key = os.environ["ALIGNKIT_API_KEY"]
    if cfg.api_key is not None and not cfg.api_key.strip():  # e.g. --api-key "$KEY" with KEY unset
        raise ConfigError("api_key: empty, so the server would take 'Authorization: Bearer ' as the key (and not warn "
                          "when it listens beyond this machine); give a real key, or drop api_key to serve without one")
    return cfg


VLLM_TINY_SIZES = {"hidden_size": 128, "num_heads": 2}  # a tiny base for engine=vllm: head size 64 (`resolve_base`)


def resolve_base(cfg: Any) -> tuple[str, str | None]:
    """(base folder, served base name) of a `ServeConfig`; `tiny:<arch>` builds a random tiny model first
    (head_dim 64 for engine=vllm: a size vLLM's CPU attention runs; the tiny default 16 is refused)."""
    base, base_name = cfg.base, cfg.base_name
    arch = tiny_arch(base, "base")
    if arch is not None:
        from alignkit.models.tiny import save_tiny

        sizes = VLLM_TINY_SIZES if cfg.engine == "vllm" else {}
        base = str(save_tiny(tempfile.mkdtemp(prefix=f"alignkit-serve-tiny-{arch}-"), arch, **sizes))
        base_name = base_name or f"tiny-{arch}"
    return base, base_name


def check_device(device: str | None) -> str:
    """The torch device `device` names (None: cuda if available, else cpu); ConfigError naming the key when torch
    cannot place a model there (a typo, no CUDA in this torch, a GPU index past the GPUs it sees)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {device!r} is not a torch device; use cpu, cuda, cuda:1 ... (or leave it unset: "
                          "cuda if available, else cpu)") from None
    if dev.type == "cuda":
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not seen or (dev.index is not None and dev.index >= seen):
            seen_text = f"{seen} CUDA GPU(s) (cuda:0 .. cuda:{seen - 1}); pick one of them" if seen else \
                "no CUDA GPU; use device cpu"
            raise ConfigError(f"device: {device!r}, but this torch sees {seen_text} (or leave device unset: cuda if "
                              "available, else cpu)")
    return device


def served_base_name(cfg: Any) -> str:
    """The name the base is served under: base_name, else `tiny-<arch>` for tiny:<arch>, else its folder's name (as
    `resolve_base` and `load_stack` name it)."""
    arch = tiny_arch(cfg.base, "base")
    return cfg.base_name or (f"tiny-{arch}" if arch is not None else Path(cfg.base).resolve().name)


def check_folders(cfg: Any) -> None:
    """Every folder the server loads holds what it needs, whole, before anything is loaded: a missing or truncated
    weights file failed inside peft or safetensors after the base was loaded, as an 'unexpected error'. The served
    names first (`stack.check_served_names`): an adapter named like the base passed --dry-run, then the start failed."""
    from alignkit.cli.models import check_adapter_files, check_model_folder, check_readable
    from alignkit.serve.stack import check_served_names

    try:
        check_served_names(served_base_name(cfg), cfg.adapters)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_model_folder(cfg.base, "base")
    if tiny_arch(cfg.base, "base") is None:
        check_readable(cfg.base, "base")
    for name, folder in cfg.adapters.items():
        key = f"adapter {name!r}"
        check_model_folder(folder, key, adapter=True)
        check_adapter_files(Path(folder), key)  # its files, whole


def bind(host: str, port: int) -> Any:
    """The listening socket of the server, bound before the model is loaded or anything is written: a port in use
    used to surface after loading, from uvicorn, with the output folder's rows and plots already written."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"port: cannot listen on {host}:{port} ({e.strerror or e}): another server holds it, or "
                          "the address is not this machine's; stop it or pick another --port / --host (nothing was "
                          "loaded or written)") from None
    sock.set_inheritable(True)
    return sock


def build_engine(cfg: Any, device: str | None = None):
    """The engine for a `ServeConfig` (not started). `device`: the one `check_device` returned, with the folders
    already checked (`check_folders`); None: both are checked here."""
    from alignkit.serve.engine import Engine, EngineConfig
    from alignkit.serve.stack import load_stack

    if cfg.engine == "vllm":
        raise ConfigError("engine: vllm runs vLLM's own server (alignkit serve --engine vllm), not this engine")
    if device is None:
        device = check_device(cfg.device)
        check_folders(cfg)
    base, base_name = resolve_base(cfg)
    try:
        stack = load_stack(base, cfg.adapters, base_name=base_name, dtype=cfg.dtype, device=device,
                           rope_scaling=cfg.rope_scaling)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Engine(stack, EngineConfig(max_batch_rows=cfg.max_batch_rows, max_queue=cfg.max_queue,
                                      max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                                      default_max_tokens=cfg.default_max_tokens,
                                      request_timeout=cfg.request_timeout))


def vllm_config_checks(cfg: Any) -> list[str]:
    """engine=vllm's checks of the base's config in the dry run (`vllm_server.config_checks`: RoPE, head size,
    LoRA on a mixture of experts), on its config.json, or a tiny base's config as `resolve_base` would build it (in
    memory: nothing written). One line per check."""
    from alignkit.serve.vllm_server import config_checks

    arch = tiny_arch(cfg.base, "base")
    if arch is None:
        return config_checks(cfg.base, lora=bool(cfg.adapters))
    from alignkit.models.tiny import tiny_config

    return config_checks(cfg.base, lora=bool(cfg.adapters), config=tiny_config(arch, 512, **VLLM_TINY_SIZES))


def dry_run(cfg: Any) -> int:
    """`alignkit serve --dry-run`: what the server checks before it loads a model, without loading one, binding the
    port or writing anything: output_dir, the base and adapter folders (`check_folders`; engine vllm: the adapters
    vLLM serves and the base's config, `vllm_config_checks`), and the base's chat template against the messages
    /v1/chat/completions passes it (`serve.template.check_chat_template`, with the base's tokenizer only). Prints the
    config (api_key hidden), what was checked as YAML comments, and a last line saying so; the first problem is one
    line naming the key."""
    from alignkit.cli.runfolder import check_output_dir, print_dry_run

    lines = []
    if cfg.output_dir is not None:
        check_output_dir(Path(cfg.output_dir))
        lines.append(f"output_dir {cfg.output_dir}: metrics, TensorBoard events and plots go there")
    check_folders(cfg)
    lines.append(f"base {cfg.base} and {len(cfg.adapters)} adapter folder(s): their files whole")
    if cfg.engine == "vllm":
        from alignkit.serve.vllm_server import check_adapters

        check_adapters(cfg.adapters)
        lines.append("adapters: each one vLLM serves (LoRA); vLLM formats chat messages itself")
        lines += vllm_config_checks(cfg)
    elif tiny_arch(cfg.base, "base") is None and Path(cfg.base).is_dir():
        from alignkit.cli.models import explaining_load
        from alignkit.models.loading import load_tokenizer
        from alignkit.serve.template import check_chat_template

        with explaining_load("base", cfg.base):  # its tokenizer only: no model loaded
            tokenizer = load_tokenizer(cfg.base)
        try:
            lines.append(check_chat_template(tokenizer, f"base {cfg.base}"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    shown = cfg if cfg.api_key is None else type(cfg)(**{**vars(cfg), "api_key": "***"})
    print_dry_run(shown, lines, f"; the device (device={cfg.device}) and port {cfg.port} are checked when the server "
                  "starts; nothing was written, no model loaded")
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)  # with engine=vllm, the keys only alignkit's engine reads are refused (ServeConfig)
    if cfg.engine == "vllm" and not args.dry_run:
        from alignkit.serve.vllm_server import check_adapters, require_vllm, serve_with_vllm

        check_adapters(cfg.adapters)  # a ReFT adapter is refused before anything is built
        require_vllm()
        base, base_name = resolve_base(cfg)
        return serve_with_vllm(cfg, base, base_name or Path(base).resolve().name, quiet=args.quiet)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("alignkit serve needs fastapi and uvicorn: pip install 'alignkit[serve]'") from None
    if args.dry_run:
        return dry_run(cfg)
    from alignkit.cli.runfolder import check_output_dir
    from alignkit.serve.api import serve_forever

    if cfg.output_dir is not None:  # a file there failed after the model was loaded (FileExistsError)
        check_output_dir(Path(cfg.output_dir))
    elif cfg.log_every != type(cfg).log_every:
        logger.warning("log_every=%g is read only with output_dir (the metrics rows it spaces are written there); "
                       "without output_dir nothing is written: set output_dir or drop log_every", cfg.log_every)
    device = check_device(cfg.device)
    check_folders(cfg)
    sock = bind(cfg.host, cfg.port)
    try:
        engine = build_engine(cfg, device)
        if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
            logger.warning("serving on %s without --api-key: anyone who can reach this address can use the models",
                           cfg.host)
        port = sock.getsockname()[1]  # port 0: the free one the system gave
        print(f"alignkit serve: {', '.join(engine.stack.names)} on http://{cfg.host}:{port}/ (chat page at /)")
        serve_forever(engine, cfg.host, port, cfg.api_key, log_level="warning" if args.quiet else "info",
                      output_dir=cfg.output_dir, log_every=cfg.log_every, sock=sock)
    finally:
        sock.close()
    return 0


__all__ = ["add_parser", "bind", "build_engine", "check_device", "check_folders", "resolve_base", "config_from", "run",
           "served_base_name"]
