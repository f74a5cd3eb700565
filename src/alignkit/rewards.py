"""Verifiable rewards: small Python functions an annotator of kind `function` can point at.

    annotator:
      kind: function
      function: alignkit.rewards:digit_fraction              # or contains_keyword / length_target
      kwargs: {}                                             # extra keyword arguments, e.g. {keyword: "please"}

Every function has the per-item signature `fn(prompt, response, **kwargs) -> float` that
`alignkit.online.FunctionAnnotator` calls (the prompt is a string or a list of messages; it is unused here).
Scores lie in [0, 1]. They are meant for smoke tests and tiny runs on a CPU, where a random model can move them:

| function          | score                                                                     |
|-------------------|---------------------------------------------------------------------------|
| digit_fraction    | share of the response's characters that are digits (0 for an empty one)  |
| contains_keyword  | 1 if any keyword occurs in the response (case-insensitive by default)     |
| length_target     | max(0, 1 - abs(n - target) / target), n = length in characters or words   |
"""

from __future__ import annotations

import string
from typing import Any, Literal, Sequence


def digit_fraction(prompt: Any, response: str) -> float:
    """Digits / characters of the response: "ab12" -> 0.5, "" -> 0.0."""
    return sum(c in string.digits for c in response) / max(len(response), 1)


def contains_keyword(prompt: Any, response: str, keyword: str | Sequence[str] = "please",
                     case_sensitive: bool = False) -> float:
    """1.0 when `keyword` (or any of a list of keywords) occurs in the response, else 0.0."""
    words = [keyword] if isinstance(keyword, str) else list(keyword)
    if not words or any(not isinstance(w, str) or not w for w in words):
        raise ValueError(f"contains_keyword: keyword must be a non-empty string or list of them, got {keyword!r}")
    text = response if case_sensitive else response.lower()
    return float(any((w if case_sensitive else w.lower()) in text for w in words))


def length_target(prompt: Any, response: str, target: int = 32, unit: Literal["chars", "words"] = "chars") -> float:
    """max(0, 1 - |n - target| / target) with n the response length in `unit`: 1 at the target, 0 at 0 or 2x."""
    if target < 1:
        raise ValueError(f"length_target: target must be >= 1, got {target}")
    if unit not in ("chars", "words"):
        raise ValueError(f"length_target: unit must be 'chars' or 'words', got {unit!r}")
    n = len(response) if unit == "chars" else len(response.split())
    return max(0.0, 1.0 - abs(n - target) / target)


REWARDS = {"digit_fraction": digit_fraction, "contains_keyword": contains_keyword, "length_target": length_target}

__all__ = ["REWARDS", "contains_keyword", "digit_fraction", "length_target"]
