"""Collators: padding side, masks and labels, the 2B preference layout, ranked groups, packing."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import (IGNORE_INDEX, PackedSFTCollator, PreferenceCollator, PromptCollator, RankedCollator,
                           SFTCollator)

PAD = 0
A = {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1], "weight": 2.0}
B = {"input_ids": [8, 9, 10, 11, 12], "completion_mask": [0, 0, 0, 1, 1], "weight": 0.5}


def test_sft_right_padding():
    b = SFTCollator(PAD)([A, B])
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, 11, 12]]
    assert b["position_ids"][0, :3].tolist() == [0, 1, 2]
    assert b["weight"].tolist() == [2.0, 0.5] and b["weight"].dtype == torch.float32


def test_sft_left_padding_and_multiple():
    b = SFTCollator(PAD, padding_side="left", pad_to_multiple_of=4)([A, {**B, "label": True}])
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"][0].tolist() == [0] * 5 + [5, 6, 7]
    assert b["completion_mask"][0].tolist() == [0] * 6 + [1, 1]
    assert b["position_ids"][0].tolist() == [0] * 5 + [0, 1, 2]  # real tokens count from 0
    assert b["labels"][1].tolist() == [-100] * 6 + [11, 12]


def test_preference_2b_layout():
    feats = [{"chosen_input_ids": [1, 2, 3], "chosen_completion_mask": [0, 1, 1],
              "rejected_input_ids": [1, 2, 4, 4], "rejected_completion_mask": [0, 1, 1, 1], "weight": 1.0, "margin": 3.0},
             {"chosen_input_ids": [7, 8], "chosen_completion_mask": [0, 1],
              "rejected_input_ids": [7, 9], "rejected_completion_mask": [0, 1], "weight": 0.25, "margin": None}]
    b = PreferenceCollator(PAD)(feats)
    # rows 0..B-1 chosen, rows B..2B-1 rejected, example order kept in both halves
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [7, 8, 0, 0], [1, 2, 4, 4], [7, 9, 0, 0]]
    assert b["labels"][2].tolist() == [IGNORE_INDEX, 2, 4, 4]
    assert b["weight"].tolist() == [1.0, 0.25] and b["margin"].tolist() == [3.0, 0.0]


def test_ranked_groups():
    feats = [{"input_ids": [[1, 2], [1, 3], [1, 4, 4]], "completion_mask": [[0, 1], [0, 1], [0, 1, 1]],
              "ranks": [0, 1, 1], "weight": 1.0},
             {"input_ids": [[5, 6], [5, 7]], "completion_mask": [[0, 1], [0, 1]], "ranks": [0, 1], "weight": 2.0}]
    b = RankedCollator(PAD)(feats)
    assert b["input_ids"].shape == (5, 3)
    assert b["input_ids"][3].tolist() == [5, 6, 0]
    assert b["group_index"].tolist() == [0, 0, 0, 1, 1]
    assert b["position_in_group"].tolist() == [0, 1, 2, 0, 1]
    assert b["rank"].tolist() == [0, 1, 1, 0, 1] and b["num_responses"].tolist() == [3, 2]
    table = torch.full((2, 3), float("-inf"))
    table[b["group_index"], b["position_in_group"]] = torch.arange(5.0)
    assert table.tolist() == [[0, 1, 2], [3, 4, float("-inf")]]


def test_packed_sft_matches_padded():
    b = PackedSFTCollator()([A, B])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 8] and b["cu_seq_lens"].dtype == torch.int32
    assert b["max_seq_len"] == 5 and b["sequence_index"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100, -100, 11, 12]]
    # a sequence whose first token is a completion token must not be predicted from the previous one
    c = PackedSFTCollator()([A, {"input_ids": [3, 4], "completion_mask": [1, 1]}])
    assert c["labels"].tolist() == [[-100, 6, 7, -100, 4]] and c["weight"].tolist() == [2.0, 1.0]


def test_packed_logits_equal_padded(tiny_lm):
    model = tiny_lm("llama")
    padded = SFTCollator(PAD)([A, B])
    packed = PackedSFTCollator()([A, B])
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits  # (2, 5, V)
        lk = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits  # (1, 8, V)
    # without a cache or attention mask, transformers builds a block-diagonal causal mask from the
    # position_ids restarting at 0, so the packed forward equals the padded one
    torch.testing.assert_close(lk[0, :3], lp[0, :3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lk[0, 3:], lp[1], rtol=1e-4, atol=1e-4)


def test_prompt_collator_left_pads():
    b = PromptCollator(PAD)([{"prompt_input_ids": [4, 5], "prompt": "a", "weight": 1.0},
                             {"prompt_input_ids": [6, 7, 8], "prompt": [{"role": "user", "content": "b"}]}])
    assert b["input_ids"].tolist() == [[0, 4, 5], [6, 7, 8]] and b["prompts"][0] == "a"
    with pytest.raises(ValueError, match="padding side"):
        PromptCollator(PAD, padding_side="middle")([{"prompt_input_ids": [1], "prompt": "a"}])
