"""Whether a prompt's samples can differ is decided in one place, `SamplingConfig.one_answer()`: the generation
commands' refusal (`refuse_greedy_ignored`) and the online methods that compare samples (`check_samples_differ`)
ask it rather than restating do_sample / top_k (before, a reason added to one_answer was not seen by either)."""

from __future__ import annotations

import pytest

from alignkit.online.dpo import OnlineDPOConfig
from alignkit.settings.sampling import SamplingConfig, refuse_greedy_ignored
from alignkit.settings.typed import ConfigError


def test_both_refusals_follow_one_answer(monkeypatch):
    sampling = SamplingConfig(do_sample=True, num_samples=2)
    refuse_greedy_ignored(sampling, "generation")  # samples can differ: accepted
    OnlineDPOConfig(sampling=sampling)
    monkeypatch.setattr(SamplingConfig, "one_answer", lambda self: "a new reason every sample is the same")
    with pytest.raises(ConfigError, match="generation.num_samples=2 with"):
        refuse_greedy_ignored(sampling, "generation")
    with pytest.raises(ValueError, match="learns from the differences between the samples of a prompt"):
        OnlineDPOConfig(sampling=sampling)
