"""TRL-style reward functions go through unchanged: fn(prompts, completions, **kwargs) with dataset columns as
keyword arguments, several functions with weights, and a clear error for a signature that fits neither
convention. The functions below are written the way TRL's GRPO documentation writes them."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from alignkit.data import load_records
from alignkit.online import FunctionAnnotator
from alignkit.online.annotators import reward_convention
from alignkit.settings import ConfigError

TRL_REWARDS = textwrap.dedent('''
    import re

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    def correctness(prompts, completions, answer, **kwargs):
        responses = [c[0]["content"] for c in completions]
        return [2.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]

    def format_reward(completions, **kwargs):
        pattern = r"^<think>.*?</think>"
        return [1.0 if re.match(pattern, c) else None for c in completions]

    def seen(prompts, completions, **kwargs):
        global LAST
        LAST = {"prompts": prompts, "completions": completions, **kwargs}
        return [0.0] * len(completions)

    def three_positional(a, b, c):
        return 0.0
''')


@pytest.fixture
def trl_module(tmp_path, monkeypatch):
    (tmp_path / "ak_trl_rewards.py").write_text(TRL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("ak_trl_rewards", None)
    return importlib.import_module("ak_trl_rewards")


def test_conventions_are_detected(trl_module):
    assert reward_convention(trl_module.reward_len) == "trl"
    assert reward_convention(trl_module.correctness) == "trl"
    assert reward_convention(lambda prompt, response: 1.0) == "alignkit"
    assert reward_convention(lambda prompts, responses, metas: [1.0]) == "alignkit"
    with pytest.raises(ValueError, match=r"three_positional\(a, b, c\) fits neither convention: TRL's "
                                         r"fn\(prompts, completions, \*\*kwargs\).*alignkit's fn\(prompt, response"):
        FunctionAnnotator("ak_trl_rewards:three_positional")


def test_dataset_columns_reach_a_trl_function(trl_module, tmp_path):
    # a TRL-style prompt dataset with an extra `answer` column, read by the prompt reader
    path = tmp_path / "math.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "level": 1},
            {"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6", "level": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_records(str(path), "prompt")
    assert prompts[0].meta["columns"] == {"answer": "4", "level": 1}
    ann = FunctionAnnotator("ak_trl_rewards:correctness")
    s = ann.annotate([p.prompt for p in prompts], [" 4", "7"], [p.meta for p in prompts])
    assert s.values.tolist() == [2.0, 0.0]
    FunctionAnnotator("ak_trl_rewards:seen").annotate([p.prompt for p in prompts], ["a", "b"],
                                                      [p.meta for p in prompts])
    last = trl_module.LAST
    assert last["completions"] == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    assert last["answer"] == ["4", "6"] and last["level"] == [1, 2]
    assert last["prompts"] == [p.prompt for p in prompts]


def test_plain_text_completions_are_strings_and_none_is_a_failure(trl_module):
    s = FunctionAnnotator("ak_trl_rewards:format_reward").annotate(["q1", "q2"], ["<think>x</think> 4", "4"])
    assert s.values[0] == 1.0 and math.isnan(s.values[1]) and s.failed.tolist() == [False, True]
    r = FunctionAnnotator("ak_trl_rewards:reward_len").annotate(["q"], ["x" * 15])
    assert r.values.tolist() == [-5.0]


def test_several_functions_with_weights(trl_module):
    ann = FunctionAnnotator(["ak_trl_rewards:reward_len", "ak_trl_rewards:format_reward"], weights=[0.5, 2.0])
    s = ann.annotate(["q", "q"], ["<think>a</think>" + "x" * 4, "y" * 30])
    # item 0: len 20 -> 0 * 0.5 + 1 * 2 = 2; item 1: -10 * 0.5, format None (skipped, as TRL's nansum) = -5
    assert s.values.tolist() == [2.0, -5.0]
    assert s.metrics["rewards/reward_len/mean"] == -5.0 and s.metrics["rewards/format_reward/mean"] == 1.0
    with pytest.raises(ValueError, match="weights must be 2 finite number"):
        FunctionAnnotator(["ak_trl_rewards:reward_len", "ak_trl_rewards:format_reward"], weights=[1.0])


def test_config_accepts_a_list_and_rejects_a_bad_signature(trl_module):
    from alignkit.settings.online import AnnotatorSettings

    a = AnnotatorSettings(kind="function", function=["ak_trl_rewards:reward_len", "alignkit.rewards:digit_fraction"],
                          weights=[1.0, 3.0])
    assert a.arguments()["weights"] == [1.0, 3.0]
    # code outside alignkit.rewards is not imported while a config is read (issue 12): its signature is checked
    # when the user allows it (--allow-code -> check_code_allowed)
    from alignkit.settings.online import check_code_allowed

    bad = AnnotatorSettings(kind="function", function="ak_trl_rewards:three_positional")
    with pytest.raises(ConfigError, match=r"annotator\.function: reward function ak_trl_rewards:three_positional"):
        check_code_allowed(bad, allow_code=True)
    with pytest.raises(ConfigError, match=r"annotator\.weights: 1 weight\(s\) for 2 function"):
        AnnotatorSettings(kind="function", function=["ak_trl_rewards:reward_len", "ak_trl_rewards:reward_len"],
                          weights=[1.0])


def test_a_column_the_prompts_lack_is_refused_before_the_run_folder(trl_module, tmp_path, capsys):
    """`correctness(prompts, completions, answer, **kwargs)` on prompts without an 'answer' column: the run folder
    (config.yaml, base_model/, tensorboard/) was written and the first step stopped with "missing 1 required positional
    argument: 'answer'". Now one line naming the parameter and the columns the rows have, and nothing written."""
    from alignkit.cli import main

    ann = FunctionAnnotator("ak_trl_rewards:correctness")
    ann.check_columns({"answer", "level"}, "data.path")  # the column is there
    FunctionAnnotator("ak_trl_rewards:correctness", kwargs={"answer": "4"}).check_columns(set(), "data.path")
    FunctionAnnotator("ak_trl_rewards:reward_len").check_columns(set(), "data.path")  # **kwargs only: nothing needed
    with pytest.raises(ValueError, match=r"reward function ak_trl_rewards:correctness takes 'answer', which the prompt "
                                         r"rows of data.path do not have \(their other columns: \['solution'\]"):
        ann.check_columns({"solution"}, "data.path")
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": f" {2 * i}", "solution": str(2 * i)})
                            + "\n" for i in range(2)))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["-q", "grpo", "--allow-code", "model.path=tiny:llama", f"data.path={path}", "annotator.kind=function",
                 "annotator.function=ak_trl_rewards:correctness", f"output_dir={out}", "train.max_steps=1",
                 "method.prompts_per_step=2", "sampling.num_samples=2", "sampling.max_new_tokens=4"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit grpo")]
    assert len(err) == 1 and "annotator.function: reward function ak_trl_rewards:correctness takes 'answer'" in err[0]
    assert "['completion', 'solution']" in err[0] and not out.exists()


def test_a_column_the_prompts_lack_is_refused_by_the_library_trainer(trl_module, tiny_dir, tokenizer, tmp_path):
    """The same function given to GRPOTrainer in Python, over plain-string prompts: the trainer was built, train()
    started the trackers (tensorboard/ in output_dir) and the first step stopped with an AnnotatorError. Now the
    trainer refuses it when built, naming the parameter; nothing is written."""
    from alignkit.online import GRPOConfig, GRPOTrainer
    from alignkit.online.generation import SamplingConfig

    from .toy import PROMPTS, toy_policy

    cfg = GRPOConfig(steps=1, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=2))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"reward function ak_trl_rewards:correctness takes 'answer', which the prompt "
                                         r"rows of the prompts do not have \(their other columns: none"):
        GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS,
                    {"type": "function", "fn": "ak_trl_rewards:correctness"}, cfg, output_dir=out)
    assert not out.exists()


def test_annotate_records_read_back_as_prompts_pass_their_columns_as_trl_does(trl_module, tmp_path):
    """annotate's records.jsonl (prompt, chosen, rejected, margin, weight, id, meta) read back as prompts for an online
    command: TRL's GRPOTrainer passes every dataset column but prompt and completion to the reward functions, so a
    function with **kwargs gets chosen, rejected, margin, id and meta, as it would under TRL (weight is read as the
    prompt's weight); a function naming only what it uses gets that alone. Decided: kept as TRL's convention."""
    from alignkit.data import PreferenceRecord
    from alignkit.online.rounds import RECORDS_FILE, record_to_row

    recs = [PreferenceRecord("2+2=", " 4", " 5", margin=1.0, weight=0.5, id="p.jsonl:1 best(0,1)",
                             meta={"group": 0, "prompt_id": "p.jsonl:1"}),
            PreferenceRecord("3+3=", " 6", " 7", margin=2.0, id="p.jsonl:2 best(0,1)",
                             meta={"group": 1, "prompt_id": "p.jsonl:2"})]
    path = tmp_path / RECORDS_FILE
    path.write_text("".join(json.dumps(record_to_row(r)) + "\n" for r in recs))
    prompts = load_records(str(path), "prompt")
    assert [(p.prompt, p.weight) for p in prompts] == [("2+2=", 0.5), ("3+3=", 1.0)]
    FunctionAnnotator("ak_trl_rewards:seen").annotate([p.prompt for p in prompts], ["a", "b"], [p.meta for p in prompts])
    last = trl_module.LAST
    assert {k: v for k, v in last.items() if k not in ("prompts", "completions")} == {
        "chosen": [" 4", " 6"], "rejected": [" 5", " 7"], "margin": [1.0, 2.0],
        "id": ["p.jsonl:1 best(0,1)", "p.jsonl:2 best(0,1)"],
        "meta": [{"group": 0, "prompt_id": "p.jsonl:1"}, {"group": 1, "prompt_id": "p.jsonl:2"}]}
    s = FunctionAnnotator("ak_trl_rewards:reward_len").annotate([p.prompt for p in prompts], ["x" * 19, "x" * 20],
                                                                 [p.meta for p in prompts])
    assert s.values.tolist() == [-1.0, 0.0]  # -|20 - len|: the extra columns go to **kwargs, unused
