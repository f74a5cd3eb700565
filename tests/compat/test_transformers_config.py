"""transformers configuration, rope, saving, loss and dropout behaviour alignkit relies on (rows M11, M14-M17
and some T rows of the table in docs/architecture.md; split from
test_transformers_models.py), on the tiny local architectures.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from alignkit.compat import attn_implementation
from alignkit.data.collators import PackedSFTCollator
from alignkit.interventions import ReftConfig
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.editing import first_tensor
from alignkit.interventions.io import text_model_type
from alignkit.interventions.locate import find_decoder_layers, hidden_size, resolve_component
from alignkit.models.loading import load_model
from alignkit.models.tiny import ARCHITECTURES
from alignkit.trainers.reference import model_fingerprint

from .guards import accepts, check, guard, params

TF = "transformers"
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


@pytest.fixture(params=ARCHITECTURES)
def lm(request, tiny_lm):
    return tiny_lm(request.param)


# M1 ------------------------------------------------------------------------------------------------------



# M11 -----------------------------------------------------------------------------------------------------

def test_rope_parameters_init_functions_and_validation():
    """`model.rope_scaling` merges into `config.rope_parameters`, checks the type against
    `modeling_rope_utils.ROPE_INIT_FUNCTIONS` (and whether the architecture's modeling module imports it), and turns
    `config.validate_rope()`'s warnings on the "transformers.modeling_rope_utils" logger into errors."""
    import copy
    import importlib
    import logging

    from transformers import GPT2Config, LlamaConfig

    where = "alignkit/models/rope.py:has_rope/supported_rope_types/_validate"
    with guard(TF, "transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS moved", where):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    need = {"linear", "dynamic", "yarn", "llama3", "longrope"}
    check(need <= set(ROPE_INIT_FUNCTIONS), TF, f"ROPE_INIT_FUNCTIONS lost {sorted(need - set(ROPE_INIT_FUNCTIONS))}",
          where)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
    params = getattr(cfg, "rope_parameters", None)
    check(isinstance(params, dict) and params.get("rope_type") == "default" and "rope_theta" in params, TF,
          "LlamaConfig.rope_parameters is no longer a dict with rope_type / rope_theta", where, repr(params))
    check(not getattr(GPT2Config(), "rope_parameters", None), TF, "GPT2Config now has rope_parameters", where)
    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    check(hasattr(llama, "ROPE_INIT_FUNCTIONS"), TF, "modeling_llama no longer imports ROPE_INIT_FUNCTIONS (alignkit "
          "reads that as 'plain RoPE only')", where)
    msgs: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())

    trial = copy.deepcopy(cfg)
    trial.rope_parameters = {**params, "rope_type": "linear", "factor": 2.0, "bogus": 1}
    log = logging.getLogger("transformers.modeling_rope_utils")
    handler = Keep()
    log.addHandler(handler)
    try:
        with guard(TF, "config.validate_rope() failed on a valid linear scaling with one unknown key", where):
            trial.validate_rope()
    finally:
        log.removeHandler(handler)
    check(any("bogus" in m for m in msgs), TF, "validate_rope() no longer reports unknown rope_parameters keys on the "
          "'transformers.modeling_rope_utils' logger (alignkit would accept them silently)", where, str(msgs))


# M14 -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_last_layer_restatement_equals_the_layer(arch, tiny_dir):
    """`alignkit.models.last_layer` re-states the last decoder layer (input_layernorm -> q/k/v -> the module's
    `apply_rotary_pos_emb` -> sdpa -> o_proj -> residual -> post_attention_layernorm -> mlp -> residual) to run it
    on the read positions only: at those positions its states must be the model's own, for a padded batch."""
    from alignkit.models import last_layer
    from alignkit.trainers.logps import backbone_output

    where = "alignkit/models/last_layer.py:_forward"
    lm = load_model(tiny_dir(arch)).eval()
    name = type(lm.base_model.layers[-1]).__name__
    check(lm.config.model_type in last_layer.SUPPORTED, TF, f"{arch} is not a family alignkit re-states", where)
    check(last_layer.unusable_reason(lm, {"use_cache": False}) is None, TF,
          f"{name}: the re-stated forward no longer applies", where, str(last_layer.unusable_reason(lm, {"use_cache": False})))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    kw = {"input_ids": ids, "attention_mask": (ids != 0).long(), "use_cache": False}
    read = torch.tensor([2, 6, 7, 10])  # (row 0, col 2), (0, 6), (1, 0), (1, 3)
    with torch.no_grad(), guard(TF, f"{name}: the re-stated last layer failed", where):
        full, _ = backbone_output(lm, kw)
        part, _ = backbone_output(lm, kw, read=read)
    d = full.shape[-1]
    got, want = part.reshape(-1, d)[read], full.reshape(-1, d)[read]
    check(torch.allclose(got, want, rtol=1e-5, atol=1e-6), TF,
          f"{name}'s forward is no longer what alignkit.models.last_layer re-states: the read positions' states "
          "differ from the model's own", where, f"max |difference| {float((got - want).abs().max()):.3g}")


def test_last_layer_sees_a_sliding_window_layer():
    """`alignkit.models.last_layer` re-states full attention only; it reads a Qwen2 layer's window from
    `self_attn.sliding_window` (None for full attention) and must see one set on a sliding last layer."""
    from alignkit.models import last_layer

    where = "alignkit/models/last_layer.py:unusable_reason"
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    attn = lm.base_model.layers[-1].self_attn
    check(getattr(attn, "sliding_window", None) == 4, TF, "Qwen2Attention no longer keeps its window in "
          "`sliding_window`: a sliding last layer would be re-stated as full attention", where,
          f"sliding_window={getattr(attn, 'sliding_window', '<missing>')!r}, layer_types={lm.config.layer_types}")
    check("sliding" in str(last_layer.unusable_reason(lm, {"use_cache": False})), TF,
          "a sliding-window last layer is not refused", where)


# M15 -----------------------------------------------------------------------------------------------------

def test_no_split_modules_name_the_decoder_layer_class(lm):
    """Under FSDP2 the frozen reference is sharded with `fully_shard` on each module whose class name is in the
    model's private `_no_split_modules`: it must name the decoder layer class, or no layer becomes a unit of its own
    and each process gathers the whole reference at once (results unchanged, memory of an unsharded copy)."""
    where = "alignkit/distributed.py:shard_reference"
    _, layers = find_decoder_layers(lm)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    check(type(layers[0]).__name__ in names, TF, f"{type(lm).__name__}._no_split_modules no longer names its decoder "
          "layer class", where, f"_no_split_modules: {sorted(names)}, layer class: {type(layers[0]).__name__}")


# M16 -----------------------------------------------------------------------------------------------------

def test_save_pretrained_writes_the_files_a_full_save_names(tiny_lm, tmp_path):
    """`Full.other_files` names what transformers' `save_pretrained` writes besides config.json (model.safetensors,
    or shards and their index, and generation_config.json), and `Lora.weight_files` what peft's writes: a later
    save of another kind into the folder removes those, so a file of either named otherwise would stay beside it
    (a whole model's weights next to an adapter, read by from_pretrained)."""
    from peft import LoraConfig, get_peft_model

    from alignkit.adapters.full import Full
    from alignkit.adapters.lora import Lora

    where = "alignkit/adapters/full.py:Full.other_files, adapters/lora.py:Lora.weight_files (base.py:Adapter.save)"
    for shard in (None, "20KB"):
        folder = tmp_path / f"full-{shard}"
        tiny_lm("llama").save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        written = {p.name for p in folder.iterdir()}
        check(written == Full.saved_files(folder) and len(written) > (3 if shard else 2), TF,
              "save_pretrained writes files Full.other_files does not name", where,
              f"written {sorted(written)}, named {sorted(Full.saved_files(folder))}")
    folder = tmp_path / "lora"
    get_peft_model(tiny_lm("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    written = {p.name for p in folder.iterdir()} - {"README.md"}  # peft's model card: a README is the user's too
    check(written == Lora.saved_files(folder), "peft", "peft's save_pretrained writes files Lora does not name",
          where, f"written {sorted(written)}")


def test_dynamic_ntk_frequencies_follow_the_longest_sequence_run_since_a_short_one():
    """transformers' dynamic NTK RoPE (`modeling_rope_utils.dynamic_rope_update`) rescales the base for
    max(position_ids) + 1 of the call when that grows past what it has cached, keeps those frequencies for later, shorter
    calls, and resets them only for a call shorter than max_position_embeddings; so a sequence past that length is
    encoded by the longest one run since (and by the rows batched with it), which `check_context` warns about.
    Frequencies by hand: theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    where = "alignkit/models/rope.py:check_context (dynamic NTK warning)"
    theta, d, l0, factor = 10000.0, 16, 16, 2.0
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=l0,
                      rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": theta})
    model = LlamaForCausalLM(cfg).eval()

    def inv(length: int | None) -> torch.Tensor:
        base = theta if length is None else theta * (factor * length / l0 - (factor - 1)) ** (d / (d - 2))
        return base ** (-torch.arange(0, d, 2).double() / d)

    with guard("transformers", "LlamaRotaryEmbedding.inv_freq after a dynamic forward changed", where):
        seen = []
        for length in (24, 40, 24, 8, 24):
            with torch.no_grad():
                model(torch.zeros(1, length, dtype=torch.long))
            seen.append(model.model.rotary_emb.inv_freq.double())
    for got, want, what in zip(seen, (inv(24), inv(40), inv(40), inv(None), inv(24)),
                               ("24 tokens: rescaled for 24", "40 tokens: for 40", "24 after 40: still for 40",
                                "8 tokens (below 16): reset", "24 after the reset: for 24")):
        check(torch.allclose(got, want, rtol=1e-5), "transformers", f"dynamic NTK frequencies, {what}, changed", where,
              f"got {got.tolist()}, by hand {want.tolist()}")


# M17 -----------------------------------------------------------------------------------------------------

def test_config_mapping_maps_a_composite_type_to_its_text_type():
    """A ReFT folder saved with a composite's top-level model_type (gemma3) is accepted on the model whose text
    config has the type `CONFIG_MAPPING[type]().get_text_config().model_type` gives (gemma3_text); a text model's
    type maps to itself."""
    where = "alignkit/interventions/io.py:text_model_type (_check_base)"
    got = {t: text_model_type(t) for t in ("gemma3", "llava", "llama", "gemma3_text")}
    check(got == {"gemma3": "gemma3_text", "llava": "llama", "llama": "llama", "gemma3_text": "gemma3_text"}, TF,
          "CONFIG_MAPPING[model_type]().get_text_config().model_type no longer names a composite's text type",
          where, f"{got}")


# T24 -----------------------------------------------------------------------------------------------------

def test_rope_validation_only_warns_and_the_formulas_ignore_what_alignkit_refuses():
    """What `models/rope_checks.py` refuses in its own words, because transformers does not: its
    `validate_rope()` takes exactly the keys of `TYPE_KEYS` per type (another one is only warned about), only warns
    (with `warning_once` for the yarn factor / length mismatch) and then uses the explicit factor; the yarn formula
    reads beta_fast 0 as 32 and uses mscale only with mscale_all_dim and without attention_factor."""
    import copy
    import logging

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from alignkit.models.rope_checks import TYPE_KEYS

    where = "alignkit/models/rope_checks.py:check_keys/yarn_length/check_values"
    base = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                       max_position_embeddings=512)
    msgs: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())

    def trial(params: dict, length: int = 1024):
        cfg = copy.deepcopy(base)
        cfg.rope_parameters = {"rope_theta": 10000.0, **params}
        cfg.max_position_embeddings = length
        return cfg

    def validate(params: dict, length: int = 1024) -> list[str]:
        msgs.clear()
        log = logging.getLogger("transformers.modeling_rope_utils")
        handler = Keep()
        log.addHandler(handler)
        try:
            with guard(TF, f"validate_rope() raised on {params}", where):
                trial(params, length).validate_rope()
        finally:
            log.removeHandler(handler)
        return list(msgs)

    full = {"factor": 2.0, "original_max_position_embeddings": 512, "attention_factor": 1.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": True, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    for kind, keys in TYPE_KEYS.items():
        said = validate({"rope_type": kind, **{k: full[k] for k in keys}})
        check(not any("Unrecognized" in m for m in said), TF, f"validate_rope() no longer takes {kind} keys "
              f"{keys} (alignkit would refuse keys transformers reads)", where, str(said))
        said = validate({"rope_type": kind, **{k: full[k] for k in keys}, "bogus": 1})
        check(any("Unrecognized" in m and "bogus" in m for m in said), TF, f"validate_rope() no longer reports "
              f"unknown {kind} keys", where, str(said))
    # 512 x 2.1 recorded as 1075: a warning (once per process), no error, and the explicit factor is used
    yarn = {"rope_type": "yarn", "factor": 2.1, "original_max_position_embeddings": 512}
    validate(yarn, 1075)
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](trial(yarn, 1075), "cpu")
    inv_exact, scale_exact = ROPE_INIT_FUNCTIONS["yarn"](trial(yarn, 1076), "cpu")
    check(torch.equal(inv, inv_exact) and scale == scale_exact == 0.1 * math.log(2.1) + 1.0, TF, "yarn no longer "
          "uses the explicit factor whatever max_position_embeddings says (alignkit refuses the mismatch)", where)
    # llama3 with no longer context: a warning, no error
    said = validate({"rope_type": "llama3", "factor": 1.0, "original_max_position_embeddings": 512,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 512)
    check(any("must be less than max_position_embeddings" in m for m in said), TF, "llama3's original >= max "
          "warning changed", where, str(said))
    two = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512}
    plain, plain_scale = ROPE_INIT_FUNCTIONS["yarn"](trial(two), "cpu")
    for extra in ({"beta_fast": 0}, {"mscale": 2.0}, {"mscale_all_dim": 2.0}):
        inv, scale = ROPE_INIT_FUNCTIONS["yarn"](trial({**two, **extra}), "cpu")
        check(torch.equal(inv, plain) and scale == plain_scale, TF, f"yarn now reads {extra} (alignkit refuses it as "
              "ignored)", where)
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](trial({**two, "attention_factor": 1.5, "mscale": 2.0,
                                                   "mscale_all_dim": 1.0}), "cpu")
    check(scale == 1.5, TF, "yarn's mscale now overrides attention_factor (alignkit refuses both)", where, str(scale))
    # "proportional" (refused as a scaling: models/rope.py LAYOUTS): no factor in its validation, and its
    # partial_rotary_factor leaves that share of each head's frequencies at 0 (unrotated): a layout, not a scaling
    said = validate({"rope_type": "proportional", "factor": 2.0})
    check(any("Unrecognized" in m and "factor" in m for m in said), TF, "proportional RoPE's validation now takes a "
          "factor (it may be a context scaling now: revisit models/rope.py LAYOUTS)", where, str(said))
    inv, _ = ROPE_INIT_FUNCTIONS["proportional"](trial({"rope_type": "proportional", "partial_rotary_factor": 0.5}),
                                                 "cpu")
    check(inv.shape == (8,) and torch.count_nonzero(inv[4:]) == 0 and bool((inv[:4] > 0).all()), TF, "proportional "
          "RoPE with partial_rotary_factor 0.5 no longer leaves half of a 16-dim head's 8 frequencies at 0", where,
          str(inv.tolist()))


def test_a_damaged_generation_config_falls_back_to_config_json_without_an_error(tiny_dir, tmp_path):
    """Row T27: `from_pretrained` turns a generation_config.json that is not JSON into an OSError it catches, and
    builds the generation config from config.json (an info log): its end tokens (here a list of two) are gone
    without an error. serve's `check_base_json` refuses such a folder before loading it."""
    where = "alignkit/serve/stack.py:check_base_json"
    folder = tmp_path / "base"
    shutil.copytree(tiny_dir("llama"), folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 4],')
    with guard(TF, "from_pretrained now raises on a damaged generation_config.json", where):
        model = load_model(folder)
    check(model.generation_config.eos_token_id == model.config.eos_token_id == 2, TF,
          "a damaged generation_config.json no longer falls back to config.json's ids", where,
          f"{model.generation_config.eos_token_id}")


def test_a_causal_lm_loss_skips_labels_of_minus_100_and_predicts_each_label_from_the_token_before(tiny_lm):
    """Row T29: a causal LM's loss (transformers' ForCausalLMLoss) leaves out every label -100 and scores label t
    against the logits at t - 1. alignkit reads a pyreft batch by the same rule: the tokens before a row's first
    label != -100 are its prompt, where ReFT positions go (`ReftModel.forward(labels=...)`, ReftTrainer)."""
    where = "alignkit/interventions/positions.py:completion_mask_from_labels"
    model = tiny_lm("llama")
    ids = torch.tensor([[5, 9, 14, 20, 33, 41]])
    labels = ids.clone()
    labels[0, :3] = -100  # prompt: tokens 0-2; targets: tokens 3-5, predicted from the logits at 2-4
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[0, 2:5].float(), ids[0, 3:6])
    check(math.isclose(float(out.loss), float(want), rel_tol=1e-5), TF,
          "a causal LM's loss no longer skips labels of -100 and scores label t at logits t - 1", where,
          f"loss {float(out.loss)} against {float(want)} over targets 3-5")


def test_falcon_decoder_layers_read_their_dropout_rates_from_the_config_in_forward():
    """T36: FalconDecoderLayer.forward applies `self.config.hidden_dropout` / `attention_dropout` functionally (no
    nn.Dropout, no module attribute), so turn_off_dropout cannot reach them without changing the saved config:
    two training-mode forwards still differ after the sweep, and `rates_read_from_config` names both. If transformers
    moves the rates to a module attribute, the sweep covers them and this row and its warning can go."""
    import transformers

    from alignkit.trainers import turn_off_dropout
    from alignkit.trainers.base import is_dropout_rate
    from alignkit.trainers.config_dropout import rates_read_from_config

    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, hidden_dropout=0.5,
        attention_dropout=0.25))
    turn_off_dropout(model)
    model.train()
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert rates_read_from_config(model, is_dropout_rate) == {"FalconDecoderLayer: config.hidden_dropout": 0.5,
                                                               "FalconDecoderLayer: config.attention_dropout": 0.25}


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral", "Gemma", "Qwen3", "Phi3"])
def test_attention_modules_keep_their_dropout_rate_as_attention_dropout(arch):
    """T35: these attention modules keep config.attention_dropout as the float attribute `attention_dropout` and
    pass it to the attention function in training mode, not through an nn.Dropout (turn_off_dropout zeroes float
    rates named like dropouts, `is_dropout_rate`; a rename to a name without "dropout" would leave it on)."""
    import inspect

    import transformers

    from alignkit.trainers.base import is_dropout_rate

    cfg = getattr(transformers, f"{arch}Config")(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=8, attention_dropout=0.25, pad_token_id=0)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    attn = [m for m in model.modules() if type(m).__name__ == f"{arch}Attention"]
    assert len(attn) == 1
    rates = {k: v for k, v in vars(attn[0]).items() if is_dropout_rate(k, v)}
    assert rates == {"attention_dropout": 0.25}, rates
    src = inspect.getsource(type(attn[0]).forward)
    assert "self.attention_dropout" in src and "self.training" in src
