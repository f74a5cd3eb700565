"""The output folder of a command-line run, and what goes in it.

    <output_dir>/
      config.yaml         the resolved config (re-loads to the same settings)
      metrics.jsonl       one JSON row per Trainer log event: {"step", "epoch", "loss", "rewards/margins", ...}
                          (a non-finite value is written NaN / Infinity, never null or 0)
      tensorboard/        TensorBoard event files (when tensorboard is installed)
      plots/*.png         loss, rewards, accuracy, logps and kl curves (`PLOTS`; evaluation dashed, each set's with
                          several), drawn at the end from metrics.jsonl
                          (one-shot commands: tensorboard/<command>/ and plots/<command>-*.png histograms,
                          `write_command_outputs`)
      README.md           a model card: base model, adapter, objective, data, hyper-parameters, final metrics
      model/              the trained adapter (or full model) + tokenizer; its own copy of README.md
      checkpoints/        TrainingArguments' output_dir (intermediate checkpoints, if saving is on)

`model/` and every `checkpoints/checkpoint-N` are committed atomically (staging folder, completeness marker):
`alignkit.run_commit`.

Only the main process writes (under `accelerate launch`, `is_main_process()`), and matplotlib is
imported only when plots are drawn (Agg canvas, no pyplot state), so the library never needs it.
"""

from __future__ import annotations

import enum
import importlib.util
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import torch
import transformers
import yaml
from huggingface_hub import ModelCard as HubCard
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from transformers import TrainerCallback
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

import alignkit
from alignkit.adapters.config import KINDS
from alignkit.data.chat import PROMPT_FORMAT_FILE
from alignkit.data.readers.rows import looks_like_hub_id
from alignkit.files import atomic_write, atomic_write_text, read_jsonl
from alignkit.settings.tiny import is_tiny
from alignkit.settings.typed import ConfigError

logger = logging.getLogger(__name__)

# plot file -> metric names drawn on it (train names; "eval_<name>" is drawn too, dashed, or with several evaluation
# sets each set's "eval_<set>_<name>"): every figure an offline objective logs (docs/metrics.md) but bookkeeping
# (learning_rate, grad_norm, num_tokens, target_tokens, ...): sft's mean_token_accuracy, rm's margin and dpo / kto's
# logps and kl were on no plot
PLOTS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "rewards": ("rewards/chosen", "rewards/rejected", "rewards/margins", "margin"),
    "accuracy": ("rewards/accuracies", "accuracy", "mean_token_accuracy"),
    "logps": ("logps/chosen", "logps/rejected"),
    "kl": ("kl",),
}


def is_main_process() -> bool:
    """True on the process that writes files: rank 0 under torchrun / accelerate launch, else always."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class RunFolder:
    root: Path
    main: bool = field(default_factory=is_main_process)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.main:
            self.root.mkdir(parents=True, exist_ok=True)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    plots = property(lambda self: self.root / "plots")
    card = property(lambda self: self.root / "README.md")
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")


def _clean(value: Any) -> Any:
    """Plain scalar: tensors and numpy numbers -> float. Non-finite floats stay NaN / Infinity (written as
    `NaN`, `Infinity`, which Python's json and pandas read back): a diverged step must not look like 0 or a gap."""
    if hasattr(value, "item"):
        value = value.item()
    return value


class MetricsJsonl(TrainerCallback):
    """Append each `on_log` event to a JSONL file (main process only), with step and epoch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001  (Trainer's signature)
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **{k: _clean(v) for k, v in logs.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def trackers(report_to: str | list[str] | None, where: str = "train.report_to", expand_all: bool = False) -> list[str]:
    """The trackers `report_to` names: None is TensorBoard (alignkit's own writer into <run>/tensorboard) when
    tensorboard is installed, else none; "none" names none. TensorBoard named while tensorboard is not installed is
    a ConfigError, before anything is written: the offline commands wrote the run folder and then stopped on the
    ImportError, the online ones ran without TensorBoard events (accelerate drops a tracker it cannot import with a
    warning). `expand_all`: "all" becomes every installed integration (transformers' list), with TensorBoard among
    them, as the Trainer expands a lone "all" itself; there its own TensorBoard callback wrote the events to
    <run>/checkpoints/runs/<date>/ instead of <run>/tensorboard (and beside ["all", ...] it refused "all")."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if report_to is None:
        return ["tensorboard"] if installed else []
    names = [t for t in ([report_to] if isinstance(report_to, str) else list(report_to)) if t != "none"]
    available = get_available_reporting_integrations() if names else []  # read once (it probes every package)
    if expand_all and "all" in names:
        names = [n for t in names for n in (available if t == "all" else [t])]
    if "tensorboard" in names and not installed:
        raise ConfigError(f"{where}: tensorboard is named but not installed, so no TensorBoard events could be "
                          "written; pip install tensorboard (or alignkit[cli]), or remove it from report_to")
    # transformers' integrations whose package is missing: the offline commands stopped on an unexpected
    # RuntimeError after writing the run folder, the online ones ran without the tracker (accelerate drops it);
    # trackers only accelerate knows (aim; online commands): the run went on without them after a warning
    by_accelerate = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [n for n in names if n != "tensorboard" and (
        n not in available if n in INTEGRATION_TO_CALLBACK else n in LOGGER_TYPE_TO_CLASS and n not in by_accelerate)]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} named but not installed, so nothing could be reported "
                          f"there; install it (pip install {' '.join(m.replace('_', '-') for m in missing)}), or "
                          "remove it from report_to")
    return list(dict.fromkeys(names))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return read_jsonl(path, "the run's metrics file is damaged: delete that line")


def can_plot() -> bool:
    """Whether matplotlib (the optional `cli` extra) is installed; where it is not, one warning that the plots are
    left out (the commands' results are still written: `eval`, `generate`, `sample`, `annotate`, `augment` and
    `serve`'s shutdown stopped with an unexpected ImportError after writing theirs)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    logger.warning("matplotlib is not installed: no plots (pip install 'alignkit[cli]')")
    return False


def agg_figure() -> Any:
    """A 6 x 4 in, 100 dpi matplotlib Figure on the Agg canvas (no pyplot state); after `can_plot`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    """`fig` as a PNG at `path`, written atomically (a kill leaves the previous plot or the new one, never half)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def plot_series(rows: list[dict[str, Any]], keys: tuple[str, ...], x: str = "step") -> list[tuple[str, str, list]]:
    """(label, line style, [(x, value), ...]) of each of `keys` the rows hold a number for: the training figure
    (solid), then its evaluation (dashed): `eval_<key>`, or with several evaluation sets `eval_<set>_<key>` for each
    set, named by the rows' `eval_<set>_runtime` (only `eval_<key>` was read, so those were on no plot)."""
    sets = dict.fromkeys(k[len("eval_"):-len("_runtime")] for r in rows for k in r
                         if k.startswith("eval_") and k.endswith("_runtime") and k != "eval_runtime")
    prefixes = [("", "-"), ("eval_", "--"), *((f"eval_{s}_", "--") for s in sets)]
    series = []
    for key in keys:
        for prefix, style in prefixes:
            pts = [(r[x], r[prefix + key]) for r in rows if x in r and _numeric(r.get(prefix + key))]
            if pts:
                series.append((prefix + key, style, pts))
    return series


def plot_metrics(rows: list[dict[str, Any]], out_dir: str | Path, plots: dict[str, tuple[str, ...]] | None = None,
                 x: str = "step") -> list[Path]:
    """Draw one PNG per entry of `plots` (default `PLOTS`) that has data, against the rows' `x` (train solid, eval
    dashed). Returns the files (none, with a warning, without matplotlib)."""
    if not can_plot():
        return []
    out_dir = Path(out_dir)
    written = []
    for name, keys in (PLOTS if plots is None else plots).items():
        series = plot_series(rows, keys, x)
        if not series:
            continue
        fig = agg_figure()
        ax = fig.add_subplot()
        for label, style, pts in series:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, marker="o" if len(pts) < 20 else None, markersize=3, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(save_figure(fig, out_dir / f"{name}.png"))
    logger.info("wrote %d plot(s) to %s", len(written), out_dir)
    return written


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def write_command_outputs(root: str | Path, command: str, summary: dict[str, Any],
                          distributions: dict[str, list[float]] | None = None) -> list[Path]:
    """What a one-shot command (eval, generate, sample, annotate) leaves beside its results, as training does:
    TensorBoard events in `<root>/tensorboard/<command>` (the summary's numbers as scalars at step 0 and one
    histogram per distribution; when tensorboard is installed) and `<root>/plots/<command>-<name>.png`, a
    histogram per distribution with its mean marked. Both are namespaced by the command, so running it in a
    training run's folder leaves that run's `tensorboard/` events and `plots/` untouched. What an earlier run of the
    same command left there is replaced, as its results file is: its events were kept beside the new ones (two
    values of every scalar at step 0, TensorBoard showing either) and a histogram this run does not draw stayed
    beside the new results. The previous files go only after the new ones are written (each plot atomically): a kill
part-way leaves each of them whole, the previous or the new. Main process only. Returns the files written."""
    if not is_main_process():
        return []
    root = Path(root)
    old_events = list((root / "tensorboard" / command).glob("events.out.tfevents.*"))
    old_plots = list((root / "plots").glob(f"{command}-*.png"))
    dists = {k: [float(x) for x in v if _numeric(x)] for k, v in (distributions or {}).items()}
    dists = {k: v for k, v in dists.items() if v}
    written: list[Path] = []
    if importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = root / "tensorboard" / command
        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for k, v in summary.items():
                if _numeric(v):
                    writer.add_scalar(f"{command}/{k}", float(v), 0)
            for k, v in dists.items():
                writer.add_histogram(f"{command}/{k}", np.asarray(v), 0)
        finally:
            writer.close()
        written += sorted(set(log_dir.glob("events.out.tfevents.*")) - set(old_events))
    for old in old_events:  # after the new events are written: a kill before leaves the previous ones
        old.unlink()
    if dists and can_plot():
        (root / "plots").mkdir(parents=True, exist_ok=True)
        for k, v in dists.items():
            fig = agg_figure()
            ax = fig.add_subplot()
            ax.hist(v, bins=min(30, max(5, len(v) // 3)), alpha=0.8, edgecolor="white")
            mean = float(np.mean(v))
            ax.axvline(mean, color="k", linestyle="--", label=f"mean {mean:.4g} (n={len(v)})")
            ax.set_xlabel(k)
            ax.set_ylabel("count")
            ax.set_title(f"alignkit {command}: {k}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(save_figure(fig, root / "plots" / f"{command}-{k.replace('/', '_')}.png"))
    for old in set(old_plots) - set(written):  # a previous run's histogram this run does not draw
        old.unlink()
    logger.info("alignkit %s: wrote %d TensorBoard / plot file(s) under %s", command, len(written), root)
    return written


def write_prompt_formats(folder: str | Path, formats: dict[str, int], setting: str) -> Path:
    """Record in a trained model folder the formats of the prompts it was trained on (`setting`: data.formatter);
    `alignkit.data.chat.check_prompt_formats` reads it back where the model is used."""
    path = Path(folder) / PROMPT_FORMAT_FILE
    atomic_write_text(path, json.dumps({"formats": formats, "data.formatter": setting}, indent=2) + "\n")
    return path


def final_metrics(rows: list[dict[str, Any]], eval_step: int | None = None) -> dict[str, float]:
    """The last logged value of every metric (train and eval), without bookkeeping keys (the Trainer's speed figures
    of every evaluation set too: eval_runtime, or eval_<set>_runtime with several). With `eval_step` (the step of
    the best checkpoint a run's model holds, load_best_model_at_end), the evaluation figures are those of that step's
    evaluation: the saved model's, not the last evaluated one's."""
    skip = {"step", "epoch", "learning_rate", "grad_norm", "total_flos", "train_runtime", "train_samples_per_second",
            "train_steps_per_second"}
    speed = ("_runtime", "_samples_per_second", "_steps_per_second")
    out: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k in skip or (k.startswith("eval_") and (k.endswith(speed) or eval_step not in (None, r.get("step")))):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = v
    return out


@dataclass
class ModelCard:
    """What a model card says. `sections` are extra (title, mapping) tables, e.g. data statistics."""

    title: str
    base_model: str
    adapter: dict[str, Any]
    objective: dict[str, Any]
    data: dict[str, Any]
    hyperparameters: dict[str, Any]
    metrics: dict[str, float]
    command_line: str
    versions: dict[str, str]
    how_to_load: str = ""
    base_model_id: str | None = None  # the config's model.path (Hub metadata `base_model`; None / tiny: left out)

    def metadata(self) -> dict[str, Any]:
        """The card's Hub metadata (YAML front matter): library_name, base_model, tags, datasets, pipeline_tag."""
        kind = str(self.adapter.get("kind", "full"))
        info = KINDS[kind]
        command = str(self.objective.get("command", ""))
        meta: dict[str, Any] = {"library_name": info.library_name}
        if self.base_model_id and not is_tiny(self.base_model_id):
            meta["base_model"] = self.base_model_id
        paths = self.data.get("path")
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        hub = [p for p in paths if isinstance(p, str) and looks_like_hub_id(p)]
        if hub:
            meta["datasets"] = hub
        meta["tags"] = [t for t in dict.fromkeys(["alignkit", command, kind, *info.parts]) if t]
        meta["pipeline_tag"] = "text-classification" if command == "rm" else "text-generation"
        return meta

    def render(self) -> str:
        def table(d: dict[str, Any]) -> str:
            if not d:
                return "_none_\n"
            rows = "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in d.items())
            return "| key | value |\n|---|---|\n" + rows + "\n"

        parts = [
            f"# {self.title}\n",
            f"Made with alignkit {self.versions.get('alignkit', '?')}: **{self.objective.get('objective', '?')}** "
            f"on base model `{self.base_model}` with a **{self.adapter.get('kind', '?')}** adapter.\n",
            "## Base model\n", f"`{self.base_model}`\n",
            "## Adapter\n", table(self.adapter),
            "## Objective\n", table(self.objective),
            "## Data\n", table(self.data),
            "## Hyper-parameters\n", table(self.hyperparameters),
            "## Final metrics\n", table({k: v for k, v in self.metrics.items()}),
            "## How it was made\n", f"```\n{self.command_line}\n```\n",
            "The resolved config is `config.yaml` in the run folder; per-step metrics are in `metrics.jsonl`.\n",
        ]
        if self.how_to_load:
            parts += ["## Loading\n", f"```python\n{self.how_to_load}\n```\n"]
        parts += ["## Versions\n", table(self.versions)]
        return "\n".join(parts)

    def hub_card(self) -> Any:
        """The card as a `huggingface_hub.ModelCard`: Hub metadata (`metadata()`) above the rendered text."""
        front = yaml.safe_dump(self.metadata(), sort_keys=False).strip()
        return HubCard(f"---\n{front}\n---\n\n{self.render()}")

    def write(self, *paths: str | Path) -> None:
        card = self.hub_card()
        for p in paths:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            card.save(str(p))


def figure(value: float) -> str:
    """A run's figure as the CLI and the library's log lines show it: 4 significant digits (`:.4g`), so a KL of 6e-06
    reads 6e-06 where 4 decimals showed 0.0000, which a person cannot tell from a real 0 or a broken metric; NaN reads
    nan and infinity inf, never 0. Files (metrics.jsonl, the card's table) keep their own precision."""
    return f"{float(value):.4g}"


def _fmt(v: Any) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return f"`{json.dumps(v)}`"
    return str(v).replace("|", "\\|").replace("\n", " ")


def versions() -> dict[str, str]:
    out = {"alignkit": alignkit.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                ignore_patterns: list[str] | None = None, revision: str | None = None, api: Any = None) -> str:
    """Upload `folder` (a final model / adapter folder and its README.md card) to the Hub model repo `repo_id`,
    creating the repo; `ignore_patterns` (fnmatch, relative paths) leave files out; `revision`: the branch to commit
    to (created from main when missing, as transformers' push does; None: main). Returns the repo id."""
    if api is None:
        api = huggingface_hub.HfApi(token=token)  # looked up at call time (tests replace the Hub client)
    folder = Path(folder)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    branch = {} if revision is None else {"revision": revision}
    if revision is not None and not revision.startswith("refs/pr"):  # upload_folder to a missing branch: 404
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", ignore_patterns=ignore_patterns,
                      commit_message=f"alignkit: upload {folder.name}/", **branch)
    logger.info("pushed %s to the Hub repo %s", folder, repo_id)
    return repo_id


__all__ = ["MetricsJsonl", "ModelCard", "PLOTS", "RunFolder", "agg_figure", "can_plot", "figure", "final_metrics",
           "is_main_process", "plot_metrics", "plot_series", "push_folder", "read_metrics", "save_figure", "trackers",
           "versions", "write_command_outputs", "write_prompt_formats"]
