"""The ReFT frozen-prefix cache in reward modeling (padded classifier rows, the layout ReFT reward models train in).

Reference: the same run without the cache. The table's ReFT adapter intervenes on the outputs of layers 0 and 1,
so layer 0 runs before every intervention: over 3 epochs the cache must skip it from the second epoch on and the
losses and trained weights must be those of the run without it. Up to float rounding, not bitwise: an example's
cached states were computed in an epoch-1 batch padded to another length (other matmul shapes, ~1e-7 apart; the
cache's own check allows 64 eps), where the run without the cache recomputes them in the epoch-2 batch."""

from __future__ import annotations

import torch

from alignkit.interventions.locate import find_decoder_layers, hf_model
from alignkit.trainers import RewardTrainer
from tests.trainers.conftest import fast_args


def _train(make_model, features, collators, tmp_path, setting):
    model = make_model("reft", classifier=True)
    _, layers = find_decoder_layers(hf_model(model.model))
    calls = []
    layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    trainer = RewardTrainer(model, fast_args(tmp_path / str(setting), max_steps=-1, num_train_epochs=3),
                            train_dataset=features["preference"], data_collator=collators["preference"],
                            reft_prefix_cache=setting)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, len(calls)


def test_reward_model_epochs_skip_the_frozen_layer_with_the_same_result(make_model, features, collators, tmp_path):
    off = _train(make_model, features, collators, tmp_path, False)
    on = _train(make_model, features, collators, tmp_path, True)
    assert len(off[0]) == 6
    torch.testing.assert_close(torch.tensor(on[0]), torch.tensor(off[0]), rtol=1e-5, atol=0)
    for n in off[1]:
        torch.testing.assert_close(on[1][n], off[1][n], rtol=1e-5, atol=1e-6, msg=n)
    # 8 pairs, batches of 4: each step one forward of its chosen and rejected rows; with the cache, the 2 steps of
    # epoch 1 fill, the first step of epoch 2 checks against the real layer, the other 3 skip it
    assert off[2] == 6 and on[2] == 3, (off[2], on[2])
