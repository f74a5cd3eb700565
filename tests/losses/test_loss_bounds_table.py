"""The loss hyper-parameters' bounds are one table (`alignkit.loss_bounds`): the CLI's config check
(`settings/bounds.py`) and the Python API (`PreferenceParams`, KTOTrainer / RewardTrainer's `check_signs`) refuse
the same values with the same 'must be ...' wording (before: the Python side restated the rows by hand, e.g. beta's
"> 0" without the CLI's reason, and could drift from them)."""

from __future__ import annotations

import pytest

from alignkit.losses import PreferenceParams
from alignkit.losses.registry import check_signs
from alignkit.settings.bounds import check_section
from alignkit.settings.typed import ConfigError

# (key, a value past its bound, one inside it): by hand from the losses' definitions
PARAMS = [("beta", 0.0, 0.1), ("label_smoothing", 0.5, 0.49), ("orpo_lambda", -0.1, 0.0), ("cpo_alpha", -1.0, 0.0),
          ("slic_lambda", -0.1, 0.0), ("discopop_tau", 0.0, 0.05), ("f_alpha", 0.0, 0.5)]
TRAINER_KEYS = [("beta", -0.1, 0.1), ("desirable_weight", -1.0, 0.0), ("undesirable_weight", -0.5, 0.0),
                ("center_rewards_coefficient", -0.01, 0.0), ("l2_coefficient", -0.1, 0.0)]


def cli_allowed(key: str, value: float) -> str:
    with pytest.raises(ConfigError) as e:
        check_section({key: value}, "method")
    return str(e.value).split("it must be ", 1)[1]


@pytest.mark.parametrize("key, bad, good", PARAMS)
def test_preference_params_refuse_what_the_cli_refuses_in_its_words(key, bad, good):
    PreferenceParams(**{key: good})
    check_section({key: good}, "method")
    with pytest.raises(ValueError) as e:
        PreferenceParams(**{key: bad})
    bound, why = cli_allowed(key, bad).split(" (", 1)  # the CLI's "<bound> (<why>)"
    assert str(e.value) == f"{key} must be {bound}, got {bad} ({why}"


@pytest.mark.parametrize("key, bad, good", TRAINER_KEYS)
def test_trainer_arguments_refuse_what_the_cli_refuses_in_its_words(key, bad, good):
    check_signs("KTOTrainer", **{key: good})
    with pytest.raises(ValueError) as e:
        check_signs("KTOTrainer", **{key: bad})
    assert str(e.value) == f"KTOTrainer: {key}={bad} must be {cli_allowed(key, bad)}"
