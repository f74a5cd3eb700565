"""A command's model and tokenizer: `model.path` resolved (a folder, a hub id, or `tiny:<arch>`: a random tiny model
and tokenizer built by `alignkit.models.tiny`, saved to `<output_dir>/base_model/` and loaded back with
`from_pretrained`, so example configs run anywhere without downloads), checked, loaded (with its configured adapter)
and moved to the device; load errors explained in one line."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from alignkit.adapters import adapter_in, apply_adapter, check_base, load_adapter
from alignkit.adapters.config import ADAPTER_CONFIG_NAME
from alignkit.data.chat import check_prompt_formats, prompt_formats
from alignkit.models.efficiency import apply_kernels, check_model_kernels
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.models.tiny import save_tiny
from alignkit.online.generation import check_sampler, check_stop_strings, lean_reason, note_generation_config
from alignkit.run_commit import COMPLETE_MARKER, incomplete_reason
from alignkit.runs import RunFolder
from alignkit.settings import ConfigError, ModelSettings
from alignkit.settings.tiny import is_tiny, tiny_arch

logger = logging.getLogger(__name__)

TINY_TMP_PREFIX = "alignkit-tiny-"
# folders this process created itself (mkdtemp): the only ones alignkit ever removes. A user's folder that
# happens to share the prefix is never touched (issue 12, finding 3).
_CREATED: set[str] = set()


def trained_folder(ms: ModelSettings) -> str | None:
    """The folder a model section's training left its records in (the adapter's, else the model's)."""
    return ms.adapter_path or (ms.path if _looks_local(ms.path) else None)


def check_formats(ms: ModelSettings, prompts: Any, formatter: str) -> dict[str, int]:
    """Warn when `prompts` will be formatted in a way the model of `ms` was not trained on (data/chat.py). Returns
    the prompts' formats (resolved formatter -> count): what a training run records in its model folder."""
    formats = prompt_formats(prompts, formatter)
    check_prompt_formats(trained_folder(ms), formats)
    return formats


def apply_configured_adapter(model: Any, adapter: Any) -> Any:
    """`alignkit.adapters.apply_adapter` for a command: what it refuses (a ReFT layer past the model's depth, a
    bad position spec, LoRA target modules the model lacks, ...) is a config error, so one line naming the
    `adapter` section instead of "unexpected error"; `--debug` still shows the traceback."""
    try:
        return apply_adapter(model, adapter)
    except (ValueError, TypeError, KeyError) as e:
        text = " ".join(str(e).split()).strip("'\"") or type(e).__name__
        raise ConfigError(f"adapter: {text}; fix the adapter section of the config (kind "
                          f"{getattr(adapter, 'kind', '?')!r})") from e




def resolve_model_path(ms: ModelSettings, run: RunFolder | None, task: str) -> tuple[str, str]:
    """(folder or id to load, description for the model card). Builds `tiny:<arch>` models: into
    `<run>/base_model` (main process of a run folder), else into a temporary folder of this process's own
    (`adopt_tiny` moves it into the run folder once that exists)."""
    arch = tiny_arch(ms.path, "model.path")
    if arch is None:
        return ms.path, ms.path
    # every process builds the same seeded model; only the main one writes into the run folder
    if run is not None and run.main:
        folder = run.root / "base_model"
    else:
        folder = Path(tempfile.mkdtemp(prefix=TINY_TMP_PREFIX))
        _CREATED.add(str(folder))
    save_tiny(folder, arch, classifier=task == "classifier", num_labels=1)
    desc = f"{ms.path} (a random tiny {arch} built by alignkit.models.tiny, saved in base_model/)"
    return str(folder), desc


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name"): absolute, relative with ./ ../ ~, or 2+ separators."""
    return (Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path
            or Path(path).exists())


def check_model_folder(path: str, key: str, adapter: bool = False) -> None:
    """A clear error for a model / adapter path that cannot be what the key says (before anything is loaded)."""
    if is_tiny(path) or not _looks_local(path):
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"{key}: {path} does not exist; point it at a folder written by save_pretrained "
                          + ("or a training run's model/ folder" if adapter else "(config.json + weights)"))
    if not folder.is_dir():
        raise ConfigError(f"{key}: {path} is a file; point it at the folder that holds it")
    if adapter:
        known = (ADAPTER_CONFIG_NAME, "adapter_config.json", "reft_config.json", "config.json")
        if not any((folder / n).is_file() for n in known):
            raise ConfigError(f"{key}: {path} holds no adapter or model ({', '.join(known)} missing); point it at a "
                              "training run's model/ folder")
        return
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json, so it is not a saved model folder; point it at the "
                          "folder save_pretrained wrote (or a run's base_model/ or model/)")


CLASSIFIER_SUFFIX = "ForSequenceClassification"  # transformers' class names of a model with a score head


def check_head(path: str | None, task: str, key: str, fix: str) -> None:
    """ConfigError when the saved model at `path` (its config.json `architectures`) lacks the head `task` scores
    with: a causal LM loaded as a classifier gets a newly initialised, random score head (transformers reports
    it and loads on), and a sequence classifier loaded as a causal LM a random LM head, so every score is chance.
    `fix`: what to give instead. Tiny models, hub ids and folders without `architectures` are not checked."""
    if path is None or is_tiny(path) or not (Path(path).expanduser() / "config.json").is_file():
        return
    try:
        archs = json.loads((Path(path).expanduser() / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return
    classifier = any(a.endswith(CLASSIFIER_SUFFIX) for a in archs)
    if not archs or classifier == (task == "classifier"):
        return
    has, needs = (("a sequence classifier", "an LM head") if classifier
                  else ("not a sequence classifier", "a trained score head"))
    raise ConfigError(f"{key}: {path} is {has} (config.json architectures: {', '.join(archs)}), and scoring here "
                      f"needs {needs}: it would be newly initialised at random and every score chance; {fix}; "
                      "nothing was written")


def head_folder(path: str, adapter_path: str | None, section: str = "model", task: str | None = None,
                fix: str = "") -> tuple[str, str] | None:
    """(key, folder) of the saved model whose head scores after `load_for_inference`: `adapter_path` when it holds
    a whole model, `path` without an adapter; None for an adapter on `path` (it brings its own head). Given the
    `task` that will score ("classifier" or "causal_lm"), an adapter saved for the other one is a ConfigError (one
    line, `fix` what to give instead): a causal-LM LoRA / ReFT used as a reward model scored with a new random head,
    a reward model's adapter used as a policy with its LM head untrained (`Adapter.trained_task`)."""
    if adapter_path is None:
        return f"{section}.path", path
    key = f"{section}.adapter_path"
    check_model_folder(adapter_path, key, adapter=True)
    check_adapter_files(Path(adapter_path), key)
    adapter = adapter_in(Path(adapter_path))
    if adapter.saves_whole_model:
        return key, adapter_path
    trained = adapter.trained_task(Path(adapter_path))
    if task is not None and trained is not None and trained[0] != task:
        was, needs = (("a reward model (sequence classifier)", "an LM head") if trained[0] == "classifier"
                      else ("a causal LM (sft / dpo / ...)", "a trained score head"))
        raise ConfigError(f"{key}: {adapter_path} holds a {adapter.kind} adapter trained as {was} ({trained[1]}), "
                          f"and scoring here needs {needs}: it would be newly initialised at random and every score "
                          f"chance; {fix}; nothing was written")
    return None


def damaged_safetensors(folder: str | Path) -> tuple[Path, str] | None:
    """The first `*.safetensors` file under `folder` that cannot be read whole (truncated, bad header), and why."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    h.get_slice(name)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
            return f, str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def describe_load_error(key: str, path: str | Path, e: BaseException) -> str:
    """One line for a model / adapter that failed to load: which file, what is wrong with it, what to do."""
    text = str(e)
    bad = damaged_safetensors(path)
    if bad is not None:
        return (f"{key}: {bad[0]} cannot be read ({bad[1]}): the file is truncated or damaged; save the model "
                "again (or copy it again from where it came from)")
    if "size mismatch" in text:
        first = next((line.strip() for line in text.splitlines() if "size mismatch" in line), text.splitlines()[0])
        return (f"{key}: {path} was trained on a model of another size than the base model ({first[:320]}); use the "
                "base model it was trained from (its README.md names it)")
    if isinstance(e, UnicodeDecodeError):
        return f"{key}: {path}: a file is not UTF-8 text ({e.reason} at byte {e.start}); it is damaged or not JSON"
    first = text.splitlines()[0] if text else ""
    return f"{key}: cannot load {path}: {type(e).__name__}: {first[:300]}"


class explaining_load:
    """`with explaining_load("model.path", path): load(...)`: any failure becomes one ConfigError line."""

    def __init__(self, key: str, path: str | Path) -> None:
        self.key, self.path = key, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, ConfigError):
            return False
        raise ConfigError(describe_load_error(self.key, self.path, exc)) from exc


def check_adapter_files(folder: Path, key: str) -> None:
    """The weights an adapter folder's config promises are there (and complete, when it carries a marker)."""
    if (folder / COMPLETE_MARKER).is_file():
        reason = incomplete_reason(folder)
        if reason is not None:
            raise ConfigError(f"{key}: {reason}; the save did not finish: use a complete model/ folder")
    with explaining_load(key, folder):
        adapter = adapter_in(folder)
    try:
        adapter.require_files(folder)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    check_readable(folder, key)


def check_readable(folder: str | Path, key: str) -> None:
    """ConfigError naming the first `*.safetensors` file of `folder` that cannot be read whole (truncated, bad
    header), before any model is loaded."""
    bad = damaged_safetensors(folder)
    if bad is not None:
        raise ConfigError(f"{key}: {bad[0]} cannot be read ({bad[1]}): the file is truncated or damaged; save it "
                          "again (or copy it again from where it came from)")


def load_tokenizer_for(ms: ModelSettings, path: str):
    return load_tokenizer(ms.tokenizer or path, trust_remote_code=ms.trust_remote_code)


def adopt_tiny(path: str, dest: Path, main: bool = True) -> str:
    """A tiny model built in this process's temporary folder: moved to `dest` (main process, when `dest` does not
    exist yet: a resumed run keeps its own), else removed. Any other path is returned unchanged, never touched."""
    if path not in _CREATED:
        return path
    _CREATED.discard(path)
    if main and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, dest)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return str(dest)


def rename_base(model: Any, old: str, new: str) -> None:
    """After `adopt_tiny` moved the base model: the loaded model's configs (and peft's) name the new folder."""
    if old == new:
        return
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "name_or_path", None) == old:
            cfg.name_or_path = new
        for pc in (getattr(m, "peft_config", None) or {}).values():
            if getattr(pc, "base_model_name_or_path", None) == old:
                pc.base_model_name_or_path = new


def check_vocab(model: Any, tok: Any, key: str, where: str) -> None:
    """ConfigError naming `key` when the tokenizer (loaded from `where`) holds more tokens than `model` has embedding
    rows: a token id past the table has no row, and the forward stopped on "IndexError: index out of range in self"
    at the first batch holding one, after the run folder was written. Fewer tokens than rows (a table padded to a
    multiple of 64 or 128) is fine."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and len(tok) > rows:
        raise ConfigError(f"{key}: the tokenizer at {where} has {len(tok)} tokens and the model embeds {rows}, so "
                          f"token ids {rows}..{len(tok) - 1} have no embedding row (the forward would stop with an "
                          "IndexError at the first one); use the model's own tokenizer (remove model.tokenizer) or one "
                          "made for it, or resize the model's embeddings to the tokenizer "
                          "(model.resize_token_embeddings(len(tokenizer))) and save it")


def check_model_settings(ms: ModelSettings) -> str:
    """What `load_base` checks of the model section before loading anything (also `--dry-run`'s model check):
    model.path, model.tokenizer and model.adapter_path are folders of the right kind, the adapter's files whole.
    Returns one line saying what was checked (a hub id or tiny:<arch> is not looked up)."""
    check_model_folder(ms.path, "model.path")
    if ms.tokenizer is not None:
        check_model_folder(ms.tokenizer, "model.tokenizer")
    if ms.adapter_path is not None:  # its files, before the base loads (the adapter is loaded after it)
        check_model_folder(ms.adapter_path, "model.adapter_path", adapter=True)
        check_adapter_files(Path(ms.adapter_path), "model.adapter_path")
        if not ms.check_base and adapter_in(Path(ms.adapter_path)).saves_whole_model:
            raise ConfigError(f"model.check_base: false is read only for an adapter, and model.adapter_path="
                              f"{ms.adapter_path} holds a fully finetuned model (loaded whole, no base to check), so "
                              "it would be ignored; remove model.check_base")
    keys = ["model.path", *(["model.tokenizer"] if ms.tokenizer else []),
            *(["model.adapter_path (its files whole)"] if ms.adapter_path else [])]
    return f"{', '.join(keys)}: " + ("a local model folder" if _looks_local(ms.path) and not is_tiny(ms.path) else
                                     "a tiny model or a Hub id, not looked up by a dry run")


def load_base(ms: ModelSettings, run: RunFolder | None, task: str = "causal_lm") -> tuple[Any, Any, str, str]:
    """(model, tokenizer, loaded path, description) for `task` "causal_lm" or "classifier" (1 label).
    `run` None: nothing is written to a run folder (a tiny model stays in a temporary folder for `adopt_tiny`)."""
    check_model_settings(ms)
    check_model_kernels(ms)  # model.kernels: package, CUDA, architecture, before anything is built
    path, desc = resolve_model_path(ms, run, task)
    with explaining_load("model.tokenizer" if ms.tokenizer else "model.path", ms.tokenizer or path):
        tok = load_tokenizer_for(ms, path)
    with explaining_load("model.path", path):
        model = load_model(path, task=task, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                           num_labels=1 if task == "classifier" else None, trust_remote_code=ms.trust_remote_code,
                           rope_scaling=ms.rope_scaling)
    check_vocab(model, tok, "model.tokenizer" if ms.tokenizer else "model.path", ms.tokenizer or ms.path)
    if run is not None and path in _CREATED:  # this process's private copy of a tiny model: loaded, so not needed
        path = adopt_tiny(path, run.root / "base_model", main=False)
    if task == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if ms.kernels is not None:
        apply_kernels(model, ms.kernels)
    return model, tok, path, desc


def load_for_inference(ms: ModelSettings, run: RunFolder | None, task: str = "causal_lm") -> tuple[Any, Any, str, str]:
    """(model, tokenizer, base path, description): the base model with `model.adapter_path` applied (an
    adapter folder, or a fully finetuned model's folder)."""
    model, tok, path, desc = load_base(ms, run, task)
    if ms.adapter_path is None:
        return model, tok, path, desc
    folder = Path(ms.adapter_path)  # its files were checked by load_base
    with explaining_load("model.adapter_path", folder):
        if adapter_in(folder).saves_whole_model:  # a complete model, not an adapter
            model = load_model(folder, task=task, dtype=ms.dtype, attn_implementation=ms.attn_implementation,
                               num_labels=1 if task == "classifier" else None, trust_remote_code=ms.trust_remote_code,
                               rope_scaling=ms.rope_scaling)
            if (folder / "tokenizer_config.json").is_file():
                own = load_tokenizer_for(ModelSettings(path=str(folder), trust_remote_code=ms.trust_remote_code),
                                         str(folder))
                if ms.tokenizer is not None and own.get_vocab() != tok.get_vocab():
                    raise ConfigError(f"model.tokenizer: {ms.tokenizer} is not the tokenizer saved with "
                                      f"model.adapter_path ({folder}: a whole model, run with its own tokenizer), so "
                                      "it would be ignored; remove model.tokenizer, or save the model with the "
                                      "tokenizer it should run with")
                tok = own
            check_vocab(model, tok, "model.adapter_path", str(folder))
            if ms.kernels is not None:  # the model that runs is this one, not the base load_base patched
                apply_kernels(model, ms.kernels)
        else:
            if ms.check_base:  # whole, not cut to "cannot load ...: ValueError: <300 characters>"
                try:
                    check_base(model, folder)
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(f"model.adapter_path: {e}") from None
            try:  # a LoRA of a deeper base / another rank (check_lora_fits), non-finite weights: whole, one line
                model = load_adapter(model, folder, check_base=False)  # just checked
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(f"model.adapter_path: {e}") from None
    return model, tok, path, f"{desc} + {folder}"


def load_for_sampling(ms: ModelSettings, output_dir: str | Path, sampling: Any, section: str) -> tuple[Any, Any, str]:
    """(model on its device, tokenizer, description) for `generate` / `sample`, loaded before the run folder
    exists: `sampling.sampler: inverse_cdf` on a model that samples with `model.generate` (a ReFT adapter, stop
    strings, ...) is refused here, naming `section`, so a refused run writes nothing. A tiny base built for the
    load is removed (these commands keep no copy of it)."""
    model, tok, path, desc = load_for_inference(ms, None, "causal_lm")
    adopt_tiny(path, Path(output_dir) / "base_model", main=False)  # removes this process's tiny copy, if any
    model = to_device(model)
    try:
        check_sampler(sampling, lean_reason(model, tok, sampling), section)
        check_stop_strings(tok, sampling, section)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    note_generation_config(model, tok, sampling, section)
    return model, tok, desc


def to_device(model: Any) -> Any:
    return model.to("cuda") if torch.cuda.is_available() else model
