"""`alignkit eval` (method.kind=dpo) takes beta from the run that trained the policy. Before: eval's own default
(0.1, also written in configs/eval-dpo-tiny.yaml) was used whatever the policy was trained with, so a policy trained
with `method.beta=0.5` (configs/dpo-tiny.yaml's example) got implicit rewards and margins 5x smaller than its run
logged, and another loss, exit 0. Now an unset method.beta is the run's (`<run>/config.yaml`), one that differs from
it is refused in one line before anything is written, and with no run folder 0.1 is used with a warning; metrics.json
records the beta used."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main

from tests.cli.test_eval_weighted import CONFIGS, PAIRS, lora_policy, write

ONE = PAIRS[:1]  # one pair: the loss is -log sigmoid(margin) of that pair, by hand


def trained_run(base: str, root: Path, command: str = "dpo", beta: float = 0.5, loss_type: str = "sigmoid") -> Path:
    """A run folder as `alignkit <command>` leaves it: config.yaml (method.beta) beside model/ (a LoRA policy)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"command": command, "model": {"path": str(base)},
                                                      "method": {"loss_type": loss_type, "beta": beta}}))
    lora_policy(base, root / "model")
    return root / "model"


def run_eval(tmp_path: Path, name: str, base: str, policy: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / f"eval-{name}"
    rc = main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={base}",
               f"model.adapter_path={policy}", f"data.path={write(tmp_path / 'one.jsonl', ONE)}", f"output_dir={out}",
               *extra])
    return rc, out / "metrics.json"


def test_an_unset_beta_is_the_training_runs(tiny_dir, tmp_path, caplog):
    base = tiny_dir("llama")
    policy = trained_run(base, tmp_path / "run")
    copied = shutil.copytree(policy, tmp_path / "copied")  # the same adapter, outside any run folder
    with caplog.at_level(logging.WARNING):
        assert run_eval(tmp_path, "copied", base, copied)[0] == 0
    assert any("method.beta" in r.getMessage() and "0.1" in r.getMessage() for r in caplog.records)
    at_01 = json.loads((tmp_path / "eval-copied" / "metrics.json").read_text())
    rc, path = run_eval(tmp_path, "run", base, policy)
    got = json.loads(path.read_text())
    assert rc == 0 and got["beta"] == 0.5 and at_01["beta"] == 0.1
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):  # r = beta * log-ratio: 5x beta=0.1's
        assert got[k] == pytest.approx(5 * at_01[k], rel=1e-4, abs=1e-7), k
    assert abs(got["rewards/margins"]) > 1e-4
    assert got["loss"] == pytest.approx(math.log1p(math.exp(-got["rewards/margins"])), rel=1e-5)
    assert got["rewards/accuracies"] == at_01["rewards/accuracies"] == float(got["rewards/margins"] > 0)


@pytest.mark.parametrize("command", ["dpo", "kto", "online-dpo"])
def test_a_beta_other_than_the_runs_is_one_line_and_writes_nothing(command, tiny_dir, tmp_path, capsys):
    base = tiny_dir("llama")
    policy = trained_run(base, tmp_path / "run", command)
    capsys.readouterr()  # (building the policy's progress bars)
    rc, path = run_eval(tmp_path, "other", base, policy, "method.beta=0.1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "method.beta=0.1" in err[0] and "method.beta=0.5" in err[0] and "config.yaml" in err[0]
    assert not path.parent.exists()
    assert run_eval(tmp_path, "same", base, policy, "method.beta=0.5")[0] == 0


def test_a_run_whose_beta_is_not_the_implicit_rewards_scale_is_not_read(tiny_dir, tmp_path):
    """grpo's KL coefficient is method.kl_coef; an sft run has no beta: eval's default, as before."""
    base = tiny_dir("llama")
    policy = trained_run(base, tmp_path / "run", "grpo")
    rc, path = run_eval(tmp_path, "grpo", base, policy)
    assert rc == 0 and json.loads(path.read_text())["beta"] == 0.1


def test_a_run_trained_with_another_loss_says_evals_loss_is_not_its(tiny_dir, tmp_path, caplog):
    """Before: metrics.json's `loss` (DPO's sigmoid loss) read as the run's own for an IPO run, without a word."""
    base = tiny_dir("llama")
    policy = trained_run(base, tmp_path / "run", loss_type="ipo")
    with caplog.at_level(logging.WARNING):
        rc, path = run_eval(tmp_path, "ipo", base, policy)
    said = [r.getMessage() for r in caplog.records if "loss_type=ipo" in r.getMessage()]
    assert rc == 0 and len(said) == 1 and "sigmoid" in said[0], said
    got = json.loads(path.read_text())
    assert got["loss"] == pytest.approx(math.log1p(math.exp(-got["rewards/margins"])), rel=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_eval(tmp_path, "sigmoid", base, trained_run(base, tmp_path / "run2"))
    assert not [r for r in caplog.records if "loss_type" in r.getMessage()]


def test_a_policy_equal_to_its_reference_is_said(tiny_dir, tmp_path, caplog):
    """An untrained LoRA (B = 0): every implicit reward is 0, accuracy 0.0 and loss ln 2. Before: written as if the
    policy preferred every worse reply, without a word. Now one warning says the policy is its reference."""
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    base = tiny_dir("llama")
    untrained = save_adapter(apply_adapter(load_model(base), AdapterConfig(kind="lora", lora=LoraSettings(r=2))),
                             tmp_path / "untrained")
    with caplog.at_level(logging.WARNING):
        rc, path = run_eval(tmp_path, "untrained", base, untrained, "method.beta=0.1")
    got = json.loads(path.read_text())
    assert rc == 0 and got["rewards/chosen"] == got["rewards/rejected"] == 0.0
    assert got["loss"] == pytest.approx(math.log(2))
    said = [r.getMessage() for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(said) == 1 and "1 pair(s)" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_eval(tmp_path, "trained", base, trained_run(base, tmp_path / "run"))[0] == 0
    assert not [r for r in caplog.records if "exactly 0" in r.getMessage()]


def test_dry_run_refuses_a_beta_other_than_the_runs(tiny_dir, tmp_path, capsys):
    base = tiny_dir("llama")
    policy = trained_run(base, tmp_path / "run")
    capsys.readouterr()
    rc, path = run_eval(tmp_path, "dry", base, policy, "method.beta=0.2", "--dry-run")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "method.beta=0.2" in err[0] and "method.beta=0.5" in err[0], err
    assert not path.parent.exists()


@pytest.mark.parametrize("ref_sync", [{"alpha": 0.5, "steps": 2}, None])
def test_a_policy_trained_with_ref_sync_warns_that_eval_scores_against_the_initial_model(ref_sync, tiny_dir,
                                                                                         tmp_path, caplog):
    """TR-DPO (method.ref_sync): training's reference moved towards the policy, and eval scores against model.path,
    so the figures are not what training optimised; before, nothing said so."""
    base = tiny_dir("llama")
    root = tmp_path / "run"
    from alignkit.adapters import AdapterConfig, apply_adapter, save_adapter
    from alignkit.models.loading import load_model

    root.mkdir()  # a fully finetuned policy (here: the base's weights) in its run folder
    save_adapter(apply_adapter(load_model(base), AdapterConfig(kind="full")), root / "model")
    method = {"loss_type": "sigmoid", "beta": 0.5, **({"ref_sync": ref_sync} if ref_sync else {})}
    (root / "config.yaml").write_text(yaml.safe_dump({"command": "dpo", "model": {"path": str(base)},
                                                      "method": method}))
    with caplog.at_level(logging.WARNING):
        assert run_eval(tmp_path, "synced", base, root / "model")[0] == 0
    said = [r.getMessage() for r in caplog.records if "method.ref_sync" in r.getMessage()]
    if ref_sync is None:
        assert not said
        return
    assert len(said) == 1 and str(root / "model") in said[0] and str(root / "config.yaml") in said[0], said
    assert "not the figures training optimised" in said[0] and f"against {base}" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a reference named: the user chose it, no warning
        assert run_eval(tmp_path, "named", base, root / "model", f"method.reference_path={base}")[0] == 0
    assert not [r for r in caplog.records if "method.ref_sync" in r.getMessage()]


@pytest.mark.parametrize("command, config, steps", [("dpo", "dpo-tiny.yaml", ["train.max_steps=2",
                                                                                "train.eval_strategy=no"]),
                                                     ("rloo", "rloo-tiny.yaml", ["train.max_steps=2"])])
def test_a_ref_sync_run_records_the_moved_reference_and_eval_of_it_warns(command, config, steps, tmp_path, caplog):
    """End to end: the run's model card says how often the reference moved; eval of its model/ warns (dpo)."""
    out = tmp_path / "run"
    assert main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", *steps,
                 "method.ref_sync={alpha: 0.5, steps: 1}"]) == 0
    card = (out / "model" / "README.md").read_text()
    syncs = 2 if command == "dpo" else int(yaml.safe_load((out / "config.yaml").read_text())["method"].get(
        "epochs_per_step", 1)) * 2  # one sync per optimizer update (rloo-tiny: one minibatch a step)
    assert f"| `reference syncs` | {syncs} (method.ref_sync: the reference moved towards the policy" in card, card
    if command != "dpo":
        return
    base = yaml.safe_load((out / "config.yaml").read_text())["model"]["path"]
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"model.path={base}",
                     f"model.adapter_path={out / 'model'}", f"data.path={write(tmp_path / 'one.jsonl', ONE)}",
                     f"output_dir={tmp_path / 'eval'}"]) == 0
    assert [r for r in caplog.records if "method.ref_sync" in r.getMessage() and "not the figures training" in
            r.getMessage()]
