"""docs/VALIDATION.md names only files and sections that exist."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = (REPO_ROOT / "docs" / "VALIDATION.md").read_text()


def _headings(markdown: str) -> list[str]:
    return [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]


def test_every_repository_file_the_doc_names_exists():
    names = set(re.findall(r"`((?:bench|configs|docs|launch|longcat_dist|tests)/[\w./-]+)`", DOC))
    assert "bench/sampler.py" in names
    missing = sorted(name for name in names if not (REPO_ROOT / name).exists())
    assert missing == [], f"docs/VALIDATION.md names missing files: {missing}"


def test_every_section_the_doc_points_to_exists():
    pointers = re.findall(r"`(docs/[\w.-]+\.md)`, section\s+\"([^\"]+)\"", DOC)
    assert ("docs/PERFORMANCE.md", "Image-to-video validation sampler") in pointers
    for doc, section in pointers:
        headings = _headings((REPO_ROOT / doc).read_text())
        assert any(heading.startswith(section) for heading in headings), f"{doc} has no section {section!r}"
