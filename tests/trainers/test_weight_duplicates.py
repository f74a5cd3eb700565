"""A record's weight against the records themselves, for every offline objective and every registered DPO-family loss:
under weight_normalization="weighted" weight 2 is the record given twice and weight 0 the record left out (loss and
normalisation, token-level SFT and chosen-NLL terms included); under "count" (the default) the weighted sum is the same
and the normaliser still counts the weight-0 record (the mean over examples / tokens of w * loss, as documented in
trainers/base.py). KTO's own loss is left out: its KL reference point z_ref is estimated from the batch's mismatched
pairs (row i's prompt with row i-1's completion), which depend on which rows the batch holds, so no reweighting of a
batch equals a batch of other rows (apo_zero_unpaired, which reads no z_ref, is in)."""

from __future__ import annotations

import pytest
import torch

from alignkit.losses import PREFERENCE_LOSSES
from alignkit.trainers import KTOTrainer, PreferenceTrainer, RewardTrainer, SFTTrainer

from .conftest import fast_args

# name -> (trainer, data kind, classifier?, kwargs)
ROWS = {"sft": (SFTTrainer, "sft", False, {}),
        "reward": (RewardTrainer, "preference", True, {}),
        "reward_centered": (RewardTrainer, "preference", True, {"center_rewards_coefficient": 0.1}),
        "reward_ranked": (RewardTrainer, "ranked", True, {"l2_coefficient": 0.1}),  # 2 and 3 replies in one batch
        **{f"dpo:{n}": (PreferenceTrainer, "preference", False, {"loss_type": n}) for n in PREFERENCE_LOSSES},
        "dpo:sigmoid+sft": (PreferenceTrainer, "preference", False, {"loss_type": ["sigmoid", "sft"]}),
        "kto:apo_zero_unpaired": (KTOTrainer, "unpaired", False, {"loss_type": "apo_zero_unpaired"})}
# losses with a chosen-NLL term, whose token count under "count" counts a weight-0 pair's tokens too (its own test:
# tests/losses/test_preference.py::test_chosen_nll_follows_the_weights_and_their_normalisation)
NLL_TERMS = ("dpo:sft", "dpo:orpo", "dpo:cpo", "dpo:sigmoid+sft")


def _loss(trainer, model, collator, feats):
    with torch.no_grad():
        batch = collator(feats)
        return trainer.compute_loss(model, dict(batch)), trainer.count_items(collator(feats))


@pytest.mark.parametrize("name, norm", [(n, "weighted") for n in ROWS] + [(n, "count") for n in ROWS
                                                                        if n not in NLL_TERMS])
def test_weight_two_is_the_record_twice_and_weight_zero_the_record_left_out(name, norm, make_model, features,
                                                                            collators, tmp_path):
    cls, data, classifier, extra = ROWS[name]
    model = make_model("lora", classifier=classifier)
    with torch.no_grad():  # move the policy off its reference so that the records' losses differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    trainer = cls(model, fast_args(tmp_path), train_dataset=features[data], data_collator=collators[data],
                  weight_normalization=norm, **extra)
    model.train()
    f, col = features[data], collators[data]
    weighted, nw = _loss(trainer, model, col, [{**f[0], "weight": 2.0}, {**f[1], "weight": 0.0},
                                               {**f[2], "weight": 1.0}, {**f[3], "weight": 1.0}])
    twice, nd = _loss(trainer, model, col, [f[0], f[0], f[2], f[3]])
    assert float(weighted) > 0
    # "weighted": the normalisers are equal (sum w n = the duplicated batch's n); "count": the same sum over another N
    want = twice if norm == "weighted" else twice * nd / nw
    if norm == "weighted":
        torch.testing.assert_close(nw, nd)
    torch.testing.assert_close(weighted, want, rtol=1e-5, atol=1e-6)
