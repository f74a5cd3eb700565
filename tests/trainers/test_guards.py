"""Non-finite guard of AlignTrainer (issue 12, finding 1): the first NaN loss / gradient stops the run at that
step, names the step and the batch's records, keeps earlier checkpoints, writes no NaN weights, logs NaN."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from alignkit.guards import NonFiniteError
from alignkit.runs import MetricsJsonl
from alignkit.trainers import PreferenceTrainer, SFTTrainer

from .conftest import fast_args


class NaNAtStep(SFTTrainer):
    """SFT whose loss turns NaN on optimizer step `bad_step` (1-based)."""

    bad_step = 3

    def objective(self, model, inputs):
        out = super().objective(model, inputs)
        if self.state.global_step + 1 == self.bad_step:
            out.losses = out.losses * float("nan")
        return out


def test_nan_loss_stops_at_its_step_keeps_last_good_checkpoint(make_model, features, collators, tmp_path):
    model = make_model("lora")
    args = fast_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    trainer = NaNAtStep(model, args, train_dataset=features["sft"], data_collator=collators["sft"],
                        callbacks=[MetricsJsonl(tmp_path / "metrics.jsonl")])
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    assert err.value.step == 3 and "optimizer step 3" in str(err.value)
    assert "train.learning_rate" in str(err.value) and "beta" not in str(err.value)  # SFT reads no beta
    assert len(err.value.record_ids) == 2 and all(i.startswith("s") for i in err.value.record_ids)  # the batch's ids
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert all(bool(p.isfinite().all()) for p in model.parameters())  # the NaN update was never applied
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert math.isnan(rows[-1]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[:-1])  # NaN logged as NaN


def test_saving_refuses_non_finite_weights(make_model, features, collators, tmp_path):
    model = make_model("lora")
    trainer = SFTTrainer(model, fast_args(tmp_path), train_dataset=features["sft"], data_collator=collators["sft"])
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="trainable weight"):
        trainer.save_model(str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()


class ZeroGradAt(SFTTrainer):
    """SFT whose gradient is exactly 0 (the loss stays positive) on the optimizer steps in `dead`."""

    dead: set = set()

    def objective(self, model, inputs):
        out = super().objective(model, inputs)
        if self.state.global_step + 1 in self.dead:
            out.losses = out.losses.detach() + 0.0 * out.losses  # same value, no gradient signal
        return out


def test_zero_gradient_with_positive_loss_stops_after_patience(make_model, features, collators, tmp_path, caplog):
    from alignkit.guards import ZERO_GRAD_PATIENCE, StalledTrainingError

    assert ZERO_GRAD_PATIENCE == 3
    model = make_model("lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = ZeroGradAt(model, fast_args(tmp_path, max_steps=6), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    trainer.dead = {1, 2, 3, 4, 5, 6}
    with caplog.at_level("WARNING"), pytest.raises(StalledTrainingError) as err:
        trainer.train()
    assert (err.value.first, err.value.last) == (1, 3) and err.value.loss > 0
    assert "optimizer steps 1-3" in str(err.value) and "train.learning_rate" in str(err.value)
    assert "beta" not in str(err.value)  # SFT has none: following the old advice was a ConfigError
    assert any("exactly 0 at optimizer step 1" in r.getMessage() for r in caplog.records)  # warned first
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert not (tmp_path / "out" / "model").exists()


def test_a_short_zero_gradient_spell_only_warns(make_model, features, collators, tmp_path, caplog):
    trainer = ZeroGradAt(make_model("lora"), fast_args(tmp_path, max_steps=5), train_dataset=features["sft"],
                         data_collator=collators["sft"])
    trainer.dead = {2, 3, 5}  # two in a row, then one: never three
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 5
    warned = [r.getMessage() for r in caplog.records if "exactly 0 at optimizer step" in r.getMessage()]
    assert len(warned) == 2 and "step 2" in warned[0] and "step 5" in warned[1]


@pytest.mark.parametrize("trainer, loss_type, scale", [
    ("SFTTrainer", None, None), ("RewardTrainer", None, None), ("KTOTrainer", "kto", "method.beta"),
    ("PreferenceTrainer", "sigmoid", "method.beta"), ("DPOTrainer", "ipo", "method.beta"),
    ("PreferenceTrainer", "orpo", None), ("PreferenceTrainer", "slic", None), ("PreferenceTrainer", "sft", None),
    ("PreferenceTrainer", ["orpo", "sft"], None), ("PreferenceTrainer", ["sigmoid", "sft"], "method.beta"),
])
def test_the_advice_names_beta_only_where_the_objective_reads_it(trainer, loss_type, scale):
    """The non-finite / stalled advice said "Lower train.learning_rate (or method.beta)" for every objective;
    for SFT, reward and the losses that refuse method.beta (PreferenceObjective.BETA_UNREAD) following it was a
    ConfigError. Now each trainer names the setting that scales its loss, or none."""
    import alignkit.trainers as trainers
    from alignkit.guards import StalledTrainingError, likely_causes

    cls = getattr(trainers, trainer)
    got = cls.loss_scale(**({} if loss_type is None else {"loss_type": loss_type}))
    assert got == scale
    stalled = str(StalledTrainingError(1, 3, 0.5, got))
    causes = str(NonFiniteError("the training loss", float("nan"), 1, causes=likely_causes(got)))
    if scale is None:
        assert "Lower train.learning_rate and rerun" in stalled and "beta" not in stalled + causes
    else:
        assert "Lower train.learning_rate (or method.beta) and rerun" in stalled
        assert "a loss scale too large (method.beta)" in causes


@pytest.mark.parametrize("override, says", [
    ({"label_smoothing_factor": 0.1}, "train.label_smoothing_factor=0.1: the Trainer applies it in its own loss"),
    ({"train_sampling_strategy": "batch_rebalance"}, "reads an input_ids column, which preference"),
    ({"fsdp": "full_shard"}, "train.fsdp: FSDP shards the model over several processes and this run has "
                             "one; remove train.fsdp, or launch several processes"),
    ({"length_column_name": "n_tokens"}, "train.length_column_name='n_tokens': alignkit's length grouping"),
    ({"length_column_name": "n_tokens", "train_sampling_strategy": "group_by_length"},
     "train.length_column_name='n_tokens': alignkit's length grouping"),
])
def test_training_arguments_that_would_be_ignored_are_refused(override, says):
    """Accepted by TrainingArguments, silently not applied by alignkit's objectives (label smoothing: the loss is
    ours; batch_rebalance: no input_ids in preference features): refused by name when the trainer is built."""
    from transformers import TrainingArguments

    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import refuse_ignored_arguments

    pairs = [{"chosen_input_ids": [1, 2], "rejected_input_ids": [1, 3]}]
    with pytest.raises(ConfigError, match=says):
        refuse_ignored_arguments(TrainingArguments("unused", report_to="none", **override), pairs)
    refuse_ignored_arguments(TrainingArguments("unused", report_to="none"), pairs)  # the defaults pass
    # the Trainer's batch_rebalance sampler reads the column (of a datasets.Dataset): kept
    refuse_ignored_arguments(TrainingArguments("unused", report_to="none", length_column_name="n_tokens",
                                               train_sampling_strategy="batch_rebalance"), [{"input_ids": [1, 2]}])


def test_beta_beside_params_with_another_beta_is_refused(make_model, features, collators, tmp_path):
    """PreferenceTrainer(beta=0.5, params=PreferenceParams(label_smoothing=0.1)) trained with params' beta 0.1, and
    OnlineDPOConfig likewise: the beta shortcut was dropped without a word. Now a ValueError naming both; beta beside
    params with the same beta (what the CLI passes), or left at its default, still builds; params.beta must be > 0
    (<= 0 trains toward the rejected answers), as the CLI's bounds say."""
    from alignkit.losses import PreferenceParams
    from alignkit.online import OnlineDPOConfig
    from alignkit.trainers import PreferenceTrainer

    smooth = PreferenceParams(label_smoothing=0.1)
    says = r"beta=0.5 and params.beta=0.1 disagree; params holds every preference hyper-parameter, so beta would be "
    with pytest.raises(ValueError, match="PreferenceTrainer: " + says):
        PreferenceTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["preference"],
                          data_collator=collators["preference"], beta=0.5, params=smooth)
    with pytest.raises(ValueError, match="OnlineDPOConfig: " + says):
        OnlineDPOConfig(beta=0.5, params=smooth)
    trainer = PreferenceTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["preference"],
                                data_collator=collators["preference"], beta=0.5,
                                params=PreferenceParams(beta=0.5, label_smoothing=0.1))
    assert (trainer.params.beta, trainer.params.label_smoothing) == (0.5, 0.1)
    assert OnlineDPOConfig(params=smooth).params is smooth and OnlineDPOConfig(beta=0.5).beta == 0.5
    with pytest.raises(ValueError, match="beta must be > 0, got -0.1"):
        PreferenceParams(beta=-0.1)


@pytest.mark.parametrize("loss_type, params, says", [
    ("hinge", dict(label_smoothing=0.2), r"params.label_smoothing: only loss_type sigmoid / robust / .* reads it, and "
                                         r"loss_type is \['hinge'\], so it would be ignored"),
    ("sigmoid", dict(orpo_lambda=0.5), r"params.orpo_lambda: only loss_type orpo reads it, and loss_type is "
                                       r"\['sigmoid'\]"),
    ("ipo", dict(discopop_tau=0.1), r"params.discopop_tau: only loss_type discopop reads it"),
    ("orpo", dict(beta=0.5), r"params.beta: loss_type orpo does not read it .* set params.orpo_lambda=0.5 instead")])
def test_a_loss_parameter_no_loss_of_the_trainer_reads_is_refused(loss_type, params, says, make_model, features,
                                                                   collators, tmp_path):
    """The config refused method.label_smoothing beside loss_type hinge (and the like); the trainers in Python did not:
    PreferenceTrainer(loss_type="hinge", params=PreferenceParams(label_smoothing=0.2)) trained plain hinge, and
    OnlineDPOConfig likewise. Now the same one line, naming the trainer; the loss that reads it still builds."""
    from alignkit.losses import PreferenceParams
    from alignkit.online import OnlineDPOConfig
    from alignkit.settings import ConfigError

    build = lambda lt, p: PreferenceTrainer(make_model("lora"), fast_args(tmp_path), loss_type=lt,  # noqa: E731
                                            train_dataset=features["preference"],
                                            data_collator=collators["preference"], params=PreferenceParams(**p))
    with pytest.raises(ConfigError, match=rf"^PreferenceTrainer: {says}"):
        build(loss_type, params)
    with pytest.raises(ConfigError, match=rf"^OnlineDPOConfig: {says}"):
        OnlineDPOConfig(loss_type=loss_type, params=PreferenceParams(**params))
    assert not (tmp_path / "out").exists()
    reader = {"label_smoothing": "sigmoid", "orpo_lambda": "orpo", "discopop_tau": "discopop", "beta": "sigmoid"}
    build([loss_type, reader[next(iter(params))]], params)


def test_group_by_length_sampling_works_for_preference_evaluation(tiny_lm, tokenizer, tmp_path):
    """transformers length-groups evaluation batches under train_sampling_strategy='group_by_length' from an
    input_ids column preference features lack (it raised at the first evaluation); alignkit's lengths are used."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from alignkit.trainers import DPOTrainer

    pairs = Dataset.from_list([{"prompt": f"Q{i}" * (i + 1), "chosen": " yes", "rejected": " no"} for i in range(6)])
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                             report_to="none", train_sampling_strategy="group_by_length", use_cpu=True)
    trainer = DPOTrainer(tiny_lm("llama"), args, train_dataset=pairs, eval_dataset=pairs, processing_class=tokenizer)
    assert math.isfinite(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize("name", ["compute_metrics", "preprocess_logits_for_metrics"])
def test_metric_functions_are_refused_not_silently_skipped(name, make_model, features, collators, tmp_path):
    """The Trainer calls compute_metrics only with an evaluation's logits and labels, which alignkit's prediction_step
    does not return: evaluate() gave eval_loss and never called it. Refused when the trainer is built."""
    from alignkit.settings import ConfigError

    with pytest.raises(ConfigError, match=f"SFTTrainer: {name} would never be called: alignkit's evaluation"):
        SFTTrainer(make_model("lora"), fast_args(tmp_path), train_dataset=features["sft"], eval_dataset=features["sft"],
                   data_collator=collators["sft"], **{name: lambda *a: {"x": 1.0}})


def test_fields_of_a_trl_style_config_are_refused_not_silently_skipped(make_model, features, collators, tmp_path,
                                                                      caplog):
    """TRL's SFTConfig / DPOConfig are TrainingArguments subclasses carrying max_length, packing, beta, ...; passed as
    args, their fields were read nowhere: SFTConfig(max_length=16) trained at the trainer's max_length=1024, exit 0.
    A field set away from its default is refused when the trainer takes a keyword of that name or TRL has the setting;
    the defaults pass; a script's own field is warned about."""
    import dataclasses
    import logging

    from transformers import TrainingArguments

    from alignkit.settings import ConfigError

    @dataclasses.dataclass
    class SFTConfig(TrainingArguments):  # TRL's fields of that name (TRL 1.x defaults), plus a script's own
        max_length: int | None = 1024
        packing: bool = False
        my_flag: bool = False
        loss_type: str | list[str] = "nll"  # TRL's DPOConfig made a str loss_type a list in __post_init__

        def __post_init__(self):
            super().__post_init__()
            self.loss_type = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type

    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    build = lambda args: SFTTrainer(make_model("lora"), args, train_dataset=features["sft"],  # noqa: E731
                                    data_collator=collators["sft"])
    with pytest.raises(ConfigError, match=re.escape("SFTTrainer: args.max_length=16 is a field of SFTConfig, which "
                                                    "alignkit never reads") + r".*SFTTrainer\(\.\.\., max_length=16\)$"):
        build(SFTConfig(**base, max_length=16))
    with pytest.raises(ConfigError, match=r"args.packing=True .* alignkit's equivalent .*: train.padding_free"):
        build(SFTConfig(**base, packing=True))
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="alignkit.trainers.checks"):
        build(SFTConfig(**base))  # TRL's defaults (loss_type as __post_init__ leaves it): nothing to ignore
        assert not [r for r in caplog.records if "not read by alignkit" in r.message]
        build(SFTConfig(**base, my_flag=True))
    assert [r.message for r in caplog.records if "not read by alignkit" in r.message] == [
        "SFTTrainer: my_flag of SFTConfig is not read by alignkit (only transformers.TrainingArguments' fields are)"]


@pytest.mark.parametrize("field, value, trainer, says", [
    ("label_smoothing", 0.2, "preference", r"params=PreferenceParams\(label_smoothing=0.2, \.\.\.\)"),
    ("discopop_tau", 0.1, "preference", r"params=PreferenceParams\(discopop_tau=0.1, \.\.\.\)"),
    ("pad_to_multiple_of", 8, "preference", r"alignkit's equivalent .*: no key: batches are padded to their longest"),
    ("precompute_ref_batch_size", 4, "preference", r"alignkit's equivalent .*: train.per_device_eval_batch_size"),
    ("activation_offloading", True, "sft", r"alignkit's equivalent .*: alignkit has no equivalent .*; remove it$"),
    ("router_aux_loss_coef", 0.01, "sft", r"alignkit's equivalent .*: alignkit has no equivalent .*; remove it$"),
    ("shuffle_dataset", True, "sft", r"alignkit's equivalent .*: no key: the Trainer draws the training records"),
    ("eval_packing", True, "sft", r"alignkit's equivalent .*: train.padding_free"),
    ("pad_token", "<pad>", "sft", r"alignkit's equivalent .*: model.tokenizer")])
def test_every_trl_config_field_alignkit_does_not_read_is_refused(field, value, trainer, says, make_model, features,
                                                                 collators, tmp_path):
    """TRL 1.16's DPOConfig / SFTConfig fields that are neither a keyword of alignkit's trainer nor in TRL_NAMES were
    only warned about and dropped: DPOConfig(label_smoothing=0.2) as args trained plain DPO (eps 0), exit 0. Now
    refused like the others, naming where the setting goes (params=PreferenceParams(...) for a loss parameter)."""
    import dataclasses

    from transformers import TrainingArguments

    from alignkit.settings import ConfigError

    @dataclasses.dataclass
    class TRLConfig(TrainingArguments):  # the field with TRL 1.16's default
        label_smoothing: float = 0.0
        discopop_tau: float = 0.05
        pad_to_multiple_of: int | str | None = "auto"
        precompute_ref_batch_size: int | None = None
        activation_offloading: bool = False
        router_aux_loss_coef: float | None = None
        shuffle_dataset: bool = False
        eval_packing: bool | None = None
        pad_token: str | None = None

    args = TRLConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     **{field: value})
    cls = PreferenceTrainer if trainer == "preference" else SFTTrainer
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: args.{field}={value!r} is a field of TRLConfig, which "
                                          rf"alignkit never reads.*{says}"):
        cls(make_model("lora"), args, train_dataset=features[trainer], data_collator=collators[trainer])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["train", "eval"])
def test_examples_all_weighted_zero_are_refused(which, make_model, features, collators, tmp_path):
    """A trainer given data whose weights are all 0 (TRL-style rows with a weight column of 0s, or features) trained
    with loss 0.0 and learned nothing, exit 0 (the CLI refused such records, the trainers did not); an evaluation set
    of them gave eval_loss 0. Now a DataError when the trainer is built; some zero weights still pass."""
    from alignkit.files import DataError

    zero = [{**f, "weight": 0.0} for f in features["sft"]]
    some = [{**f, "weight": float(i % 2)} for i, f in enumerate(features["sft"])]
    data = {"train_dataset": zero if which == "train" else some, "eval_dataset": zero if which == "eval" else some}
    what = "training" if which == "train" else "evaluation"
    with pytest.raises(DataError, match=rf"^SFTTrainer: every one of the {len(zero)} {what} example\(s\) has weight 0"):
        SFTTrainer(make_model("lora"), fast_args(tmp_path), data_collator=collators["sft"], **data)
    SFTTrainer(make_model("lora"), fast_args(tmp_path), data_collator=collators["sft"], train_dataset=some,
               eval_dataset=some)


@pytest.mark.parametrize("weight, as_dataset", [(w, False) for w in (-1.0, float("nan"), float("inf"), 1e39, "2", True,
                                                                    None)] + [(-1.0, True), (float("nan"), True)])
@pytest.mark.parametrize("which", ["train", "eval"])
def test_a_tokenized_example_with_a_bad_weight_is_refused_naming_it(which, weight, as_dataset, make_model, features,
                                                                     collators, tmp_path):
    """Tokenized examples given to a trainer directly skipped the readers' weight check: -1 trained the example the
    other way (loss 0.52 where the weights 1 gave 0.69, exit 0), "2" and True were read by the collator's float(), NaN /
    inf / 1e39 (inf in float32) stopped the first step as a non-finite loss blaming the learning rate, None stopped it
    on a TypeError. Now one DataError when the trainer is built, naming the set, the example and its id."""
    from datasets import Dataset

    from alignkit.files import DataError

    feats = [dict(f) for f in features["preference"]]
    feats[5]["weight"] = weight
    if as_dataset:  # a datasets column holds one type: floats
        feats = Dataset.from_list([{**f, "weight": float(f.get("weight", 1.0))} for f in feats])
    good = [dict(f) for f in features["preference"]]
    data = {"train_dataset": feats if which == "train" else good, "eval_dataset": feats if which == "eval" else good}
    what = "training" if which == "train" else "evaluation"
    with pytest.raises(DataError, match=rf"^PreferenceTrainer: {what} example 5 \(id 'p5'\) has 'weight' "
                                        rf"{re.escape(repr(feats[5]['weight']))}, and a weight must be a finite number "
                                        r">= 0 \(at most 3.4e\+38"):
        PreferenceTrainer(make_model("lora"), fast_args(tmp_path), data_collator=collators["preference"], **data)
    assert not (tmp_path / "out").exists()


def test_average_tokens_across_devices_off_is_refused_under_several_processes(monkeypatch):
    """alignkit divides every micro-batch by the count summed over all processes whatever the argument says, so
    average_tokens_across_devices=False changed nothing under several processes: refused there; one process (where
    it means nothing for the Trainer either) and the default pass."""
    from transformers import TrainingArguments

    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import refuse_ignored_arguments

    refuse_ignored_arguments(TrainingArguments("unused", report_to="none", average_tokens_across_devices=False))
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    refuse_ignored_arguments(TrainingArguments("unused", report_to="none"))
    with pytest.raises(ConfigError, match="train.average_tokens_across_devices=false: alignkit's objectives always"):
        refuse_ignored_arguments(TrainingArguments("unused", report_to="none", average_tokens_across_devices=False))


@pytest.mark.parametrize("optim, optim_args, says", [
    ("adamw_bnb_8bit", None, "train.optim='adamw_bnb_8bit': the Trainer cannot build it: You need to install "
                             "`bitsandbytes`"),
    ("adamw_torch", "foo", "train.optim_args='foo': 'foo' is not key=value"),
    ("adamw_torch", "weight_decay=0.1", "train.optim_args: weight_decay is not read by optim='adamw_torch'"),
    ("sgd", "momentum=0.9,foo=1", "train.optim_args: foo is not read by optim='sgd'"),
    ("adamw_torch", None, None), ("sgd", "momentum=0.9,nesterov=false", None), ("rmsprop", "alpha=0.9", None),
    ("adafactor", None, None),
])
def test_optimizers_the_trainer_would_not_build_or_apply_are_refused(optim, optim_args, says, make_model, features,
                                                                    collators, tmp_path):
    """The Trainer builds its optimizer in train(): a missing package (bitsandbytes) failed there, after the CLI wrote
    the run folder, and optim_args keys an optimizer does not read (adamw_torch reads none; sgd its own names) were
    dropped without a word. Refused when the trainer is built (not when it is given its own optimizer); what the
    optimizer reads passes."""
    import importlib.util

    from alignkit.settings import ConfigError

    if optim == "adamw_bnb_8bit" and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    args = fast_args(tmp_path, optim=optim, optim_args=optim_args)
    if says is None:
        from alignkit.trainers.checks import check_optimizer

        check_optimizer(args, {})
        return
    model = make_model("lora")
    with pytest.raises(ConfigError, match=re.escape(says)):
        SFTTrainer(model, args, train_dataset=features["sft"], data_collator=collators["sft"])
    own = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    SFTTrainer(model, args, train_dataset=features["sft"], data_collator=collators["sft"], optimizers=(own, None))


@pytest.mark.parametrize("warmup, max_steps, last", [(2, 2, "50%"), (10, 5, "40%"), (10, 10, "90%")])
def test_a_warmup_as_long_as_the_run_names_the_rate_of_its_last_step(warmup, max_steps, last, tmp_path):
    """transformers' linear warm-up gives step s the rate s / warmup (steps 0 .. max_steps - 1): by hand, the last
    step of 2 with a warm-up of 2 trains at 1/2, of 5 with 10 at 4/10, of 10 with 10 at 9/10 (the message said
    max_steps / warmup: 100 %, 50 %, 100 %)."""
    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import check_warmup

    args = fast_args(tmp_path, max_steps=max_steps, warmup_steps=warmup, lr_scheduler_type="linear")
    with pytest.raises(ConfigError, match=f"its last step uses {last} of it"):
        check_warmup(args, "linear")


@pytest.mark.parametrize("rows, batch, accumulate, drop_last, epochs, steps", [
    (4, 2, 1, False, 1, 2), (5, 2, 1, False, 1, 3), (5, 2, 1, True, 1, 2), (5, 2, 2, False, 1, 2),
    (5, 2, 2, False, 1.5, 3), (1, 4, 8, False, 2, 2)])
def test_an_epoch_based_run_knows_its_optimizer_steps(rows, batch, accumulate, drop_last, epochs, steps, tmp_path):
    """By hand: batches = ceil(rows / batch) (rows // batch with drop_last), an epoch ceil(batches / accumulate) steps
    (at least 1), the run ceil(epochs x that); a fractional warm-up of one step more than (steps - 1) / steps of it
    is refused, one below accepted."""
    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import check_warmup, planned_steps

    kw = dict(max_steps=-1, num_train_epochs=epochs, per_device_train_batch_size=batch, dataloader_drop_last=drop_last,
              gradient_accumulation_steps=accumulate, lr_scheduler_type="linear")
    data = list(range(rows))
    assert planned_steps(fast_args(tmp_path, **kw), data) == steps
    check_warmup(fast_args(tmp_path, warmup_steps=(steps - 1) / steps, **kw), "linear", data)
    with pytest.raises(ConfigError, match=f"optimizer steps from train.num_train_epochs={epochs:g}"):
        check_warmup(fast_args(tmp_path, warmup_steps=(steps - 0.5) / steps, **kw), "linear", data)


@pytest.mark.parametrize("rows, batch, accumulate, drop_last, steps", [
    (10, 2, 2, False, 2), (10, 2, 1, True, 2), (9, 2, 1, False, 3), (12, 2, 2, False, 2)])
def test_an_epoch_based_run_on_two_processes_counts_its_share_of_the_batches(rows, batch, accumulate, drop_last, steps,
                                                                             tmp_path, monkeypatch):
    """2 processes, by hand (accelerate's BatchSamplerShard, even_batches): batches = ceil(rows / batch) (floor with
    drop_last), each process ceil(batches / 2) of them (floor with drop_last), an epoch ceil(that / accumulate)
    optimizer steps: the count the Trainer's schedule (and its warm-up fraction) reads from the prepared dataloader.
    Before, planned_steps gave None for several processes, so a warm-up as long as the run (warmup_steps=steps)
    was not refused there. A sharding accelerate decides otherwise (even_batches=False) still gives None."""
    from transformers import TrainingArguments

    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import check_warmup, planned_steps

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    kw = dict(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=batch, dataloader_drop_last=drop_last,
              gradient_accumulation_steps=accumulate, lr_scheduler_type="linear")
    data = list(range(rows))
    assert planned_steps(fast_args(tmp_path, **kw), data) == steps
    check_warmup(fast_args(tmp_path, warmup_steps=steps - 1, **kw), "linear", data)
    with pytest.raises(ConfigError, match=rf"as long as the whole run \({steps} optimizer steps"):
        check_warmup(fast_args(tmp_path, warmup_steps=steps, **kw), "linear", data)
    uneven = fast_args(tmp_path, accelerator_config={"even_batches": False}, **kw)
    assert planned_steps(uneven, data) is None


@pytest.mark.parametrize("schedule, kwargs, says", [
    ("constant", {"min_lr": 1e-6}, "train.lr_scheduler_kwargs={'min_lr': 1e-06}: lr_scheduler_type='constant' takes "
                                   "no arguments"),
    ("linear", {"min_lr": 1e-6}, "train.lr_scheduler_type='linear' with train.lr_scheduler_kwargs={'min_lr': 1e-06}: "
                                 "transformers cannot build the schedule: get_linear_schedule_with_warmup() got an "
                                 "unexpected keyword argument 'min_lr'"),
    ("cosine_with_min_lr", None, "train.lr_scheduler_type='cosine_with_min_lr' with train.lr_scheduler_kwargs={}: "
                                 "transformers cannot build the schedule: One of min_lr or min_lr_rate"),
    ("cosine_with_min_lr", {"min_lr": 1e-6}, None), ("cosine", {"num_cycles": 0.3}, None), ("constant", None, None),
    ("warmup_stable_decay", {"num_decay_steps": 1}, None),
    # a warm-up the schedule is built without (the run started at the full rate), or as long as the run (max_steps 2
    # in fast_args): the rate never reached learning_rate
    ("constant", {"warmup_steps": 1}, "train.warmup_steps=1: lr_scheduler_type='constant' has no warm-up"),
    ("constant", {"warmup_steps": 0.5}, "train.warmup_steps=0.5: lr_scheduler_type='constant' has no warm-up"),
    ("linear", {"warmup_steps": 2}, "train.warmup_steps=2: as long as the whole run (train.max_steps=2)"),
    ("linear", {"warmup_steps": 0.5}, None), ("constant_with_warmup", {"warmup_steps": 0.5}, None),
    # a fraction the Trainer turns into ceil(2 x 0.6) = 2 warm-up steps of 2 (accepted before)
    ("linear", {"warmup_steps": 0.6}, "train.warmup_steps=0.6 (2 steps, the Trainer's ceil(2 x 0.6)): as long as the "
                                      "whole run (train.max_steps=2)"),
])
def test_schedules_the_trainer_would_not_build_or_apply_are_refused(schedule, kwargs, says, make_model, features,
                                                                   collators, tmp_path):
    """The Trainer builds its schedule in train(): kwargs it does not take, or none where it needs some, stopped the
    run there (the CLI: 'unexpected error', after writing the run folder); kwargs given to constant were dropped
    without a word. Refused when the trainer is built (not when it is given its own scheduler)."""
    from alignkit.settings import ConfigError

    kwargs = dict(kwargs or {})
    warmup = {"warmup_steps": kwargs.pop("warmup_steps")} if "warmup_steps" in kwargs else {}
    args = fast_args(tmp_path, lr_scheduler_type=schedule, lr_scheduler_kwargs=kwargs or None, **warmup)
    model = make_model("lora")
    if says is None:
        SFTTrainer(model, args, train_dataset=features["sft"], data_collator=collators["sft"])
        return
    with pytest.raises(ConfigError, match=re.escape(says)):
        SFTTrainer(model, args, train_dataset=features["sft"], data_collator=collators["sft"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    own = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    SFTTrainer(model, args, train_dataset=features["sft"], data_collator=collators["sft"], optimizers=own)


def test_check_warmup_asks_transformers_for_the_warmup_steps_once(tmp_path, monkeypatch):
    """check_warmup asked `TrainingArguments.get_warmup_steps` twice for the same run (once to compare, once for the
    message): one call, its answer used for both. A warm-up of 4 of a 4-step run is refused either way."""
    from alignkit.settings import ConfigError
    from alignkit.trainers.checks import check_warmup

    args = fast_args(tmp_path, max_steps=4, warmup_steps=4, lr_scheduler_type="linear")
    calls = []
    real = type(args).get_warmup_steps
    monkeypatch.setattr(type(args), "get_warmup_steps", lambda self, n: calls.append(n) or real(self, n))
    with pytest.raises(ConfigError, match="its last step uses 75% of it"):
        check_warmup(args, "linear")
    assert calls == [4]
