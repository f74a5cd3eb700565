"""What the whole-pipeline demo measured: `PipelineResult`, its before/after table and its JSON.

Every number is measured on held-out data (prompts whose colour/animal pair no training file contains):

| row                               | before                         | after                           |
|-----------------------------------|--------------------------------|---------------------------------|
| SFT loss (token NLL)              | the random base model          | the SFT model                   |
| reward-model accuracy             | SFT backbone + untrained head  | the trained reward model        |
| DPO reward accuracy / margin      | policy at step 0 (adapter init)| the DPO policy                  |
| rule score, greedy / sampled      | the SFT model's generations    | the DPO policy's generations    |
| on topic (names the animal)       | the SFT model's generations    | the DPO policy's generations    |
| reward-model score of generations | the SFT model's generations    | the DPO policy's generations    |

DPO reward accuracy counts pairs with beta * (log-ratio chosen - log-ratio rejected) > 0 strictly, so a
policy equal to its reference (LoRA at init) scores 0 accuracy and 0 margin before training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Change:
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class AdapterNumbers:
    """DPO with one adapter kind ("reft" or "lora")."""

    reward_accuracy: Change
    reward_margin: Change
    rule_greedy: Change
    rule_sampled: Change
    on_topic_greedy: Change
    rm_score_greedy: Change
    trainable_parameters: int = 0


# What the demo must reach on held-out data, per stage (`PipelineResult.shortfalls`). At the default scale
# (1.0; measured seeds 0-2 on transformers 5.23/5.24: greedy style and on-topic 1.00 for both adapters, SFT
# loss 6.1 -> 0.08-0.09, reward-model accuracy 1.00) the floors leave a margin for seeds and CPUs; a run
# below them is broken, not unlucky. Scaled-down runs (--scale < 1) train too little for those levels and
# are held to REDUCED_FLOORS (measured at 0.4, seeds 0-3: greedy style 0.97-1.00, on-topic >= 0.9).
FLOORS = {"sft_loss_ratio": 0.1, "rm_accuracy": 0.9, "dpo_reward_accuracy": 0.9, "rule_greedy": 0.9,
          "on_topic_greedy": 0.9}
REDUCED_FLOORS = {"sft_loss_ratio": 0.5, "rm_accuracy": 0.9, "dpo_reward_accuracy": 0.5, "rule_greedy": 0.5,
                  "on_topic_greedy": 0.5}


ADAPTER_LABELS = {"lora": "LoRA", "reft": "ReFT"}  # the demo's DPO runs are named by their adapter kind


def dpo_label(name: str) -> str:
    """"DPO+LoRA" / "DPO+ReFT": how the report names the DPO run `name`."""
    return f"DPO+{ADAPTER_LABELS.get(name, name)}"


@dataclass
class PipelineResult:
    sft_loss: Change
    rm_accuracy: Change
    dpo: dict[str, AdapterNumbers]
    steps: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    num_heldout_prompts: int = 0
    num_samples: int = 0
    seed: int = 0
    scale: float = 1.0
    output_dir: str = ""

    def rows(self) -> list[tuple[str, float, float, str]]:
        """(label, before, after, format) per table row."""
        out = [("held-out SFT loss (nll/token)", self.sft_loss.before, self.sft_loss.after, ".3f"),
               ("reward-model accuracy (held-out pairs)", self.rm_accuracy.before, self.rm_accuracy.after, ".2f")]
        for name, d in self.dpo.items():
            tag = dpo_label(name)
            out += [(f"{tag}: reward accuracy (held-out pairs)", d.reward_accuracy.before, d.reward_accuracy.after,
                     ".2f"),
                    (f"{tag}: reward margin (held-out pairs)", d.reward_margin.before, d.reward_margin.after, ".3f"),
                    (f"{tag}: rule score, greedy", d.rule_greedy.before, d.rule_greedy.after, ".2f"),
                    (f"{tag}: rule score, sampled (T=1)", d.rule_sampled.before, d.rule_sampled.after, ".2f"),
                    (f"{tag}: on topic, greedy", d.on_topic_greedy.before, d.on_topic_greedy.after, ".2f"),
                    (f"{tag}: reward-model score, greedy", d.rm_score_greedy.before, d.rm_score_greedy.after, ".2f")]
        return out

    def table(self) -> str:
        """The print-ready before/after table (plain text, one row per number)."""
        rows = self.rows()
        width = max(len(r[0]) for r in rows)
        lines = [f"{'held-out measurement':<{width}}  {'before':>8}  {'after':>8}", "-" * (width + 20)]
        for label, before, after, fmt in rows:
            lines.append(f"{label:<{width}}  {before:>8{fmt}}  {after:>8{fmt}}")
        lines.append("-" * (width + 20))
        lines.append(f"rule: the response starts with 'Sure!' and ends with 'Hope this helps!'; "
                     f"{self.num_heldout_prompts} held-out prompts, {self.num_samples} samples each when sampled")
        lines.append("before: random base (SFT loss), untrained head (reward model), the policy at step 0 (DPO "
                     "rewards), the SFT model (generations)")
        total = self.seconds.get("total")
        if total is not None:
            lines.append(f"seed {self.seed}, scale {self.scale:g}, {total:.0f} s; outputs in {self.output_dir}")
        return "\n".join(lines)

    def floors(self) -> dict[str, float]:
        return dict(FLOORS if self.scale >= 1.0 else REDUCED_FLOORS)

    def shortfalls(self) -> list[str]:
        """One plain line per held-out figure below its floor, naming the stage; empty when all hold."""
        f = self.floors()
        out = []
        ratio = self.sft_loss.after / self.sft_loss.before if self.sft_loss.before else float("inf")
        if not ratio <= f["sft_loss_ratio"]:  # `not <=` so that NaN fails
            out.append(f"SFT: held-out loss {self.sft_loss.before:.4g} -> {self.sft_loss.after:.4g} is "
                       f"{ratio:.2f}x the start, floor <= {f['sft_loss_ratio']:g}x")
        if not self.rm_accuracy.after >= f["rm_accuracy"]:
            out.append(f"reward model: held-out accuracy {self.rm_accuracy.after:.2f} < floor {f['rm_accuracy']:g}")
        for name, d in self.dpo.items():
            tag = dpo_label(name)
            for label, value, key in (("held-out reward accuracy", d.reward_accuracy.after, "dpo_reward_accuracy"),
                                      ("greedy style score", d.rule_greedy.after, "rule_greedy"),
                                      ("greedy on-topic rate", d.on_topic_greedy.after, "on_topic_greedy")):
                if not value >= f[key]:
                    out.append(f"{tag}: {label} {value:.2f} < floor {f[key]:g}")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["table"] = [{"row": label, "before": b, "after": a} for label, b, a, _ in self.rows()]
        out["floors"] = self.floors()
        out["shortfalls"] = self.shortfalls()
        return out


__all__ = ["AdapterNumbers", "Change", "FLOORS", "PipelineResult", "REDUCED_FLOORS"]
