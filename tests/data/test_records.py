"""Record model: validation with ids in errors, conversational normalisation, views."""

from __future__ import annotations

import pytest

from alignkit.data import (DataError, PreferenceRecord, PromptRecord, RankedRecord, SFTRecord, UnpairedRecord,
                           convert, ranked_to_pairs, to_conversational)

CONV = [{"role": "user", "content": "Hi"}]
ASSISTANT = {"role": "assistant", "content": "Hello"}


def test_conversational_normalisation():
    r = SFTRecord(CONV, "Hello")
    assert r.completion == [{"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match="x.jsonl:4: 'completion' is a conversation but the prompt is plain text"):
        SFTRecord("Hi", [{"role": "assistant", "content": "Hello"}], id="x.jsonl:4")
    c = to_conversational(PreferenceRecord("Q", " a", " b"))
    assert c.prompt == [{"role": "user", "content": "Q"}] and c.rejected == [{"role": "assistant", "content": " b"}]


@pytest.mark.parametrize("make, message", [
    (lambda: SFTRecord("p", "  ", id="f:1"), "f:1: 'completion' is empty"),
    (lambda: PreferenceRecord("p", "a", "b", margin="big", id="f:2"), "f:2: 'margin' must be a finite number"),
    (lambda: RankedRecord("p", ["a", "b"], ranks=[1, 0], id="f:3"), "f:3: 'ranks' must be 2 non-decreasing"),
    (lambda: UnpairedRecord("p", "a", label=1, id="f:4"), "f:4: 'label' must be true/false"),
    (lambda: PromptRecord("", id="f:5"), "f:5: 'prompt' is empty"),
    (lambda: SFTRecord([], "a", id="f:6"), "f:6: 'prompt' must be a string or a non-empty list"),
    (lambda: SFTRecord("p", "a", weight=float("nan"), id="f:7"), "f:7: 'weight' must be a finite number >= 0"),
    # past float32's range: inf in the batch's weights, the run stopped at its first step blaming the learning rate
    (lambda: SFTRecord("p", "a", weight=1e39, id="f:7"), r"f:7: 'weight' must be a finite number >= 0, got 1e\+39 "
                                                         r"\(past 3.4e\+38, float32's largest"),
    (lambda: PromptRecord("p", weight=10 ** 400, id="f:7"), r"f:7: 'weight' must be a finite number >= 0, got 1000"),
    # a response repeating the whole conversational prompt (TRL rows with a 'prompt' column AND full conversations in
    # chosen / rejected): the prompt was read twice and its copy trained on, silently
    (lambda: PreferenceRecord(CONV, CONV + [ASSISTANT], [ASSISTANT], id="f:8"),
     r"f:8: 'chosen' starts with the whole prompt \(1 message\(s\)\), so the model would read the prompt twice"),
    (lambda: SFTRecord(CONV, CONV + [ASSISTANT], id="f:9"), "f:9: 'completion' starts with the whole prompt"),
    (lambda: RankedRecord(CONV, [[ASSISTANT], CONV + [ASSISTANT]], id="f:10"), "f:10: 'responses.1.' starts with"),
    # a completion of user turns only: nothing for the model to say (TRL's completions are assistant turns)
    (lambda: SFTRecord(CONV, [{"role": "user", "content": "And?"}], id="f:11"),
     r"f:11: 'completion' has no assistant message \(only user\), so there is nothing for the model to learn"),
    # a response starting with a user turn (chosen / rejected differing in the user's question, a completion holding
    # the next question): a token-boundary error blaming BPE merges, or, with a template that renders no generation
    # prompt, the user's turn trained as the assistant's
    (lambda: SFTRecord(CONV, [{"role": "user", "content": "And?"}, ASSISTANT], id="f:12"),
     r"f:12: 'completion' starts with a 'user' message, and a response is the assistant's reply: .* move "
     r"completion\[:1\] into the prompt"),
    (lambda: PreferenceRecord(CONV, [ASSISTANT], [{"role": "system", "content": "x"}, ASSISTANT], id="f:13"),
     r"f:13: 'rejected' starts with a 'system' message"),
    # empty user / assistant messages, anywhere (before: trained without a word: a lost question, an empty reply)
    (lambda: SFTRecord([*CONV, ASSISTANT, {"role": "user", "content": " \n"}], "a", id="f:14"),
     r"f:14: prompt\[2\] is an empty 'user' message: a lost question"),
    (lambda: SFTRecord([*CONV, {"role": "assistant", "content": ""}, *CONV], "a", id="f:15"),
     r"f:15: prompt\[1\] is an empty 'assistant' message: .*learns to stop at once"),
    (lambda: PreferenceRecord(CONV, "a", [{"role": "assistant", "content": "", "tool_calls": [{}]}], id="f:16"),
     r"f:16: rejected\[0\] is an empty 'assistant' message \(its tool_calls are dropped"),
    (lambda: SFTRecord(" ", "a", id="f:17"), r"f:17: 'prompt' is empty \(a lost question"),
])
def test_validation_errors(make, message):
    with pytest.raises(DataError, match=message):
        make()


def test_empty_system_developer_and_tool_messages_are_kept():
    """Sound data may hold them (an export's blank system prompt, a tool that returned nothing): rendered as they
    are, unlike an empty user or assistant message (refused: test_validation_errors)."""
    prompt = [{"role": "system", "content": ""}, {"role": "developer", "content": " "}, *CONV,
              {"role": "assistant", "content": "call"}, {"role": "tool", "content": ""}, *CONV]
    assert SFTRecord(prompt, "a").prompt == prompt


def test_ranked_to_pairs_skips_ties():
    r = RankedRecord("Q", ["a", "b", "c", "d"], ranks=[0, 1, 1, 3], weight=2.0, id="r")
    pairs = ranked_to_pairs(r)
    # C(4,2) = 6 pairs minus the tied (b, c)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert all(p.weight == 2.0 for p in pairs) and pairs[0].id == "r pair(0,1)"


def test_convert_views():
    pref = PreferenceRecord("Q", " a", " b", weight=0.5, id="p")
    assert convert([pref], "sft") == [SFTRecord("Q", " a", weight=0.5)]
    assert convert([pref], "unpaired") == [UnpairedRecord("Q", " a", True, 0.5), UnpairedRecord("Q", " b", False, 0.5)]
    assert convert([pref], "ranked") == [RankedRecord("Q", [" a", " b"], weight=0.5)]
    assert convert([pref], "prompt") == [PromptRecord("Q", weight=0.5)]
    assert convert([RankedRecord("Q", ["x", "y"])], "sft") == [SFTRecord("Q", "x")]
    with pytest.raises(DataError, match="p: cannot turn a 'sft' record into 'preference'"):
        convert([SFTRecord("Q", "x", id="p")], "preference")


def test_implicit_pairs_differing_in_a_user_turn_are_refused_at_their_row(tmp_path):
    """chosen / rejected conversations that differ in the user's last question (a join that paired replies to
    different questions): their shared prefix stopped before that question, so each response started with it, and
    tokenization stopped on "the tokenizer merged text across the boundary". Now the row is refused naming the
    response, the messages to move and that the pair answers different conversations."""
    import json

    from alignkit.data import load_records
    turn = [*CONV, ASSISTANT]
    row = {"chosen": turn + [{"role": "user", "content": "A joke?"}, {"role": "assistant", "content": "Ha"}],
           "rejected": turn + [{"role": "user", "content": "A poem?"}, {"role": "assistant", "content": "Roses"}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: 'chosen' starts with a 'user' message, .* answer different "
                                        r"conversations: fix the pair or drop it\)$"):
        load_records(path)


def test_a_response_repeating_the_prompt_is_refused_at_its_row(tmp_path):
    """The TRL-style file that meets it: a 'prompt' column beside chosen / rejected conversations that still hold
    the prompt. The read stops at the row, naming it and the fix; without the prompt column the same conversations
    are read with their shared first turn as the prompt (the preference-implicit reader), and a response that only
    follows the prompt is fine."""
    import json

    from alignkit.data import load_records
    row = {"prompt": CONV, "chosen": CONV + [ASSISTANT], "rejected": CONV + [{"role": "assistant", "content": "Go"}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: 'chosen' starts with the whole prompt .*remove the 'prompt' column"):
        load_records(path)
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "prompt"}) + "\n")
    (r,) = load_records(path)
    assert (r.prompt, r.chosen, r.rejected) == (CONV, [ASSISTANT], [{"role": "assistant", "content": "Go"}])
    follow = [ASSISTANT, {"role": "user", "content": "Hi"}, ASSISTANT]  # a response may itself hold later turns
    assert SFTRecord(CONV, follow).completion == follow
