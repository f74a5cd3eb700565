"""What a resumed online run compares to say "unchanged": the reward function's code with the module-level helpers
it calls (`naming.code_digest`), and a reward model given as an object in Python (`online.digests`).

Before: `def reward(c): return _score(c) * 2` with `_score` edited between runs resumed without a word (the digest
held `reward`'s own source), and a reward model built from a model object recorded no digest (only a path did), so
another model object resumed silently too."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from alignkit.models.loading import load_model
from alignkit.naming import source_digest
from alignkit.online.digests import WEIGHTS_PREFIX, model_digest
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.run_commit import COMPLETE_MARKER
from alignkit.trainers.reference import stable_tokenizer_fingerprint

from .toy import PROMPTS, toy_policy


def _score(response: str) -> float:
    return float(len(response))


def helped(prompt, response: str) -> float:
    """A reward function whose scoring lives in a module-level helper."""
    return _score(response) * 2


def _rescored(response: str) -> float:  # `_score` edited: another reward
    return float(len(response)) + 1.0


def _grpo(tiny_dir, tokenizer, out, steps, annotator):
    cfg = GRPOConfig(steps=steps, prompts_per_step=2, save_steps=1, learning_rate=1e-2, stall_steps=0,
                     sampling={"num_samples": 2, "max_new_tokens": 2})
    return GRPOTrainer(toy_policy(tiny_dir("llama"), "lora"), tokenizer, PROMPTS, annotator, cfg, output_dir=out)


def _resumed_warnings(trainer, ckpt, caplog) -> list[str]:
    with caplog.at_level("WARNING", logger="alignkit.online.checkpoint"):
        rows = trainer.train(resume_from_checkpoint=ckpt)
    assert [r["step"] for r in rows] == [1]
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.getMessage().startswith("resume")]


@pytest.mark.parametrize("edited", [False, True], ids=["same", "helper-edited"])
def test_an_edited_helper_of_the_reward_function_is_said_at_resume(tiny_dir, tokenizer, tmp_path, caplog,
                                                                    monkeypatch, edited):
    """Fails without the fix: yes (helper-edited: no warning)."""
    fn = {"type": "function", "fn": helped}
    _grpo(tiny_dir, tokenizer, tmp_path, 1, fn).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    assert json.loads((ckpt / "trainer_state.json").read_text())["annotator_code_version"] == 2
    if edited:
        monkeypatch.setitem(globals(), "_score", _rescored)
    said = _resumed_warnings(_grpo(tiny_dir, tokenizer, tmp_path, 2, fn), ckpt, caplog)
    assert len(said) == int(edited) and all("edited since" in m for m in said), said


def test_a_checkpoint_of_the_previous_digest_resumes_without_a_false_warning(tiny_dir, tokenizer, tmp_path, caplog):
    """A checkpoint written before helpers were digested holds version 1 (and no annotator_code_version): compared
    with the new digest, unchanged code would warn "edited" on every such resume; it is compared by version 1."""
    fn = {"type": "function", "fn": helped}
    _grpo(tiny_dir, tokenizer, tmp_path, 1, fn).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["annotator_code_version"]
    state["annotator_code"] = source_digest([helped], 1)  # what the previous alignkit recorded
    assert state["annotator_code"] != source_digest([helped])
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    marker["files"]["trainer_state.json"] = (ckpt / "trainer_state.json").stat().st_size
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert _resumed_warnings(_grpo(tiny_dir, tokenizer, tmp_path, 2, fn), ckpt, caplog) == []


def test_a_user_annotators_own_digest_without_a_version_is_compared_with_an_old_checkpoint():
    """A checkpoint without annotator_code_version asks `annotator_code(annotator, 1)`; a user annotator whose own
    `code_digest()` takes no version raised TypeError there and gave None (not compared, though its value never
    followed naming's version). Now it is called without one. Fails without the fix: yes (None)."""
    from alignkit.online.checkpoint import annotator_code

    class Mine:
        def code_digest(self):
            return "d1"

    assert annotator_code(Mine(), 1) == "d1"
    assert annotator_code(Mine()) == "d1"


@pytest.mark.parametrize("changed", [False, True], ids=["same", "other-weights"])
def test_a_reward_model_object_with_other_weights_is_said_at_resume(tiny_dir, tokenizer, tmp_path, caplog, changed):
    """A reward model given as a model object: the checkpoint records the digest of its weights (and tokenizer),
    and a resume with another one warns. Fails without the fix: yes (other-weights: no warning, nothing recorded)."""
    folder = tiny_dir("llama", classifier=True, num_labels=1)

    def annotator(shift: float):
        model = load_model(folder, task="classifier")
        with torch.no_grad():
            model.score.weight.add_(shift)  # a score head retrained: every other tensor the same
        return {"type": "reward_model", "model": model, "tokenizer": tokenizer, "device": "cpu"}

    _grpo(tiny_dir, tokenizer, tmp_path, 1, annotator(0.0)).train()
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["annotator_model_files"]
    assert saved.startswith(WEIGHTS_PREFIX) and len(saved) == len(WEIGHTS_PREFIX) + 64
    said = _resumed_warnings(_grpo(tiny_dir, tokenizer, tmp_path, 2, annotator(0.5 if changed else 0.0)), ckpt, caplog)
    assert len(said) == int(changed) and all("has other weights" in m for m in said), said


def test_model_digest_keeps_the_format_of_the_recorded_digests(tiny_lm, tokenizer):
    """`model_digest` (before: `augment.llm.answerer_digest`) is in the LLM cache's keys and `alignkit sample`'s
    manifests: fed the tensors in place now, it must give the bytes it gave (a reference written here from its
    recipe: name|dtype|shape| and the raw bytes of each tensor, sorted by name, then the tokenizer's fingerprint)."""
    model = tiny_lm("llama")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + t.contiguous().numpy().tobytes())
    # the tiny llama sets no generate option
    h.update(json.dumps([stable_tokenizer_fingerprint(tokenizer), []]).encode())
    assert model_digest(model, tokenizer) == h.hexdigest()


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_digests_the_reward_model_on_resume(main, monkeypatch, caplog):
    """Before: on a multi-process resume every rank computed the reward model's weights digest (every weight byte:
    seconds per 1B model) to compare with the checkpoint, though only the main one writes checkpoints; now the
    others skip the comparison. Fails without the fix: yes (seen: the digest taken on a non-main process)."""
    import logging
    from types import SimpleNamespace

    import alignkit.online.checkpoint as ck

    taken = []
    monkeypatch.setattr(ck, "annotator_model_digest", lambda a: taken.append(a) or WEIGHTS_PREFIX + "new")
    fake = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=main), annotator=SimpleNamespace(
        source=lambda: "reward model"))
    with caplog.at_level(logging.WARNING, logger="alignkit.online.checkpoint"):
        ck.Checkpoints.warn_changed_annotator_model(fake, "ckpt", {"annotator_model_files": WEIGHTS_PREFIX + "old"})
    assert len(taken) == (1 if main else 0)
    assert ("has other weights" in caplog.text) == main


def test_model_digest_is_the_value_the_previous_answerer_digest_gave(tmp_path):
    """The LLM cache's keys and `alignkit sample`'s manifests recorded `augment.llm.answerer_digest`; its successor
    must give the same value, or every cached answer misses. The hex value was computed by the previous code
    (f6648b7's answerer_digest) on this seeded tiny llama in bfloat16, not by this one."""
    from alignkit.models.loading import load_tokenizer
    from alignkit.models.tiny import save_tiny

    save_tiny(tmp_path / "m", "llama")
    model, tok = load_model(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    model.to(torch.bfloat16)
    assert model_digest(model, tok) == "69ea113cdf951124971f11ba7643b93cdb902e288871c6a4beb824a194cf42e7"
