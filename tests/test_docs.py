"""The README and docs/ pages: every relative link resolves (file and #anchor)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    return [u for u in LINK.findall(text) if not re.match(r"[a-z]+:", u)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for url in relative_links(page):
        path, _, anchor = url.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(url)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(url)
    assert not broken, f"{page.name}: broken links {broken}"


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n[ok](p.md#title) [gone](nothere.md) [bad](p.md#nowhere)\n")
    found = [u for u in relative_links(page) if not (tmp_path / u.partition("#")[0]).exists()]
    assert found == ["nothere.md"] and "title" in anchors(page) and "nowhere" not in anchors(page)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
