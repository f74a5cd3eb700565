"""`alignkit ls [section]`: every registry by name, with a one-line description.

Sections: losses (one per `alignkit.losses.REGISTRIES` entry), interventions, adapters, readers,
formatters, annotators, reweighters, feedback, commands.
"""

from __future__ import annotations

import argparse
from typing import Iterable, Iterator

from alignkit.adapters.config import KINDS
from alignkit.interventions import intervention_types


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = "list every registry: losses, interventions, readers, formatters, annotators, ..."
    p = sub.add_parser("ls", help=text, description=f"alignkit ls: {text}, each name with a one-line description.")
    p.add_argument("section", nargs="?", default=None, metavar="SECTION",
                   help=f"only this section (str, one of {', '.join(SECTIONS)}; default: every section)")
    p.set_defaults(func=run)


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


def _losses() -> Iterator[tuple[str, Iterable[tuple[str, str]]]]:
    from alignkit.losses import REGISTRIES

    for name, reg in REGISTRIES.items():
        yield f"losses/{name} ({reg.kind})", list(reg.describe())


def _interventions():
    yield "interventions (adapter.reft.config.representations[].intervention)", \
        [(n, _first_line(c)) for n, c in sorted(intervention_types().items())]


def _adapters():
    yield "adapters (adapter.kind)", [(k, info.description) for k, info in KINDS.items()]


def _readers():
    from alignkit.data import READERS

    yield "readers (data.reader)", [(n, f"[{'/'.join(r.kinds)}] {r.description}") for n, r in sorted(READERS.items())]


def _formatters():
    from alignkit.data import FORMATTERS

    text = {"chat-template": "tokenizer.apply_chat_template (text prompts wrapped as one user turn)",
            "oasst": "Open-Assistant <|prompter|>q<eos><|assistant|>a<eos>", "plain": "prompt + completion, verbatim"}
    yield "formatters (data.formatter)", [("auto", "chat-template for conversations, plain for text")] + \
        [(n, text.get(n) or _first_line(f)) for n, f in sorted(FORMATTERS.items())]


def _annotators():
    from alignkit.online import ANNOTATORS

    yield "annotators (online)", list(ANNOTATORS.describe())


def _reweighters():
    from alignkit.online import REWEIGHTERS

    yield "reweighters (online)", list(REWEIGHTERS.describe())


def _feedback():
    from alignkit.online import FEEDBACK_MODES

    yield "feedback modes (online)", [(m, "") for m in FEEDBACK_MODES]


def _commands():
    from alignkit.settings import CONFIG_CLASSES

    yield "commands with configs (alignkit <command> --config x.yaml)", \
        [(n, f"{c.__name__}: sections " + ", ".join(c.__dataclass_fields__)) for n, c in CONFIG_CLASSES.items()]


SECTIONS = {"losses": _losses, "interventions": _interventions, "adapters": _adapters, "readers": _readers,
            "formatters": _formatters, "annotators": _annotators, "reweighters": _reweighters, "feedback": _feedback,
            "commands": _commands}


def render(section: str | None = None) -> str:
    if section is not None and section not in SECTIONS:
        from alignkit.settings import ConfigError

        raise ConfigError(f"ls: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    lines: list[str] = []
    for name, fn in SECTIONS.items():
        if section not in (None, name):
            continue
        for title, entries in fn():
            entries = list(entries)
            lines.append(f"{title}:")
            width = max((len(n) for n, _ in entries), default=0)
            lines += [f"  {n:<{width}}  {d}".rstrip() for n, d in entries]
            lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(render(args.section), end="")
    return 0


__all__ = ["SECTIONS", "add_parser", "render", "run"]
