"""Outputs the ecosystem expects: a Hub model card (huggingface_hub.ModelCard metadata), a LoRA folder that loads
from any directory, group-readable files, TRL's metric names, the final evaluation in <run>/tensorboard, and
push_to_hub of the final model folder (HfApi mocked: no network here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from alignkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, repo_id, folder_path, **kw):
        FakeApi.calls.append(("upload_folder", repo_id, folder_path, sorted(os.listdir(folder_path))))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    import huggingface_hub

    root = tmp_path_factory.mktemp("lora") / "dpo-lora"
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    try:
        rc = main(["-q", "dpo", "--config", str(CONFIGS / "dpo-lora-tiny.yaml"), f"output_dir={root}",
                   "train.max_steps=2", "train.eval_strategy=no", "--push_to_hub", "--hub_model_id", "me/dpo-lora"])
    finally:
        mp.undo()
    assert rc == 0
    return root, list(FakeApi.calls)


def test_model_card_has_hub_metadata(lora_run):
    from huggingface_hub import ModelCard

    root, _ = lora_run
    card = ModelCard.load(str(root / "model" / "README.md"))
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and {"alignkit", "dpo", "lora"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # tiny:llama is no Hub model
    assert "## Final metrics" in card.text


def test_card_metadata_names_hub_ids():
    from alignkit.runs import ModelCard

    card = ModelCard("t", "b", {"kind": "full"}, {"command": "sft"}, {"path": ["trl-lib/Capybara", "local.jsonl"]},
                     {}, {}, "alignkit sft", {}, base_model_id="Qwen/Qwen2.5-0.5B")
    assert card.metadata() == {"library_name": "transformers", "base_model": "Qwen/Qwen2.5-0.5B",
                               "datasets": ["trl-lib/Capybara"], "tags": ["alignkit", "sft", "full"],
                               "pipeline_tag": "text-generation"}


def test_lora_loads_from_any_directory(lora_run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    root, _ = lora_run
    cfg = json.loads((root / "model" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # elsewhere: plain peft finds the base from the adapter folder alone
    model = AutoPeftModelForCausalLM.from_pretrained(str(root / "model"))
    assert model.peft_config["default"].r == 4


def test_trl_metric_names_and_final_eval_in_tensorboard(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = lora_run
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all(k in train[-1] for k in ("logits/chosen", "logits/rejected", "num_tokens"))
    assert any("eval_logits/chosen" in r for r in rows)
    assert not list((root / "checkpoints").glob("runs/**/events*"))  # no stray writer after train()
    acc = EventAccumulator(str(root / "tensorboard"))
    acc.Reload()
    assert "eval/loss" in acc.Tags()["scalars"] and "train/num_tokens" in acc.Tags()["scalars"]


def test_push_uploads_the_final_model_folder_only(lora_run):
    root, calls = lora_run
    assert calls[0] == ("create_repo", "me/dpo-lora", {"private": False, "exist_ok": True, "repo_type": "model"})
    kind, repo, folder, files = calls[1]
    assert (kind, repo, Path(folder)) == ("upload_folder", "me/dpo-lora", root / "model")
    assert "README.md" in files and "adapter_model.safetensors" in files and "checkpoints" not in files


@pytest.mark.parametrize("revision", [None, "dev"])
def test_push_commits_to_the_hub_revision(revision, tmp_path):
    """train.hub_revision was accepted and ignored: the upload went to main. Now it names the branch the upload
    commits to, created first when missing (upload_folder to a branch that does not exist is a 404), as
    transformers' own push does; without it nothing changes (main, no branch made)."""
    from alignkit.cli.train import push_model

    class Api(FakeApi):
        def create_branch(self, repo_id, **kw):
            FakeApi.calls.append(("create_branch", repo_id, kw))

        def upload_folder(self, repo_id, folder_path, **kw):
            FakeApi.calls.append(("upload_folder", repo_id, kw.get("revision", "<main>")))

    (tmp_path / "model").mkdir()
    FakeApi.calls = []
    push = {"push_to_hub": True, "hub_model_id": "me/m", **({"hub_revision": revision} if revision else {})}
    assert push_model(push, tmp_path / "model", tmp_path, api=Api()) == "me/m"
    names = [c[0] for c in FakeApi.calls]
    if revision is None:
        assert names == ["create_repo", "upload_folder"] and FakeApi.calls[1][2] == "<main>"
        return
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[1] == ("create_branch", "me/m", {"branch": "dev", "exist_ok": True, "repo_type": "model"})
    assert FakeApi.calls[2] == ("upload_folder", "me/m", "dev")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from alignkit.augment.llm import Cached
    from alignkit.augment.pipeline import Filters, augment
    from alignkit.augment.strategies import ParaphraseOptions, Source
    from alignkit.files import atomic_write, atomic_write_text

    class Echo:
        name = "echo"

        def chat(self, messages, **kw):
            return messages[-1]["content"]

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "w.safetensors", b"x")
        atomic_write_text(tmp_path / "r.jsonl", "{}\n")
        llm = Cached(Echo(), tmp_path / "cache")  # augment's request cache and its output file
        augment([Source("d.jsonl:1", {"prompt": "Say hi", "completion": "hi"})], "paraphrase", ParaphraseOptions(),
                llm, Filters(), tmp_path / "a.jsonl")
    finally:
        os.umask(old)
    written = [tmp_path / "w.safetensors", tmp_path / "r.jsonl", tmp_path / "a.jsonl", *(tmp_path / "cache").rglob("*.json")]
    assert len(written) == 4
    for path in written:  # were 0o600 (mkstemp)
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


def test_token_accuracy_logits_and_num_tokens_by_hand(tiny_dir, tmp_path):
    from transformers import TrainingArguments

    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.data import PreferenceCollator, SFTCollator
    from alignkit.trainers import DPOTrainer, SFTTrainer

    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    rows = [{"prompt": "The sky is", "completion": " blue today."}, {"prompt": "Grass", "completion": " is green."},
            {"prompt": "Snow is", "completion": " white."}, {"prompt": "Coal", "completion": " is black, yes."}]
    args = TrainingArguments(str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             report_to="none", use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True,
                             learning_rate=0.0)
    model = load_model(path)
    sft = SFTTrainer(model, args, train_dataset=rows, processing_class=tok)
    feats = [sft.train_dataset[i] for i in range(4)]
    out = sft.objective(model, sft.data_collator(feats))  # the trainer's own layout (padding-free by default on sdpa)
    batch = SFTCollator(tok.pad_token_id)(feats)  # independent: padded rows through the model's own forward
    with torch.no_grad():  # full logits, argmax at the positions whose next token is a completion token
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    m = (batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:]).bool()
    hits = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:])[m]
    assert out.metrics["mean_token_accuracy"].mean().item() == pytest.approx(hits.float().mean().item())
    sft.train()  # one epoch exactly (2 steps x 2 rows): num_tokens = every row's length
    logged = [h["num_tokens"] for h in sft.state.log_history if "num_tokens" in h and "loss" in h]
    assert logged[-1] == sum(len(sft.train_dataset[i]["input_ids"]) for i in range(4)) and logged[0] < logged[-1]

    pairs = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " a green plum."}] * 2
    dpo = DPOTrainer(model, args, train_dataset=pairs, processing_class=tok, reference="none", loss_type="simpo")
    feats = [dpo.train_dataset[i] for i in range(2)]
    out = dpo.objective(model, dpo.data_collator(feats))
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    m = (batch["completion_mask"][:, 1:] & batch["attention_mask"][:, 1:]).bool()
    per_pos = logits[:, :-1].mean(-1)  # (2B, T-1): mean over the vocabulary
    assert out.metrics["logits/chosen"].mean().item() == pytest.approx(per_pos[:2][m[:2]].mean().item(), rel=1e-5)
    assert out.metrics["logits/rejected"].mean().item() == pytest.approx(per_pos[2:][m[2:]].mean().item(), rel=1e-5)
