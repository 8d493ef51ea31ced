"""What the code tells a user to read exists: every ``docs/<name>.md`` and every README section named
in a message or docstring of the project's modules."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "objectives", "engine", "tasks", "datasets", "shapesworld", "tools", "benchmarks")
DOC = re.compile(r"docs/([A-Za-z_]+\.md)")
SECTION = re.compile(r"README(?:\.md)?[ ,(]+[\"']([^\"']+)[\"']")


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")]
    return files + sorted(ROOT.glob("run_*.py"))


def _readme_sections() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}


def test_named_docs_exist():
    missing = [f"{p.relative_to(ROOT)}: docs/{m}" for p in _sources()
               for m in DOC.findall(p.read_text(encoding="utf-8")) if not (ROOT / "docs" / m).is_file()]
    assert not missing, missing


def test_named_readme_sections_exist():
    sections = _readme_sections()
    missing = [f"{p.relative_to(ROOT)}: README {s!r}" for p in _sources()
               for s in SECTION.findall(p.read_text(encoding="utf-8"))
               if not any(h == s or h.startswith(s) for h in sections)]
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    outside = [str(p.relative_to(ROOT)) for p in _sources() if "../shared" in p.read_text(encoding="utf-8")]
    assert not outside, outside
