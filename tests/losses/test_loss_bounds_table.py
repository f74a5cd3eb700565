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
          ("slic_lambda", -0.1, 0.0), ("discopop_tau", 0.0, 0.05), ("f_alpha", 0.0, 0.5),
          # a margin in the rejected answers' favour (before: accepted by both sides): SLiC's hinge max(0, delta - lw
          # + ll) at delta = -1 is 0 for a pair whose rejected answer is the likelier by 0.5 (by hand: max(0, -0.5));
          # SimPO's gamma / beta < 0. Both bounds are 0 itself: SLiC's margin-free hinge, SimPO's gamma = 0 ablation
          ("slic_delta", -1.0, 0.0), ("simpo_gamma_beta_ratio", -0.25, 0.0)]
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


def test_bco_delta_is_no_setting_in_python_nor_in_the_cli():
    """PreferenceParams.bco_delta is BCO's running reward mean, which no trainer keeps (delta = 0, as TRL's bco_pair):
    DPOTrainer / OnlineDPOConfig took params=PreferenceParams(bco_delta=0.3) as a fixed shift and left it out of the
    recorded settings (training_settings drops it). Now one ValueError naming the owner and the key; the CLI's line
    says what it is rather than "did you mean 'slic_delta'"."""
    from alignkit.losses import resolve_params
    from alignkit.online.dpo import OnlineDPOConfig
    from alignkit.settings.sections import PreferenceObjective
    from alignkit.settings.typed import build

    assert resolve_params(PreferenceParams(beta=0.2), 0.1, "DPOTrainer").beta == 0.2  # bco_delta 0: fine
    with pytest.raises(ValueError, match=r"^DPOTrainer: params\.bco_delta=0\.3 is not a setting .*remove it"):
        resolve_params(PreferenceParams(bco_delta=0.3), 0.1, "DPOTrainer")
    with pytest.raises(ValueError, match=r"^OnlineDPOConfig: params\.bco_delta=0\.3 is not a setting"):
        OnlineDPOConfig(params=PreferenceParams(bco_delta=0.3))
    with pytest.raises(ConfigError) as e:
        build(PreferenceObjective, {"bco_delta": 0.3}, "method")
    assert str(e.value).startswith("method.bco_delta: unknown key: BCO's running reward mean is trainer state")
    assert "\n" not in str(e.value) and "slic_delta" not in str(e.value)
