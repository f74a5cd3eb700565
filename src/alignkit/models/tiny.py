"""Tiny models and tokenizers built locally, from config: no hub, no download.

Used by the tests, the benchmarks and the embedded demo. A tokenizer is a byte-level BPE trained
on a small corpus with `tokenizers`, wrapped as a transformers fast tokenizer with a ChatML-style
chat template; a model is any supported architecture built from a small config with random weights.
Everything is saved to a folder and can be loaded back with `from_pretrained`, so the real loading
code is exercised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPTNeoXConfig, LlamaConfig,
    PreTrainedTokenizerFast, Qwen2Config,
)

from alignkit.settings.tiny import ARCHITECTURES  # the architectures built here (torch-free: settings check specs)

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|prompter|>", "<|assistant|>",
                  "<|system|>"]

# ChatML-style template. `add_generation_prompt` opens an assistant turn. Each turn ends with
# `<|im_end|>` + newline and no EOS (as Qwen's template does): a chat-trained model ends its answer with
# `<|im_end|>`, so generation should list it among the stop tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer: Paris.",
    "Hello! How can I help you today?",
    "def add(a, b):\n    return a + b\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Please answer politely and briefly. Thank you very much!",
    "user assistant system human",
]



def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a `PreTrainedTokenizerFast`."""
    texts = list(corpus) if corpus is not None else list(DEFAULT_CORPUS)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2, max_positions: int = 512,
                num_labels: int | None = None):
    """A small config of architecture `arch` (one of ARCHITECTURES)."""
    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, tie_word_embeddings=False)
    if num_labels is not None:
        common["num_labels"] = num_labels
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                           max_position_embeddings=max_positions, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                           max_position_embeddings=max_positions, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, max_position_embeddings=max_positions, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


def build_tiny_model(arch: str = "llama", tokenizer=None, *, classifier: bool = False, num_labels: int = 1,
                     seed: int = 0, **config_kwargs):
    """A randomly initialised tiny causal LM (or sequence classifier) sized to `tokenizer`."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      num_labels=num_labels if classifier else None, **config_kwargs)
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = cls.from_config(cfg)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(folder: str | Path, arch: str = "llama", corpus: Iterable[str] | None = None, *,
              classifier: bool = False, num_labels: int = 1, seed: int = 0, vocab_size: int = 512,
              **config_kwargs) -> Path:
    """Build a tiny tokenizer + model and save both to `folder` (safetensors). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(corpus, vocab_size=vocab_size)
    model = build_tiny_model(arch, tok, classifier=classifier, num_labels=num_labels, seed=seed, **config_kwargs)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    logger.info("saved tiny %s %s to %s", arch, "classifier" if classifier else "causal LM", folder)
    return folder
