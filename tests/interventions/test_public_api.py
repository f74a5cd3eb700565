"""The public ReFT API at the package level, and pyreft's trainable-parameter figure (LoReFT rank 4 at d=4096)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

PUBLIC = {  # name -> the module that defines it
    "ReftConfig": "alignkit.interventions.config", "RepresentationConfig": "alignkit.interventions.config",
    "get_reft_model": "alignkit.interventions.attach", "ReftModel": "alignkit.interventions.attach",
    "save_reft": "alignkit.interventions.io", "load_reft": "alignkit.interventions.loading",
    "load_pyreft": "alignkit.interventions.loading", "ReftTrainer": "alignkit.interventions.training",
}


def test_top_level_imports_are_the_defining_objects():
    from alignkit.interventions import (  # noqa: F401
        ReftConfig, ReftModel, ReftTrainer, RepresentationConfig, get_reft_model, load_pyreft, load_reft, save_reft,
    )
    import alignkit.interventions as pkg

    for name, module in PUBLIC.items():
        assert getattr(pkg, name) is getattr(sys.modules[module], name), name
        assert name in pkg.__all__ and name in dir(pkg)
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        pkg.NotAThing  # noqa: B018


def test_loreft_rank4_at_4096_has_pyreft_count():
    from alignkit.interventions import LoReFT

    iv = LoReFT(embed_dim=4096, low_rank_dimension=4)
    assert iv.num_trainable_parameters() == 4096 * 4 + 4 * 4096 + 4 == 32_772  # R (d·r) + W (r·d) + b (r)


def test_print_trainable_parameters_on_a_llama2_7b_shape_gives_pyreft_figures():
    """pyreft's README: LoReFT rank 4 on layer 15 of Llama-2-7B prints "trainable intervention params: 32,772 ||
    trainable model parameters: 0 / model params: 6,738,415,616 || trainable%: 0.00048634578018881287".
    The model is built on the meta device (shapes only, no memory)."""
    from alignkit.interventions import ReftConfig, get_reft_model

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    d, i, V, L = 4096, 11008, 32000, 32
    total = 2 * V * d + L * (4 * d * d + 3 * d * i + 2 * d) + d  # embed + head + (q,k,v,o, mlp, 2 norms) + norm
    assert total == 6_738_415_616
    reft = get_reft_model(base, ReftConfig.uniform([15], "loreft", low_rank_dimension=4))
    assert reft.count_parameters() == 32_772
    assert reft.print_trainable_parameters() == (
        "trainable intervention params: 32,772 || trainable model params: 0 || model params: 6,738,415,616 || "
        "trainable%: 0.0005")
    assert abs(100 * 32_772 / total - 0.00048634578018881287) < 1e-15  # the same ratio pyreft prints
