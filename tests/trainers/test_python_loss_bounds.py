"""KTOTrainer / RewardTrainer built in Python refuse the loss settings the CLI's bounds refuse (session 24's
objectives audit)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import grad

from alignkit.losses import kto_loss
from alignkit.trainers import KTOTrainer, RewardTrainer

from .conftest import fast_args


def test_an_unchecked_negative_kto_beta_lowers_the_desirable_answers():
    """What a beta < 0 did (by hand): the desirable loss 1 - sigma(beta rho) has slope -beta / 4 at rho = 0, +0.025
    for beta = -0.1, so training lowered log pi of the desirable answers."""
    rho = torch.zeros(1, requires_grad=True)
    out = kto_loss(rho, torch.zeros(1), torch.tensor([True]), 0.0, beta=-0.1)
    (slope,) = grad(out.losses.sum(), rho)
    assert slope.item() == pytest.approx(0.025)


@pytest.mark.parametrize("trainer, kwargs, says", [
    (KTOTrainer, {"beta": -0.1}, "KTOTrainer: beta=-0.1 must be > 0"),
    (KTOTrainer, {"beta": 0.0}, "KTOTrainer: beta=0.0 must be > 0"),
    (KTOTrainer, {"desirable_weight": -1.0}, "KTOTrainer: desirable_weight=-1.0 must be >= 0"),
    (KTOTrainer, {"undesirable_weight": -0.5}, "KTOTrainer: undesirable_weight=-0.5 must be >= 0"),
    (RewardTrainer, {"center_rewards_coefficient": -0.01}, "RewardTrainer: center_rewards_coefficient=-0.01 must be"),
    (RewardTrainer, {"l2_coefficient": -0.1}, "RewardTrainer: l2_coefficient=-0.1 must be >= 0"),
])
def test_python_trainer_settings_past_the_cli_bounds_are_refused(trainer, kwargs, says, make_model, tmp_path):
    """Before: accepted and trained (the CLI refuses each: settings/bounds.py): a KTO beta <= 0 trains toward the
    undesirable answers, a negative weight raises its side's loss, a negative centering / l2 coefficient pushes the
    rewards away from 0 without bound. Now a ValueError naming the trainer and the argument, before the model is
    wrapped or anything written."""
    model = make_model("full", classifier=trainer is RewardTrainer)
    with pytest.raises(ValueError) as e:
        trainer(model, fast_args(tmp_path), **kwargs)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
