"""The examples' weights a trainer is given, checked before anything is written (`refuse_bad_weights`).

Records read from files or raw rows have their weights checked by `alignkit.data.records` (a finite number >= 0, named
at its row). Tokenized examples given to a trainer directly (features from `tokenize_records`, edited or built by hand,
or a `datasets.Dataset` of them) were not: a weight of -1 trained its example the other way, "2" and True were read as
numbers by the collator's float(), NaN / inf stopped the first step as a non-finite loss whose likely causes named the
learning rate, None stopped it on a TypeError. Now the same rule, one DataError naming the set, the example and the fix;
and a set whose examples all weigh 0 is refused (every loss term 0: nothing learned or measured).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from alignkit.data.records import MAX_WEIGHT as FLOAT32_MAX  # past it a weight is inf in the batch's float32 weights
from alignkit.files import DataError

TOKENIZED_KEYS = ("input_ids", "chosen_input_ids", "prompt_input_ids")


def valid_weight(weight: Any) -> bool:
    """A real number (numpy's included; not a bool, a string or None), finite, >= 0 and within float32's range."""
    return (isinstance(weight, numbers.Real) and not isinstance(weight, bool) and type(weight).__name__ != "bool_"
            and math.isfinite(weight) and 0 <= weight <= FLOAT32_MAX)


def example_weights(data: Any) -> tuple[list, bool] | None:
    """The `weight` of each example of `data` (a `datasets.Dataset` or a sequence of mappings) and whether the examples
    are tokenized; None when it has no weight column or is not such a dataset (every weight 1)."""
    try:
        if hasattr(data, "column_names"):
            names = data.column_names
            return (list(data["weight"]), any(k in names for k in TOKENIZED_KEYS)) if "weight" in names else None
        weights = [f.get("weight", 1.0) for f in data]
        return weights, bool(len(data)) and any(k in data[0] for k in TOKENIZED_KEYS)
    except (KeyError, TypeError, AttributeError, IndexError):
        return None


def refuse_bad_weights(owner: str, train_dataset: Any = None, eval_dataset: Any = None) -> None:
    """DataError for a tokenized example whose weight is not a finite number in [0, 3.4e38] (raw rows are checked
    when they are read, where a null weight is the default 1), and for a set whose examples all weigh 0."""
    evals = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
    for what, data in [("training", train_dataset), *((f"evaluation{f' ({k})' if k else ''}", v)
                                                         for k, v in evals.items())]:
        found = example_weights(data) if data is not None else None
        if not found:
            continue
        weights, tokenized = found
        bad = next((i for i, w in enumerate(weights) if not valid_weight(w)), None) if tokenized else None
        if bad is not None:
            ex = data[bad]
            name = f" (id {ex['id']!r})" if isinstance(ex, dict) and ex.get("id") is not None else ""
            raise DataError(f"{owner}: {what} example {bad}{name} has 'weight' {weights[bad]!r}, and a weight must be "
                            f"a finite number >= 0 (at most {FLOAT32_MAX:.3g}: the loss keeps weights in float32); fix "
                            "the example's weight, or drop the weight key (the default is 1)")
        if weights and not any(weights):
            raise DataError(f"{owner}: every one of the {len(weights)} {what} example(s) has weight 0, so every loss "
                            f"term is 0 and nothing would be {'learned' if what == 'training' else 'measured'}; give "
                            "examples a weight > 0 (or drop the weight column: the default is 1)")


__all__ = ["FLOAT32_MAX", "example_weights", "refuse_bad_weights", "valid_weight"]
