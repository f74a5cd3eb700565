"""`train.compile` (regional torch.compile of each decoder layer) trains to the same losses as eager, and
`model.kernels: liger` names what is missing on a machine without the package or a GPU.

The default tests compile with the `aot_eager` backend (dynamo capture + AOT autograd: the whole graph path
except code generation, a few seconds); the inductor test (real C++ code generation on CPU) is `slow`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.models.efficiency import apply_kernels, compile_layers, decoder_layers
from alignkit.models.loading import load_model
from alignkit.settings import ConfigError, load_config
from alignkit.trainers import SFTTrainer

from tests.trainers.conftest import adapter_config, collators, fast_args, features  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def train_losses(tiny_dir, features, collators, tmp_path, compile_options, adapter=None, steps=3):
    from alignkit.adapters import apply_adapter

    model = load_model(tiny_dir("llama"))
    if adapter is not None:
        torch.manual_seed(0)
        model = apply_adapter(model, adapter)
    if compile_options is not None:
        assert compile_layers(model, **compile_options) == 2
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    trainer = SFTTrainer(model, fast_args(tmp_path, max_steps=steps), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_decoder_layers_found_through_wrappers(tiny_lm):
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter

    for arch, attr in (("llama", "model.layers"), ("gpt2", "transformer.h"), ("gpt_neox", "gpt_neox.layers")):
        model = tiny_lm(arch)
        assert decoder_layers(model) is model.get_submodule(attr)
    lora = apply_adapter(tiny_lm("llama"), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    assert len(decoder_layers(lora)) == 2


@pytest.mark.parametrize("kind", ["full", "lora", "reft"])
def test_compiled_layers_train_to_eager_losses(tiny_dir, features, collators, tmp_path, kind):
    adapter = None if kind == "full" else adapter_config(kind)
    eager = train_losses(tiny_dir, features, collators, tmp_path / "e", None, adapter)
    compiled = train_losses(tiny_dir, features, collators, tmp_path / "c", {"backend": "aot_eager"}, adapter)
    assert len(eager) == 3 and eager[0] != eager[-1]  # it trained
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_compiled_reft_layers_are_not_recompiled_for_each_batchs_locations(tiny_lm):
    """Before: `edit_positions`' fast path compared the run's largest location (a Python int) in the hook that runs
    inside each compiled layer, so dynamo guarded on its value and recompiled the hook for every batch whose prompt
    ended elsewhere (twice: one entry per layer) until its recompile limit (8) after 4 batches, then ran the hooks
    uncompiled (TORCH_LOGS=recompiles: `_layer_step[0].run.last_location == 171`). Now batches of one shape with
    other locations reuse the compiled code, and the edits are unchanged."""
    import torch._dynamo

    from alignkit.interventions import ReftConfig
    from alignkit.interventions.attach import get_reft_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    reft = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2))
    eager = get_reft_model(tiny_lm("llama"), ReftConfig.uniform([0, 1], "loreft", low_rank_dimension=2))
    eager.interventions.load_state_dict(reft.interventions.state_dict())
    compile_layers(reft, backend="eager")
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))

    def logits(model, last):
        loc = torch.tensor([[0, last]]).expand(2, 2, 2)  # (rows, interventions, positions)
        with torch.no_grad():
            return model(input_ids=ids, intervention_locations=loc).logits

    logits(reft, 7)  # compiles (one hook entry per layer)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for last in (6, 5, 4, 3, 2):
            torch.testing.assert_close(logits(reft, last), logits(eager, last))
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_layers_train_to_eager_losses(tiny_dir, features, collators, tmp_path):
    """The default backend (inductor, C++ on CPU); minutes on a busy 2-core machine, seconds with a warm cache."""
    eager = train_losses(tiny_dir, features, collators, tmp_path / "e", None, steps=2)
    compiled = train_losses(tiny_dir, features, collators, tmp_path / "c", {}, steps=2)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_train_compile_from_the_cli(tmp_path, monkeypatch):
    """train.compile with options reaches compile_layers (on the adapted model) and the run trains."""
    import alignkit.cli.train as efficiency  # where the command calls compile_layers

    calls = []
    real = efficiency.compile_layers
    monkeypatch.setattr(efficiency, "compile_layers", lambda model, **kw: calls.append(kw) or real(model, **kw))
    out = tmp_path / "run"
    assert main(["-q", "sft", "--config", str(ROOT / "configs" / "sft-tiny.yaml"), f"output_dir={out}",
                 "train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0",
                 "train.compile={backend: aot_eager}"]) == 0
    assert calls == [{"backend": "aot_eager"}]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]


def test_an_empty_compile_mapping_compiles_with_the_defaults(monkeypatch, tiny_lm):
    """`train.compile: {}` (torch.compile options, none changed) was read as false: nothing compiled, no word, and
    beside `train.torch_compile: true` not refused as the two together are. Now {} compiles with torch's defaults,
    as true does, and meets the same refusal."""
    import alignkit.cli.train as train_cli

    calls = []
    monkeypatch.setattr(train_cli, "compile_layers", lambda model, **kw: calls.append(kw))
    model = tiny_lm("llama")
    for option in (None, False, True, {}, {"backend": "aot_eager"}):
        train_cli.compile_model(model, option)
    assert calls == [{}, {}, {"backend": "aot_eager"}]
    with pytest.raises(ConfigError, match="train.compile and train.torch_compile: choose one"):
        load_config(ROOT / "configs" / "sft-tiny.yaml", ["train.compile={}", "train.torch_compile=true"])


@pytest.mark.parametrize("override, message", [
    ("train.compile=fast", "train.compile: expected bool or dict"),
    ("train.compile=true", None),
    ("train.compil=true", "train.compil: unknown key; did you mean 'compile'"),
])
def test_train_compile_key_checked(override, message):
    if message is None:
        assert load_config(ROOT / "configs" / "sft-tiny.yaml", [override]).train["compile"] is True
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(ROOT / "configs" / "sft-tiny.yaml", [override])


@pytest.mark.parametrize("options, message", [
    ("{backend: nope}", "train.compile: torch.compile refused {'backend': 'nope'} (InvalidBackend: Invalid backend: "
                        "'nope'"),
    ("{mode: fastest}", "train.compile: torch.compile refused {'mode': 'fastest'} (RuntimeError: Unrecognized "
                        "mode=fastest"),
    ("{mode: default, options: {}}", "train.compile: torch.compile refused {'mode': 'default', 'options': {}} "
                                     "(RuntimeError: Either mode or options can be specified"),
    ("{bogus_key: 1}", "train.compile.bogus_key: not a torch.compile option; valid: fullgraph, dynamic, backend, "),
    ("{fullgraph: maybe}", "train.compile.fullgraph: expected true or false, got 'maybe'"),
])
def test_compile_options_torch_refuses_are_one_line_before_the_run_folder(tmp_path, capsys, options, message):
    """Options torch.compile refuses stopped the command on "unexpected error: InvalidBackend / RuntimeError /
    TypeError ... please report it" (exit 1, naming no key); a string flag (`fullgraph: maybe`) was passed on as
    true, and the run folder was written before dynamo refused the first graph break. Now one ConfigError line
    naming train.compile (exit 2), before the run folder exists."""
    out = tmp_path / "run"
    assert main(["-q", "sft", "--config", str(ROOT / "configs" / "sft-tiny.yaml"), f"output_dir={out}",
                 f"train.compile={options}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")]  # not tqdm's bars
    assert len(err) == 1 and err[0].startswith(f"alignkit sft: error: {message}"), err
    assert not out.exists()


def test_fullgraph_with_padding_free_batches_is_refused_before_the_run_folder(tmp_path, capsys):
    """`train.compile: {fullgraph: true}` on padding-free batches (the CPU default): their attention breaks the graph,
    and the run stopped at its first step on "unexpected error: Unsupported ..." with base_model/, config.yaml and
    tensorboard/ written. Now one line naming train.compile.fullgraph, nothing written; padded batches train."""
    out = tmp_path / "run"
    args = ["-q", "sft", "--config", str(ROOT / "configs" / "sft-tiny.yaml"), f"output_dir={out}", "train.max_steps=1",
            "train.eval_strategy=no", "data.eval_fraction=0", "train.compile={backend: aot_eager, fullgraph: true}"]
    assert main([*args, "train.padding_free=true"]) == 2  # what null resolves to on CPU, on any machine
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit")]
    assert err == ["alignkit sft: error: train.compile.fullgraph: true needs one graph per decoder layer, and this run "
                   "packs its batches without padding (train.padding_free, on by default on CPU), whose attention "
                   "breaks the graph (dynamo would stop at the first step); remove train.compile.fullgraph, or set "
                   "train.padding_free: false"]
    assert not out.exists()
    assert main([*args, "train.padding_free=false"]) == 0


def test_compile_and_torch_compile_are_exclusive():
    with pytest.raises(ConfigError, match="train.compile and train.torch_compile: choose one"):
        load_config(ROOT / "configs" / "sft-tiny.yaml", ["train.compile=true", "train.torch_compile=true"])


def test_liger_names_what_is_missing(tiny_lm):
    missing = []
    if importlib.util.find_spec("liger_kernel") is None:
        missing.append("the liger-kernel package (pip install liger-kernel)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if not missing:
        pytest.skip("liger-kernel and a GPU are both present: bench/run_gpu.py checks the kernels")
    with pytest.raises(ConfigError) as e:
        apply_kernels(tiny_lm("llama"), "liger")
    msg = str(e.value)
    assert msg.startswith("model.kernels: liger needs ") and all(m in msg for m in missing) and "\n" not in msg


def test_unknown_kernels_rejected_at_config_load():
    with pytest.raises(ConfigError, match="model.kernels: 'triton' is not allowed"):
        load_config(ROOT / "configs" / "sft-tiny.yaml", ["model.kernels=triton"])


def test_liger_error_from_the_cli_is_one_line(tmp_path, capsys):
    if importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available():
        pytest.skip("liger usable here")
    assert main(["sft", "--config", str(ROOT / "configs" / "sft-tiny.yaml"), f"output_dir={tmp_path}",
                 "model.kernels=liger"]) == 2
    assert not (tmp_path / "base_model").exists()  # refused before any model is built
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignkit sft: error: model.kernels: liger needs ")


def test_kernels_patch_the_model_a_whole_model_adapter_path_loads(tiny_dir, tmp_path, monkeypatch):
    """eval / generate / sample with `model.adapter_path` = a fully finetuned model's folder load that folder as the
    model, after `load_base` patched `model.kernels` into model.path's model; before, the folder's model ran
    without the kernels asked for and nothing said so. The kernels need a GPU, so the patch is recorded here."""
    from alignkit.adapters import AdapterConfig, apply_adapter, save_adapter
    from alignkit.cli import models as cli_models
    from alignkit.models.loading import load_model
    from alignkit.settings import ModelSettings

    folder = save_adapter(apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="full")), tmp_path / "full")
    patched = []
    monkeypatch.setattr(cli_models, "check_model_kernels", lambda ms, where="model.kernels": None)
    monkeypatch.setattr(cli_models, "apply_kernels", lambda model, kind, where="model.kernels": patched.append(model))
    model, *_ = cli_models.load_for_inference(ModelSettings(path=str(tiny_dir("llama")), adapter_path=str(folder),
                                                            kernels="liger"), None)
    assert any(m is model for m in patched)
