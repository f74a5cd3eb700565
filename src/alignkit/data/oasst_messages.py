"""Open-Assistant flat message exports (one message per row) -> the same records as the tree reader.

The flat form is what the `oasst1`/`oasst2` datasets ship: every row is one message with `message_id`,
`parent_id` (None for a tree's root), `message_tree_id`, `text`, `role`, `lang`, `rank`, `deleted`,
`synthetic`, `review_result`, `tree_state`, ... This reader groups the rows by `message_tree_id`,
rebuilds each tree (replies in the order their rows appear), and hands the trees to
`alignkit.data.oasst.read_oasst_rows`, so the filters, SFT threads, ranked replies and prompts are
exactly the tree reader's (see that module's docstring for their rules). A tree's place in error
messages is the file and line of its root message.

Errors name the row: a message whose `parent_id` is not in the file, a tree without a root or with two, a repeated
`message_id`, a message whose `parent_id` chain loops instead of reaching the root. With `on_invalid="skip"` the broken
tree is skipped and counted instead.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from alignkit.data.oasst import read_oasst_rows
from alignkit.data.readers.columns import where_of
from alignkit.data.readers.registry import register_reader
from alignkit.data.readers.rows import get_field, iter_rows
from alignkit.data.records import DataError

logger = logging.getLogger(__name__)

TREE_KEYS = ("message_tree_id", "tree_state")  # per-message columns that describe the tree, not the message


def _trees(source: Any, split: str | None, on_invalid: str):
    """Yield ({"message_tree_id", "tree_state", "prompt": nested root}, where) per tree, in file order."""
    rows: dict[str, list[tuple[dict, str]]] = {}
    for row, where in iter_rows(source, split):
        tree_id = get_field(row, "message_tree_id", where, str, "the id of the tree the message belongs to")
        get_field(row, "message_id", where, str, "the message's id")
        rows.setdefault(tree_id, []).append((row, where))
    for tree_id, members in rows.items():
        try:
            yield _build(tree_id, members)
        except DataError:
            if on_invalid == "raise":
                raise
            logger.warning("%s: skipping broken OASST tree %s", members[0][1], tree_id, exc_info=True)


def _build(tree_id: str, members: list[tuple[dict, str]]) -> tuple[dict, str]:
    nodes: dict[str, dict] = {}
    places: dict[str, str] = {}
    for row, where in members:
        mid = row["message_id"]
        if mid in nodes:
            raise DataError(f"{where}: message_id {mid} appears twice (first at {places[mid]}); remove the duplicate")
        nodes[mid] = {k: v for k, v in row.items() if k not in TREE_KEYS} | {"replies": []}
        places[mid] = where
    roots = []
    for mid, node in nodes.items():
        parent = node.get("parent_id")
        if parent is None:
            roots.append(mid)
        elif parent not in nodes:
            raise DataError(f"{places[mid]}: message {mid} replies to {parent}, which is not in tree {tree_id} "
                            f"in this file; export whole trees (all messages of a message_tree_id)")
        else:
            nodes[parent]["replies"].append(node)
    if len(roots) != 1:
        first = members[0][1]
        raise DataError(f"{first}: tree {tree_id} has {len(roots)} root messages (parent_id null): "
                        f"{roots[:3]}; a tree has exactly one")
    reached, todo = set(), [roots[0]]
    while todo:  # a message whose parent_id chain loops (onto itself, or two onto each other) hangs from no root
        mid = todo.pop()
        reached.add(mid)
        todo += [r["message_id"] for r in nodes[mid]["replies"] if r["message_id"] not in reached]
    lost = [mid for mid in nodes if mid not in reached]
    if lost:
        raise DataError(f"{places[lost[0]]}: message {lost[0]} of tree {tree_id} does not lead back to its root "
                        f"{roots[0]} (its parent_id chain loops; {len(lost)} such message(s)), so it would be left "
                        f"out without a word; fix its parent_id")
    root_row, root_where = next((r, w) for r, w in members if r["message_id"] == roots[0])
    return {"message_tree_id": tree_id, "tree_state": root_row.get("tree_state"), "prompt": nodes[roots[0]]}, root_where


@register_reader("oasst-messages", kinds=("sft", "ranked", "prompt"), priority=20,
                 detect=lambda r: "message_tree_id" in r and "message_id" in r and "parent_id" in r
                 and "prompt" not in r,
                 description="Open-Assistant flat messages (message_id, parent_id, message_tree_id, role, text) "
                             "-> sft | ranked | prompt", whole=True)
def read_oasst_messages(source: Any, *, kind: str = "sft", mode: str = "leaves", prompts: str = "roots",
                        langs: str | Sequence[str] | None = None, drop_deleted: bool = True,
                        drop_synthetic: bool = True, drop_unreviewed: bool = True,
                        tree_states: Sequence[str] | None = ("ready_for_export",), on_invalid: str = "raise",
                        split: str | None = None) -> list:
    """Records of `kind` from an Open-Assistant flat message export (same options as `read_oasst`)."""
    return read_oasst_rows(_trees(source, split, on_invalid), where_of(source), kind=kind, mode=mode, prompts=prompts,
                           langs=langs, drop_deleted=drop_deleted, drop_synthetic=drop_synthetic,
                           drop_unreviewed=drop_unreviewed, tree_states=tree_states, on_invalid=on_invalid)
