"""What one tokenization pass counted (`TokenizeStats`): records kept, cut and dropped (with the first ids of each),
system / tool messages the formatter did not render, empty context messages kept; its one-line `summary` and the
JSON the tokenization cache stores beside the features. `alignkit.data.tokenize` fills it (and re-exports it)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class TokenizeStats:
    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    prompt_truncated_ids: list = field(default_factory=list)  # the first ids (up to 5) of prompts cut at the start
    completion_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_ids: dict = field(default_factory=dict)  # reason -> first ids (up to 5)
    system_unrendered: int = 0  # records with a system / tool message the formatter did not render (`unrendered_roles`)
    system_unrendered_ids: list = field(default_factory=list)  # their first ids (up to 5)
    unrendered_roles: list = field(default_factory=list)  # the roles of those messages
    empty_context: int = 0  # records with an empty system / developer / tool message (kept: chat.empty_context_roles)
    empty_context_ids: list = field(default_factory=list)  # their first ids (up to 5)
    empty_context_roles: list = field(default_factory=list)  # the roles of those messages

    def drop(self, reason: str, rid: str) -> None:
        self.dropped[reason] += 1
        self.dropped_ids.setdefault(reason, [])
        if len(self.dropped_ids[reason]) < 5:
            self.dropped_ids[reason].append(rid)

    def note_prompt_truncated(self, rid: str) -> None:
        self.prompt_truncated += 1
        if len(self.prompt_truncated_ids) < 5:
            self.prompt_truncated_ids.append(rid)

    def note_system_unrendered(self, rid: str, roles: list[str]) -> None:
        self.system_unrendered += 1
        self.unrendered_roles = sorted({*self.unrendered_roles, *roles})
        if len(self.system_unrendered_ids) < 5:
            self.system_unrendered_ids.append(rid)

    def note_empty_context(self, rid: str, roles: list[str]) -> None:
        self.empty_context += 1
        self.empty_context_roles = sorted({*self.empty_context_roles, *roles})
        self.empty_context_ids += [rid] if len(self.empty_context_ids) < 5 else []

    def empty_context_note(self) -> str:  # in `summary` and prepare_dataset's line
        roles = " or ".join(self.empty_context_roles)
        return (f"{self.empty_context:,} of {self.total:,} record(s) have an empty {roles} message (kept, rendered as "
                f"it is), e.g. {self.empty_context_ids}")

    def as_summary(self) -> dict:
        """The stats as JSON (the tokenization cache's `<key>.json`)."""
        return {**dataclasses.asdict(self), "dropped": dict(self.dropped)}

    @classmethod
    def from_summary(cls, info: dict) -> "TokenizeStats":
        """The stats `as_summary` wrote (TypeError on a key they do not have: a damaged cache entry)."""
        stats = cls(**{k: v for k, v in info.items() if k != "dropped"})
        stats.dropped = Counter(info.get("dropped", {}))
        return stats

    @property
    def warns(self) -> bool:
        """Whether `summary` reports something to warn about (dropped records, system messages not rendered)."""
        return bool(self.dropped) or self.system_unrendered > 0

    def summary(self) -> str:
        s = (f"tokenized {self.kept}/{self.total} record(s); prompt truncated: {self.prompt_truncated}, "
             f"completion truncated: {self.completion_truncated}")
        for reason, n in self.dropped.items():
            s += f"; dropped {n} ({reason}), e.g. {self.dropped_ids[reason]}"
        if self.system_unrendered:
            roles = " or ".join(self.unrendered_roles) or "system"
            s += (f"; {self.system_unrendered} record(s) have a {roles} message the formatter (data.formatter: the "
                  f"chat template) does not render, so the model never reads it, e.g. {self.system_unrendered_ids}: "
                  f"fold it into the first user message (a tool's result: into a user message after the call), or "
                  f"use a template that renders {roles} messages")
        return s + (f"; {self.empty_context_note()}" if self.empty_context else "")


__all__ = ["TokenizeStats"]
