"""`alignkit eval` (reward) on pairs scored exactly equal. Before: a tie counted as not right in `accuracy` and
nothing said how many there were (a constant score head gave accuracy 0.0, exit 0, like a model that always prefers
the worse reply). Now metrics.json has `ties` (ordered pairs with equal scores, still not right, as TRL's
RewardTrainer counts them) and one warning gives their number."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from alignkit.models.loading import load_model, load_tokenizer

from tests.cli.test_eval_weighted import CONFIGS, PAIRS, evaluate

RANKED = [{"prompt": "Name a fruit.", "responses": [" An apple.", " A pear, I think.", " A chair."], "ranks": [0, 1, 2]},
          {"prompt": "Say hi.", "responses": [" Hi there!", " Hello.", " No."], "ranks": [0, 0, 1]}]


def constant_rm(source: str, folder: Path) -> Path:
    """The tiny reward model with its score head zeroed: every sequence scores 0."""
    model, tok = load_model(source, task="classifier", num_labels=1), load_tokenizer(source)
    with torch.no_grad():
        model.score.weight.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def args(rm: Path) -> list[str]:
    return ["--config", str(CONFIGS / "eval-rm-tiny.yaml"), f"model.path={rm}", "model.adapter_path=null"]


@pytest.mark.parametrize("rows, pairs", [(PAIRS, 3), (RANKED, 5)])  # ranked: 3 + 2 ordered pairs (one tie of ranks)
def test_tied_scores_are_counted_and_said_once(rows, pairs, tiny_dir, tmp_path, caplog):
    rm = constant_rm(tiny_dir("llama", classifier=True), tmp_path / "constant")
    with caplog.at_level(logging.WARNING):
        got = evaluate(tmp_path, "tied", rows, args(rm))
    assert got["pairs"] == pairs and got["ties"] == pairs and got["accuracy"] == 0.0
    said = [r.getMessage() for r in caplog.records if "exactly equal scores" in r.getMessage()]
    assert len(said) == 1 and f"{pairs} of {pairs} pair(s)" in said[0], said
    if rows is RANKED:
        assert got["kendall_tau"] == 0.0 and got["exact_match"] == 0.0


def test_a_scoring_model_has_no_ties_and_says_nothing(tiny_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        got = evaluate(tmp_path, "scored", PAIRS, args(tiny_dir("llama", classifier=True)))
    assert got["ties"] == 0 and got["rewards/chosen"] != got["rewards/rejected"]
    assert not [r for r in caplog.records if "exactly equal scores" in r.getMessage()]
