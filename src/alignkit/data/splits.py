"""Deterministic, disjoint splits: DeepSpeed-Chat phase splits ("2,4,4" -> SFT / RM / RLHF) and
train/validation splits by group (e.g. by Open-Assistant tree, so no tree spans two parts).

Items with equal keys (a group) always land in the same part. Two methods:
- "permutation" (default): the distinct keys, in first-appearance order, are shuffled with
  `random.Random(seed)`; the first round(f_0 * G) groups go to part 0, and so on (largest-remainder
  rounding, so part sizes sum to the number of groups G and match the fractions as closely as integers
  can). Same items in the same order + same seed -> same split, on every machine.
- "hash": group key k goes to the part whose cumulative-fraction interval holds
  sha256(f"{seed}:{k}") / 2**256. Independent of order and of which other items exist (adding data
  never moves an old item), proportions only approximate. `split_records` keys a record without a group by its
  content, so this holds for records too (a dataset added to the list, in any place, moves no old record).
`split_records` warns when records of the same content land in two parts (the same record in two phases).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from typing import Callable, Hashable, Sequence

from alignkit.data.records import DataError, Record
from alignkit.naming import stable_repr

logger = logging.getLogger(__name__)


def parse_fractions(spec: str | Sequence[float]) -> list[float]:
    """"2,4,4" -> [0.2, 0.4, 0.4]: weights normalised to sum to 1."""
    try:
        parts = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise DataError(f"split {spec!r}: expected comma-separated numbers like '2,4,4' or '95,5'") from None
    total = sum(parts)
    if not parts or not all(math.isfinite(p) and p >= 0 for p in parts) or not 0 < total < math.inf:
        # a NaN passed `p < 0` and `sum <= 0` (both False), and an infinite weight or sum gave NaN / 0 fractions:
        # every hash-split item then fell in the last part, and a permutation split stopped on a TypeError
        raise DataError(f"split {spec!r}: weights must be finite numbers >= 0 with a positive, finite sum")
    return [p / total for p in parts]


def part_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer sizes summing to n, closest to n * fractions (largest remainder)."""
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _hash_unit(seed: int, key: Hashable) -> float:
    """sha256(f"{seed}:{key}") / 2**256, with a key that is not a string written by `stable_repr` (its repr for numbers
    and tuples of them and of strings: the text str() gave, so those splits do not move): str() of a frozenset (a
    `group_by` of tags) follows the process's hash seed, so each process (and each run) put its groups in other
    parts, and the processes of one launch trained on different, overlapping phases."""
    text = key if isinstance(key, str) else stable_repr(key)
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest, "big") / 2 ** 256


def split_indices(keys: int | Sequence[Hashable], fractions: str | Sequence[float], seed: int = 0,
                  method: str = "permutation") -> list[list[int]]:
    """Indices of the items in each part (ascending). `keys`: one group key per item, or a count n
    (every item its own group)."""
    fr = parse_fractions(fractions)
    keys = list(range(keys)) if isinstance(keys, int) else list(keys)
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    if method == "permutation":
        order = list(groups)
        random.Random(seed).shuffle(order)
        part_of: dict[Hashable, int] = {}
        start = 0
        for p, size in enumerate(part_sizes(len(order), fr)):
            for k in order[start:start + size]:
                part_of[k] = p
            start += size
    elif method == "hash":
        bounds = [sum(fr[:p + 1]) for p in range(len(fr))]
        part_of = {k: next((p for p, b in enumerate(bounds) if _hash_unit(seed, k) < b), len(fr) - 1) for k in groups}
    else:
        raise DataError(f"unknown split method {method!r}; valid: permutation, hash")
    parts: list[list[int]] = [[] for _ in fr]
    for k, idx in groups.items():
        parts[part_of[k]].extend(idx)
    empty = [p for p, f in enumerate(fr) if f > 0 and not parts[p]]
    if empty:  # asked for a share, got nothing: too few items (groups) for the fractions; the caller's phase is empty
        logger.warning("split %r of %d item(s) in %d group(s): part(s) %s get no item although their share is > 0; "
                       "give more data or fewer / larger parts", fractions, len(keys), len(groups),
                       ", ".join(map(str, empty)))
    return [sorted(p) for p in parts]


def source_group(record: Record) -> Hashable:
    """What keeps records together in a held-out split: their Open-Assistant tree (`meta["tree_id"]`, set by the OASST
    readers) when they have one, else their prompt. The threads of one tree share its first turns and the pairs of
    one ranked record share prompt and responses: split record by record, the evaluation part held records whose
    prompt (and responses) were trained on, and its metrics measured memorised data."""
    tree = record.meta.get("tree_id")
    return ("tree", tree) if tree is not None else ("prompt", json.dumps(record.prompt, sort_keys=True))


def content_key(record: Record) -> str:
    """A record's compared fields (kind, prompt, responses, label, weight, ...; not its id or meta) as one string."""
    return json.dumps([record.kind] + [getattr(record, f.name) for f in dataclasses.fields(record) if f.compare],
                      sort_keys=True, default=str)


def warn_shared_records(parts: list[list[Record]], fractions: str | Sequence[float]) -> None:
    """One warning when records with the same content (a file given twice, a dataset listed twice, duplicated rows)
    landed in two parts: the same record is then in two phases (SFT and reward, train and evaluation)."""
    part_of: dict[str, int] = {}
    shared = []
    for p, part in enumerate(parts):
        for r in part:
            if part_of.setdefault(content_key(r), p) != p:
                shared.append(r.id or "?")
    if shared:
        logger.warning("split %r: %d record(s) have the same content as a record in another part, e.g. %s: the same "
                       "record is in two parts (phases); de-duplicate the data, or split with group_by=source_group "
                       "(records sharing a prompt stay in one part)", fractions, len(shared), ", ".join(shared[:3]))


def split_records(records: Sequence[Record], fractions: str | Sequence[float], seed: int = 0,
                  group_by: str | Callable[[Record], Hashable] | None = None,
                  method: str = "permutation") -> list[list[Record]]:
    """Split records into parts; `group_by` names a `meta` key (e.g. "tree_id") whose equal values stay together, or
    is a function of the record giving its group (e.g. `source_group`). Records that are each their own group split
    exactly as with `group_by=None`. With `method="hash"` and no `group_by`, a record's part is decided by its content
    (`content_key`), so adding, removing or reordering other records (another dataset listed before it) never moves
    it; before, by its position in the list, which moved every record after the change. Records of the same content
    in two parts are warned (`warn_shared_records`)."""
    if group_by is None and method == "hash":
        keys: list[Hashable] = [content_key(r) for r in records]
    elif group_by is None:
        keys = list(range(len(records)))
    elif callable(group_by):
        keys = [group_by(r) for r in records]
    else:
        missing = [r.id for r in records if group_by not in r.meta]
        if missing:
            raise DataError(f"{missing[0]}: record has no meta[{group_by!r}] to group by ({len(missing)} such "
                            f"record(s)); group by a key the reader sets (OASST: 'tree_id') or pass group_by=None")
        keys = [r.meta[group_by] for r in records]
    parts = [[records[i] for i in part] for part in split_indices(keys, fractions, seed, method)]
    warn_shared_records(parts, fractions)
    return parts
