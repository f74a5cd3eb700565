"""Every trainer x every adapter kind, a few steps each: finite losses, every trainable parameter moves,
frozen parameters and the reference do not, metrics are logged, only trainable state is saved."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import PREFERENCE_LOSSES, SFT_LOSSES, UNPAIRED_LOSSES
from alignkit.settings import ConfigError
from alignkit.trainers import AlignTrainer, KTOTrainer, PreferenceTrainer, RewardTrainer, SFTTrainer, lower_is_better

from .conftest import ADAPTER_KINDS, fast_args, snapshot

# trainer name -> (class, data kind, classifier?, extra kwargs, a metric it must log)
TRAINERS = {
    "sft": (SFTTrainer, "sft", False, {}, "nll/token"),
    "dpo": (PreferenceTrainer, "preference", False, {"loss_type": "sigmoid"}, "rewards/margins"),
    "simpo+sft": (PreferenceTrainer, "preference", False, {"loss_type": ["simpo", "sft"], "loss_weights": [1.0, 0.5]},
                  "loss/simpo"),
    "kto": (KTOTrainer, "unpaired", False, {}, "kl"),
    "reward": (RewardTrainer, "preference", True, {}, "accuracy"),
    "reward_ranked": (RewardTrainer, "ranked", True, {}, "kendall_tau"),
}


# every registered loss of the offline objectives besides the rows above:
# name -> (class, data kind, classifier?, kwargs)
LOSS_ROWS = {**{f"sft:{n}": (SFTTrainer, "sft", False, {"loss_type": n}) for n in SFT_LOSSES},
             **{f"dpo:{n}": (PreferenceTrainer, "preference", False, {"loss_type": n}) for n in PREFERENCE_LOSSES},
             **{f"kto:{n}": (KTOTrainer, "unpaired", False, {"loss_type": n}) for n in UNPAIRED_LOSSES}}


@pytest.mark.parametrize("name", [*TRAINERS, *LOSS_ROWS])
def test_evaluation_logs_exactly_the_declared_metrics(name, make_model, features, collators, tokenizer, tmp_path):
    """`eval_metrics` (what train.metric_for_best_model may name, checked when a config is loaded) is declared on
    the loss registries and the trainers; a real evaluation of each objective and each registered loss logs exactly
    those names as eval_<name> (eval_model_preparation_time only comes with an evaluation before any training)."""
    cls, data, classifier, extra = TRAINERS[name][:4] if name in TRAINERS else LOSS_ROWS[name]
    trainer = cls(make_model("lora", classifier=classifier), fast_args(tmp_path), train_dataset=features[data],
                  eval_dataset=features[data], data_collator=collators[data], processing_class=tokenizer, **extra)
    logged = {k.removeprefix("eval_") for k in trainer.evaluate() if k.startswith("eval_")}
    assert logged - {"model_preparation_time"} == set(cls.eval_metrics(**extra, ranked=data == "ranked"))


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_best_model_metric_the_objective_never_logs_is_refused_when_built(name, make_model, features, collators,
                                                                            tokenizer, tmp_path):
    """TrainingArguments(metric_for_best_model=...) naming a metric the objective never logs: the trainer was built
    and transformers stopped the run at its first evaluation with a KeyError. Now refused when built, with the CLI's
    message; every declared name, in either spelling, is accepted (several evaluation sets: eval_<set>_loss too)."""
    cls, data, classifier, extra = TRAINERS[name][:4]

    def build(metric, eval_dataset=None):
        args = fast_args(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                         load_best_model_at_end=True, metric_for_best_model=metric,
                         greater_is_better=not lower_is_better(metric.removeprefix("eval_")))
        return cls(make_model("lora", classifier=classifier), args, train_dataset=features[data],
                   eval_dataset=eval_dataset or features[data], data_collator=collators[data], **extra)

    with pytest.raises(ConfigError, match=rf"^metric_for_best_model: 'eval_los' is not logged by {cls.__name__}'s "
                                          r"evaluation \(did you mean 'eval_loss'\?\)"):
        build("eval_los")
    for metric in cls.eval_metrics(**extra, ranked=data == "ranked")[::3]:  # a third of them: building is the cost
        build(metric), build(f"eval_{metric}")
    build("eval_held_loss", {"held": features[data], "more": features[data]})
    first = cls.eval_metrics(**extra, ranked=data == "ranked")[0]
    build(f"eval_held_{first}", {"held": features[data], "more": features[data]})  # the objective's, per set too


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_several_evaluation_sets_log_the_objective_metrics_per_set(name, make_model, features, collators, tokenizer,
                                                                   tmp_path):
    """An eval_dataset dict: transformers logs eval_<set>_loss; alignkit's own figures were all logged as
    eval_<name> for every set (two sets' figures under one name). Now eval_<set>_<name>, as transformers does."""
    cls, data, classifier, extra = TRAINERS[name][:4]
    trainer = cls(make_model("lora", classifier=classifier), fast_args(tmp_path), train_dataset=features[data],
                  eval_dataset={"a": features[data], "b": features[data]}, data_collator=collators[data],
                  processing_class=tokenizer, **extra)
    logged = set(trainer.evaluate())
    declared = cls.eval_metrics(**extra, ranked=False)
    for m in declared:
        assert {f"eval_a_{m}", f"eval_b_{m}"} <= logged and f"eval_{m}" not in logged, (m, sorted(logged))


# the rows' metrics that are better when lower (by their meaning: a negative log-likelihood, one loss of a sum)
LOWER_METRICS = {"sft": "nll/token", "simpo+sft": "loss/simpo"}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_lower_is_better_best_model_metric_taken_as_higher_is_better_is_refused_when_built(
        name, make_model, features, collators, tmp_path):
    """TrainingArguments fills greater_is_better=True for a metric_for_best_model not ending in 'loss': with
    eval_runtime, or nll/token / loss/<name>, the Trainer kept and loaded the checkpoint where it was highest, the
    worst one, without a word (the CLI refused it at load; Python callers were not refused). Now refused when built,
    with the CLI's line, whoever set it; greater_is_better=False builds, and so does eval_loss by default."""
    cls, data, classifier, extra = TRAINERS[name][:4]

    def build(metric, **kw):
        args = fast_args(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                         load_best_model_at_end=True, metric_for_best_model=metric, **kw)
        return cls(make_model("lora", classifier=classifier), args, train_dataset=features[data],
                   eval_dataset=features[data], data_collator=collators[data], **extra)

    for metric in ("eval_runtime", *([f"eval_{LOWER_METRICS[name]}"] if name in LOWER_METRICS else [])):
        with pytest.raises(ConfigError, match=rf"^metric_for_best_model: '{metric}' is better when lower, and "
                                              r"greater_is_better is true \(TrainingArguments' default when it is "
                                              r"not given, .*set greater_is_better=false$"):
            build(metric)
        build(metric, greater_is_better=False)
    with pytest.raises(ConfigError, match=r"^metric_for_best_model: 'eval_loss' is better when lower, and "
                                          r"greater_is_better is true"):
        build("eval_loss", greater_is_better=True)
    build("eval_loss")  # transformers' default for a name ending in 'loss': greater_is_better=False



def test_a_trainer_that_declares_no_metrics_leaves_the_best_model_metric_to_transformers(make_model, features,
                                                                                        collators, tmp_path):
    """A subclass that writes only `objective` (the documented way to add one) declares no metrics: it is built
    whatever metric_for_best_model names (its objective may log it)."""
    class Custom(AlignTrainer):
        def objective(self, model, inputs):
            raise NotImplementedError

    args = fast_args(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                     load_best_model_at_end=True, metric_for_best_model="eval_my_metric")
    assert Custom.eval_metrics() is None
    Custom(make_model("lora"), args, train_dataset=features["sft"], eval_dataset=features["sft"],
           data_collator=collators["sft"])


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize("name", list(TRAINERS))
def test_trainer_adapter(name, kind, make_model, features, collators, tokenizer, tmp_path):
    cls, data, classifier, extra, metric = TRAINERS[name]
    model = make_model(kind, classifier=classifier)
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (kind == "full") == (len(trainable) == len(before))
    trainer = cls(model, fast_args(tmp_path, max_steps=2), train_dataset=features[data],
                  data_collator=collators[data], processing_class=tokenizer, **extra)
    ref = getattr(trainer, "ref_model", None)
    ref_before = snapshot(ref) if ref is not None else None
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(metric in h for h in logs), logs[0]
    after = dict(model.named_parameters())
    unchanged = [n for n in trainable if torch.equal(after[n].detach(), before[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged[:5]}"
    moved = [n for n in set(before) - trainable if not torch.equal(after[n].detach(), before[n])]
    assert not moved, f"frozen parameters that moved: {moved[:5]}"
    if ref is not None:  # a frozen copy (full finetuning) stays the initial model
        assert kind == "full"
        assert all(torch.equal(p, ref_before[n]) for n, p in ref.named_parameters())

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = {p.name for p in out.iterdir()}
    assert "alignkit_adapter.json" in files and "training_args.json" in files
    assert ("model.safetensors" in files) == (kind == "full")
    assert ("adapter_model.safetensors" in files) == ("lora" in kind)
    assert ("interventions.safetensors" in files) == ("reft" in kind)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


@pytest.mark.parametrize("name", [n for n in TRAINERS if TRAINERS[n][0] is not KTOTrainer])
def test_evaluation_of_weighted_data_logs_the_weighted_figures(name, make_model, features, collators, tmp_path):
    """Evaluation data with record weights: the Trainer's evaluation logged only the unweighted means (every metric
    but the loss ignored the weights). Now each metric with one value per example is also logged as
    eval_weighted/<name> = sum w v / sum w; checked with weights [1, 0, 3] against each example evaluated alone
    (v_i), and absent when every weight is 1. (KTO's metrics are per-side sums, not one value per example.)"""
    cls, data, classifier, extra = TRAINERS[name][:4]
    model = make_model("lora", classifier=classifier)
    torch.manual_seed(1)
    with torch.no_grad():  # a LoRA away from its reference: DPO's implicit rewards are not all 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    weights = [1.0, 0.0, 3.0]
    three = [{**f, "weight": w} for f, w in zip(features[data][:3], weights)]
    coupled = "sft" in list(extra.get("loss_type", []))  # DPO's sft term divides by the set's chosen tokens
    trainer = cls(model, fast_args(tmp_path, per_device_eval_batch_size=2), train_dataset=features[data],
                  eval_dataset=three, data_collator=collators[data], **extra)
    got = trainer.evaluate()
    alone = [trainer.evaluate(eval_dataset=[f]) for f in three]
    names = [m for m in cls.objective_metrics(**extra, ranked=data == "ranked")
             if m not in getattr(cls, "unweighted_metrics", ())]
    assert {k for k in got if k.startswith("eval_weighted/")} == {f"eval_weighted/{m}" for m in names}
    values = {m: [a[f"eval_{m}"] for a in alone] for m in names}
    if coupled:  # an evaluation scales the sft term by the whole set's N / T (pairs / chosen tokens), as a training
        # step: example i's value is its NLL sum (alone: sum / T_i) times 3 / (T_1 + T_2 + T_3)
        tokens = [max(float(collators[data]([f])["completion_mask"][0, 1:].sum()), 1.0) for f in three]
        values["loss/sft"] = [v * t * len(three) / sum(tokens) for v, t in zip(values["loss/sft"], tokens)]
    for m in names:
        want = sum(w * v for w, v in zip(weights, values[m])) / sum(weights)
        assert got[f"eval_weighted/{m}"] == pytest.approx(want, rel=1e-4, abs=1e-6), m
    assert not any(k.startswith("eval_weighted/") for k in trainer.evaluate(eval_dataset=features[data][:3]))


@pytest.mark.parametrize("normalization", ["count", "weighted"])
@pytest.mark.parametrize("name", ["sft", "dpo", "reward", "reward_ranked"])
def test_eval_loss_is_one_reduction_over_the_whole_evaluation_set(name, normalization, make_model, features,
                                                                  collators, tmp_path):
    """eval_loss was the Trainer's mean of per-batch losses, each batch reduced by its own N: with
    weight_normalization="weighted" and weights [1, 0, 0] evaluated one example per batch, the two weight-0 batches
    counted as losses of 0 (a third of example 0's loss, not its loss), and it changed with the batch size. Now
    sum w L / N over the whole set: "weighted" gives example 0's loss evaluated alone, "count" the same value
    for every evaluation batch size."""
    cls, data, classifier, extra = TRAINERS[name][:4]
    three = [{**f, "weight": w} for f, w in zip(features[data][:3], [1.0, 0.0, 0.0])]

    def eval_loss(batch_size: int, dataset: list) -> float:
        trainer = cls(make_model("lora", classifier=classifier), fast_args(tmp_path, per_device_eval_batch_size=batch_size),
                      train_dataset=features[data], eval_dataset=dataset, data_collator=collators[data],
                      weight_normalization=normalization, **extra)
        return trainer.evaluate()["eval_loss"]

    one = eval_loss(1, three)
    assert eval_loss(3, three) == pytest.approx(one, rel=1e-5)
    if normalization == "weighted":
        assert one == pytest.approx(eval_loss(1, three[:1]), rel=1e-5)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_loss_on_is_refused_by_every_trainer_but_sft(name, make_model, features, collators, tokenizer, tmp_path):
    """`loss_on` (which turns of a conversation SFT trains) given to a preference / KTO / reward trainer: accepted and
    ignored (the CLI refuses data.loss_on under those commands). Now one ConfigError naming the trainer; SFT takes it."""
    cls, data, classifier, extra = TRAINERS[name][:4]

    def build(rows=features[data]):
        return cls(make_model("lora", classifier=classifier), fast_args(tmp_path), train_dataset=rows,
                   data_collator=collators[data], processing_class=tokenizer, loss_on="all", **extra)

    if cls is SFTTrainer:  # raw rows, which it tokenizes (tokenized ones: the test below)
        assert build([{"prompt": "Hi", "completion": " Hello"}] * 2).tokenize_config.loss_on == "all"
        return
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: loss_on='all' is read only by SFTTrainer .* remove it$"):
        build()


@pytest.mark.parametrize("name", list(TRAINERS))
def test_tokenization_settings_with_tokenized_data_are_refused(name, make_model, features, collators, tokenizer,
                                                              tmp_path):
    """max_length / max_prompt_length / formatter / add_eos apply when a trainer tokenizes raw rows; given beside data
    already tokenized (tokenize_records' features) they were accepted and ignored. Now one ConfigError naming them;
    the defaults, and the same settings with raw rows, still build."""
    cls, data, classifier, extra = TRAINERS[name][:4]

    def build(**kw):
        return cls(make_model("lora", classifier=classifier), fast_args(tmp_path), train_dataset=features[data],
                   eval_dataset=features[data], data_collator=collators[data], processing_class=tokenizer, **extra, **kw)

    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: max_length=16, formatter='plain' would be ignored: "
                                          r"tokenization settings apply only when the trainer tokenizes raw rows, and "
                                          r"train_dataset and eval_dataset are already tokenized"):
        build(max_length=16, formatter="plain")
    build()
