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
