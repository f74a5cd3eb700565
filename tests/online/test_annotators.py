"""Annotators: reward model vs a direct forward on hand-built text, Python functions (import, errors, failure
policy, meta), LLM judge parsing with a scripted judge and with a real tiny LM (all answers unparseable)."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from alignkit.online.annotators import (ANNOTATORS, AnnotatorArgumentError, AnnotatorError, FunctionAnnotator,
                                        RewardModelAnnotator, build_annotator)
from alignkit.online.judge import JudgeAnnotator
from .scripted import ScriptedJudge

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


# ---------------------------------------------------------------------------------------------- reward model

def test_reward_model_matches_direct_forward(tiny_dir, tokenizer):
    folder = tiny_dir("llama", classifier=True, num_labels=1)
    rm = RewardModelAnnotator(str(folder), batch_size=2, device="cpu")
    prompts = [CHAT, "The quick brown fox", CHAT]
    responses = ["4", " jumps over the lazy dog.", "It is four, I think."]
    scores = rm.annotate(prompts, responses)
    texts = [("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n", False),
             ("The quick brown fox jumps over the lazy dog.", True),
             ("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nIt is four, I think.<|im_end|>\n",
              False)]
    for i, (text, plain) in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=plain)["input_ids"] + ([tokenizer.eos_token_id] if plain else [])
        with torch.no_grad():
            want = rm.model(input_ids=torch.tensor([ids])).logits[0, 0]
        assert torch.allclose(scores.values[i], want, atol=1e-5), i
    assert not scores.failed.any() and scores.valid.all()
    assert scores.values.dtype == torch.float32


@pytest.mark.parametrize("config_pad", [5, None])
def test_reward_model_batches_score_as_one_at_a_time(tiny_dir, config_pad, caplog):
    """transformers pools a sequence classifier at the last token that is not its CONFIG's pad id. Batches were
    padded with the tokenizer's: a reward model whose config names another pad id (5 here; the tokenizer pads with
    0) scored every shorter response of a batch at a pad token (other scores than alone, without a word), and one
    whose config has none failed at the first annotation ("Cannot handle batch sizes > 1"). Now a batch scores
    as each response alone (a direct forward of its unpadded ids)."""
    rm = RewardModelAnnotator(str(tiny_dir("llama", classifier=True, num_labels=1)), batch_size=4, device="cpu")
    rm.model.config.pad_token_id = config_pad
    with caplog.at_level("WARNING", logger="alignkit.online.annotators"):
        rm = RewardModelAnnotator(rm.model, rm.tokenizer, batch_size=4)
    assert rm.tokenizer.pad_token_id == 0 != config_pad
    assert any("config has no pad_token_id" in r.getMessage() for r in caplog.records) == (config_pad is None)
    responses = ["4", " jumps over the lazy dog and keeps running far away", "It is four."]
    scores = rm.annotate(["The quick brown fox"] * 3, responses).values
    for i, r in enumerate(responses):
        with torch.no_grad():
            want = rm.model(input_ids=torch.tensor([rm.encode("The quick brown fox", r)[0]])).logits[0, 0]
        assert torch.allclose(scores[i], want, atol=1e-5), (i, scores[i], want)


def test_reward_model_truncation_and_label_check(tiny_dir):
    rm = RewardModelAnnotator(str(tiny_dir("llama", classifier=True, num_labels=1)), max_length=4)
    s = rm.annotate(["a long prompt with many words in it"], [" and a long answer too"])
    assert s.metrics["reward_model/truncated"] == 1.0
    assert len(rm.encode("a long prompt with many words in it", " and a long answer too")[0]) == 4
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModelAnnotator(str(tiny_dir("llama", classifier=True, num_labels=2)))


def test_reward_model_non_finite_score_stops(tiny_dir):
    """A reward model scoring NaN (fp16 overflow, a damaged head) was read as a failed score: the sample got weight 0
    and reward/failed did not count it, so a run trained on whatever the model still scored, without a word (and an
    inf score won every group). Now one line naming the score and the response."""
    rm = RewardModelAnnotator(str(tiny_dir("llama", classifier=True, num_labels=1)), device="cpu")
    with torch.no_grad():
        rm.model.score.weight[:] = float("nan")
    with pytest.raises(AnnotatorError, match=r"reward model .* scored nan for response 0 of 2 \(2 non-finite in all; "
                                             r"response ' four'\): its scores mean nothing"):
        rm.annotate([CHAT, CHAT], [" four", " 4"])


# ---------------------------------------------------------------------------------------------- function

REWARDS = textwrap.dedent('''
    def exact(prompt, response, meta):
        return float(response.strip() == meta["answer"])

    def lengths(prompts, responses):
        return [len(r) for r in responses]

    def maybe(prompt, response):
        return None if "?" in response else 1.0

    def boom(prompt, response):
        raise ZeroDivisionError("no")

    def wordy(prompt, response):
        return "high"
''')


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "ak_test_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ak_test_rewards"


def test_function_per_item_with_meta_and_batched(rewards_module):
    ann = FunctionAnnotator(f"{rewards_module}:exact")
    s = ann.annotate(["2+2?", "3+3?", "1+1?"], [" 4", "7", "2 "], [{"answer": "4"}, {"answer": "6"}, {"answer": "2"}])
    assert s.values.tolist() == [1.0, 0.0, 1.0]
    b = FunctionAnnotator(f"{rewards_module}:lengths", batched=True).annotate(["p", "q"], ["abc", "de"])
    assert b.values.tolist() == [3.0, 2.0]
    # conversational responses are scored on their text
    c = FunctionAnnotator(f"{rewards_module}:lengths", batched=True).annotate(
        [CHAT], [[{"role": "assistant", "content": "four"}]])
    assert c.values.tolist() == [4.0]


def test_function_failure_policy(rewards_module):
    skip = FunctionAnnotator(f"{rewards_module}:maybe").annotate(["p"] * 3, ["ok", "what?", "fine"])
    assert skip.failed.tolist() == [False, True, False]
    assert skip.values[0] == 1.0 and math.isnan(skip.values[1]) and skip.valid.tolist() == [True, False, True]
    assert skip.metrics["function/failures"] == 1.0
    dflt = FunctionAnnotator(f"{rewards_module}:maybe", on_failure="default", default_score=-1.0)
    assert dflt.annotate(["p"] * 2, ["what?", "ok"]).values.tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="default_score"):
        FunctionAnnotator(f"{rewards_module}:maybe", on_failure="default")


def test_function_errors_name_function_and_item(rewards_module):
    with pytest.raises(AnnotatorError, match=r"ak_test_rewards:boom failed on item 0 \(prompt 'p', response 'a'\)"
                                             r".*ZeroDivisionError"):
        FunctionAnnotator(f"{rewards_module}:boom").annotate(["p"], ["a"])
    with pytest.raises(AnnotatorError, match=r"wordy returned 'high' for item 0"):
        FunctionAnnotator(f"{rewards_module}:wordy").annotate(["p"], ["a"])
    with pytest.raises(ValueError, match="'module:function'"):
        FunctionAnnotator("no_colon_here")
    with pytest.raises(ValueError, match="cannot import module"):
        FunctionAnnotator("ak_no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        FunctionAnnotator(f"{rewards_module}:missing")


def test_function_scores_beyond_float32_and_numpy_scalars():
    """Rewards are kept in float32: a score of 1e39 (finite in Python, e.g. math.exp of a large value) became inf,
    every statistic of its group NaN, and the run stopped blaming "the training loss" and a learning rate too
    high. Now an AnnotatorError naming the function, the value and the item. And a numpy scalar (np.float32(0.5),
    what numpy-based reward code returns; TRL takes it) was refused as "not a finite number"; now it is a score."""
    np = pytest.importorskip("numpy")

    def huge(prompt, response):
        return 1e39 if response == "b" else 1.0

    with pytest.raises(AnnotatorError, match=r"reward function .*huge: score 1e\+39 for item 1 is beyond float32's "
                                             r"range \(\|score\| <= 3.4e\+38\), in which rewards are kept \(1 such "
                                             r"item\(s\) of 2\); scale the reward down"):
        FunctionAnnotator(huge).annotate(["p", "p"], ["a", "b"])
    weighted = FunctionAnnotator([lambda p, r: 3e38, lambda p, r: 3e38])  # each fits, their sum does not
    with pytest.raises(AnnotatorError, match="score 6e\+38 for item 0 is beyond float32's range"):
        weighted.annotate(["p"], ["a"])

    def numpy_score(prompt, response):
        return np.float32(0.5) if response == "a" else np.int64(2)

    assert FunctionAnnotator(numpy_score).annotate(["p", "p"], ["a", "b"]).values.tolist() == [0.5, 2.0]


def test_pointwise_prefer_and_registry(rewards_module):
    ann = build_annotator({"type": "function", "fn": f"{rewards_module}:lengths", "batched": True})
    assert ann.prefer("p", "long answer", "short") == 0
    assert ann.prefer("p", "ab", "abcd") == 1
    assert ann.prefer("p", "ab", "cd") is None  # tie
    assert set(ANNOTATORS) >= {"reward_model", "function", "judge"}
    with pytest.raises(KeyError, match="valid names"):
        build_annotator({"type": "oracle"})


# ---------------------------------------------------------------------------------------------- judge

def judge_script(text: str) -> str:
    if "Response A: twice" in text:  # pairwise, two winners named
        return "Winner: A. On reflection, Winner: B"
    if "Response A:" in text:  # pairwise: the better is the one saying "good"
        return "Winner: A" if text.index("good") < text.index("bad") else "Winner: B"
    for key, reply in (("good", "Thoughts... Score: 9"), ("bad", "Score: 2"), ("huge", "Score: 42"),
                       ("twice", "Score: 3, no: Score: 8"), ("again", "Score: 7. Final Score: 7.0")):
        if f"Response: {key}" in text:
            return reply
    return "I cannot rate this."


def test_judge_parses_normalises_and_counts_failures(tokenizer):
    model = ScriptedJudge(tokenizer, judge_script)
    judge = JudgeAnnotator(model, tokenizer, batch_size=3)
    s = judge.annotate(["q1", CHAT, "q3", "q4"], ["good", "bad", "meh", "huge"])
    assert s.values[0].item() == pytest.approx((9 - 1) / 9)
    assert s.values[1].item() == pytest.approx((2 - 1) / 9)
    assert math.isnan(s.values[2]) and math.isnan(s.values[3])
    assert s.failed.tolist() == [False, False, True, True]
    assert s.metrics["judge/parse_failures"] == 1.0 and s.metrics["judge/out_of_range"] == 1.0
    assert s.metrics["judge/failure_rate"] == 0.5
    assert s.meta[2] == {"judge_output": "I cannot rate this.", "judge_error": "unparseable"}
    # the rubric went in as a chat turn with the prompt and response filled in
    assert model.seen[1].startswith("<|im_start|>user\nRate how helpful")
    assert "Question: user: What is 2 + 2?\nResponse: bad" in model.seen[1]
    raw = JudgeAnnotator(model, tokenizer, normalize=False, on_failure="default", default_score=5.0)
    assert raw.annotate(["q"] * 3, ["good", "meh", "bad"]).values.tolist() == [9.0, 5.0, 2.0]
    # two different verdicts in one answer: no single score (the first, 3, was taken); the same one twice is fine
    two = raw.annotate(["q"] * 2, ["twice", "again"])
    assert two.values.tolist() == [5.0, 7.0] and two.failed.tolist() == [True, False]
    assert two.meta[0]["judge_error"] == "ambiguous" and two.metrics["judge/parse_failures"] == 1.0


def test_judge_pairwise(tokenizer):
    judge = JudgeAnnotator(ScriptedJudge(tokenizer, judge_script), tokenizer)
    assert judge.prefer_batch(["q", "q"], ["good", "bad"], ["bad", "good"]) == [0, 1]
    assert judge.prefer_batch(["q"], ["twice"], ["good"]) == [None]  # both winners named: undecided (was A)


def test_judge_template_checked(tokenizer):
    with pytest.raises(ValueError, match=r"\{response\}"):
        JudgeAnnotator(ScriptedJudge(tokenizer, judge_script), tokenizer, template="Rate {prompt}")


def test_real_tiny_judge_all_unparseable(tiny_dir):
    judge = JudgeAnnotator(str(tiny_dir("llama")), max_new_tokens=4)
    s = judge.annotate(["q1", "q2"], ["a", "b"])
    assert s.failed.all() and torch.isnan(s.values).all()
    assert s.metrics["judge/parse_failures"] == 2.0
    assert all("judge_output" in m for m in s.meta)


def test_judge_chat_true_needs_a_chat_template(tokenizer):
    """chat=True with a tokenizer that has no chat template was dropped silently (plain text sent). Now a ValueError;
    the default (None, auto) uses the template when there is one and plain text otherwise, as before."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    model = ScriptedJudge(tokenizer, judge_script)
    with pytest.raises(ValueError, match=r"JudgeAnnotator: chat: true .* has none .*remove chat \(auto") as e:
        JudgeAnnotator(model, plain, chat=True)
    # the error names its argument (the CLI's annotator.chat, with no check of its own before the constructor's)
    assert isinstance(e.value, AnnotatorArgumentError) and e.value.key == "chat"
    assert e.value.reason.startswith("true sends the judge's questions")
    assert JudgeAnnotator(model, plain).chat is False and JudgeAnnotator(model, plain, chat=False).chat is False
    assert JudgeAnnotator(model, tokenizer).chat is True and JudgeAnnotator(model, tokenizer, chat=False).chat is False


def test_function_numpy_bools_weights_and_a_non_list_are_checked():
    """A numpy bool (np.bool_, what `np.array(a) == b` gives; TRL takes it as 1.0 / 0.0) and a 0-d numpy array were
    refused as "returned True; return a finite number". A NaN weight made every score NaN, which the feedback
    builders dropped as unscored without a word (failed stayed False), an inf one stopped as "beyond float32's
    range" blaming the score, and a bool weight was taken as 1 / 0. A TRL-style function returning one float
    instead of a list stopped with a raw TypeError. Now scores as TRL, and one line for each of the others."""
    np = pytest.importorskip("numpy")

    def same(prompt, response):
        return np.array(response) == np.array("a")

    def zero_d(prompt, response):
        return np.array(2.5)

    assert FunctionAnnotator(same).annotate(["p", "p"], ["a", "b"]).values.tolist() == [1.0, 0.0]
    assert FunctionAnnotator(zero_d).annotate(["p"], ["a"]).values.tolist() == [2.5]
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"function annotator .*: weights must be 2 finite number\(s\), one per "
                                             r"function, got \[1\.0, " + repr(bad)):
            FunctionAnnotator([same, zero_d], weights=[1.0, bad])

    def one_float(prompts, completions, **kwargs):
        return 1.0

    with pytest.raises(AnnotatorError, match=r"reward function .*one_float returned a float, not a list of 2 "
                                             r"score\(s\), one per item"):
        FunctionAnnotator(one_float).annotate(["p", "q"], ["a", "b"])


def test_reward_model_truncation_is_said_and_kept_within_its_positions(tiny_dir, tokenizer, caplog):
    """A prompt + response over max_length was scored on its last max_length tokens and only counted in the
    reward_model/truncated metric: a response longer than the limit was scored as its tail, without the prompt and
    without a word. And max_length (default 1024) above the reward model's positions (512 here) let a long
    sequence run past them (RoPE: scores of positions it never saw; GPT-2: an IndexError). Now the limit is the
    smaller of the two, and each annotate call with cut items logs one warning: how many, whether responses
    themselves were cut (reward_model/response_truncated), the limit and the fix. Checked against the model
    called on the hand-built text's last tokens."""
    folder = tiny_dir("llama", classifier=True, num_labels=1)
    rm = RewardModelAnnotator(str(folder), max_length=12, device="cpu")
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    responses = [" yes", " a b c d e f g h i j k l m n o p q r s t"]

    def direct(text: str, keep: int) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        assert len(ids) > keep
        with torch.no_grad():
            return rm.model(input_ids=torch.tensor([ids[-keep:]])).logits[0, 0]

    with caplog.at_level("WARNING", logger="alignkit.online.annotators"):
        s = rm.annotate([prompt, prompt], responses)
    for i, r in enumerate(responses):
        assert torch.allclose(s.values[i], direct(prompt + r, 12), atol=1e-5), i
    assert s.metrics["reward_model/truncated"] == 2.0 and s.metrics["reward_model/response_truncated"] == 1.0
    said = [r.getMessage() for r in caplog.records if "reward model" in r.getMessage()]
    assert len(said) == 1, said
    assert ("2 of 2 item(s) longer than 12 tokens (annotator.max_length) were scored on their last 12 tokens; in 1 "
            "of them (e.g. item 1) the response itself was cut, so its score is of the response's end alone"
            in said[0]), said[0]
    assert "raise annotator.max_length" in said[0]

    caplog.clear()
    long = RewardModelAnnotator(rm.model, tokenizer, max_length=None)
    assert long.limit == 512
    text = " ".join(["word"] * 600)
    with caplog.at_level("WARNING", logger="alignkit.online.annotators"):
        s = long.annotate(["q"], [" " + text])
    assert torch.allclose(s.values[0], direct("q " + text, 512), atol=1e-4)
    assert "longer than 512 tokens (the reward model's max_position_embeddings)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignkit.online.annotators"):
        s = rm.annotate(["q"], [" yes"])
    assert s.metrics["reward_model/truncated"] == 0.0 and not caplog.records


def test_judge_score_cut_at_max_new_tokens_is_a_failure(tokenizer, caplog):
    """A judge answer cut at max_new_tokens inside its score ("Score: 7" or "Score: 7." of "Score: 7.5") was read as
    the number it had so far (7 instead of 7.5), without a word. Now a score that only digits or a point follow in
    an answer cut at max_new_tokens counts as a failure ("cut_off", in judge/parse_failures), and the warning names
    max_new_tokens; the same score with room to finish, or followed by more text in a cut answer, is read."""
    reply = {"half": "Score: 7.5", "half-then": "Score: 7.5 because it is right and clear and complete"}

    def script(text: str) -> str:
        return next(v for k, v in reply.items() if text.rstrip().endswith(f"Response: {k}")
                    or f"Response: {k}\n" in text)

    ids = tokenizer("Score: 7.5", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:-2]) == "Score: 7" and tokenizer.decode(ids[:-1]) == "Score: 7."
    for keep, shown in ((len(ids) - 2, "Score: 7"), (len(ids) - 1, "Score: 7.")):
        cut = JudgeAnnotator(ScriptedJudge(tokenizer, script, cut=True), tokenizer, normalize=False, max_new_tokens=keep)
        caplog.clear()
        with caplog.at_level("WARNING", logger="alignkit.online.judge"):
            s = cut.annotate(["q"], ["half"])
        assert s.meta[0]["judge_output"] == shown and s.failed.tolist() == [True], s
        assert s.meta[0]["judge_error"] == "cut_off" and s.metrics["judge/parse_failures"] == 1.0
        assert "cut at max_new_tokens" in caplog.text and "raise annotator.max_new_tokens" in caplog.text
    roomy = JudgeAnnotator(ScriptedJudge(tokenizer, script, cut=True), tokenizer, normalize=False, max_new_tokens=64)
    assert roomy.annotate(["q"], ["half"]).values.tolist() == [7.5]
    later = JudgeAnnotator(ScriptedJudge(tokenizer, script, cut=True), tokenizer, normalize=False, max_new_tokens=len(ids) + 3)
    s = later.annotate(["q"], ["half-then"])
    assert s.values.tolist() == [7.5] and s.meta[0]["judge_output"].startswith("Score: 7.5 ")


def test_judge_pair_failures_and_one_sided_verdicts_are_said(tokenizer, caplog):
    """Pairwise answers naming no single winner were only counted (judge/pair_parse_failures) and logged at INFO by
    judge_pairs; a judge that names the same position every time (position bias: with the coin-flipped order its
    preferences are coin flips) went unnoticed. Now a warning for each, and judge/pair_first_wins counts the
    verdicts for the response shown first."""
    always_a = JudgeAnnotator(ScriptedJudge(tokenizer, lambda t: "Winner: A"), tokenizer)
    with caplog.at_level("WARNING", logger="alignkit.online.judge"):
        assert always_a.prefer_batch(["q"] * 8, ["good", "bad"] * 4, ["bad", "good"] * 4) == [0] * 8
    assert always_a.last_pair_metrics == {"judge/pair_parse_failures": 0.0, "judge/pair_first_wins": 8.0}
    assert "named A, the response shown first, in all 8 decided comparison(s)" in caplog.text
    caplog.clear()
    fair = JudgeAnnotator(ScriptedJudge(tokenizer, judge_script), tokenizer)
    with caplog.at_level("WARNING", logger="alignkit.online.judge"):
        assert fair.prefer_batch(["q"] * 8, ["good", "bad"] * 4, ["bad", "good"] * 4) == [0, 1] * 4
        assert fair.prefer_batch(["q"] * 2, ["twice", "good"], ["good", "bad"]) == [None, 0]
    assert fair.last_pair_metrics == {"judge/pair_parse_failures": 1.0, "judge/pair_first_wins": 1.0}
    assert "1/2 pairwise answer(s) name no single winner" in caplog.text and "all 8" not in caplog.text


def test_function_none_scores_are_logged(caplog):
    """An item every function returned None for was only counted (function/failures) and, with on_failure skip,
    dropped from the feedback without a word (TRL warns: "All reward functions returned None"); an item some of
    several functions returned None for got the weighted sum of the others (TRL's NaN-skipping sum), documented
    but not logged. Now a warning for the first (function, count, an item, the policy) and an INFO line for the
    second (which functions, an item)."""

    def maths(prompt, response):
        return 1.0 if prompt == "maths" else None

    def code(prompt, response):
        return 2.0 if prompt == "code" else None

    ann = FunctionAnnotator([maths, code], weights=[1.0, 3.0])
    with caplog.at_level("INFO", logger="alignkit.online.annotators"):
        s = ann.annotate(["maths", "code", "poetry"], ["a", "b", "c"])
    assert s.values[:2].tolist() == [1.0, 6.0] and math.isnan(s.values[2]) and s.failed.tolist() == [False, False, True]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "1 of 3 item(s) (e.g. item 2) got None from every reward function" in warned[0]
    assert "on_failure 'skip': left out of the feedback" in warned[0]
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any("2 of 3 item(s) scored by only some of the 2 reward functions (e.g. item 0: None from "
               in m and "code" in m and "weighted sum of the others" in m for m in info), info
    caplog.clear()
    with caplog.at_level("INFO", logger="alignkit.online.annotators"):
        FunctionAnnotator(maths).annotate(["maths", "maths"], ["a", "b"])
    assert not caplog.records


def test_functions_of_the_same_name_keep_their_own_metrics(tmp_path, monkeypatch):
    """Two reward functions of the same name (pkg_a:score and pkg_b:score, or one function given twice) shared
    rewards/score/mean and /std: the second overwrote the first's, so the metrics showed one function as both.
    Now a clashing name is the module-qualified one (rewards/pkg_a.score/mean), and the same function twice is
    numbered (_1, _2); a name without a clash stays TRL's (the function's name)."""
    (tmp_path / "ak_pkg_a.py").write_text("def score(prompt, response):\n    return 1.0\n")
    (tmp_path / "ak_pkg_b.py").write_text("def score(prompt, response):\n    return 3.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = FunctionAnnotator(["ak_pkg_a:score", "ak_pkg_b:score", "alignkit.rewards:digit_fraction"]
                          ).annotate(["p"], ["a1"]).metrics
    assert m["rewards/ak_pkg_a.score/mean"] == 1.0 and m["rewards/ak_pkg_b.score/mean"] == 3.0
    assert m["rewards/digit_fraction/mean"] == 0.5 and "rewards/score/mean" not in m
    twice = FunctionAnnotator(["ak_pkg_a:score", "ak_pkg_a:score"], weights=[1.0, 2.0]).annotate(["p"], ["a"])
    assert twice.values.tolist() == [3.0]
    assert set(twice.moments) == {"rewards/ak_pkg_a.score_1", "rewards/ak_pkg_a.score_2"}


@pytest.mark.parametrize("n_fns", [1, 2])
def test_function_annotator_scores_no_items(n_fns):
    """annotate([], []) crashed (per_function: a reshape of 0 elements to (0, -1)); now empty scores, (0, n_fns)."""
    annotator = FunctionAnnotator([lambda prompt, response: float(len(response))] * n_fns)
    scores = annotator.annotate([], [])
    assert scores.values.shape == (0,) and tuple(scores.per_function.shape) == (0, n_fns)
    two = annotator.annotate(["p", "q"], ["a", "bb"])
    assert two.per_function.tolist() == [[1.0] * n_fns, [2.0] * n_fns]
