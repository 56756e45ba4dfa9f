"""The README stays a short entry point, and the docs site's navigation names pages that exist
(`make docs` builds the site itself with mkdocs --strict)."""

from __future__ import annotations

import yaml

from tests.conftest import REPO

README = REPO / "README.md"
MKDOCS = REPO / "mkdocs.yml"


def nav_pages(entries) -> list[str]:
    """Every page file named in a mkdocs nav (nested sections included)."""
    pages = []
    for entry in entries:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_readme_is_short_and_gives_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text


def test_readme_keeps_its_figures_in_one_headline_section():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines.count("## Headline figures") == 1


def test_every_page_in_the_nav_exists():
    config = yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))
    docs_dir = REPO / config.get("docs_dir", "docs")
    pages = nav_pages(config["nav"])
    assert pages, "mkdocs.yml has no nav"
    missing = [page for page in pages if not (docs_dir / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist under {docs_dir}: {missing}"
