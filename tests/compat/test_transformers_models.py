"""transformers model internals alignkit relies on (rows M1-M10, M12, M13 of the table in
docs/architecture.md; the others are in test_transformers_config.py), checked on the tiny
architectures alignkit builds locally (llama, qwen2, gpt2, gpt_neox)."""

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

def test_empty_logits_to_keep_skips_the_head(lm):
    where = "alignkit/trainers/logps.py:final_hidden_states"
    name = type(lm).__name__
    check(accepts(lm.forward, "logits_to_keep"), TF, f"{name}.forward no longer names logits_to_keep", where,
          f"parameters: {params(lm.forward)}")
    with torch.no_grad(), guard(TF, f"{name}(logits_to_keep=<empty LongTensor>) failed", where):
        out = lm(input_ids=IDS, logits_to_keep=torch.empty(0, dtype=torch.long), use_cache=False)
    check(tuple(out.logits.shape) == (2, 0, lm.config.get_text_config().vocab_size), TF,
          f"{name}: logits_to_keep=<empty index> no longer projects zero positions (the LM head would run on "
          "every token)", where, f"logits {tuple(out.logits.shape)}")


# M2 ------------------------------------------------------------------------------------------------------

def test_backbone_output_times_head_is_the_logits(lm):
    """logps hooks `lm.base_model` (output[0] = final, normed hidden states) and applies
    `get_output_embeddings().weight` itself: h @ W^T must be the model's own logits."""
    where = "alignkit/trainers/logps.py:final_hidden_states/_head"
    name = type(lm).__name__
    backbone, head = lm.base_model, lm.get_output_embeddings()
    check(backbone is not lm and isinstance(head, torch.nn.Linear), TF,
          f"{name}.base_model / get_output_embeddings() no longer give the backbone and the LM head", where)
    got = []
    h = backbone.register_forward_hook(lambda m, a, o: got.append(o if isinstance(o, torch.Tensor) else o[0]))
    try:
        with torch.no_grad():
            logits = lm(input_ids=IDS, use_cache=False).logits
    finally:
        h.remove()
    check(len(got) == 1, TF, f"{name}: the backbone ran {len(got)} times in one forward", where)
    mine = got[0] @ head.weight.T + (head.bias if head.bias is not None else 0)
    check(torch.allclose(mine, logits, atol=1e-5), TF, f"{name}: backbone output x LM head weight != logits (the "
          "backbone's output is no longer the final normed hidden state?)", where,
          f"max diff {(mine - logits).abs().max().item():.3g}")


# M3 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_attend_block_diagonally(impl, tiny_dir, arch):
    """No attention mask + position_ids restarting at 0 => transformers builds a block-diagonal mask
    (masking_utils.find_packed_sequence_indices); alignkit's padding-free batches rely on it."""
    lm = load_model(tiny_dir(arch), attn_implementation=impl).eval()
    a, b = [5, 6, 7, 8], [9, 10, 11]
    batch = PackedSFTCollator()([{"input_ids": a, "completion_mask": [0, 0, 1, 1]},
                                 {"input_ids": b, "completion_mask": [0, 1, 1]}])
    with torch.no_grad():
        packed = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = lm(input_ids=torch.tensor([b]), use_cache=False).logits[0]
    check(torch.allclose(packed[4:7], alone, atol=1e-5), TF,
          f"{type(lm).__name__} ({impl}): sequences packed in one row (position_ids restarting, no attention_mask) "
          "attend across each other", "alignkit/data/collators.py:pack, trainers/logps.py:forward_kwargs",
          f"max diff {(packed[4:7] - alone).abs().max().item():.3g}")


# M12 -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_custom_4d_mask_is_used_as_given(impl, tiny_dir, arch):
    """A 4D `attention_mask` (B, 1, Q, K) reaches attention as given (boolean for sdpa, additive for eager), with
    the position_ids passed: alignkit's shared-prompt rows (`share_prompt`) hide the chosen tokens from the rejected."""
    from alignkit.data.collators import shared_prompt_layout
    from alignkit.trainers.logps import shared_attention_mask

    lm = load_model(tiny_dir(arch), attn_implementation=impl).eval()
    chosen, rejected = [5, 6, 7, 8], [5, 6, 9, 10, 11]
    lay = shared_prompt_layout(torch.tensor([chosen + [0], rejected]), torch.tensor([[1] * 4 + [0], [1] * 5]), 0)
    ids = lay["shared_input_ids"]  # 5 6 7 8 9 10 11
    mask = shared_attention_mask(lay["shared_segment_ids"], impl, torch.float32)
    with torch.no_grad():
        shared = lm(input_ids=ids, position_ids=lay["shared_position_ids"], attention_mask=mask, use_cache=False).logits[0]
        alone = lm(input_ids=torch.tensor([rejected]), use_cache=False).logits[0]
    check(torch.allclose(shared[4:], alone[2:], atol=1e-5), TF,
          f"{type(lm).__name__} ({impl}): a custom 4D attention_mask is not applied as given (the rejected tokens of a "
          "shared-prompt row see the chosen ones)", "alignkit/trainers/logps.py:shared_forward_kwargs",
          f"max diff {(shared[4:] - alone[2:]).abs().max().item():.3g}")


# M13 -----------------------------------------------------------------------------------------------------

def test_registered_attention_gets_forward_keywords_and_no_mask(lm):
    """A function registered in `AttentionInterface` and named by `config._attn_implementation` (read at each
    forward, from the config every layer shares) is called by every layer with the model-forward keywords it was
    not told about and no mask (no mask function is registered for its name): alignkit.models.varlen."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def probe(module, query, key, value, attention_mask, **kw):
        seen.append((attention_mask is None, kw.get("alignkit_probe")))
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True,
                                      **{k: v for k, v in kw.items() if k != "alignkit_probe"})

    where = "alignkit/models/varlen.py:varlen_attention/varlen_sdpa_attention, trainers/packing.py:VARLEN_MODEL_TYPES"
    with guard(TF, "AttentionInterface.register / config._attn_implementation moved", where):
        AttentionInterface.register("alignkit_compat_probe", probe)
        before = lm.config._attn_implementation
        lm.config._attn_implementation = "alignkit_compat_probe"
        try:
            with torch.no_grad():
                lm(input_ids=IDS[:1], use_cache=False, alignkit_probe="layout")
        finally:
            lm.config._attn_implementation = before
    n = lm.config.num_hidden_layers
    check(seen == [(True, "layout")] * n, TF, f"{type(lm).__name__}: a registered attention function is not called by "
          f"every layer with the forward's keywords and no mask (seen {seen}, {n} layers)", where)


# M4 ------------------------------------------------------------------------------------------------------

def test_flash_varlen_keyword_names():
    where = "alignkit/trainers/logps.py:forward_kwargs (packed flash-attention rows)"
    with guard(TF, "transformers.modeling_flash_attention_utils.FlashAttentionKwargs moved", where):
        from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    keys = set(getattr(FlashAttentionKwargs, "__annotations__", {}))
    need = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    check(need <= keys, TF, f"flash-attention varlen kwargs renamed (missing {sorted(need - keys)})", where,
          f"FlashAttentionKwargs: {sorted(keys)}")


# M5, M6 ------------------------------------------------------------------------------------------------------

def test_attn_implementation_and_dtype_reach_the_config(tiny_dir):
    where = "alignkit/models/loading.py:load_model; compat.attn_implementation (trainers/base.py:packed_collator)"
    default = load_model(tiny_dir("llama"))
    check(attn_implementation(default.config) == "sdpa", TF, "the default attention implementation on CPU is no "
          "longer 'sdpa'", where, repr(default.config._attn_implementation))
    with guard(TF, "from_pretrained(attn_implementation='eager', dtype=torch.bfloat16) failed", where):
        eager = load_model(tiny_dir("llama"), attn_implementation="eager", dtype="bfloat16")
    check(attn_implementation(eager.config) == "eager", TF, "config._attn_implementation does not report the "
          "implementation asked for", where, repr(eager.config._attn_implementation))
    check(next(eager.parameters()).dtype == torch.bfloat16, TF, "from_pretrained(dtype=...) no longer sets the "
          "parameters' dtype (renamed back from torch_dtype?)", where)


# M7 ------------------------------------------------------------------------------------------------------

def test_decoder_layers_call_convention(lm):
    """ReFT hooks find the layer list by length, read the hidden states as the first positional argument (or
    `hidden_states=`), and edit a Tensor output (or a tuple's first element)."""
    where = "alignkit/interventions/locate.py:find_decoder_layers, attach.py:_register, editing.py:first_tensor"
    name = type(lm).__name__
    with guard(TF, f"{name}: decoder layers or their attention / MLP children not found", where):
        _, layers = find_decoder_layers(lm)
        for comp in ("attention_output", "mlp_output", "block_output"):
            resolve_component(lm, ReftConfig.uniform([1], component=comp).representations[0])
    seen_in, seen_out = [], []
    h1 = layers[1].register_forward_pre_hook(lambda m, a, k: seen_in.append(first_tensor(a, k)), with_kwargs=True)
    h2 = layers[1].register_forward_hook(lambda m, a, o: seen_out.append(o if isinstance(o, torch.Tensor) else o[0]))
    try:
        with torch.no_grad():
            lm(input_ids=IDS, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    d = hidden_size(lm)
    shape = (2, IDS.shape[1], d)
    check(seen_in and seen_in[0] is not None and tuple(seen_in[0].shape) == shape, TF,
          f"{name}: decoder layers no longer receive the hidden states as their first argument or `hidden_states=` "
          "(ReFT input hooks would silently skip)", where, f"saw {[None if t is None else tuple(t.shape) for t in seen_in]}")
    check(seen_out and tuple(seen_out[0].shape) == shape, TF, f"{name}: a decoder layer's output is no longer the "
          "hidden states (or a tuple starting with them)", where)


# M8 ------------------------------------------------------------------------------------------------------

def test_activation_checkpointing_replays_reach_intervention_hooks(tiny_dir):
    """alignkit enables checkpointing with `activation_checkpointing_enable(activation_checkpointing_kwargs=,
    every_n_layers=)`, tells replays apart by the layer's `gradient_checkpointing` flag, and re-applies the
    intervention when a checkpointed layer is replayed in backward: gradients must equal the plain run's."""
    where = "alignkit/interventions/attach.py:activation_checkpointing_enable/_register_state_hooks, adapters/api.py"
    from transformers import PreTrainedModel

    check(params(PreTrainedModel.activation_checkpointing_enable)[:3] == ["activation_checkpointing_kwargs",
                                                                           "every_n_layers", "offload"], TF,
          f"activation_checkpointing_enable now takes {params(PreTrainedModel.activation_checkpointing_enable)}", where)
    check(callable(getattr(PreTrainedModel, "enable_input_require_grads", None)), TF,
          "PreTrainedModel.enable_input_require_grads is gone", where)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    loc = torch.tensor([[1, 4, 6]])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        base = load_model(tiny_dir("llama"))
        reft = get_reft_model(base, ReftConfig.uniform([0, 1], "loreft", component="mlp_output", low_rank_dimension=2))
        reft.train()
        if ckpt:
            reft.activation_checkpointing_enable({"use_reentrant": False})
            _, layers = find_decoder_layers(base)
            check(all(getattr(layer, "gradient_checkpointing", False) for layer in layers), TF,
                  "decoder layers no longer carry `gradient_checkpointing = True` when checkpointing is on", where)
        out = reft(input_ids=ids, intervention_locations=loc, labels=ids, use_cache=False)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in reft.interventions.named_parameters() if p.grad is not None})
    plain, ck = grads
    check(plain and plain.keys() == ck.keys() and all(torch.allclose(plain[n], ck[n], atol=1e-6) for n in plain), TF,
          "with activation checkpointing, intervention gradients differ from the plain run (the replayed layer no "
          "longer runs under the hooks' state)", where)


# M9 ------------------------------------------------------------------------------------------------------

def test_config_text_config_and_name_or_path(tiny_dir, tmp_path):
    where = "alignkit/trainers/reference.py:model_fingerprint, interventions/locate.py, interventions/io.py:base_identity"
    a = load_model(tiny_dir("llama"))
    copy = shutil.copytree(tiny_dir("llama"), tmp_path / "copy")
    b = load_model(copy)
    check(a.config.get_text_config() is a.config, TF, "config.get_text_config() of a text model is no longer the "
          "config itself", where)
    check("_name_or_path" in a.config.to_dict(), TF, "config.to_dict() no longer holds `_name_or_path`", where)
    check(model_fingerprint(a) == model_fingerprint(b), TF, "the same weights loaded from two folders fingerprint "
          "differently (a path-dependent config field besides `_name_or_path`?): the reference cache would never hit",
          where)


# M10 -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_classifier_pools_the_last_non_pad_token(arch, tiny_classifier):
    """Reward models are called on right-padded batches; transformers must read the score at each row's last
    non-pad token (it compares input_ids with config.pad_token_id)."""
    where = "alignkit/online/annotators.py:RewardModelAnnotator.annotate, trainers/reward.py:sequence_rewards"
    rm = tiny_classifier(arch, num_labels=1)
    pad = rm.config.pad_token_id
    rows = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids = torch.tensor([rows[0], rows[1] + [pad, pad]])
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    with torch.no_grad():
        batch = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
        single = torch.stack([rm(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
    check(torch.allclose(batch, single, atol=1e-5), TF, f"{type(rm).__name__}: the pooled score of a right-padded "
          "row is no longer its last non-pad token's", where, f"{batch.tolist()} vs {single.tolist()}")
