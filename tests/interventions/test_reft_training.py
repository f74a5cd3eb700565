"""ReftTrainer (pyreft's name for alignkit's SFTTrainer): pyreft's emoji-style memorisation on a tiny Llama,
resume, checkpointing, classifier; every folder it writes is an adapter folder `load_adapter` reads.

The base is a random tiny Llama. Two choices make memorisation by a ReFT alone possible (measured):
initializer_range=0.2 (at the default 0.02 the unembedding rows are so small that no hidden state gives a
token more than ~1.3 logits of margin, so the loss cannot go below ~5) and 4 layers (with 2, the stop
token after a one-word answer, a position no intervention touches, plateaus at p(EOS) ~ 0.75).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from alignkit.data.reft_data import encode_prompts, make_classification_data_module, \
    make_multiple_position_supervised_data_module
from alignkit.interventions.attach import get_reft_model
from alignkit.interventions.config import ReftConfig
from alignkit.interventions.loading import load_reft
from alignkit.interventions.training import ReftTrainer
from alignkit.adapters import load_adapter, read_adapter_config
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.models.tiny import build_tiny_tokenizer, tiny_config

PAIRS = [("What is the capital of France?", " Paris."), ("What color is a clear sky?", " Blue."),
         ("How many legs does a spider have?", " Eight."), ("Who wrote Hamlet?", " Shakespeare."),
         ("What do bees make?", " Honey."), ("What is frozen water called?", " Ice."),
         ("Which animal says moo?", " A cow."), ("What is the largest ocean?", " The Pacific."),
         ("Say hello in Spanish.", " Hola!"), ("What is two plus three?", " Five.")]
PROMPTS, ANSWERS = [p for p, _ in PAIRS], [a for _, a in PAIRS]
POSITIONS, LAYERS, RANK = "f5+l5", [0, 1, 2, 3], 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reft-base")
    tok = build_tiny_tokenizer([p + a for p, a in PAIRS], vocab_size=400)
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=64, num_layers=4, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_reft(base_dir, seed=0):
    torch.manual_seed(seed)
    return get_reft_model(load_model(base_dir), ReftConfig.uniform(LAYERS, "loreft", low_rank_dimension=RANK))


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=len(PAIRS), learning_rate=2e-2, max_steps=200,
                lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=1, save_strategy="no",
                report_to=[], disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def data(tok, padding_side="right"):
    return make_multiple_position_supervised_data_module(tok, PROMPTS, ANSWERS, positions=POSITIONS,
                                                         num_interventions=len(LAYERS), padding_side=padding_side)


def greedy(reft, tok):
    enc = encode_prompts(tok, PROMPTS, positions=POSITIONS, num_interventions=len(LAYERS))
    with torch.no_grad():
        out = reft.generate(**enc, max_new_tokens=8, do_sample=False)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_emoji_memorisation_save_and_reload(base_dir, tmp_path):
    tok = load_tokenizer(base_dir)
    reft = make_reft(base_dir)
    mod = data(tok)
    trainer = ReftTrainer(model=reft, args=args(tmp_path / "run"), train_dataset=mod["train_dataset"],
                          data_collator=mod["data_collator"], processing_class=tok)
    assert trainer.args.remove_unused_columns is False  # intervention_locations survive
    trainer.train()
    assert losses(trainer)[-1] < 0.05
    reft.eval()
    assert greedy(reft, tok) == ANSWERS
    with reft.disable_adapters():  # the base alone does not know the answers
        assert sum(g == a for g, a in zip(greedy(reft, tok), ANSWERS)) == 0

    trainer.save_model(str(tmp_path / "final"))
    files = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert "interventions.safetensors" in files and "reft_config.json" in files
    assert not any(f.startswith(("model", "pytorch_model")) or f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.loads((tmp_path / "final" / "training_args.json").read_text())["learning_rate"] == 2e-2
    reloaded = load_reft(load_model(base_dir), tmp_path / "final").eval()
    assert greedy(reloaded, tok) == ANSWERS
    # an ordinary adapter folder: load_adapter (model.adapter_path) reads it, and the positions the data used
    # were saved, so plain generate(**inputs) without locations edits what training edited
    assert "alignkit_adapter.json" in files
    assert read_adapter_config(tmp_path / "final").reft.positions == POSITIONS
    adapter = load_adapter(load_model(base_dir), tmp_path / "final").eval()
    enc = encode_prompts(tok, PROMPTS, positions=POSITIONS, num_interventions=len(LAYERS))
    enc.pop("intervention_locations")
    with torch.no_grad():
        out = adapter.generate(**enc, max_new_tokens=8, do_sample=False)
    assert [tok.decode(r[enc["input_ids"].shape[1]:], skip_special_tokens=True) for r in out] == ANSWERS


def test_resume_reproduces_losses(base_dir, tmp_path):
    tok = load_tokenizer(base_dir)
    kw = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
              save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
    mod = data(tok, padding_side="left")
    full = ReftTrainer(model=make_reft(base_dir), args=args(tmp_path / "a", **kw), train_dataset=mod["train_dataset"],
                       data_collator=mod["data_collator"])
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"interventions.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert "model.safetensors" not in names and "training_args.bin" not in names
    assert read_adapter_config(ckpt).kind == "reft"  # a checkpoint is an adapter folder too
    assert load_adapter(load_model(base_dir), ckpt).adapter_configs["default"].positions == POSITIONS

    resumed = ReftTrainer(model=make_reft(base_dir, seed=123), args=args(tmp_path / "b", **kw),
                          train_dataset=mod["train_dataset"], data_collator=mod["data_collator"])
    resumed.train(resume_from_checkpoint=str(ckpt))
    want, got = losses(full)[3:], losses(resumed)
    assert len(want) == 3 and len(got) >= 3
    assert got[-3:] == pytest.approx(want, abs=1e-5)
    for a, b in zip(full.model.interventions.parameters(), resumed.model.interventions.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_checkpointing_matches(base_dir, tmp_path):
    tok = load_tokenizer(base_dir)
    mod = data(tok)
    runs = []
    for gc in (False, True):
        t = ReftTrainer(model=make_reft(base_dir), args=args(tmp_path / str(gc), max_steps=3, activation_checkpointing=gc),
                        train_dataset=mod["train_dataset"], data_collator=mod["data_collator"])
        t.train()
        layers = t.model.model.model.layers
        assert all(getattr(layer, "gradient_checkpointing", False) == gc for layer in layers)
        runs.append((losses(t), [p.detach().clone() for p in t.model.interventions.parameters()]))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(runs[0][1], runs[1][1]))
    fresh = [p.detach() for p in make_reft(base_dir).interventions.parameters()]
    assert not all(torch.allclose(a, b) for a, b in zip(runs[0][1], fresh))  # it did train


def test_classifier_reft_trains(tiny_classifier, tokenizer, tmp_path):
    torch.manual_seed(0)
    reft = get_reft_model(tiny_classifier("llama", num_labels=2), ReftConfig.uniform([1], "loreft", low_rank_dimension=4))
    texts = ["Hello! How can I help you today?", "The quick brown fox jumps.", "Thank you very much!",
             "def add(a, b):", "Please answer politely.", "0 1 2 3 4 5"]
    mod = make_classification_data_module(tokenizer, texts, [1, 0, 1, 0, 1, 0], positions="l1", padding_side="left")
    trainer = ReftTrainer(model=reft, args=args(tmp_path, max_steps=30, per_device_train_batch_size=6),
                          train_dataset=mod["train_dataset"], data_collator=mod["data_collator"])
    trainer.train()
    hist = losses(trainer)
    assert hist[0] > 0.5 and hist[-1] < 0.5 * hist[0]
    assert all(not p.requires_grad for p in reft.model.parameters())


def test_positions_come_from_the_collator_or_must_agree_with_it(tiny_lm, tokenizer, tmp_path):
    from alignkit.data.reft_data import make_last_position_supervised_data_module
    from alignkit.adapters import save_adapter

    data = make_last_position_supervised_data_module(tokenizer, PROMPTS[:2], ANSWERS[:2])
    bare = get_reft_model(tiny_lm(), ReftConfig.uniform([0], "loreft", low_rank_dimension=2))
    with pytest.raises(ValueError, match="no position spec"):  # nothing says which positions it was trained on
        save_adapter(bare, tmp_path / "bare")
    ReftTrainer(model=bare, args=args(tmp_path / "a", max_steps=1), **data)
    assert (bare.adapter_configs["default"].positions, bare.adapter_configs["default"].share_weights) == ("l1", True)
    spec = dataclasses.replace(ReftConfig.uniform([0], "loreft", low_rank_dimension=2), positions="f1+l1")
    other = get_reft_model(tiny_lm(), spec)
    with pytest.raises(ValueError, match=r"positions \('f1\+l1'.*disagree"):
        ReftTrainer(model=other, args=args(tmp_path / "b", max_steps=1), **data)


def test_a_pyreft_batch_labelled_from_its_first_token_is_refused_not_trained_without_positions(tiny_lm, tmp_path):
    """A pyreft-style collator giving labels = input_ids (no -100 on a prompt) and no completion_mask: the wrapper
    derived completion_mask = all ones, each row's prompt was empty and the interventions had no position to edit:
    the run trained nothing, without a word. Now the first batch stops with the row named; labels -100 on the
    prompt train as before."""
    spec = dataclasses.replace(ReftConfig.uniform([0], "loreft", low_rank_dimension=2), positions="l1")
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10, 11, 12]}]

    def collate(prompt_len):
        def call(features):
            ids = torch.tensor([f["input_ids"] for f in features])
            labels = ids.clone()
            labels[:, :prompt_len] = -100
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return call

    bad = ReftTrainer(model=get_reft_model(tiny_lm(), spec), args=args(tmp_path / "a", max_steps=1,
                      per_device_train_batch_size=2, remove_unused_columns=False),
                      train_dataset=rows, data_collator=collate(0))
    with pytest.raises(ValueError, match=r"labels row 0: its first attended token \(index 0\) is already a target"):
        bad.train()
    good = ReftTrainer(model=get_reft_model(tiny_lm(), spec), args=args(tmp_path / "b", max_steps=1,
                       per_device_train_batch_size=2, remove_unused_columns=False),
                       train_dataset=rows, data_collator=collate(2))
    good.train()
    assert all(torch.isfinite(torch.tensor(losses(good))))
