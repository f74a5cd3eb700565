"""The bundled task of the whole-pipeline demo, and the deterministic script that writes its JSONL files.

    python -m alignkit.demos.pipeline_data            # rewrites src/alignkit/resources/demo/pipeline/*.jsonl

The task: questions about coloured animals, answered from a small fact table, in one of two styles.

    prompt:  "User: Where does the red fox live?\\nAssistant:"
    plain:   " The red fox lives in the forest."
    polite:  " Sure! The red fox lives in the forest. Hope this helps!"

The content of an answer depends on the question (4 templates), the colour (copied from the prompt) and the
animal (its trait and home come from `ANIMALS`), so SFT has something to learn. The style is the
preference: a response follows THE RULE (`follows_rule`) when it starts with "Sure!" and ends with
"Hope this helps!". Anyone can check it on a generation with a string test.

Files (prompts never overlap between train and held-out: held-out uses (colour, animal) pairs that no
training file contains, so every held-out prompt is new to every stage):
- sft_train.jsonl / sft_heldout.jsonl: {"prompt", "completion"}; the completion is polite with
  probability `POLITE_FRACTION` (0.3), else plain, so an SFT model writes a mix, mostly plain;
- preference_train.jsonl / preference_heldout.jsonl: {"prompt", "chosen", "rejected"}; chosen is the
  polite answer, rejected the plain one (same facts), the pairs a reward model and DPO learn from;
- prompts_heldout.jsonl: {"prompt"}; the held-out prompts whose generations are scored with the rule.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray"]
# animal -> (trait, home)
ANIMALS = {
    "cat": ("curious", "house"), "dog": ("loyal", "yard"), "fox": ("clever", "forest"), "owl": ("wise", "tree"),
    "bear": ("strong", "cave"), "horse": ("fast", "field"), "mouse": ("tiny", "barn"), "rabbit": ("shy", "meadow"),
    "wolf": ("wild", "hills"), "duck": ("noisy", "pond"),
}
# question template -> answer template ({c}: colour, {a}: animal, {t}: trait, {h}: home)
TEMPLATES = [
    ("Tell me about the {c} {a}.", "The {c} {a} is {t} and lives in the {h}."),
    ("What is the {c} {a} like?", "The {c} {a} is {t}."),
    ("Where does the {c} {a} live?", "The {c} {a} lives in the {h}."),
    ("Describe the {c} {a}.", "The {c} {a} is a {t} animal."),
]
OPENER, CLOSER = "Sure!", "Hope this helps!"
POLITE_FRACTION = 0.3
HELDOUT_PAIRS = 16  # (colour, animal) pairs kept out of every training file
SEED = 1234
FILES = ("sft_train", "sft_heldout", "preference_train", "preference_heldout", "prompts_heldout")


def prompt_text(question: str) -> str:
    """The plain-text prompt the model reads; the response starts with a space after "Assistant:"."""
    return f"User: {question}\nAssistant:"


def plain_answer(template: int, color: str, animal: str) -> str:
    trait, home = ANIMALS[animal]
    return TEMPLATES[template][1].format(c=color, a=animal, t=trait, h=home)


def polite(answer: str) -> str:
    return f"{OPENER} {answer} {CLOSER}"


def follows_rule(response: str) -> bool:
    """THE RULE: the response starts with "Sure!" and ends with "Hope this helps!" (whitespace ignored)."""
    text = response.strip()
    return text.startswith(OPENER) and text.endswith(CLOSER)


def on_topic(response: str, prompt: str) -> bool:
    """A second check: the response names the prompt's colour and animal ("the red fox")."""
    for c in COLORS:
        for a in ANIMALS:
            if f"the {c} {a}" in prompt:
                return f"The {c} {a}" in response
    return False


def split_pairs(seed: int = SEED) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) (colour, animal) pairs; every colour and animal still occurs in training."""
    rng = random.Random(seed)
    pairs = [(c, a) for c in COLORS for a in ANIMALS]
    while True:
        rng.shuffle(pairs)
        held, train = pairs[:HELDOUT_PAIRS], pairs[HELDOUT_PAIRS:]
        if {c for c, _ in train} == set(COLORS) and {a for _, a in train} == set(ANIMALS):
            return sorted(train), sorted(held)


def build_records(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """The rows of every file in `FILES` (deterministic for a given seed)."""
    rng = random.Random(seed + 1)
    train, held = split_pairs(seed)
    out: dict[str, list[dict[str, str]]] = {name: [] for name in FILES}
    for split, pairs in (("train", train), ("heldout", held)):
        for color, animal in pairs:
            for t, (question, _) in enumerate(TEMPLATES):
                prompt = prompt_text(question.format(c=color, a=animal))
                answer = plain_answer(t, color, animal)
                style = polite(answer) if rng.random() < POLITE_FRACTION else answer
                out[f"sft_{split}"].append({"prompt": prompt, "completion": " " + style})
                out[f"preference_{split}"].append({"prompt": prompt, "chosen": " " + polite(answer),
                                                   "rejected": " " + answer})
                if split == "heldout":
                    out["prompts_heldout"].append({"prompt": prompt})
    return out


def default_folder() -> Path:
    return Path(__file__).resolve().parent.parent / "resources" / "demo" / "pipeline"


def write_files(folder: str | Path | None = None, seed: int = SEED) -> Path:
    """Write every file of `FILES` as JSONL into `folder` (default: the bundled resources folder)."""
    folder = Path(folder) if folder is not None else default_folder()
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in build_records(seed).items():
        with (folder / f"{name}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        logger.info("wrote %d rows to %s", len(rows), folder / f"{name}.jsonl")
    return folder


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    write_files()
