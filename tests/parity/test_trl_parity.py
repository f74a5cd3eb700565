"""alignkit's DPO-family loss and metrics equal TRL 1.16 DPOTrainer's on the same model, reference, rows and settings.

The TRL side was computed once by `bench/parity_trl.py` (in bench/.envs/trl) and recorded in `golden_trl.json`;
this test needs no TRL. It rebuilds the fixture of `fixture.py` (a tiny Llama from `build_tiny_model(**MODEL_ARGS)`
= the reference; the policy = the reference + 0.05 N(0, 1) noise from a seeded generator), checks the weights'
and tokenizer's SHA-256 against the recorded ones (a changed fixture must re-record TRL's numbers, not silently
compare other models), then checks, for plain-text and conversational rows:
- token ids, row by row (prompt / chosen / rejected), against TRL's `_prepare_dataset`;
- per-pair policy and reference log-probs, against TRL's `compute_ref_log_probs`;
- the loss and the logged metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
  logps/chosen, logps/rejected) of one batch for every shared loss type, against `DPOTrainer.compute_loss`.

Convention differences (TRL 1.16 -> alignkit; "match:" is the switch that makes alignkit give TRL's numbers).
Each is exercised below or probed on both sides by the bench script:

1. EOS on plain-text completions. TRL appends `eos_token` to the chosen/rejected text; alignkit appends
   `eos_token_id` to the completion ids (same ids). Conversational rows: neither (the template ends the turn).
   match: the default `TokenizeConfig.add_eos=None`; `add_eos=False` drops it, `True` forces it.
2. Truncation. TRL: `max_length` (1024) keeps the START of prompt+completion, and drops rows whose prompt fills
   it. alignkit: `max_prompt_length` (512) first keeps the END of the prompt, then `max_length` (1024) cuts the
   completions (keeping their start); unfit rows are counted in `TokenizeStats`.
   match: `max_prompt_length=None` with the same `max_length`.
3. Prompt whose ids are not a prefix of prompt+completion (a BPE token spans the boundary). TRL warns once and
   starts the completion where the ids diverge (the merged token becomes completion); alignkit raises a
   `DataError` naming the record, as the issue requires. match: none by design; end prompts on a word and start
   completions with their space (as the rows here do).
4. `sigmoid` with `label_smoothing` > 0. TRL 1.16 ignores it (plain DPO); alignkit's is cDPO,
   -(1 - eps) log s(z) - eps log s(-z). match: `label_smoothing=0` for `sigmoid` (a list that also holds
   `robust`/`exo_pair`, which read it, cannot match).
5. `exo_pair` with `label_smoothing=0`: TRL raises ValueError; alignkit uses eps = 1e-3. Equal for eps > 0.
6. `bco_pair`: neither keeps a running reward mean by default (alignkit's `PreferenceParams.bco_delta=0`).
7. `sft` term: TRL repeats the batch's chosen-token-mean NLL on every pair; alignkit gives pair i
   -B log pi(y_w,i) / sum_j |y_w,j|. Same batch loss; per-pair values (and so sample-weighted ones; TRL has no
   sample weights) differ.
8. Mixed precision: `DPOConfig.bf16` defaults to True, alignkit follows `TrainingArguments` (False).
   match: `bf16=False` in TRL (as recorded here) or `bf16=True` in alignkit's arguments.
9. Position ids: TRL passes none (right padding, so 0..T-1); alignkit counts real tokens. Equal for right padding.
10. Logged metrics: TRL averages per-step batch means over the logging window, alignkit divides (sum, count)
    totals; equal for equal batch sizes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.data import DataError

from .fixture import (CASES, DATASETS, LOGP_KEYS, METRICS, MODEL_ARGS, PERTURB, alignkit_case, alignkit_features,
                      build_models, close, parity_problems, tokenizer_checksum, trl_settings, weights_checksum)

GOLDEN = json.loads((Path(__file__).parent / "golden_trl.json").read_text())
RERECORD = "rerun `PYTHONPATH=src bench/.envs/trl/bin/python bench/parity_trl.py --write-golden` (TRL venv)"

@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    tok, policy, reference = build_models()
    assert tokenizer_checksum(tok) == GOLDEN["tokenizer_checksum"], f"the tiny tokenizer changed; {RERECORD}"
    assert weights_checksum(reference) == GOLDEN["reference_checksum"], f"the tiny model changed; {RERECORD}"
    assert weights_checksum(policy) == GOLDEN["policy_checksum"], f"the policy perturbation changed; {RERECORD}"
    return tok, policy, reference


def split(feature: dict) -> dict[str, list[int]]:
    """alignkit's feature as TRL's (prompt_ids, chosen_ids, rejected_ids)."""
    n = feature["prompt_length"]
    assert feature["rejected_input_ids"][:n] == feature["chosen_input_ids"][:n]
    return {"prompt_ids": feature["chosen_input_ids"][:n], "chosen_ids": feature["chosen_input_ids"][n:],
            "rejected_ids": feature["rejected_input_ids"][n:]}


def test_fixture_is_the_recorded_one():
    assert GOLDEN["model_args"] == MODEL_ARGS and GOLDEN["perturb"] == PERTURB, RERECORD
    for name, rows in DATASETS.items():
        assert GOLDEN["datasets"][name]["rows"] == rows, f"rows of {name!r} changed; {RERECORD}"
        assert set(GOLDEN["datasets"][name]["cases"]) == set(CASES), RERECORD
        for cname, case in CASES.items():
            assert GOLDEN["datasets"][name]["cases"][cname]["settings"] == trl_settings(case), RERECORD


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_token_ids_equal_trl(models, dataset):
    tok, _, _ = models
    ours = [split(f) for f in alignkit_features(DATASETS[dataset], tok)]
    for i, (mine, trl) in enumerate(zip(ours, GOLDEN["datasets"][dataset]["tokens"], strict=True)):
        assert mine == trl, f"{dataset} row {i}: alignkit {mine} != TRL {trl}"
    eos = tok.eos_token_id
    ends = [r["chosen_ids"][-1] == eos and r["rejected_ids"][-1] == eos for r in ours]
    assert all(ends) if dataset == "plain" else not any(ends)  # EOS on plain-text completions only


@pytest.mark.parametrize("dataset,case", [(d, c) for d in DATASETS for c in CASES])
def test_loss_and_metrics_equal_trl(models, dataset, case):
    tok, policy, reference = models
    want = GOLDEN["datasets"][dataset]["cases"][case]
    got = alignkit_case(tok, policy, reference, DATASETS[dataset], CASES[case])
    for key in LOGP_KEYS:
        for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
            assert close(g, w), f"{dataset}/{case} {key}[{i}]: alignkit {g} != TRL {w}"
    assert close(got["loss"], want["loss"]), f"{dataset}/{case} loss: alignkit {got['loss']} != TRL {want['loss']}"
    for m in METRICS:
        assert close(got["metrics"][m], want["metrics"][m], atol=1e-5), \
            f"{dataset}/{case} {m}: alignkit {got['metrics'][m]} != TRL {want['metrics'][m]}"


def test_golden_reference_differs_from_policy():
    """The check means something only if the log-ratios are non-zero and the pairs disagree."""
    c = GOLDEN["datasets"]["plain"]["cases"]["sigmoid"]
    ratios = [p - r for p, r in zip(c["policy_chosen_logps"], c["reference_chosen_logps"])]
    assert min(abs(x) for x in ratios) > 1e-3
    assert 0 < c["metrics"]["rewards/accuracies"] < 1
    assert abs(c["loss"] - math.log(2)) > 1e-3


def test_add_eos_false_drops_trls_eos(models):
    tok, _, _ = models
    rows = DATASETS["plain"]
    for mine, trl in zip(alignkit_features(rows, tok, add_eos=False), GOLDEN["datasets"]["plain"]["tokens"]):
        s = split(mine)
        assert s["chosen_ids"] + [tok.eos_token_id] == trl["chosen_ids"]
        assert s["rejected_ids"] + [tok.eos_token_id] == trl["rejected_ids"]


def test_truncation_matches_trl_without_max_prompt_length(models):
    tok, _, _ = models
    probe = GOLDEN["probes"]["truncation"]
    L, trl_ids = probe["max_length"], probe["trl_input_ids"]  # TRL: keep the start of prompt + completion
    f = alignkit_features(probe["rows"], tok, max_length=L, max_prompt_length=None)[0]
    assert [f["chosen_input_ids"], f["rejected_input_ids"]] == trl_ids
    assert len(trl_ids[1]) == L and trl_ids[1][-1] != tok.eos_token_id  # the rejected completion was cut
    prompt = split(f)["prompt_ids"]
    g = alignkit_features(probe["rows"], tok, max_length=L, max_prompt_length=16)[0]  # alignkit's own policy
    assert split(g)["prompt_ids"] == prompt[-16:] and g["chosen_input_ids"] != trl_ids[0]


def test_boundary_merge_is_an_error_not_a_shortened_prompt(models):
    tok, _, _ = models
    probe = GOLDEN["probes"]["boundary_merge"]
    prompt_alone = tok(probe["rows"][0]["prompt"])["input_ids"]
    assert len(probe["trl_tokens"][0]["prompt_ids"]) == len(prompt_alone) - 1  # TRL moved the trailing space
    with pytest.raises(DataError, match="not a prefix"):
        alignkit_features(probe["rows"], tok)


def test_sigmoid_label_smoothing_is_cdpo_in_alignkit():
    trl = GOLDEN["datasets"]["plain"]["cases"]
    assert trl["sigmoid_ls0.1"]["loss"] == trl["sigmoid"]["loss"]  # TRL 1.16 ignores it
    from alignkit.losses import PreferenceBatch, PreferenceParams, preference_loss

    pb = PreferenceBatch(*(torch.tensor(trl["sigmoid"][k]) for k in LOGP_KEYS))
    got = float(preference_loss(pb, PreferenceParams(beta=0.1, label_smoothing=0.1), "sigmoid").losses.mean())
    eps, want = 0.1, 0.0
    for pw, pl, rw, rl in zip(*(trl["sigmoid"][k] for k in LOGP_KEYS)):
        z = 0.1 * ((pw - rw) - (pl - rl))
        want += (-(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))) / 4
    assert close(got, want) and not close(got, trl["sigmoid_ls0.1"]["loss"], rtol=1e-4)


def test_exo_pair_without_label_smoothing_uses_1e_3(models):
    tok, policy, reference = models
    assert GOLDEN["probes"]["exo_pair_eps0"]["trl"].startswith("ValueError")
    got = alignkit_case(tok, policy, reference, DATASETS["plain"], {"loss_type": ["exo_pair"], "label_smoothing": 0.0})
    assert close(got["loss"], GOLDEN["datasets"]["plain"]["cases"]["exo_pair_ls1e-3"]["loss"])


def test_the_recording_scripts_check_fails_on_any_difference_or_nan():
    """bench/parity_trl.py's exit status read only the worst relative loss difference: a NaN alignkit loss made it NaN,
    which compares False with the threshold (and max() can drop it), and metric or log-prob differences were printed
    but passed. It now fails on what this module checks (`parity_problems`)."""
    want = GOLDEN["datasets"]["plain"]["cases"]["sigmoid"]
    assert parity_problems(json.loads(json.dumps(want)), want) == []
    nan_loss = {**want, "loss": float("nan")}
    assert parity_problems(nan_loss, want) == [f"loss: alignkit nan != TRL {want['loss']}"]
    margin = {**want, "metrics": {**want["metrics"], "rewards/margins": want["metrics"]["rewards/margins"] + 1e-3}}
    assert [p.split(":")[0] for p in parity_problems(margin, want)] == ["rewards/margins"]
    short = {**want, "policy_chosen_logps": want["policy_chosen_logps"][:-1]}
    assert parity_problems(short, want) == [f"policy_chosen_logps: {len(want['policy_chosen_logps']) - 1} vs "
                                            f"{len(want['policy_chosen_logps'])} values"]
