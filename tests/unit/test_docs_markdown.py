"""Every page renders as written and says what the code does, where `mkdocs build --strict` sees nothing wrong: a
code fence left open (the rest of the page becomes one code block), a paragraph printed twice, a sample `mltag`
command the CLI no longer takes."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_page_closes_every_code_fence():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    odd = {p.name: n for p in pages if (n := len(re.findall(r"^ *```", p.read_text(), re.M))) % 2}
    assert not odd, f"pages with a code fence left open (fence lines): {odd}"


def _paragraphs(text: str) -> list[str]:
    """A page's prose paragraphs: outside code fences, tables and headings, joined into one line each."""
    out, block, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if re.match(r"^ *```", line):
            fenced = not fenced
            continue
        if fenced or line.lstrip().startswith(("|", "#", "<!--")):
            continue
        if line.strip():
            block.append(line.strip())
        elif block:
            out.append(" ".join(block))
            block = []
    return out


def test_no_page_prints_a_paragraph_twice():
    """#54: docs/configuration.md printed four paragraphs twice, which strict MkDocs does not see either."""
    para = "A paragraph long enough to count, repeated below by a careless edit of the page, word for word."
    sample = f"# Page\n\n{para}\n\n```\n{para}\n```\n\n| a |\n\n" + para.replace(" below", "\nbelow") + "\n"
    assert _paragraphs(sample) == [para, para]  # the check sees a paragraph again across line breaks, not in code
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    twice = {}
    for p in pages:
        seen = set()
        for para in _paragraphs(p.read_text()):
            if len(para) >= 80 and para in seen:
                twice.setdefault(p.name, []).append(para[:80])
            seen.add(para)
    assert not twice, f"paragraphs printed twice: {twice}"


def _mltag_commands(text: str) -> list[tuple[int, str]]:
    """``(line, arguments)`` of every ``mltag ...`` command in a page's code blocks (continued lines joined)."""
    out, fenced, pending = [], False, None
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"^ *```", line):
            fenced, pending = not fenced, None
            continue
        if not fenced:
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            m = re.match(r"^\s*(?:\$ )?(?:\.venv/bin/)?mltag (.*)$", line)
            if not m:
                continue
            pending = (n, m.group(1))
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1])
            continue
        out.append((pending[0], re.split(r" #|&&|\|", pending[1])[0].strip()))
        pending = None
    return out


def test_every_mltag_command_in_the_docs_is_one_the_cli_takes():
    """#54: a page's sample command that the CLI contradicts (a renamed flag, a removed subcommand) fails here, which
    strict MkDocs cannot see."""
    import shlex

    from mltag.cli.parser import build_parser

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found, refused = 0, []
    for p in pages:
        for n, args in _mltag_commands(p.read_text()):
            found += 1
            try:
                build_parser().parse_args(shlex.split(args))
            except SystemExit as e:
                if e.code:
                    refused.append(f"{p.name}:{n}: mltag {args}")
    assert found >= 20 and not refused, refused
    try:
        build_parser().parse_args(["predict", "--no-such-flag", "x.jpg"])
        raise AssertionError("the parser took an unknown flag")
    except SystemExit as e:
        assert e.code == 2
