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


UPWARD = re.compile(r"(?<![\w./])((?:\.\./)+)([A-Za-z_][\w.-]*)")


def test_nothing_points_outside_the_repository():
    """A relative path with ``../`` in a module or doc names something that exists inside the repository,
    seen from the file's folder: users have the repository, nothing beside it."""
    files = _sources() + sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("*.md"))
    outside = []
    for p in files:
        for ups, name in UPWARD.findall(p.read_text(encoding="utf-8")):
            target = (p.parent / ups / name).resolve()
            if ROOT not in target.parents or not target.exists():
                outside.append(f"{p.relative_to(ROOT)}: {ups}{name}")
    assert not outside, outside
