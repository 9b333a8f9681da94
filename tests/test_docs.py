"""README and docs/: the README stays short, every relative link resolves, every page is in the site's nav.

Pure file reading (no mkdocs): `mkdocs build --strict` in .ci/run checks the rendered site too.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links are links."""
    text = re.sub(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+).*?\1", "", text, flags=re.S)


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("//")
    ]


def anchors(path: Path) -> set[str]:
    """Heading anchors as GitHub and Python-Markdown's toc (mkdocs) make them."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), re.M):
        github = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        ascii_text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
        toc = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip().lower())
        found |= {github, toc}
    return found


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < 250, f"README.md has {lines} lines; move reference material into docs/"


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(
                f"{target}: no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved}"
            )
        elif anchor and (resolved.suffix != ".md" or anchor.lower() not in anchors(resolved)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, broken


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    assert not [page.name for page in PAGES if page.resolve() not in linked]


def test_every_docs_page_is_in_the_mkdocs_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^docs_dir:\s*docs\s*$", config, re.M)
    nav = re.search(r"^nav:\s*\n((?:[ \t]+.*\n?|\s*\n)+)", config, re.M)
    assert nav, "mkdocs.yml has no nav"
    listed = re.findall(r"([\w./-]+\.md)\s*$", nav.group(1), re.M)
    assert sorted(listed) == sorted(set(listed)), "a page is listed twice"
    assert not [name for name in listed if not (DOCS / name).is_file()], "nav names a page that does not exist"
    assert not [page.name for page in PAGES if page.name not in listed], "docs/*.md missing from mkdocs.yml nav"
