"""RoPE scaling from `model.rope_scaling`: the cos/sin a tiny Llama's layers receive after extending its context
by a factor of 2, checked against the published formulas computed here by hand (math, not transformers), and
the one-line errors for unknown types, a missing factor and an architecture without RoPE."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.models.loading import load_model
from alignkit.models.rope import apply_rope_scaling, supported_rope_types
from alignkit.models.tiny import tiny_config
from alignkit.settings import ConfigError, load_config
from tests.adapters.table import ADAPTERS

ROOT = Path(__file__).resolve().parents[2]
THETA, HEAD_DIM, ORIGINAL = 10000.0, 16, 512  # the tiny Llama: hidden 64 / 4 heads, 512 positions


def seen_cos_sin(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [length, head_dim] that the rotary module hands to the decoder layers in a real forward."""
    seen = {}
    handle = model.model.rotary_emb.register_forward_hook(lambda m, a, out: seen.update(cos=out[0], sin=out[1]))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, length)))
    handle.remove()
    return seen["cos"][0], seen["sin"][0]


def by_hand(inv_freq: list[float], length: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables from the paper's definition: angle(p, i) = p * inv_freq[i], each frequency used for two dims
    (HF's half-rotation layout: [f_0..f_{d/2-1}, f_0..f_{d/2-1}])."""
    cos = [[math.cos(p * f) * scale for f in inv_freq * 2] for p in range(length)]
    sin = [[math.sin(p * f) * scale for f in inv_freq * 2] for p in range(length)]
    return torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)


def base_freqs(theta: float = THETA) -> list[float]:
    return [theta ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]


def check(model, length: int, inv_freq: list[float], scale: float = 1.0) -> None:
    cos, sin = seen_cos_sin(model, length)
    want_cos, want_sin = by_hand(inv_freq, length, scale)
    assert cos.shape == (length, HEAD_DIM)
    # float32 angles up to ~1000 rad: absolute error of a few 1e-5 on cos/sin
    torch.testing.assert_close(cos.double(), want_cos, atol=2e-4, rtol=0)
    torch.testing.assert_close(sin.double(), want_sin, atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from alignkit.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("rope-llama"), "llama")


def test_unscaled_model_sees_plain_rope(llama_dir):
    check(load_model(llama_dir).eval(), 64, base_freqs())


def test_linear_factor_2_interpolates_positions(llama_dir):
    model = load_model(llama_dir, rope_scaling={"type": "linear", "factor": 2.0}).eval()
    assert model.config.max_position_embeddings == 2 * ORIGINAL
    # position interpolation: position p is seen as p / 2, i.e. every frequency halved, over the whole 2x context
    check(model, 2 * ORIGINAL, [f / 2 for f in base_freqs()])


def test_dynamic_ntk_rescales_the_base_only_past_the_original_length(llama_dir):
    model = load_model(llama_dir, rope_scaling={"type": "dynamic", "factor": 2.0}).eval()
    assert model.config.max_position_embeddings == ORIGINAL  # the formula reads it as the original length
    check(model, 100, base_freqs())  # within the original context: plain RoPE
    length = 2 * ORIGINAL
    # NTK-aware base: theta' = theta * (factor * L / L_orig - (factor - 1)) ** (d / (d - 2)) = theta * 3 ** (16/14)
    theta = THETA * (2.0 * length / ORIGINAL - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    check(model, length, base_freqs(theta))
    check(model, 100, base_freqs())  # and back again for a short sequence


def test_yarn_factor_2_blends_frequencies_and_scales_attention(llama_dir):
    model = load_model(llama_dir, rope_scaling={"type": "yarn", "factor": 2.0}).eval()
    assert model.config.max_position_embeddings == 2 * ORIGINAL
    assert model.config.rope_parameters["original_max_position_embeddings"] == ORIGINAL
    # YaRN (Peng et al. 2023): dims rotating more than beta_fast=32 times over the original context keep their
    # frequency, those rotating fewer than beta_slow=1 times are interpolated (/factor), a linear ramp between.
    def dim_of(rotations: float) -> float:
        return HEAD_DIM * math.log(ORIGINAL / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), HEAD_DIM - 1)
    # d=16, theta=1e4, 512 positions: 16 ln(512 / 64pi) / 2 ln 1e4 = 0.81 -> 0; 16 ln(512 / 2pi) / 2 ln 1e4 = 3.82 -> 4
    assert (low, high) == (0, 4)
    freqs = []
    for i, f in enumerate(base_freqs()):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep (extrapolate), 1: interpolate
        freqs.append(f * (1 - ramp) + (f / 2) * ramp)
    mscale = 0.1 * math.log(2.0) + 1.0  # attention temperature, folded into cos and sin
    check(model, 2 * ORIGINAL, freqs, scale=mscale)


def test_scaling_twice_is_scaling_once():
    cfg = tiny_config("llama", vocab_size=64)
    apply_rope_scaling(cfg, {"type": "yarn", "factor": 2.0})
    once = (dict(cfg.rope_parameters), cfg.max_position_embeddings)
    apply_rope_scaling(cfg, {"type": "yarn", "factor": 2.0})
    assert (dict(cfg.rope_parameters), cfg.max_position_embeddings) == once == (
        {"rope_theta": THETA, "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512}, 1024)


def test_another_saved_scaling_is_refused_naming_both_not_replaced():
    """A YaRN model asked for linear scaling was quietly turned into a linear one (its trained positions moved)."""
    cfg = tiny_config("llama", vocab_size=64)
    apply_rope_scaling(cfg, {"type": "yarn", "factor": 2.0})  # as a saved YaRN model's config reads
    with pytest.raises(ConfigError) as e:
        apply_rope_scaling(cfg, {"type": "linear", "factor": 2.0})
    assert str(e.value) == (
        "model.rope_scaling: the model's config already has yarn RoPE scaling ({type: yarn, factor: 2.0, "
        "original_max_position_embeddings: 512}), and {type: linear, factor: 2.0} would replace it, not add "
        "to it (one scaling applies): remove model.rope_scaling to keep the saved one, or add replace: true to it "
        "to use yours instead (its factor then counts from the original 512 positions)")
    with pytest.raises(ConfigError, match="already has yarn RoPE scaling"):  # the same type with another factor
        apply_rope_scaling(cfg, {"type": "yarn", "factor": 4.0})
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.max_position_embeddings == 1024  # untouched
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.replace: expected true or false, got 'yes'"):
        apply_rope_scaling(cfg, {"type": "linear", "factor": 2.0, "replace": "yes"})


def test_replace_counts_the_new_factor_from_the_original_context():
    yarn = apply_rope_scaling(tiny_config("llama", vocab_size=64), {"type": "yarn", "factor": 2.0})
    apply_rope_scaling(yarn, {"type": "linear", "factor": 4.0, "replace": True})
    assert (dict(yarn.rope_parameters), yarn.max_position_embeddings) == (
        {"rope_theta": THETA, "rope_type": "linear", "factor": 4.0}, 4 * ORIGINAL)
    # a saved linear x2 model records no original length: 1024 / 2 = 512, so linear x4 is 2048 positions, not 4096
    linear = apply_rope_scaling(tiny_config("llama", vocab_size=64), {"type": "linear", "factor": 2.0})
    assert linear.max_position_embeddings == 2 * ORIGINAL
    apply_rope_scaling(linear, {"type": "yarn", "factor": 4.0, "replace": True})
    assert linear.max_position_embeddings == 4 * ORIGINAL
    assert linear.rope_parameters["original_max_position_embeddings"] == ORIGINAL


def test_dynamic_ntk_keeps_the_original_context_as_its_threshold(llama_dir):
    """Dynamic NTK reads max_position_embeddings as the original context and rescales only past it. Before,
    `max_position_embeddings: 2048` in its rope_scaling was recorded as asked, and a 1024-token sequence (twice
    the trained 512) then ran on plain, unscaled RoPE without a word; and `replace: true` over a saved linear x2
    model kept its 1024, so positions 512..1023 ran unscaled. Now the first is a ConfigError naming the key, and
    the replaced model's threshold is the original 512 (its NTK base past it: the formula by hand)."""
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling\.max_position_embeddings: type 'dynamic' reads "
                                          r"max_position_embeddings as the model's original context .* from the "
                                          r"model's 512 positions to 2048 .* remove it"):
        load_model(llama_dir, rope_scaling={"type": "dynamic", "factor": 2.0, "max_position_embeddings": 2048})
    cfg = apply_rope_scaling(tiny_config("llama", vocab_size=64), {"type": "dynamic", "factor": 2.0,
                                                                   "max_position_embeddings": ORIGINAL})
    assert cfg.max_position_embeddings == ORIGINAL  # the model's own length: accepted
    linear = apply_rope_scaling(tiny_config("llama", vocab_size=512), {"type": "linear", "factor": 2.0})
    apply_rope_scaling(linear, {"type": "dynamic", "factor": 2.0, "replace": True})
    assert (dict(linear.rope_parameters), linear.max_position_embeddings) == (
        {"rope_theta": THETA, "rope_type": "dynamic", "factor": 2.0}, ORIGINAL)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(linear).eval()
    length = 2 * ORIGINAL  # theta' = theta * (2 * 1024 / 512 - 1) ** (16 / 14), past the original 512
    check(model, length, base_freqs(THETA * (2.0 * length / ORIGINAL - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))))


def test_a_saved_yarn_model_folder_is_refused_at_config_load_and_replaced_on_request(tmp_path):
    import json

    from alignkit.models.tiny import save_tiny

    folder = save_tiny(tmp_path / "yarn-llama", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL,
                              "rope_theta": THETA}
    cfg["max_position_embeddings"] = 2 * ORIGINAL
    (folder / "config.json").write_text(json.dumps(cfg))
    example = ROOT / "configs" / "sft-long-context-tiny.yaml"  # linear, factor 2
    with pytest.raises(ConfigError, match=r"already has yarn RoPE scaling .* \{type: linear, factor: 2\.0\} would replace"):
        load_config(example, [f"model.path={folder}"])
    load_config(example, [f"model.path={folder}", "model.rope_scaling.replace=true"])
    model = load_model(folder, rope_scaling={"type": "linear", "factor": 2.0, "replace": True}).eval()
    assert model.config.max_position_embeddings == 2 * ORIGINAL
    check(model, 2 * ORIGINAL, [f / 2 for f in base_freqs()])  # plain position interpolation, no YaRN blend left


def test_supported_types_come_from_the_architecture():
    assert supported_rope_types(tiny_config("gpt2", vocab_size=64)) == []
    types = supported_rope_types(tiny_config("llama", vocab_size=64))
    assert types[0] == "default" and {"linear", "dynamic", "yarn", "llama3", "longrope"} <= set(types)


@pytest.mark.parametrize("override, message", [
    ("model.rope_scaling={type: ntk, factor: 2}", "model.rope_scaling.type: 'ntk' is not a RoPE type the llama "
                                                  "architecture supports in this transformers; valid: default, "),
    ("model.rope_scaling.factor=null", "model.rope_scaling.factor: required for type 'linear'"),
    ("model.rope_scaling.type=null", "model.rope_scaling.type: required; one of "),
    ("model.rope_scaling={type: dynamic, factor: 0.5}", "model.rope_scaling.factor: expected a number >= 1"),
    ("model.rope_scaling={type: linear, factor: 2, beta_fast: 8}", "model.rope_scaling.beta_fast: type 'linear' does not read beta_fast"),
    ("model.rope_scaling=linear", "model.rope_scaling: expected"),
    # accepted before, and left half of every llama head unrotated: another model, the context unchanged
    ("model.rope_scaling={type: proportional, partial_rotary_factor: 0.5}", "model.rope_scaling.type: 'proportional' "
     "is a rotary layout some architectures are built with (Gemma 4: part of each head left unrotated, "
     "partial_rotary_factor), not a context scaling (transformers takes no factor for it); set on this llama model it "
     "would rotate its heads otherwise than in training, a different model; use one of dynamic, linear, llama3, "
     "longrope, yarn"),
    *((f"model.rope_scaling={{type: {kind}, factor: 2, max_position_embeddings: 256}}",
       "model.rope_scaling.max_position_embeddings: 256 is below the model's original context of 512 positions")
      for kind in ("linear", "yarn")),  # the tiny base model has 512 positions
])
def test_bad_rope_scaling_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "sft-long-context-tiny.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_architecture_without_rope_is_refused_at_config_load():
    with pytest.raises(ConfigError, match=r"model\.rope_scaling: the gpt2 architecture has no rotary position "
                                          r"embeddings \(RoPE\)"):
        load_config(ROOT / "configs" / "sft-long-context-tiny.yaml", ["model.path=tiny:gpt2"])


def test_error_from_a_model_folder_is_one_line_from_the_cli(tmp_path, tiny_dir):
    cmd = [sys.executable, "-m", "alignkit", "sft", "--config", str(ROOT / "configs" / "sft-long-context-tiny.yaml"),
           f"model.path={tiny_dir('gpt_neox')}", "model.rope_scaling.type=su", f"output_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"alignkit sft: error: {ROOT / 'configs' / 'sft-long-context-tiny.yaml'}: model.rope_scaling.type: 'su' is "
        f"not a RoPE type the gpt_neox architecture supports in this transformers; valid: default, "
        + ", ".join(supported_rope_types(tiny_config("gpt_neox", vocab_size=64))[1:])]


def test_long_context_example_trains_past_the_base_context(tmp_path):
    from alignkit.cli import main

    assert main(["-q", "sft", "--config", str(ROOT / "configs" / "sft-long-context-tiny.yaml"),
                 f"output_dir={tmp_path}", "train.max_steps=2"]) == 0
    import json

    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear" and saved["max_position_embeddings"] == 1024
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)
    # every training sequence ran past the base model's 512 positions
    from alignkit.data import TokenizeConfig, load_records, tokenize_records
    from alignkit.models.loading import load_tokenizer

    tok = load_tokenizer(tmp_path / "model")
    records = load_records(str(ROOT / "src/alignkit/resources/data/long_context_sample.jsonl"), "sft")
    feats, _ = tokenize_records(records, tok, TokenizeConfig(max_length=1024, max_prompt_length=1000))
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(feats) == len(records) and 512 < min(lengths) and max(lengths) <= 1024


@pytest.mark.parametrize("row", [r for r in ADAPTERS if not r.whole_model], ids=lambda r: r.kind)
def test_an_adapter_trained_with_rope_scaling_is_refused_on_a_base_without_it(row, llama_dir, tmp_path, caplog):
    """`model.rope_scaling` changes the base's config in memory only: the adapter folder a training run saves holds
    the adapter's weights, and eval / generate / serve load the unscaled base under it. Before, such an adapter
    loaded without a word and every position was encoded otherwise than in training. Its alignkit_base.json now
    records the RoPE it was trained with: a missing or different scaling is a ConfigError naming the key and the
    scaling to set; that scaling (the message's own text) loads; a scaling added to an adapter trained without
    one is a warning (extending the context at inference is legitimate)."""
    from alignkit.adapters import apply_adapter, load_adapter, save_adapter
    from alignkit.serve.stack import load_stack
    from tests.adapters.table import perturb

    yarn = {"type": "yarn", "factor": 2.0}
    model = apply_adapter(load_model(llama_dir, rope_scaling=yarn), row.config())
    folder = save_adapter(perturb(model), tmp_path / "a")
    trained = r"\{type: yarn, factor: 2.0, original_max_position_embeddings: 512\}"
    with pytest.raises(ConfigError, match=rf"/a: RoPE \{{type: default\}} here, {trained} when trained: set "
                                          rf"model.rope_scaling: {trained} \(what training used\)"):
        load_adapter(load_model(llama_dir), folder)
    with pytest.raises(ConfigError, match=r"RoPE \{type: linear, factor: 2.0\} here, \{type: yarn"):
        load_adapter(load_model(llama_dir, rope_scaling={"type": "linear", "factor": 2.0}), folder)
    with pytest.raises(ValueError, match=rf"RoPE \{{type: default\}} here, {trained} when trained: set rope_scaling: "):
        load_stack(llama_dir, {"a": folder})  # serve: its own key
    suggested = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512}
    load_adapter(load_model(llama_dir, rope_scaling=suggested), folder)
    load_stack(llama_dir, {"a": folder}, rope_scaling=yarn)
    load_adapter(load_model(llama_dir), folder, check_base=False)  # on purpose

    plain = save_adapter(apply_adapter(load_model(llama_dir), row.config()), tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="alignkit.adapters.base"):
        load_adapter(load_model(llama_dir, rope_scaling={"type": "linear", "factor": 2.0}), plain)
    assert [r.getMessage() for r in caplog.records] == [
        f"{plain}: RoPE scaling {{type: linear, factor: 2.0}} here, none when trained: the adapter meets positions "
        "encoded otherwise than in training (fine to extend its context; remove model.rope_scaling to run it as "
        "trained)"]


def test_the_model_card_of_an_adapter_trained_with_rope_scaling_loads_it(tmp_path):
    """The run folder's README.md ("Loading") gives the Python that loads the adapter back; for a run with
    model.rope_scaling it loaded the base without the scaling, which the adapter folder's check now refuses (and
    before, computed something else). The snippet now passes the run's rope_scaling, and runs as written."""
    import re

    from alignkit.cli import main

    run = tmp_path / "run"
    assert main(["-q", "sft", "--config", str(ROOT / "configs" / "sft-long-context-tiny.yaml"), f"output_dir={run}",
                 "adapter.kind=lora", "train.max_steps=1", "data.max_records=4"]) == 0
    code = re.search(r"## Loading\n+```python\n(.*?)```", (run / "model" / "README.md").read_text(), re.S).group(1)
    assert f"load_model(\"{run / 'base_model'}\", rope_scaling={{'type': 'linear', 'factor': 2.0}})" in code
    scope: dict = {}
    exec(code, scope)
    assert scope["model"].config.rope_parameters["rope_type"] == "linear"


def test_dynamic_ntk_past_its_threshold_is_a_warning_naming_the_order_dependence(caplog):
    """Dynamic NTK: transformers encodes a sequence past max_position_embeddings with frequencies rescaled for the
    longest sequence run since a shorter-than-original one (row T22), so a training row or a prompt past it is encoded
    by what ran before and beside it; check_context said nothing for dynamic (its length is no limit). Now one
    warning naming it; within the original context nothing is said."""
    from alignkit.models.rope import check_context

    cfg = apply_rope_scaling(tiny_config("llama", vocab_size=64), {"type": "dynamic", "factor": 2.0})
    with caplog.at_level(logging.WARNING, logger="alignkit.models.rope"):
        assert check_context(cfg, ORIGINAL, "the longest row", "set data.max_length") is False
        assert not caplog.records
        assert check_context(cfg, ORIGINAL + 1, "the longest row", "set data.max_length") is False
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"the longest row reaches {ORIGINAL + 1} tokens, past the {ORIGINAL} positions where dynamic "
                          "RoPE scaling starts: transformers then encodes positions with frequencies rescaled for the "
                          "longest sequence run since a shorter one"), msg
    assert "use model.rope_scaling type yarn or linear" in msg and "set data.max_length" in msg


HALF = HEAD_DIM // 2  # the tiny Llama's rotary frequencies: 16-dim heads, 8 of them
ROPE_REFUSALS = [  # (model.rope_scaling on the tiny Llama's 512 positions, the line's start / what it must say)
    # 512 x 2.1 = 1075.2: transformers recorded int() = 1075 and warned once that 1075 / 512 != 2.1
    ({"type": "yarn", "factor": 2.1}, "model.rope_scaling.factor: 2.1 x the model's original 512 positions = 1075.2 "
     "positions, not a whole number", "use factor 2.099609375 (1075 positions) or 2.1015625 (1076 positions)"),
    # 1000 / 512 = 1.953125, not the factor 2.0 transformers would use
    ({"type": "yarn", "factor": 2.0, "max_position_embeddings": 1000}, "model.rope_scaling.max_position_embeddings: "
     "1000 is not the original 512 positions x factor 2.0 = 1024.0", "set factor: 1.953125 for 1000 positions"),
    ({"type": "yarn", "factor": 2.0, "beta_fast": 0}, "model.rope_scaling.beta_fast: expected a number > 0",
     "reads 0 as unset and uses 32"),
    ({"type": "yarn", "factor": 2.0, "beta_slow": 40}, "model.rope_scaling.beta_fast: 32 is not above beta_slow 40",
     "give beta_fast > beta_slow"),
    ({"type": "yarn", "factor": 2.0, "mscale": 1.0}, "model.rope_scaling.mscale: transformers uses it only together "
     "with mscale_all_dim", "add mscale_all_dim or remove mscale"),
    ({"type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.2},
     "model.rope_scaling.mscale: transformers ignores it when attention_factor is given", "remove it"),
    ({"type": "yarn", "factor": 2.0, "attention_factor": 0}, "model.rope_scaling.attention_factor: expected a number "
     "> 0", "got 0"),
    ({"type": "yarn", "factor": 2.0, "truncate": "no"}, "model.rope_scaling.truncate: expected true or false",
     "got 'no'"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512.0},
     "model.rope_scaling.original_max_position_embeddings: expected a positive integer", "got 512.0"),
    ({"type": "dynamic", "factor": 2.0, "rope_theta": 5e5}, "model.rope_scaling.rope_theta: the architecture's own "
     "RoPE setting", "remove it"),
    ({"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "model.rope_scaling.low_freq_factor: type 'linear' "
     "does not read low_freq_factor", "(linear reads: factor)"),
    ({"type": "llama3", "factor": 2.0, "high_freq_factor": 4.0}, "model.rope_scaling.low_freq_factor: required for "
     "type 'llama3'", "add it"),
    ({"type": "llama3", "factor": 2.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "model.rope_scaling.high_freq_factor: 4.0 is not above low_freq_factor 4.0", "give high_freq_factor >"),
    ({"type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, "model.rope_scaling.factor: "
     "1.0 gives 512 positions, not more than the original 512", "give a factor > 1"),
    ({"type": "longrope", "short_factor": [1.0] * HALF, "long_factor": [2.0] * HALF},
     "model.rope_scaling.factor: required for type 'longrope'", "factor: 2.0"),
    ({"type": "longrope", "factor": 2.0, "short_factor": [1.0] * HALF, "long_factor": [2.0] * (HALF - 1)},
     "model.rope_scaling.long_factor: expected a list of 8 numbers > 0", "16-dim heads"),
    ({"type": "longrope", "factor": 2.0, "short_factor": [0.0] * HALF, "long_factor": [2.0] * HALF},
     "model.rope_scaling.short_factor: expected a list of 8 numbers > 0", "got [0.0"),
]


@pytest.mark.parametrize("scaling, start, fix", ROPE_REFUSALS, ids=[str(r[0]) for r in ROPE_REFUSALS])
def test_rope_values_transformers_warns_about_or_ignores_are_refused_in_alignkits_words(scaling, start, fix):
    """transformers 5 only warns about these (the yarn factor mismatch with `warning_once`: said for the first model
    of a process, silent after) or ignores them in its formulas (row T24). Each is refused, every time, naming the key,
    the value and a fix; the caller's config is left as it was."""
    for _ in range(2):  # the second time too: transformers' warning_once says nothing then
        cfg = tiny_config("llama", vocab_size=64)
        before = (dict(cfg.rope_parameters), cfg.max_position_embeddings)
        with pytest.raises(ConfigError) as e:
            apply_rope_scaling(cfg, scaling)
        line = str(e.value)
        assert line.startswith(start) and fix in line and "\n" not in line, line
        assert (dict(cfg.rope_parameters), cfg.max_position_embeddings) == before


def test_whole_yarn_factors_and_int_attention_factors_are_taken_as_given():
    """The factors the yarn refusal suggests work: 512 x 2.0625 = 1056 positions (33 / 16), and an int
    attention_factor (which transformers' yarn validation warns of, as not a float) is recorded as the same float."""
    cfg = apply_rope_scaling(tiny_config("llama", vocab_size=64), {"type": "yarn", "factor": 2.0625,
                                                                  "attention_factor": 1})
    assert cfg.max_position_embeddings == 1056
    assert cfg.rope_parameters["attention_factor"] == 1.0 and isinstance(cfg.rope_parameters["attention_factor"], float)
    cfg = apply_rope_scaling(tiny_config("llama", vocab_size=64), {"type": "yarn", "factor": 2.0,
                                                                  "max_position_embeddings": 1024, "truncate": False})
    assert cfg.max_position_embeddings == 1024 and cfg.rope_parameters["truncate"] is False
