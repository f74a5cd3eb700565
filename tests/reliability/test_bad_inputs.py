"""Issue 12, findings 6 and 7: a corpus of bad inputs, each run through the CLI. Every one must end in exit code 2
and ONE line on stderr that names what is wrong, where (file:line, config key or file) and how to fix it, with no
traceback, without writing the output folder, and without suggesting an unsafe workaround. `--debug` shows the
traceback instead. The data files are in corpus/ (see its README.md)."""

from __future__ import annotations

import re

import shutil
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter, save_adapter
from alignkit.models.loading import load_model
from alignkit.models.tiny import save_tiny

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CORPUS = Path(__file__).resolve().parent / "corpus"
DPO = str(CONFIGS / "dpo-lora-tiny.yaml")
QUICK = ["train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0"]
UNSAFE = ("trust_remote_code=true", "weights_only=false", "ignore_mismatched_sizes", "--no-verify", "rm -rf")


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["-q", *args])
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("alignkit ")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    line = lines[0]
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not any(u in line.lower() for u in UNSAFE), line
    return line


# (case, extra overrides, what the line must contain) -- config mistakes on the DPO + LoRA example
CONFIG_CASES = [
    ("beta negative", ["method.beta=-1"], ["method.beta", "> 0"]),
    ("beta zero", ["method.beta=0"], ["method.beta", "> 0"]),
    ("dropped share past 1", ["data.max_dropped_fraction=1.5"], ["data.max_dropped_fraction", "in [0, 1]"]),
    ("ptx data under dpo", ["data.ptx_path=bundled:data/hh_rlhf_sample.jsonl"],
     ["data.ptx_path", "read only by alignkit ppo", "alignkit dpo would ignore it"]),
    ("max_steps zero", ["train.max_steps=0"], ["train.max_steps", ">= 1, or -1"]),
    ("grad accumulation zero", ["train.gradient_accumulation_steps=0"], ["train.gradient_accumulation_steps", ">= 1"]),
    ("negative lr", ["train.learning_rate=-1e-3"], ["train.learning_rate", "> 0"]),
    ("negative seed", ["train.seed=-1"], ["train.seed", "-1 is out of range", "in [0, 2**32 - 1]"]),
    ("seed past numpy's", ["train.seed=4294967296"], ["train.seed", "in [0, 2**32 - 1]"]),
    ("nan lr", ["train.learning_rate=.nan"], ["train.learning_rate", "not a finite number"]),
    ("scheduler typo", ["train.lr_scheduler_type=cosin"], ["train.lr_scheduler_type", "did you mean 'cosine'"]),
    ("optimizer typo", ["train.optim=adamw"], ["train.optim", "did you mean 'adamw_torch'"]),
    # read by the Trainer only outside train(): ignored by the evaluations during the run, and the final one (eval_strategy
    # no) cast the trained model in place, so model/ was saved in float16 / bfloat16 (compat row M21)
    ("fp16_full_eval on a training run", ["train.fp16_full_eval=true"],
     ["train.fp16_full_eval: true is not applied", "saved in float16", "alignkit eval with model.dtype=float16"]),
    ("bf16_full_eval on a training run", ["train.bf16_full_eval=true", "train.use_cpu=true"],
     ["train.bf16_full_eval: true is not applied", "saved in bfloat16", "remove train.bf16_full_eval"]),
    ("eval_fraction one", ["data.eval_fraction=1.0"], ["data.eval_fraction", "[0, 1)"]),
    ("lora rank zero", ["adapter.lora.r=0"], ["adapter.lora.r", ">= 1"]),
    ("unknown key", ["method.bta=0.1"], ["method.bta", "did you mean 'beta'"]),
    ("ref_sync with a LoRA adapter", ["method.ref_sync={alpha: 0.5, steps: 2}"],
     ["method.ref_sync", "adapter.kind=lora", "no separate reference to move", "adapter.kind=full"]),
    ("ref_sync alpha above 1", ["method.ref_sync.alpha=1.5"], ["method.ref_sync.alpha", "not in (0, 1]"]),
    ("ref_sync steps zero", ["method.ref_sync.steps=0"], ["method.ref_sync.steps", "integer >= 1"]),
    ("ref_sync with a reference-free loss", ["method.loss_type=simpo", "method.ref_sync={alpha: 0.5, steps: 2}"],
     ["method.ref_sync", "nothing to sync"]),
    ("ref_sync with precomputed log-probs", ["method.reference_cache_dir=cache", "method.ref_sync.steps=2"],
     ["method.ref_sync", "stale after the first sync"]),
    # a ReFT that trains lm_head in place: the adapter_off reference kept the trained head (it moved with the policy)
    ("ReFT modules_to_save under an adapter_off reference",
     ["adapter.kind=reft", "adapter.lora=null", "adapter.reft={config: {representations: [{layer: 0, "
      "low_rank_dimension: 2}]}, modules_to_save: [lm_head]}"],
     ["method.reference: 'auto' scores the policy with its adapter switched off", "['lm_head'] is trained whole in "
      "place", "the reference would move with the policy", "method.reference=copy"]),
    ("ReFT prefix cache on a LoRA model", ["train.reft_prefix_cache=true"], ["train.reft_prefix_cache",
                                                                             "needs a ReFT adapter"]),
    # the preference losses' own numbers: a temperature of 0 stopped the run with "unexpected error: ValueError"
    # (PreferenceParams, after the config was accepted); the negative weights were trained the other way (exit 0)
    ("discopop_tau zero", ["method.loss_type=discopop", "method.discopop_tau=0"], ["method.discopop_tau", "> 0"]),
    ("f_alpha negative", ["method.loss_type=fdpo_alpha", "method.f_alpha=-0.5"], ["method.f_alpha", "> 0"]),
    ("orpo_lambda negative", ["method.loss_type=orpo", "method.orpo_lambda=-1"], ["method.orpo_lambda", ">= 0"]),
    ("cpo_alpha negative", ["method.loss_type=cpo", "method.cpo_alpha=-1"], ["method.cpo_alpha", ">= 0"]),
    ("slic_lambda negative", ["method.loss_type=slic", "method.slic_lambda=-0.1"], ["method.slic_lambda", ">= 0"]),
    # a margin in the rejected answers' favour: trained, exit 0 (before)
    ("slic_delta negative", ["method.loss_type=slic", "method.slic_delta=-1"], ["method.slic_delta", ">= 0"]),
    ("simpo gamma negative", ["method.loss_type=simpo", "method.simpo_gamma_beta_ratio=-0.5"],
     ["method.simpo_gamma_beta_ratio", ">= 0"]),
    ("bco_delta is state", ["method.loss_type=bco_pair", "method.bco_delta=0.3"],
     ["method.bco_delta", "trainer state, not a setting", "remove it"]),
    ("loss weight negative", ["method.loss_type=[sigmoid, sft]", "method.loss_weights=[1, -1]"],
     ["method.loss_weights: -1.0", ">= 0 for each loss type"]),
    ("loss weights all zero", ["method.loss_type=[sigmoid, sft]", "method.loss_weights=[0, 0]"],
     ["method.loss_weights: [0.0, 0.0] gives every loss type", "nothing would be trained"]),
    # a part section under a kind without that part, at the default values: the built settings equal the defaults,
    # so it was accepted and ignored (a run's config.yaml held such a section; it now records the kind's parts only)
    ("lora section at its defaults under kind full", ["adapter.kind=full", "adapter.lora={r: 8, alpha: 16.0}"],
     ["adapter.lora: read only by adapter.kind lora or reft+lora", "kind is 'full'", "adapter.lora=null"]),
    # a step count beside a strategy that never reads it (the file's save_strategy "no", eval_steps 10, logging_steps
    # 1): ran, and no checkpoint / evaluation / log came every N steps
    ("save_steps with save_strategy no", ["train.save_steps=3"],
     ["train.save_steps: 3 is read only with train.save_strategy=steps", "train.save_strategy is 'no'",
      "set train.save_strategy=steps", "remove train.save_steps"]),
    ("eval_steps with eval_strategy epoch", ["train.eval_strategy=epoch"],
     ["train.eval_steps: 10 is read only with train.eval_strategy=steps", "train.eval_strategy is 'epoch'"]),
    ("logging_steps with logging_strategy no", ["train.logging_strategy=no"],
     ["train.logging_steps: 1 is read only with train.logging_strategy=steps", "train.logging_strategy is 'no'"]),
    # model.rope_scaling values transformers only warns about (or ignores), on tiny:llama's 512 positions: were
    # transformers' own text (or accepted silently once its warning_once had fired); now alignkit's line
    ("yarn factor not whole", ["model.rope_scaling={type: yarn, factor: 2.1}"],  # 512 x 2.1 = 1075.2
     ["model.rope_scaling.factor: 2.1", "1075.2 positions, not a whole number",
      "use factor 2.099609375 (1075 positions) or 2.1015625 (1076 positions)"]),
    ("yarn mscale alone", ["model.rope_scaling={type: yarn, factor: 2, mscale: 1.0}"],
     ["model.rope_scaling.mscale:", "only together with mscale_all_dim"]),
    ("linear with a yarn key", ["model.rope_scaling={type: linear, factor: 2, beta_fast: 8}"],
     ["model.rope_scaling.beta_fast: type 'linear' does not read beta_fast", "remove it"]),
    ("llama3 bounds reversed", ["model.rope_scaling={type: llama3, factor: 2, low_freq_factor: 4, high_freq_factor: 1}"],
     ["model.rope_scaling.high_freq_factor: 1 is not above low_freq_factor 4"]),
]
ROPE_CASES = [c for c in CONFIG_CASES if c[1][0].startswith("model.rope_scaling")]


@pytest.mark.parametrize("case,overrides,needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_mistakes(case, overrides, needles, tmp_path, capsys):
    rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", *overrides])
    assert_one_line(rc, err, *needles, "dpo-lora-tiny.yaml")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,overrides,needles", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_rope_mistakes_stop_the_dry_run_too(case, overrides, needles, tmp_path, capsys):
    rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", *overrides, "--dry-run"])
    assert_one_line(rc, err, *needles, "dpo-lora-tiny.yaml")
    assert not (tmp_path / "run").exists()


LORA_TARGET_CASES = [  # (target_modules override, what the line must contain)
    # a TRL / peft habit: wrote config.yaml, base_model/ and tensorboard/, then stopped at the first step with
    # "unexpected error: ValueError: the LM head is wrapped by a LoRA layer" (exit 1)
    ("[q_proj, lm_head]", ["adapter.lora.target_modules: ['q_proj', 'lm_head'] puts LoRA on the LM head",
                           "adapter.lora.modules_to_save"]),
    (".*lm_head", ["adapter.lora.target_modules: '.*lm_head' puts LoRA on the LM head"]),
    # a block of layers: peft's own multi-line error ("Target module LlamaMLP(...) is not supported"), raised after
    # the q_proj layers before it had their LoRA
    ("[q_proj, mlp]", ["adapter.lora.target_modules: 'mlp' matches model.layers.0.mlp (LlamaMLP), a block of layers",
                       "'gate_proj'"]),
]


@pytest.mark.parametrize("target,needles", LORA_TARGET_CASES, ids=[c[0] for c in LORA_TARGET_CASES])
def test_a_lora_target_peft_or_alignkit_cannot_use_is_refused_before_anything_is_written(target, needles, tmp_path,
                                                                                        capsys):
    rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", *QUICK,
                               f"adapter.lora.target_modules={target}"])
    assert_one_line(rc, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["lora", "reft+lora"])
@pytest.mark.parametrize("target", [["q_proj", "lm_head"], ".*lm_head", ["q_proj", "mlp"], ["q_proj", "model.layers.1"]])
def test_a_refused_lora_target_leaves_the_callers_model_as_it_was(kind, target, tmp_path):
    """Lora.wrap refused the LM head only after get_peft_model had injected LoRA layers into the caller's model (and
    peft refused a block of layers after adapting the modules before it): a caller that caught the error held a
    changed model. Now the refusal comes first: same modules, same state_dict keys and values, no lora_ module."""
    from alignkit.adapters import ReftSettings

    model = load_model(save_tiny(tmp_path / "tiny", "llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    reft = ReftSettings(config={"representations": [{"layer": 0, "low_rank_dimension": 2}]}) if "reft" in kind else None
    with pytest.raises(ValueError, match=r"^adapter\.lora\.target_modules: ") as e:
        apply_adapter(model, AdapterConfig(kind=kind, lora=LoraSettings(r=2, target_modules=target), reft=reft))
    assert "\n" not in str(e.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert not any("lora_" in n for n, _ in model.named_modules()) and not hasattr(model, "peft_config")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("key,overrides", [
    ("per_device_train_batch_size", [*QUICK, "train.per_device_train_batch_size=64"]),
    ("per_device_eval_batch_size", ["train.max_steps=1", "train.per_device_eval_batch_size=64"]),
])
def test_dataloader_drop_last_with_no_full_batch_is_refused(key, overrides, tmp_path, capsys):
    """train.dataloader_drop_last with a batch larger than the data dropped every batch: training ended at step 0
    ("done.", exit 0, the untrained model saved as model/); an evaluation logged rows without eval_loss. Now one line
    naming the batch size, before the run folder is made (the bundled sample: 4 training and 2 evaluation pairs)."""
    rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", *overrides,
                               "train.dataloader_drop_last=true"])
    n = 6 if key.startswith("per_device_train") else 2  # QUICK holds nothing out: all 6 pairs train
    assert_one_line(rc, err, f"train.dataloader_drop_last: the {n} ", f"no full batch of train.{key}=64",
                    f"set train.{key} to at most {n}")
    assert not (tmp_path / "run").exists()


# (case, command, extra overrides, what the line must contain) -- the online objectives' own numbers. Before, each
# was accepted: dual_clip <= 1 wrote the run folder and stopped at the first step ("unexpected error: ValueError");
# reward_clip -1 clamped every reward to -1 (clamp(1, -1)) and clip_eps -0.2 clipped the ratio to [1.2, 0.8], both
# exit 0 with a saved model. BOUNDS named `cliprange`, a key no config has (PPO's is clip_eps).
ONLINE_CASES = [
    ("dual_clip below one", "grpo", ["method.dual_clip=0.5"], ["method.dual_clip", "> 1"]),
    ("stall_steps negative", "grpo", ["method.stall_steps=-1"], ["method.stall_steps", ">= 0 (0: never stop"]),
    ("reward_clip negative", "grpo", ["method.reward_clip=-1"], ["method.reward_clip", "> 0"]),
    ("reward_clip zero", "grpo", ["method.reward_clip=0"], ["method.reward_clip", "> 0"]),
    ("clip_eps negative", "grpo", ["method.clip_eps=-0.2"], ["method.clip_eps", "> 0"]),
    ("clip_eps_high zero", "grpo", ["method.clip_eps_high=0"], ["method.clip_eps_high", "> 0"]),
    ("ppo clip_eps zero", "ppo", ["method.clip_eps=0"], ["method.clip_eps", "> 0"]),
    ("ppo vf_coef negative", "ppo", ["method.vf_coef=-0.1"], ["method.vf_coef", ">= 0"]),
    # PPO-ptx half set: a ptx_coef without data, or data without a coefficient, would train without the mix / read
    # data it never trains on; data.ptx_path under another command would be ignored
    ("ppo ptx_coef without data", "ppo", ["method.ptx_coef=1.0"], ["method.ptx_coef: 1.0", "data.ptx_path is not set"]),
    ("ppo ptx data without coef", "ppo", ["data.ptx_path=bundled:data/hh_rlhf_sample.jsonl"],
     ["data.ptx_path: set with method.ptx_coef 0"]),
    ("ppo ptx_batch_size without coef", "ppo", ["method.ptx_batch_size=4"], ["method.ptx_batch_size", "ptx_coef"]),
    ("ppo ptx_coef negative", "ppo", ["method.ptx_coef=-1"], ["method.ptx_coef", ">= 0"]),
    ("grpo ptx data", "grpo", ["data.ptx_path=bundled:data/hh_rlhf_sample.jsonl"],
     ["data.ptx_path", "read only by alignkit ppo"]),
    ("ppo ptx loss_on without ptx data", "ppo", ["data.loss_on=last_assistant"], ["data.loss_on", "would ignore"]),
    # "unexpected error: ValueError" once the model was loaded (sample: "batch_size must be >= 1"; grpo, after writing
    # the run folder: "range() arg 3 must not be zero")
    ("sample batch_size zero", "sample", ["batch_size=0"], ["batch_size: 0 is out of range", ">= 1"]),
    ("online-dpo loss weight negative", "online-dpo", ["method.loss_type=[sigmoid, sft]", "method.loss_weights=[1, -1]"],
     ["method.loss_weights: -1.0", ">= 0 for each loss type"]),
    ("rm centering negative", "rm", ["method.center_rewards_coefficient=-0.5"],
     ["method.center_rewards_coefficient: -0.5", ">= 0, or null"]),
    # read only by the upload: without train.push_to_hub the run ended, exit 0, with nothing uploaded and no word
    ("hub_model_id without push_to_hub", "grpo", ["train.hub_model_id=me/grpo"],
     ["train.hub_model_id: 'me/grpo' is read only when the run uploads its model", "set train.push_to_hub=true"]),
    ("hub_private_repo without push_to_hub", "online-dpo", ["train.hub_private_repo=true"],
     ["train.hub_private_repo: True is read only when", "or remove train.hub_private_repo"]),
    # the offline commands too (one check, settings/train.py:check_train): exit 0, nothing uploaded, no word
    ("sft hub_model_id without push_to_hub", "sft", ["train.hub_model_id=me/sft"],
     ["train.hub_model_id: 'me/sft' is read only when the run uploads its model", "set train.push_to_hub=true"]),
    ("rm hub_private_repo without push_to_hub", "rm", ["train.hub_private_repo=true"],
     ["train.hub_private_repo: True is read only when", "or remove train.hub_private_repo"]),
    ("dpo hub_model_id without push_to_hub", "dpo", ["train.hub_model_id=me/dpo"],
     ["train.hub_model_id: 'me/dpo' is read only when", "or remove train.hub_model_id"]),
    ("kto hub_model_id without push_to_hub", "kto", ["train.hub_model_id=me/kto", "train.push_to_hub=false"],
     ["train.hub_model_id: 'me/kto' is read only when", "set train.push_to_hub=true"]),
    # TrainingArguments fields the offline run accepted and nobody read (exit 0, no word): the upload's schedule (one
    # upload of model/ after the last step) and the script flags transformers' Trainer leaves to scripts
    ("sft hub_revision without push_to_hub", "sft", ["train.hub_revision=dev"],
     ["train.hub_revision: 'dev' is read only when the run uploads its model", "set train.push_to_hub=true"]),
    ("dpo hub_strategy checkpoint", "dpo", ["train.push_to_hub=true", "train.hub_strategy=checkpoint"],
     ["train.hub_strategy: 'checkpoint' is not read", "only the final model/ folder", "remove train.hub_strategy"]),
    ("rm hub_strategy every_save", "rm", ["train.push_to_hub=true", "train.hub_strategy=every_save"],
     ["train.hub_strategy: 'every_save' is not read", "set it to end"]),
    ("kto hub_always_push", "kto", ["train.push_to_hub=true", "train.hub_always_push=true"],
     ["train.hub_always_push: true is not read", "remove train.hub_always_push"]),
    ("sft do_train false", "sft", ["train.do_train=false"],
     ["train.do_train: false is not read", "alignkit sft always trains", "alignkit eval"]),
    ("dpo do_predict true", "dpo", ["train.do_predict=true"],
     ["train.do_predict: true is not read", "alignkit generate", "remove train.do_predict"]),
    ("sft do_eval false with held-out data", "sft", ["train.do_eval=false"],
     ["train.do_eval: false is not read", "train.eval_strategy", "data.eval_fraction=0", "remove train.do_eval"]),
    ("dpo do_eval true without held-out data", "dpo", ["train.do_eval=true", "data.eval_fraction=0",
                                                      "train.eval_strategy=no"],
     ["train.do_eval: true is not read", "holds no records out", "set data.eval_path or data.eval_fraction"]),
    ("grpo hub_strategy", "grpo", ["train.hub_strategy=end"], ["train.hub_strategy: unknown key"]),
    ("online-dpo do_eval", "online-dpo", ["train.do_eval=false"], ["train.do_eval: unknown key"]),
    ("annotator batch_size zero", "grpo", ["annotator.kind=reward_model", "annotator.path=tiny:llama",
                                           "annotator.function=null", "annotator.batch_size=0"],
     ["annotator.batch_size", ">= 1"]),
    ("annotator weight nan", "grpo", ["annotator.function=[alignkit.rewards:digit_fraction,alignkit.rewards:length_target]",
                                      "annotator.weights=[1.0,.nan]"],
     ["annotator.weights[1]", "nan is not a finite number", "give each function a finite weight"]),
    ("annotator weight bool", "grpo", ["annotator.function=[alignkit.rewards:digit_fraction,alignkit.rewards:length_target]",
                                       "annotator.weights=[true,1.0]"],
     ["annotator.weights[0]", "expected float, got bool True"]),
    # several reward functions: weights all 0 made every reward 0 (every step flat) without a word; GDPO
    # (normalize_then_sum) with a key it would ignore, or on a command without it, is one line
    ("annotator weights all zero", "grpo", ["annotator.function=[alignkit.rewards:digit_fraction,"
                                            "alignkit.rewards:length_target]", "annotator.weights=[0,0]"],
     ["annotator.weights: [0.0, 0.0] are all 0, so every reward would be 0"]),
    ("normalize_then_sum with rloo", "rloo", ["method.multi_objective_aggregation=normalize_then_sum"],
     ["multi_objective_aggregation='normalize_then_sum' is GRPO's advantage (GDPO)", "use the grpo command"]),
    ("normalize_then_sum with reward_clip", "grpo", ["method.multi_objective_aggregation=normalize_then_sum",
                                                     "method.reward_clip=1"],
     ["reward_clip=1.0: normalize_then_sum reads each function's raw scores, so it would be ignored"]),
    ("normalize_then_sum with on_failure default", "grpo", ["method.multi_objective_aggregation=normalize_then_sum",
                                                            "annotator.on_failure=default", "annotator.default_score=0"],
     ["annotator.on_failure: 'default' fills one combined default_score", "use on_failure 'skip'"]),
    ("multi_objective_aggregation with ppo", "ppo", ["method.multi_objective_aggregation=normalize_then_sum"],
     ["method.multi_objective_aggregation", "of alignkit grpo"]),
    ("grpo ref_sync with a LoRA adapter", "grpo", ["method.ref_sync={alpha: 0.5, steps: 2}"],
     ["method.ref_sync", "adapter.kind=lora", "no separate reference to move", "adapter.kind=full"]),
    ("online-dpo ref_sync with a ReFT adapter", "online-dpo", ["method.ref_sync={alpha: 0.5, steps: 2}"],
     ["method.ref_sync", "adapter.kind=reft", "no separate reference to move"]),
    ("rloo ref_sync with the adapter switched off", "rloo", ["method.reference=adapter_off",
                                                             "method.ref_sync={alpha: 0.5, steps: 2}"],
     ["method.ref_sync", "adapter_off", "no separate reference to move"]),
    ("online-dpo ReFT modules_to_save under an adapter_off reference", "online-dpo",
     ["adapter.reft.modules_to_save=[lm_head]"],
     ["method.reference: 'auto' scores the policy with its adapter switched off", "the reference would move"]),
    ("rloo ref_sync alpha zero", "rloo", ["method.ref_sync.alpha=0"], ["method.ref_sync.alpha", "not in (0, 1]"]),
]


@pytest.mark.parametrize("case,command,overrides,needles", ONLINE_CASES, ids=[c[0] for c in ONLINE_CASES])
def test_online_config_mistakes(case, command, overrides, needles, tmp_path, capsys):
    config = str(CONFIGS / f"{command}-tiny.yaml")
    rc, err = run_cli(capsys, [command, "--config", config, f"output_dir={tmp_path / 'run'}", *overrides])
    assert_one_line(rc, err, *needles, f"{command}-tiny.yaml")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cls, key, value, allowed", [
    ("GRPOConfig", "dual_clip", 0.5, "> 1"),
    ("RLOOConfig", "clip_eps_high", 0.0, "> 0"),
    ("PPOConfig", "clip_eps", -0.2, "> 0"),
    ("PPOConfig", "lam", 1.5, "in [0, 1]"),
    ("OnlineDPOConfig", "kl_horizon", 0, ">= 1"),
    ("GRPOConfig", "stall_steps", -1, ">= 0 (0: never stop a run without reward signal, only warn)"),
])
def test_online_library_configs_check_the_cli_bounds_when_built(cls, key, value, allowed):
    """Direct library use: GRPOConfig(dual_clip=0.5) was built, and the run stopped at its first step with
    clipped_policy_loss's ValueError (a negative clip_eps, or lam 1.5, was never reported). The configs now check
    their fields against the same BOUNDS as the CLI's method section, when built."""
    import alignkit.online as online

    with pytest.raises(ValueError, match=rf"^{cls}\.{key}: {value!r} is out of range; it must be {re.escape(allowed)}"):
        getattr(online, cls)(**{key: value})
    getattr(online, cls)()  # the defaults are in bounds


def test_online_run_config_checks_its_bounds_once_and_a_changed_method_again(monkeypatch):
    """An online CLI config was checked against BOUNDS three times (its own __post_init__, load_config's check_bounds,
    and the trainer config built to validate it), and once more when the run built its trainer config. Now once per
    path: the run config checks its sections when built; trainer configs built from unchanged method values do not
    check them again. A method changed after loading is still refused when its trainer config is built."""
    import alignkit.online.config as online_config
    import alignkit.settings.bounds as bounds
    from alignkit.settings import load_config

    seen = []

    def spy(parent, section, where=None):
        seen.append((section, where))
        return check(parent, section, where)

    check = bounds.check_section
    monkeypatch.setattr(bounds, "check_section", spy)
    monkeypatch.setattr(online_config, "check_section", spy)
    cfg = load_config(CONFIGS / "grpo-tiny.yaml", command="grpo")
    cfg.trainer_config()  # what the run builds
    assert [s for s in seen if s[0] == "method"] == [("method", None)], seen
    cfg.method.dual_clip = 0.5
    with pytest.raises(ValueError, match=r"^GRPOConfig\.dual_clip: 0\.5 is out of range; it must be > 1"):
        cfg.trainer_config()


def test_bf16_on_a_cpu_machine(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", "train.bf16=true"])
    assert_one_line(rc, err, "train.bf16", "train.use_cpu=true")
    assert not (tmp_path / "run").exists()


# (command, config, overrides): commands whose config has a model section (model.kernels)
KERNEL_COMMANDS = [
    ("sft", "sft-tiny.yaml", []),
    ("dpo", "dpo-lora-tiny.yaml", []),
    ("grpo", "grpo-tiny.yaml", []),
    ("sample", "sample-tiny.yaml", []),
    ("generate", "generate-tiny.yaml", ["model.path=tiny:llama", "model.adapter_path=null"]),
]


@pytest.mark.parametrize("command,config,overrides", KERNEL_COMMANDS, ids=[c[0] for c in KERNEL_COMMANDS])
def test_kernels_this_machine_lacks_are_refused_by_the_dry_run_too(command, config, overrides, tmp_path, capsys):
    """model.kernels=liger without the package or a GPU: the run refused it (one line, before the model was built),
    and `--dry-run` printed the config and exit 0, an OK for a run that cannot start. Now the dry run says the run's
    line, and writes nothing."""
    from alignkit.models.efficiency import liger_missing

    if not liger_missing():
        pytest.skip("liger-kernel and a GPU are both here")
    rc, err = run_cli(capsys, [command, "--config", str(CONFIGS / config), f"output_dir={tmp_path / 'run'}",
                               *overrides, "model.kernels=liger", "--dry-run"])
    assert_one_line(rc, err, "model.kernels: liger needs ", "remove model.kernels")
    assert not (tmp_path / "run").exists()


def test_an_architecture_liger_does_not_cover_is_refused_before_the_model_loads(monkeypatch, tmp_path, capsys):
    """With liger and a GPU present, a model type Liger has no kernels for was refused only by `apply_kernels`, after
    the model was built (and never by --dry-run, which loads none). Now `check_model_kernels` reads the type from
    model.path (tiny:<arch>, or the folder's config.json) first: the dry run and the run give the same one line, and
    the run builds nothing. (Liger's presence stood in for: its package and a GPU, and the types it covers.)"""
    from alignkit.models import efficiency

    monkeypatch.setattr(efficiency, "liger_missing", lambda: [])
    monkeypatch.setattr(efficiency, "liger_model_types", lambda: frozenset({"llama", "qwen2"}))
    folder = save_tiny(tmp_path / "gpt2", "gpt2")
    for path in ("tiny:gpt2", str(folder)):
        for dry in (["--dry-run"], []):
            rc, err = run_cli(capsys, ["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                                       f"model.path={path}", "model.kernels=liger", *dry])
            assert_one_line(rc, err, "model.kernels: liger has no kernels for the gpt2 architecture (supported: "
                                     "llama, qwen2); remove model.kernels")
            assert not (tmp_path / "run").exists()
    efficiency.check_model_kernels(__import__("alignkit.settings", fromlist=["ModelSettings"]).ModelSettings(
        path="tiny:llama", kernels="liger"))  # a covered type passes


# (case, data file, extra overrides, what the line must contain)
DATA_CASES = [
    ("non-UTF-8", "latin1.jsonl", [], ["latin1.jsonl:2", "not UTF-8", "save the file as UTF-8"]),
    ("misspelled column", "misspelled_weight.jsonl", [], ["misspelled_weight.jsonl:1", "'weigth'",
                                                          "did you mean 'weight'"]),
    ("chosen == rejected everywhere", "same_pairs.jsonl", [], ["data.path", "chosen == rejected in every one of the 6"]),
    ("broken JSON line", "broken_json.jsonl", [], ["broken_json.jsonl:2", "broken JSON"]),
    ("eval_fraction leaves nothing", "one_row.jsonl", ["data.eval_fraction=0.5"],
     ["data.eval_fraction", "of 1 record(s) leaves no"]),
    ("missing data file", "no_such_file.jsonl", [], ["no_such_file.jsonl", "no such"]),
    # before: a count inside the tokenization summary (the run stopped only when every record was dropped)
    ("most records dropped by the length limits", "long_prompts.jsonl",
     ["data.max_length=64", "data.max_prompt_length=null"],
     ["data.path: the length limits (data.max_length=64, data.max_prompt_length=None) drop 4 of 6 record(s) (67%",
      "long_prompts.jsonl:2", "over data.max_dropped_fraction=0.5", "data.max_dropped_fraction=1"]),
    # before: an empty user turn trained without a word (a lost question: the model learns to answer nothing)
    ("empty user message", "empty_user.jsonl", [], ["empty_user.jsonl:3: prompt[2] is an empty 'user' message",
                                                    "give it its text"]),
    # before: trained, reported "loss 0.0000" and saved an untrained model with exit 0
    ("every weight zero", "zero_weights.jsonl", [], ["data.path", "every one of the 6 record(s) has weight 0",
                                                     "zero_weights.jsonl:1", "weight > 0"]),
]


@pytest.mark.parametrize("case,name,overrides,needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_mistakes(case, name, overrides, needles, tmp_path, capsys):
    rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", f"data.path={CORPUS / name}",
                               "data.eval_fraction=0.0", "train.eval_strategy=no", *overrides])
    assert_one_line(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_unknown_chat_role(tmp_path, capsys):
    rc, err = run_cli(capsys, ["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                               f"data.path={CORPUS / 'unknown_role.jsonl'}", "data.eval_fraction=0.0",
                               "train.eval_strategy=no"])
    assert_one_line(rc, err, "unknown_role.jsonl:1", "'usr'", "did you mean 'user'")


def test_some_identical_pairs_are_dropped_with_a_counted_warning(tmp_path, caplog):
    from alignkit.cli.data import load_data
    from alignkit.settings import DataSettings

    with caplog.at_level("WARNING"):
        train, _ = load_data(DataSettings(path=str(CORPUS / "some_same_pairs.jsonl")), "preference")
    assert len(train) == 4 and all(r.chosen != r.rejected for r in train)
    assert any("dropped 2 of 6 pair(s) whose chosen == rejected" in r.message for r in caplog.records)


def test_ranked_records_whose_replies_all_tie_are_dropped_or_refused(tmp_path, caplog):
    """A ranked record whose replies share one rank has no comparison: its K-wise loss is 0 and it only diluted the
    mean over prompts (rm method.ranked=true). Dropped with one counted warning; all of them: one line."""
    import json

    from alignkit.cli.data import load_data
    from alignkit.data.records import DataError
    from alignkit.settings import DataSettings

    rows = [{"prompt": f"Q{i}?", "responses": [" a", " b", " c"], "ranks": [0, 0, 0] if i < 2 else [0, 1, 1]}
            for i in range(5)]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        train, _ = load_data(DataSettings(path=str(path)), "ranked")
    assert len(train) == 3 and all(r.ranks == [0, 1, 1] for r in train)
    assert any("dropped 2 of 5 record(s) whose replies all share one rank" in r.message for r in caplog.records)
    path.write_text("".join(json.dumps(dict(r, ranks=[1, 1, 1])) + "\n" for r in rows))
    with pytest.raises(DataError, match="every one of the 5 ranked record.*share one rank"):
        load_data(DataSettings(path=str(path)), "ranked")


# ---------------------------------------------------------------------------------------------- models, adapters

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, a LoRA adapter trained on it (just saved), and a base of another width."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny(root / "base", "llama")
    other = save_tiny(root / "other", "llama", hidden_size=32)
    lora = root / "lora"
    torch.manual_seed(0)
    save_adapter(apply_adapter(load_model(base), AdapterConfig(kind="lora", lora=LoraSettings(r=2, alpha=4.0))), lora)
    return {"base": base, "other": other, "lora": lora}


def eval_args(tmp_path, base, adapter=None):
    out = ["eval", "--config", str(CONFIGS / "eval-dpo-tiny.yaml"), f"output_dir={tmp_path / 'ev'}",
           f"model.path={base}", "data.max_records=2"]
    # without an adapter, eval dpo needs the reference named (the model as its own reference is refused)
    if adapter:
        return out + [f"model.adapter_path={adapter}"]
    return out + ["model.adapter_path=null", f"method.reference_path={base}"]


def test_missing_model_path(tmp_path, capsys):
    rc, err = run_cli(capsys, eval_args(tmp_path, tmp_path / "nowhere"))
    assert_one_line(rc, err, "model.path", "nowhere", "does not exist")


def test_missing_lora_weights(models, tmp_path, capsys):
    broken = tmp_path / "lora"
    shutil.copytree(models["lora"], broken)
    (broken / "adapter_model.safetensors").unlink()
    rc, err = run_cli(capsys, eval_args(tmp_path, models["base"], broken))
    assert_one_line(rc, err, "model.adapter_path", "adapter_model.safetensors", "the LoRA weights")


def test_lora_onto_a_model_of_another_size(models, tmp_path, capsys):
    rc, err = run_cli(capsys, eval_args(tmp_path, models["other"], models["lora"]))
    line = assert_one_line(rc, err, "model.adapter_path", "different base model", "hidden_size 32 here, 64 when trained",
                           f"trained on {models['base']}")  # the sizes as the two configs below build them
    assert len(line) < 600  # a summary, not a state-dict dump


def test_truncated_safetensors_names_the_file(models, tmp_path, capsys):
    broken = tmp_path / "base"
    shutil.copytree(models["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, err = run_cli(capsys, eval_args(tmp_path, broken))
    assert_one_line(rc, err, "model.path", str(weights), "truncated or damaged")


def test_debug_shows_the_traceback(tmp_path, capsys):
    from alignkit.settings import ConfigError

    with pytest.raises(ConfigError, match="method.beta"):
        main(["--debug", "dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", "method.beta=-1"])


# (case, file name, its bytes (None: absent), what the line must contain) -- data a run stops at: `--dry-run` said
# nothing of data.path (it printed the config, exit 0), and the run then failed at the data. The dry run now checks
# each data path (exists, readable, a format alignkit reads, its first row fits a reader of the command's records;
# not a full read) and refuses these in the run's own words.
DRY_RUN_DATA_CASES = [
    ("missing file", "nope.jsonl", None, ["nope.jsonl: no such data file or folder"]),
    ("unknown file type", "pairs.csv", b"prompt,chosen,rejected\nQ,a,b\n", ["pairs.csv: unknown file type '.csv'"]),
    ("empty file", "empty.jsonl", b"", ["empty.jsonl: no rows; the source is empty"]),
    ("broken first line", "broken.jsonl", b'{"prompt": "Q", "chosen": \n', ["broken.jsonl:1", "broken JSON"]),
    ("not Parquet", "pairs.parquet", b"PAR1 this is not parquet", ["pairs.parquet: not a readable Parquet file"]),
    ("rows no reader takes", "odd.jsonl", b'{"question": "Q", "good": "a", "bad": "b"}\n', ["odd.jsonl:1"]),
    ("prompts only for dpo", "prompts.jsonl", b'{"prompt": "Q"}\n', ["prompts.jsonl", "nothing to train"]),
    # before: "prompt[0] must be a dict with string 'role' and 'content'" (datasets reads it as one row of lists)
    ("dict of columns", "cols.json", b'{"prompt": ["Q1", "Q2"], "chosen": ["a", "c"], "rejected": ["b", "d"]}',
     ["cols.json: holds a dict of columns {column: [values]} (prompt: 2, chosen: 2, rejected: 2)",
      "orient='records', lines=True"]),
]


@pytest.mark.parametrize("case,name,content,needles", DRY_RUN_DATA_CASES, ids=[c[0] for c in DRY_RUN_DATA_CASES])
@pytest.mark.parametrize("key", ["data.path", "data.eval_path"])
def test_dry_run_refuses_the_data_the_run_stops_at(case, name, content, needles, key, tmp_path, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    args = ["dpo", "--config", DPO, f"output_dir={tmp_path / 'run'}", "train.max_steps=1", f"{key}={path}"]
    if key == "data.eval_path":
        args.append("data.eval_fraction=0")  # (the config splits data.path; eval_path replaces that split)
    rc, err = run_cli(capsys, [*args, "--dry-run"])
    assert_one_line(rc, err, *needles)
    rc, err = run_cli(capsys, args)  # the run stops at the same data, saying the same
    assert_one_line(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_dry_run_refuses_an_unreadable_data_file(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "pairs.jsonl"
    shutil.copy(CORPUS / "good_pairs.jsonl", path)
    path.chmod(0)
    try:
        rc, err = run_cli(capsys, ["dpo", "--config", DPO, f"data.path={path}", "--dry-run"])
    finally:
        path.chmod(0o644)
    assert_one_line(rc, err, f"{path}: cannot be read (Permission denied)", "fix its permissions")


def test_dry_run_says_what_it_checked_of_each_data_path(tmp_path, capsys):
    """Each data path in the dry run's output (YAML comments: the output still loads as the config), with what it is
    and the reader of its first row; a Hugging Face dataset name is not looked up (no download)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from datasets import Dataset

    rows = [json.loads(line) for line in (CORPUS / "good_pairs.jsonl").read_text().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "repo").mkdir()
    shutil.copy(CORPUS / "good_pairs.jsonl", tmp_path / "repo" / "train.jsonl")
    cases = {str(CORPUS / "good_pairs.jsonl"): "a .jsonl file; its first row is read by reader",
             str(tmp_path / "pairs.parquet"): f"a .parquet file of {len(rows)} rows; its first row is read by reader",
             str(tmp_path / "pairs.json"): "a .json file; its first row is read by reader",
             str(tmp_path / "saved"): "a save_to_disk folder; its first row is read by reader",
             str(tmp_path / "repo"): "a dataset folder (1 data file(s), split(s) train), read by datasets.load_dataset",
             "someone/some-pairs": "a Hugging Face dataset name, not looked up by a dry run"}
    for path, said in cases.items():
        capsys.readouterr()
        assert main(["-q", "dpo", "--config", DPO, f"data.path={path}", f"data.eval_path={CORPUS / 'one_row.jsonl'}",
                     "data.eval_fraction=0", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert yaml.safe_load(out)["data"]["path"] == path  # the comments leave the config loadable
        assert f"#   data.path {path}: {said}" in out, out
        assert f"#   data.eval_path {CORPUS / 'one_row.jsonl'}: a .jsonl file; its first row is read by reader" in out
        assert "--dry-run checked the data" in out


@pytest.mark.parametrize("config", ["sft-tiny", "rm-tiny", "kto-tiny", "grpo-tiny", "online-dpo-tiny", "ppo-tiny",
                                    "sample-tiny", "generate-tiny", "eval-dpo-tiny"])
def test_every_command_that_reads_data_checks_it_at_a_dry_run(config, tmp_path, capsys):
    command = yaml_command(CONFIGS / f"{config}.yaml")
    rc, err = run_cli(capsys, [command, "--config", str(CONFIGS / f"{config}.yaml"),
                               f"data.path={tmp_path / 'nope.jsonl'}", "--dry-run"])
    assert_one_line(rc, err, "nope.jsonl: no such data file or folder")
    rc, err = run_cli(capsys, [command, "--config", str(CONFIGS / f"{config}.yaml"), *TRAINED_INPUTS.get(config, []),
                               f"output_dir={tmp_path / 'run'}", "--dry-run"])
    assert rc == 0 and not err.strip(), err


# the configs whose model an earlier step trains (runs/...), on a tiny model: --dry-run checks the model folders
TINY_MODEL = ["model.path=tiny:llama", "model.adapter_path=null"]
TRAINED_INPUTS = {"generate-tiny": TINY_MODEL, "eval-dpo-tiny": [*TINY_MODEL, "method.reference_path=tiny:llama"]}


def yaml_command(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["command"]


@pytest.mark.parametrize("kind", ["reft", "reft+lora"])
@pytest.mark.parametrize("reps,message", [
    ([{"layer": 0, "low_rank_dimension": 2}, {"layer": 9, "low_rank_dimension": 2}], "layer 9 is out of range"),
    ([{"layer": 0, "low_rank_dimension": 2, "embed_dim": 7}], "the intervention has embed_dim=7"),
])
def test_a_refused_reft_config_leaves_the_callers_model_as_it_was(kind, reps, message, tmp_path):
    """A ReFT config refused by ReftModel (a layer the model does not have, a wrong embed_dim) left the caller's
    model with every parameter frozen and ReftModel's forward pre-hook registered on it, and under reft+lora with
    peft's LoRA layers injected too (LoRA is wrapped first). Now both are undone before the error is raised: the
    same modules, state_dict, requires_grad, no hook, and the same outputs."""
    from alignkit.adapters import ReftSettings

    model = load_model(save_tiny(tmp_path / "tiny", "llama"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=message):
        apply_adapter(model, AdapterConfig(kind=kind, lora=LoraSettings(r=2) if "lora" in kind else LoraSettings(),
                                           reft=ReftSettings(config={"representations": reps})))
    assert [(n, type(m)) for n, m in model.named_modules()] == types and not hasattr(model, "peft_config")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
