"""`tiny:<arch>` model specs: one check (`alignkit.settings.tiny.tiny_arch`) behind every key that takes a model,
one error line naming the key, the closest spec and the valid architectures."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.settings import ConfigError, config_from_dict
from alignkit.settings.tiny import tiny_arch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VALID = "valid: tiny:llama, tiny:qwen2, tiny:gpt2, tiny:gpt_neox"


def line(key: str) -> str:
    """The error for `tiny:lama` under `key`, written out by hand."""
    return f"{key}: 'tiny:lama': unknown tiny architecture 'lama' (did you mean 'tiny:llama'?); {VALID}"


def test_the_spec_is_read_and_checked_in_one_place():
    assert tiny_arch("tiny:gpt_neox", "model.path") == "gpt_neox"
    assert tiny_arch("runs/sft/model", "model.path") is None and tiny_arch(None, "llm.path") is None
    with pytest.raises(ConfigError) as e:
        tiny_arch("tiny:lama", "model.path")
    assert str(e.value) == line("model.path")
    with pytest.raises(ConfigError) as e:  # nothing close: no suggestion, still the key and the valid specs
        tiny_arch("tiny:bert", "base")
    assert str(e.value) == f"base: 'tiny:bert': unknown tiny architecture 'bert'; {VALID}"


@pytest.mark.parametrize("data, command, key", [
    ({"model": {"path": "tiny:lama"}, "data": {"path": "p.jsonl"}}, "dpo", "model.path"),
    ({"model": {"path": "tiny:llama"}, "data": {"path": "p.jsonl"}, "annotator": {"kind": "reward_model",
                                                                                   "path": "tiny:lama"}},
     "grpo", "annotator.path"),
    ({"strategy": "paraphrase", "data": {"path": "p.jsonl"}, "llm": {"kind": "local", "path": "tiny:lama"}},
     "augment", "llm.path"),
    ({"base": "tiny:lama"}, "serve", "base"),
])
def test_every_key_gives_the_same_line(data, command, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, command)
    assert str(e.value) == line(key)


def test_the_cli_prints_the_line(capsys):
    assert main(["dpo", "--config", str(CONFIGS / "dpo-tiny.yaml"), "model.path=tiny:lama", "--dry-run"]) == 2
    assert line("model.path") in capsys.readouterr().err
