"""`alignkit vllm-serve`: a vLLM engine that an online trainer samples from and pushes its weights to
(`method.generation_backend=vllm method.vllm_mode=server`; `alignkit.serve.vllm_serve` has the API).

    alignkit vllm-serve --model runs/sft/model --port 8000                      # full finetuning
    alignkit vllm-serve --model runs/sft/model --enable-lora --max-lora-rank 16 # LoRA policies

Needs vLLM in this Python (`make vllm-env` builds .venv-vllm with the CPU build). `--help` imports no torch.
"""

from __future__ import annotations

import argparse

HELP = "a vLLM engine that online training samples from and pushes weights to (method.vllm_mode=server)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vllm-serve", help=HELP, description=f"alignkit vllm-serve: {HELP}. The trainer side: "
                       "method.generation_backend=vllm method.vllm_mode=server method.vllm_server_url=http://HOST:PORT")
    p.add_argument("--model", required=True, help="the model folder vLLM loads: the policy's base (LoRA) or its "
                   "initial weights (full finetuning); the trainer checks that its policy matches")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; whoever reaches the port "
                   "can replace the weights)")
    p.add_argument("--api-key", dest="api_key", help="require 'Authorization: Bearer KEY' on every route but "
                   "/health (or set ALIGNKIT_VLLM_API_KEY; the trainer sends ALIGNKIT_VLLM_API_KEY from its "
                   "environment)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--dtype", default="auto", help="vLLM's dtype (default auto: the model's; float32 for exact "
                   "greedy parity with a float32 trainer)")
    p.add_argument("--max-model-len", dest="max_model_len", type=int, help="prompt + response tokens (default: "
                   "the model's context)")
    p.add_argument("--enable-lora", dest="enable_lora", action="store_true", help="serve the LoRA adapters the "
                   "trainer pushes (LoRA policies)")
    p.add_argument("--max-lora-rank", dest="max_lora_rank", type=int, default=16,
                   help="largest LoRA rank accepted: 8, 16, 32, 64, 128, 256, 320 or 512 (default 16)")
    p.add_argument("--workdir", help="where the pushed LoRA adapters are written (default: a temporary folder removed "
                   "at exit); one server at a time (a lock file); what a killed server left half-written there is "
                   "removed at the next start")
    p.add_argument("--seed", type=int, default=0, help="the engine's seed (requests carry their own)")
    p.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float,
                   help="vLLM's share of GPU memory (GPU builds)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignkit.models.vllm_support import vllm_installed
    from alignkit.serve.vllm_serve import EngineSettings, serve
    from alignkit.settings import ConfigError

    settings = EngineSettings(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                              enable_lora=args.enable_lora, max_lora_rank=args.max_lora_rank, seed=args.seed,
                              gpu_memory_utilization=args.gpu_memory_utilization)  # the flags checked (one line)
    if not vllm_installed():
        raise ConfigError("vllm-serve needs vLLM installed in this Python (make vllm-env builds .venv-vllm with the "
                          "CPU build: .venv-vllm/bin/alignkit vllm-serve ...; on a GPU: pip install vllm)")
    return serve(settings, args.host, args.port, api_key=args.api_key, workdir=args.workdir,
                 ready=lambda url: print(f"alignkit vllm-serve: ready on {url} (model {args.model})", flush=True))
