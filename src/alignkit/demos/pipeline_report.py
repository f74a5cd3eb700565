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
            tag = f"DPO+{name.upper() if name == 'lora' else 'ReFT'}"
            out += [(f"{tag}: reward accuracy (held-out pairs)", d.reward_accuracy.before, d.reward_accuracy.after, ".2f"),
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["table"] = [{"row": label, "before": b, "after": a} for label, b, a, _ in self.rows()]
        return out


__all__ = ["AdapterNumbers", "Change", "PipelineResult"]
