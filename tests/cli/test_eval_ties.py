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


SAME_START = " The answer, after some thought and a careful look at every part of the question, is"
CUT_SAME = [{"prompt": "Is the sky green?", "chosen": SAME_START + " no.", "rejected": SAME_START + " yes."},
            {"prompt": "Is ice cold?", "chosen": SAME_START + " yes.", "rejected": SAME_START + " no, never."}]
CUT = ["data.max_length=20", "data.max_prompt_length=10"]  # room for < 10 completion tokens: SAME_START is longer


def dpo_args(tiny_dir, tmp_path) -> list[str]:
    from tests.cli.test_eval_weighted import CONFIGS as configs, lora_policy

    base = tiny_dir("llama")
    return ["--config", str(configs / "eval-dpo-tiny.yaml"), f"model.path={base}",
            f"model.adapter_path={lora_policy(base, tmp_path / 'lora')}"]


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_pairs_cut_to_identical_tokens_are_left_out_of_every_figure(kind, tiny_dir, tmp_path, caplog, capsys):
    """Two pairs that differ only past data.max_length among three that do not. Before: they were scored (a tie and
    a zero margin each: reward accuracy 3 of 5 at best), with a tokenization warning only. Now every figure equals
    the one of the three distinct pairs evaluated alone, and `cut_identical` says 2."""
    given = [*(args(tiny_dir("llama", classifier=True)) if kind == "reward" else dpo_args(tiny_dir, tmp_path)), *CUT]
    with caplog.at_level(logging.WARNING):
        got = evaluate(tmp_path, "mixed", [CUT_SAME[0], *PAIRS, CUT_SAME[1]], given)
    assert "  cut_identical          2\n" in capsys.readouterr().out  # the printed table
    alone = evaluate(tmp_path, "distinct", PAIRS, given)
    assert got["cut_identical"] == 2 and got["pairs"] == 3 and alone["cut_identical"] == 0
    assert {k: v for k, v in got.items() if k not in ("cut_identical", "data")} == {
        k: v for k, v in alone.items() if k not in ("cut_identical", "data")}
    said = [r.getMessage() for r in caplog.records if "left out of every figure" in r.getMessage()]
    assert len(said) == 1 and "2 of 5 pair(s)" in said[0] and "data.max_length=20" in said[0], said
    if kind == "reward":
        assert got["ties"] == 0


def test_every_pair_cut_to_identical_tokens_is_refused_in_one_line(tiny_dir, tmp_path, capsys):
    from tests.cli.test_eval_weighted import write
    from alignkit.cli import main

    data, out = write(tmp_path / "cut.jsonl", CUT_SAME), tmp_path / "eval-cut"
    capsys.readouterr()
    code = main(["-q", "eval", f"data.path={data}", f"output_dir={out}", *args(tiny_dir("llama", classifier=True)),
                 *CUT])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit ")]
    assert code == 2 and len(err) == 1, err
    assert str(data) in err[0] and "data.max_length=20" in err[0] and "raise data.max_length" in err[0], err
    assert not out.exists()


def test_ranked_replies_cut_to_identical_tokens_are_no_pair(tiny_dir, tmp_path):
    """Replies 0 and 1 of a ranked record differ only past data.max_length. Before: they were scored as an ordered
    pair (a tie: Kendall's tau (+-2 + 0) / 3, never exact). Now they are no pair, in the pair figures
    (`cut_identical` 1) and in the ranking ones: the record's tau and exact match are those of reply 0 against
    reply 2 alone (both remaining pairs have the same two scores)."""
    rm = args(tiny_dir("llama", classifier=True))
    row = {"prompt": "Is the sky green?", "responses": [SAME_START + " no.", SAME_START + " yes.", " A chair."],
           "ranks": [0, 1, 2]}
    got = evaluate(tmp_path, "ranked-cut", [row], [*rm, *CUT])
    alone = evaluate(tmp_path, "ranked-two", [{**row, "responses": [row["responses"][0], row["responses"][2]],
                                               "ranks": [0, 1]}], [*rm, *CUT])
    assert (got["pairs"], got["cut_identical"], got["ties"], got["prompts"]) == (2, 1, 0, 1), got
    assert abs(alone["kendall_tau"]) == 1.0
    assert (got["kendall_tau"], got["exact_match"], got["accuracy"]) == (
        alone["kendall_tau"], alone["exact_match"], alone["accuracy"])


def test_every_pair_cut_to_identical_tokens_is_refused_before_the_run_folder(tiny_dir, tmp_path, capsys):
    """The cut-identical pairs are found once (`check_cut_identical`, called by eval itself, not by `tokenize` and
    again by eval): all of them cut so is still one line and no output folder."""
    from alignkit.cli import main
    from tests.cli.test_eval_weighted import write

    out = tmp_path / "eval-all-cut"
    assert main(["-q", "eval", f"data.path={write(tmp_path / 'cut.jsonl', CUT_SAME)}", f"output_dir={out}",
                 *args(tiny_dir("llama", classifier=True)), *CUT]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "every one of the 2 pair(s)" in err and "nothing is left to prefer" in err, err
    assert not out.exists()
