"""The commands end to end on the shipped tiny configs (2 optimizer steps each): the run folder's files,
`eval` and `generate` on a trained adapter, `ls`, error exit codes, and `demo` dispatch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.settings import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["train.max_steps=2", "train.eval_steps=1", "train.logging_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train SFT (full) and DPO (ReFT) once for the module; returns the run folders."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, command, config in (("sft", "sft", "sft-tiny.yaml"), ("dpo", "dpo", "dpo-reft-tiny.yaml")):
        args = ["-q", command, "--config", str(CONFIGS / config), f"output_dir={root / name}", *FAST]
        assert main(args) == 0
        out[name] = (root / name, args)
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_run_folder_has_every_output(runs, name):
    run, args = runs[name]
    rows = _rows(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in train_rows)
    assert any("eval_loss" in r for r in rows)
    # sft's mean_token_accuracy and dpo's logps/* were on no plot
    expected = {"loss.png", "accuracy.png"} if name == "sft" else {"loss.png", "rewards.png", "accuracy.png", "logps.png"}
    assert {p.name for p in (run / "plots").iterdir()} == expected
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in (run / "plots").iterdir())
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    # the resolved config re-loads to the settings the command ran with (file + overrides)
    resolved = load_config(run / "config.yaml")
    assert resolved == load_config(args[3], args[4:])
    assert yaml.safe_load((run / "config.yaml").read_text())["command"] == name


def test_model_cards_describe_base_adapter_objective(runs):
    sft = (runs["sft"][0] / "README.md").read_text()
    dpo = (runs["dpo"][0] / "README.md").read_text()
    assert "tiny:llama" in sft and "**SFT (loss nll)**" in sft and "**full** adapter" in sft
    assert "tiny:llama" in dpo and "**preference optimisation (loss sigmoid)**" in dpo and "**reft** adapter" in dpo
    assert "| `beta` | 0.1 |" in dpo and "| `reft.positions` | f1+l1 |" in dpo
    assert "hh_rlhf_sample.jsonl" in dpo and "| `max_steps` | 2 |" in dpo
    assert "alignkit -q dpo --config" in dpo and "train.max_steps=2" in dpo  # the command line
    last_loss = [r for r in _rows(runs["dpo"][0]) if "loss" in r][-1]["loss"]
    assert f"| `loss` | {last_loss:.6g} |" in dpo  # final metrics come from the run's own log
    assert (runs["dpo"][0] / "model" / "README.md").read_text() == dpo
    saved = {p.name for p in (runs["dpo"][0] / "model").iterdir()}
    assert {"interventions.safetensors", "reft_config.json", "alignkit_adapter.json"} <= saved
    assert "model.safetensors" in {p.name for p in (runs["sft"][0] / "model").iterdir()}


def test_eval_dpo_on_trained_reft_adapter(runs, tmp_path, capsys):
    run = runs["dpo"][0]
    rc = main(["-q", "eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"output_dir={tmp_path / 'ev'}",
               f"model.path={run / 'base_model'}", f"model.adapter_path={run / 'model'}"])
    assert rc == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["pairs"] == 6
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6)
    assert round(m["rewards/accuracies"] * 6) == pytest.approx(m["rewards/accuracies"] * 6, abs=1e-6)
    assert m["rewards/chosen"] != 0.0  # the adapter is on for the policy and off for the reference
    assert "rewards/accuracies" in capsys.readouterr().out


def test_generate_with_reft_adapter_writes_jsonl(runs, tmp_path):
    run = runs["dpo"][0]
    rc = main(["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"output_dir={tmp_path / 'gen'}",
               f"model.path={run / 'base_model'}", f"model.adapter_path={run / 'model'}",
               "generation.max_new_tokens=4", "data.max_records=3"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["finish_reason"] in ("eos", "stop", "length") for r in rows)
    assert all(isinstance(r["response"], str) and r["prompt"] for r in rows)


@pytest.mark.parametrize("command, config, section", [("generate", "generate-tiny.yaml", "generation"),
                                                      ("sample", "sample-tiny.yaml", "sampling")])
def test_inverse_cdf_with_a_reft_adapter_is_refused_before_anything_is_written(runs, tmp_path, capsys, command,
                                                                               config, section):
    """A ReFT adapter samples with model.generate (torch.multinomial), so an explicit inverse_cdf sampler cannot be
    honoured. It was refused only at the first batch, after config.yaml / sample.yaml had been written into the
    output folder (over the previous run's); now before the folder is touched."""
    run = runs["dpo"][0]
    out = tmp_path / "gen"
    out.mkdir()
    (out / "config.yaml").write_text("command: generate\nkept: true\n")  # a previous run's file
    rc = main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", f"model.path={run / 'base_model'}",
               f"model.adapter_path={run / 'model'}", f"{section}.max_new_tokens=4", "data.max_records=2",
               f"{section}.do_sample=true", f"{section}.sampler=inverse_cdf"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1:] == [  # (above it: transformers' load bar)
        f"alignkit {command}: error: {section}.sampler=inverse_cdf: this policy samples with model.generate (a "
        f"ReftModel edits hidden states inside its own generate), which draws with torch.multinomial; remove "
        f"{section}.sampler (or set it to multinomial)"]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "command: generate\nkept: true\n"


@pytest.mark.parametrize("command, config, section", [("generate", "generate-tiny.yaml", "generation"),
                                                      ("sample", "sample-tiny.yaml", "sampling")])
def test_a_stop_string_of_special_token_text_is_refused_before_anything_is_written(tmp_path, capsys, command, config,
                                                                                  section):
    """Responses are decoded without special tokens: stop=["<|im_end|>"] never matched, generate halted on the token
    and the row was written as finish_reason 'length' with the token in its ids. One line now, before the folder."""
    out = tmp_path / "gen"
    rc = main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", "model.path=tiny:llama",
               "model.adapter_path=null", f"{section}.max_new_tokens=4", "data.max_records=2",
               f'{section}.stop=["<|im_end|>"]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"alignkit {command}: error: {section}.stop: '<|im_end|>' holds the special "
                                          "token '<|im_end|>' (id 4)"), err
    assert f"{section}.stop_token_ids=[4]" in err[-1] and not out.exists()


def test_ls_lists_every_registered_name(capsys):
    from alignkit.data import FORMATTERS, READERS
    from alignkit.interventions import INTERVENTIONS
    from alignkit.losses import REGISTRIES
    from alignkit.online import ANNOTATORS, FEEDBACK_MODES, REWEIGHTERS

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    names = [n for reg in REGISTRIES.values() for n in reg] + list(INTERVENTIONS) + list(READERS) + \
        list(FORMATTERS) + list(ANNOTATORS) + list(REWEIGHTERS) + list(FEEDBACK_MODES)
    missing = [n for n in names if f"  {n} " not in out and not out.count(f"  {n}\n")]
    assert not missing, missing
    assert "sigmoid" in out and "loreft" in out and "hh-rlhf" in out
    assert main(["ls", "readers"]) == 0 and "loreft" not in capsys.readouterr().out


def test_config_errors_exit_2_naming_the_key(capsys):
    rc = main(["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), "method.lr=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "method.lr: unknown key" in err and "sft-tiny.yaml" in err
    rc = main(["dpo", "--config", str(CONFIGS / "sft-tiny.yaml")])
    assert rc == 2 and "not `alignkit dpo`" in capsys.readouterr().err


def test_missing_data_fails_before_any_model_is_built(tmp_path, capsys):
    rc = main(["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'r'}",
               f"data.path={tmp_path / 'nope.jsonl'}"])
    assert rc == 2 and "nope.jsonl: no such data file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["dpo", "--config", str(CONFIGS / "dpo-lora-tiny.yaml"), "--dry-run", "method.beta=0.3"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["method"]["beta"] == 0.3 and data["adapter"]["lora"]["r"] == 4 and data["command"] == "dpo"


def test_overrides_on_both_sides_of_an_option_all_apply_in_order(capsys):
    """`alignkit dpo -c x.yaml method.beta=0.3 --dry-run train.seed=7 method.beta=0.2`: argparse fills the
    key=value positional once, so the ones after `--dry-run` used to stop the command ("unrecognized arguments").
    Each applies, later ones winning; a stray non-override word is still a usage error."""
    cfg = str(CONFIGS / "dpo-lora-tiny.yaml")
    assert main(["dpo", "-c", cfg, "method.beta=0.3", "--dry-run", "train.seed=7", "method.beta=0.2"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["method"]["beta"] == 0.2 and data["train"]["seed"] == 7
    with pytest.raises(SystemExit) as e:
        main(["dpo", "-c", cfg, "method.beta=0.3", "--dry-run", "oops"])
    assert e.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err


def test_demo_dispatch(monkeypatch, capsys):
    from alignkit.cli import demo

    calls = []
    monkeypatch.setattr(demo, "run_reft", lambda args: calls.append(("reft", args.output_dir)) or 0)
    monkeypatch.setattr(demo, "run_pipeline", lambda args: calls.append(("pipeline", args.scale)) or 0)
    monkeypatch.setattr(demo, "pipeline_available", lambda: True)
    assert main(["demo", "--scale", "0.2"]) == 0
    assert main(["demo", "--reft", "--output-dir", "x"]) == 0
    assert main(["demo", "--max-steps", "5"]) == 0  # a ReFT-demo option selects the ReFT demo
    monkeypatch.setattr(demo, "pipeline_available", lambda: False)
    assert main(["demo"]) == 0
    assert calls == [("pipeline", 0.2), ("reft", "x"), ("reft", None), ("reft", None)]


def test_collapsed_model_stops_with_one_line_and_saves_nothing(tmp_path, capsys):
    """A learning rate of 1e6 collapses the tiny Llama to constant logits after one step: the loss stays finite
    (ln 431, the vocabulary) but the gradient is exactly 0. The run must stop, not save that model as trained."""
    out = tmp_path / "dead"
    code = main(["-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", "train.max_steps=8",
                 "train.eval_strategy=no", "train.learning_rate=1e6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("alignkit sft: error: the gradient norm has been exactly 0 at optimizer steps 2-4"), err
    assert math.log(431) == pytest.approx(float(err[-1].split("while the loss is ")[1].split()[0]), abs=1e-3)
    assert not (out / "model").exists()
    acc = [r["mean_token_accuracy"] for r in _rows(out) if r.get("grad_norm") == 0.0]
    assert acc and all(a < 0.5 for a in acc)  # constant logits: argmax is token 0, not every target (was 1.0)


@pytest.mark.parametrize("config,override,says", [
    ("sft-reft-tiny.yaml", "adapter.reft.positions=x3", "bad positions 'x3'"),
    ("sft-reft-tiny.yaml", "adapter.reft.config.representations=[{layer: 9, low_rank_dimension: 2}]",
     "representation layer 9 is out of range: the model has 2 layers"),
    ("sft-tiny.yaml", "adapter={kind: lora, lora: {r: 2, target_modules: [nosuch_proj]}}", "nosuch_proj"),
])
def test_adapter_the_model_cannot_take_is_a_config_error(config, override, says, tmp_path, capsys):
    """Used to end as "unexpected error: ValueError ... please report it"; now exit 2, one line, nothing written."""
    out = tmp_path / "run"
    assert main(["-q", "sft", "--config", str(CONFIGS / config), f"output_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("alignkit sft: error: adapter: ") and says in err, err
    assert not out.exists()


def test_pairs_identical_after_truncation_are_refused(tmp_path, capsys):
    """Distinct texts, but data.max_length leaves one completion token, the same on both sides: no pair has a
    preference left. Used to train on them silently (loss ln 2, zero signal)."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}: is it so?", "chosen": " Yes, indeed it is.", "rejected": " Yes? No, never."}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["-q", "dpo", "--config", str(CONFIGS / "dpo-tiny.yaml"), f"output_dir={out}", f"data.path={data}",
                 "data.eval_fraction=0.0", "train.eval_strategy=no", "data.max_length=12",
                 "data.max_prompt_length=11", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "chosen == rejected once truncated to data.max_length=12" in err, err
    assert not out.exists()


def test_one_line_keeps_a_closing_quote_and_unquotes_key_errors():
    from alignkit.cli import one_line

    assert one_line(ValueError("use generation_backend='transformers'")) == "use generation_backend='transformers'"
    assert one_line(KeyError("no reward named 'x'")) == "no reward named 'x'"
    assert one_line(ValueError("a\n  b\n")) == "a b" and one_line(ValueError()) == "ValueError"


def test_training_rows_past_the_models_context_are_warned(tiny_dir, tmp_path, caplog):
    """data.max_length above the model's max_position_embeddings: rows longer than the context train positions
    the model never had (RoPE models accept them silently). One warning with both numbers and the fix."""
    import logging

    base = tiny_dir("llama", max_positions=24)
    with caplog.at_level(logging.WARNING, logger="alignkit.models.rope"):
        assert main(["sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"model.path={base}", f"output_dir={tmp_path / 'r'}",
                     "train.max_steps=1", "train.eval_strategy=no", "data.max_length=64", "data.max_prompt_length=32"]) == 0
    msgs = [r.getMessage() for r in caplog.records if "past the model's context of 24 positions" in r.getMessage()]
    assert len(msgs) == 1 and "data.max_length=64" in msgs[0] and "model.rope_scaling" in msgs[0]


def test_training_rows_past_a_learned_position_table_are_refused_before_the_run_folder(tiny_dir, tmp_path, capsys):
    """GPT-2's positions are a table of n_positions rows: a row longer than it stopped training at its first batch
    with "IndexError: index out of range in self" after the run folder was written (a RoPE model only gets the
    warning above). One line now, before anything is written."""
    base = tiny_dir("gpt2", max_positions=24)
    out = tmp_path / "r"
    rc = main(["sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"model.path={base}", f"output_dir={out}",
               "train.max_steps=1", "train.eval_strategy=no", "data.max_length=64", "data.max_prompt_length=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "past the model's 24 learned positions" in err and "set data.max_length" in err, err
    assert not out.exists()


def test_a_tokenizer_larger_than_the_models_embedding_is_refused_before_the_run_folder(tiny_dir, tmp_path, capsys):
    """model.tokenizer with more tokens than the model's embedding rows: training stopped at its first batch with
    "unexpected error: IndexError: index out of range in self" after the run folder was written. One line now
    naming model.tokenizer and both sizes (read here from the saved files), before anything is written; the model's
    own tokenizer (as many tokens as rows) trains as before."""
    small, big = tiny_dir("llama", vocab_size=128), tiny_dir("llama", vocab_size=1024)
    rows = json.loads((small / "config.json").read_text())["vocab_size"]
    tokens = len(json.loads((big / "tokenizer.json").read_text())["model"]["vocab"])
    assert tokens > rows
    out = tmp_path / "r"
    rc = main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"model.path={small}", f"model.tokenizer={big}",
               f"output_dir={out}", "train.max_steps=1", "train.eval_strategy=no"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")]
    assert rc == 2 and err == [
        f"alignkit sft: error: model.tokenizer: the tokenizer at {big} has {tokens} tokens and the model embeds {rows}, "
        f"so token ids {rows}..{tokens - 1} have no embedding row (the forward would stop with an IndexError at the "
        "first one); use the model's own tokenizer (remove model.tokenizer) or one made for it, or resize the model's "
        "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save it"], err
    assert not out.exists()
    assert main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"model.path={small}", f"model.tokenizer={small}",
                 f"output_dir={out}", "train.max_steps=1", "train.eval_strategy=no"]) == 0


def test_a_tokenizer_a_whole_model_adapter_path_would_replace_is_refused(tiny_dir, tmp_path):
    """model.adapter_path holding a whole model with its own tokenizer runs with that tokenizer, and an explicit
    model.tokenizer was then ignored without a word. Now a ConfigError naming model.tokenizer when the two differ;
    the same tokenizer given explicitly loads as before."""
    from alignkit.adapters import AdapterConfig, apply_adapter, save_adapter
    from alignkit.cli.models import load_for_inference
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.settings import ModelSettings

    base, other = tiny_dir("llama"), tiny_dir("llama", vocab_size=128)
    whole = save_adapter(apply_adapter(load_model(base), AdapterConfig(kind="full")), tmp_path / "full")
    load_tokenizer(base).save_pretrained(str(whole))
    with pytest.raises(ConfigError, match=rf"^model\.tokenizer: {other} is not the tokenizer saved with "
                                          rf"model\.adapter_path \({whole}: a whole model, run with its own tokenizer\), "
                                          "so it would be ignored; remove model.tokenizer"):
        load_for_inference(ModelSettings(path=str(base), tokenizer=str(other), adapter_path=str(whole)), None)
    _, tok, _, _ = load_for_inference(ModelSettings(path=str(base), tokenizer=str(base), adapter_path=str(whole)), None)
    assert tok.get_vocab() == load_tokenizer(whole).get_vocab()


def test_reft_positions_longer_than_the_prompts_are_warned_before_training(tmp_path, caplog):
    """f40+l40 needs 80 prompt tokens; the bundled HH prompts are shorter: one warning naming the spec, counts and
    the key, before training (the run still trains: the same rule holds at inference)."""
    import logging

    from alignkit.interventions import positions

    positions._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
        assert main(["-q", "sft", "-c", str(CONFIGS / "sft-reft-tiny.yaml"), f"output_dir={tmp_path / 'r'}",
                     "train.max_steps=1", "train.eval_strategy=no", "adapter.reft.positions=f40+l40"]) == 0
    msgs = [r.getMessage() for r in caplog.records if "need prompts of at least 80 tokens" in r.getMessage()]
    assert len(msgs) == 2 and msgs[0].startswith("data.path: ") and msgs[1].startswith("evaluation data: "), msgs


def test_reft_first_positions_on_prompts_cut_by_max_prompt_length_are_warned_before_training(tmp_path, caplog):
    """data.max_prompt_length=8 cuts the bundled HH prompts to their last 8 tokens, so 'f1+l1' edits a token from the
    middle of each: one warning per data set naming the key, the count and the fix (before any run folder exists);
    'l1' (the end is always kept) gets none."""
    import logging

    for spec, expect in (("f1+l1", 2), ("l1", 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit.interventions.positions"):
            assert main(["-q", "sft", "-c", str(CONFIGS / "sft-reft-tiny.yaml"), f"output_dir={tmp_path / spec}",
                         "train.max_steps=1", "train.eval_strategy=no", "data.max_prompt_length=8",
                         f"adapter.reft.positions={spec}"]) == 0
        msgs = [r.getMessage() for r in caplog.records if "edit their first KEPT tokens" in r.getMessage()]
        assert len(msgs) == expect, msgs
        if expect:
            assert msgs[0].startswith("data.path: ") and msgs[1].startswith("evaluation data: ")
            assert "longer than data.max_prompt_length=8" in msgs[0] and "raise data.max_prompt_length" in msgs[0]


def test_training_records_its_prompt_format_and_a_new_format_is_warned(runs, tmp_path, caplog):
    """The HH reader turns the bundled "Human: / Assistant:" texts into conversations, formatted by the chat template;
    a model trained on them and then given text prompts (the 'plain' formatter under data.formatter=auto) never saw
    that format: generate says so once, naming both formats and the key. The same text prompts put through the
    chat template (data.formatter=chat-template, one user turn) give no warning."""
    import logging

    hh_lines = len((Path(__file__).resolve().parents[2] / "src/alignkit/resources/data/hh_rlhf_sample.jsonl")
                   .read_text().splitlines())
    for name in ("sft", "dpo"):
        saved = json.loads((runs[name][0] / "model" / "alignkit_prompt_format.json").read_text())
        assert list(saved["formats"]) == ["chat-template"] and 0 < saved["formats"]["chat-template"] < hh_lines
        assert saved["data.formatter"] == "auto"
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"prompt": f"Hello number {i}"}) + "\n" for i in range(3)))
    dpo = runs["dpo"][0]
    common = ["-q", "generate", "--config", str(CONFIGS / "generate-tiny.yaml"), f"model.path={dpo / 'base_model'}",
              f"model.adapter_path={dpo / 'model'}", "generation.max_new_tokens=2", f"data.path={texts}"]
    with caplog.at_level(logging.WARNING, logger="alignkit.data.chat"):
        assert main([*common, f"output_dir={tmp_path / 'g1'}"]) == 0
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "alignkit.data.chat"]
    assert msg.startswith("data.formatter: 3 prompt(s) will be formatted as 'plain'") and "'chat-template'" in msg
    assert "data.formatter=chat-template" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignkit.data.chat"):
        assert main([*common, f"output_dir={tmp_path / 'g2'}", "data.formatter=chat-template"]) == 0
    assert [r for r in caplog.records if r.name == "alignkit.data.chat"] == []


DRY_RUN_CONFIGS = {"sft": "sft-tiny", "rm": "rm-tiny", "dpo": "dpo-tiny", "kto": "kto-tiny",
                   "online-dpo": "online-dpo-tiny", "grpo": "grpo-tiny", "rloo": "rloo-tiny", "ppo": "ppo-tiny",
                   "eval": "eval-rm-tiny", "generate": "generate-tiny", "sample": "sample-tiny",
                   "annotate": "annotate-tiny", "augment": "augment-code-bugs"}
# overrides for the configs whose model an earlier step trains (runs/...): --dry-run checks the model folders
DRY_RUN_INPUTS = {"eval": ["model.path=tiny:llama", "model.adapter_path=null"],
                  "generate": ["model.path=tiny:llama", "model.adapter_path=null"]}


@pytest.mark.parametrize("command", sorted(DRY_RUN_CONFIGS))
def test_every_config_command_reads_its_config_through_one_runner(command, capsys, tmp_path):
    """Every config command's parser comes from `runfolder.add_config_command` (one config read, one --dry-run),
    so --dry-run prints that command's resolved config, override applied, and writes nothing."""
    from alignkit.cli import build_parser
    from alignkit.cli.helptext import CONFIG_COMMANDS

    assert sorted(DRY_RUN_CONFIGS) == sorted(CONFIG_COMMANDS)
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    func = sub.choices[command].get_default("func")
    assert getattr(func, "__wrapped__", None) is not None, f"`alignkit {command}` is not built by add_config_command"
    out = tmp_path / "run"
    if command == "annotate":  # its input: a round folder with samples (tests/cli/test_dry_run.py: its refusals)
        from tests.cli.test_dry_run import write_round

        write_round(out)
    before = sorted(tmp_path.rglob("*"))
    assert main([command, "-c", str(CONFIGS / f"{DRY_RUN_CONFIGS[command]}.yaml"), "--dry-run",
                 f"output_dir={out}", *DRY_RUN_INPUTS.get(command, [])]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["command"] == command and data["output_dir"] == str(out)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


SPLIT_COMMANDS = ("sft", "rm", "dpo", "kto", "online-dpo", "grpo", "rloo", "ppo")  # they read an evaluation split


@pytest.mark.parametrize("command", sorted(DRY_RUN_CONFIGS))
@pytest.mark.parametrize("overrides,key", [
    (["data.eval_split=test"], "data.eval_split"),  # no eval_path: no split of data.path is read
    (["data.split_seed=3"], "data.split_seed"),  # no eval_fraction: nothing is split
    (["data.eval_fraction=0.25", "data.eval_split=test"], "data.eval_split"),  # the split of eval_path only
    (["data.eval_path=e.jsonl", "data.split_seed=3"], "data.split_seed"),  # eval_path: data.path is not split
    (["data.eval_path=e.jsonl", "data.eval_fraction=0.25"], "data.eval_fraction"),
])
def test_every_command_refuses_split_keys_the_data_never_reads(command, overrides, key, capsys, tmp_path):
    """data.eval_split / data.split_seed (and eval_fraction beside eval_path) were accepted by every command and
    had no effect when nothing read them (`cli/data.read_splits` reads eval_split only for eval_path, and
    split_seed / eval_fraction only without it): the run trained with no evaluation, or another one. Now --dry-run
    exits 2 with one line naming the key; the training commands load the same key where it is read."""
    out = tmp_path / "run"
    base = [command, "-c", str(CONFIGS / f"{DRY_RUN_CONFIGS[command]}.yaml"), "--dry-run", f"output_dir={out}",
            "data.eval_fraction=0"]
    if command in ("sft", "rm", "dpo", "kto"):  # no held-out data: no evaluation either
        base += ["train.eval_strategy=no"]
    assert main([*base, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    if command == "annotate":  # no data section at all: annotate reads <output_dir>/samples.jsonl
        assert "data: unknown key" in err, err
        return
    if command not in SPLIT_COMMANDS:  # they refuse every split key (the first one set is named)
        assert "ignore" in err and any(f"{o.split('=')[0]}: " in err for o in overrides), err
        return
    assert f"{key}: " in err, err
    assert "so it would be ignored" in err, err  # the shared check (the others refuse every split key themselves)
    read = {"data.eval_split": ["data.eval_path=someone/evals", "data.eval_split=test"],  # (a dry run does not look a
            # Hub dataset up; a missing local file is refused by its data check)
            "data.split_seed": ["data.eval_fraction=0.25", "data.split_seed=3"],
            "data.eval_fraction": ["data.eval_fraction=0.25"]}[key]
    assert main([*base, *read]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["data"]
    assert {k: shown[k.split(".")[1].split("=")[0]] for k in read} == {k: yaml.safe_load(k.split("=")[1]) for k in read}


@pytest.mark.parametrize("command", sorted(DRY_RUN_CONFIGS))
def test_model_keys_a_command_never_reads_are_refused(command, capsys, tmp_path):
    """model.adapter_path was only checked to exist by the training commands, which then trained model.path from
    scratch (a DPO run meant to start from an SFT adapter started from the base model), exit 0; model.check_base
    without model.adapter_path was accepted everywhere and read nowhere. Now one line naming the key; eval,
    generate and sample still take model.adapter_path."""
    base = [command, "-c", str(CONFIGS / f"{DRY_RUN_CONFIGS[command]}.yaml"), "--dry-run",
            f"output_dir={tmp_path / 'run'}"]
    if command in ("annotate", "augment"):  # no model section (annotate's model is the annotator's)
        assert main([*base, "model.adapter_path=x"]) == 2
        assert "model: unknown key" in capsys.readouterr().err
        return
    adapter = main([*base, *DRY_RUN_INPUTS.get(command, []), f"model.adapter_path={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip()
    if command in ("eval", "generate", "sample"):  # taken, and the dry run checks the folder as the run does
        assert adapter == 2 and len(err.splitlines()) == 1, err
        assert f"model.adapter_path: {tmp_path / 'x'} does not exist" in err, err
    else:
        assert adapter == 2 and len(err.splitlines()) == 1, err
        assert f"model.adapter_path: alignkit {command} trains a new adapter" in err and "ignored" in err, err
    assert main([*base, "model.adapter_path=null", "model.check_base=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.check_base: False is read only with model.adapter_path" in err, err


@pytest.mark.parametrize("command,config,overrides,says", [
    ("sft", "sft-tiny.yaml", ["data.split=test"], "split 'test' asked for"),
    ("sft", "sft-tiny.yaml", ["data.eval_fraction=0", "data.eval_path=bundled:data/hh_rlhf_sample.jsonl",
                              "data.eval_split=test"], "split 'test' asked for"),
    ("grpo", "grpo-tiny.yaml", ["data.split=test"], "split 'test' asked for"),
])
def test_a_split_of_a_data_file_is_refused_before_anything_is_written(command, config, overrides, says, tmp_path,
                                                                     capsys):
    """data.split / data.eval_split on a .jsonl file (which holds one split) were ignored: data.split=test trained
    on every row of the file, and data.eval_path=<the training file> with data.eval_split=test evaluated on the
    training rows, exit 0. Now exit 2 with one line naming the file and the split, and no run folder."""
    out = tmp_path / "run"
    rc = main(["-q", command, "--config", str(CONFIGS / config), f"output_dir={out}", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and says in err and "hh_rlhf_sample.jsonl" in err, err
    assert not out.exists()


def test_a_reft_embed_dim_of_another_width_is_refused_before_anything_is_written(tmp_path, capsys):
    """adapter.reft.config's embed_dim other than the edited hidden states' width: the run folder (config.yaml,
    base_model/, tensorboard/) was written and step 1 stopped on 'unexpected error: RuntimeError: mat1 and mat2
    shapes cannot be multiplied', exit 1. Now exit 2 with one line naming the representation, before any write."""
    out = tmp_path / "run"
    reps = '{"representations": [{"layer": 0, "low_rank_dimension": 2, "embed_dim": 8}]}'
    rc = main(["-q", "sft", "-c", str(CONFIGS / "sft-reft-tiny.yaml"), f"output_dir={out}", "train.max_steps=1",
               f"adapter.reft.config={reps}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert rc == 2 and len(err) == 1, err  # (tqdm bars of the tiny model's save aside)
    err = err[0]
    assert "representations[0]" in err and "embed_dim=8" in err and "64 wide" in err, err
    assert not out.exists()


REFT_RM = ["adapter.kind=reft", "adapter.reft.positions=f1+l1",
           "adapter.reft.config.representations=[{layer: 0, low_rank_dimension: 2}]"]
RANKED_RM = ["method.ranked=true", "method.center_rewards_coefficient=null"]


@pytest.mark.parametrize("command,config,overrides,key,says", [
    ("dpo", "dpo-reft-tiny.yaml", ["train.share_prompt=true"], "train.share_prompt", "ReFT"),
    ("rm", "rm-tiny.yaml", [*REFT_RM, "train.share_prompt=true"], "train.share_prompt", "ReFT"),
    ("rm", "rm-tiny.yaml", [*REFT_RM, "train.padding_free=true"], "train.padding_free", "ReFT"),
    ("rm", "rm-tiny.yaml", [*RANKED_RM, "train.share_prompt=true"], "train.share_prompt", "method.ranked"),
    ("rm", "rm-tiny.yaml", [*RANKED_RM, "train.padding_free=true"], "train.padding_free", "method.ranked"),
    ("dpo", "dpo-tiny.yaml", ["model.attn_implementation=flex_attention", "train.share_prompt=true"],
     "train.share_prompt", "model.attn_implementation"),
])
def test_a_batch_layout_the_run_cannot_use_is_refused_before_anything_is_written(command, config, overrides, key,
                                                                                 says, tmp_path, capsys):
    """train.share_prompt: true with a ReFT adapter (dpo, rm), ranked reward data or attention other than sdpa /
    eager (model.attn_implementation), and train.padding_free: true
    with a ReFT reward model or ranked reward data: the run folder (config.yaml, base_model/, tensorboard/) was
    written (not for padding_free with ranked data) and the run stopped with 'unexpected error: ValueError', exit 1.
    Now exit 2 with one line naming the key, and no run folder."""
    out = tmp_path / "run"
    rc = main(["-q", command, "-c", str(CONFIGS / config), f"output_dir={out}", "train.max_steps=1", *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert rc == 2 and len(err) == 1, err
    assert f"{key}: " in err[0] and says in err[0] and "remove it" in err[0], err
    assert not out.exists()


BEST = ["train.max_steps=2", "train.eval_steps=1", "train.save_strategy=steps", "train.save_steps=1",
        "train.load_best_model_at_end=true"]


@pytest.mark.parametrize("command,config,metric,hint", [
    ("sft", "sft-tiny.yaml", "eval_los", "did you mean 'eval_loss'?"),  # a typo
    ("sft", "sft-tiny.yaml", "eval_rewards/accuracies", "eval_mean_token_accuracy"),  # another objective's metric
    ("dpo", "dpo-tiny.yaml", "rewards/accuracy", "did you mean 'rewards/accuracies'?"),
])
def test_a_best_model_metric_the_objective_never_logs_is_refused_before_anything_is_written(command, config, metric,
                                                                                            hint, tmp_path, capsys):
    """train.metric_for_best_model naming a metric the objective's evaluation never logs passed config read, the run
    folder was written, and transformers stopped the run at the first evaluation with a KeyError (exit 1). Now exit
    2 with one line naming the key, a did-you-mean and the valid names, and no run folder."""
    out = tmp_path / "run"
    rc = main(["-q", command, "-c", str(CONFIGS / config), f"output_dir={out}", *BEST,
               f"train.metric_for_best_model={metric}", "data.eval_fraction=0.34"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"alignkit {command}")]
    assert rc == 2 and len(err) == 1, err
    assert f"train.metric_for_best_model: {metric!r} is not logged by alignkit {command}'s evaluation" in err[0], err
    assert hint in err[0], err
    assert not out.exists()


def test_a_best_model_metric_the_objective_logs_runs_in_either_spelling(tmp_path):
    """The objective's own metrics, with or without `eval_` (transformers adds it), load and run to the end."""
    out = tmp_path / "run"
    assert main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", *BEST,
                 "train.metric_for_best_model=mean_token_accuracy"]) == 0
    assert (out / "model").is_dir()
    for metric in ("eval_mean_token_accuracy", "eval_loss", "loss"):
        load_config(CONFIGS / "sft-tiny.yaml", [*BEST, f"train.metric_for_best_model={metric}"])


def test_a_best_checkpoint_before_the_last_step_is_what_the_card_and_summary_describe(tmp_path, capsys):
    """train.load_best_model_at_end with the best checkpoint before the last step: model/ held that checkpoint's
    weights, while the card's metrics and the last line showed the last evaluation's figures (another model's) without
    a word. The card and the summary now give the best step's evaluation figures (read here off metrics.jsonl) and say
    which checkpoint model/ is. The margins grow as DPO trains, so the lowest (greater_is_better false) is step 1's."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["-q", "dpo", "-c", str(CONFIGS / "dpo-lora-tiny.yaml"), f"output_dir={out}", *BEST,
                 "train.metric_for_best_model=eval_rewards/margins", "train.greater_is_better=false",
                 "train.learning_rate=0.05"]) == 0
    printed = capsys.readouterr().out
    evals = {r["step"]: r for r in _rows(out) if "eval_rewards/margins" in r}
    assert sorted(evals) == [1, 2] and evals[1]["eval_rewards/margins"] < evals[2]["eval_rewards/margins"]
    saved, first = (load_file(out / d / "adapter_model.safetensors") for d in ("model", "checkpoints/checkpoint-1"))
    assert all(torch.equal(saved[k], first[k]) for k in saved)  # model/ is step 1's checkpoint
    card = (out / "README.md").read_text()
    for k in ("eval_loss", "eval_rewards/margins"):
        assert f"| `{k}` | {evals[1][k]:.6g} |" in card, k
        assert f"{k} {evals[1][k]:.4g}" in printed, k  # 4 significant digits (runs.figure)
    assert "the best checkpoint: step 1 (eval_rewards/margins" in card
    assert "model/ is the best checkpoint, step 1 of 2" in printed


@pytest.mark.parametrize("command,config,metric", [("sft", "sft-tiny.yaml", "nll/token"),
                                                   ("sft", "sft-tiny.yaml", "eval_runtime"),
                                                   ("dpo", "dpo-tiny.yaml", "eval_loss/sft")])
def test_a_lower_is_better_best_model_metric_needs_greater_is_better(command, config, metric):
    """transformers takes a metric_for_best_model whose name does not end in 'loss' as better when higher unless
    train.greater_is_better says otherwise: with nll/token (or runtime, or one loss of a combination) the run kept and
    loaded the checkpoint where it was highest, the worst one, without a word. Now refused at load unless
    train.greater_is_better is set."""
    combination = ["method.loss_type=[sigmoid,sft]"] if command == "dpo" else []  # logs loss/sigmoid, loss/sft
    args = [*BEST, f"train.metric_for_best_model={metric}", *combination]
    with pytest.raises(ConfigError, match=rf"train\.metric_for_best_model: '{metric}' is better when lower, and "
                                          r"train\.greater_is_better is not set.*set train\.greater_is_better=false"):
        load_config(CONFIGS / config, args)
    cfg = load_config(CONFIGS / config, [*args, "train.greater_is_better=false"])
    assert cfg.train["metric_for_best_model"] == metric and cfg.train["greater_is_better"] is False
    with pytest.raises(ConfigError, match=rf"train\.metric_for_best_model: '{metric}' is better when lower, and "
                                          r"train\.greater_is_better is true.*set train\.greater_is_better=false"):
        load_config(CONFIGS / config, [*args, "train.greater_is_better=true"])  # set by hand: as wrong


def test_num_train_epochs_beside_max_steps_is_refused_before_anything_is_written(tmp_path, capsys):
    """train.num_train_epochs beside a positive train.max_steps: transformers trains max_steps steps and ignores the
    epochs, so `alignkit sft -c sft-tiny.yaml train.num_train_epochs=3` ran the file's 20 steps, exit 0. Now exit 2
    with one line naming both keys and the fix (max_steps=-1), and no run folder; max_steps -1 with the epochs runs."""
    out = tmp_path / "run"
    rc = main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", "train.num_train_epochs=3"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert rc == 2 and len(err) == 1, err
    assert "train.num_train_epochs: " in err[0] and "train.max_steps=-1" in err[0], err
    assert not out.exists()
    cfg = load_config(CONFIGS / "sft-tiny.yaml", ["train.num_train_epochs=3", "train.max_steps=-1"], command="sft")
    assert cfg.train["num_train_epochs"] == 3 and cfg.train["max_steps"] == -1


@pytest.mark.parametrize("overrides,says", [
    (["train.report_to=tensorbaord"], "train.report_to: 'tensorbaord' is not a tracker"),
    (["train.report_to=[none, wandbb]"], "train.report_to: 'wandbb' is not a tracker"),
    (["train.load_best_model_at_end=true"], "load_best_model_at_end requires the save and eval strategy to match"),
])
def test_training_arguments_transformers_refuses_are_config_errors(overrides, says, tmp_path, capsys):
    """A train value transformers refuses (an unknown report_to tracker, load_best_model_at_end with save_strategy
    no beside eval_strategy steps): 'unexpected error: ValueError ... please report it', exit 1. Now exit 2 with
    one line (the tracker names checked when the config is read), nothing written."""
    out = tmp_path / "run"
    rc = main(["-q", "sft", "-c", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft")]
    assert rc == 2 and len(err) == 1, err
    assert "alignkit sft: error: " in err[0] and says in err[0] and "unexpected" not in err[0], err
    assert not out.exists()
