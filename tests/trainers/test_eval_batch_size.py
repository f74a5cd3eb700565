"""Evaluation figures do not depend on per_device_eval_batch_size (session 26).

The chosen-NLL term of sft / orpo / cpo (`PreferenceBatch.nll_scale`) was scaled in evaluation by each batch's own
N / T, so eval_loss and nll_loss were the mean of the batches' token means: two runs evaluating the same model on
the same records with eval batch 1 and 8 reported different numbers. Now `PreferenceTrainer.evaluation_loop`
counts N / T over the whole evaluation set first, and every objective with eval metrics gives the same figures for
eval batch 1, 3 and all; KTO's z_ref is estimated once over the whole set (`KTOTrainer.evaluation_loop`)."""

from __future__ import annotations

import pytest
import torch

from alignkit.trainers import KTOTrainer, PreferenceTrainer, RewardTrainer, SFTTrainer, completion_logps

from .conftest import fast_args

TIMINGS = ("eval_model_preparation_time", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
           "epoch")

CASES = {  # objective -> (trainer, data kind, trainer keywords)
    "sft": (SFTTrainer, "sft", {}),
    "reward": (RewardTrainer, "preference", {"center_rewards_coefficient": 0.1}),
    "reward-ranked": (RewardTrainer, "ranked", {}),
    "dpo": (PreferenceTrainer, "preference", {}),
    "ipo": (PreferenceTrainer, "preference", {"loss_type": "ipo"}),
    "simpo": (PreferenceTrainer, "preference", {"loss_type": "simpo"}),
    "dpo+sft": (PreferenceTrainer, "preference", {"loss_type": ["sigmoid", "sft"]}),
    "sft-term": (PreferenceTrainer, "preference", {"loss_type": "sft"}),
    "dpo+sft-shared-prompt": (PreferenceTrainer, "preference", {"loss_type": ["sigmoid", "sft"], "share_prompt": True}),
    "dpo+sft-padding-free": (PreferenceTrainer, "preference", {"loss_type": ["sigmoid", "sft"], "padding_free": True}),
    "orpo": (PreferenceTrainer, "preference", {"loss_type": "orpo"}),
    "cpo": (PreferenceTrainer, "preference", {"loss_type": "cpo"}),
    "cpo-weighted": (PreferenceTrainer, "preference", {"loss_type": "cpo", "weight_normalization": "weighted"}),
    "kto": (KTOTrainer, "unpaired", {}),
}
WEIGHTS = [1.0, 0.5, 2.0, 0.0, 1.0, 3.0, 1.0, 0.25]


def moved(model):
    """The LoRA moved off its zero init, so that policy and reference differ pair by pair."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def eval_figures(case, batch_size, make_model, features, collators, tmp_path):
    cls, kind, kw = CASES[case]
    feats = features[kind]
    if case.endswith("weighted"):
        feats = [{**f, "weight": w} for f, w in zip(feats, WEIGHTS)]
    model = moved(make_model("lora", classifier=cls is RewardTrainer))
    trainer = cls(model, fast_args(tmp_path, per_device_eval_batch_size=batch_size), train_dataset=feats,
                  eval_dataset=feats, data_collator=collators[kind], **kw)
    return {k: v for k, v in trainer.evaluate().items() if k not in TIMINGS}, model


def check_same(case, sizes, make_model, features, collators, tmp_path):
    runs = {bs: eval_figures(case, bs, make_model, features, collators, tmp_path)[0] for bs in sizes}
    whole = runs[sizes[-1]]
    assert "eval_loss" in whole and len(whole) > 1, whole
    for bs, figures in runs.items():
        assert figures.keys() == whole.keys(), (bs, figures.keys() ^ whole.keys())
        for k, v in whole.items():
            assert figures[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (case, bs, k, figures[k], v)


@pytest.mark.parametrize("case", [c for c in CASES if c != "kto"])
def test_eval_figures_do_not_depend_on_the_eval_batch_size(case, make_model, features, collators, tmp_path):
    """Eval batch 1, 3 and all (8 records): the same eval_loss and metrics. sft-term / dpo+sft / orpo / cpo failed
    without the fix (eval_loss 6.797 at batch 1 vs 6.804 at 8 for dpo+sft)."""
    check_same(case, (1, 3, 8), make_model, features, collators, tmp_path)


def test_kto_eval_figures_do_not_depend_on_the_eval_batch_size(make_model, features, collators, tmp_path):
    """KTO's z_ref was each eval batch's own mismatched pairs (i with i-1 inside the batch), so eval_loss and kl
    changed with the eval batch size (eval_loss 0.50212 at batch 3 vs 0.50164 at 8). Now `KTOTrainer.eval_kl` pairs
    example i with i-1 over the whole set, once (KTO needs eval batches of 2 or more: 2, 3 and all). Fails without
    the fix: yes."""
    check_same("kto", (2, 3, 8), make_model, features, collators, tmp_path)


def test_kto_eval_kl_is_the_sets_mismatched_pairs(make_model, features, collators, tmp_path):
    """eval_kl = the mean log-ratio of the pairs (prompt i, completion i-1 mod 8), each scored alone with the policy
    and its adapter switched off (an independent reference: one pair per batch, no ring), for eval batch 3."""
    from alignkit.adapters import reference_off
    from alignkit.trainers import mismatched_batch

    figures, model = eval_figures("kto", 3, make_model, features, collators, tmp_path)
    feats, ratios = features["unpaired"], []
    model.eval()
    with torch.no_grad():
        for i in range(len(feats)):
            pair = mismatched_batch(collators["unpaired"]([feats[i], feats[i - 1]]))
            pair = {k: v[:1] for k, v in pair.items()}  # prompt i + completion i-1
            policy, _ = completion_logps(model, pair)
            with reference_off(model):
                ref, _ = completion_logps(model, pair)
            ratios.append(float(policy[0] - ref[0]))
    assert sum(ratios) > 0  # (else the clamp at 0 would hide the pairs)
    assert figures["eval_kl"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4, abs=1e-6)


def test_the_sft_term_eval_loss_is_the_sets_token_mean(make_model, features, collators, tmp_path):
    """eval_loss of loss_type sft = sum_i NLL_i / sum_i |y_w,i| over the whole set, each NLL_i scored on its own
    pair (an independent reference: no batching, no trainer), for eval batch 3 (3 + 3 + 2 pairs)."""
    figures, model = eval_figures("sft-term", 3, make_model, features, collators, tmp_path)
    nll = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for f in features["preference"]:
            batch = collators["preference"]([f])
            logps, lengths = completion_logps(model, batch)  # (2,): chosen, rejected
            nll, tokens = nll - float(logps[0]), tokens + float(lengths[0])
    assert figures["eval_loss"] == pytest.approx(nll / tokens, rel=1e-5)
