"""Evaluation outside the training loop: reward-model scores and a side-by-side generation report.

    stats = evaluate_reward_model(rm, features, PreferenceCollator(pad_id))   # accuracy, score means
    rows = generation_report(model, tokenizer, ["Hello!", ...], out_dir="report/")

`evaluate_reward_model` on pairwise data: accuracy = fraction of pairs with r(chosen) > r(rejected),
rewards/chosen and rewards/rejected = mean scores, margin = mean r(chosen) - r(rejected). On ranked data
(RankedCollator): accuracy over all ordered pairs, the mean Kendall tau and full-ranking exact match per prompt.
Records weighted other than 1 also give the weighted figures, `weighted/<name>` = sum w v / sum w.

`generation_report` generates greedily (unless sampling is asked for: `do_sample=True`; a temperature, top_p or
top_k without it is refused, greedy decoding would ignore it) for each prompt with the base model and with the
adapted one: `base_model` when given, else for adapters the same model with its adapter switched off
(`reference_off`); for full finetuning pass `base_model`. A ReFT model intervenes on the prompt positions
of its spec. Rows {"prompt", "base", "adapted"} are returned and, with `out_dir`, written to
`generations.jsonl` and `generations.md`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from alignkit.adapters import can_switch_off, reference_off
from alignkit.data import PromptRecord, tokenize_records
from alignkit.data.collators import PromptCollator
from alignkit.files import atomic_write_text, jsonl_text
from alignkit.losses import kendall_tau
from alignkit.online.generation import end_token_ids, uses_chat_template
from alignkit.settings.sampling import SamplingConfig
from alignkit.trainers.logps import prompt_locations
from alignkit.trainers.reward import ranked_table, same_tokens, sequence_rewards

logger = logging.getLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def weighted_means(values: dict[str, torch.Tensor], weights: torch.Tensor, where: str = "evaluation"
                   ) -> dict[str, float]:
    """`weighted/<name>` = sum_i w_i v_i / sum_i w_i of each `(n,)` value of `values`, with the records' weights
    `(n,)`; {} when every weight is 1 (the same as the unweighted means) or every weight is 0 (no weighted mean;
    warned, naming `where`)."""
    w = weights.detach().double().cpu()
    if w.numel() == 0 or bool((w == 1).all()):
        return {}
    if float(w.sum()) == 0:
        logger.warning("%s: every record has weight 0, so no weighted figure is reported (the unweighted ones are)",
                       where)
        return {}
    return {f"weighted/{k}": float((v.detach().double().cpu() * w).sum() / w.sum()) for k, v in values.items()}


@torch.no_grad()
def evaluate_reward_model(model: nn.Module, features: Sequence[dict], collator: Callable, batch_size: int = 8,
                          per_pair: dict[str, list[float]] | None = None, say_ties: bool = True
                          ) -> dict[str, float]:
    """Accuracy and score means of a reward model over tokenized pairwise (or ranked) features. `per_pair`, if
    given, receives each pair's `margin`, `rewards/chosen` and `rewards/rejected` (pairwise data). `say_ties`: warn
    of tied scores (`warn_ties`; off where the same pairs were already scored and said).

    Ranked features (a RankedCollator): `accuracy` over every ordered pair of replies (tied ones are no pair),
    per prompt `kendall_tau` and `exact_match` (every pair of the prompt ordered right: the whole ranking
    reproduced) averaged over the prompts with at least one pair, and their counts. Records with a weight other
    than 1 also give `weighted/<name>` (`weighted_means`; ranked `weighted/accuracy` weights each pair by its
    prompt's weight).

    Ranked replies with the same tokens (cut to one text by the length limits: `same_tokens`) are no pair, as tied
    ranks are not.

    `ties`: the ordered pairs whose two scores are exactly equal. They count as not right in `accuracy` (as TRL's
    RewardTrainer counts them: chosen > rejected), and 0 in Kendall's tau; a warning gives their number, since a
    constant head or half-precision scores (close ones rounded to one value) lower the accuracy without a word."""
    dev = _device(model)
    chosen, rejected, weights = [], [], []
    correct, pairs, taus, ties = [], [], [], []  # ranked: per prompt
    with _eval_mode(model):
        for s in range(0, len(features), batch_size):
            batch = collator(list(features[s:s + batch_size]))
            batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            r = sequence_rewards(model, batch)  # (rows,)
            weights.append(batch["weight"].float().cpu())  # (B,) one per pair / prompt
            if "group_index" in batch:
                table, mask, ranks = ranked_table(r, batch)
                K = table.shape[1]
                i, j = torch.triu_indices(K, K, offset=1, device=dev)
                same = same_tokens(batch, K)  # replies cut to one text by the length limits: no pair
                valid = mask[:, i] & mask[:, j] & (ranks[:, i] < ranks[:, j]) & ~same[:, i, j]  # tied ranks: no pair
                correct.append(((table[:, i] > table[:, j]) & valid).sum(-1).double().cpu())  # (B,)
                ties.append(((table[:, i] == table[:, j]) & valid).sum(-1).double().cpu())  # (B,)
                pairs.append(valid.sum(-1).double().cpu())  # (B,)
                taus.append(kendall_tau(table, mask, ranks, exclude=same).double().cpu())  # (B,)
            else:
                B = r.shape[0] // 2
                chosen.append(r[:B].cpu())
                rejected.append(r[B:].cpu())
    w = torch.cat(weights) if weights else torch.zeros(0)
    if taus:
        ok, n, tau = torch.cat(correct), torch.cat(pairs), torch.cat(taus)
        keep = n > 0  # a prompt whose replies all tie has nothing to order
        ranked = {"kendall_tau": tau[keep], "exact_match": (ok[keep] == n[keep]).double()}
        out = {"accuracy": float(ok.sum() / n.sum().clamp(min=1.0)), **{k: float(v.mean()) for k, v in ranked.items()},
               "num_prompts": float(keep.sum()), "num_pairs": float(n.sum()), "ties": float(torch.cat(ties).sum())}
        if say_ties:
            warn_ties(out["ties"], out["num_pairs"])
        weighted = weighted_means(ranked, w[keep])
        if weighted:  # a prompt's weight on each of its pairs
            weighted["weighted/accuracy"] = float((w * ok).sum() / (w * n).sum().clamp(min=1e-30))
        return {**out, **dict(sorted(weighted.items()))}
    c, r = torch.cat(chosen), torch.cat(rejected)
    if per_pair is not None:
        per_pair.update({"margin": (c - r).tolist(), "rewards/chosen": c.tolist(), "rewards/rejected": r.tolist()})
    values = {"accuracy": (c > r).double(), "rewards/chosen": c, "rewards/rejected": r, "margin": c - r}
    tied = float((c == r).sum())
    if say_ties:
        warn_ties(tied, c.numel())
    return {**{k: float(v.double().mean()) for k, v in values.items()}, "num_pairs": float(c.numel()),
            "ties": tied, **weighted_means(values, w)}


def warn_ties(tied: float, pairs: float) -> None:
    """One warning when `tied` of `pairs` ordered pairs got exactly equal scores (counted as not right)."""
    if tied:
        logger.warning("reward eval: %d of %d pair(s) got exactly equal scores for the better and the worse reply, "
                       "and count as not right in accuracy (as TRL's RewardTrainer counts them); if that is many, "
                       "the score head may be constant, or half-precision scores round close ones to one value "
                       "(load the model in float32: model.dtype=float32)", tied, pairs)


def _generate(model: nn.Module, batch: dict[str, torch.Tensor], gen_kwargs: dict[str, Any]) -> torch.Tensor:
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **gen_kwargs}
    loc = prompt_locations(model, batch["attention_mask"])  # None unless the model edits prompt positions
    if loc is not None:
        kw["intervention_locations"] = loc
    return model.generate(**kw)[:, batch["input_ids"].shape[1]:]  # (B, new)


@torch.no_grad()
def generation_report(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], *, base_model: nn.Module | None = None,
                      max_new_tokens: int = 64, batch_size: int = 8, out_dir: str | Path | None = None,
                      formatter: str = "auto", **generate_kwargs: Any) -> list[dict[str, str]]:
    """Side-by-side base vs adapted generations for `prompts` (strings, message lists or PromptRecords)."""
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
           **generate_kwargs}
    sampling = {k: gen[k] for k in ("temperature", "top_p", "top_k") if k in gen}
    ignored = [] if gen["do_sample"] else SamplingConfig(do_sample=False, **sampling).greedy_ignored()
    if ignored:  # transformers would only warn and decode greedily
        key, value = ignored[0]
        raise ValueError(f"generation_report: {key}={value!r} is read only when sampling, and do_sample is False "
                         "(greedy decoding, the default), so it would be ignored; pass do_sample=True to sample, or "
                         f"remove {key}")
    records = [p if isinstance(p, PromptRecord) else PromptRecord(p, id=f"prompt-{i}") for i, p in enumerate(prompts)]
    base_gen = gen
    if "eos_token_id" not in generate_kwargs:  # every end token, as training-time generation stops (model.generate
        #   alone stops at the generation config's EOS: a chat answer ran on past the template's turn end)
        chat = uses_chat_template(records, formatter)
        gen["eos_token_id"] = end_token_ids(model, tokenizer, SamplingConfig(), chat=chat)
        if base_model is not None:
            base_gen = {**gen, "eos_token_id": end_token_ids(base_model, tokenizer, SamplingConfig(), chat=chat)}
    features, _ = tokenize_records(records, tokenizer, formatter=formatter)
    switchable = can_switch_off(model) and base_model is None  # a base_model given is the base
    if not switchable and base_model is None:
        logger.warning("generation_report: a fully finetuned model and no base_model: the 'base' column is empty")
    collate = PromptCollator(tokenizer.pad_token_id, padding_side="left")
    dev = _device(model)
    rows: list[dict[str, str]] = []
    with _eval_mode(model):
        for s in range(0, len(features), batch_size):
            chunk = features[s:s + batch_size]
            batch = {k: v.to(dev) for k, v in collate(chunk).items() if isinstance(v, torch.Tensor)}
            adapted = _generate(model, batch, gen)
            if switchable:
                with reference_off(model):
                    base = _generate(model, batch, gen)
            elif base_model is not None:
                with _eval_mode(base_model):
                    base = _generate(base_model, batch, base_gen)
            else:
                base = None
            for i, f in enumerate(chunk):
                rows.append({"prompt": tokenizer.decode(f["prompt_input_ids"], skip_special_tokens=False),
                             "base": "" if base is None else tokenizer.decode(base[i], skip_special_tokens=True),
                             "adapted": tokenizer.decode(adapted[i], skip_special_tokens=True)})
    if out_dir is not None:
        write_report(rows, out_dir)
    return rows


def write_report(rows: Sequence[dict[str, str]], out_dir: str | Path) -> None:
    """`generations.jsonl` (one row per line) and `generations.md` (one section per prompt), both made before either
    is written and each written atomically: a row that does not serialize, or a kill, leaves the previous report's
    files whole (they were opened for writing first, so a failure part-way left a cut generations.jsonl)."""
    out = Path(out_dir)
    lines = jsonl_text(rows)
    parts = ["# Generations: base vs adapted\n"]
    for i, r in enumerate(rows):
        parts += [f"## Prompt {i + 1}\n", "```\n" + r["prompt"] + "\n```\n",
                  "**Base**\n", "```\n" + r["base"] + "\n```\n", "**Adapted**\n", "```\n" + r["adapted"] + "\n```\n"]
    atomic_write_text(out / "generations.jsonl", lines)
    atomic_write_text(out / "generations.md", "\n".join(parts))
    logger.info("wrote %d generations to %s", len(rows), out)


__all__ = ["evaluate_reward_model", "generation_report", "warn_ties", "weighted_means", "write_report"]
