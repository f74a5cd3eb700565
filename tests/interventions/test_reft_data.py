"""ReFT data: boundary in token space, labels masked on prompt and pad, locations for both padding sides."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.reft_data import (IGNORE_INDEX, ReftDataCollator, encode_prompt_response, encode_prompts,
                                     make_classification_data_module, make_last_position_supervised_data_module,
                                     make_multiple_position_supervised_data_module)


def pieces(tok, text):
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_boundary_in_token_space(tokenizer):
    # 'Question: what?' + ' Answer: Paris.' -> Question | : | Ġwhat | ? || ĠAnswer | : | ĠParis | .
    assert pieces(tokenizer, "Question: what? Answer: Paris.") == ["Question", ":", "Ġwhat", "?", "ĠAnswer", ":",
                                                                   "ĠParis", "."]
    ids, n = encode_prompt_response(tokenizer, "Question: what?", " Answer: Paris.")
    assert n == 4
    assert len(ids) == 9 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n:]) == " Answer: Paris.<|eos|>"


def test_straddling_token_names_the_record(tokenizer):
    # the space ends the prompt but 'ĠAnswer' is one token: the prompt's tokens are not a prefix
    with pytest.raises(ValueError, match=r"record 3: token 4 .*straddles"):
        encode_prompt_response(tokenizer, "Question: what? ", "Answer: Paris.", index=3)
    with pytest.raises(ValueError, match="record 1"):
        make_last_position_supervised_data_module(tokenizer, ["a", "Question: what? "], [" b", "Answer: x"])


def test_chat_template_boundary(tokenizer):
    ids, n = encode_prompt_response(tokenizer, "hi", "yo", use_chat_template=True)
    assert tokenizer.decode(ids[:n]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids[n:]) == "yo<|im_end|>\n<|eos|>"
    enc = encode_prompts(tokenizer, ["hi"], use_chat_template=True)
    assert enc["input_ids"][0].tolist() == ids[:n]  # generation sees the same prompt tokens as training


def test_collator_right_padding(tokenizer):
    mod = make_last_position_supervised_data_module(tokenizer, ["Question: what?", "Hello!"],
                                                    [" Answer: Paris.", " How"], num_interventions=2)
    ds, coll = mod["train_dataset"], mod["data_collator"]
    batch = coll([ds[0], ds[1]])
    # row 0: 4 prompt + 4 response + eos = 9 tokens. row 1: 'Hello' '!' | 'ĠHow' eos = 4 tokens.
    assert pieces(tokenizer, "Hello! How") == ["Hello", "!", "ĠHow"]
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"].tolist() == [[1] * 9, [1] * 4 + [0] * 5]
    assert batch["intervention_locations"].tolist() == [[[3], [3]], [[1], [1]]]
    lab = batch["labels"]
    assert lab[0, :4].tolist() == [IGNORE_INDEX] * 4 and (lab[0, 4:] != IGNORE_INDEX).all()
    assert lab[1].tolist()[:2] == [IGNORE_INDEX] * 2 and lab[1, 4:].tolist() == [IGNORE_INDEX] * 5
    assert lab[1, 3].item() == tokenizer.eos_token_id
    assert set(batch) == {"input_ids", "attention_mask", "labels", "intervention_locations"}


def test_collator_left_padding_f1_l1(tokenizer):
    mod = make_multiple_position_supervised_data_module(tokenizer, ["Question: what?", "Hello!"],
                                                        [" Answer: Paris.", " How"], positions="f1+l1",
                                                        padding_side="left")
    batch = mod["data_collator"]([mod["train_dataset"][0], mod["train_dataset"][1]])
    # row 1 is 4 tokens in a width of 9: starts at 5; prompt tokens at 5, 6
    assert batch["attention_mask"][1].tolist() == [0] * 5 + [1] * 4
    assert batch["intervention_locations"].tolist() == [[[0, 3]], [[5, 6]]]
    assert batch["labels"][1].tolist()[:7] == [IGNORE_INDEX] * 7
    assert batch["input_ids"][1, 5].item() == tokenizer.convert_tokens_to_ids("Hello")


def test_split_weights_locations(tokenizer):
    mod = make_multiple_position_supervised_data_module(tokenizer, ["Question: what?"], [" Answer: Paris."],
                                                        positions="f2+l2", num_interventions=2,
                                                        share_weights=False)
    batch = mod["data_collator"]([mod["train_dataset"][0]])
    assert batch["intervention_locations"].tolist() == [[[0, 1], [2, 3]]]


def test_classification_module(tokenizer):
    mod = make_classification_data_module(tokenizer, ["Hello!", "Question: what?"], [1, 0], positions="l1",
                                          padding_side="left")
    batch = mod["data_collator"]([mod["train_dataset"][0], mod["train_dataset"][1]])
    assert batch["labels"].tolist() == [1, 0]
    assert batch["intervention_locations"].tolist() == [[[3]], [[3]]]  # width 4: last token of each row


def test_max_length_keeps_prompt(tokenizer):
    ids, n = encode_prompt_response(tokenizer, "Question: what?", " Answer: Paris.", max_length=6)
    assert n == 4 and len(ids) == 6
    with pytest.raises(ValueError, match="record 0: the prompt alone"):
        encode_prompt_response(tokenizer, "Question: what?", " Answer", max_length=4)


def test_collator_rejects_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        ReftDataCollator(pad_token_id=0, num_interventions=1, padding_side="middle")


class CountingTokenizer:
    """`tokenizer`, counting its calls per text (attributes read through)."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, {}

    def __call__(self, text, **kw):
        self.calls[text] = self.calls.get(text, 0) + 1
        return self.inner(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_classification_texts_are_tokenized_once_and_cut_as_the_tokenizer_cuts(tokenizer, monkeypatch, side):
    """A text that reached max_length was tokenized a second time, untruncated, to tell whether it had been cut. Now
    each text is tokenized once, whole, and an over-long one cut from that encoding: the ids are the tokenizer's own
    truncation (tokenizer(text, truncation=True, max_length=...)) and `truncated` names the texts longer than
    max_length (not one that fits exactly)."""
    from alignkit.data.reft_data import ClassificationReftDataset, TruncationAsTokenizer

    monkeypatch.setattr(tokenizer, "truncation_side", side)
    texts = ["0 1 2 3 4 5 6 7 8 9", "2 3", "0 1 2 3", "Hello world, what is 12?"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[2] == 4 and lengths[0] > 4 and lengths[3] > 4 and lengths[1] < 4
    counting = CountingTokenizer(tokenizer)
    ds = ClassificationReftDataset(counting, texts, [1, 0, 1, 0], max_length=4)
    assert {t: counting.calls.get(t, 0) for t in texts} == dict.fromkeys(texts, 1)
    assert set(counting.calls) - set(texts) == {TruncationAsTokenizer.PROBE}  # read once, for the whole dataset
    assert [ds[i]["input_ids"].tolist() for i in range(4)] == [
        tokenizer(t, truncation=True, max_length=4)["input_ids"] for t in texts]
    assert ds.truncated == [0, 3] and [ds[i]["prompt_length"] for i in range(4)] == [4, lengths[1], 4, 4]
    whole = ClassificationReftDataset(tokenizer, texts, [1, 0, 1, 0])
    assert [whole[i]["input_ids"].tolist() for i in range(4)] == [tokenizer(t)["input_ids"] for t in texts]
    assert whole.truncated == []
