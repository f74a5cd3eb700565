"""Shared spec of the side-by-side CPU benchmark: model, data, settings, measurement.

Imported by bench/run_cpu.py (alignkit venv) AND by the peer scripts in bench/peers/ (their own
venvs: TRL on transformers 5.x, pyreft on transformers 4.45), where alignkit is NOT installed. So
this file needs only the standard library at import time, and `transformers` + `tokenizers` +
`torch` inside the functions that build things.

- A *scenario* is a plain JSON-able dict: a tiny Llama config and a data recipe (SCENARIOS).
- `prepare_scenario` builds the model folder once (config + safetensors + tokenizer) and writes the
  synthetic JSONL data; every library then loads the same folder with `from_pretrained`.
- The tokenizer is word-level ("t17" is one token), so token counts are exact and identical in
  every library and every tokenizers version, and a 32k vocabulary is a real 32k vocabulary.
- `Meter` times the steps after warmup and counts the non-pad tokens the trained model sees;
  `finish` writes the result JSON with peak RSS (`ru_maxrss` of this process: every run is a fresh
  subprocess, started by run_cpu.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]  # ids 0..3
TASKS = ("sft", "rm", "dpo", "reft")

_LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
              max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)

SCENARIOS: dict[str, dict] = {
    # Short, ragged sequences (padding matters): the everyday case on a small model.
    "small": {
        "name": "small",
        "model": dict(_LLAMA, vocab_size=1024),
        "data": {"seed": 1234, "n": 256, "prompt_len": [8, 48], "completion_len": [8, 48]},
        "max_length": 128,
    },
    # Several epochs over few examples, as pyreft's recipes train: the "small" model and lengths, 64 examples
    # (8 batches of 8 per epoch); the ReFT cases time epochs 2-4 (warm-up = the first epoch).
    "epochs": {
        "name": "epochs",
        "model": dict(_LLAMA, vocab_size=1024),
        "data": {"seed": 1234, "n": 64, "prompt_len": [8, 48], "completion_len": [8, 48]},
        "max_length": 128,
    },
    # The online suite's vLLM rows (bench/online_cpu.py --vllm): the "small" model with 2 heads of 64 and 1 KV head
    # (vLLM's CPU attention needs head_dim >= 64; "small" has 32), the same prompts.
    "small_hd64": {"name": "small_hd64", "model": dict(_LLAMA, vocab_size=1024, num_attention_heads=2, num_key_value_heads=1),
                   "data": {"seed": 1234, "n": 256, "prompt_len": [8, 48], "completion_len": [8, 48]}, "max_length": 128},
    # DPO memory: 32k vocabulary, ~512-token sequences (256 prompt + 256 response): the logits
    # (B, 2, T, 32000) dominate memory, so this is where fused / chunked log-probs show.
    "dpo_memory": {
        "name": "dpo_memory",
        "model": dict(_LLAMA, vocab_size=32000),
        "data": {"seed": 4321, "n": 64, "prompt_len": [240, 256], "completion_len": [240, 256]},
        "max_length": 512,
    },
}


# ----------------------------------------------------------------------------- paths
def scenario_dir(run_dir: str | Path, spec: dict) -> Path:
    return Path(run_dir) / spec["name"]


def model_dir(run_dir: str | Path, spec: dict) -> Path:
    return scenario_dir(run_dir, spec) / "model"


def data_file(run_dir: str | Path, spec: dict, kind: str) -> Path:
    """kind: 'sft' (prompt, completion), 'pref' (prompt, chosen, rejected), 'reft' (prompt, completion)."""
    return scenario_dir(run_dir, spec) / f"{kind}.jsonl"


def load_spec(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- model + tokenizer
def build_tokenizer(vocab_size: int):
    """Word-level tokenizer: 4 specials + words t0..t{V-5}; whitespace split; no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"t{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                  eos_token="<|eos|>", unk_token="<|unk|>", model_max_length=4096,
                                  model_input_names=["input_ids", "attention_mask"])


def load_tokenizer(folder: str | Path, padding_side: str = "right"):
    """Load the saved tokenizer as a plain fast tokenizer (works on transformers 4.x and 5.x)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok.padding_side = padding_side
    return tok


def save_model_folder(spec: dict, folder: str | Path) -> Path:
    """Build the tiny Llama of `spec` (seeded) and its tokenizer; save both to `folder`.

    config.json is rewritten from the spec afterwards with only keys that transformers 4.45 and 5.x
    both read, so the pyreft env (4.45) loads the identical model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(spec["model"])
    cfg.pop("model_type")
    torch.manual_seed(spec["data"]["seed"])
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(cfg["vocab_size"]).save_pretrained(folder)
    neutral = dict(spec["model"], architectures=["LlamaForCausalLM"], torch_dtype="float32",
                   hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
                   use_cache=False)
    (folder / "config.json").write_text(json.dumps(neutral, indent=2))
    # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to 4.x: declare the common name.
    tc = folder / "tokenizer_config.json"
    tc.write_text(json.dumps(dict(json.loads(tc.read_text()), tokenizer_class="PreTrainedTokenizerFast"), indent=2))
    return folder


# ----------------------------------------------------------------------------- data
def _words(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size - len(SPECIALS)) for _ in range(n)]


def _text(ids: list[int], lead_space: bool = False) -> str:
    return (" " if lead_space else "") + " ".join(f"t{i}" for i in ids)


def make_data(spec: dict) -> dict[str, list[dict]]:
    """Deterministic synthetic records. The completion is a learnable function of the prompt
    (its tokens shifted by one and reversed) so losses go down; 'rejected' is random.
    Completions start with a space so prompt + completion tokenizes as the concatenation."""
    d, v = spec["data"], spec["model"]["vocab_size"]
    rng = random.Random(d["seed"])
    sft, pref = [], []
    for _ in range(d["n"]):
        p = _words(rng, rng.randint(*d["prompt_len"]), v)
        n_c = rng.randint(*d["completion_len"])
        good = [(t + 1) % (v - len(SPECIALS)) for t in reversed(p)]
        good = (good * (n_c // len(good) + 1))[:n_c]
        bad = _words(rng, rng.randint(*d["completion_len"]), v)
        sft.append({"prompt": _text(p), "completion": _text(good, True)})
        pref.append({"prompt": _text(p), "chosen": _text(good, True), "rejected": _text(bad, True)})
    return {"sft": sft, "pref": pref, "reft": sft}


def prepare_scenario(spec: dict, run_dir: str | Path) -> Path:
    """Write spec.json, the model folder and the JSONL data of one scenario; returns the spec path."""
    sdir = scenario_dir(run_dir, spec)
    sdir.mkdir(parents=True, exist_ok=True)
    save_model_folder(spec, model_dir(run_dir, spec))
    for kind, rows in make_data(spec).items():
        with open(data_file(run_dir, spec, kind), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    spec_path = sdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    return spec_path


# ----------------------------------------------------------------------------- settings (CLI of every side script)
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The one interface of bench/peers/*.py and bench/alignkit_side.py."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="scenario spec.json written by prepare_scenario")
    ap.add_argument("--run-dir", required=True, help="run folder holding <scenario>/model and the JSONL data")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--out", required=True, help="where to write the result JSON")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing starts")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--grad-ckpt", choices=["default", "on", "off"], default="default")
    ap.add_argument("--precision", choices=["default", "fp32", "bf16"], default="default")
    ap.add_argument("--padding-free", action="store_true", help="flatten the batch (where the library supports it)")
    ap.add_argument("--group-by-length", action="store_true",
                    help="batches of similar lengths (where the library supports it for the task)")
    ap.add_argument("--precompute-ref", action="store_true",
                    help="DPO: reference log-probs computed once before training (untimed), not every step")
    ap.add_argument("--share-prompt", action="store_true",
                    help="alignkit RM / DPO: one row per pair, the prompt run once (share_prompt=True)")
    ap.add_argument("--max-length", type=int, default=None, help="defaults to the spec's max_length")
    ap.add_argument("--position", default="l1", help="ReFT positions, e.g. l1 or f1+l1")
    ap.add_argument("--layer", type=int, default=None, help="ReFT layer (default: middle layer)")
    ap.add_argument("--rank", type=int, default=4, help="LoReFT rank")
    ap.add_argument("--reft-prefix-cache", choices=["auto", "on", "off"], default="auto",
                    help="alignkit ReFT: train.reft_prefix_cache (auto: the trainer's default)")
    ap.add_argument("--last-layer", choices=["on", "off"], default="on",
                    help="alignkit: the last decoder layer on the read positions only (alignkit.models.last_layer; "
                         "on is the library's behaviour, off for an A/B)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    if args.max_length is None:
        args.max_length = spec["max_length"]
    if args.layer is None:
        args.layer = spec["model"]["num_hidden_layers"] // 2
    args.spec_dict = spec
    return args


def settings_of(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("spec_dict",)}


def setup_torch(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


# ----------------------------------------------------------------------------- measurement
def run_logged(cmd: list[str], out: Path, log: Path, threads: int, timeout: int,
               env_extra: dict | None = None) -> tuple[dict | None, str, float]:
    """Run one side's benchmark process (quiet, offline, `threads` threads, plus `env_extra`), its output in `log`.
    Returns (its result JSON from `out` or None, the failure reason or "", wall seconds)."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", WANDB_DISABLED="true", **(env_extra or {}))
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t
    if rc == 0 and out.exists():
        return json.loads(out.read_text()), "", wall
    return None, f"exit {rc}: " + " | ".join(log.read_text().strip().splitlines()[-3:])[-300:], wall


def median_ci(xs: list[float], level: float = 0.90) -> tuple[float, float, float] | None:
    """Distribution-free confidence interval of the median of `xs` (paired ratios): the order statistics
    (x_(k), x_(n+1-k)) with the largest k whose coverage 1 - 2 P(Binomial(n, 1/2) <= k - 1) is still >= `level`.
    Returns (low, high, coverage), or None when even (min, max) covers less than `level` (n < 5 at 0.90).
    Unlike (min, max), which widens with every repeat, this narrows as repeats are added: it is what "enough
    repeats to say so" means for a target such as ">= 2x". n = 5: (min, max) at 93.75 %; n = 9: 2nd and 8th
    at 96.1 %; n = 11: 3rd and 9th at 93.5 %."""
    from math import comb

    n = len(xs)
    best = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * sum(comb(n, i) for i in range(k)) / 2 ** n
        if coverage < level:
            break
        best = (k, coverage)
    if best is None:
        return None
    k, coverage = best
    s = sorted(xs)
    return s[k - 1], s[n - k], coverage


def paired_summary(xs: list[float] | None) -> str:
    """'median (min-max, n=N; CI93.8% lo-hi)' of paired ratios, the CI from `median_ci` where n allows one."""
    import statistics

    if not xs:
        return "—"
    out = f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}, n={len(xs)}"
    ci = median_ci(xs)
    return out + (f"; median's CI{100 * ci[2]:.1f}% {ci[0]:.2f}-{ci[1]:.2f})" if ci else ")")


# ----------------------------------------------------------------------------- same work on both sides
# A ratio of two runs means something only when both did the same work. `work_mismatches` lists what differs.
# (setting as parse_args / parse_online_args name it, value asked) -> (key of the run's "effective" block, value)
_ASKED = {("grad_ckpt", "on"): ("gradient_checkpointing", True), ("grad_ckpt", "off"): ("gradient_checkpointing", False),
          ("precision", "fp32"): ("bf16", False), ("precision", "bf16"): ("bf16", True),
          ("padding_free", True): ("padding_free", True), ("share_prompt", True): ("share_prompt", True)}


def fallbacks(r: dict) -> list[str]:
    """The settings a run asked for (its "settings") that its library did not run with (its "effective" block, what
    the trainer reports after its own defaults), e.g. padding-free asked and padded batches run."""
    eff, out = r.get("effective") or {}, []
    for k, v in (r.get("settings") or {}).items():
        want = _ASKED.get((k, v)) if k in ("grad_ckpt", "precision", "padding_free", "share_prompt") else None
        if want and want[0] in eff and bool(eff[want[0]]) != want[1]:
            out.append(f"{r.get('library', '?')} asked {k}={v} but ran {want[0]}={eff[want[0]]}")
    return out


def _apart(x: float, y: float, rtol: float, atol: float = 0.0) -> bool:
    return abs(x - y) > max(atol, rtol * max(abs(x), abs(y)))


def work_mismatches(a: dict, p: dict, same: tuple[str, ...] = ("steps", "warmup"),
                    settings: tuple[str, ...] = ("batch_size",), tokens: str = "timed_tokens", tokens_rtol: float = 0.05,
                    compare_loss: bool = True, loss_rtol: float = 0.05, loss_atol: float = 0.02,
                    prompt_once_counts_less: bool = True) -> list[str]:
    """What makes two ok results (alignkit `a`, peer `p`) not the same work, as short reasons ([] = comparable):
    different `same` fields or `settings`; a side that counted no `tokens`, or token counts more than `tokens_rtol`
    apart (with `prompt_once_counts_less`, not checked when a side ran share_prompt: it feeds each pair's prompt
    once, by design); a non-finite
    final loss; final losses apart by more than max(`loss_atol`, `loss_rtol` x the larger) (`compare_loss`); a
    setting asked for and not run (`fallbacks`)."""
    out = [f"{k} {a.get(k)} vs {p.get(k)}" for k in same if a.get(k) != p.get(k)]
    sa, sp = a.get("settings") or {}, p.get("settings") or {}
    out += [f"{k} {sa.get(k)} vs {sp.get(k)}" for k in settings if sa.get(k) != sp.get(k)]
    ta, tp = a.get(tokens), p.get(tokens)
    if tokens and ta is not None and tp is not None:
        if not ta or not tp:
            out.append(f"{tokens} {ta} vs {tp}: a side counted no tokens")
        elif not (prompt_once_counts_less and any((r.get("effective") or {}).get("share_prompt") for r in (a, p))) \
                and _apart(ta, tp, tokens_rtol):
            out.append(f"{tokens} {ta} vs {tp} ({100 * abs(ta - tp) / max(ta, tp):.1f}% apart, over "
                       f"{100 * tokens_rtol:g}%)")
    la, lp = a.get("final_loss"), p.get("final_loss")
    out += [f"{r.get('library', '?')} final loss {x}" for r, x in ((a, la), (p, lp))
            if x is not None and not math.isfinite(x)]
    if (compare_loss and la is not None and lp is not None and math.isfinite(la) and math.isfinite(lp)
            and _apart(la, lp, loss_rtol, loss_atol)):
        out.append(f"final loss {la:.4f} vs {lp:.4f} (apart by more than {100 * loss_rtol:g}% / {loss_atol:g})")
    return out + fallbacks(a) + fallbacks(p)


def pair_repeats(ra: list[dict], rp: list[dict], check=work_mismatches) -> tuple[list[tuple[dict, dict]], list[str], list[str]]:
    """Repeat i of one side with repeat i of the other (they ran together). Returns the pairs where both ran ok and
    `check` finds the same work; why the other ok pairs were left out ("rI: reason"); and every repeat that did
    not run ("<library> rI: status: reason"), so that a crash is counted, not dropped from the spread."""
    kept, excluded, failed = [], [], []
    for i, (x, y) in enumerate(zip(ra, rp)):
        bad = [f"{r.get('library', side)} r{i}: {r.get('status')}: {r.get('reason', '')}"
               for r, side in ((x, "alignkit"), (y, "peer")) if r.get("status") != "ok"]
        failed += bad
        if bad:
            continue
        why = check(x, y)
        if why:
            excluded.append(f"r{i}: " + "; ".join(why))
        else:
            kept.append((x, y))
    return kept, excluded, failed


def repeats_note(kept: int, n: int, excluded: list[str], failed: list[str]) -> str:
    """'' when all `n` repeats paired, else how many of them made the paired ratios (`kept`) and why the others did
    not (one line)."""
    parts = ([f"{len(failed)} run(s) without a result ({'; '.join(failed)})"] if failed else []) + (
        [f"{len(excluded)} pair(s) NOT the same work ({'; '.join(excluded)})"] if excluded else [])
    return f"  [{kept} of {n} pairs; " + "; ".join(parts) + "]" if parts else ""


def generation_mismatch(a: list[list[int]], b: list[list[int]]) -> str:
    """'' when two generations did the same work (as many rows, each as long: the same decode steps and row-steps),
    else why, in short (for a NOT COMPARABLE line: no ratio of their times is the cost of the same work)."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} rows"
    la, lb = [len(x) for x in a], [len(x) for x in b]
    if la != lb:
        return (f"{sum(la)} vs {sum(lb)} tokens generated ({sum(x != y for x, y in zip(la, lb))} of {len(la)} rows "
                "of other lengths)")
    return ""


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_tokens(args: tuple, kwargs: dict, pad_token_id: int | None = None) -> int:
    """Non-pad tokens of one forward's batch (a forward pre-hook's `args`, `kwargs`): the sum of a 2-D attention mask;
    without one (packed rows) or with a 4-D one (shared-prompt rows carry a (B, 1, T, T) mask, whose sum counts
    T^2 per row), the input ids that are not `pad_token_id` (all of them when None)."""
    # pyvene-style wrappers take the batch as a dict in the first argument: forward(base, ...)
    batch = args[0] if args and isinstance(args[0], dict) else kwargs
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids", args[0] if args and not isinstance(args[0], dict) else None)
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    if ids is not None and pad_token_id is not None:
        return int((ids != pad_token_id).sum())
    return int(ids.numel()) if ids is not None else 0


class Meter:
    """Times steps warmup+1 .. warmup+steps and counts non-pad tokens fed to `module` meanwhile.

    `module` is the model whose forward sees the training batches (the policy, not a reference
    model); a forward pre-hook counts attention_mask.sum() (or input_ids.numel() when no mask is
    given, as in padding-free batches; minus `pad_token_id` filler when given) for forwards run with grad
    enabled, so reference passes
    under no_grad (a frozen copy, or the same model with its adapter off) are not counted.
    Call `step_end(n)` after each optimizer step n (1-based), e.g. from a TrainerCallback.
    """

    def __init__(self, module, warmup: int, steps: int, batch_size: int, pad_token_id: int | None = None):
        self.warmup, self.steps, self.batch_size = warmup, steps, batch_size
        self.pad_token_id = pad_token_id  # packed rows without a mask: filler tokens are not counted
        self.tokens = 0
        self.t0 = self.t1 = None
        self.tokens0 = self.tokens1 = 0
        self.losses: list[float] = []
        self.step_cpu: list[float] = []  # CPU seconds of each timed step (where the noise of a run sits)
        self._last_cpu: float | None = None
        self.rss_before_train = rss_mb()
        module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        import torch

        if torch.is_grad_enabled():
            self.tokens += batch_tokens(args, kwargs, self.pad_token_id)
        return None

    def step_end(self, step: int) -> None:
        cpu = time.process_time()
        if self.warmup < step <= self.warmup + self.steps and self._last_cpu is not None:
            self.step_cpu.append(cpu - self._last_cpu)
        self._last_cpu = cpu
        if step == self.warmup:
            self.t0, self.tokens0, self.cpu0 = time.perf_counter(), self.tokens, cpu
        elif step == self.warmup + self.steps:
            self.t1, self.tokens1, self.cpu1 = time.perf_counter(), self.tokens, cpu

    def result(self) -> dict:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"timing incomplete: saw step {self.warmup} -> {self.t0}, "
                               f"step {self.warmup + self.steps} -> {self.t1}; did training stop early?")
        dt = self.t1 - self.t0
        tok = self.tokens1 - self.tokens0
        cpu = self.cpu1 - self.cpu0  # this process's CPU seconds (all threads) over the timed steps
        return {"seconds": dt, "samples_per_s": self.steps * self.batch_size / dt, "cpu_seconds": cpu,
                "samples_per_cpu_s": self.steps * self.batch_size / cpu if cpu > 0 else None,
                "tokens_per_s": tok / dt, "timed_tokens": tok,
                "final_loss": self.losses[-1] if self.losses else None,
                "rss_before_train_mb": self.rss_before_train, "step_cpu_seconds": self.step_cpu}


def trainer_callback(meter: "Meter | StepClock"):
    """A transformers TrainerCallback feeding `meter` (a `Meter` or a `StepClock`: step ends and logged losses)."""
    from transformers import TrainerCallback

    class _MeterCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    return _MeterCallback()


def versions(*names: str) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for n in ("torch", "transformers", *names):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def finish(args: argparse.Namespace, library: str, meter: Meter, extra: dict | None = None,
           libs: tuple[str, ...] = ()) -> dict:
    """Write and print the result JSON of one run."""
    res = {"library": library, "task": args.task, "scenario": args.spec_dict["name"], "status": "ok",
           **meter.result(), "peak_rss_mb": rss_mb(), "steps": args.steps, "warmup": args.warmup,
           "settings": settings_of(args), "versions": versions(*libs), **(extra or {})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("library", "task", "samples_per_s", "tokens_per_s", "peak_rss_mb",
                                          "final_loss")}))
    return res


def skip(args: argparse.Namespace, library: str, reason: str) -> None:
    """Write a 'skipped' result (e.g. alignkit trainer not available yet) and exit 0."""
    res = {"library": library, "task": args.task, "scenario": args.spec_dict["name"], "status": "skipped",
           "reason": reason, "settings": settings_of(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    sys.exit(0)


# ----------------------------------------------------------------------------- online (GRPO / online DPO)
# The online suite (bench/online_cpu.py) trains the "small" scenario's tiny Llama on its prompts with this
# reward, on both sides: TRL's reward-function signature, which alignkit's function annotator also reads.
def even_fraction(completions, **kwargs) -> list[float]:
    """Reward of each completion: the fraction of its words "tN" with N even (0 for an empty one)."""
    out = []
    for text in completions:
        words = [w for w in str(text).split() if w[:1] == "t" and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / len(words) if words else 0.0)
    return out


def parse_online_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The interface of bench/online_alignkit.py and bench/peers/trl_online.py."""
    ap = argparse.ArgumentParser(description="one online-training run of the online CPU suite")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--method", required=True, choices=["grpo", "online_dpo"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=4, help="completions per prompt (online DPO: 2)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (GRPO) / DPO beta (online DPO)")
    ap.add_argument("--share-prompt", action="store_true",
                    help="alignkit: each prompt's samples as one row in the training / reference forwards")
    ap.add_argument("--sampler", choices=["inverse_cdf", "multinomial"], default=None,
                    help="alignkit: sampling.sampler (default None: inverse_cdf in its decode loop)")
    ap.add_argument("--grad-ckpt", choices=["default", "on", "off"], default="default")
    ap.add_argument("--precision", choices=["default", "fp32", "bf16"], default="default")
    ap.add_argument("--generation-backend", choices=["transformers", "vllm"], default="transformers",
                    help="alignkit: method.generation_backend (vllm: a colocated engine, in vLLM's env)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.spec_dict = load_spec(args.spec)
    args.task = args.method
    return args


def online_prompts(args: argparse.Namespace) -> list[str]:
    return [r["prompt"] for r in read_jsonl(data_file(args.run_dir, args.spec_dict, "sft"))]


class StepClock:
    """Wall and CPU time of steps warmup+1 .. warmup+steps (call `step_end(n)` after step n, 1-based) and the
    tokens generated meanwhile (`add_generated(n)`)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.generated = 0
        self.marks: dict[int, tuple[float, float, int]] = {}
        self.losses: list[float] = []

    def add_generated(self, n: int) -> None:
        self.generated += int(n)

    def step_end(self, step: int) -> None:
        if step in (self.warmup, self.warmup + self.steps):
            self.marks[step] = (time.perf_counter(), time.process_time(), self.generated)

    def result(self) -> dict:
        a, b = self.marks.get(self.warmup), self.marks.get(self.warmup + self.steps)
        if a is None or b is None:
            raise RuntimeError(f"timing incomplete: marks at {sorted(self.marks)}; did training stop early?")
        dt, cpu, gen = b[0] - a[0], b[1] - a[1], b[2] - a[2]
        return {"seconds": dt, "cpu_seconds": cpu, "steps_per_s": self.steps / dt, "generated_tokens": gen,
                "generated_tokens_per_s": gen / dt, "final_loss": self.losses[-1] if self.losses else None}


def finish_online(args: argparse.Namespace, library: str, clock: StepClock, extra: dict | None = None,
                  libs: tuple[str, ...] = ()) -> dict:
    res = {"library": library, "task": args.method, "status": "ok", **clock.result(), "peak_rss_mb": rss_mb(),
           "steps": args.steps, "warmup": args.warmup, "settings": settings_of(args), "versions": versions(*libs),
           **(extra or {})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("library", "task", "steps_per_s", "generated_tokens_per_s", "cpu_seconds",
                                          "final_loss")}))
    return res
