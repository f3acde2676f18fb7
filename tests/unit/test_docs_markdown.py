"""Every page renders as written: a code fence left open turns the rest of a page into one code block, which
`mkdocs build --strict` does not report."""

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
