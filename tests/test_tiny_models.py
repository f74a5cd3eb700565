import torch

from alignkit.models.loading import load_model, load_tokenizer


def test_every_arch_round_trips_through_from_pretrained(tiny_dir, arch):
    folder = tiny_dir(arch)
    tok = load_tokenizer(folder)
    model = load_model(folder).eval()
    assert model.config.vocab_size == len(tok)
    ids = tok(["hello world", "the quick brown fox"], return_tensors="pt", padding=True)
    out = model(**ids)
    assert out.logits.shape == (2, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.logits).all()


def test_classifier_loads(tiny_classifier, tokenizer):
    model = tiny_classifier("llama", num_labels=1)
    ids = tokenizer(["a", "b c"], return_tensors="pt", padding=True)
    assert model(**ids).logits.shape == (2, 1)


def test_chat_template_present(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
