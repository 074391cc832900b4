"""The facts the code relies on are cited from the project's own docs/method.md, by sections that exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".json", ".jsonl", ".yaml", ".yml", ".html", ".css", ".js", ".sh"}
# A file that names a document outside the repository (written in two parts so this file does not).
MISSING = "REFERENCE" + ".md"
CITATION = re.compile(r"docs/method\.md,\s+sections?\s+(\d+(?:\s*(?:-|,|and)\s*\d+)*)")


def _walk(top: Path):
    """Text files under top; symlinked folders (src/reflectionflow/weights) are not followed."""
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".pytest_cache") and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES and not path.is_symlink():
                yield path


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "weights" / "MODEL_CARD.md"]
    for top in ("src", "docs", "benchmarks", "tests"):
        files.extend(_walk(ROOT / top))
    return [f for f in files if f.exists()]


def _sections() -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\. \S", METHOD.read_text(), re.MULTILINE)}


def _cited(numbers: str) -> set[int]:
    cited: set[int] = set()
    for part in re.split(r"\s*(?:,|and)\s*", numbers.strip()):
        lo, _, hi = part.partition("-")
        cited.update(range(int(lo), int(hi or lo) + 1))
    return cited


def test_method_doc_exists_with_numbered_sections():
    assert METHOD.is_file()
    sections = _sections()
    assert sections == set(range(1, len(sections) + 1)) and len(sections) >= 6


def test_no_file_cites_a_document_outside_the_repository():
    files = _files()
    assert len(files) > 50
    offenders = [str(f.relative_to(ROOT)) for f in files if MISSING in f.read_text(errors="replace")]
    assert not offenders, f"{MISSING} is not part of the project; cite docs/method.md instead: {offenders}"


def test_every_method_citation_names_a_section_that_exists():
    sections = _sections()
    found, bad = 0, []
    for f in _files():
        for m in CITATION.finditer(f.read_text(errors="replace")):
            found += 1
            missing = _cited(m.group(1)) - sections
            if missing:
                bad.append(f"{f.relative_to(ROOT)}: {m.group(0)!r} (no section {sorted(missing)})")
    assert found >= 30
    assert not bad, bad


@pytest.mark.parametrize("text, numbers", [("docs/method.md, section 3", {3}),
                                           ("docs/method.md,\nsections 2 and 5", {2, 5}),
                                           ("docs/method.md, sections 2-4", {2, 3, 4})])
def test_citation_pattern(text, numbers):
    m = CITATION.search(text)
    assert m and _cited(m.group(1)) == numbers
