"""Open-Assistant message-tree exports (JSONL, one tree per line) -> SFT threads, ranked replies, prompts.

A line is `{"message_tree_id", "tree_state", "prompt": <message>}`, a message being `{"message_id",
"text", "role": "prompter"|"assistant", "lang", "deleted", "synthetic", "review_result", "rank",
"replies": [<message>, ...]}`. Roles become "user" / "assistant" messages.

Filters (applied first): trees whose `tree_state` is not in `tree_states` (default: only
"ready_for_export"; None keeps all; a string is one state) are skipped; a message that is deleted
(`drop_deleted`), synthetic (`drop_synthetic`), not reviewed positively (`review_result` False or
missing/None, `drop_unreviewed`) or not in `langs` (None keeps every language; a string is one; matched
case-insensitively) is removed **with its whole subtree**, since its replies answer it. A `tree_states` value that is
no Open-Assistant tree state (`TREE_STATES`, its backend's `State`) is refused listing the valid ones; each `langs`
value that matches no tree's first message logs a warning naming the languages there. A summary of what each filter
removed is logged; filters that removed every tree of a whole read are warned about in one line naming each filter, the
trees it removed and the values the file holds (`removed_everything`; `alignkit.cli.data` adds it to its "holds no
records" error).

SFT (`kind="sft"`, `mode`):
- "leaves" (default): one thread per distinct conversation end. Every leaf gives the path from the root
  to it; a path ending on a prompter turn (a follow-up nobody answered) is cut back to the assistant
  turn before it; paths ending on the same assistant message count once. This takes every branch.
- "best": one thread per tree, following the best-ranked branch: at a prompter turn the assistant reply
  with the lowest rank (unranked replies come after ranked ones, in listed order); at an assistant turn
  the first prompter reply that has an answer. Stops at the last assistant turn reached.
- "every_turn": one record per assistant message (prompt = the whole path before it).
The record's completion is the final assistant turn; earlier turns are in the prompt, and its assistant turns
are trained too under the default `loss_on="all_assistant"` (`alignkit.data.tokenize`), as Open-Assistant's
trainer does.

Ranked (`kind="ranked"`, for reward modeling): for every prompter turn with at least two *ranked* assistant replies
(after filtering), the conversation up to that turn and those replies ordered by rank (0 = best). Replies without a rank
were never compared and are left out (a turn with fewer than two ranked replies gives no record). Equal ranks are kept
as ties (`RankedRecord.ranks`), so pair views skip them. The turns that give no record (unanswered, fewer than 2 ranked
replies), the tied pairs and the unranked replies left out of a record are counted and logged with the record count (as
the filters' removals are). Ranks are OASST's, computed before filtering, so they may have gaps; only their order
matters.

Prompts (`kind="prompt"`, for online training): `prompts="roots"` (default) gives each tree's initial
prompt; `prompts="all"` every prompter turn with the conversation before it.

Presets (`preset=`): "strict" (default) is everything above. "oasst" reproduces Open-Assistant's own trainer
(model_training/custom_datasets/oasst_dataset.py, `load_oasst_export`) as its reader applies the rules: a tree is kept
when its state is "ready_for_export" and its ROOT is positively reviewed and in `langs` (default English; no per-message
review or language check); SFT threads are the paths to leaves, where a prompter leaf counts only when it is the FIRST
reply of its parent (and is then cut off), and a thread with any deleted or synthetic message is dropped (not the whole
subtree: other branches stay); ranked groups are the prompter turns (with a clean path) with >= 2 ranked replies, sorted
by rank; prompts (OA's "rl" mode) are every prompter-ending path without deleted or synthetic messages, in trees that
are "ready_for_export" or "prompt_lottery_waiting". The paths it leaves out (through a deleted or synthetic message;
prompter leaves that are not the first reply) are counted in one logged line with the record count. `mode`, `prompts`,
`drop_*` and `tree_states` do not apply to it. An option set away from its default that a read would ignore is refused
(`check_applies`): those under "oasst", `mode` for other than SFT records, `prompts` for other than prompt records. On
the shared 40-tree English sample (`../shared/data/oasst/oasst_en_trees_sample.jsonl`):

| preset | SFT records | assistant messages trained (*)        | ranked groups | prompts                           |
|--------|-------------|---------------------------------------|---------------|-----------------------------------|
| strict | 202         | 247 (202 with loss_on=last_assistant) | 73            | 37 roots (175 with prompts="all") |
| oasst  | 197         | 247                                   | 73            | 175                               |

(*) with loss_on=all_assistant.

Records carry `meta = {"tree_id", "message_id", "lang"}` (SFT threads also `"thread"`: the message ids from
the root); split train/validation by tree with
`alignkit.data.splits.split_records(records, "95,5", group_by="tree_id")`.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from alignkit.data.readers.columns import where_of
from alignkit.data.readers.notes import ReaderNotes
from alignkit.data.readers.registry import register_reader
from alignkit.data.readers.rows import collect, get_field, iter_rows
from alignkit.data.records import DataError, PromptRecord, RankedRecord, SFTRecord

logger = logging.getLogger(__name__)

ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Node:
    id: str
    role: str  # "user" | "assistant"
    text: str
    rank: int | None
    lang: str | None
    replies: list["Node"] = field(default_factory=list)

    def message(self) -> dict:
        return {"role": self.role, "content": self.text}


@dataclass
class Filters:
    langs: Sequence[str] | None = None
    drop_deleted: bool = True
    drop_synthetic: bool = True
    drop_unreviewed: bool = True

    def reason(self, msg: dict) -> str | None:
        """Why `msg` is filtered out, or None to keep it."""
        if self.drop_deleted and msg.get("deleted"):
            return "deleted"
        if self.drop_synthetic and msg.get("synthetic"):
            return "synthetic"
        if self.drop_unreviewed and not msg.get("review_result"):
            return "unreviewed"
        if self.langs is not None and message_lang(msg) not in self.langs:
            return "lang"
        return None


def message_lang(msg: dict) -> str:
    """A message's language, lower-cased: `langs` match it case-insensitively ("EN" keeps "en" messages)."""
    return str(msg.get("lang") or "").lower()


def _size(msg: dict) -> int:
    return 1 + sum(_size(r) for r in msg.get("replies") or [])


def build_tree(msg: dict, filters: Filters, where: str, removed: Counter,
               parent_role: str | None = None) -> Node | None:
    """The filtered tree under `msg` as Nodes (None if `msg` itself is filtered out)."""
    mid = msg.get("message_id", "?")
    for key, typ in (("text", str), ("role", str)):
        if not isinstance(msg.get(key), typ):
            raise DataError(f"{where}: message {mid} has no string {key!r}; is this an Open-Assistant tree export?")
    if msg["role"] not in ROLES:
        raise DataError(f"{where}: message {mid} has role {msg['role']!r}; expected 'prompter' or 'assistant'")
    if parent_role is not None and ROLES[msg["role"]] == parent_role:
        raise DataError(f"{where}: message {mid} ({msg['role']}) replies to a message of the same role; roles must "
                        f"alternate prompter/assistant in an Open-Assistant tree")
    why = filters.reason(msg)
    if why is not None:
        removed[why] += 1
        removed["removed with their parent"] += _size(msg) - 1
        return None
    rank = msg.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise DataError(f"{where}: message {mid} has rank {rank!r}; ranks must be integers or null")
    node = Node(mid, ROLES[msg["role"]], msg["text"], rank, msg.get("lang"))
    replies = msg.get("replies") or []
    if not isinstance(replies, list):
        raise DataError(f"{where}: message {mid} has 'replies' of type {type(replies).__name__}; expected a list")
    for r in replies:
        child = build_tree(r, filters, where, removed, node.role)
        if child is not None:
            node.replies.append(child)
    return node


def _by_rank(replies: list[Node]) -> list[Node]:
    """Replies ordered best first: ranked by rank (stable for ties), then unranked in listed order."""
    return sorted(replies, key=lambda n: (n.rank is None, n.rank if n.rank is not None else 0))


def sft_threads(root: Node, mode: str = "leaves") -> list[list[Node]]:
    """Paths from the root ending on an assistant turn, chosen by `mode` (see the module docstring)."""
    threads: dict[str, list[Node]] = {}

    def walk(node: Node, path: list[Node]) -> None:
        path = path + [node]
        if mode == "every_turn" and node.role == "assistant":
            threads.setdefault(node.id, path)
        if not node.replies and mode == "leaves":
            end = path if node.role == "assistant" else path[:-1]
            if end:
                threads.setdefault(end[-1].id, end)
        for r in node.replies:
            walk(r, path)

    if mode in ("leaves", "every_turn"):
        walk(root, [])
        return list(threads.values())
    if mode != "best":
        raise DataError(f"unknown OASST SFT mode {mode!r}; valid: leaves, best, every_turn")
    path, node, last_assistant = [root], root, 0
    while True:
        if node.role == "user":
            options = _by_rank([r for r in node.replies if r.role == "assistant"])
        else:
            options = [r for r in node.replies if any(a.role == "assistant" for a in r.replies)]
        if not options:
            break
        node = options[0]
        path.append(node)
        if node.role == "assistant":
            last_assistant = len(path)
    return [path[:last_assistant]] if last_assistant else []


# what preset "oasst" leaves out of its threads (Open-Assistant's rules), counted and logged with the records
DIRTY, LATE_LEAF = ("path(s) through a deleted or synthetic message",
                    "prompter leaf (leaves) not its parent's first reply")
NO_REPLY, ONE_RANKED, TIED = ("prompter turn(s) without an assistant reply", "prompter turn(s) with fewer than 2 "
                               "ranked replies", "tied reply pair(s) (kept as ties; pair views skip them)")
UNRANKED = "unranked assistant reply(ies) of those turns left out (never compared)"


def count_ranked(ranks: list[int | None], answered: bool, skipped: Counter) -> bool:
    """Whether a prompter turn whose assistant replies have `ranks` (None: unranked) gives a ranked record; counts
    in `skipped` a turn that does not (`NO_REPLY` when nobody answered, `ONE_RANKED`), and the tied pairs (`TIED`) and
    unranked replies, which its record leaves out (`UNRANKED`), of one that does."""
    ranked = sorted(r for r in ranks if r is not None)
    if len(ranked) < 2:
        skipped[ONE_RANKED if answered else NO_REPLY] += 1
        return False
    skipped[TIED] += sum(a == b for i, a in enumerate(ranked) for b in ranked[i + 1:])
    skipped[UNRANKED] += len(ranks) - len(ranked)
    return True


def ranked_groups(root: Node, skipped: Counter | None = None) -> list[tuple[list[Node], list[Node]]]:
    """(path ending on a prompter turn, its ranked assistant replies best first) with >= 2 replies; the turns
    without and the tied pairs counted in `skipped` (`count_ranked`)."""
    out = []
    skipped = Counter() if skipped is None else skipped

    def walk(node: Node, path: list[Node]) -> None:
        path = path + [node]
        if node.role == "user":
            answers = [r for r in node.replies if r.role == "assistant"]
            if count_ranked([r.rank for r in answers], bool(answers), skipped):
                out.append((path, _by_rank([r for r in answers if r.rank is not None])))
        for r in node.replies:
            walk(r, path)

    walk(root, [])
    return out


def prompter_paths(root: Node, which: str = "roots") -> list[list[Node]]:
    if which == "roots":
        return [[root]]
    if which != "all":
        raise DataError(f"unknown OASST prompts option {which!r}; valid: roots, all")
    out = []

    def walk(node: Node, path: list[Node]) -> None:
        path = path + [node]
        if node.role == "user":
            out.append(path)
        for r in node.replies:
            walk(r, path)

    walk(root, [])
    return out


def _oa_message(m: dict) -> dict:
    return {"role": ROLES[m["role"]], "content": m["text"]}


def oa_threads(root: dict, kind: str, skipped: Counter | None = None) -> list[list[dict]]:
    """Open-Assistant's threads of one (unfiltered) tree as raw message dicts, for `preset="oasst"`:
    SFT paths (prompter leaf kept only as its parent's first reply, then cut), or prompter-ending paths
    ("ranked": with >= 2 ranked replies, the others and tied pairs counted in `skipped`; "prompt": all), none
    containing a deleted or synthetic message (those counted in `skipped` as `DIRTY`, the prompter leaves that are not
    their parent's first reply as `LATE_LEAF`)."""
    out: list[list[dict]] = []
    skipped = Counter() if skipped is None else skipped

    def clean(thread: list[dict]) -> bool:
        return not any(m.get("deleted") or m.get("synthetic") for m in thread)

    def visit(node: dict, parents: list[dict]) -> None:
        thread = parents + [node]
        replies = node.get("replies") or []
        if kind == "sft" and len(thread) > 1 and not replies:
            if node["role"] == "prompter" and thread[-2]["replies"][0] is not node:
                skipped[LATE_LEAF] += 1
            elif not clean(thread):
                skipped[DIRTY] += 1
            else:
                out.append(thread[:-1] if node["role"] == "prompter" else thread)
        elif kind != "sft" and node["role"] == "prompter" and not clean(thread):
            skipped[DIRTY] += 1
        elif kind != "sft" and node["role"] == "prompter":
            answers = [r for r in replies if r.get("role") == "assistant"]
            if kind == "prompt" or count_ranked([r.get("rank") for r in answers], bool(answers), skipped):
                out.append(thread)
        for r in replies:
            visit(r, thread)

    visit(root, [])
    return out


def oa_states(kind: str) -> tuple[str, ...]:
    """The tree states preset "oasst" keeps (Open-Assistant's `load_oasst_export`: its "rl" mode also takes trees
    waiting in the prompt lottery)."""
    return ("ready_for_export", "prompt_lottery_waiting") if kind == "prompt" else ("ready_for_export",)


def oa_removal(row: dict, kind: str, langs: Sequence[str], root: dict) -> str | None:
    """Why preset "oasst" removes the tree of `row` whole (its state, root review or language), or None."""
    if row.get("tree_state") not in oa_states(kind):
        return "tree_state"
    if not root.get("review_result"):
        return "unreviewed"
    return "lang" if message_lang(root) not in langs else None


def _oa_convert(row: dict, where: str, kind: str, langs: Sequence[str], tree_id: str, root: dict,
                removed: Counter, skipped: Counter) -> list:
    if oa_removal(row, kind, langs, root) is not None:
        removed["tree (state, root review or language)"] += 1
        return []
    for m in _walk(root):
        for key, typ in (("text", str), ("role", str)):
            if not isinstance(m.get(key), typ) or (key == "role" and m["role"] not in ROLES):
                raise DataError(f"{where}: message {m.get('message_id', '?')} has no valid {key!r}; is this an "
                                f"Open-Assistant tree export?")
    out = []
    for t in oa_threads(root, kind, skipped):
        rid = f"{where} tree={tree_id} message={t[-1].get('message_id', '?')}"
        meta = {"tree_id": tree_id, "message_id": t[-1].get("message_id"), "lang": t[-1].get("lang"),
                "thread": [m.get("message_id") for m in t]}
        msgs = [_oa_message(m) for m in t]
        if kind == "sft":
            out.append(SFTRecord(msgs[:-1], [msgs[-1]], id=rid, meta=meta))
        elif kind == "ranked":
            ranked = sorted((r for r in t[-1].get("replies") or [] if r["role"] == "assistant"
                             and r.get("rank") is not None), key=lambda r: r["rank"])
            if len(ranked) >= 2:
                out.append(RankedRecord(msgs, [[_oa_message(r)] for r in ranked], ranks=[r["rank"] for r in ranked],
                                        id=rid, meta=meta))
        else:
            out.append(PromptRecord(msgs, id=rid, meta=meta))
    return out


def _walk(m: dict):
    yield m
    for r in m.get("replies") or []:
        yield from _walk(r)


PRESETS = ("strict", "oasst")
# Open-Assistant's message tree states (backend/oasst_backend/models/message_tree_state.py, `State`): a tree export's
# `tree_state` is one of them; `tree_states` naming another is a typo that would keep no tree
TREE_STATES = ("initial_prompt_review", "prompt_lottery_waiting", "growing", "ranking", "backlog_ranking",
               "ready_for_scoring", "scoring_failed", "ready_for_export", "aborted_low_grade", "halted_by_moderator")
# The options of the strict preset, with their defaults; which record kind reads each (None: every kind).
STRICT_OPTIONS = {"mode": ("leaves", "sft"), "prompts": ("roots", "prompt"), "drop_deleted": (True, None),
                  "drop_synthetic": (True, None), "drop_unreviewed": (True, None),
                  "tree_states": (("ready_for_export",), None)}


def check_applies(kind: str, preset: str, **options: Any) -> None:
    """DataError naming the first option set away from its default that this read would ignore: every
    STRICT_OPTIONS key under preset "oasst" (Open-Assistant's own rules), `mode` for other than SFT records,
    `prompts` for other than prompt records."""
    for key, value in options.items():
        default, reads = STRICT_OPTIONS[key]
        if key == "tree_states" and value is not None:
            value = tuple(value)
        if value == default:
            continue
        if preset == "oasst":
            raise DataError(f"data.reader_options.{key}: {value!r} does not apply to preset 'oasst' (Open-Assistant's "
                            f"own filters and threads), so it would be ignored; remove it, or use preset 'strict'")
        if reads is not None and reads != kind:
            raise DataError(f"data.reader_options.{key}: {value!r} chooses the {reads} records of the OASST trees, and "
                            f"this command reads {kind} records from them, so it would be ignored; remove it")


@register_reader("oasst", kinds=("sft", "ranked", "prompt"), priority=20,
                 detect=lambda r: "message_tree_id" in r and isinstance(r.get("prompt"), dict),
                 description="Open-Assistant message trees (message_tree_id, prompt{replies}) -> sft | ranked | prompt")
def read_oasst(source: Any, *, kind: str = "sft", mode: str = "leaves", prompts: str = "roots",
               langs: str | Sequence[str] | None = None, drop_deleted: bool = True, drop_synthetic: bool = True,
               drop_unreviewed: bool = True, tree_states: Sequence[str] | None = ("ready_for_export",),
               on_invalid: str = "raise", split: str | None = None, preset: str = "strict") -> list:
    """Records of `kind` ("sft", "ranked" or "prompt") from an Open-Assistant tree export (`preset`: "strict"
    or "oasst", Open-Assistant's own rules; see the module docstring)."""
    return read_oasst_rows(iter_rows(source, split), where_of(source), kind=kind, mode=mode, prompts=prompts,
                           langs=langs,
                           drop_deleted=drop_deleted, drop_synthetic=drop_synthetic, drop_unreviewed=drop_unreviewed,
                           tree_states=tree_states, on_invalid=on_invalid, preset=preset)


def check_kind_and_flags(kind: str, **flags: Any) -> None:
    """`read_oasst_rows`' first checks: a record kind the reader gives, and each `drop_*` flag a bool (a quoted
    "false" would be truthy: the filter kept on)."""
    if kind not in ("sft", "ranked", "prompt"):
        raise DataError(f"the OASST reader gives 'sft', 'ranked' or 'prompt' records, not {kind!r} "
                        f"(use load_records(..., kind={kind!r}) to convert)")
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise DataError(f"data.reader_options.{key}: must be true or false, got {value!r} (a "
                            f"{type(value).__name__}); write it without quotes")


def check_tree_states(tree_states: Sequence[str] | None) -> None:
    """DataError naming the first of `tree_states` that is no Open-Assistant tree state (`TREE_STATES`): a typo
    ('ready') kept no tree, or, beside a valid state, nothing of what it meant, without a word."""
    for state in tree_states or ():
        if state not in TREE_STATES:
            raise DataError(f"data.reader_options.tree_states: {state!r} is not an Open-Assistant tree state; valid: "
                            f"{', '.join(TREE_STATES)}")


def removed_everything(source: str, notes: dict) -> str | None:
    """The one-line error for a read whose filters removed every tree (`notes` of `read_oasst_rows`): which filter
    removed how many trees, with the values the file holds; None when a tree was kept or none was read."""
    roots, trees = notes.get("roots_removed") or {}, sum(n for _, n in notes["root_langs"])
    if notes["records"] or notes.get("kept", 1) or not trees:
        return None
    said = {"tree_state": lambda n: f"tree_states {notes.get('tree_states')} removed {n} (the file's tree states: "
                                    f"{dict((k, v) for k, v in notes.get('states') or [])})",
            "lang": lambda n: f"langs {notes['wanted']} removed {n} (the languages of the trees' first messages: "
                              f"{dict((k, v) for k, v in notes['root_langs'])})"}
    parts = [said[k](n) if k in said else f"drop_{k}=true removed {n}" for k, n in sorted(roots.items())]
    preset = " (preset 'oasst': Open-Assistant's own rules)" if notes["preset"] == "oasst" else ""
    return (f"{source}: the OASST filters removed all {trees} trees{preset}: reader_options {'; '.join(parts)}; set "
            "them to values the file holds")


def say_oasst_notes(source: str, notes: dict) -> None:
    """Say a read's notes (`ReaderNotes.oasst`, from `read_oasst_rows`; a trainer's map batches' summed): what it
    left out (`log_left_out`), and a warning when the wanted languages match no tree's first message."""
    removed, skipped = Counter(notes["removed"]), Counter(notes["skipped"])
    log_left_out(source, notes["kind"], notes["preset"], notes["records"], removed, skipped)
    wanted, root_langs = notes["wanted"], {lang: n for lang, n in notes["root_langs"]}
    seen = {str(lang or "").lower() for lang in root_langs}
    if wanted is not None and root_langs and not seen & set(wanted):
        logger.warning("%s: reader_options.langs %s matches no tree's first message (their languages: %s), so "
                       "every tree was removed; set langs to some of those", source, wanted, root_langs)
        return
    if wanted is not None and root_langs:  # a typo beside a language that matches: once per value
        for lang in dict.fromkeys(w for w in wanted if w not in seen):
            logger.warning("%s: reader_options.langs value %r matches no tree's first message (their languages: %s), "
                           "so it keeps nothing; correct it or remove it", source, lang, root_langs)
    everything = removed_everything(source, notes)
    if everything is not None:  # (tree_states, drop_*: a langs matching nothing is said above)
        logger.warning(everything)


def log_left_out(source: str, kind: str, preset: str, n_records: int, removed: Counter, skipped: Counter) -> None:
    """One logged line each for what a read left out: the filters' removals, the prompter turns and replies that
    give no ranked record, and the threads preset "oasst" drops (Open-Assistant's rules)."""
    if removed:
        logger.info("%s: OASST filters removed %s", source, dict(removed))
    if kind == "ranked":
        logger.info("%s: OASST ranked records: %d, none from %d %s and %d %s; %d %s; %d %s", source, n_records,
                    skipped[NO_REPLY], NO_REPLY, skipped[ONE_RANKED], ONE_RANKED, skipped[TIED], TIED,
                    skipped[UNRANKED], UNRANKED)
    if preset == "oasst":
        late = f" and {skipped[LATE_LEAF]} {LATE_LEAF}" if kind == "sft" else ""
        logger.info("%s: OASST preset 'oasst' left out %d %s%s (Open-Assistant's rules; %d %s records)", source,
                    skipped[DIRTY], DIRTY, late, n_records, kind)


def read_oasst_rows(rows: Any, name: str, *, kind: str = "sft", mode: str = "leaves", prompts: str = "roots",
                    langs: str | Sequence[str] | None = None, drop_deleted: bool = True, drop_synthetic: bool = True,
                    drop_unreviewed: bool = True, tree_states: Sequence[str] | None = ("ready_for_export",),
                    on_invalid: str = "raise", preset: str = "strict") -> list:
    """`read_oasst` on an iterable of (tree row, where) pairs (also used by the flat-message reader)."""
    source = name
    check_kind_and_flags(kind, drop_deleted=drop_deleted, drop_synthetic=drop_synthetic,
                         drop_unreviewed=drop_unreviewed)
    if isinstance(tree_states, str):  # one state, as `langs` (YAML `tree_states: ready_for_export`), not a substring
        tree_states = [tree_states]
    check_tree_states(tree_states)
    if langs is not None:
        langs = [str(lang).lower() for lang in ([langs] if isinstance(langs, str) else langs)]
    filters = Filters(langs, drop_deleted, drop_synthetic, drop_unreviewed)
    removed: Counter = Counter()
    skipped: Counter = Counter()  # ranked records: prompter turns that give none, tied pairs
    if preset not in PRESETS:
        raise DataError(f"unknown OASST preset {preset!r}; valid: {', '.join(PRESETS)} (reader_options.preset)")
    check_applies(kind, preset, mode=mode, prompts=prompts, drop_deleted=drop_deleted, drop_synthetic=drop_synthetic,
                  drop_unreviewed=drop_unreviewed, tree_states=tree_states)
    oa_langs = ["en"] if langs is None else langs
    root_langs: Counter = Counter()
    states: Counter = Counter()  # the trees' tree_state values
    roots: Counter = Counter()  # the trees removed whole, by the filter that removed them; "kept": the others

    def convert(row: dict, where: str) -> list:
        tree_id = get_field(row, "message_tree_id", where, str, "the tree's id")
        root_msg = get_field(row, "prompt", where, dict, "the tree's root message")
        root_langs[root_msg.get("lang")] += 1
        states[row.get("tree_state")] += 1
        if preset == "oasst":
            roots[oa_removal(row, kind, oa_langs, root_msg) or "kept"] += 1
            return _oa_convert(row, where, kind, oa_langs, tree_id, root_msg, removed, skipped)
        if tree_states is not None and row.get("tree_state") not in tree_states:
            removed[f"tree_state={row.get('tree_state')}"] += 1
            roots["tree_state"] += 1
            return []
        if root_msg.get("role") != "prompter":
            raise DataError(f"{where}: tree {tree_id} starts with role {root_msg.get('role')!r}; a tree's root "
                            f"must be a 'prompter' message")
        root = build_tree(root_msg, filters, where, removed)
        roots[filters.reason(root_msg) or "kept"] += 1
        return [] if root is None else tree_records(root, kind, mode, prompts, where, tree_id, skipped)

    records = collect(rows, convert, on_invalid, name=str(source))
    # said by say_oasst_notes; a trainer's map batches' summed and said once per dataset (readers.notes)
    notes = {"kind": kind, "preset": preset, "wanted": oa_langs if preset == "oasst" else langs,
             "records": len(records), "removed": dict(removed), "skipped": dict(skipped),
             "root_langs": [[lang, n] for lang, n in root_langs.items()],
             "states": [[state, n] for state, n in states.items()], "kept": roots.pop("kept", 0),
             "roots_removed": dict(roots), "tree_states": list(oa_states(kind) if preset == "oasst" else tree_states)
             if preset == "oasst" or tree_states is not None else None}
    if not ReaderNotes(oasst=notes).held():
        everything = removed_everything(source, notes)
        if everything is not None and _EMPTIED.get() is not None:  # for the caller's "holds no records" error
            _EMPTIED.get().append(everything)
        say_oasst_notes(source, notes)
    return records


def tree_records(root: Node, kind: str, mode: str, prompts: str, where: str, tree_id: str, skipped: Counter) -> list:
    """The `kind` records of one filtered tree `tree_id` of row `where` (strict preset)."""
    def rid(n: Node) -> str:
        return f"{where} tree={tree_id} message={n.id}"

    def meta(n: Node) -> dict:
        return {"tree_id": tree_id, "message_id": n.id, "lang": n.lang}

    if kind == "sft":
        return [SFTRecord([n.message() for n in p[:-1]], [p[-1].message()], id=rid(p[-1]),
                          meta={**meta(p[-1]), "thread": [n.id for n in p]})
                for p in sft_threads(root, mode)]
    if kind == "ranked":
        return [RankedRecord([n.message() for n in p], [[r.message()] for r in replies],
                             ranks=[r.rank for r in replies], id=rid(p[-1]), meta=meta(p[-1]))
                for p, replies in ranked_groups(root, skipped)]
    return [PromptRecord([n.message() for n in p], id=rid(p[-1]), meta=meta(p[-1]))
            for p in prompter_paths(root, prompts)]


_EMPTIED: ContextVar[list[str] | None] = ContextVar("alignkit_oasst_emptied", default=None)


@contextmanager
def emptied_reads() -> Iterator[list[str]]:
    """Within it, the list it yields collects the `removed_everything` line of each whole OASST read whose filters
    removed every tree (also logged as a warning), so a caller refusing data that "holds no records"
    (`alignkit.cli.data.read_each`) names the filter and the values the file holds. A read whose filters removed
    a file's every tree is no error by itself: `langs: [en]` over an English and a German file keeps the first."""
    token = _EMPTIED.set([])
    try:
        yield _EMPTIED.get()
    finally:
        _EMPTIED.reset(token)
