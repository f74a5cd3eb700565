"""generation_backend="vllm" checks that need no vLLM: a ReFT policy is refused in one line before any engine
starts, and an unknown backend names the key. (vLLM's generation itself: tests/vllm, `make test-vllm`.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from alignkit.adapters import AdapterConfig, LoraSettings, ReftSettings, apply_adapter
from alignkit.models.loading import load_model, load_tokenizer
from alignkit.models.tiny import save_tiny
from alignkit.online.generation import SamplingConfig
from alignkit.online.grpo import GRPOConfig, GRPOTrainer
from alignkit.online.ppo import PPOConfig
from alignkit.settings import ConfigError


@pytest.fixture(autouse=True)
def vllm_importable(monkeypatch):
    """These trainers are built where vLLM may be absent (`make test`): the colocated engine starts only at the first
    generation, so the trainer's own checks are what is tested; `vllm_installed` is pretended true for them (the
    refusal when it is false: test_a_colocated_trainer_without_vllm_is_refused_when_built)."""
    import alignkit.online.trainer as trainer

    monkeypatch.setattr(trainer, "vllm_installed", lambda: True, raising=False)


@pytest.mark.parametrize("kind", ["reft", "reft+lora"])
def test_reft_policy_is_refused_in_one_line(tiny_dir, tokenizer, kind):
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}, positions="l1")
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind=kind, reft=reft))
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                     report_to="none")
    with pytest.raises(ValueError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"this one is {kind}" in msg
    assert "generation_backend='transformers' for ReFT policies" in msg


@pytest.mark.parametrize("mode", ["colocate", "server"])
@pytest.mark.parametrize("lora, why", [({"use_dora": True}, "uses DoRA (use_dora)"),
                                       ({"modules_to_save": ["lm_head"]}, "trains extra modules (")])
def test_lora_features_vllm_lacks_are_refused_before_any_engine(tiny_dir, tokenizer, lora, why, mode):
    """A LoRA policy vLLM's LoRA cannot load (DoRA, extra trained modules): the online trainer started, wrote the run
    folder, and vLLM's loader refused the adapter at the first generation (colocated: its PEFTHelper 'vLLM does not
    yet support DoRA'; server mode: vllm-serve's 400 on the first push). Now one line when the trainer is built, before
    an engine starts or a server is contacted; the plain LoRA passes that check."""
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                     report_to="none", vllm_mode=mode, vllm_server_timeout=0.1 if mode == "server" else 300.0)
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=2, **lora)))
    with pytest.raises(ValueError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"generation_backend='vllm': the LoRA policy {why}"), msg
    assert "generation_backend='transformers'" in msg
    plain = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    GRPOTrainer(plain, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)  # no engine until generation


def test_max_model_len_shorter_than_prompt_and_response_is_refused_before_the_engine(tiny_dir, tokenizer):
    """method.vllm.max_model_len below the longest prompt + sampling.max_new_tokens: vLLM's scheduler ends a request at
    max_model_len tokens in all (FINISHED_LENGTH_CAPPED), which alignkit read as finish 'length', so the run trained on
    shorter responses than asked, exit 0. Now one line when the trainer is built (the CLI: before the run folder),
    naming the prompt and the length needed. The prompt's length comes from the tokenizer itself (BOS + tokens)."""
    prompts = ["hi", "the quick brown fox jumps"]
    longest = len(tokenizer(prompts[1])["input_ids"])
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="full"))

    def build(limit: int) -> None:
        cfg = GRPOConfig(steps=1, prompts_per_step=2, sampling=SamplingConfig(num_samples=2, max_new_tokens=5),
                         generation_backend="vllm", report_to="none", vllm={"max_model_len": limit}, formatter="plain")
        GRPOTrainer(policy, tokenizer, prompts, {"type": "function", "fn": lambda p, r: 0.0}, cfg)

    with pytest.raises(ConfigError) as e:
        build(longest + 5 - 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"method.vllm.max_model_len {longest + 4} is shorter than prompt "
                                              f"'prompt[1]' ({longest} tokens, the longest) + sampling.max_new_tokens (5) = "
                                              f"{longest + 5}"), msg
    build(longest + 5)  # fits exactly: no engine is started before the first generation


def test_generation_checks_the_engines_max_model_len_before_any_request(tokenizer):
    """The engine's own max_model_len (vllm.LLM's, derived from the model when not set; the server's /info) is checked
    by every generation before a request goes out."""
    from alignkit.online.vllm_generation import generate_with

    asked = []

    def complete(encoded, requests):
        asked.append(encoded)
        return [[[5] * r["max_tokens"]] for r in requests]

    n = len(tokenizer("hello there")["input_ids"])
    cfg = SamplingConfig(num_samples=1, max_new_tokens=3, do_sample=False)
    with pytest.raises(ConfigError, match=rf"^the engine's limit {n + 2} is shorter than prompt 'prompt\[0\]' \({n} tokens"):
        generate_with(complete, tokenizer, ["hello there"], cfg, formatter="plain", max_model_len=n + 2,
                      max_model_len_key="the engine's limit")
    assert asked == []
    samples = generate_with(complete, tokenizer, ["hello there"], cfg, formatter="plain", max_model_len=n + 3)
    assert len(asked) == 1 and len(samples[0].response_ids) == 3


def test_model_generation_config_options_vllm_would_ignore_are_refused(tiny_dir, tokenizer):
    """A generation_config.json option beyond sampling.* (here suppress_tokens): transformers generation applies it
    (shown: the suppressed greedy token is not drawn), vLLM's SamplingParams got sampling.* only, so the vLLM backend
    sampled from another distribution than the transformers backend, without a word. Now one line when the trainer
    is built, naming the option; the model without it builds."""
    from alignkit.online.generation import generate_responses

    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    greedy = SamplingConfig(do_sample=False, max_new_tokens=1)
    first = generate_responses(policy, tokenizer, ["hello there"], greedy, formatter="plain")[0].response_ids[0]
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                     report_to="none")
    GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
    policy.generation_config.suppress_tokens = [first]
    assert generate_responses(policy, tokenizer, ["hello there"], greedy, formatter="plain")[0].response_ids[0] != first
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
    assert "\n" not in str(e.value) and str(e.value).startswith(
        f"generation_backend='vllm': {tiny_dir('llama')}/generation_config.json sets suppress_tokens=[{first}], which "
        "transformers generation applies and vLLM's sampling (sampling.* only) would ignore"), str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this Python")
def test_cli_without_vllm_is_refused_before_the_run_folder(tmp_path, capsys):
    """method.generation_backend=vllm (colocated) where vLLM is not installed: the engine is made at the first step,
    so the run folder (config.yaml, base_model/, tensorboard/) was written and then the ImportError stopped it; the
    same command again then needed --overwrite. Now the one line comes before anything is written."""
    from alignkit.cli import main

    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"
    code = main(["-q", "grpo", "--config", str(config), f"output_dir={out}", "train.max_steps=1",
                 "method.generation_backend=vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("alignkit grpo: error: method.generation_backend='vllm' needs vLLM in this "
                                            "Python"), err
    assert "method.vllm_mode=server" in err[-1] and not out.exists()


def test_a_colocated_trainer_without_vllm_is_refused_when_built(tiny_dir, tokenizer, monkeypatch):
    """A colocated vLLM trainer built from Python where vLLM is not installed: the trainer was built, train() wrote
    its output folder and the engine's import failed at the first step. Now one line when the trainer is built
    (install vLLM, or use transformers generation); server mode needs no vLLM in the trainer's Python."""
    import alignkit.online.trainer as trainer

    monkeypatch.setattr(trainer, "vllm_installed", lambda: False, raising=False)
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    for mode in ("colocate", "server"):
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none", vllm_mode=mode)
        if mode == "server":  # its server is contacted at the first step (the CLI contacts it before writing)
            GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
            continue
        with pytest.raises(ConfigError) as e:
            GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("generation_backend='vllm' needs vLLM in this Python (make vllm-env ")
        assert "pip install vllm" in msg and "use generation_backend='transformers'" in msg, msg


def test_a_head_size_vllms_attention_lacks_is_refused_when_the_trainer_is_built(tiny_dir, tokenizer, monkeypatch):
    """vLLM's CPU build started its engine on a tiny Llama with head_dim 16 and failed the first generation
    ('Unsupported CPU attention configuration: head_dim=16'), after the run folder was written. Now one line when the
    trainer is built, naming the folder, the head size and the sizes vLLM takes (vLLM's own answer:
    `attention_head_sizes`, pinned in tests/compat/test_vllm.py; stood in for here, where vLLM may be absent).
    The tiny Llama's size: hidden 64 / 4 heads = 16; hidden 128 / 2 heads = 64 builds."""
    import alignkit.models.vllm_support as support

    cpu = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vLLM 0.32's CPUAttentionBackend
    monkeypatch.setattr(support, "attention_head_sizes", lambda size: None if size in cpu else ("CPU_ATTN", cpu))

    def build(folder):
        policy = apply_adapter(load_model(folder), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none")
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)

    small = tiny_dir("llama")
    with pytest.raises(ConfigError) as e:
        build(small)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"generation_backend='vllm': the model in {small} has attention head "
                                              "size 16 (head_dim, else hidden_size / num_attention_heads), and vLLM's "
                                              "CPU_ATTN attention here takes 32, 64, 80, "), msg
    assert msg.endswith("or method.generation_backend=transformers"), msg
    build(tiny_dir("llama", hidden_size=128, num_heads=2))


def test_vllm_seed_is_the_engines_and_does_not_collide(tiny_dir, tokenizer, monkeypatch):
    """method.vllm.seed (a vllm.LLM argument) beside the run's seed: the engine was built as
    VllmGenerator(..., seed=train.seed, **method.vllm), a TypeError ('multiple values for keyword argument seed') at
    the first generation, after the run folder was written. The engine now gets method.vllm.seed (else train.seed)."""
    import alignkit.online.step as step

    made = []

    class Engine:
        def __init__(self, policy, tok, **kw):
            made.append(kw)

        def sync(self, policy):
            pass

        def generate(self, prompts, cfg, **kw):
            return []

    monkeypatch.setattr(step, "VllmGenerator", Engine)
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="full"))
    for vllm, seed in (({"seed": 5, "max_model_len": 64}, 5), ({}, 3)):
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none", seed=3, vllm=vllm)
        trainer = GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
        trainer.sample_prompts(["hi"], 0)
        assert made[-1] == {**vllm, "seed": seed}


def test_unknown_backend_names_the_key():
    with pytest.raises(ValueError, match="generation_backend must be 'transformers' or 'vllm', got 'sglang'"):
        GRPOConfig(generation_backend="sglang")


def test_each_kind_says_how_vllm_gets_its_weights():
    from alignkit.adapters import registry

    got = {kind: cls.vllm_sync for kind, cls in registry().items()}
    assert got == {"full": "weights", "lora": "lora_request", "reft": None, "reft+lora": None}


def test_temperature_above_vllms_range_is_refused_before_training():
    """vLLM's SamplingParams accept temperature in [0, 2]; alignkit's own generation accepts any > 0. With the vLLM
    backend a higher temperature would pass alignkit's checks and fail at the first generation, after the engine
    started: refused when the config is built, naming the key and both ways out."""
    with pytest.raises(ValueError, match=r"sampling.temperature 2.5 is above 2.*generation_backend='transformers'"):
        GRPOConfig(generation_backend="vllm", sampling=SamplingConfig(temperature=2.5, num_samples=2))
    GRPOConfig(generation_backend="vllm", sampling=SamplingConfig(temperature=2.0, num_samples=2))  # the bound itself is vLLM's
    GRPOConfig(generation_backend="transformers", sampling=SamplingConfig(temperature=2.5, num_samples=2))
    PPOConfig(generation_backend="vllm", sampling=SamplingConfig(temperature=3.0, do_sample=False))  # greedy (PPO: GRPO refuses it)


def test_unknown_vllm_engine_arguments_are_refused_when_the_config_is_built():
    """A misspelt method.vllm key (max_model_lenn) was passed to vllm.LLM, which refused it only when the engine
    started at the first step, after the run folder was written. Now one line when the config is built, naming the
    key and the close name; the arguments alignkit knows pass."""
    sampling = SamplingConfig(num_samples=2)
    with pytest.raises(ValueError) as e:
        GRPOConfig(generation_backend="vllm", sampling=sampling, vllm={"max_model_lenn": 64, "dtype": "float32"})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("online config: vllm: 'max_model_lenn' (did you mean 'max_model_len'?) "
                                              "is not an engine argument"), msg
    GRPOConfig(generation_backend="vllm", sampling=sampling,
               vllm={"max_model_len": 64, "gpu_memory_utilization": 0.5, "max_lora_rank": 16, "enforce_eager": True})


def test_a_max_lora_rank_below_the_policys_rank_is_refused_before_the_engine(tiny_dir, tokenizer):
    """method.vllm.max_lora_rank 8 with a LoRA of rank 16: vLLM refused the adapter when it loaded it, at the first
    generation (after the run folder was written); 12, not a rank vLLM takes, failed when the engine started, and so
    did a LoRA of rank 520 (above vLLM's largest, 512) without max_lora_rank. Now one line each when the trainer is
    built; 16 passes."""
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=16)))

    def build(**vllm):
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none", vllm=vllm)
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)

    for vllm, start in (({"max_lora_rank": 8}, "method.vllm.max_lora_rank 8 is below the LoRA policy's rank 16 "),
                        ({"max_lora_rank": 12}, "method.vllm.max_lora_rank 12 is not a rank vLLM accepts"),
                        ({"enable_lora": False}, "method.vllm.enable_lora is false")):
        with pytest.raises(ConfigError) as e:
            build(**vllm)
        assert "\n" not in str(e.value) and str(e.value).startswith(start), str(e.value)
    build(max_lora_rank=16)
    policy = apply_adapter(load_model(tiny_dir("llama")), AdapterConfig(kind="lora", lora=LoraSettings(r=520)))
    with pytest.raises(ConfigError, match=r"^the LoRA policy's rank 520 \(adapter.lora.r\) is above 512, the largest"):
        build()


def test_the_engines_own_max_model_len_is_derived_and_checked_before_the_engine(tiny_dir, tokenizer, tmp_path):
    """Without method.vllm.max_model_len the engine takes the model's own (vLLM derives it from config.json): a
    prompt + max_new_tokens past it was refused only at the first generation. Now when the trainer is built: 16
    positions (max_position_embeddings) < 8 prompt tokens + 10; a max_model_len of 64 above the model's 16 (vLLM
    refuses it at start) is one line too. Linear RoPE scaling x2 on those 16 positions is 32 in vLLM, but 16 in
    alignkit's training and engine, so still too short (row V16); saved by model.rope_scaling (32 positions) it fits."""
    prompt = "the quick brown fox jumps over"
    n = len(tokenizer(prompt)["input_ids"])
    assert n + 10 > 16 and n + 10 <= 32, "the test needs a prompt of 7 to 22 tokens"
    short = tiny_dir("llama", max_positions=16)

    def build(folder, **vllm):
        policy = apply_adapter(load_model(folder), AdapterConfig(kind="full"))
        cfg = GRPOConfig(steps=1, prompts_per_step=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=10),
                         generation_backend="vllm", report_to="none", formatter="plain", vllm=vllm)
        GRPOTrainer(policy, tokenizer, [prompt], {"type": "function", "fn": lambda p, r: 0.0}, cfg)

    with pytest.raises(ConfigError) as e:
        build(short)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"the engine's max_model_len (from max_position_embeddings in {short / 'config.json'}) 16 is shorter than "
        f"prompt 'prompt[0]' ({n} tokens, the longest) + sampling.max_new_tokens (10) = {n + 10}"), msg
    assert "raise" not in msg and "lower sampling.max_new_tokens" in msg
    with pytest.raises(ConfigError, match=r"^method.vllm.max_model_len 64 is above the model's context 16 "):
        build(short, max_model_len=64)
    import json
    import shutil

    scaled = shutil.copytree(short, tmp_path / "scaled")  # linear x2, max_position_embeddings 16: vLLM's own is 32,
    config = json.loads((scaled / "config.json").read_text())  # but alignkit trains and serves 16 (row V16)
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^the engine's max_model_len \(from max_position_embeddings 16 in .*, not "
                                          r"vLLM's own 32: linear RoPE: vLLM multiplies it by the factor 2.0 again"):
        build(scaled)
    saved = tmp_path / "saved"  # as model.rope_scaling saves it: max_position_embeddings 32, which fits
    load_model(short, rope_scaling={"type": "linear", "factor": 2.0}).save_pretrained(saved)
    build(saved)


def test_a_policy_whose_rope_the_engines_folder_lacks_is_refused(tiny_dir, tokenizer):
    """model.rope_scaling changes the loaded config, not config.json, which the colocated engine reads: vLLM sampled
    with the folder's unscaled RoPE while the policy trained with linear x2, without a word. Now one line when the
    trainer is built; the policy loaded as the folder is builds."""
    folder = tiny_dir("llama")

    def build(**load):
        policy = apply_adapter(load_model(folder, **load), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none")
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)

    with pytest.raises(ConfigError) as e:
        build(rope_scaling={"type": "linear", "factor": 2.0})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("generation_backend='vllm': the policy's RoPE is {") and \
        "'factor': 2.0" in msg and f"{folder / 'config.json'}, whose RoPE is {{" in msg, msg
    build()


def test_an_engine_folder_holding_another_model_is_refused(tiny_dir, tokenizer, tmp_path):
    """method.vllm.model naming a folder of the same architecture but other weights (a finetuned copy of the base:
    an SFT run's model under a LoRA trained on the base; another model of the same shapes): a LoRA policy's engine
    gets only the adapter, so vLLM sampled from the folder's other weights, without a word. Now one line naming the
    key, both folders and what differs, when the trainer is built (the folder's safetensors read in slices); so is
    method.vllm.load_format='dummy' (vLLM's random weights) under a LoRA. The base folder itself, the base saved again in bf16, and a full-finetuning policy (the engine gets every weight)
    still build."""
    import torch

    base = tiny_dir("llama")
    finetuned, other, bf16 = tmp_path / "sft", tmp_path / "other", tmp_path / "bf16"
    model = load_model(base)
    with torch.no_grad():  # what SFT steps do to the final norm (the embedding rows probed may stay as they were)
        model.model.norm.weight.add_(1e-3)
    model.save_pretrained(finetuned)
    load_model(base).to(torch.bfloat16).save_pretrained(bf16)
    save_tiny(other, "llama", seed=1)  # same shapes, other weights
    narrower = tiny_dir("llama", hidden_size=32)

    def build(folder, kind="lora", **vllm):
        policy = apply_adapter(load_model(base), AdapterConfig(kind=kind, lora=LoraSettings(r=2) if "lora" in kind else LoraSettings()))
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none", vllm={"model": str(folder), **vllm})
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)

    for folder, why in [(finetuned, "its final norm weights differ"), (other, "its input embedding weights differ"),
                        (narrower, f"hidden_size 32 in {narrower}, 64 in the policy's base")]:
        with pytest.raises(ConfigError) as e:
            build(folder)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"method.vllm.model: the colocated engine would load {folder}, ") \
            and f"trained on ({base})" in msg and why in msg and msg.endswith(f"policy's base folder ({base})"), msg
    with pytest.raises(ConfigError, match=r"^method.vllm.load_format='dummy': the colocated engine would start from "
                                          r"random weights, .*; remove method.vllm.load_format$"):
        build(base, load_format="dummy")  # vLLM's random weights under the LoRA
    build(base)
    build(bf16)
    build(finetuned, kind="full")


def test_an_engine_folder_whose_weights_cannot_be_compared_is_a_warning(tiny_dir, tokenizer, tmp_path, caplog):
    """The weight check of method.vllm.model read nothing in a folder without safetensors (.bin weights) or whose
    tensors have other names, and went on as if the folder were the policy's base, without a word. Now a warning
    naming the folder and saying its weights were not compared (not refused: such a folder may hold the base);
    the base folder itself, whose probes are read and compared, gives none."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base = tiny_dir("llama")
    renamed, binary = tmp_path / "renamed", tmp_path / "bin"
    for folder in (renamed, binary):
        shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    weights = load_file(str(base / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights and "model.norm.weight" in weights
    save_file({k.replace("model.", "backbone.", 1): v for k, v in weights.items()}, str(renamed / "model.safetensors"))
    torch.save(weights, binary / "pytorch_model.bin")

    def warnings_for(folder):
        policy = apply_adapter(load_model(base), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
        cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                         report_to="none", vllm={"model": str(folder)})
        caplog.clear()
        with caplog.at_level("WARNING", logger="alignkit.online.vllm_engine"):
            GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
        return [r.getMessage() for r in caplog.records if "were not compared" in r.getMessage()]

    for folder, why in ((renamed, "its safetensors hold no input embedding / final norm under the policy's names"),
                        (binary, "it has no model.safetensors (or its index)")):
        got = warnings_for(folder)
        assert len(got) == 1 and got[0].startswith(f"method.vllm.model: the weights of {folder}, ") \
            and f"not compared with the policy's base ({base}): {why}" in got[0] and "\n" not in got[0], got
    assert warnings_for(base) == []


def test_the_policys_own_base_folder_is_no_warning_whatever_its_weight_files(tiny_dir, tmp_path, caplog):
    """A policy loaded from a folder of .bin weights (no safetensors) and sampled by the engine from that same folder
    (method.vllm.model not set: the policy's own name_or_path) warned at every run that the folder's weights were
    not compared with the policy's base and to make sure it holds that base: the policy's base was read from that
    very folder. Now no warning there; a copy of it elsewhere still warns (previous test)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    binary = tmp_path / "bin"
    shutil.copytree(tiny_dir("llama"), binary, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(str(tiny_dir("llama") / "model.safetensors")), binary / "pytorch_model.bin")
    policy = apply_adapter(load_model(binary), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                     report_to="none")
    with caplog.at_level("WARNING", logger="alignkit.online.vllm_engine"):
        GRPOTrainer(policy, load_tokenizer(binary), ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
    assert not [r.getMessage() for r in caplog.records if "were not compared" in r.getMessage()]


def test_a_folders_fingerprint_is_read_where_the_policys_was_taken(tiny_dir, arch):
    """`folder_fingerprint` finds, in every tiny architecture's safetensors, the tensors the policy's fingerprint
    probed (input embedding rows, final norm: llama `model.norm.weight`, gpt2 `transformer.ln_f.bias`, ...) under a
    LoRA wrapper, and reads the same float32 values as the loaded model holds."""
    from alignkit.adapters.base import base_mismatch, folder_fingerprint, recorded_base

    folder = tiny_dir(arch)
    policy = apply_adapter(load_model(folder), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    ours = recorded_base(policy)
    theirs = folder_fingerprint(folder, policy, ours)
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "probe_rows", "embedding_probe",
                "norm_probe", "norm_dtype"):
        assert theirs[key] == ours[key], key
    assert base_mismatch(ours, theirs) is None


def test_a_policy_with_dynamic_rope_is_refused_for_the_vllm_engine(tiny_dir, tokenizer, tmp_path):
    """A policy and engine folder that agree on dynamic NTK scaling (the folder saved with it) passed
    check_engine_rope, but vLLM uses one fixed table of frequencies where transformers rescales them by the sequence's
    length past the original context (row V15): rollouts past it sampled from another model than the one whose
    log-probabilities are trained. Now one line
    when the trainer is built."""
    import json
    import shutil

    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "dyn")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "dynamic", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(config))
    policy = apply_adapter(load_model(folder), AdapterConfig(kind="lora", lora=LoraSettings(r=2)))
    cfg = GRPOConfig(steps=1, sampling=SamplingConfig(num_samples=2, max_new_tokens=2), generation_backend="vllm",
                     report_to="none")
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(policy, tokenizer, ["hi"], {"type": "function", "fn": lambda p, r: 0.0}, cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"generation_backend='vllm': the model in {folder} has dynamic RoPE "
                                              "scaling"), msg
    assert "method.generation_backend=transformers" in msg


def test_a_rope_scaled_model_starts_vllm_at_the_context_alignkit_trains(tiny_dir, tokenizer, tmp_path, monkeypatch,
                                                                         caplog):
    """vLLM multiplies a linear model's max_position_embeddings by its factor, which model.rope_scaling has already
    applied: a model saved with linear x2 on 16 positions (32) ran 64 in vLLM, prompts past the 32 it was trained on
    (and that alignkit's engine refuses) taken without a word. A longrope model ran every position with the long
    factors once vLLM's max_model_len was above its original 16 (transformers: short ones up to 16 tokens). Now the
    engine starts with max_model_len 32 / 16 (`start_max_model_len`, which VllmGenerator passes); a given longer one
    is refused for longrope and warned about for linear; yarn and llama3 (vLLM reads them as alignkit does) are left
    to vLLM. Figures by hand; vLLM's own side: tests/compat/test_vllm.py (row V16)."""
    import sys
    import types

    from transformers import AutoConfig

    from alignkit.models.vllm_support import engine_limit, engine_max_model_len, head_size, start_max_model_len

    base = tiny_dir("llama", max_positions=16)
    half = head_size(AutoConfig.from_pretrained(base)) // 2
    cases = {  # kind: (model.rope_scaling, vLLM's own, alignkit's)
        "linear": ({"type": "linear", "factor": 2.0}, 64, 32),
        "yarn": ({"type": "yarn", "factor": 2.0}, 32, 32),
        "llama3": ({"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 32, 32),
        "longrope": ({"type": "longrope", "factor": 2.0, "short_factor": [1.0] * half, "long_factor": [2.0] * half},
                     None, 16),
    }
    for kind, (scaling, vllms, ours) in cases.items():
        folder = tmp_path / kind
        load_model(base, rope_scaling=scaling).save_pretrained(folder)
        own = engine_max_model_len(folder, {})[0]
        assert vllms is None or own == vllms, (kind, own)
        assert engine_limit(folder, {})[0] == ours, kind
        assert start_max_model_len(folder, {}) == (ours if own > ours else None), kind
    with pytest.raises(ConfigError) as e:
        engine_limit(tmp_path / "longrope", {"max_model_len": 32})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"method.vllm.max_model_len 32 is above original_max_position_embeddings 16 in "
        f"{tmp_path / 'longrope' / 'config.json'} (longrope RoPE: above it vLLM rotates every position with the long "
        "factors"), msg
    assert msg.endswith("set method.vllm.max_model_len to 16 or less"), msg
    with caplog.at_level("WARNING", logger="alignkit.models.vllm_support"):
        assert engine_limit(tmp_path / "linear", {"max_model_len": 48})[0] == 48
    assert [r.getMessage() for r in caplog.records] == [
        f"method.vllm.max_model_len 48 is above max_position_embeddings 32 in {tmp_path / 'linear' / 'config.json'} "
        "(linear RoPE: vLLM multiplies it by the factor 2.0 again, past the positions the model was trained on "
        "(model.rope_scaling records the scaled length there)): positions past 32 were never trained; lower "
        "method.vllm.max_model_len to 32"]

    made = []  # the colocated engine is started with it (vllm.LLM replaced: its keywords recorded)

    class LLM:
        def __init__(self, **kw):
            made.append(kw)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=kw.get(
                "max_model_len", 64)))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    from alignkit.online.vllm_generation import VllmGenerator

    policy = apply_adapter(load_model(tmp_path / "linear"), AdapterConfig(kind="full"))
    for given, started in (({}, 32), ({"max_model_len": 48}, 48)):
        engine = VllmGenerator(policy, tokenizer, model=str(tmp_path / "linear"), workdir=tmp_path / "w", **given)
        assert made[-1]["max_model_len"] == started and engine.max_model_len == started
    VllmGenerator(policy, tokenizer, model=str(tmp_path / "yarn"), workdir=tmp_path / "w")
    assert "max_model_len" not in made[-1]


def test_yarn_with_more_positions_than_vllms_table_starts_vllm_at_the_table(tiny_dir, tmp_path):
    """vLLM's yarn cos/sin table holds original_max_position_embeddings x factor rows, its max_model_len is
    max_position_embeddings: a yarn x2 model on 16 positions whose config.json gives max_position_embeddings 64
    (transformers only warns of it; model.rope_scaling refuses it) ran 64 in vLLM with a 32-row table, positions 32..63 read from memory outside it (other numbers every run, no error),
    where transformers rotates them with the same frequencies. Now vLLM starts at 32 and a given 64 is refused in one
    line. Within the table nothing changes: factor 2.1 has ceil(16 x 2.1) = 34 rows, so 34 positions run as vLLM's
    own; llama3 (a table of max_position_embeddings rows) is left to vLLM at 64. Figures by hand; vLLM's side:
    tests/compat/test_vllm.py (row V17)."""
    import json
    import shutil

    from alignkit.models.vllm_support import engine_limit, engine_max_model_len, start_max_model_len

    base = tiny_dir("llama", max_positions=16)
    cases = {  # name: (rope_parameters, max_position_embeddings = vLLM's own max_model_len, alignkit's)
        "yarn64": ({"rope_type": "yarn", "factor": 2.0}, 64, 32),
        "yarn34": ({"rope_type": "yarn", "factor": 2.1}, 34, 34),
        "llama3": ({"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 64, 64),
    }
    for name, (rope, vllms, ours) in cases.items():
        folder = shutil.copytree(base, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        config["rope_parameters"] = {**config["rope_parameters"], **rope, "original_max_position_embeddings": 16}
        (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": vllms}))
        assert engine_max_model_len(folder, {})[0] == vllms, name
        assert engine_limit(folder, {})[0] == ours, name
        assert start_max_model_len(folder, {}) == (ours if vllms > ours else None), name
    config = tmp_path / "yarn64" / "config.json"
    limit, source = engine_limit(tmp_path / "yarn64", {})
    assert source.startswith(f"original_max_position_embeddings 16 x factor 2.0 (rope_parameters) = 32 in {config}, "
                             "not vLLM's own 64: yarn RoPE: vLLM's cos/sin table has that many rows"), source
    assert engine_limit(tmp_path / "yarn64", {"max_model_len": 32})[0] == 32
    with pytest.raises(ConfigError) as e:
        engine_limit(tmp_path / "yarn64", {"max_model_len": 64})
    msg = str(e.value)
    assert "\n" not in msg and msg == (
        f"method.vllm.max_model_len 64 is above original_max_position_embeddings 16 x factor 2.0 (rope_parameters) = "
        f"32 in {config} (yarn RoPE: vLLM's cos/sin table has that many rows while its max_model_len is "
        "max_position_embeddings 64, so it would read a position past them from memory outside the table, where "
        "transformers keeps rotating with the same frequencies), so vLLM would generate from another model than the one trained; set "
        "method.vllm.max_model_len to 32 or less"), msg


def test_a_linear_factor_written_as_an_integer_is_saved_as_a_float_and_refused_in_a_folder(tiny_dir, tmp_path):
    """`model.rope_scaling: {type: linear, factor: 2}` (an integer in YAML) was saved as `"factor": 2`, on which vLLM's
    linear RoPE fails when the engine starts ('int' object is not iterable, after the run folder was written; row
    V16). Now it is saved as 2.0, and a folder holding an integer one is refused in one line before vLLM starts."""
    import json

    from alignkit.models.vllm_support import check_rope_type, folder_config

    folder = tmp_path / "int"
    load_model(tiny_dir("llama"), rope_scaling={"type": "linear", "factor": 2}).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert repr(config["rope_parameters"]["factor"]) == "2.0"
    check_rope_type(folder_config(folder, {}), folder, "serve --engine vllm", "serve it with --engine alignkit")
    config["rope_parameters"]["factor"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        check_rope_type(folder_config(folder, {}), folder, "serve --engine vllm", "serve it with --engine alignkit")
    msg = str(e.value)
    assert "\n" not in msg and msg == (
        f"serve --engine vllm: the model in {folder} has linear RoPE scaling with the integer factor 2 (rope_parameters "
        f"in {folder / 'config.json'}), on which vLLM's linear RoPE fails when the engine starts ('int' object is not "
        "iterable: it takes a float); write factor: 2.0 there, or serve it with --engine alignkit"), msg
