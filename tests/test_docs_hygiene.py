"""The documentation speaks to users and contributors: no references to files outside the
repository, to machine-local paths, to issue numbers or to the team's work sessions, in the
Markdown documents, in the package's sources (their --help texts, docstrings and comments) and in
the `flashdispatch` command's --help."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = [
    (re.compile(r"ANCHORS\.md|shared/(DESIGN|STYLE|GLUON)\.md"), "a file outside the repository"),
    (re.compile(r"/work/"), "a machine-local path"),
    (re.compile(r"\b[Ii]ssues? #?\d+\b|\(#\d+\)|\b(?:[Cc]loses|[Ff]ixes|[Ss]ee) #\d+"), "an issue number"),
    (re.compile(r"\b(earlier|last|this|next) session\b|\.devout\b"), "the team's work sessions"),
]


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _offences(text: str) -> list[str]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in FORBIDDEN:
            m = pattern.search(line)
            if m:
                found.append(f"line {n}: {what}: {m.group(0)!r}")
    return found


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_stay_inside_the_repository(path: Path) -> None:
    offences = _offences(path.read_text(encoding="utf-8"))
    assert not offences, f"{path.relative_to(ROOT)}: " + "; ".join(offences)


def _sources() -> list[Path]:
    return [p for folder in ("dispatch", "backends", "tools", "examples") for p in sorted((ROOT / folder).rglob("*.py"))]


def test_sources_stay_inside_the_repository() -> None:
    """The tools' --help texts are built in their modules (tools/tune.py, bench.py, ...): the
    sources' strings and comments are checked where they are written."""
    sources = _sources()
    assert len(sources) > 50
    bad = {str(p.relative_to(ROOT)): o for p in sources if (o := _offences(p.read_text(encoding="utf-8")))}
    assert not bad, bad


def _help_texts() -> dict[str, str]:
    from flashdispatch import cli

    parser = cli.build_parser()
    texts = {"flashdispatch": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                texts[f"flashdispatch {name}"] = sub.format_help()
    return texts


def test_help_texts_stay_inside_the_repository() -> None:
    texts = _help_texts()
    assert len(texts) > 3
    bad = {cmd: o for cmd, text in texts.items() if (o := _offences(text))}
    assert not bad, bad


def test_the_check_finds_what_it_forbids() -> None:
    assert _offences("see ANCHORS.md for the numbers")
    assert _offences("profile at /work/main/profiles/h200.yaml")
    assert _offences("fixed in issue 13") and _offences("(closes #12)")
    assert _offences("measured in an earlier session") and _offences("state in .devout/x.json")
    assert not _offences("B=16 H=32 S=1k: 0.95x; 128 x 64 tiles; 460 B of spills; --out /root/out")
