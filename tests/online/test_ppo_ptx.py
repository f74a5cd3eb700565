"""PPO-ptx (InstructGPT; DeepSpeed-Chat's --unsupervised_dataset_name / --unsup_coef): each PPO update adds
ptx_coef x the NLL of a batch of SFT records. Before, `alignkit ppo` had no pretraining mix. The numbers here are
derived outside the trainer: the NLL with F.cross_entropy on the untouched policy's logits, the stream's order
from the seeded shuffles written out, the loss with ptx = the loss without + coef x that NLL."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alignkit.online.generation import SamplingConfig
from alignkit.online.ppo import PPOConfig, PPOTrainer
from alignkit.online.ptx import PtxData
from alignkit.run_commit import CheckpointError
from alignkit.settings import ConfigError

from .toy import PROMPTS, digit_fraction, killed_at, predating, toy_policy

DIGITS = {"type": "function", "fn": digit_fraction}


def features(tokenizer) -> list[dict]:
    """Three SFT features; the first tokens of each are its prompt (completion_mask 0: not trained)."""
    out = []
    for i, (prompt, answer) in enumerate([("Hello!", " 12 34"), ("The fox", " jumps over"), ("2 + 2", " = 4")]):
        p, a = tokenizer(prompt)["input_ids"], tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": p + a, "completion_mask": [0] * len(p) + [1] * len(a), "id": f"r{i}"})
    return out


def config(**kw) -> PPOConfig:
    return PPOConfig(**{"steps": 1, "prompts_per_step": 2, "learning_rate": 1e-2, "epochs_per_step": 1,
                        "sampling": SamplingConfig(num_samples=2, max_new_tokens=3), **kw})


def nll_by_hand(model, feats) -> float:
    """Token mean of -log p over the completion tokens, one unpadded row at a time, with F.cross_entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            ids = torch.tensor([f["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = torch.tensor(f["completion_mask"][1:], dtype=torch.bool)
            total += float(F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def test_ptx_loss_is_the_nll_and_adds_coef_times_it(tiny_dir, tokenizer):
    feats = features(tokenizer)
    base = toy_policy(tiny_dir("llama"), "lora")
    want = nll_by_hand(base, feats)
    plain = PPOTrainer(copy.deepcopy(base), tokenizer, PROMPTS, DIGITS, config()).train()[0]
    mixed = PPOTrainer(copy.deepcopy(base), tokenizer, PROMPTS, DIGITS, config(ptx_coef=0.5, ptx_batch_size=3),
                       ptx_data=feats).train()[0]
    assert mixed["ptx_loss"] == pytest.approx(want, rel=1e-5)
    assert mixed["ptx/epochs"] == pytest.approx(1.0)  # 3 of the 3 records taken
    assert mixed["policy_loss"] == pytest.approx(plain["policy_loss"], rel=1e-5, abs=1e-7)  # the same rollout
    assert mixed["loss"] == pytest.approx(plain["loss"] + 0.5 * want, rel=1e-5)
    assert "ptx_loss" not in plain


def nll_grad_by_hand(model, feats) -> dict[str, torch.Tensor]:
    """The gradient of the token-mean NLL (as `nll_by_hand`) over the trainable weights, by autograd, on `model`."""
    logits_and_ids = [(model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1].float(),
                       torch.tensor(f["input_ids"][1:]), torch.tensor(f["completion_mask"][1:], dtype=torch.bool))
                      for f in feats]
    total = sum(F.cross_entropy(lg[k], ids[k], reduction="sum") for lg, ids, k in logits_and_ids)
    nll = total / sum(int(k.sum()) for _, _, k in logits_and_ids)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(named, torch.autograd.grad(nll, list(named.values()))))


@pytest.mark.parametrize("accumulation, micro_rows", [(1, [3]), (2, [2, 1]), (4, [1, 1, 1])])
def test_the_ptx_gradient_moves_the_weights_by_lr_coef_grad_nll(tiny_dir, tokenizer, monkeypatch, accumulation,
                                                                 micro_rows):
    """SGD, no clipping, one update on the same rollout: theta_mixed - theta_plain = -lr * ptx_coef * grad NLL, the
    gradient by autograd on the untouched policy (a ptx term computed and reported but not backpropagated fails).
    Under gradient accumulation (4 samples, k micro-batches of ceil(4 / k)) the 3 ptx records run in micro-batches
    of at most ceil(4 / k) rows with the same total gradient; before, they ran as one forward of 3 rows whatever
    train.gradient_accumulation_steps said (the memory bound it is set for was not kept)."""
    import alignkit.online.ppo as ppo_module

    feats, lr, coef = features(tokenizer), 1e-2, 0.5
    base = toy_policy(tiny_dir("llama"), "lora")
    want = nll_grad_by_hand(copy.deepcopy(base), feats)
    kw = {"optimizer": "sgd", "max_grad_norm": None, "learning_rate": lr, "gradient_accumulation_steps": accumulation}
    plain = PPOTrainer(copy.deepcopy(base), tokenizer, PROMPTS, DIGITS, config(**kw))
    mixed = PPOTrainer(copy.deepcopy(base), tokenizer, PROMPTS, DIGITS,
                       config(ptx_coef=coef, ptx_batch_size=3, **kw), ptx_data=feats)
    rows, nll_sum = [], ppo_module.ptx_nll_sum
    monkeypatch.setattr(ppo_module, "ptx_nll_sum",
                        lambda m, b, *a: rows.append(len(b["input_ids"])) or nll_sum(m, b, *a))  # the rows run
    plain.train(), mixed.train()
    assert rows == micro_rows
    after_plain, after_mixed = plain.policy_trainable(), mixed.policy_trainable()
    assert set(after_mixed) == set(want) and any(g.abs().max() > 1e-4 for g in want.values())
    for n, g in want.items():
        got = after_mixed[n].detach() - after_plain[n].detach()
        assert torch.allclose(got, -lr * coef * g, rtol=1e-3, atol=1e-8), n


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulation_leaves_the_ptx_step_unchanged(tiny_dir, tokenizer, accumulation):
    """PPO-ptx, SGD, one update of 4 samples and 5 ptx records (the stream cycles): with gradient_accumulation_steps
    k the weights after the step equal accumulation 1's (CPU fp32), and so do the reported ptx_loss and loss."""
    feats, base = features(tokenizer), toy_policy(tiny_dir("llama"), "lora")

    def run(k):
        trainer = PPOTrainer(copy.deepcopy(base), tokenizer, PROMPTS, DIGITS,
                             config(optimizer="sgd", max_grad_norm=None, gradient_accumulation_steps=k, ptx_coef=0.5,
                                    ptx_batch_size=5), ptx_data=feats)
        return trainer.train()[0], trainer.policy_trainable()

    (row1, one), (row_k, many) = run(1), run(accumulation)
    assert any(not torch.equal(one[n], p) for n, p in base.named_parameters() if n in one)
    for n in one:
        torch.testing.assert_close(many[n], one[n], rtol=1e-6, atol=1e-7, msg=n)
    assert row_k["ptx_loss"] == pytest.approx(row1["ptx_loss"], rel=1e-6)
    assert row_k["loss"] == pytest.approx(row1["loss"], rel=1e-5)


def test_a_non_finite_ptx_micro_batch_stops_before_the_step(tiny_dir, tokenizer, monkeypatch):
    """Accumulation 2: the ptx rows run as [2, 1]; a NaN in the second micro-batch's NLL stops the run with the
    NonFiniteError naming the ptx loss, before the optimizer step (the weights are the initial ones)."""
    import alignkit.online.ppo as ppo_module
    from alignkit.guards import NonFiniteError

    calls, nll_sum = [], ppo_module.ptx_nll_sum

    def second_nan(m, b, *a):
        calls.append(len(b["input_ids"]))
        nll, tokens = nll_sum(m, b, *a)
        return (nll * float("nan") if len(calls) == 2 else nll), tokens

    monkeypatch.setattr(ppo_module, "ptx_nll_sum", second_nan)
    trainer = PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                         config(gradient_accumulation_steps=2, ptx_coef=0.5, ptx_batch_size=3),
                         ptx_data=features(tokenizer))
    before = {n: t.detach().clone() for n, t in trainer.policy_trainable().items()}
    with pytest.raises(NonFiniteError, match=r"the pretraining-mix \(ptx\) loss is nan at optimizer step 1"):
        trainer.train()
    assert calls == [2, 1]
    for n, t in trainer.policy_trainable().items():
        assert torch.equal(t, before[n]), n


def test_the_stream_cycles_through_seeded_shuffles():
    """5 records, batches of 2: epoch e's order is randperm(5) seeded by seed * 1000003 + e; a batch crosses into
    the next epoch's shuffle."""
    data = PtxData([{"n": i, "input_ids": [i], "completion_mask": [1]} for i in range(5)], seed=3)
    orders = [torch.randperm(5, generator=torch.Generator().manual_seed(3 * 1000003 + e)).tolist() for e in (0, 1)]
    stream = orders[0] + orders[1]
    got = [[f["n"] for f in data.take(2)] for _ in range(4)]
    assert got == [stream[0:2], stream[2:4], stream[4:6], stream[6:8]]
    assert data.position == 8 and data.epochs == pytest.approx(1.6)


def test_the_fingerprint_is_hashed_once_not_at_every_checkpoint(tokenizer, monkeypatch):
    """A checkpoint stores the ptx data's fingerprint: it was re-hashed over all the records every time."""
    import hashlib
    import json

    import alignkit.online.ptx as ptx_module

    feats = features(tokenizer)
    data = PtxData(feats, seed=0)
    want = hashlib.sha256(json.dumps([[f["input_ids"], f["completion_mask"]] for f in feats]).encode()).hexdigest()
    monkeypatch.setattr(ptx_module.hashlib, "sha256", lambda *a: pytest.fail("the ptx data was hashed again"))
    assert data.fingerprint() == data.fingerprint() == {"count": 3, "sha256": want[:16]}


@pytest.mark.parametrize("kw, ptx, needle", [
    ({"ptx_coef": 1.0}, None, "PPOConfig.ptx_coef: 1.0"),
    ({}, "features", "ptx_data: set with PPOConfig.ptx_coef 0"),
    ({"ptx_batch_size": 2}, None, "PPOConfig.ptx_batch_size: read only with"),
    ({"ptx_coef": 1.0}, "untrained", "ptx_data: none of its 3 record(s) has a trainable token"),
])
def test_half_set_or_empty_ptx_is_refused(tiny_dir, tokenizer, tmp_path, kw, ptx, needle):
    feats = features(tokenizer)
    data = {None: None, "features": feats,
            "untrained": [{**f, "completion_mask": [0] * len(f["input_ids"])} for f in feats]}[ptx]
    with pytest.raises(ConfigError) as err:
        PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, config(**kw), ptx_data=data,
                   output_dir=tmp_path / "run")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()



def test_a_resumed_run_takes_the_uninterrupted_runs_ptx_batches(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """3 records, 2 a batch, 2 updates a step: the stream crosses epochs; killed at step 3 and resumed from
    checkpoint-2, the rows (ptx_loss, ptx/epochs, loss) equal the uninterrupted run's (CPU, fp32)."""
    feats = features(tokenizer)

    def run(out):
        cfg = config(steps=4, save_steps=2, mini_batch_size=2, ptx_coef=0.5, ptx_batch_size=2)
        return PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg, ptx_data=feats,
                          output_dir=out)

    whole = run(tmp_path / "whole").train()
    assert [r["ptx/epochs"] for r in whole] == pytest.approx([4 / 3, 8 / 3, 4.0, 16 / 3])
    killed_at(monkeypatch, run(tmp_path / "cut").train)
    resumed = run(tmp_path / "cut").train(resume_from_checkpoint=tmp_path / "cut" / "checkpoints" / "checkpoint-2")
    assert [r["step"] for r in resumed] == [2, 3]
    for got, want in zip(resumed, whole[2:]):
        for key in ("ptx_loss", "ptx/epochs", "loss", "reward"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def test_a_resume_over_other_ptx_data_is_refused(tiny_dir, tokenizer, tmp_path):
    feats = features(tokenizer)
    cfg = config(steps=2, save_steps=1, ptx_coef=0.5)
    PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg, ptx_data=feats,
               output_dir=tmp_path).train()
    other = PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg, ptx_data=feats[:2],
                       output_dir=tmp_path)
    with pytest.raises(Exception, match="other ptx data"):
        other.check_resume(tmp_path / "checkpoints" / "checkpoint-1")


def test_a_checkpoint_without_ptx_state_is_refused_by_check_resume(tiny_dir, tokenizer, tmp_path):
    """Written before PPO-ptx existed, resumed with it: refused by check_resume (before the CLI writes the run
    folder); before, the ptx stream silently restarted at record 0."""
    cfg = config(steps=2, save_steps=1)
    PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS, cfg, output_dir=tmp_path / "a").train()
    with_ptx = PPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, DIGITS,
                          config(steps=2, save_steps=1, ptx_coef=0.5), ptx_data=features(tokenizer),
                          output_dir=tmp_path / "b")
    with pytest.raises(CheckpointError, match="written without the pretraining mix") as e:
        with_ptx.check_resume(predating(tmp_path / "a" / "checkpoints" / "checkpoint-1", "ptx_coef"))
    assert "\n" not in str(e.value)


def test_the_ptx_file_is_read_without_the_prompts_split(tokenizer, tmp_path):
    """data.ptx_path was read with data.split: prompts read with split=test and a .jsonl ptx file were refused (a
    data file has one split), advising to remove the split the prompts need. The ptx corpus is read without it: a
    file gives its rows, a saved dataset folder its "train" split (never the prompts' test split)."""
    import json

    from datasets import Dataset, DatasetDict

    from alignkit.cli.online import read_ptx
    from alignkit.settings.sections import DataSettings

    rows = [{"prompt": "Say a digit.", "completion": " 7"}, {"prompt": "Another?", "completion": " 3"}]
    file = tmp_path / "ptx.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_ptx(DataSettings(path="prompts-folder", split="test", ptx_path=str(file)), tokenizer)
    assert len(got) == 2
    folder = tmp_path / "ptx-folder"
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(str(folder))
    assert len(read_ptx(DataSettings(path="prompts-folder", split="test", ptx_path=str(folder)), tokenizer)) == 1


@pytest.mark.parametrize("single", ["$A <eos>", None, "<bos> $A"])
def test_a_ptx_string_ends_in_one_eos_whatever_the_tokenizer_appends(single):
    """A ptx string is a pretraining document: its ids, then exactly one EOS. Before, it ended in EOS only under a
    tokenizer that appends it itself (GPT-NeoX style, "$A <eos>"); one appending nothing, or a Llama-style BOS, gave
    none: the model never saw where a document ends (data.ptx_path's SFT rows end in EOS by data.add_eos). A string
    ending in the EOS text keeps one. Ids read off the word vocabulary by hand. Fails without the fix: yes."""
    from tests.data.test_tokenize_suffix import BOS, EOS, PROMPT, word_tokenizer

    from alignkit.online.ptx import as_ptx_features

    tok = word_tokenizer(single)
    bos = [BOS] if single == "<bos> $A" else []
    (a, b) = as_ptx_features([PROMPT, PROMPT + " <eos>"], tok)
    assert a["input_ids"] == b["input_ids"] == bos + [3, 4, 5, 6, 4, EOS]
    assert a["completion_mask"] == [1] * len(a["input_ids"])
