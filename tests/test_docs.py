"""The documentation stays true to the code: the site builds with every link and anchor resolved,
every `docs/…` page and anchor the code cites exists, and every setting is documented."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.serve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CITATION = re.compile(r"docs/([a-z_-]+\.md)(?:#([a-z0-9-]+))?")


def slug(heading: str) -> str:
    """The anchor mkdocs (toc) and GitHub give a plain heading: lower case, spaces to dashes, no punctuation."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", page.read_text(), flags=re.M)}


def test_slugs_are_computed_like_the_sites() -> None:
    assert slug("Adaptive attacks") == "adaptive-attacks" and slug("The `fisherguard` command") == "the-fisherguard-command"


def test_every_citation_in_the_code_resolves() -> None:
    cited: list[tuple[str, str, str | None]] = []
    for folder in ("service", "bench", "tests", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            cited += [(str(path.relative_to(ROOT)), m.group(1), m.group(2)) for m in CITATION.finditer(path.read_text())]
    assert len(cited) > 20
    missing = [c for c in cited if not (DOCS / c[1]).is_file() or (c[2] is not None and c[2] not in anchors(DOCS / c[1]))]
    assert missing == []


def test_no_code_cites_a_file_outside_the_repository() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("service", "bench", "tests", "models")
        for p in (ROOT / folder).rglob("*.py")
        if p != Path(__file__).resolve() and re.search(r"(?<!docs/)design\.md|research-leads", p.read_text())
    ]
    assert offenders == []


def test_every_setting_is_documented_with_its_default() -> None:
    page = (DOCS / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        row = next((line for line in page.splitlines() if f"`FISHERGUARD_{name.upper()}`" in line), None)
        assert row is not None, name
        default = field.default
        shown = "unset" if default is None else ("empty" if default == "" else str(default).lower())
        assert shown in row.lower(), (name, row)


def test_the_readme_is_short_and_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    commands = [line for line in lines[:20] if line.startswith("python3 -m venv .venv")]
    assert commands[0].endswith(".venv/bin/fisherguard serve") and commands[1].endswith(".venv/bin/python -m pytest -q")


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
